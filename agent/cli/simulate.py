"""`simulate` (replay a labelled stream through the cascade) and `report` (HTML)."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available


def simulate(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Replay a teacher-records stream through the cascade and evaluate it."""
    not_available("simulate", "replay capability, issue 8")


def report(ctx: typer.Context) -> None:
    """Write a self-contained HTML report."""
    not_available("report", "replay capability, issue 8")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.command("report")(report)
