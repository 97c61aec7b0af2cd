"""Ingest queries: the per-folder UID cursor and exactly-once batch storage.

Exactly once rests on three things, all in SQL:

* a batch of messages and the advanced cursor are committed in **one transaction**, so a
  crash before the commit stores nothing and the next run fetches the same UIDs again;
* the unique key ``(mailbox_id, uidvalidity, uid)`` with ``ON CONFLICT DO NOTHING``, so
  two ingesters racing on one folder (``understudy ingest`` next to the daemon) cannot
  store a message twice;
* after a UIDVALIDITY change (folder recreated, server restored), every UID is new, so
  a message is matched against rows of the *older* UIDVALIDITY by content hash, then by
  Message-ID; a match is re-pointed at its new UID instead of being stored again. That
  also holds when the rescan itself is interrupted.

    >>> cur = folder_cursor(db, "support", "INBOX")                    # doctest: +SKIP
    >>> store_batch(db, cur.mailbox_id, 1700000000, batch, last_uid=100)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from storage.db import Database
from storage.leases import mailbox_id
from storage.models import Account, Mailbox, Message, utcnow
from storage.types import Email

MAX_MESSAGE_ID = 998


@dataclass(frozen=True)
class Cursor:
    """Where ingestion of one folder stands."""

    mailbox_id: int
    uidvalidity: int | None
    last_uid: int


@dataclass(frozen=True)
class FetchedMessage:
    """One message as fetched and parsed, ready to store."""

    uid: int
    raw: bytes
    content_hash: str
    email: Email
    internal_date: datetime | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class BatchResult:
    stored: int        # new rows
    remapped: int      # rows of an older UIDVALIDITY re-pointed at their new UID
    skipped: int       # already stored (a racing ingester, or a repeated batch)


class StaleCursor(Exception):
    """The folder's UIDVALIDITY changed under this ingester; sync the folder again."""


def folder_cursor(db: Database, account: str, folder: str, *, host: str = "",
                  user: str = "") -> Cursor:
    """The cursor of (account, folder), creating the account/mailbox rows on first use."""
    mb = mailbox_id(db, account, folder)
    with db.session() as s:
        row = s.get(Mailbox, mb)
        if host or user:
            acc = s.get(Account, row.account_id)
            if (acc.host, acc.user) != (host, user):
                acc.host, acc.user = host, user
        return Cursor(mailbox_id=mb, uidvalidity=row.uidvalidity, last_uid=row.last_uid or 0)


def set_uidvalidity(db: Database, mailbox: int, uidvalidity: int) -> Cursor:
    """Adopt a new UIDVALIDITY: the cursor restarts at 0 and the next pass is a rescan.

    Messages stored under the old UIDVALIDITY stay; :func:`store_batch` re-points them.
    """
    with db.session() as s:
        s.execute(update(Mailbox).where(Mailbox.id == mailbox)
                  .values(uidvalidity=uidvalidity, last_uid=0))
    return Cursor(mailbox_id=mailbox, uidvalidity=uidvalidity, last_uid=0)


def has_older_generation(db: Database, mailbox: int, uidvalidity: int) -> bool:
    """True when rows of another UIDVALIDITY exist in this mailbox (a rescan must dedupe)."""
    with db.session() as s:
        return bool(s.scalar(select(exists().where(
            Message.mailbox_id == mailbox, Message.uidvalidity != uidvalidity))))


def store_batch(db: Database, mailbox: int, uidvalidity: int,
                batch: Sequence[FetchedMessage], *, last_uid: int,
                dedupe_older: bool = False) -> BatchResult:
    """Store a batch and advance the cursor to ``last_uid``, in one transaction.

    ``dedupe_older``: match against rows of an older UIDVALIDITY first (after a reset).
    Raises :class:`StaleCursor` when the stored UIDVALIDITY is no longer ``uidvalidity``.
    """
    with db.session() as s:
        q = select(Mailbox.uidvalidity).where(Mailbox.id == mailbox)
        if db.dialect == "postgresql":
            q = q.with_for_update()   # serialise ingesters of this folder on PostgreSQL
        current = s.scalar(q)
        if current is not None and current != uidvalidity:
            raise StaleCursor(f"mailbox {mailbox}: UIDVALIDITY is {current}, not {uidvalidity}")
        uids = [m.uid for m in batch]
        already = set(s.scalars(select(Message.uid).where(
            Message.mailbox_id == mailbox, Message.uidvalidity == uidvalidity,
            Message.uid.in_(uids)))) if uids else set()
        todo = [m for m in batch if m.uid not in already]
        remapped = 0
        if dedupe_older and todo:
            todo, remapped = _remap_older(s, mailbox, uidvalidity, todo)
        if todo:
            rows = [_row(mailbox, uidvalidity, m) for m in todo]
            ins = (postgresql.insert(Message) if db.dialect == "postgresql"
                   else sqlite.insert(Message))
            s.execute(ins.on_conflict_do_nothing(
                index_elements=["mailbox_id", "uidvalidity", "uid"]), rows)
        s.execute(update(Mailbox).where(Mailbox.id == mailbox).values(
            uidvalidity=uidvalidity, last_sync_at=utcnow(),
            last_uid=func.max(Mailbox.last_uid, last_uid) if db.dialect == "sqlite"
            else func.greatest(Mailbox.last_uid, last_uid)))
    return BatchResult(stored=len(todo), remapped=remapped, skipped=len(already))


