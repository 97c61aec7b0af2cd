"""`review list|show|approve|edit|reject|disputes|settle|hash-password` and `serve` (the
review web app)."""

from __future__ import annotations

import getpass
import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_UNAVAILABLE,
    JsonOpt,
    app_context,
    emit,
    fail,
)

review_app = typer.Typer(
    help="Review the drafts of escalated emails: approve (written to the account's Drafts "
    "folder, or sent over SMTP for accounts with send_enabled), edit, or reject; settle the "
    "audit disagreements between student and teacher. Every decision is stored as a gold "
    "label for the next retrain.", no_args_is_help=True)

AccountOpt = Annotated[Optional[str], typer.Option(
    "--account", help="Only this account (its name in the config). Default: all.")]
CategoryOpt = Annotated[Optional[str], typer.Option(
    "--category", help="Correct the category (default: keep the decision's).")]
PriorityOpt = Annotated[Optional[str], typer.Option(
    "--priority", help="Correct the priority (default: keep the decision's).")]
NeedsReplyOpt = Annotated[Optional[bool], typer.Option(
    "--needs-reply/--no-needs-reply", help="Correct needs-reply (default: keep the decision's).")]
ReviewerOpt = Annotated[Optional[str], typer.Option(
    "--reviewer", help="Name recorded with the review (default: $USER).")]


def _reviewer(name: str | None) -> str:
    return name or os.environ.get("USER") or getpass.getuser() or "cli"


def _service(ctx: typer.Context):
    from agent.review import build_review_service

    actx = app_context(ctx)
    return build_review_service(actx.settings, actx.database())


def _run(action, *args: Any, **kwargs: Any):
    """Call a service action, turning review errors into exit codes with their message."""
    from agent.review import DeliveryFailed, ReviewError

    try:
        return action(*args, **kwargs)
    except DeliveryFailed as e:
        fail(str(e), EXIT_UNAVAILABLE)
    except ReviewError as e:
        fail(str(e))


