#!/usr/bin/env python3
"""A throwaway Dovecot IMAP server on 127.0.0.1, for tests, benchmarks and the demo.

It runs Debian's ``dovecot`` binary with its own config, base_dir and Maildir under
``root``, so it never touches (or depends on) a system-wide Dovecot on 143/993. One
passwd-file user, plaintext login without TLS (loopback only), IDLE, and the special-use
folders Drafts, Junk, Sent and Trash. It starts in about 0.1 s.

Works as root and as a normal user. As a normal user every process runs as that user.
Dovecot refuses to run imap-login as root and never accesses mail as uid 0, so as root
the login/internal processes run as Debian's dovenull/dovecot users and mail as the
``mail`` user, with the Maildir under a world-traversable runtime dir in $TMPDIR
(``root/home`` links to it; :meth:`cleanup` removes it).

    >>> d = LocalDovecot(Path("/tmp/dc")).start()          # doctest: +SKIP
    >>> AccountSettings(**d.account_settings()).port       # doctest: +SKIP
    >>> d.stop()                                           # doctest: +SKIP

Command line (used by scripts/demo)::

    python scripts/local_dovecot.py start --dir D [--port N]   # prints host/port/user
    python scripts/local_dovecot.py stop --dir D

The password is exported in ``$UNDERSTUDY_TEST_IMAP_PASSWORD`` by :meth:`start` (same
process) and written to ``D/password`` by the command line; ``account_settings`` names
that variable as ``password_env``.
"""

from __future__ import annotations

import argparse
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

PASSWORD_ENV = "UNDERSTUDY_TEST_IMAP_PASSWORD"
DEFAULT_PASSWORD = "understudy-test-pw"
SPECIAL_USE = {"Drafts": "\\Drafts", "Junk": "\\Junk", "Sent": "\\Sent", "Trash": "\\Trash"}


def find_dovecot() -> str | None:
    """Path of the dovecot binary (Debian puts it in /usr/sbin, often not on PATH)."""
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)),
        None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DovecotNotFound(RuntimeError):
    """The dovecot binary is not installed: run scripts/setup (installs dovecot-imapd)."""


