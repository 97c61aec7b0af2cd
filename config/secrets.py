"""Secrets come from the environment or from secret files, never from the TOML file.

``read_secret("IMAP_PASSWORD")`` returns ``$IMAP_PASSWORD``, or the contents of the file
named by ``$IMAP_PASSWORD_FILE`` (Docker/systemd credentials style). Every secret read
is registered with the log redactor so it can never reach the logs verbatim.
"""

from __future__ import annotations

import os
from pathlib import Path

_known: set[str] = set()


class MissingSecret(Exception):
    """A secret the configuration names is not set in the environment."""


def read_secret(env_name: str, *, required: bool = True) -> str | None:
    value = os.environ.get(env_name)
    if value is None and os.environ.get(f"{env_name}_FILE"):
        value = Path(os.environ[f"{env_name}_FILE"]).read_text(encoding="utf-8").strip()
    if value is None:
        if required:
            raise MissingSecret(
                f"secret not set: export {env_name}=... (or {env_name}_FILE=/path/to/file)"
            )
        return None
    register_secret(value)
    return value


def register_secret(value: str) -> None:
    """Remember a secret value so the log redactor masks it wherever it appears."""
    if value and len(value) >= 4:
        _known.add(value)


def known_secrets() -> frozenset[str]:
    return frozenset(_known)
