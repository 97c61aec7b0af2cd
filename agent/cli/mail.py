"""`ingest`: one pass over the configured mailboxes."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available


def ingest(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Fetch new mail from every configured account and folder once, then exit."""
    not_available("ingest", "mail capability, issue 3")


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
