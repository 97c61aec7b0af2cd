"""Mailbox actions, taken only after the decision is committed; every one is safe to repeat.

* :meth:`MailboxActions.set_keywords` puts one category and one priority keyword on the
  message (``understudy:category:billing``, ``understudy:priority:high``) and removes
  older ones of ours; on Gmail (``X-GM-EXT-1``) it also sets the label
  ``understudy/billing``. Nothing is stored when the flags are already right.
* :meth:`MailboxActions.move` moves with MOVE, or COPY + \\Deleted + UID EXPUNGE where
  MOVE is missing. A repeat finds the message already in the target (by Message-ID)
  and does nothing.
* :meth:`MailboxActions.append_draft` appends a threaded reply (In-Reply-To, References,
  "Re:" subject, From the mailbox address) with \\Draft to the Drafts special-use folder.
  It first searches Drafts for the draft's own Message-ID, so a retry (after a crash
  between APPEND and recording its APPENDUID) never makes a second draft. Callers fix
  ``draft_message_id`` when they commit the decision and record the returned
  :class:`AppendResult`.

Messages are located by UID (checked against the Message-ID, since a UID can be stale
after a UIDVALIDITY change or a move) and else by Message-ID. A dropped connection is
reopened and the action retried once, which is safe because the actions are idempotent.

    >>> actions = build_mailbox_actions(settings, "support")            # doctest: +SKIP
    >>> actions.set_keywords(email, "billing", "high").changed
    True
    >>> actions.append_draft(email, "Hello ...",
    ...                      draft_message_id="<d-42@understudy.invalid>").uid
    7
"""

from __future__ import annotations

import imaplib
import re
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Callable, TypeVar

from imapclient import DRAFT, IMAPClient
from imapclient.imapclient import DRAFTS

from agent.logs import get_logger
from agent.mail.auth import Connector, close_quietly
from agent.mail.errors import MessageNotFound
from agent.mail.source import NETWORK_ERRORS
from storage.types import Email

T = TypeVar("T")
_NOT_ATOM = re.compile(r"[^A-Za-z0-9_.\-+]")


@dataclass(frozen=True)
class ActionResult:
    """What an action did: ``changed`` is False when it found the work already done."""

    changed: bool
    folder: str
    uid: int | None


@dataclass(frozen=True)
class AppendResult:
    """Where a draft is: record it (drafts.appended_*) so a retry can be verified."""

    folder: str
    uidvalidity: int | None
    uid: int | None
    message_id: str
    created: bool          # False: the draft was already there (a retry); nothing appended


def keyword(prefix: str, kind: str, value: str) -> str:
    """A valid IMAP flag atom: ``keyword("understudy", "category", "card arrival")``.

    >>> keyword("understudy", "category", "card arrival")
    'understudy:category:card_arrival'
    """
    return f"{prefix}:{kind}:{_NOT_ATOM.sub('_', value) or '_'}"


def reply_subject(subject: str) -> str:
    """>>> reply_subject("Re: hi"), reply_subject("Invoice")
    ('Re: hi', 'Re: Invoice')
    """
    return subject if re.match(r"^\s*re\s*:", subject or "", re.I) else f"Re: {subject}".strip()