class LocalDovecot:
    """One private Dovecot: ``start()``, ``stop()``, ``restart()`` (same port and Maildir)."""

    def __init__(self, root: Path, user: str = "demo@localhost",
                 password: str = DEFAULT_PASSWORD, host: str = "127.0.0.1",
                 port: int | None = None, tls: bool = False):
        self.root = Path(root).resolve()
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        # tls=True: STARTTLS on ``port`` and implicit TLS on ``tls_port``, with a
        # self-signed certificate for 127.0.0.1/localhost in ``ca_file``.
        self.tls = tls
        self.tls_port: int | None = None
        self.ca_file: Path | None = None
        self.conf = self.root / "dovecot.conf"
        self.log = self.root / "dovecot.log"
        self.pid_file = self.root / "dovecot.pid"
        # Unix socket paths are limited to ~108 bytes and must be reachable by the login
        # user, so the runtime dir is a short path derived from root, not inside it.
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        self.runtime = Path(tempfile.gettempdir()) / f"understudy-dovecot-{os.getuid()}-{digest}"
        self.run_dir = self.runtime / "run"
        self._mail_user = _mail_user(os.getuid())
        if self._mail_user is None:
            self.home = self.root / "home"
        else:
            # Dovecot never accesses mail as uid 0, so as root the mail user is another
            # account, which cannot traverse a 0700 test dir: the Maildir lives in the
            # runtime dir and root/home links to it.
            self.home = self.runtime / "home"
        self.maildir = self.home / "Maildir"
        self._proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> "LocalDovecot":
        binary = find_dovecot()
        if binary is None:
            raise DovecotNotFound(DovecotNotFound.__doc__)
        if self.port is None:
            self.port = free_port(self.host)
        if self.tls and self.tls_port is None:
            self.tls_port = free_port(self.host)
        # A crashed earlier run for this same root (its runtime dir is derived from root)
        # leaves its master running; Dovecot would refuse to start next to it.
        stale = _read_pid(self.run_dir / "master.pid")
        if stale is not None and _alive(stale):
            _killpg(stale, signal.SIGKILL)
        self._write_config()
        os.environ[PASSWORD_ENV] = self.password
        # -F: stay in the foreground so this Popen *is* the master; a new session keeps
        # it alive after the CLI that started it exits (scripts/demo).
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen([binary, "-F", "-c", str(self.conf)],
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self.pid_file.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self._proc.returncode}; "
                                   f"see {self.log}:\n{self._log_tail()}")
            if self._accepts():
                return self
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"dovecot did not listen on {self.host}:{self.port} within "
                           f"{timeout} s; see {self.log}:\n{self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and every IMAP session (clients see the connection drop)."""
        pid = self._proc.pid if self._proc else _read_pid(self.pid_file)
        if pid is None:
            return
        # The master leads its own process group (start_new_session): signal the whole
        # group, since a lone SIGTERM to the master leaves imap processes serving their
        # clients for up to 10 s.
        _killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        grace = time.monotonic() + 0.3
        while time.monotonic() < grace:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    break
            elif not _alive(pid):
                break
            time.sleep(0.01)
        _killpg(pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        # Wait until the port is free, so restart() can bind it again at once.
        while self.port and time.monotonic() < deadline and self._accepts():
            time.sleep(0.01)

    def cleanup(self) -> None:
        """Stop, then delete the runtime dir (and the Maildir when it lives there)."""
        self.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)

    def restart(self) -> "LocalDovecot":
        self.stop()
        return self.start()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "LocalDovecot":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------------------

    def account_settings(self, name: str = "test", **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``config.AccountSettings(**d)`` pointing at this server."""
        d: dict[str, Any] = {"name": name, "host": self.host, "port": self.port,
                             "security": "none", "user": self.user, "auth": "password",
                             "password_env": PASSWORD_ENV, "folders": ["INBOX"]}
        if self.tls:
            d["ca_file"] = str(self.ca_file)
        d.update(overrides)
        if d.get("security") == "tls" and "port" not in overrides:
            d["port"] = self.tls_port
        return d

    def folder_path(self, folder: str = "INBOX") -> Path:
        """The Maildir directory of ``folder`` (Maildir++ layout: ``.Sub.Folder``)."""
        if folder.upper() == "INBOX":
            return self.maildir
        return self.maildir / ("." + folder.replace("/", "."))

    def deliver_files(self, messages: list[bytes], folder: str = "INBOX") -> int:
        """Drop messages straight into the folder's Maildir ``new/`` (as an LDA would).

        Much faster than APPEND for bulk loads; Dovecot assigns UIDs on the next SELECT.
        """
        d = self.folder_path(folder)
        for sub in ("new", "cur", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        stamp = int(time.time())
        for i, raw in enumerate(messages):
            # Unique across calls and processes: a clash would overwrite an undelivered file.
            name = f"{stamp}.M{i}R{uuid.uuid4().hex[:12]}P{os.getpid()}.understudy"
            tmp = d / "tmp" / name
            tmp.write_bytes(raw)
            tmp.rename(d / "new" / name)
        if self._mail_user is not None:
            _chown_tree(d, *self._mail_user)
        return len(messages)

    def reset_uidvalidity(self, folder: str = "INBOX") -> None:
        """Simulate a recreated folder: drop Dovecot's UID list and indexes, then restart.

        The messages stay; Dovecot hands out a new UIDVALIDITY and renumbers them from 1.
        """
        was_running = self.running()
        self.stop()
        d = self.folder_path(folder)
        for p in d.glob("dovecot*"):
            if p.is_file():
                p.unlink()
        # Make sure the new UIDVALIDITY (derived from the clock) differs from the old.
        time.sleep(1.05)
        if was_running:
            self.start()

    # -- internals -------------------------------------------------------------------------

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _certificate(self) -> Path:
        cert, key = self.root / "cert.pem", self.root / "key.pem"
        if not cert.exists():
            _openssl_cert(cert, key)
        return cert

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _write_config(self) -> None:
        run = self.run_dir
        for p in (run, self.home, self.maildir, self.root / "state"):
            p.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o755)
        uid, gid = os.getuid(), os.getgid()
        if self._mail_user is not None:
            uid, gid = self._mail_user
            link = self.root / "home"
            if not link.exists():
                link.symlink_to(self.home)
            _chown_tree(self.home, uid, gid)
        internal, login = _service_users(uid)
        group = grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name
        # The login and auth processes may run as other users (root cannot run
        # imap-login), so their sockets and the passwd file live in a world-traversable
        # directory outside the (often 0700) test dir.
        run.chmod(0o755)
        ssl_conf = "ssl = no"
        if self.tls:
            self.ca_file = self._certificate()
            ssl_conf = (f"ssl = yes\nssl_cert = <{self.ca_file}\n"
                        f"ssl_key = <{self.root / 'key.pem'}")
        passwd = run / "passwd"
        passwd.write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        passwd.chmod(0o644)
        mailboxes = "\n".join(
            f"  mailbox {name} {{\n    special_use = {use}\n    auto = subscribe\n  }}"
            for name, use in SPECIAL_USE.items())
        self.conf.write_text(f"""\
# Generated by scripts/local_dovecot.py; throwaway, loopback only.
base_dir = {run}
state_dir = {self.root / "state"}
instance_name = understudy-{self.port}
protocols = imap
listen = {self.host}
log_path = {self.log}
{ssl_conf}
disable_plaintext_auth = no
auth_mechanisms = plain login
# Fail wrong logins at once (tests provoke them on purpose).
auth_failure_delay = 0
# As a normal user every process runs as that user; as root the login/internal processes
# run as Debian's dovenull/dovecot users (imap-login refuses root) and mail as root.
# No chroots, so the same config works in CI containers and on a laptop.
default_internal_user = {internal}
default_internal_group = {group}
default_login_user = {login}
first_valid_uid = {uid}
last_valid_uid = 0
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_fsync = never
mailbox_list_index = yes
imap_capability = +IDLE
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.home}
}}
namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.tls_port or 0}
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
service imap {{
  process_limit = 64
}}
service imap-urlauth-login {{
  chroot =
}}
service pop3-login {{
  chroot =
}}
service submission-login {{
  chroot =
}}
service managesieve-login {{
  chroot =
}}
""")


def _openssl_cert(cert: Path, key: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)


def _service_users(uid: int) -> tuple[str, str]:
    """(internal user, login user): the invoking user, or Debian's users when root."""
    me = pwd.getpwuid(uid).pw_name
    if uid != 0:
        return me, me

    def exists(name: str) -> bool:
        try:
            pwd.getpwnam(name)
            return True
        except KeyError:
            return False

    internal = next((u for u in ("dovecot", "nobody") if exists(u)), None)
    login = next((u for u in ("dovenull", "nobody") if exists(u)), None)
    if internal is None or login is None:
        raise RuntimeError("running as root needs the 'dovecot'/'dovenull' (or 'nobody') "
                           "system users: install dovecot-imapd via scripts/setup")
    return internal, login


