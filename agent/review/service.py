"""Approve, edit and reject: the review logic the CLI and the web app share.

Every action writes one ``reviews`` row holding the reviewer's final labels (category,
priority, needs-reply, and the final draft when there is one). Those rows are gold
labels: the next retrain reads them (``storage.reviews.gold_labels``) over the teacher's
answers with a higher loss weight (``student.gold_weight``). A corrected category or
priority is also put right on the original message's keywords (best effort).

Approving follows "commit, then act": the approval, the final text and a Message-ID for
the reply are committed first, then the draft is appended to the account's Drafts
folder (or sent, for accounts with ``send_enabled``), then the delivery is recorded. The
appender is idempotent on that Message-ID and the approval is a conditional UPDATE, so
approving twice, double-clicking, two reviewers racing or a crash between the steps
never produce a second draft; a failed delivery keeps the approval and leaves the item
in the queue, where approving again retries it.

>>> svc = ReviewService(db, categories=["billing", "other"], priorities=["normal"],
...                     appender_for=lambda account: actions[account].append_draft)  # doctest: +SKIP
>>> svc.approve(7, reviewer="ana", category="billing")                                 # doctest: +SKIP
ReviewOutcome(draft_id=7, action='approve', status='approved', delivered=True, ...)
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Protocol, Sequence

from agent.logs import get_logger
from agent.review.errors import (
    AlreadyReviewed,
    DeliveryFailed,
    DraftNotFound,
    InvalidCorrection,
)
from storage.db import Database
from storage.reviews import (
    APPROVED,
    PENDING,
    REJECTED,
    ReviewItem,
    add_review,
    claim_delivery,
    claim_for_review,
    get_item,
    record_delivery,
    release_delivery,
)
from storage.types import Email


class Appender(Protocol):
    """What ``agent.mail.actions.MailboxActions.append_draft`` looks like to this module.

    Returns an object with ``folder``, ``uidvalidity``, ``uid`` and ``message_id``
    (``AppendResult``); must never create a second draft for the same Message-ID.
    """

    def __call__(self, original: Email, body: str, *, draft_message_id: str) -> Any:
        ...


class Relabeler(Protocol):
    """``MailboxActions.set_keywords``: make the message carry these labels' keywords."""

    def __call__(self, email: Email, category: str, priority: str) -> Any:
        ...


@dataclass(frozen=True)
class ReviewOutcome:
    draft_id: int
    action: str                  # approve | edit | reject
    status: str                  # approved | rejected
    changed: bool                # False: it had been done before, nothing new happened
    delivered: bool
    folder: str | None = None
    uid: int | None = None
    draft_message_id: str | None = None


@dataclass(frozen=True)
class Labels:
    category: str
    priority: str
    needs_reply: bool


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.I)
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


MAX_AGE = timedelta(days=100 * 365)
# Draft ids are database integers: a larger number names no draft (and must not reach
# the database, where SQLite cannot bind it).
MAX_ID = 2 ** 63 - 1


def parse_age(text: str) -> timedelta:
    """``"90m"``, ``"12h"``, ``"2d"``, ``"1w"`` -> timedelta.

    >>> parse_age("36h")
    datetime.timedelta(days=1, seconds=43200)
    """
    m = _AGE.match(text or "")
    if not m:
        raise ValueError(f"age {text!r} is not a number with a unit m, h, d or w (e.g. 2d)")
    try:
        age = timedelta(**{_AGE_UNITS[m.group(2).lower()]: float(m.group(1))})
    except OverflowError:
        age = MAX_AGE + MAX_AGE
    if age > MAX_AGE:
        raise ValueError(f"age {text!r} is more than {MAX_AGE.days // 365} years; "
                         "leave it out to see every age")
    return age


def normalize_body(text: str) -> str:
    # Browsers submit textareas with CRLF line ends; drafts are stored with LF.
    return text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")