def _age(text: str | None, option: str):
    from agent.review.service import parse_age

    if text is None:
        return None
    try:
        return parse_age(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def _outcome_summary(out) -> str:
    if out.status == "rejected":
        return f"draft {out.draft_id} rejected" + ("" if out.changed else " (it already was)")
    verb = "edited and approved" if out.action == "edit" else "approved"
    where = f"; in {out.folder} uid {out.uid}" if out.folder else (
        "; sent" if out.delivered else "")
    return f"draft {out.draft_id} {verb}{where}" + (
        "" if out.changed else " (it already was; nothing new was written)")


@review_app.command("list")
def review_list(
    ctx: typer.Context,
    account: AccountOpt = None,
    category: Annotated[Optional[str], typer.Option(
        help="Only emails the decision put in this category. Default: all.")] = None,
    max_age: Annotated[Optional[str], typer.Option(
        help="Only emails younger than this: a number with m, h, d or w (e.g. 2d). "
        "Default: no limit.")] = None,
    min_age: Annotated[Optional[str], typer.Option(
        help="Only emails older than this (same units). Default: no limit.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    include_done: Annotated[bool, typer.Option(
        "--all", help="Also list approved and rejected drafts.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List escalated drafts awaiting review, newest email first."""
    from storage.reviews import count_queue, list_queue

    db = app_context(ctx).database()
    filters = dict(account=account, category=category, max_age=_age(max_age, "--max-age"),
                   min_age=_age(min_age, "--min-age"), include_done=include_done)
    entries = list_queue(db, limit=limit, **filters)
    total = count_queue(db, **filters) if len(entries) == limit else len(entries)
    if as_json:
        emit("", {"count": len(entries), "total": total,
                  "items": [e.__dict__ for e in entries]}, True)
        return
    from agent.review.app import _age as age_text

    labels = [f"{e.category or '?'}/{e.priority or '?'}" for e in entries]
    width = max([len(x) for x in labels] + [10])
    for e, label in zip(entries, labels):
        flag = "" if e.status == "pending_review" else f" [{e.status}]"
        typer.echo(f"{e.draft_id:>6}  {age_text(e.received_at):>4}  {e.account or '?':<12} "
                   f"{label:<{width}} {e.decided_by or '?':<8} {e.subject[:60]}{flag}")
    what = "listed" if include_done else "waiting for review"
    if total > len(entries):
        typer.echo(f"{len(entries)} of {total} draft(s) {what} shown, newest first "
                   f"(--limit {total} for all)")
    else:
        typer.echo(f"{total} draft(s) {what}")


@review_app.command("show")
def review_show(ctx: typer.Context,
                draft_id: Annotated[int, typer.Argument(help="Draft id (see `review list`).")],
                as_json: JsonOpt = False) -> None:
    """Show one email, who decided (with confidence and rationale) and its draft."""
    svc = _service(ctx)
    item = _run(svc.item, draft_id)
    if as_json:
        from dataclasses import asdict

        emit("", asdict(item), True)
        return
    em, d = item.email, item.decision
    lines = [f"draft {item.draft_id} [{item.status}]  {em.account or '?'}/{em.folder or '?'}",
             f"From:    {em.from_addr}", f"Subject: {em.subject}",
             f"Date:    {em.date or '?'}"]
    if d is not None:
        conf = ", ".join(f"{k} {v:.0%}" for k, v in d.confidence.items())
        lines += [f"Decided by {d.source}" + (f" ({d.model_version})" if d.model_version else "")
                  + f": {d.category} / {d.priority} / "
                  + ("needs a reply" if d.needs_reply else "no reply needed")
                  + (f"  [{conf}]" if conf else "")]
        if d.rationale:
            lines.append(f"Rationale: {d.rationale}")
    lines += ["", "--- email " + "-" * 50, em.text.rstrip(), "",
              "--- draft " + "-" * 50, (item.final_draft or item.draft).rstrip()]
    for r in item.reviews:
        lines.append(f"[{r.created_at:%Y-%m-%d %H:%M}] {r.action} by {r.reviewer}"
                     + (f": {r.reason}" if r.reason else ""))
    typer.echo("\n".join(lines))


@review_app.command("approve")
def review_approve(ctx: typer.Context,
                   draft_id: Annotated[int, typer.Argument(help="Draft id.")],
                   category: CategoryOpt = None, priority: PriorityOpt = None,
                   needs_reply: NeedsReplyOpt = None, reviewer: ReviewerOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Approve the draft as it is and write it to the account's Drafts folder (or send it,
    for an account with send_enabled).

    Approving twice never makes a second draft; a draft someone else approved keeps their
    text and labels (different ones are refused); if writing to the mailbox failed, running
    it again retries (exit 4 while the mailbox is unreachable).
    """
    svc = _service(ctx)
    out = _run(svc.approve, draft_id, reviewer=_reviewer(reviewer), category=category,
               priority=priority, needs_reply=needs_reply)
    emit(_outcome_summary(out), out.__dict__, as_json)


@review_app.command("edit")
def review_edit(ctx: typer.Context,
                draft_id: Annotated[int, typer.Argument(help="Draft id.")],
                body_file: Annotated[Optional[Path], typer.Option(
                    "--body-file", help="Take the final text from this file ('-': stdin) "
                    "instead of opening $EDITOR.")] = None,
                category: CategoryOpt = None, priority: PriorityOpt = None,
                needs_reply: NeedsReplyOpt = None, reviewer: ReviewerOpt = None,
                as_json: JsonOpt = False) -> None:
    """Edit the draft in $EDITOR (or --body-file), then approve the edited text."""
    svc = _service(ctx)
    item = _run(svc.item, draft_id)
    current = item.final_draft or item.draft
    if body_file is not None:
        text = sys.stdin.read() if str(body_file) == "-" else body_file.read_text("utf-8")
    else:
        import click

        text = click.edit(current + "\n", extension=".txt", require_save=True)
        if text is None:
            fail("the editor was closed without saving: nothing was done")
    out = _run(svc.edit, draft_id, text, reviewer=_reviewer(reviewer), category=category,
               priority=priority, needs_reply=needs_reply)
    emit(_outcome_summary(out), out.__dict__, as_json)


@review_app.command("reject")
def review_reject(ctx: typer.Context,
                  draft_id: Annotated[int, typer.Argument(help="Draft id.")],
                  reason: Annotated[str, typer.Option(
                      "--reason", "-r", help="Why the draft is wrong (required).")],
                  category: CategoryOpt = None, priority: PriorityOpt = None,
                  needs_reply: NeedsReplyOpt = None, reviewer: ReviewerOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Reject the draft with a reason; nothing is written to the mailbox."""
    svc = _service(ctx)
    out = _run(svc.reject, draft_id, reviewer=_reviewer(reviewer), reason=reason,
               category=category, priority=priority, needs_reply=needs_reply)
    emit(_outcome_summary(out), out.__dict__, as_json)


@review_app.command("disputes")
def review_disputes(
    ctx: typer.Context,
    version: Annotated[Optional[str], typer.Option(
        "--version", help="Only audits of this student version. Default: all.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    include_settled: Annotated[bool, typer.Option(
        "--all", help="Also list the disputes already settled.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List audit disagreements, newest first: emails the student handled alone where the
    teacher, auditing in shadow, chose another category.

    Settle each with `understudy review settle ID --category C`: the answer is a gold label
    for the next retrain, and `understudy status` counts whom the settled ones proved right
    (the student, the teacher, or neither).
    """
    from storage.audits import list_disputes

    items = list_disputes(app_context(ctx).database(), student_version=version,
                          include_settled=include_settled, limit=limit)
    if as_json:
        emit("", {"count": len(items), "items": [
            {**d.__dict__, "proved_right": d.proved_right} for d in items]}, True)
        return
    for d in items:
        done = f"  [settled: {d.settled} by {d.settled_by or '?'}]" if d.settled else ""
        typer.echo(f"{d.message_db_id:>6}  student {d.student_category or '?'}"
                   f" ({d.student_version or '?'})  teacher {d.teacher_category or '?'}"
                   f"  {d.subject[:50] or d.text[:50]!r}{done}")
    typer.echo(f"{len(items)} dispute(s)" + ("" if include_settled else " to settle")
               + ("; settle one with `understudy review settle ID --category C`"
                  if items and not include_settled else ""))


@review_app.command("settle")
def review_settle(ctx: typer.Context,
                  message_db_id: Annotated[int, typer.Argument(
                      metavar="ID", help="Email id (see `review disputes`).")],
                  category: Annotated[str, typer.Option(
                      "--category", help="The right category (required): the student's, "
                      "the teacher's or another from the taxonomy.")],
                  priority: Annotated[Optional[str], typer.Option(
                      "--priority", help="Also record the priority (default: none).")] = None,
                  needs_reply: Annotated[Optional[bool], typer.Option(
                      "--needs-reply/--no-needs-reply",
                      help="Also record needs-reply (default: none).")] = None,
                  reviewer: ReviewerOpt = None, as_json: JsonOpt = False) -> None:
    """Settle an audit disagreement: record the right category as a gold label.

    The student's decision stands (the email was handled); its category keyword is
    corrected when the answer differs from it. Settling again replaces the answer.
    """
    out = _run(_service(ctx).settle, message_db_id, category=category,
               reviewer=_reviewer(reviewer), priority=priority, needs_reply=needs_reply)
    from agent.review.disputes import PROVED

    who = PROVED[out.proved_right]
    emit(f"email {out.message_db_id} settled as {out.category}: {who}"
         + ("" if out.changed else " (it already was)"), out.__dict__, as_json)


@review_app.command("hash-password")
def review_hash_password(
    ctx: typer.Context,
    stdin: Annotated[bool, typer.Option(
        "--stdin", help="Read the password from the first line of stdin (no prompt).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a salted scrypt hash of a password for the review app's login.

    Put it in the environment of `understudy serve`, e.g.
    export UNDERSTUDY_REVIEW_PASSWORD_HASH='scrypt$16384$8$1$...'
    """
    from agent.review.auth import hash_password

    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        # Prompts go to stderr so `$(understudy review hash-password)` captures only the hash.
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True,
                                err=True)
    if len(password) < 8:
        fail("use a password of at least 8 characters")
    h = hash_password(password)
    env = app_context(ctx).settings.review.password_hash_env
    if as_json:
        emit("", {"hash": h, "env": env}, True)
    else:
        typer.echo(h)
        typer.echo(f"set it for `understudy serve`: export {env}='{h}'", err=True)


def serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(
        help="Address to bind (default: review.host, 127.0.0.1). Anything but loopback "
        "should sit behind a TLS proxy.")] = None,
    port: Annotated[Optional[int], typer.Option(
        help="TCP port (default: review.port, 8765).")] = None,
    reviewer: Annotated[Optional[str], typer.Option(
        "--reviewer", help="Name recorded for a reviewer who leaves the login form's name "
        "empty, and for bearer-token calls (default: $USER).")] = None,
    secure_cookies: Annotated[bool, typer.Option(
        "--secure-cookies", help="Mark the session cookie Secure (when served over HTTPS "
        "through a proxy). Default: off.")] = False,
) -> None:
    """Serve the review web app (login required; bound to 127.0.0.1 by default)."""
    import uvicorn

    from agent.logs import get_logger
    from agent.review import ReviewError, build_review_app

    actx = app_context(ctx)
    s = actx.settings
    host = host or s.review.host
    port = port or s.review.port
    try:
        app = build_review_app(s, actx.database(), reviewer_name=_reviewer(reviewer),
                               secure_cookies=secure_cookies, host=host)
    except ReviewError as e:
        fail(str(e), EXIT_CONFIG)
    log = get_logger(component="review-web")
    if not _is_loopback(host):
        log.warning("review.exposed", host=host,
                    hint="not loopback: put it behind HTTPS and use --secure-cookies")
    typer.echo(f"review app on http://{host}:{port}/ (Ctrl-C to stop)", err=True)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                server_header=False, proxy_headers=False)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    app.add_typer(review_app, name="review")
    app.command("serve")(serve)
