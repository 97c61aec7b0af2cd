"""Folder leases: one IDLE watcher per folder across every daemon sharing the database.

A lease is ``(lease_owner, lease_expires_at)`` on the mailboxes row. A daemon takes or renews
it with :func:`acquire_lease` (a single conditional UPDATE, so two daemons can never both
win) and watches the folder only while it holds it; a dead daemon's lease expires after
its TTL and another takes the folder over.

>>> mb = mailbox_id(db, "support", "INBOX")                   # doctest: +SKIP
>>> acquire_lease(db, mb, "host:123", ttl_s=60)               # doctest: +SKIP
True
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.models import Account, Mailbox


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=timezone.utc) if ts is not None and ts.tzinfo is None else ts


def mailbox_id(db: Database, account: str, folder: str) -> int:
    """The mailboxes row id for (account, folder), created when ingest has not yet."""
    for _ in range(3):
        with db.session() as s:
            got = s.scalar(select(Mailbox.id).join(Account).where(
                Account.name == account, Mailbox.name == folder))
            if got is not None:
                return got
        try:
            with db.session() as s:
                acc = s.scalar(select(Account).where(Account.name == account))
                if acc is None:
                    acc = Account(name=account)
                    s.add(acc)
                    s.flush()
                mb = Mailbox(account_id=acc.id, name=folder)
                s.add(mb)
                s.flush()
                return mb.id
        except IntegrityError:
            continue   # another process created it first: read it back
    raise RuntimeError(f"could not create the mailbox row for {account}/{folder}")


def acquire_lease(db: Database, mailbox: int, owner: str, ttl_s: float,
                  now: datetime | None = None) -> bool:
    """Take or renew the watcher lease of a folder; True when ``owner`` holds it now."""
    now = now or _now()
    with db.session() as s:
        n = s.execute(update(Mailbox).where(
            Mailbox.id == mailbox,
            or_(Mailbox.lease_owner.is_(None), Mailbox.lease_owner == owner,
                Mailbox.lease_expires_at.is_(None), Mailbox.lease_expires_at < now))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s))).rowcount
    return n == 1


def release_lease(db: Database, mailbox: int, owner: str) -> None:
    with db.session() as s:
        s.execute(update(Mailbox).where(Mailbox.id == mailbox, Mailbox.lease_owner == owner)
                  .values(lease_owner=None, lease_expires_at=None))


def lease_holder(db: Database, mailbox: int) -> tuple[str | None, datetime | None]:
    with db.session() as s:
        row = s.execute(select(Mailbox.lease_owner, Mailbox.lease_expires_at)
                        .where(Mailbox.id == mailbox)).one()
    return row[0], _aware(row[1])
