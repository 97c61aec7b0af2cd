"""The ``understudy`` command line. Each concern registers its commands from its own module.

>>> from typer.testing import CliRunner
>>> CliRunner().invoke(app, ["--help"]).exit_code
0
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from agent.cli.common import AppContext

app = typer.Typer(
    name="understudy",
    help="An email triage daemon that learns: a small student triages your mail, a frontier "
    "teacher decides what the student is unsure of, and the teacher's answers train the next "
    "student.\n\nStart with `understudy config validate FILE`, `understudy db upgrade`, then "
    "`understudy run`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", envvar="UNDERSTUDY_CONFIG",
        help="TOML config file (default: $UNDERSTUDY_CONFIG, else built-in defaults).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="Override state_dir (database, models, logs).")] = None,
    database_url: Annotated[Optional[str], typer.Option(
        help="Override database_url (default: SQLite in the state dir).")] = None,
    log_json: Annotated[bool, typer.Option(
        "--log-json", help="Log JSON lines (default for `run`; console otherwise).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    from agent.logs import configure_logging

    overrides = {"state_dir": state_dir, "database_url": database_url}
    if verbose:
        overrides["log_level"] = "debug"
    ctx.obj = AppContext(config_path=config, overrides=overrides, log_json=log_json)
    configure_logging(json=log_json or ctx.invoked_subcommand == "run",
                      level="debug" if verbose else "info")


def _register() -> None:
    from agent.cli import admin, daemon, mail, models, review, simulate, student, teacher

    for module in (admin, mail, teacher, student, models, daemon, review, simulate):
        module.register(app)


_register()


def main() -> None:
    app()
