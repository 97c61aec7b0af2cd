"""What every command shares: settings, the database, output and error handling."""

from __future__ import annotations

import json as jsonlib
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import typer

from config import ConfigError, Settings, load_settings
from storage import Database, StorageError

EXIT_CONFIG = 2
EXIT_SCHEMA = 3
EXIT_UNAVAILABLE = 4

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@dataclass
class AppContext:
    config_path: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    log_json: bool = False

    @cached_property
    def settings(self) -> Settings:
        try:
            return load_settings(self.config_path, **self.overrides)
        except ConfigError as e:
            fail(str(e), EXIT_CONFIG)

    def database(self, migrated: bool = True) -> Database:
        """The configured database; refuses an un-migrated schema when ``migrated``."""
        db = Database(self.settings.db_url)
        if migrated:
            try:
                db.require_schema()
            except StorageError as e:
                fail(str(e), EXIT_SCHEMA)
        return db


def app_context(ctx: typer.Context) -> AppContext:
    obj = ctx.find_root().obj
    if obj is None:
        obj = ctx.find_root().obj = AppContext()
    return obj


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def emit(summary: str, data: dict[str, Any] | None = None, as_json: bool = False) -> None:
    """Print a one-line summary, or ``data`` as JSON when ``--json`` was given."""
    if as_json:
        sys.stdout.write(jsonlib.dumps(data if data is not None else {"summary": summary},
                                       default=str, sort_keys=True) + "\n")
    else:
        typer.echo(summary)


def not_available(what: str, issue: str) -> None:
    fail(f"`understudy {what}` is not available in this build yet ({issue}).", EXIT_UNAVAILABLE)
