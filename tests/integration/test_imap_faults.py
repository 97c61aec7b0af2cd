"""Faults against a real Dovecot: server restarts during IDLE, SIGKILL mid-batch,
UIDVALIDITY resets. Every message must end up stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import imapclient
import pytest
from sqlalchemy import func, select

from agent.mail.auth import Connector
from agent.mail.source import ImapMailSource
from storage.models import Mailbox, Message

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def mail(i: int, tag: str = "m") -> bytes:
    return (f"From: sender{i}@example.com\r\nTo: demo@localhost\r\n"
            f"Subject: {tag} number {i}\r\nMessage-ID: <{tag}-{i}@example.com>\r\n\r\n"
            f"Body of {tag} {i}\r\n").encode()


def source_for(server, db, **kw) -> ImapMailSource:
    conn = Connector(host=server.host, port=server.port, security="none", user=server.user,
                     password_env="UNDERSTUDY_TEST_IMAP_PASSWORD", timeout_s=10)
    return ImapMailSource(db, account="test", connector=conn, **kw)


def client(server) -> imapclient.IMAPClient:
    c = imapclient.IMAPClient(server.host, port=server.port, ssl=False)
    c.login(server.user, server.password)
    return c


def stored_subjects(db) -> list[str]:
    with db.session() as s:
        return sorted(s.scalars(select(Message.subject)))


def wait_for(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_idle_survives_a_server_restart(dovecot, sqlite_db):
    src = source_for(dovecot, sqlite_db, folders=["INBOX"], backoff_initial_s=0.1,
                     backoff_max_s=0.5)
    stop = threading.Event()
    calls: list[int] = []
    t = threading.Thread(target=src.watch, args=("INBOX", stop, calls.append), daemon=True)
    t.start()
    try:
        c = client(dovecot)
        for i in range(3):
            c.append("INBOX", mail(i))
        c.logout()
        # Dovecot delays IDLE notifications by ~0.5 s.
        assert wait_for(lambda: len(stored_subjects(sqlite_db)) == 3), stored_subjects(sqlite_db)
        assert sum(calls) == 3
        dovecot.stop()
        # Mail that arrives while the server is down (delivered into the Maildir) ...
        dovecot.deliver_files([mail(i) for i in range(3, 6)])
        time.sleep(0.5)                       # the watcher sees the connection drop
        dovecot.start()
        # ... and mail that arrives after the restart are both caught up.
        c = client(dovecot)
        c.append("INBOX", mail(6))
        c.logout()
        assert wait_for(lambda: len(stored_subjects(sqlite_db)) == 7), stored_subjects(sqlite_db)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert stored_subjects(sqlite_db) == sorted(f"m number {i}" for i in range(7))


KILLER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from sqlalchemy.orm import Session
    from agent.mail.auth import Connector
    from agent.mail.source import ImapMailSource
    from storage import ingest
    from storage.db import Database

    marker, url, port, user = sys.argv[1:5]
    batches = {{"n": 0}}
    real_store, real_commit = ingest.store_batch, Session.commit

    def store_batch(*a, **kw):
        batches["n"] += 1
        return real_store(*a, **kw)

    def commit(self):
        # In the 3rd batch's transaction, rows inserted and the cursor moved but not
        # committed: tell the test, then wait for its SIGKILL.
        if batches["n"] == 3:
            open(marker, "w").write("inside")
            time.sleep(60)
        return real_commit(self)

    ingest.store_batch = store_batch
    Session.commit = commit
    db = Database(url)
    src = ImapMailSource(db, account="test", folders=["INBOX"], fetch_batch=10,
                         connector=Connector(host="127.0.0.1", port=int(port), security="none",
                                             user=user, password_env="UNDERSTUDY_TEST_IMAP_PASSWORD"))
    src.sync()
""")


def test_sigkill_mid_batch_then_rerun_stores_each_once(dovecot, db, tmp_path):
    dovecot.deliver_files([mail(i) for i in range(95)])
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    marker = tmp_path / "inside"
    proc = subprocess.Popen([sys.executable, str(script), str(marker), db.url,
                             str(dovecot.port), dovecot.user], start_new_session=True)
    try:
        assert wait_for(marker.exists, 60), "the child never reached the batch commit"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    committed = len(stored_subjects(db))
    assert committed == 20             # two batches of 10 in, the third rolled back
    src = source_for(dovecot, db, folders=["INBOX"], fetch_batch=10)
    assert src.sync() == 95 - committed
    assert stored_subjects(db) == sorted(f"m number {i}" for i in range(95))
    with db.session() as s:
        assert s.scalar(select(func.count(func.distinct(Message.uid)))) == 95
        assert s.scalar(select(Mailbox.last_uid)) == 95


