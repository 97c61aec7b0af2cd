"""The review web app over HTTP (FastAPI TestClient): login, CSRF, headers, each action."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from agent.review.app import CSP, create_app
from agent.review.auth import SESSION_COOKIE, Authenticator, hash_password
from agent.review.service import ReviewService
from storage.models import Review
from storage.reviews import get_item
from tests.unit.review_seed import seed_escalated
from tests.unit.test_review_service import CATS, PRIS, DraftsFolder

PASSWORD = "correct horse battery staple"
TOKEN = "t0ken-" + "x" * 40
HOSTILE = ("<p>Invoice attached.</p><script>window.__xss=1</script>"
           "<img src=x onerror=alert(1)><a href='javascript:alert(2)'>pay</a>"
           "<img src='https://tracker.example/p.gif'><div style='position:fixed'>o</div>")


@pytest.fixture
def env(sqlite_db):
    folder = DraftsFolder()
    svc = ReviewService(sqlite_db, categories=CATS, priorities=PRIS,
                        appender_for=lambda account: folder.append_draft)
    auth = Authenticator(password_hash=hash_password(PASSWORD), token=TOKEN)
    client = TestClient(create_app(service=svc, authenticator=auth, reviewer_name="ana"))
    return client, folder, sqlite_db


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def login(client: TestClient) -> str:
    page = client.get("/login")
    r = client.post("/login", data={"password": PASSWORD, "csrf_token": csrf_of(page.text)},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    return csrf_of(client.get("/").text)


def test_pages_carry_strict_security_headers(env):
    client, _, _ = env
    assert CSP == ("default-src 'none'; script-src 'self'; style-src 'self'; "
                   "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
                   "base-uri 'none'")
    for path in ("/login", "/static/review.js", "/static/review.css", "/healthz"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert client.get("/login").headers["cache-control"] == "no-store"
    assert client.get("/static/review.js").headers["content-type"].startswith(
        "text/javascript")
    # No inline script or style anywhere: the CSP would block them.
    page = client.get("/login").text
    assert "<style" not in page and "style=" not in page
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/review.js" defer>']


def test_login_required_and_cookie_flags(env):
    client, _, _ = env
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    page = client.get("/login")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE + "=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/" in cookie
    pre_login_id = client.cookies.get(SESSION_COOKIE)

    bad = client.post("/login", data={"password": "wrong", "csrf_token": csrf_of(page.text)})
    assert bad.status_code == 401 and "Wrong password" in bad.text
    assert client.get("/", follow_redirects=False).status_code == 303

    login(client)
    assert client.cookies.get(SESSION_COOKIE) != pre_login_id      # no session fixation
    assert client.get("/", follow_redirects=False).status_code == 200


def test_login_form_needs_its_csrf_token(env):
    client, _, _ = env
    client.get("/login")
    r = client.post("/login", data={"password": PASSWORD, "csrf_token": "forged"},
                    follow_redirects=False)
    assert r.status_code == 403
    assert client.get("/", follow_redirects=False).status_code == 303


def test_state_changes_need_csrf_token_and_same_origin(env):
    client, folder, db = env
    (seeded,) = seed_escalated(db, n=1)
    url = f"/items/{seeded['draft_id']}/approve"
    form = {"body": "ok", "category": "billing", "priority": "normal", "needs_reply": "1"}
    anon = TestClient(client.app)
    assert anon.post(url, data=form, follow_redirects=False).status_code == 401

    token = login(client)
    assert client.post(url, data=form, follow_redirects=False).status_code == 403
    # A token one character off (never the real one, whatever its first character is).
    forged = ("y" if token[0] == "x" else "x") + token[1:]
    assert client.post(url, data={**form, "csrf_token": forged},
                       follow_redirects=False).status_code == 403
    assert client.post(url, data={**form, "csrf_token": token},
                       headers={"Origin": "http://evil.example"},
                       follow_redirects=False).status_code == 403
    assert client.post(url, data={**form, "csrf_token": token},
                       headers={"Sec-Fetch-Site": "cross-site", "Origin": "null"},
                       follow_redirects=False).status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert get_item(db, seeded["draft_id"]).status == "pending_review" and folder.calls == []

    r = client.post(url, data={**form, "csrf_token": token},
                    headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
                    follow_redirects=False)
    assert r.status_code == 303
    assert get_item(db, seeded["draft_id"]).status == "approved" and len(folder.drafts) == 1


def test_queue_page_shows_email_decision_and_sanitized_html(env):
    client, _, db = env
    old = seed_escalated(db, n=1, ages_h=[5])[0]
    new = seed_escalated(db, n=1, start=1, ages_h=[1], html=HOSTILE)[0]
    login(client)
    page = client.get("/").text
    # Newest first, and the newest is selected.
    assert page.index(new["subject"]) < page.index(old["subject"])
    assert f'item={new["draft_id"]}" aria-current="true"' in page
    assert "Decided by teacher" in page and "claude-sonnet-4-5" in page
    assert "category 61%" in page and "Double charge on order 1001." in page
    assert "Invoice attached." in page
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/review.js" defer>']
    for bad in ("__xss", "onerror", "javascript:", "tracker.example/p.gif", "position:fixed"):
        assert bad not in page, bad
    assert "Remote images blocked (tracker.example)" in page
    assert new["draft"].split("\n")[0] in page

    # A plain-text email is escaped, not interpreted.
    with db.session() as s:
        from storage.models import Message
        m = s.get(Message, old["message_db_id"])
        m.body_text = "<script>window.__xss=2</script> & <b>bold</b>"
    page = client.get(f"/?item={old['draft_id']}").text
    assert "&lt;script&gt;window.__xss=2&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page


def test_approve_edit_reject_through_the_web(env):
    client, folder, db = env
    a, b, c = seed_escalated(db, n=3)
    token = login(client)
    base = {"csrf_token": token, "category": "billing", "priority": "normal",
            "needs_reply": "1"}

    r = client.post(f"/items/{a['draft_id']}/approve?next={b['draft_id']}",
                    data={**base, "body": a["draft"].replace("\n", "\r\n")},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/?item={b['draft_id']}"
    assert "approved; saved to Drafts" in client.get(r.headers["location"]).text
    # Approving again (a double submit) writes nothing new.
    client.post(f"/items/{a['draft_id']}/approve", data={**base, "body": "other"})
    assert len(folder.drafts) == 1

    client.post(f"/items/{b['draft_id']}/approve",
                data={**base, "body": "Edited\r\nreply", "category": "account",
                      "priority": "high"})
    item_b = get_item(db, b["draft_id"])
    assert item_b.final_draft == "Edited\nreply" and item_b.reviews[0].action == "edit"
    assert (item_b.reviews[0].category, item_b.reviews[0].priority) == ("account", "high")

    r = client.post(f"/items/{c['draft_id']}/reject", data={**base, "reason": ""})
    assert "needs a reason" in r.text
    assert get_item(db, c["draft_id"]).status == "pending_review"
    client.post(f"/items/{c['draft_id']}/reject",
                data={k: v for k, v in base.items() if k != "needs_reply"}
                | {"reason": "not a customer", "body": "ignored"})
    item_c = get_item(db, c["draft_id"])
    assert item_c.status == "rejected" and item_c.reviews[0].needs_reply is False
    assert item_c.reviews[0].reason == "not a customer"
    assert len(folder.drafts) == 2
    assert "Nothing waiting for review" in client.get("/").text
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Review)) == 3


def test_filters_in_the_queue(env):
    client, _, db = env
    seed_escalated(db, account="support", n=1, ages_h=[50], category="billing")
    seed_escalated(db, account="sales", n=1, start=1, ages_h=[1], category="technical")
    login(client)
    page = client.get("/?category=technical").text
    assert "Question 1" in page and "Question 0" not in page
    page = client.get("/?account=support").text
    assert "Question 0" in page and "Question 1" not in page
    page = client.get("/?max_age=1d").text
    assert "Question 1" in page and "Question 0" not in page
    assert "not a number with a unit" in client.get("/?max_age=soon").text


def test_each_reviewer_names_themselves_at_login(env):
    client, _, db = env
    (s,) = seed_escalated(db, n=1)
    page = client.get("/login")
    assert 'placeholder="ana"' in page.text             # serve --reviewer is the default
    r = client.post("/login", data={"password": PASSWORD, "reviewer": "  Bea   Lopez ",
                                    "csrf_token": csrf_of(page.text)})
    assert 'id="who">Bea Lopez<' in r.text
    client.post(f"/items/{s['draft_id']}/approve",
                data={"csrf_token": csrf_of(r.text), "body": s["draft"],
                      "category": "billing", "priority": "normal", "needs_reply": "1"})
    with db.session() as ses:
        assert list(ses.scalars(select(Review.reviewer))) == ["Bea Lopez"]


def test_logout_ends_the_session(env):
    client, _, _ = env
    token = login(client)
    old_cookie = client.cookies.get(SESSION_COOKIE)
    r = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    replay = TestClient(client.app, cookies={SESSION_COOKIE: old_cookie})
    assert replay.get("/", follow_redirects=False).status_code == 303


def test_bearer_token_works_without_cookie(env):
    client, folder, db = env
    (seeded,) = seed_escalated(db, n=1)
    api = TestClient(client.app)
    form = {"body": "ok", "category": "billing", "priority": "normal"}
    url = f"/items/{seeded['draft_id']}/approve"
    assert api.post(url, data=form, headers={"Authorization": "Bearer nope"},
                    follow_redirects=False).status_code == 401
    r = api.post(url, data=form, headers={"Authorization": f"Bearer {TOKEN}"},
                 follow_redirects=False)
    assert r.status_code == 303 and len(folder.drafts) == 1
    assert get_item(db, seeded["draft_id"]).reviews[0].reviewer == "token"


def test_repeated_failed_logins_are_throttled(env):
    client, _, _ = env
    csrf = csrf_of(client.get("/login").text)
    codes = [client.post("/login", data={"password": f"guess{i}", "csrf_token": csrf}).status_code
             for i in range(10)]
    assert codes == [401] * 10
    r = client.post("/login", data={"password": PASSWORD, "csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 429
    # Another client (a colleague at another address) is not locked out by those guesses.
    other = TestClient(client.app, client=("10.1.2.3", 40000))
    r = other.post("/login", data={"password": PASSWORD,
                                   "csrf_token": csrf_of(other.get("/login").text)},
                   follow_redirects=False)
    assert r.status_code == 303


def test_a_capped_queue_says_how_many_it_leaves_out(sqlite_db):
    folder = DraftsFolder()
    svc = ReviewService(sqlite_db, categories=CATS, priorities=PRIS,
                        appender_for=lambda account: folder.append_draft)
    auth = Authenticator(password_hash=hash_password(PASSWORD), token=TOKEN)
    client = TestClient(create_app(service=svc, authenticator=auth, reviewer_name="ana",
                                   queue_limit=3))
    seed_escalated(sqlite_db, n=5)
    login(client)
    page = client.get("/").text
    assert page.count('class="qitem"') == 3 and "3 of 5 shown" in page
    filtered = client.get("/?max_age=1000d").text          # the note counts with filters
    assert "3 of 5 shown" in filtered
    assert "shown, newest first" not in client.get("/?max_age=1m").text


def test_unknown_item_shows_an_error_not_a_crash(env):
    client, _, _ = env
    login(client)
    r = client.get("/?item=424242")
    assert r.status_code == 200 and "no draft with id 424242" in r.text
    # Numbers no database column holds, and ages no date reaches: errors, not a 500.
    huge = "99999999999999999999"
    r = client.get(f"/?item={huge}")
    assert r.status_code == 200 and f"no draft with id {huge}" in r.text
    r = client.get("/?max_age=1000000d")
    assert r.status_code == 200 and "more than 100 years" in r.text
    r = client.get("/?max_age=" + "9" * 400 + "w")
    assert r.status_code == 200 and "more than 100 years" in r.text
    csrf = csrf_of(client.get("/").text)
    r = client.post(f"/items/{huge}/approve", data={"csrf_token": csrf, "body": "x"})
    assert r.status_code == 200 and f"no draft with id {huge}" in r.text


def test_loopback_app_refuses_foreign_host_headers(sqlite_db, monkeypatch):
    # A DNS-rebinding page reaches 127.0.0.1 with its own name in the Host header.
    from agent.review import build_review_app
    from config import Settings

    monkeypatch.setenv("UNDERSTUDY_REVIEW_TOKEN", TOKEN)
    app = build_review_app(Settings(), sqlite_db)          # review.host = 127.0.0.1
    local = TestClient(app, base_url="http://127.0.0.1:8765")
    assert local.get("/login").status_code == 200
    assert TestClient(app, base_url="http://localhost:8765").get("/login").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8765").get("/login").status_code == 200
    r = TestClient(app, base_url="http://rebind.evil.example:8765").get("/login")
    assert r.status_code == 400 and r.headers["content-security-policy"] == CSP
    # Bound to another address (behind a proxy), any Host is accepted.
    open_app = build_review_app(Settings(), sqlite_db, host="0.0.0.0")
    assert TestClient(open_app, base_url="http://review.example").get(
        "/login").status_code == 200


def test_failed_delivery_is_shown_and_retried_from_the_page(env):
    client, folder, db = env
    (s,) = seed_escalated(db, n=1)
    folder.fail_times = 1
    token = login(client)
    form = {"csrf_token": token, "body": "Edited", "category": "billing",
            "priority": "normal", "needs_reply": "1"}
    r = client.post(f"/items/{s['draft_id']}/approve", data=form)
    assert "could not be delivered" in r.text and "Retry delivery" in r.text
    assert "delivery pending" in r.text and folder.drafts == {}
    # The page offers the approved version, read-only: a changed text is refused.
    assert re.search(r'<textarea id="draft"[^>]* readonly>Edited</textarea>', r.text)
    r = client.post(f"/items/{s['draft_id']}/approve", data={**form, "body": "changed"})
    assert "your changes were not applied" in r.text and folder.drafts == {}
    r = client.post(f"/items/{s['draft_id']}/approve", data=form)
    assert list(folder.drafts.values()) == [(s["message_id"], "Edited")]
    assert "Nothing waiting for review" in r.text


def test_disputes_page_settles_audit_disagreements(env):
    from storage.audits import list_disputes
    from tests.unit.review_seed import seed_audited

    client, _, db = env
    a, b = seed_audited(db, [("billing", "account"), ("technical", "billing")])
    assert client.get("/disputes", follow_redirects=False).headers["location"] == "/login"
    csrf = login(client)
    assert 'href="/disputes"' in client.get("/").text
    page = client.get("/disputes")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert f'id="dispute-{a}"' in page.text and f'id="dispute-{b}"' in page.text
    assert "2 disputes to settle" in page.text
    assert 'value="account">teacher: account' in page.text
    assert "<script" not in page.text.replace('<script src="/static/review.js" defer>', "")

    # no CSRF token: refused, nothing stored
    r = client.post(f"/disputes/{a}/settle", data={"category": "billing"},
                    follow_redirects=False)
    assert r.status_code == 403
    assert len(list_disputes(db)) == 2

    r = client.post(f"/disputes/{a}/settle", data={"category": "billing",
                                                   "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/disputes"
    page = client.get("/disputes").text
    assert f"Email {a} settled as billing: the student was right" in page
    assert f'id="dispute-{a}"' not in page and "1 dispute to settle" in page
    settled = list_disputes(db, include_settled=True)
    assert {d.message_db_id: (d.settled, d.settled_by) for d in settled}[a] == ("billing", "ana")

    r = client.post(f"/disputes/{b}/settle", data={"category": "bogus", "csrf_token": csrf})
    assert "unknown category &#39;bogus&#39;" in r.text or "unknown category 'bogus'" in r.text
    # a script or tool with the bearer token gets the error as text
    r = TestClient(client.app).post(f"/disputes/{b}/settle", data={"category": "bogus"},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and "unknown category" in r.text
    r = TestClient(client.app).post(f"/disputes/{b}/settle", data={"category": "other"},
                                    headers={"Authorization": f"Bearer {TOKEN}"},
                                    follow_redirects=False)
    assert r.status_code == 303
    assert list_disputes(db) == []
    assert {d.message_db_id: d.settled_by for d in
            list_disputes(db, include_settled=True)}[b] == "token"
