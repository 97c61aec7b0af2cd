"""`ingest`: one pass over the configured mailboxes."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from agent.cli.common import JsonOpt, app_context, emit, fail

EXIT_MAIL = 5


def ingest(
    ctx: typer.Context,
    account: Annotated[Optional[list[str]], typer.Option(
        "--account", "-a", metavar="NAME",
        help="Only this account (repeatable; default: every configured account).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch new mail from every configured account and folder once, then exit.

    Each batch (daemon.fetch_batch messages, default 100) is committed with the folder's
    UID cursor, so an interrupted run loses nothing and the next run stores each message
    exactly once. Messages are fetched with BODY.PEEK[]: \\Seen is never set.
    Exit 5 when an account could not be ingested (the others still are).
    """
    from agent.mail import MailError, build_mail_sources

    app = app_context(ctx)
    settings = app.settings
    if not settings.accounts:
        fail("no accounts configured: add an [[accounts]] section to the config "
             "(see config/example.toml)", 2)
    unknown = sorted(set(account or []) - {a.name for a in settings.accounts})
    if unknown:
        fail(f"unknown account(s): {', '.join(unknown)}; configured: "
             f"{', '.join(a.name for a in settings.accounts)}", 2)
    db = app.database()
    started = time.monotonic()
    report, errors = [], []
    for source in build_mail_sources(settings, db, accounts=account):
        try:
            stored = source.sync()
        except MailError as e:
            errors.append({"account": source.account, "error": str(e)})
            continue
        report.append({"account": source.account, "stored": stored, "folders": [
            {"folder": r.folder, "stored": r.stored, "remapped": r.remapped,
             "last_uid": r.last_uid, "uidvalidity": r.uidvalidity, "rescan": r.reset}
            for r in source.last_results]})
    elapsed = time.monotonic() - started
    total = sum(r["stored"] for r in report)
    folders = sum(len(r["folders"]) for r in report)
    summary = (f"ingested {total} new message(s) from {len(report)} account(s), "
               f"{folders} folder(s) in {elapsed:.1f} s")
    if errors:
        summary += "; failed: " + "; ".join(f"{e['account']}: {e['error']}" for e in errors)
    emit(summary, {"stored": total, "elapsed_s": round(elapsed, 3), "accounts": report,
                   "errors": errors}, as_json)
    if errors:
        raise typer.Exit(EXIT_MAIL)


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