class MailboxActions:
    """One account's mailbox side effects. Thread-safe; one connection, opened on use."""

    def __init__(self, connector: Connector, *, address: str, drafts_folder: str | None = None,
                 keyword_prefix: str = "understudy", account: str | None = None):
        self.connector = connector
        self.address = address
        self.drafts_folder = drafts_folder
        self.prefix = keyword_prefix
        self._client: IMAPClient | None = None
        self._lock = threading.Lock()
        self.log = get_logger(component="mail-actions", account=account or connector.user)

    # -- public actions ------------------------------------------------------------------

    def set_keywords(self, email: Email, category: str, priority: str) -> ActionResult:
        """Make the message carry exactly our keywords for ``category`` and ``priority``."""
        want = {keyword(self.prefix, "category", category),
                keyword(self.prefix, "priority", priority)}

        def run(c: IMAPClient) -> ActionResult:
            folder = email.folder or "INBOX"
            c.select_folder(folder)
            uid = self._locate(c, email)
            if uid is None:
                raise MessageNotFound(f"message {email.message_id or email.uid} is not in "
                                      f"{folder!r}; it was moved or deleted")
            have = {_s(f) for f in c.get_flags([uid]).get(uid, ())}
            ours = {f for f in have if f.startswith(f"{self.prefix}:category:")
                    or f.startswith(f"{self.prefix}:priority:")}
            add, remove = sorted(want - have), sorted(ours - want)
            if add:
                c.add_flags([uid], add, silent=True)
            if remove:
                c.remove_flags([uid], remove, silent=True)
            changed = bool(add or remove)
            if c.has_capability("X-GM-EXT-1"):
                changed = self._gmail_label(c, uid, category) or changed
            return ActionResult(changed=changed, folder=folder, uid=uid)

        return self._run(run)

    def move(self, email: Email, folder: str) -> ActionResult:
        """Move the message into ``folder`` (created if missing); a repeat changes nothing."""
        source = email.folder or "INBOX"
        if folder == source:
            return ActionResult(changed=False, folder=folder, uid=email.uid)

        def run(c: IMAPClient) -> ActionResult:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            c.select_folder(source)
            uid = self._locate(c, email)
            if uid is None:
                c.select_folder(folder, readonly=True)
                there = self._search_message_id(c, email.message_id)
                if there:
                    return ActionResult(changed=False, folder=folder, uid=there[0])
                raise MessageNotFound(f"message {email.message_id or email.uid} is neither in "
                                      f"{source!r} nor in {folder!r}")
            if c.has_capability("MOVE"):
                c.move([uid], folder)
            else:
                c.copy([uid], folder)
                c.delete_messages([uid], silent=True)
                if c.has_capability("UIDPLUS"):
                    c.uid_expunge([uid])   # only ours, not others' \Deleted mail
                else:
                    c.expunge()
            c.select_folder(folder, readonly=True)
            there = self._search_message_id(c, email.message_id)
            return ActionResult(changed=True, folder=folder, uid=there[0] if there else None)

        return self._run(run)

    def append_draft(self, original: Email, body: str, *, draft_message_id: str) -> AppendResult:
        """Put a threaded reply to ``original`` in Drafts, once per ``draft_message_id``."""

        def run(c: IMAPClient) -> AppendResult:
            folder = self._drafts(c)
            info = c.select_folder(folder, readonly=True)
            uidvalidity = int(info[b"UIDVALIDITY"])
            found = self._search_message_id(c, draft_message_id)
            if found:
                return AppendResult(folder, uidvalidity, found[0], draft_message_id, False)
            raw = self.compose_reply(original, body, draft_message_id=draft_message_id)
            resp = c.append(folder, raw, flags=(DRAFT,))
            m = re.search(rb"APPENDUID (\d+) (\d+)", resp if isinstance(resp, bytes) else b"")
            if m:
                uidvalidity, uid = int(m.group(1)), int(m.group(2))
            else:   # no UIDPLUS: look it up
                c.select_folder(folder, readonly=True)
                got = self._search_message_id(c, draft_message_id)
                uid = got[0] if got else None
            self.log.info("draft appended", folder=folder, uid=uid,
                          in_reply_to=original.message_id)
            return AppendResult(folder, uidvalidity, uid, draft_message_id, True)

        return self._run(run)

    def compose_reply(self, original: Email, body: str, *, draft_message_id: str) -> bytes:
        """The draft's RFC 5322 bytes: threading headers, From the mailbox address."""
        msg = EmailMessage()
        msg["From"] = self.address
        if original.reply_addrs:
            msg["To"] = ", ".join(original.reply_addrs)
        msg["Subject"] = reply_subject(original.subject)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = draft_message_id or make_msgid(domain="understudy.invalid")
        if original.message_id:
            msg["In-Reply-To"] = original.message_id
            # RFC 5322 3.6.4: the parent's References plus the parent's Message-ID.
            refs = [r for r in original.references if r != original.message_id][-20:]
            msg["References"] = " ".join([*refs, original.message_id])
        msg.set_content(body)
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                close_quietly(self._client)
                self._client = None

    # -- internals -----------------------------------------------------------------------

    def _run(self, fn: Callable[[IMAPClient], T]) -> T:
        with self._lock:
            for attempt in (0, 1):
                if self._client is None:
                    self._client = self.connector.connect()
                try:
                    return fn(self._client)
                except NETWORK_ERRORS as e:
                    if not isinstance(e, (OSError, EOFError, imaplib.IMAP4.abort)) \
                            and not _is_connection_error(e):
                        raise   # a server NO/BAD: reconnecting would not help
                    close_quietly(self._client)
                    self._client = None
                    if attempt == 1:
                        raise
                    self.log.warning("IMAP connection lost during an action; retrying once",
                                     error=f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    def _locate(self, c: IMAPClient, email: Email) -> int | None:
        """The message's UID in the selected folder, or None."""
        if email.uid is not None:
            got = c.fetch([email.uid], [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]).get(email.uid)
            if got is not None:
                header = next((v for k, v in got.items() if k.startswith(b"BODY[HEADER")), b"")
                if not email.message_id or email.message_id.encode(
                        "utf-8", "replace") in (header or b""):
                    return email.uid
        found = self._search_message_id(c, email.message_id)
        return found[0] if found else None

    @staticmethod
    def _search_message_id(c: IMAPClient, message_id: str | None) -> list[int]:
        if not message_id:
            return []
        return sorted(c.search(["HEADER", "Message-ID", message_id]))

    def _drafts(self, c: IMAPClient) -> str:
        if self.drafts_folder:
            folder = self.drafts_folder
        else:
            folder = c.find_special_folder(DRAFTS) or "Drafts"
        if not c.folder_exists(folder):
            c.create_folder(folder)
        return folder

    def _gmail_label(self, c: IMAPClient, uid: int, category: str) -> bool:
        want = f"{self.prefix}/{category}"
        have = {_s(x) for x in c.get_gmail_labels([uid]).get(uid, ())}
        stale = [x for x in have if x.startswith(f"{self.prefix}/") and x != want]
        if stale:
            c.remove_gmail_labels([uid], stale, silent=True)
        if want not in have:
            c.add_gmail_labels([uid], [want], silent=True)
        return bool(stale) or want not in have


def _s(x: bytes | str) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _is_connection_error(e: Exception) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("socket", "eof", "connection", "broken pipe", "timed out",
                                   "bye"))
