"""The whole spamassassin corpus through a real Dovecot: exactly once, bytes intact.

Loading: the 6,046 files are written straight into the Maildir's ``new/`` directory
before the first SELECT (as an LDA delivers them), which takes ~1 s where 6,046 APPENDs
would take much longer; Dovecot assigns the UIDs. A second, small test appends over
IMAP (APPEND) and runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from agent.mail.auth import Connector
from agent.mail.source import ImapMailSource
from storage.models import Message

pytestmark = pytest.mark.integration


def corpus(data_dir: Path) -> list[bytes]:
    files = sorted((data_dir / "spamassassin").glob("*/*.eml"))
    return [f.read_bytes() for f in files]


def as_served(raw: bytes) -> bytes:
    # IMAP serves messages with CRLF line ends; the Maildir files have bare LF.
    return re.sub(rb"\r?\n", b"\r\n", raw)


def source_for(server, db, **kw) -> ImapMailSource:
    conn = Connector(host=server.host, port=server.port, security="none", user=server.user,
                     password_env="UNDERSTUDY_TEST_IMAP_PASSWORD")
    return ImapMailSource(db, account="test", connector=conn, folders=["INBOX"], **kw)


def test_whole_corpus_exactly_once(dovecot, sqlite_db, data_dir):
    raws = corpus(data_dir)
    assert len(raws) == 6046
    dovecot.deliver_files(raws)
    src = source_for(dovecot, sqlite_db)
    assert src.sync() == 6046
    assert src.sync() == 0                      # second pass adds nothing
    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 6046
        assert s.scalar(select(func.count(func.distinct(Message.uid)))) == 6046
        rows = s.execute(select(Message.raw, Message.subject, Message.body_text,
                                Message.parse_error, Message.flags, Message.state,
                                Message.content_hash)).all()
    expected = sorted(as_served(r) for r in raws)
    assert sorted(r.raw for r in rows) == expected           # bytes intact, none missing
    for r in rows:
        assert isinstance(r.subject, str)
        assert r.body_text.strip() or r.parse_error, r.subject
        assert "\\Seen" not in r.flags                        # BODY.PEEK[] never marks read
        assert r.state == "pending"
    with_subject = sum(1 for r in rows if r.subject)
    assert with_subject >= 6000                   # a handful of spam has no Subject at all
    errors = sum(1 for r in rows if r.parse_error)
    assert errors < 30                            # image-only spam: recorded, not dropped


def test_appended_messages_on_each_backend(dovecot, db, data_dir):
    import imapclient

    raws = [as_served(r) for r in corpus(data_dir)[::60]]   # ~100, every folder of the corpus
    c = imapclient.IMAPClient(dovecot.host, port=dovecot.port, ssl=False)
    c.login(dovecot.user, dovecot.password)
    for raw in raws:
        c.append("INBOX", raw)
    src = source_for(dovecot, db, fetch_batch=17)
    assert src.sync() == len(raws)
    for raw in raws[:5]:
        c.append("INBOX", raw + b"\r\nextra line\r\n")
    assert src.sync() == 5
    assert src.sync() == 0
    c.logout()
    with db.session() as s:
        stored = sorted(s.scalars(select(Message.raw)))
    assert stored == sorted(raws + [r + b"\r\nextra line\r\n" for r in raws[:5]])
