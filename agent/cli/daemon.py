"""`run` (the daemon) and `triage` (one pass)."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available


def run(ctx: typer.Context) -> None:
    """Run the daemon: ingest with IDLE, triage, scheduled retraining."""
    not_available("run", "daemon capability, issue 6")


def triage(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Triage pending mail once, then exit."""
    not_available("triage", "daemon capability, issue 6")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("triage")(triage)