class ReviewService:
    """Approve / edit / reject escalated drafts (flat arguments; see ``build_review_service``)."""

    def __init__(self, db: Database, *, categories: Sequence[str], priorities: Sequence[str],
                 appender_for: Callable[[str | None], Appender],
                 relabel_for: Callable[[str | None], Relabeler | None] | None = None):
        self.db = db
        self.categories = list(categories)
        self.priorities = list(priorities)
        self._appender_for = appender_for
        self._relabel_for = relabel_for

    # -- public calls -----------------------------------------------------------------

    def item(self, draft_id: int) -> ReviewItem:
        item = get_item(self.db, draft_id) if 0 < draft_id <= MAX_ID else None
        if item is None:
            raise DraftNotFound(f"no draft with id {draft_id}; `understudy review list` "
                                "shows the ids waiting for review")
        return item

    def approve(self, draft_id: int, *, reviewer: str, final_body: str | None = None,
                category: str | None = None, priority: str | None = None,
                needs_reply: bool | None = None) -> ReviewOutcome:
        """Approve the draft (``final_body`` replaces its text: an edit) and deliver it."""
        item = self.item(draft_id)
        log = get_logger(draft_id=draft_id, message_db_id=item.email.db_id,
                         account=item.email.account, reviewer=reviewer)
        if item.status == APPROVED and item.delivered:
            self._same_as_approved(item, final_body, category, priority, needs_reply)
            log.info("review.approve.already_done", uid=item.appended_uid)
            return self._outcome(item, changed=False)
        if item.status not in (PENDING, APPROVED):
            raise AlreadyReviewed(f"draft {draft_id} is {item.status}; it cannot be approved "
                                  "now")
        changed = False
        if item.status == PENDING:
            body = normalize_body(final_body if final_body is not None else item.draft)
            if not body.strip():
                raise InvalidCorrection("the final draft is empty; reject the draft instead")
            labels = self._labels(item, category, priority, needs_reply)
            action = "approve" if body == normalize_body(item.draft) else "edit"
            with self.db.session() as s:
                changed = claim_for_review(s, draft_id, new_status=APPROVED, final_body=body,
                                           draft_message_id=_new_message_id(item.email))
                if changed:
                    add_review(s, message_db_id=item.email.db_id, draft_id=draft_id,
                               action=action, reviewer=reviewer, category=labels.category,
                               priority=labels.priority, needs_reply=labels.needs_reply,
                               final_draft=body, reason=None)
            log.info("review.approved", action=action, won=changed, **labels.__dict__)
            if changed:
                self._relabel(item, labels, log)
            item = self.item(draft_id)     # the committed text and Message-ID win races
            if item.status == REJECTED:
                raise AlreadyReviewed(f"draft {draft_id} was rejected meanwhile")
        if not changed:
            # Approved before (by someone else, or by this reviewer before a failed
            # delivery): its text and labels stand; different ones are refused, not dropped.
            self._same_as_approved(item, final_body, category, priority, needs_reply)
        if not item.delivered:
            # The approver holds the delivery for a while; anyone else waits for it, so two
            # processes never both APPEND (the Message-ID check alone is not atomic).
            if not changed and not claim_delivery(self.db, draft_id):
                item = self.item(draft_id)
                if item.delivered:
                    return self._outcome(item, changed=False)
                raise AlreadyReviewed(
                    f"draft {draft_id} was approved{_by(item)} and is being delivered now; "
                    "look again in a few seconds (up to 2 minutes if that delivery was cut "
                    "short)")
            try:
                item, created = self._deliver(item, log)
            except DeliveryFailed:
                release_delivery(self.db, draft_id)
                raise
            # A retried delivery that finally wrote the draft is a change too; one that
            # found the draft already there (crash after APPEND) is not.
            changed = changed or created
        return self._outcome(item, changed=changed)

    def _same_as_approved(self, item: ReviewItem, final_body: str | None,
                          category: str | None, priority: str | None,
                          needs_reply: bool | None) -> None:
        last = item.reviews[-1] if item.reviews else None
        approved = normalize_body(item.final_draft or item.draft)
        differs = []
        if final_body is not None and normalize_body(final_body) != approved:
            differs.append("text")
        if last is not None:
            for name, mine, theirs in (("category", category, last.category),
                                       ("priority", priority, last.priority),
                                       ("needs-reply", needs_reply, last.needs_reply)):
                if mine is not None and theirs is not None and mine != theirs:
                    differs.append(name)
        if differs:
            raise AlreadyReviewed(
                f"draft {item.draft_id} was already approved{_by(item)} with its own "
                f"{', '.join(differs)}; your changes were not applied (the approved version "
                "stands; approving it unchanged retries a failed delivery)")

    def edit(self, draft_id: int, body: str, *, reviewer: str, **labels: Any) -> ReviewOutcome:
        """Keep ``body`` as the final draft and approve it (recorded as an edit)."""
        return self.approve(draft_id, reviewer=reviewer, final_body=body, **labels)

    def reject(self, draft_id: int, *, reviewer: str, reason: str,
               category: str | None = None, priority: str | None = None,
               needs_reply: bool | None = None) -> ReviewOutcome:
        """Reject the draft with a reason; nothing is written to the mailbox."""
        reason = (reason or "").strip()
        if not reason:
            raise InvalidCorrection("a rejection needs a reason (it teaches the next student)")
        item = self.item(draft_id)
        if item.status == REJECTED:
            return self._outcome(item, changed=False)
        if item.status != PENDING:
            raise AlreadyReviewed(f"draft {draft_id} is {item.status}; it cannot be rejected")
        labels = self._labels(item, category, priority, needs_reply)
        with self.db.session() as s:
            won = claim_for_review(s, draft_id, new_status=REJECTED, final_body=None,
                                   draft_message_id=None)
            if won:
                add_review(s, message_db_id=item.email.db_id, draft_id=draft_id,
                           action="reject", reviewer=reviewer, category=labels.category,
                           priority=labels.priority, needs_reply=labels.needs_reply,
                           final_draft=None, reason=reason)
        log = get_logger(draft_id=draft_id, message_db_id=item.email.db_id,
                         account=item.email.account, reviewer=reviewer)
        log.info("review.rejected", won=won, **labels.__dict__)
        if won:
            self._relabel(item, labels, log)
        item = self.item(draft_id)
        if item.status != REJECTED:
            raise AlreadyReviewed(f"draft {draft_id} was {item.status} meanwhile")
        return self._outcome(item, changed=won)

    def settle(self, message_db_id: int, *, category: str, reviewer: str,
               priority: str | None = None, needs_reply: bool | None = None):
        """Settle an audit disagreement with a gold label (:mod:`agent.review.disputes`)."""
        from agent.review.disputes import settle

        return settle(self.db, message_db_id, category=category, reviewer=reviewer,
                      categories=self.categories, priorities=self.priorities,
                      priority=priority, needs_reply=needs_reply,
                      relabel_for=self._relabel_for)

    # -- helpers ----------------------------------------------------------------------

    def _labels(self, item: ReviewItem, category: str | None, priority: str | None,
                needs_reply: bool | None) -> Labels:
        dec = item.decision
        cat = category or (dec.category if dec else None)
        pri = priority or (dec.priority if dec else None)
        nr = needs_reply if needs_reply is not None else (dec.needs_reply if dec else True)
        # The decision's own label is accepted even if the taxonomy changed since.
        if cat is None or (cat not in self.categories and not (dec and cat == dec.category)):
            raise InvalidCorrection(f"unknown category {cat!r}; choose one of: "
                                    + ", ".join(self.categories))
        if pri is None or (pri not in self.priorities and not (dec and pri == dec.priority)):
            raise InvalidCorrection(f"unknown priority {pri!r}; choose one of: "
                                    + ", ".join(self.priorities))
        return Labels(category=cat, priority=pri, needs_reply=bool(nr))

    def _relabel(self, item: ReviewItem, labels: Labels, log: Any) -> None:
        """Correct the category/priority keywords on the original message, best effort.

        The gold label in SQL is what matters; the keywords are a convenience for mail
        clients, so a message that was moved or deleted meanwhile only logs a warning.
        """
        dec = item.decision
        if self._relabel_for is None or (
                dec is not None and (labels.category, labels.priority) == (dec.category,
                                                                            dec.priority)):
            return
        try:
            relabel = self._relabel_for(item.email.account)
            if relabel is not None:
                relabel(item.email, labels.category, labels.priority)
                log.info("review.relabelled", category=labels.category,
                         priority=labels.priority)
        except Exception as e:  # noqa: BLE001 - never fails the review itself
            log.warning("review.relabel_failed", error=f"{e.__class__.__name__}: {e}")

    def _deliver(self, item: ReviewItem, log: Any) -> tuple[ReviewItem, bool]:
        try:
            appender = self._appender_for(item.email.account)
            res = appender(item.email, item.final_draft or item.draft,
                           draft_message_id=item.draft_message_id)
        except Exception as e:  # noqa: BLE001 - any mail error leaves the approval to retry
            log.warning("review.delivery_failed", error=f"{e.__class__.__name__}: {e}")
            raise DeliveryFailed(
                f"draft {item.draft_id} is approved but could not be delivered "
                f"({e.__class__.__name__}: {e}); it stays in the queue: approve it again "
                "to retry") from e
        record_delivery(self.db, item.draft_id, folder=getattr(res, "folder", None),
                        uidvalidity=getattr(res, "uidvalidity", None),
                        uid=getattr(res, "uid", None),
                        message_id=getattr(res, "message_id", None))
        created = bool(getattr(res, "created", True))
        log.info("review.delivered", folder=getattr(res, "folder", None),
                 uid=getattr(res, "uid", None), created=created)
        return self.item(item.draft_id), created

    @staticmethod
    def _outcome(item: ReviewItem, *, changed: bool) -> ReviewOutcome:
        action = item.reviews[-1].action if item.reviews else (
            "reject" if item.status == REJECTED else "approve")
        return ReviewOutcome(
            draft_id=item.draft_id, action=action, status=item.status, changed=changed,
            delivered=item.delivered, folder=item.appended_folder, uid=item.appended_uid,
            draft_message_id=item.draft_message_id)


def _by(item: ReviewItem) -> str:
    last = item.reviews[-1] if item.reviews else None
    if last is None:
        return ""
    return f" by {last.reviewer or 'someone'} at {last.created_at:%Y-%m-%d %H:%M} UTC"


def _new_message_id(original: Email) -> str:
    # Random, but fixed at approval time (stored before the APPEND) so every retry
    # looks for the same Message-ID in Drafts.
    domain = "understudy.invalid"
    for addr in original.to_addrs:
        if "@" in addr:
            domain = addr.rsplit("@", 1)[1].strip(" >").lower() or domain
            break
    return f"<review.{secrets.token_hex(12)}@{domain}>"
