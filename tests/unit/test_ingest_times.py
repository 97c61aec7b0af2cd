"""Timestamps from mail headers and INTERNALDATE are stored as the same instant in UTC."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from agent.mail.parse import parse_email
from storage.ingest import FetchedMessage, store_batch
from storage.leases import mailbox_id
from storage.models import Message

RAW = (b"From: Pat <pat@example.com>\r\nTo: support@example.com\r\n"
       b"Subject: refund\r\nMessage-ID: <tz-1@example.com>\r\n"
       b"Date: Tue, 01 Dec 2026 06:12:39 -0800\r\n\r\nPlease refund my order.\r\n")


def test_a_date_with_an_offset_is_stored_as_its_utc_instant(db):
    email = parse_email(RAW)
    assert email.date.utcoffset() == timedelta(hours=-8)
    pacific = timezone(timedelta(hours=-8))
    arrived = datetime(2026, 12, 1, 6, 13, 0, tzinfo=pacific)     # INTERNALDATE, -0800
    mb = mailbox_id(db, "support", "INBOX")
    store_batch(db, mb, 1, [FetchedMessage(uid=1, raw=RAW, content_hash="a" * 64,
                                           email=email, internal_date=arrived)], last_uid=1)
    with db.session() as s:
        sent, internal = s.execute(select(Message.sent_at, Message.internal_date)).one()

    def utc(dt):                      # SQLite hands back naive UTC, PostgreSQL aware
        return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt

    assert utc(sent) == datetime(2026, 12, 1, 14, 12, 39, tzinfo=timezone.utc)
    assert utc(internal) == datetime(2026, 12, 1, 14, 13, 0, tzinfo=timezone.utc)
