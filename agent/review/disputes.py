"""Settle audit disagreements: a person says which category an audited email belongs to.

The worker audits a sample of the mail the student handled alone (agent.audit); where the
teacher chose another category, the disagreement counts against the student's promise.
Often the teacher is the one that is wrong, or the email fits both. A settled dispute is a
gold label (a ``reviews`` row, action ``settle``, no draft): the next retrain learns it
with ``student.gold_weight``, it overrides the teacher's label, and ``understudy status``
counts whom the settled disputes proved right. The decision already taken stands; when the
settled category differs from it, the message's category keyword is corrected (best
effort, as a review correction is).

>>> settle(db, 412, category="billing", reviewer="ann", categories=["billing", "account"])
... # doctest: +SKIP
Settled(message_db_id=412, category='billing', proved_right='student_right', changed=True)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from sqlalchemy import select

from agent.logs import get_logger
from agent.review.errors import InvalidCorrection, ReviewError
from storage.audits import SETTLE, Dispute, list_disputes
from storage.db import Database
from storage.reviews import add_review, email_from_row


# How a settled dispute reads, by whom it proved right (Dispute.proved_right).
PROVED = {"student_right": "the student was right", "teacher_right": "the teacher was right",
          "neither": "neither was right"}


class DisputeNotFound(ReviewError):
    """The email has no audit disagreement to settle."""


@dataclass(frozen=True)
class Settled:
    message_db_id: int
    category: str
    student_category: str | None
    teacher_category: str | None
    proved_right: str            # student_right | teacher_right | neither
    changed: bool                # False: it was already settled with this category


def find(db: Database, message_db_id: int) -> Dispute:
    """The dispute of one email (settled or not)."""
    found = list_disputes(db, include_settled=True, limit=1, message_db_id=message_db_id)
    if not found:
        raise DisputeNotFound(f"email {message_db_id} has no audit disagreement; "
                              "`understudy review disputes` lists the ones to settle")
    return found[0]


def settle(db: Database, message_db_id: int, *, category: str, reviewer: str,
           categories: Sequence[str], priority: str | None = None,
           needs_reply: bool | None = None, priorities: Sequence[str] = (),
           relabel_for: Callable[[str | None], object] | None = None) -> Settled:
    """Record ``category`` (and optionally priority and needs-reply) as the gold label of
    a disputed email. Either side's category is accepted even if the taxonomy changed."""
    dispute = find(db, message_db_id)
    allowed = set(categories) | {dispute.student_category, dispute.teacher_category}
    if category not in allowed:
        raise InvalidCorrection(f"unknown category {category!r}; choose one of: "
                                + ", ".join(categories))
    if priority is not None and priorities and priority not in priorities:
        raise InvalidCorrection(f"unknown priority {priority!r}; choose one of: "
                                + ", ".join(priorities))
    log = get_logger(component="review", message_db_id=message_db_id, reviewer=reviewer)
    changed = not (dispute.settled == category and priority is None and needs_reply is None)
    if changed:
        with db.session() as s:
            add_review(s, message_db_id=message_db_id, draft_id=None, action=SETTLE,
                       reviewer=reviewer, category=category, priority=priority,
                       needs_reply=needs_reply, final_draft=None, reason=None)
        log.info("review.settled", category=category, student=dispute.student_category,
                 teacher=dispute.teacher_category)
        _relabel(db, message_db_id, category, priority, relabel_for, log)
    return Settled(message_db_id=message_db_id, category=category,
                   student_category=dispute.student_category,
                   teacher_category=dispute.teacher_category,
                   proved_right=replace(dispute, settled=category).proved_right,
                   changed=changed)


def _relabel(db: Database, message_db_id: int, category: str, priority: str | None,
             relabel_for, log) -> None:
    """Correct the category keyword where the decision's differs; never fails the settle."""
    from storage.models import Account, DecisionRow, Mailbox, Message

    if relabel_for is None:
        return
    try:
        with db.session() as s:
            m = s.get(Message, message_db_id)
            dec = s.scalars(select(DecisionRow).where(
                DecisionRow.message_id == message_db_id)).first()
            if m is None or dec is None or (category, priority or dec.priority) == (
                    dec.category, dec.priority):
                return
            mbox = s.get(Mailbox, m.mailbox_id) if m.mailbox_id else None
            account = s.get(Account, mbox.account_id).name if mbox else None
            email = email_from_row(m, account, mbox.name if mbox else None)
            new_priority = priority or dec.priority
        relabel = relabel_for(account)
        if relabel is not None:
            relabel(email, category, new_priority)
            log.info("review.relabelled", category=category, priority=new_priority)
    except Exception as e:  # noqa: BLE001 - the gold label is what matters
        log.warning("review.relabel_failed", error=f"{e.__class__.__name__}: {e}")
