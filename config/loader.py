"""Read a TOML file, merge environment and CLI overrides, and report every problem."""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from config.settings import Settings, find_inline_secrets

CONFIG_ENV = "UNDERSTUDY_CONFIG"
_toml_data: contextvars.ContextVar[dict] = contextvars.ContextVar("toml_data", default={})


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in {source}:"]
        lines += [f"  {key or '(top level)'}: {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


class _TomlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_data.get())


class _Loaded(Settings):
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls))


def resolve_config_path(path: str | Path | None) -> Path | None:
    """The file to read: the argument, else $UNDERSTUDY_CONFIG, else none (defaults)."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings: defaults < TOML ``path`` < ``UNDERSTUDY_*`` env < ``overrides``.

    Raises :class:`ConfigError` listing every problem with its key path.

    >>> load_settings(None, state_dir="/tmp/x").db_url
    'sqlite:////tmp/x/understudy.db'
    """
    cfg_path = resolve_config_path(path)
    source = str(cfg_path) if cfg_path else "defaults and environment"
    data: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, [("", f"file not found: {cfg_path}")]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(source, [("", f"not valid TOML: {e}")]) from None
    problems = find_inline_secrets(data)
    # Relative paths in the file are relative to the file, not to the working directory.
    if cfg_path is not None:
        data = _anchor_paths(data, cfg_path.parent.resolve())
    token = _toml_data.set(data)
    try:
        settings = _Loaded(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems += [(_loc(err["loc"]), _msg(err)) for err in e.errors()]
        settings = None
    finally:
        _toml_data.reset(token)
    if problems:
        raise ConfigError(source, problems)
    return Settings.model_validate(settings.model_dump()) if settings else settings


def _anchor_paths(data: dict, base: Path) -> dict:
    out = dict(data)
    if isinstance(out.get("state_dir"), str) and not Path(out["state_dir"]).expanduser().is_absolute():
        out["state_dir"] = str((base / out["state_dir"]).resolve())
    teacher = out.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("records"), str):
        rec = Path(teacher["records"]).expanduser()
        out["teacher"] = {**teacher, "records": str(rec if rec.is_absolute() else base / rec)}
    return out


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _msg(err: dict) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling against config/example.toml)"
    return msg