def test_uidvalidity_reset_of_inbox_creates_no_duplicates(dovecot, db):
    dovecot.deliver_files([mail(i) for i in range(20)])
    src = source_for(dovecot, db, folders=["INBOX"], fetch_batch=7)
    assert src.sync() == 20
    with db.session() as s:
        old_validity = s.scalar(select(Mailbox.uidvalidity))
    dovecot.reset_uidvalidity("INBOX")     # indexes dropped: new UIDVALIDITY, UIDs from 1
    dovecot.deliver_files([mail(i) for i in range(20, 23)])
    assert src.sync() == 3
    assert src.last_results[0].reset and src.last_results[0].remapped == 20
    assert src.last_results[0].uidvalidity != old_validity
    assert stored_subjects(db) == sorted(f"m number {i}" for i in range(23))
    with db.session() as s:
        # Every row now points at a UID of the new UIDVALIDITY (actions find them).
        assert set(s.scalars(select(Message.uidvalidity))) == {src.last_results[0].uidvalidity}
        assert s.scalar(select(func.count(func.distinct(Message.uid)))) == 23
    assert src.sync() == 0


def test_folder_deleted_and_recreated_creates_no_duplicates(dovecot, db):
    c = client(dovecot)
    c.create_folder("Support")
    for i in range(6):
        c.append("Support", mail(i, "s"))
    src = source_for(dovecot, db, folders=["Support"])
    assert src.sync() == 6
    c.delete_folder("Support")
    time.sleep(1.05)                         # UIDVALIDITY comes from the clock
    c.create_folder("Support")
    for i in range(8):                       # the same six again, plus two new ones
        c.append("Support", mail(i, "s"))
    c.logout()
    assert src.sync() == 2
    assert src.last_results[0].reset
    assert stored_subjects(db) == sorted(f"s number {i}" for i in range(8))


def test_polls_when_the_server_has_no_idle(dovecot, sqlite_db):
    class NoIdle(Connector):
        def connect(self):
            c = super().connect()
            c._cached_capabilities = tuple(x for x in c.capabilities() if x != b"IDLE")
            return c

    conn = NoIdle(host=dovecot.host, port=dovecot.port, security="none", user=dovecot.user,
                  password_env="UNDERSTUDY_TEST_IMAP_PASSWORD")
    src = ImapMailSource(sqlite_db, account="test", connector=conn, folders=["INBOX"],
                         poll_interval_s=0.2)
    stop = threading.Event()
    t = threading.Thread(target=src.watch, args=("INBOX", stop), daemon=True)
    t.start()
    try:
        c = client(dovecot)
        for i in range(2):
            c.append("INBOX", mail(i, "p"))
            assert wait_for(lambda: len(stored_subjects(sqlite_db)) == i + 1, 10)
        c.logout()
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert stored_subjects(sqlite_db) == ["p number 0", "p number 1"]


def test_a_failed_commit_stops_the_pass_without_skipping_a_batch(dovecot, sqlite_db,
                                                                  monkeypatch):
    from storage import ingest

    dovecot.deliver_files([mail(i) for i in range(50)])
    real, calls = ingest.store_batch, []

    def flaky(*a, **kw):
        calls.append(kw["last_uid"])
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*a, **kw)

    monkeypatch.setattr(ingest, "store_batch", flaky)
    src = source_for(dovecot, sqlite_db, folders=["INBOX"], fetch_batch=10)
    with pytest.raises(OSError, match="disk full"):
        src.sync()
    assert calls == [10, 20]                    # batches 3..5 were never committed
    with sqlite_db.session() as s:
        assert s.scalar(select(Mailbox.last_uid)) == 10
    assert len(stored_subjects(sqlite_db)) == 10
    monkeypatch.setattr(ingest, "store_batch", real)
    assert src.sync() == 40
    assert stored_subjects(sqlite_db) == sorted(f"m number {i}" for i in range(50))
