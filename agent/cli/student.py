"""`retrain` and `eval`."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available


def retrain(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Train a new student from the SQL log (or --data F.jsonl), gate it and promote it."""
    not_available("retrain", "student capability, issue 5")


def evaluate(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Evaluate a student on a teacher-records file."""
    not_available("eval", "student capability, issue 5")


def register(app: typer.Typer) -> None:
    app.command("retrain")(retrain)
    app.command("eval")(evaluate)
