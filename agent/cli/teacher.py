"""`teacher label` and `dataset import|export`."""

from __future__ import annotations

import typer

from agent.cli.common import JsonOpt, not_available

teacher_app = typer.Typer(help="Ask the teacher to label pending mail.", no_args_is_help=True)
dataset_app = typer.Typer(help="Import and export teacher records (JSONL).",
                          no_args_is_help=True)


@teacher_app.command("label")
def teacher_label(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Label pending emails with the teacher."""
    not_available("teacher label", "teacher capability, issue 4")


@dataset_app.command("import")
def dataset_import(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Import a teacher-records JSONL file."""
    not_available("dataset import", "teacher capability, issue 4")


@dataset_app.command("export")
def dataset_export(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Export teacher answers and gold labels as teacher-records JSONL."""
    not_available("dataset export", "teacher capability, issue 4")


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")
    app.add_typer(dataset_app, name="dataset")
