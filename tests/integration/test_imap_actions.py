"""Mailbox actions against a real Dovecot: keywords, move, threaded drafts; repeats are no-ops.

"Changes nothing" is checked with CONDSTORE: a folder's HIGHESTMODSEQ moves on every
flag change, append or expunge, so an idempotent repeat must leave it where it was.
"""

from __future__ import annotations

import email
from email import policy

import imapclient
import pytest

from agent.mail import build_mail_sources, build_mailbox_actions
from agent.mail.actions import MailboxActions
from agent.mail.auth import Connector
from config import AccountSettings, Settings
from storage.db import Database
from storage.work import load_emails

pytestmark = pytest.mark.integration

ORIGINAL = (b"From: Carol <carol@example.com>\r\nTo: demo@localhost\r\n"
            b"Subject: Card not arrived\r\nMessage-ID: <orig-1@example.com>\r\n"
            b"References: <root-0@example.com>\r\nDate: Mon, 05 Aug 2002 08:51:39 +0000\r\n"
            b"\r\nMy card has not arrived yet.\r\n")


def settings_for(server, **account) -> Settings:
    return Settings(accounts=[AccountSettings(**server.account_settings(
        address="support@example.com", **account))])


def ingest_one(server, db: Database, raw: bytes = ORIGINAL):
    c = imapclient.IMAPClient(server.host, port=server.port, ssl=False)
    c.login(server.user, server.password)
    c.append("INBOX", raw)
    c.logout()
    (src,) = build_mail_sources(settings_for(server), db)
    assert src.sync() == 1
    from sqlalchemy import select

    from storage.models import Message

    with db.session() as s:
        mid = s.scalar(select(Message.id))
    return load_emails(db, [mid])[0]


def modseq(c: imapclient.IMAPClient, folder: str) -> int:
    c.select_folder(folder, readonly=True)
    st = c.folder_status(folder, [b"HIGHESTMODSEQ"])
    return int(st[b"HIGHESTMODSEQ"])


@pytest.fixture
def imap(dovecot):
    c = imapclient.IMAPClient(dovecot.host, port=dovecot.port, ssl=False)
    c.login(dovecot.user, dovecot.password)
    yield c
    c.logout()


def test_keywords_are_set_once_and_replaced_on_change(dovecot, sqlite_db, imap):
    e = ingest_one(dovecot, sqlite_db)
    assert (e.account, e.folder, e.uid) == ("test", "INBOX", 1)
    actions = build_mailbox_actions(settings_for(dovecot), "test")
    assert actions.set_keywords(e, "billing", "high").changed
    imap.select_folder("INBOX", readonly=True)
    flags = set(imap.get_flags([e.uid])[e.uid])
    assert {b"understudy:category:billing", b"understudy:priority:high"} <= flags
    assert b"\\Seen" not in flags
    before = modseq(imap, "INBOX")
    assert not actions.set_keywords(e, "billing", "high").changed
    assert modseq(imap, "INBOX") == before                   # the repeat stored nothing
    # A changed decision swaps our keywords and leaves others' flags alone.
    imap.select_folder("INBOX")
    imap.add_flags([e.uid], [b"\\Flagged", b"customer-vip"])
    assert actions.set_keywords(e, "card arrival", "low").changed
    flags = set(imap.get_flags([e.uid])[e.uid])
    assert {b"understudy:category:card_arrival", b"understudy:priority:low",
            b"\\Flagged", b"customer-vip"} <= flags
    assert not any(f in flags for f in (b"understudy:category:billing",
                                        b"understudy:priority:high"))
    actions.close()


def test_move_once_then_no_op(dovecot, sqlite_db, imap):
    e = ingest_one(dovecot, sqlite_db)
    actions = build_mailbox_actions(settings_for(dovecot), "test")
    res = actions.move(e, "Billing")                      # the folder is created
    assert res.changed and res.folder == "Billing"
    imap.select_folder("INBOX", readonly=True)
    assert imap.search(["ALL"]) == []
    imap.select_folder("Billing", readonly=True)
    assert imap.search(["HEADER", "Message-ID", "<orig-1@example.com>"]) == [res.uid]
    before = (modseq(imap, "INBOX"), modseq(imap, "Billing"))
    again = actions.move(e, "Billing")                    # the stale email still says INBOX
    assert not again.changed and again.uid == res.uid
    assert (modseq(imap, "INBOX"), modseq(imap, "Billing")) == before
    actions.close()


