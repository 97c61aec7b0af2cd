"""Backfill: label stored emails that have no teacher answer yet (``teacher label``).

Every result becomes a model_calls row (purpose ``label``, not escalated: no decision is
made here; decisions and mailbox actions stay with the daemon). A Message Batches run is
remembered in the ``kv`` table from submission until its results are recorded, so an
interrupted ``teacher label --batch`` never pays twice: the next run collects the batch
first and does not resubmit its emails.

>>> report = backfill(teacher, db, limit=100, batch=False)          # doctest: +SKIP
>>> report.labelled, report.failed, report.cost_usd                 # doctest: +SKIP
(98, 2, 0.41)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import structlog
from sqlalchemy import select

from agent.teacher.errors import TeacherUnavailable
from storage.calls import record_teacher_result
from storage.models import KeyValue, Message
from storage.records import unlabelled_emails
from storage.reviews import email_from_row
from storage.types import TeacherResult

log = structlog.get_logger(__name__)
BATCH_KEY = "teacher.batch."


@dataclass
class BackfillReport:
    requested: int = 0
    labelled: int = 0
    failed: int = 0
    cost_usd: float = 0.0
    collected_batches: list[str] = field(default_factory=list)
    pending_batches: list[str] = field(default_factory=list)
    stopped: str | None = None

    def add(self, results: list[TeacherResult]) -> None:
        self.labelled += sum(r.ok for r in results)
        self.failed += sum(not r.ok for r in results)
        self.cost_usd += sum(r.cost_usd for r in results)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "labelled": self.labelled, "failed": self.failed,
                "not_attempted": max(0, self.requested - self.labelled - self.failed),
                "cost_usd": round(self.cost_usd, 6), "stopped": self.stopped,
                "collected_batches": self.collected_batches,
                "pending_batches": self.pending_batches}


def _record(db, results: list[TeacherResult], done_key: str | None = None) -> None:
    with db.session() as s:
        for r in results:
            record_teacher_result(s, r, message_id=int(r.email_id), purpose="label",
                                  escalated=False)
        if done_key is not None:
            row = s.get(KeyValue, done_key)
            if row is not None:
                s.delete(row)


def _pending_batches(db) -> dict[str, list[int]]:
    with db.session() as s:
        rows = s.scalars(select(KeyValue).where(KeyValue.key.like(BATCH_KEY + "%"))).all()
        return {r.key[len(BATCH_KEY):]: list(r.value.get("message_ids", [])) for r in rows}


def _remember(db, batch_id: str, ids: list[int]) -> None:
    with db.session() as s:
        s.add(KeyValue(key=BATCH_KEY + batch_id, value={
            "message_ids": ids, "submitted_at": datetime.now(timezone.utc).isoformat()}))


def _emails(db, ids: list[int]) -> list:
    with db.session() as s:
        rows = {m.id: m for m in s.scalars(select(Message).where(Message.id.in_(ids)))}
    return [email_from_row(rows[i], None, None) for i in ids if i in rows]


def collect_pending(teacher, db, report: BackfillReport) -> set[int]:
    """Record the results of earlier batches that have ended; ids still in flight."""
    in_flight: set[int] = set()
    for batch_id, ids in _pending_batches(db).items():
        status = teacher.client.messages.batches.retrieve(batch_id).processing_status
        if status != "ended":
            report.pending_batches.append(batch_id)
            in_flight.update(ids)
            continue
        results = teacher.collect_batch(batch_id, _emails(db, ids))
        _record(db, results, BATCH_KEY + batch_id)
        report.add(results)
        report.collected_batches.append(batch_id)
        log.info("collected an earlier batch", batch_id=batch_id, results=len(results))
    return in_flight


def backfill(teacher, db, *, limit: int, batch: bool = False, poll_interval_s: float = 30.0,
             max_wait_s: float = 24 * 3600.0) -> BackfillReport:
    """Label up to ``limit`` unlabelled emails; see the module docstring."""
    report = BackfillReport()
    in_flight = collect_pending(teacher, db, report) if batch else set()
    emails = [e for e in unlabelled_emails(db, limit + len(in_flight))
              if e.db_id not in in_flight][:limit]
    report.requested = len(emails)
    if not emails:
        return report
    key: list[str] = []

    def submitted(batch_id: str) -> None:
        key.append(BATCH_KEY + batch_id)
        _remember(db, batch_id, [e.db_id for e in emails])

    try:
        if batch:
            results = teacher.label_batch(emails, poll_interval_s=poll_interval_s,
                                          max_wait_s=max_wait_s, on_submitted=submitted)
        else:
            results = teacher.label(emails)
    except TeacherUnavailable as e:
        results, report.stopped = e.results, str(e)
    _record(db, results, key[0] if key and results else None)
    report.add(results)
    if key and not results:
        report.pending_batches.append(key[0][len(BATCH_KEY):])
    return report
