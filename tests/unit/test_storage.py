import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from agent.cli import app
from storage import Database, SchemaNotReady
from storage.models import Account, DecisionRow, Mailbox, Message

TABLES = {"accounts", "mailboxes", "messages", "model_calls", "decisions", "drafts", "reviews",
          "model_versions", "training_runs"}


def test_upgrade_downgrade_upgrade_via_cli(db_url):
    run = CliRunner().invoke
    for args in (["db", "upgrade"], ["db", "downgrade", "base", "--yes"], ["db", "upgrade"]):
        r = run(app, ["--database-url", db_url, *args])
        assert r.exit_code == 0, r.output
    d = Database(db_url)
    assert TABLES <= set(d.table_names())
    assert d.current_revision() == d.head_revision()
    # Without --yes (and no terminal to ask on) nothing is dropped.
    r = run(app, ["--database-url", db_url, "db", "downgrade", "base"])
    assert r.exit_code != 0 and "--yes" in r.output and "EVERY table" in r.output
    assert d.current_revision() == d.head_revision()
    r = run(app, ["--database-url", db_url, "db", "downgrade", "base", "-y"])
    assert r.exit_code == 0
    assert not TABLES & set(d.table_names())
    d.dispose()


def test_commands_refuse_an_unmigrated_database(db_url):
    r = CliRunner().invoke(app, ["--database-url", db_url, "status"])
    assert r.exit_code == 3
    assert "understudy db upgrade" in r.output
    with pytest.raises(SchemaNotReady):
        Database(db_url).require_schema()


def test_one_decision_per_message_and_unique_uid(db):
    with db.session() as s:
        acc = Account(name="a", host="h", user="u")
        mb = Mailbox(account=acc, name="INBOX", uidvalidity=7)
        m = Message(content_hash="x" * 64, subject="hi")
        s.add_all([acc, mb, m])
        s.flush()
        s.add(DecisionRow(message_id=m.id, source="student", category="billing",
                          priority="normal", needs_reply=False))
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.add(DecisionRow(message_id=m.id, source="teacher", category="billing",
                              priority="normal", needs_reply=False))
    with db.session() as s:
        mb_id = s.scalar(select(Mailbox.id))
        s.add(Message(mailbox_id=mb_id, uidvalidity=7, uid=1, content_hash="a" * 64))
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.add(Message(mailbox_id=mb_id, uidvalidity=7, uid=1, content_hash="b" * 64))


def test_json_and_bytes_roundtrip(db):
    raw = b"Subject: \xff\xfe odd bytes\r\n\r\nbody"
    with db.session() as s:
        m = Message(content_hash="c" * 64, raw=raw, attachments=[{"filename": "a.pdf", "size": 3}])
        s.add(m)
    with db.session() as s:
        got = s.scalar(select(Message))
        assert got.raw == raw
        assert got.attachments == [{"filename": "a.pdf", "size": 3}]


def test_sqlite_uses_wal(sqlite_db):
    with sqlite_db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_status_on_fresh_database(sqlite_db):
    r = CliRunner().invoke(app, ["--database-url", sqlite_db.url, "status", "--json"])
    assert r.exit_code == 0, r.output
    import json

    doc = json.loads(r.stdout)
    assert doc["messages"]["total"] == 0
    assert doc["teacher"]["paused_by_cap"] is False


def test_migrations_match_the_models(db):
    """Alembic's autogenerate finds nothing to add: every model change has its migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.models import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff
