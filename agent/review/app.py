"""The review web app: a keyboard-driven queue of escalated drafts (FastAPI, server-rendered),
and a page of audit disagreements to settle (``/disputes``).

Pages are rendered by Jinja2 with autoescaping; email HTML passes through
:func:`agent.review.sanitize.sanitize_html` first. The only script is ``static/review.js``
(j/k move, a approve, e edit, r reject), served from the app so the strict
Content-Security-Policy below needs no inline script or style.

>>> app = create_app(service=svc, authenticator=Authenticator(password_hash=h))  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8765)                                # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from agent.logs import get_logger
from agent.review.auth import SESSION_COOKIE, Authenticator, Session, SessionStore, csrf_ok
from agent.review.disputes import PROVED
from agent.review.errors import ReviewError
from agent.review.sanitize import blocked_image_hosts, sanitize_html
from agent.review.service import ReviewService, parse_age
from storage.audits import list_disputes
from storage.reviews import count_queue, list_queue, queue_counts

HERE = Path(__file__).parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
LOGIN_FAILURES_PER_MINUTE = 10


class _LoginThrottle:
    """Refuse logins from a client for a while after its many failures (slows down password
    guessing without letting one stranger's guesses lock every reviewer out). Behind a
    reverse proxy every client shares the proxy's address, and the limit is global."""

    MAX_CLIENTS = 10_000          # remembered at most; the oldest are forgotten first

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            fails = self._fails.get(client)
            if not fails:
                return False
            while fails and now - fails[0] > self.window_s:
                fails.popleft()
            if not fails:
                del self._fails[client]
            return len(fails) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._fails.setdefault(client, deque()).append(time.monotonic())
            while len(self._fails) > self.MAX_CLIENTS:
                del self._fails[next(iter(self._fails))]


def _age(dt: datetime | None) -> str:
    if dt is None:
        return "?"
    s = max(0.0, (datetime.now(timezone.utc) - dt).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return "now"


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["age"] = _age
    env.filters["pct"] = lambda x: "?" if x is None else f"{100 * float(x):.0f}%"
    return env


def create_app(*, service: ReviewService, authenticator: Authenticator,
               secure_cookies: bool = False, reviewer_name: str = "reviewer",
               queue_limit: int = 200, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The review app.

    ``secure_cookies``: set when served over HTTPS (behind a proxy). ``allowed_hosts``:
    Host header values to accept (None: any); a loopback-bound server should list only
    its own names, which defeats DNS-rebinding pages that point a domain at 127.0.0.1.
    """
    app = FastAPI(title="understudy review", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    env = _templates()
    sessions = SessionStore()
    throttle = _LoginThrottle(LOGIN_FAILURES_PER_MINUTE)
    log = get_logger(component="review-web")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def _security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    # -- helpers ------------------------------------------------------------------------

    def render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("default_reviewer", reviewer_name)
        ctx.setdefault("reviewer", "")
        ctx.setdefault("user", None)
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=status)

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(SESSION_COOKIE))

    def set_cookie(resp: Response, sess: Session) -> Response:
        resp.set_cookie(SESSION_COOKIE, sess.id, httponly=True, samesite="strict",
                        secure=secure_cookies, path="/")
        return resp

    def bearer_ok(request: Request) -> bool:
        return authenticator.check_bearer(request.headers.get("authorization"))

    def same_origin(request: Request) -> bool:
        # Defence in depth next to the CSRF token. Browsers label every request with
        # Sec-Fetch-Site; only a same-origin POST is accepted. Without it, a non-null
        # Origin must match the Host. (Under Referrer-Policy no-referrer Chromium sends
        # "Origin: null" on same-origin form posts, so null falls back to the token.)
        site = request.headers.get("sec-fetch-site")
        if site is not None:
            return site == "same-origin"
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return True
        return urlsplit(origin).netloc == request.headers.get("host", "")

    def guard_post(request: Request, csrf_token: str | None) -> tuple[Session | None, Response | None]:
        """(session, None) when the POST may proceed, else (None, error response)."""
        if bearer_ok(request):
            return None, None
        sess = session_of(request)
        if sess is None or not sess.authenticated:
            return None, PlainTextResponse("login required", status_code=401)
        if not same_origin(request) or not csrf_ok(sess, csrf_token):
            log.warning("review.csrf_rejected", path=request.url.path)
            return None, PlainTextResponse(
                "CSRF check failed: reload the page and try again", status_code=403)
        return sess, None

    def back_to_queue(request: Request, item: int | None) -> RedirectResponse:
        params = {k: v for k, v in request.query_params.items()
                  if k in ("account", "category", "max_age") and v}
        if item is not None:
            params["item"] = str(item)
        return RedirectResponse("/" + ("?" + urlencode(params) if params else ""), 303)

    # -- routes -------------------------------------------------------------------------

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/login")
    def login_page(request: Request) -> Response:
        sess = session_of(request)
        if sess is not None and sess.authenticated:
            return RedirectResponse("/", 303)
        sess = sess or sessions.new()
        return set_cookie(render("login.html", csrf=sess.csrf, error=None), sess)

    @app.post("/login")
    def login(request: Request, password: str = Form(""), reviewer: str = Form(""),
              csrf_token: str = Form("")) -> Response:
        sess = session_of(request)
        if sess is None or not csrf_ok(sess, csrf_token) or not same_origin(request):
            sess = sess or sessions.new()
            return set_cookie(render("login.html", 403, csrf=sess.csrf,
                                     error="The form expired; try again."), sess)
        client = request.client.host if request.client else "?"
        if throttle.blocked(client):
            return render("login.html", 429, csrf=sess.csrf, reviewer=reviewer,
                          error="Too many failed logins; wait a minute.")
        if not authenticator.check(password):
            throttle.failed(client)
            log.warning("review.login_failed", client=client)
            return render("login.html", 401, csrf=sess.csrf, reviewer=reviewer,
                          error="Wrong password.")
        # One shared password; each reviewer says who they are, and that name is what
        # their reviews record (default: serve --reviewer).
        name = " ".join(reviewer.split())[:100] or reviewer_name
        new = sessions.login(sess, name)
        log.info("review.login", reviewer=name)
        return set_cookie(RedirectResponse("/", 303), new)

    @app.post("/logout")
    def logout(request: Request, csrf_token: str = Form("")) -> Response:
        sess, err = guard_post(request, csrf_token)
        if err is not None:
            return err
        if sess is not None:
            sessions.drop(sess.id)
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/")
    def queue(request: Request, account: str | None = None, category: str | None = None,
              max_age: str | None = None, item: int | None = None) -> Response:
        sess = session_of(request)
        if not bearer_ok(request) and (sess is None or not sess.authenticated):
            return RedirectResponse("/login", 303)
        flash = sess.flash.pop() if sess is not None and sess.flash else None
        try:
            age = parse_age(max_age) if max_age else None
        except ValueError as e:
            age, flash = None, ("error", str(e))
        entries = list_queue(service.db, account=account or None,
                             category=category or None, max_age=age, limit=queue_limit)
        # The list stops at queue_limit: say so, and how to reach the rest.
        total = len(entries) if len(entries) < queue_limit else count_queue(
            service.db, account=account or None, category=category or None, max_age=age)
        ids = [e.draft_id for e in entries]
        selected = item if item is not None else (ids[0] if ids else None)
        detail = None
        if selected is not None:
            try:
                detail = service.item(selected)
            except ReviewError as e:
                flash = ("error", str(e))
        pos = ids.index(selected) if selected in ids else -1
        filters = {k: v for k, v in (("account", account), ("category", category),
                                     ("max_age", max_age)) if v}
        html = None
        if detail is not None and detail.email.html:
            html = sanitize_html(detail.email.html)
        return render(
            "queue.html", entries=entries, detail=detail, selected=selected,
            prev_id=ids[pos - 1] if pos > 0 else None,
            next_id=ids[pos + 1] if 0 <= pos < len(ids) - 1 else None,
            counts=queue_counts(service.db), filters=filters, qs=urlencode(filters),
            total=total,
            categories=service.categories, priorities=service.priorities,
            email_html=html,
            blocked_hosts=blocked_image_hosts(detail.email.html) if html else [],
            csrf=sess.csrf if sess else "", flash=flash, user=sess.user if sess else None)

    def _next_after(request: Request, draft_id: int) -> int | None:
        # After an action, select the item below the one just reviewed (the queue is
        # newest first, so "below" is the next older email), else the new first item.
        params = request.query_params
        try:
            age = parse_age(params["max_age"]) if params.get("max_age") else None
        except ValueError:
            age = None
        entries = list_queue(service.db, account=params.get("account") or None,
                             category=params.get("category") or None, max_age=age,
                             limit=queue_limit)
        ids = [e.draft_id for e in entries if e.draft_id != draft_id]
        hint = params.get("next")
        if hint and hint.isdigit() and int(hint) in ids:
            return int(hint)
        return ids[0] if ids else None

    def _labels(category: str, priority: str, needs_reply: str | None) -> dict[str, Any]:
        return {"category": category or None, "priority": priority or None,
                "needs_reply": needs_reply in ("1", "on", "true")}

    @app.post("/items/{draft_id}/approve")
    def approve(request: Request, draft_id: int, csrf_token: str = Form(""),
                body: str = Form(...), category: str = Form(""), priority: str = Form(""),
                needs_reply: str | None = Form(None)) -> Response:
        sess, err = guard_post(request, csrf_token)
        if err is not None:
            return err
        try:
            out = service.approve(draft_id, reviewer=sess.user if sess else "token",
                                  final_body=body, **_labels(category, priority, needs_reply))
        except ReviewError as e:
            return _failed(sess, request, draft_id, e)
        what = "edited and approved" if out.action == "edit" else "approved"
        note = f"Draft {draft_id} {what}" + (
            f"; saved to {out.folder}" if out.changed and out.folder else
            "" if out.changed else " (it already was; nothing new was written)")
        if sess is not None:
            sess.flash.append(("ok", note))
        return back_to_queue(request, _next_after(request, draft_id))

    @app.post("/items/{draft_id}/reject")
    def reject(request: Request, draft_id: int, csrf_token: str = Form(""),
               reason: str = Form(""), category: str = Form(""), priority: str = Form(""),
               needs_reply: str | None = Form(None), body: str = Form("")) -> Response:
        sess, err = guard_post(request, csrf_token)
        if err is not None:
            return err
        try:
            service.reject(draft_id, reviewer=sess.user if sess else "token", reason=reason,
                           **_labels(category, priority, needs_reply))
        except ReviewError as e:
            return _failed(sess, request, draft_id, e)
        if sess is not None:
            sess.flash.append(("ok", f"Draft {draft_id} rejected"))
        return back_to_queue(request, _next_after(request, draft_id))

    @app.get("/disputes")
    def disputes(request: Request) -> Response:
        """Audit disagreements to settle (agent.review.disputes), newest first."""
        sess = session_of(request)
        if not bearer_ok(request) and (sess is None or not sess.authenticated):
            return RedirectResponse("/login", 303)
        flash = sess.flash.pop() if sess is not None and sess.flash else None
        return render("disputes.html", items=list_disputes(service.db, limit=queue_limit),
                      counts=queue_counts(service.db), categories=service.categories,
                      csrf=sess.csrf if sess else "", flash=flash,
                      user=sess.user if sess else None)

    @app.post("/disputes/{message_db_id}/settle")
    def settle(request: Request, message_db_id: int, csrf_token: str = Form(""),
               category: str = Form("")) -> Response:
        sess, err = guard_post(request, csrf_token)
        if err is not None:
            return err
        try:
            out = service.settle(message_db_id, category=category,
                                 reviewer=sess.user if sess else "token")
        except ReviewError as e:
            if sess is None:
                return PlainTextResponse(str(e), status_code=409)
            sess.flash.append(("error", str(e)))
            return RedirectResponse("/disputes", 303)
        if sess is not None:
            sess.flash.append(("ok", f"Email {message_db_id} settled as {out.category}: "
                               + PROVED[out.proved_right]))
        return RedirectResponse("/disputes", 303)

    def _failed(sess: Session | None, request: Request, draft_id: int,
                e: ReviewError) -> Response:
        if sess is None:
            return PlainTextResponse(str(e), status_code=409)
        sess.flash.append(("error", str(e)))
        return back_to_queue(request, draft_id)

    return app
