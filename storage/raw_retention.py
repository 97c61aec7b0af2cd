"""How long the raw bytes of each email are kept (``scheduler.keep_raw_days``).

Ingest stores every email's raw RFC 822 bytes, attachments included, next to its parsed
fields. After triage nothing reads them: training, review, reports and the mailbox actions
use the parsed subject, text and headers, the decision and the model calls. For an inbox
that gets screenshots and PDFs the raw bytes are most of the database, and a daemon that
runs for months would grow it without bound. So, for emails that are done (``acted``) and
were ingested more than ``keep_raw_days`` ago, the raw bytes are deleted; the row, its
parsed text, decision, drafts and model calls stay. Emails that failed to parse keep
their bytes (they are the only copy worth a second look), and so does mail still in the
queue. The mail itself stays in the mailbox.

It runs with the nightly scheduler job (the leader's, before the retrain check) and by hand
(``understudy db prune-raw``). Updates go in chunks, so a running daemon is never locked
out for long. On SQLite the freed pages are reused by new rows; ``VACUUM`` shrinks the file.

>>> result = prune_raw(db, older_than_days=90, dry_run=True)   # doctest: +SKIP
>>> result.messages, result.bytes
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, update

from storage.db import Database
from storage.models import Message

CHUNK = 500


@dataclass
class RawPruneResult:
    messages: int          # emails whose raw bytes were (or, dry run, would be) deleted
    bytes: int             # their size
    cutoff: datetime       # ingested before this
    dry_run: bool

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cutoff"] = self.cutoff.isoformat()
        return d


def _prunable(cutoff: datetime):
    return ((Message.state == "acted") & Message.raw.is_not(None)
            & Message.parse_error.is_(None) & (Message.created_at < cutoff))


def prune_raw(db: Database, *, older_than_days: float, dry_run: bool = False,
              now: datetime | None = None) -> RawPruneResult:
    """Delete the raw bytes of acted emails ingested more than ``older_than_days`` ago."""
    if older_than_days <= 0:
        raise ValueError("older_than_days must be positive")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=older_than_days)
    where = _prunable(cutoff)
    if dry_run:
        with db.session() as s:
            n, size = s.execute(select(func.count(), func.coalesce(
                func.sum(func.length(Message.raw)), 0)).where(where)).one()
        return RawPruneResult(int(n), int(size), cutoff, True)
    total_n = total_bytes = 0
    last_id = 0
    while True:
        with db.session() as s:
            # Locked (PostgreSQL) until the update: the counts are what was deleted.
            rows = s.execute(select(Message.id, func.length(Message.raw))
                             .where(where, Message.id > last_id)
                             .order_by(Message.id).limit(CHUNK).with_for_update()).all()
            if not rows:
                break
            ids = [r[0] for r in rows]
            s.execute(update(Message).where(Message.id.in_(ids)).values(raw=None))
            total_n += len(rows)
            total_bytes += sum(int(r[1] or 0) for r in rows)
            last_id = ids[-1]
    return RawPruneResult(total_n, total_bytes, cutoff, False)
