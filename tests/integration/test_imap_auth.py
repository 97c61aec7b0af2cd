"""XOAUTH2 token command handling (no server needed: unit tier)."""

from __future__ import annotations

import sys

import pytest

from agent.mail.auth import TokenSource
from agent.mail.errors import TokenCommandError
from config.secrets import known_secrets


def command(tmp_path, body: str) -> str:
    counter = tmp_path / "n"
    script = tmp_path / "tok.py"
    script.write_text(
        "import json, pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n" + body)
    return f"{sys.executable} {script}"


def runs(tmp_path) -> int:
    return int((tmp_path / "n").read_text())


def test_json_token_is_cached_until_expiry_and_registered_as_secret(tmp_path):
    src = TokenSource(command(tmp_path, "print(json.dumps({'access_token': f'tok-{n}-abcdef', "
                                        "'expires_in': 3600}))"))
    assert src.token() == "tok-1-abcdef"
    assert src.token() == "tok-1-abcdef" and runs(tmp_path) == 1
    assert "tok-1-abcdef" in known_secrets()           # the log redactor masks it
    assert src.token(refresh=True) == "tok-2-abcdef"   # a rejected token is refreshed


def test_short_lived_token_is_refreshed(tmp_path):
    src = TokenSource(command(tmp_path, "print(json.dumps({'access_token': f'short-{n}', "
                                        "'expires_in': 30}))"))
    assert src.token() == "short-1"
    assert src.token() == "short-2"      # expires within the 60 s safety margin: re-run


def test_bare_token_and_failures(tmp_path):
    assert TokenSource(command(tmp_path, "print('bare-token-123')")).token() == "bare-token-123"
    with pytest.raises(TokenCommandError, match="exited with 3"):
        TokenSource(command(tmp_path, "sys.exit(3)")).token()
    with pytest.raises(TokenCommandError, match="no token"):
        TokenSource(command(tmp_path, "print(json.dumps({}))")).token()
    with pytest.raises(TokenCommandError, match="failed to run"):
        TokenSource("/nonexistent/token-command").token()
