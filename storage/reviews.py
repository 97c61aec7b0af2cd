"""The review queue: escalated drafts awaiting a human, and the writes a review makes.

The queue holds every draft in status ``pending_review`` (the daemon gives that status
only to drafts of escalated emails, i.e. teacher decisions), plus drafts a reviewer
approved whose delivery to the mailbox has not succeeded yet, so a failed APPEND is
visible and can be retried instead of silently lost. Newest email first.

>>> from storage.reviews import list_queue
>>> list_queue(db, account="support", category="billing", max_age=timedelta(days=2))  # doctest: +SKIP
[QueueEntry(draft_id=7, subject='Refund?', ...)]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Account, DecisionRow, DraftRow, Mailbox, Message, Review, utcnow
from storage.types import Email

PENDING = "pending_review"
APPROVED = "approved"
REJECTED = "rejected"


@dataclass(frozen=True)
class QueueEntry:
    """One line of the queue."""

    draft_id: int
    message_db_id: int
    account: str | None
    subject: str
    from_addr: str
    received_at: datetime | None
    category: str | None
    priority: str | None
    decided_by: str | None          # student | teacher | human
    status: str                     # pending_review, or approved but not yet delivered


@dataclass(frozen=True)
class DecisionView:
    source: str
    category: str
    priority: str
    needs_reply: bool
    confidence: dict[str, float]
    rationale: str | None
    model_version: str | None
    escalated: bool


@dataclass(frozen=True)
class ReviewRecord:
    action: str
    reviewer: str
    category: str | None
    priority: str | None
    needs_reply: bool | None
    final_draft: str | None
    reason: str | None
    created_at: datetime


@dataclass(frozen=True)
class ReviewItem:
    """Everything the reviewer sees for one draft."""

    draft_id: int
    status: str
    draft: str
    final_draft: str | None
    draft_source: str
    draft_confidence: float | None
    draft_message_id: str | None
    appended_folder: str | None
    appended_uid: int | None
    appended_at: datetime | None
    email: Email
    decision: DecisionView | None
    reviews: tuple[ReviewRecord, ...]

    @property
    def delivered(self) -> bool:
        return self.appended_at is not None

    @property
    def awaiting_review(self) -> bool:
        return self.status == PENDING or (self.status == APPROVED and not self.delivered)


def _received():
    return func.coalesce(Message.internal_date, Message.sent_at, Message.created_at)


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC.
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def _queue_select(what, *, account: str | None, category: str | None,
                  min_age: timedelta | None, max_age: timedelta | None, include_done: bool,
                  now: datetime | None):
    now = now or datetime.now(timezone.utc)
    q = (select(*what)
         .select_from(DraftRow)
         .join(Message, Message.id == DraftRow.message_id)
         .outerjoin(DecisionRow, DecisionRow.message_id == Message.id)
         .outerjoin(Mailbox, Mailbox.id == Message.mailbox_id)
         .outerjoin(Account, Account.id == Mailbox.account_id))
    if not include_done:
        q = q.where(or_(DraftRow.status == PENDING,
                        and_(DraftRow.status == APPROVED, DraftRow.appended_at.is_(None))))
    else:
        q = q.where(DraftRow.status.in_([PENDING, APPROVED, REJECTED]))
    if account is not None:
        q = q.where(Account.name == account)
    if category is not None:
        q = q.where(DecisionRow.category == category)
    if min_age is not None:
        q = q.where(_received() <= now - min_age)
    if max_age is not None:
        q = q.where(_received() >= now - max_age)
    return q


def list_queue(db: Database, *, account: str | None = None, category: str | None = None,
               min_age: timedelta | None = None, max_age: timedelta | None = None,
               limit: int = 200, include_done: bool = False,
               now: datetime | None = None) -> list[QueueEntry]:
    """Drafts awaiting review, newest email first.

    ``min_age``/``max_age`` bound how long ago the email arrived (``max_age=1 day``: only
    mail from the last day). ``include_done`` also lists approved and rejected drafts.
    """
    q = _queue_select((DraftRow, Message, DecisionRow, Account.name), account=account,
                      category=category, min_age=min_age, max_age=max_age,
                      include_done=include_done, now=now)
    q = q.order_by(_received().desc(), DraftRow.id.desc()).limit(limit)
    with db.session() as s:
        rows = s.execute(q).all()
    return [QueueEntry(
        draft_id=d.id, message_db_id=m.id, account=acct, subject=m.subject or "",
        from_addr=m.from_addr or "",
        received_at=_aware(m.internal_date or m.sent_at or m.created_at),
        category=dec.category if dec else None, priority=dec.priority if dec else None,
        decided_by=dec.source if dec else None, status=d.status,
    ) for d, m, dec, acct in rows]


def count_queue(db: Database, *, account: str | None = None, category: str | None = None,
                min_age: timedelta | None = None, max_age: timedelta | None = None,
                include_done: bool = False, now: datetime | None = None) -> int:
    """How many drafts :func:`list_queue` would return with the same filters and no limit."""
    q = _queue_select((func.count(DraftRow.id),), account=account, category=category,
                      min_age=min_age, max_age=max_age, include_done=include_done, now=now)
    with db.session() as s:
        return int(s.scalar(q) or 0)


def email_from_row(m: Message, account: str | None, folder: str | None) -> Email:
    """The boundary ``Email`` for a stored message (no re-parse of the raw bytes)."""
    return Email(
        id=str(m.id), subject=m.subject or "", text=m.body_text or "",
        new_text=m.new_text or "", from_addr=m.from_addr or "",
        to_addrs=tuple(m.to_addrs or ()), reply_to=tuple(m.reply_to or ()),
        message_id=m.message_id, in_reply_to=m.in_reply_to,
        references=tuple(m.references or ()),
        date=_aware(m.sent_at or m.internal_date), html=m.body_html, account=account,
        folder=folder, uid=m.uid, parse_error=m.parse_error, db_id=m.id,
    )


def get_item(db: Database, draft_id: int) -> ReviewItem | None:
    """One draft with its email, decision and past reviews; None if there is no such draft."""
    with db.session() as s:
        d = s.get(DraftRow, draft_id)
        if d is None:
            return None
        m = s.get(Message, d.message_id)
        mbox = s.get(Mailbox, m.mailbox_id) if m.mailbox_id else None
        acct = s.get(Account, mbox.account_id).name if mbox else None
        dec = s.scalars(select(DecisionRow).where(DecisionRow.message_id == m.id)).first()
        revs = s.scalars(select(Review).where(Review.draft_id == d.id)
                         .order_by(Review.id)).all()
        return ReviewItem(
            draft_id=d.id, status=d.status, draft=d.body, final_draft=d.final_body,
            draft_source=d.source, draft_confidence=d.confidence,
            draft_message_id=d.draft_message_id, appended_folder=d.appended_folder,
            appended_uid=d.appended_uid, appended_at=_aware(d.appended_at),
            email=email_from_row(m, acct, mbox.name if mbox else None),
            decision=None if dec is None else DecisionView(
                source=dec.source, category=dec.category, priority=dec.priority,
                needs_reply=dec.needs_reply, confidence=dict(dec.confidence or {}),
                rationale=dec.rationale, model_version=dec.model_version,
                escalated=dec.escalated),
            reviews=tuple(ReviewRecord(
                action=r.action, reviewer=r.reviewer, category=r.category,
                priority=r.priority, needs_reply=r.needs_reply, final_draft=r.final_draft,
                reason=r.reason, created_at=_aware(r.created_at)) for r in revs),
        )


def claim_for_review(s: Session, draft_id: int, *, new_status: str,
                     final_body: str | None, draft_message_id: str | None) -> bool:
    """Move a pending draft to ``new_status`` in one conditional UPDATE.

    Returns False when the draft was not pending: two reviewers (or a double-click)
    racing on one draft cannot both win, on SQLite or PostgreSQL, without locks.
    """
    values: dict[str, Any] = {"status": new_status, "final_body": final_body,
                              "updated_at": utcnow()}
    if draft_message_id is not None:
        values["draft_message_id"] = func.coalesce(DraftRow.draft_message_id,
                                                    draft_message_id)
    res = s.execute(update(DraftRow)
                    .where(DraftRow.id == draft_id, DraftRow.status == PENDING)
                    .values(**values))
    return res.rowcount == 1


def add_review(s: Session, *, message_db_id: int, draft_id: int | None, action: str,
               reviewer: str, category: str | None, priority: str | None, needs_reply: bool | None,
               final_draft: str | None, reason: str | None, is_gold: bool = True) -> int:
    """Insert one reviews row (a gold label when ``is_gold``); returns its id."""
    r = Review(message_id=message_db_id, draft_id=draft_id, action=action, reviewer=reviewer,
               category=category, priority=priority, needs_reply=needs_reply,
               final_draft=final_draft, reason=reason, is_gold=is_gold)
    s.add(r)
    s.flush()
    return r.id


# How long an approval's delivery belongs to the process that claimed it: an IMAP APPEND
# or an SMTP send takes seconds; a process that died mid-delivery frees it after this.
DELIVERY_HOLD_S = 120.0


def claim_delivery(db: Database, draft_id: int, *, hold_s: float = DELIVERY_HOLD_S) -> bool:
    """Take the delivery of an approved, undelivered draft, in one conditional UPDATE.

    Approving sets ``updated_at``: the approver holds the delivery for ``hold_s``. Anyone
    else (a second reviewer, the CLI beside the web app, another ``serve``) gets False
    until the holder delivered, released it (a failure) or ran past ``hold_s`` (it died).
    Without it, two processes could both find no draft in Drafts and both APPEND one.
    """
    now = utcnow()
    with db.session() as s:
        return s.execute(update(DraftRow).where(
            DraftRow.id == draft_id, DraftRow.status == APPROVED,
            DraftRow.appended_at.is_(None),
            DraftRow.updated_at < now - timedelta(seconds=hold_s))
            .values(updated_at=now)).rowcount == 1


def release_delivery(db: Database, draft_id: int, *, hold_s: float = DELIVERY_HOLD_S) -> None:
    """A delivery failed: the next approve may retry at once."""
    with db.session() as s:
        s.execute(update(DraftRow).where(DraftRow.id == draft_id,
                                         DraftRow.appended_at.is_(None))
                  .values(updated_at=utcnow() - timedelta(seconds=2 * hold_s)))


def record_delivery(db: Database, draft_id: int, *, folder: str | None,
                    uidvalidity: int | None, uid: int | None,
                    message_id: str | None) -> None:
    """Remember where the approved draft landed; the queue then drops it."""
    with db.session() as s:
        values: dict[str, Any] = {"appended_folder": folder, "appended_uidvalidity": uidvalidity,
                                  "appended_uid": uid, "appended_at": utcnow(),
                                  "updated_at": utcnow()}
        if message_id:
            values["draft_message_id"] = message_id
        s.execute(update(DraftRow).where(DraftRow.id == draft_id).values(**values))


def gold_labels(db: Database, *, since: datetime | None = None) -> list[dict[str, Any]]:
    """The human labels, newest review per message, as interchange-format-like dicts.

    ``{"id", "message_db_id", "category", "priority", "needs_reply", "draft", "action",
    "reviewed_at"}``; a rejected draft has ``draft`` None.
    """
    q = select(Review, Message.message_id).join(Message, Message.id == Review.message_id) \
        .where(Review.is_gold.is_(True)).order_by(Review.id)
    if since is not None:
        q = q.where(Review.created_at >= since)
    latest: dict[int, dict[str, Any]] = {}
    with db.session() as s:
        for r, mid in s.execute(q).all():
            latest[r.message_id] = {
                "id": mid or str(r.message_id), "message_db_id": r.message_id,
                "category": r.category, "priority": r.priority, "needs_reply": r.needs_reply,
                "draft": r.final_draft, "action": r.action,
                "reviewed_at": _aware(r.created_at)}
    return list(latest.values())


def queue_counts(db: Database) -> dict[str, int]:
    """How many drafts wait for review and how many approvals await delivery."""
    with db.session() as s:
        pending = s.scalar(select(func.count()).where(DraftRow.status == PENDING)) or 0
        undelivered = s.scalar(select(func.count()).where(
            DraftRow.status == APPROVED, DraftRow.appended_at.is_(None))) or 0
    return {"pending_review": int(pending), "approved_undelivered": int(undelivered)}
