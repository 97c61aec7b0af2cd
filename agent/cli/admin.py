"""`config validate`, `db upgrade|downgrade|current|prune-raw` and `status`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import EXIT_CONFIG, JsonOpt, app_context, emit, fail
from config import ConfigError, load_settings

config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
db_app = typer.Typer(help="Create and migrate the database schema; prune old raw email bytes.",
                      no_args_is_help=True)


@config_app.command("validate")
def config_validate(
    ctx: typer.Context,
    file: Annotated[Optional[Path], typer.Argument(
        help="TOML file to check (default: --config / $UNDERSTUDY_CONFIG).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Report every problem in a config file at once, with its key path; exit 2 if any."""
    path = file or app_context(ctx).config_path
    try:
        s = load_settings(path)
    except ConfigError as e:
        if as_json:
            emit("", {"ok": False, "source": e.source,
                      "problems": [{"key": k, "message": m} for k, m in e.problems]}, True)
        else:
            typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_CONFIG)
    unset = unset_secrets(s)
    for key, var in unset:
        if not as_json:
            typer.echo(f"warning: {key}: ${var} is not set here (nor ${var}_FILE); "
                       "set it where the daemon runs", err=True)
    emit(f"ok: {path or 'defaults'} ({len(s.accounts)} account(s), "
         f"{len(s.taxonomy.categories)} categories, teacher {s.teacher.backend}:{s.teacher.model})",
         {"ok": True, "source": str(path), "accounts": len(s.accounts),
          "unset_secrets": [{"key": k, "env": v} for k, v in unset]}, as_json)


def unset_secrets(s) -> list[tuple[str, str]]:
    """(key path, variable) for each secret the config names that this environment lacks:
    not an error (the daemon may run elsewhere), but the first thing to check."""
    def missing(var: str | None) -> bool:
        return bool(var) and var not in os.environ and f"{var}_FILE" not in os.environ

    out = [(f"accounts.{a.name}.password_env", a.password_env) for a in s.accounts
           if a.auth == "password" and missing(a.password_env)]
    if s.teacher.backend == "anthropic" and missing(s.teacher.api_key_env):
        out.append(("teacher.api_key_env", s.teacher.api_key_env))
    return out


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context,
               revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
               as_json: JsonOpt = False) -> None:
    """Create or migrate the schema to REVISION (default: the newest)."""
    db = app_context(ctx).database(migrated=False)
    before = db.current_revision()
    db.upgrade(revision)
    after = db.current_revision()
    emit(f"database {db.redacted_url()}: {before or 'empty'} -> {after}",
         {"url": db.redacted_url(), "from": before, "to": after}, as_json)


@db_app.command("downgrade")
def db_downgrade(ctx: typer.Context,
                 revision: Annotated[str, typer.Argument(
                     help="Target revision: 'base' drops every table, '-1' one step.")] = "-1",
                 yes: Annotated[bool, typer.Option(
                     "--yes", "-y", help="Do not ask: a downgrade drops the columns and "
                     "tables newer migrations added, with their data.")] = False,
                 as_json: JsonOpt = False) -> None:
    """Step the schema back to REVISION (default: one migration). Asks first (or --yes):
    what newer migrations stored is deleted; back up the database before."""
    db = app_context(ctx).database(migrated=False)
    before = db.current_revision()
    if before is None:
        fail("database has no schema; nothing to downgrade")
    if not yes:
        what = ("drop EVERY table and all its data" if revision == "base"
                else f"step back to {revision}, dropping what later migrations store")
        if not sys.stdin.isatty():
            fail(f"`db downgrade` would {what} in {db.redacted_url()}; pass --yes to do it")
        if not typer.confirm(f"This will {what} in {db.redacted_url()}. Continue?"):
            fail("nothing changed")
    db.downgrade(revision)
    after = db.current_revision()
    emit(f"database {db.redacted_url()}: {before} -> {after or 'empty'}",
         {"url": db.redacted_url(), "from": before, "to": after}, as_json)


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the schema revision and whether it is the newest."""
    db = app_context(ctx).database(migrated=False)
    cur, head = db.current_revision(), db.head_revision()
    emit(f"{db.redacted_url()}: {cur or 'empty'} (newest {head})",
         {"url": db.redacted_url(), "current": cur, "head": head, "up_to_date": cur == head},
         as_json)


@db_app.command("prune-raw")
def db_prune_raw(ctx: typer.Context,
                 older_than_days: Annotated[Optional[int], typer.Option(
                     "--older-than-days", min=1, help="Age in days (by ingest time); default "
                     "scheduler.keep_raw_days.")] = None,
                 dry_run: Annotated[bool, typer.Option(
                     "--dry-run", help="Count what would be deleted; change nothing.")] = False,
                 as_json: JsonOpt = False) -> None:
    """Delete the raw bytes (attachments included) of emails acted on and ingested more than
    N days ago. Their parsed text, decisions, drafts and model calls stay, and so does the
    mail in the mailbox; emails that failed to parse and mail still queued keep their bytes.
    The daemon's nightly job does the same with scheduler.keep_raw_days. On SQLite the
    freed space is reused by new mail; VACUUM shrinks the file."""
    from storage.raw_retention import prune_raw

    actx = app_context(ctx)
    days = older_than_days or actx.settings.scheduler.keep_raw_days
    if not days:
        fail("scheduler.keep_raw_days is 0 (keep forever): pass --older-than-days N")
    r = prune_raw(actx.database(), older_than_days=days, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    emit(f"{verb} the raw bytes of {r.messages} email(s) ingested before "
         f"{r.cutoff:%Y-%m-%d %H:%M} UTC: {r.bytes / 1e6:.1f} MB",
         {**r.as_dict(), "older_than_days": days}, as_json)


def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Queue depth, parse errors, teacher failures and spend, active model, audits."""
    from storage.queries import status_snapshot

    actx = app_context(ctx)
    db = actx.database()
    snap = status_snapshot(db, actx.settings)
    if as_json:
        emit("", snap, True)
        return
    from agent.status_view import render_status

    typer.echo(render_status(snap))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")
    app.command("status")(status)