def touch(db: Database, mailbox: int) -> None:
    """Record a pass that found nothing new (shown as the folder's last sync)."""
    with db.session() as s:
        s.execute(update(Mailbox).where(Mailbox.id == mailbox).values(last_sync_at=utcnow()))


def _remap_older(s, mailbox: int, uidvalidity: int,
                 todo: list[FetchedMessage]) -> tuple[list[FetchedMessage], int]:
    hashes = {m.content_hash for m in todo}
    mids = {m.email.message_id for m in todo if m.email.message_id}
    older = s.execute(select(Message.id, Message.content_hash, Message.message_id).where(
        Message.mailbox_id == mailbox, Message.uidvalidity != uidvalidity,
        or_(Message.content_hash.in_(hashes),
            Message.message_id.in_([_clip(m) for m in mids])))).all()
    by_hash: dict[str, list[int]] = {}
    by_mid: dict[str, list[int]] = {}
    for rid, h, mid in older:
        by_hash.setdefault(h, []).append(rid)
        if mid:
            by_mid.setdefault(mid, []).append(rid)
    used: set[int] = set()
    keep: list[FetchedMessage] = []
    for m in todo:
        candidates = by_hash.get(m.content_hash, []) + by_mid.get(
            _clip(m.email.message_id) if m.email.message_id else "", [])
        rid = next((r for r in candidates if r not in used), None)
        if rid is None:
            keep.append(m)
            continue
        used.add(rid)
        s.execute(update(Message).where(Message.id == rid).values(
            uidvalidity=uidvalidity, uid=m.uid, flags=list(m.flags)))
    return keep, len(used)


def _clip(s: str | None, n: int = MAX_MESSAGE_ID) -> str | None:
    return None if s is None else s[:n]


def _clean(s: str | None) -> str | None:
    """Text PostgreSQL accepts: no NUL, no lone surrogates."""
    if s is None:
        return None
    s = s.replace("\x00", "")
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def _aware(dt: datetime | None) -> datetime | None:
    """In UTC: SQLite keeps a timestamp's wall clock and drops its offset, so a Date header
    of 06:12 -0800 must be stored as 14:12 UTC, not read back as 06:12 UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _row(mailbox: int, uidvalidity: int, m: FetchedMessage) -> dict[str, Any]:
    e = m.email
    now = utcnow()
    return {
        "mailbox_id": mailbox, "uidvalidity": uidvalidity, "uid": m.uid,
        "external_id": None, "message_id": _clean(_clip(e.message_id)),
        "content_hash": m.content_hash, "raw": m.raw,
        "internal_date": _aware(m.internal_date), "flags": [_clean(f) for f in m.flags],
        "subject": _clean(e.subject) or "", "from_addr": _clean(e.from_addr) or "",
        "to_addrs": [_clean(a) for a in e.to_addrs], "sent_at": _aware(e.date),
        "reply_to": [_clean(a) for a in e.reply_to],
        "in_reply_to": _clean(e.in_reply_to), "references": [_clean(r) for r in e.references],
        "body_text": _clean(e.text) or "", "new_text": _clean(e.new_text) or "",
        "body_html": _clean(e.html),
        "attachments": [{k: _clean(v) if isinstance(v, str) else v for k, v in asdict(a).items()}
                        for a in e.attachments],
        "parse_error": _clean(e.parse_error), "state": "pending", "attempts": 0,
        "created_at": now,
    }


def mailbox_status(db: Database) -> list[dict[str, Any]]:
    """Per watched folder: cursor, UIDVALIDITY, last sync and stored count (for status)."""
    with db.session() as s:
        counts = dict(s.execute(select(Message.mailbox_id, func.count())
                                .group_by(Message.mailbox_id)).all())
        rows = s.execute(select(Mailbox, Account.name).join(Account)
                         .order_by(Account.name, Mailbox.name)).all()
    return [{"account": acc, "folder": mb.name, "uidvalidity": mb.uidvalidity,
             "last_uid": mb.last_uid, "last_sync_at": mb.last_sync_at,
             "messages": counts.get(mb.id, 0)} for mb, acc in rows]