def _mail_user(uid: int) -> tuple[int, int] | None:
    """(uid, gid) that mail processes run as when we are root; None otherwise."""
    if uid != 0:
        return None
    for name in ("mail", "nobody"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    raise RuntimeError("running as root needs a 'mail' or 'nobody' system user for mail access")


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for n in filenames:
            os.chown(os.path.join(dirpath, n), uid, gid)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of nobody we know still answers kill(0); check /proc.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A throwaway Dovecot on 127.0.0.1.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start in the background; prints host/port/user as JSON")
    st.add_argument("--dir", type=Path, required=True, help="state directory (config, Maildir)")
    st.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    st.add_argument("--user", default="demo@localhost", help="login (default demo@localhost)")
    st.add_argument("--password", default=None,
                    help=f"password (default ${PASSWORD_ENV} or {DEFAULT_PASSWORD!r})")
    sp = sub.add_parser("stop", help="stop the server started with --dir")
    sp.add_argument("--dir", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "start":
        pw = a.password or os.environ.get(PASSWORD_ENV) or DEFAULT_PASSWORD
        d = LocalDovecot(a.dir, user=a.user, password=pw, port=a.port).start()
        (d.root / "password").write_text(pw)
        (d.root / "password").chmod(0o600)
        print(json.dumps({"host": d.host, "port": d.port, "user": d.user,
                          "password_env": PASSWORD_ENV, "password_file": str(d.root / "password"),
                          "pid": _read_pid(d.pid_file), "maildir": str(d.maildir)}))
        return 0
    d = LocalDovecot(a.dir)
    d.cleanup()
    print(json.dumps({"stopped": str(d.root)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
