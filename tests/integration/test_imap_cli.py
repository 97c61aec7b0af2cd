"""`understudy ingest`, `understudy status` and scripts/local_dovecot.py from the outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imapclient
import pytest
from typer.testing import CliRunner

from agent.cli import app

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, server, state_dir: Path, folders=("INBOX",)) -> Path:
    path.write_text(
        f'state_dir = "{state_dir}"\n[[accounts]]\nname = "test"\nhost = "{server.host}"\n'
        f'port = {server.port}\nsecurity = "none"\nuser = "{server.user}"\n'
        f'password_env = "UNDERSTUDY_TEST_IMAP_PASSWORD"\n'
        f"folders = {json.dumps(list(folders))}\n")
    return path


def test_ingest_command_json_and_status(dovecot, tmp_path, state_dir):
    cfg = write_config(tmp_path / "u.toml", dovecot, state_dir)
    r = CliRunner().invoke(app, ["-c", str(cfg), "db", "upgrade"])
    assert r.exit_code == 0, r.output
    dovecot.deliver_files([b"Subject: one\r\n\r\nfirst\r\n",
                           b"Subject: broken\r\nContent-Type: text/html\r\n\r\n<img src=x>\r\n"])
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stored"] == 2 and out["errors"] == []
    assert out["accounts"][0]["folders"][0]["last_uid"] == 2
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest"])
    assert r.exit_code == 0 and "ingested 0 new message(s)" in r.stdout
    r = CliRunner().invoke(app, ["-c", str(cfg), "status", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert st["messages"]["total"] == 2
    assert st["parse_errors"]["count"] == 1
    assert st["parse_errors"]["recent"][0]["subject"] == "broken"
    (mb,) = st["mailboxes"]
    assert (mb["account"], mb["folder"], mb["last_uid"], mb["messages"]) == ("test", "INBOX", 2, 2)
    assert mb["last_sync_at"] is not None


def test_ingest_reports_a_missing_folder_and_exits_5(dovecot, tmp_path, state_dir):
    cfg = write_config(tmp_path / "u.toml", dovecot, state_dir, folders=["INBOX", "Nope"])
    assert CliRunner().invoke(app, ["-c", str(cfg), "db", "upgrade"]).exit_code == 0
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest"])
    assert r.exit_code == 5
    assert "Nope" in r.stdout and "does not exist" in r.stdout


def test_ingest_reports_a_wrong_password(dovecot, tmp_path, state_dir, monkeypatch):
    cfg = write_config(tmp_path / "u.toml", dovecot, state_dir)
    assert CliRunner().invoke(app, ["-c", str(cfg), "db", "upgrade"]).exit_code == 0
    monkeypatch.setenv("UNDERSTUDY_TEST_IMAP_PASSWORD", "wrong")
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest", "--json"])
    assert r.exit_code == 5
    err = json.loads(r.stdout.strip().splitlines()[-1])["errors"][0]["error"]
    assert "rejected" in err and "wrong" not in err


def test_local_dovecot_command_line(tmp_path):
    script = ROOT / "scripts" / "local_dovecot.py"
    d = tmp_path / "dc"
    out = subprocess.run([sys.executable, str(script), "start", "--dir", str(d)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    try:
        c = imapclient.IMAPClient(info["host"], port=info["port"], ssl=False)
        c.login(info["user"], Path(info["password_file"]).read_text())
        assert c.find_special_folder(rb"\Drafts") == "Drafts"
        assert c.has_capability("IDLE")
        c.logout()
    finally:
        stop = subprocess.run([sys.executable, str(script), "stop", "--dir", str(d)],
                              capture_output=True, text=True, timeout=30)
    assert stop.returncode == 0, stop.stderr
    pid = info["pid"]
    alive = True
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text().split()[2]
        alive = stat != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive


def test_several_accounts_in_one_pass(dovecot, tmp_path, state_dir):
    c = imapclient.IMAPClient(dovecot.host, port=dovecot.port, ssl=False)
    c.login(dovecot.user, dovecot.password)
    c.create_folder("Support")
    c.append("INBOX", b"Subject: to sales\r\n\r\nhi\r\n")
    for i in range(2):
        c.append("Support", f"Subject: help {i}\r\n\r\nhelp\r\n".encode())
    c.logout()
    acct = (f'host = "{dovecot.host}"\nport = {dovecot.port}\nsecurity = "none"\n'
            f'user = "{dovecot.user}"\npassword_env = "UNDERSTUDY_TEST_IMAP_PASSWORD"\n')
    cfg = tmp_path / "u.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\n[[accounts]]\nname = "sales"\n{acct}'
                   f'[[accounts]]\nname = "support"\nfolders = ["Support"]\n{acct}')
    assert CliRunner().invoke(app, ["-c", str(cfg), "db", "upgrade"]).exit_code == 0
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {a["account"]: a["stored"] for a in out["accounts"]} == {"sales": 1, "support": 2}
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest", "-a", "support"])
    assert r.exit_code == 0 and "ingested 0 new message(s) from 1 account(s)" in r.stdout
    r = CliRunner().invoke(app, ["-c", str(cfg), "ingest", "-a", "nobody"])
    assert r.exit_code == 2 and "unknown account" in r.output