def test_move_without_the_move_extension(dovecot, sqlite_db, imap):
    e = ingest_one(dovecot, sqlite_db)
    conn = Connector(host=dovecot.host, port=dovecot.port, security="none",
                     user=dovecot.user, password_env="UNDERSTUDY_TEST_IMAP_PASSWORD")

    class NoMove(Connector):
        def connect(self):
            c = super().connect()
            caps = tuple(x for x in c.capabilities() if x != b"MOVE")
            c._cached_capabilities = caps                 # as an old server would say
            return c

    actions = MailboxActions(NoMove(**{k: getattr(conn, k) for k in (
        "host", "port", "security", "user", "auth", "password_env")}), address="x@y.z")
    assert actions.move(e, "Archive").changed              # COPY + \Deleted + UID EXPUNGE
    imap.select_folder("INBOX", readonly=True)
    assert imap.search(["ALL"]) == []
    imap.select_folder("Archive", readonly=True)
    assert len(imap.search(["ALL"])) == 1
    assert not actions.move(e, "Archive").changed
    actions.close()


def test_draft_threads_under_its_original_and_is_appended_once(dovecot, sqlite_db, imap):
    e = ingest_one(dovecot, sqlite_db)
    actions = build_mailbox_actions(settings_for(dovecot), "test")
    mid = "<understudy-draft-1-abc@understudy.invalid>"
    first = actions.append_draft(e, "Hello Carol,\n\nYour card ships today.", draft_message_id=mid)
    assert first.created and first.folder == "Drafts" and first.uid == 1
    assert first.uidvalidity and first.message_id == mid
    before = modseq(imap, "Drafts")
    second = actions.append_draft(e, "Hello Carol, (retry)", draft_message_id=mid)
    assert not second.created
    assert (second.folder, second.uidvalidity, second.uid) == (
        first.folder, first.uidvalidity, first.uid)
    assert modseq(imap, "Drafts") == before
    imap.select_folder("Drafts", readonly=True)
    assert imap.search(["ALL"]) == [first.uid]
    got = imap.fetch([first.uid], [b"FLAGS", b"BODY.PEEK[]"])[first.uid]
    assert b"\\Draft" in got[b"FLAGS"]
    draft = email.message_from_bytes(got[b"BODY[]"], policy=policy.default)
    assert draft["Subject"] == "Re: Card not arrived"
    assert draft["From"] == "support@example.com"
    assert draft["To"] == "carol@example.com"
    assert draft["In-Reply-To"] == "<orig-1@example.com>"
    assert draft["References"].split() == ["<root-0@example.com>", "<orig-1@example.com>"]
    assert draft["Message-ID"] == mid
    assert "Your card ships today." in draft.get_content()
    # The server threads it under the original (RFC 5256 REFERENCES) across folders too.
    imap.select_folder("Drafts", readonly=True)
    assert imap.search(["HEADER", "In-Reply-To", "<orig-1@example.com>"]) == [first.uid]
    actions.close()


def test_a_reply_goes_to_reply_to_when_the_sender_set_one(dovecot, sqlite_db, imap):
    """Web forms and ticket systems send From a no-reply address with the customer in
    Reply-To: the draft must address the customer, through ingest, SQL and back."""
    raw = (b"From: Web form <noreply@forms.example>\r\n"
           b"Reply-To: Dana Customer <dana@customers.example>\r\nTo: support@example.com\r\n"
           b"Subject: Card not arrived\r\nMessage-ID: <form-1@forms.example>\r\n\r\n"
           b"My card has not arrived.\r\n")
    e = ingest_one(dovecot, sqlite_db, raw)
    assert e.reply_to == ("dana@customers.example",) and e.from_addr == "noreply@forms.example"
    actions = build_mailbox_actions(settings_for(dovecot), "test")
    res = actions.append_draft(e, "Hello Dana", draft_message_id="<d-rt@understudy.invalid>")
    imap.select_folder("Drafts", readonly=True)
    got = imap.fetch([res.uid], [b"BODY.PEEK[]"])[res.uid]
    draft = email.message_from_bytes(got[b"BODY[]"], policy=policy.default)
    assert draft["To"] == "dana@customers.example"
    actions.close()


def test_configured_drafts_folder_is_created(dovecot, sqlite_db, imap):
    e = ingest_one(dovecot, sqlite_db)
    actions = build_mailbox_actions(settings_for(dovecot, drafts_folder="Outbox/Drafts"), "test")
    res = actions.append_draft(e, "hi", draft_message_id="<d2@understudy.invalid>")
    assert res.folder == "Outbox/Drafts" and res.created
    assert imap.folder_exists("Outbox/Drafts")
    actions.close()


def test_actions_reconnect_after_a_server_restart(dovecot, sqlite_db):
    e = ingest_one(dovecot, sqlite_db)
    actions = build_mailbox_actions(settings_for(dovecot), "test")
    assert actions.set_keywords(e, "billing", "high").changed
    dovecot.restart()                       # the cached connection is now dead
    assert actions.set_keywords(e, "spam", "low").changed
    actions.close()
