from agent.status_view import render_status
from config import load_settings
from storage.queries import status_snapshot


def test_status_shows_every_section(sqlite_db):
    from storage.ingest import store_batch  # noqa: F401 - the mail capability's writer exists
    from storage.models import Account, DraftRow, Mailbox, Message

    with sqlite_db.session() as s:
        acc = Account(name="support", host="h", user="u")
        mb = Mailbox(account=acc, name="INBOX", uidvalidity=9, last_uid=3)
        s.add_all([acc, mb])
        s.flush()
        m = Message(mailbox_id=mb.id, uidvalidity=9, uid=3, content_hash="a" * 64,
                    subject="broken", parse_error="bad MIME")
        s.add(m)
        s.flush()
        s.add(DraftRow(message_id=m.id, source="teacher", body="Hi", status="pending_review"))
    text = render_status(status_snapshot(sqlite_db, load_settings(None)))
    assert "support/INBOX: 1 stored, uid cursor 3 (uidvalidity 9)" in text
    assert "1 draft(s) wait for review" in text
    assert "parse errors 1" in text and "bad MIME" in text
    assert "cold start" in text
