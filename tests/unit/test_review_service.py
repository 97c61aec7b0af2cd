"""ReviewService: approve / edit / reject, gold labels, idempotent delivery, the queue.

The mail capability's MailboxActions.append_draft is not used here (unit tier, no
server): an in-memory appender with the same signature and the same contract (one draft
per Message-ID) stands in. The browser e2e test runs the real one against Dovecot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from agent.review import (
    AlreadyReviewed,
    DeliveryFailed,
    DraftNotFound,
    InvalidCorrection,
    ReviewService,
)
from agent.review.service import parse_age
from storage.models import DraftRow, Review
from storage.reviews import count_queue, get_item, gold_labels, list_queue, queue_counts
from tests.unit.review_seed import seed_escalated

CATS = ["billing", "technical", "account", "other"]
PRIS = ["low", "normal", "high", "urgent"]


@dataclass(frozen=True)
class Appended:
    folder: str
    uidvalidity: int
    uid: int
    message_id: str
    created: bool = True


class DraftsFolder:
    """Stands in for MailboxActions.append_draft: one draft per Message-ID, ever."""

    def __init__(self, fail_times: int = 0, atomic: bool = True):
        self.drafts: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, str | None]] = []
        self.appends = 0                  # APPENDs done (two for one Message-ID: a duplicate)
        self.fail_times = fail_times
        # Not atomic: like two processes on two IMAP connections, the search for the
        # Message-ID and the APPEND are two commands another client can slip between.
        self.lock = threading.Lock() if atomic else contextlib.nullcontext()
        self.atomic = atomic

    def append_draft(self, original, body, *, draft_message_id):
        with self.lock:
            self.calls.append((original.message_id, draft_message_id))
            if self.fail_times:
                self.fail_times -= 1
                raise ConnectionError("IMAP server went away")
            created = draft_message_id not in self.drafts
            if not self.atomic:
                time.sleep(0.05)
            if created:
                self.appends += 1
                self.drafts[draft_message_id] = (original.message_id, body)
            uid = list(self.drafts).index(draft_message_id) + 1
            return Appended("Drafts", 7, uid, draft_message_id, created)


def make_service(db, folder: DraftsFolder) -> ReviewService:
    return ReviewService(db, categories=CATS, priorities=PRIS,
                         appender_for=lambda account: folder.append_draft)


def count(db, model, **where) -> int:
    with db.session() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return s.scalar(q)


def test_approve_delivers_once_and_stores_gold_labels(db):
    seeded = seed_escalated(db, n=2)
    folder = DraftsFolder()
    svc = make_service(db, folder)
    did = seeded[0]["draft_id"]

    out = svc.approve(did, reviewer="ana", category="account", priority="high")
    assert out.changed and out.delivered and out.action == "approve"
    assert out.folder == "Drafts" and out.uid == 1
    assert len(folder.drafts) == 1
    (orig_mid, body), = folder.drafts.values()
    assert orig_mid == seeded[0]["message_id"] and body == seeded[0]["draft"]

    again = svc.approve(did, reviewer="bob")                 # a double-click: no change
    assert not again.changed and again.delivered
    with pytest.raises(AlreadyReviewed, match="with its own text; your changes were not"):
        svc.approve(did, reviewer="bob", final_body="something else")
    assert len(folder.calls) == 1 and len(folder.drafts) == 1
    assert count(db, Review) == 1

    item = get_item(db, did)
    assert item.status == "approved" and item.final_draft == seeded[0]["draft"]
    assert item.appended_folder == "Drafts" and item.draft_message_id == out.draft_message_id
    (rev,) = item.reviews
    assert (rev.action, rev.category, rev.priority, rev.needs_reply) == (
        "approve", "account", "high", True)
    gold = {g["message_db_id"]: g for g in gold_labels(db)}
    assert gold[seeded[0]["message_db_id"]]["category"] == "account"
    assert seeded[1]["message_db_id"] not in gold
    # Delivered approvals leave the queue; the other email still waits.
    assert [e.draft_id for e in list_queue(db)] == [seeded[1]["draft_id"]]


def test_edit_keeps_edited_text_with_lf_line_ends(sqlite_db):
    (seeded,) = seed_escalated(sqlite_db, n=1)
    folder = DraftsFolder()
    svc = make_service(sqlite_db, folder)
    edited = "Hi,\r\n\r\nThe refund is on its way.\r\n\r\nAna\r\n"
    out = svc.edit(seeded["draft_id"], edited, reviewer="ana", needs_reply=True)
    assert out.action == "edit" and out.delivered
    item = get_item(sqlite_db, seeded["draft_id"])
    assert item.final_draft == "Hi,\n\nThe refund is on its way.\n\nAna"
    assert list(folder.drafts.values())[0][1] == item.final_draft
    assert item.reviews[0].final_draft == item.final_draft
    # An approval whose text equals the draft is not an edit.
    (other,) = seed_escalated(sqlite_db, n=1, start=5)
    assert svc.approve(other["draft_id"], reviewer="ana",
                       final_body=other["draft"] + "\r\n").action == "approve"


def test_reject_records_reason_and_corrections_and_writes_nothing(sqlite_db):
    (seeded,) = seed_escalated(sqlite_db, n=1)
    folder = DraftsFolder()
    svc = make_service(sqlite_db, folder)
    with pytest.raises(InvalidCorrection, match="reason"):
        svc.reject(seeded["draft_id"], reviewer="ana", reason="  ")
    out = svc.reject(seeded["draft_id"], reviewer="ana", reason="spam, do not answer",
                     category="other", priority="low", needs_reply=False)
    assert out.status == "rejected" and out.changed and not out.delivered
    assert folder.calls == []
    (rev,) = get_item(sqlite_db, seeded["draft_id"]).reviews
    assert (rev.action, rev.reason, rev.category, rev.priority, rev.needs_reply,
            rev.final_draft) == ("reject", "spam, do not answer", "other", "low", False, None)
    assert not svc.reject(seeded["draft_id"], reviewer="ana", reason="again").changed
    with pytest.raises(AlreadyReviewed):
        svc.approve(seeded["draft_id"], reviewer="ana")
    assert folder.calls == [] and count(sqlite_db, Review) == 1


def test_unknown_labels_and_missing_draft_change_nothing(sqlite_db):
    (seeded,) = seed_escalated(sqlite_db, n=1)
    svc = make_service(sqlite_db, DraftsFolder())
    with pytest.raises(InvalidCorrection, match="unknown category 'nonsense'"):
        svc.approve(seeded["draft_id"], reviewer="ana", category="nonsense")
    with pytest.raises(InvalidCorrection, match="unknown priority"):
        svc.reject(seeded["draft_id"], reviewer="ana", reason="x", priority="asap")
    with pytest.raises(InvalidCorrection, match="empty"):
        svc.approve(seeded["draft_id"], reviewer="ana", final_body="\r\n")
    with pytest.raises(DraftNotFound, match="review list"):
        svc.approve(9999, reviewer="ana")
    assert get_item(sqlite_db, seeded["draft_id"]).status == "pending_review"
    assert count(sqlite_db, Review) == 0


def test_failed_delivery_keeps_approval_in_queue_and_retry_uses_same_message_id(sqlite_db):
    (seeded,) = seed_escalated(sqlite_db, n=1)
    folder = DraftsFolder(fail_times=1)
    svc = make_service(sqlite_db, folder)
    with pytest.raises(DeliveryFailed, match="approve it again"):
        svc.edit(seeded["draft_id"], "Edited reply", reviewer="ana")
    item = get_item(sqlite_db, seeded["draft_id"])
    assert item.status == "approved" and not item.delivered and item.awaiting_review
    assert [e.status for e in list_queue(sqlite_db)] == ["approved"]
    assert queue_counts(sqlite_db) == {"pending_review": 0, "approved_undelivered": 1}

    # The approved text stands: a different one is refused, not silently dropped.
    with pytest.raises(AlreadyReviewed, match="approved by ana .* your changes were not"):
        svc.approve(seeded["draft_id"], reviewer="bob", final_body="a different text")
    with pytest.raises(AlreadyReviewed, match="category"):
        svc.approve(seeded["draft_id"], reviewer="bob", category="account")
    assert folder.calls == [(seeded["message_id"], item.draft_message_id)]
    out = svc.approve(seeded["draft_id"], reviewer="bob", final_body="Edited reply")
    assert out.delivered and out.changed       # this call wrote the draft
    assert folder.calls[0][1] == folder.calls[1][1] == item.draft_message_id
    assert list(folder.drafts.values()) == [(seeded["message_id"], "Edited reply")]
    assert count(sqlite_db, Review) == 1 and list_queue(sqlite_db) == []


def test_racing_approvals_make_one_review_and_one_draft(db):
    (seeded,) = seed_escalated(db, n=1)
    folder = DraftsFolder()
    outcomes, errors = [], []

    def approve(name):
        try:
            outcomes.append(make_service(db, folder).approve(
                seeded["draft_id"], reviewer=name, final_body=f"reply by {name}"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=approve, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One wins; the others learn that their text was not the one approved.
    assert len(outcomes) == 1 and outcomes[0].changed and outcomes[0].delivered
    assert len(errors) == 3 and all(isinstance(e, AlreadyReviewed) for e in errors)
    assert count(db, Review) == 1 and len(folder.drafts) == 1
    (rev,) = get_item(db, seeded["draft_id"]).reviews
    assert list(folder.drafts.values())[0][1] == rev.final_draft == f"reply by {rev.reviewer}"


def test_racing_processes_on_separate_connections_write_one_draft(sqlite_db):
    """Two reviewers approve the same text at once through separate IMAP connections (the
    web app and the CLI): searching Drafts for the Message-ID and then appending is not
    atomic across connections, so only the approver may deliver."""
    seeded = seed_escalated(sqlite_db, n=6)
    folder = DraftsFolder(atomic=False)
    results: list = []

    def approve(did, name):
        try:
            results.append(make_service(sqlite_db, folder).approve(did, reviewer=name))
        except AlreadyReviewed as e:
            results.append(e)

    for s in seeded:
        threads = [threading.Thread(target=approve, args=(s["draft_id"], n))
                   for n in ("web", "cli")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert folder.appends == 6 == len(folder.drafts)          # one draft per email
    assert all(get_item(sqlite_db, s["draft_id"]).delivered for s in seeded)
    # The other approver is told the draft is on its way (or already there).
    others = [r for r in results if isinstance(r, AlreadyReviewed)]
    assert all("being delivered" in str(e) for e in others)
    assert len(results) == 12


def test_queue_filters_newest_first(db):
    a = seed_escalated(db, account="support", n=3, ages_h=[30, 2, 10], category="billing")
    b = seed_escalated(db, account="sales", n=2, start=10, ages_h=[1, 50],
                       category="technical")
    ids = [e.draft_id for e in list_queue(db)]
    # by arrival: b0 (1h), a1 (2h), a2 (10h), a0 (30h), b1 (50h)
    assert ids == [b[0]["draft_id"], a[1]["draft_id"], a[2]["draft_id"], a[0]["draft_id"],
                   b[1]["draft_id"]]
    assert [e.draft_id for e in list_queue(db, account="support")] == [
        a[1]["draft_id"], a[2]["draft_id"], a[0]["draft_id"]]
    assert {e.category for e in list_queue(db, category="technical")} == {"technical"}
    assert [e.draft_id for e in list_queue(db, max_age=timedelta(hours=12))] == [
        b[0]["draft_id"], a[1]["draft_id"], a[2]["draft_id"]]
    assert [e.draft_id for e in list_queue(db, min_age=timedelta(hours=24))] == [
        a[0]["draft_id"], b[1]["draft_id"]]
    # count_queue counts what list_queue would list without its limit, filters included
    assert count_queue(db) == 5 and count_queue(db, account="support") == 3
    assert count_queue(db, max_age=timedelta(hours=12)) == 3
    assert count_queue(db, category="technical", min_age=timedelta(hours=24)) == 1
    e = list_queue(db, account="sales", limit=1)[0]
    assert (e.account, e.decided_by, e.priority, e.status) == (
        "sales", "teacher", "normal", "pending_review")
    with db.session() as s:   # a draft the daemon already appended is not for review
        s.get(DraftRow, b[0]["draft_id"]).status = "appended"
    assert b[0]["draft_id"] not in [e.draft_id for e in list_queue(db)]


@pytest.mark.parametrize("text,hours", [("90m", 1.5), ("12h", 12), ("2d", 48), ("1w", 168),
                                        (" 1.5 D ", 36)])
def test_parse_age(text, hours):
    assert parse_age(text) == timedelta(hours=hours)


@pytest.mark.parametrize("bad", ["", "2", "d", "2y", "-1d", "two days"])
def test_parse_age_rejects(bad):
    with pytest.raises(ValueError, match="unit"):
        parse_age(bad)


def test_status_shows_the_review_queue(sqlite_db):
    from config import load_settings
    from storage.queries import status_snapshot

    a, b = seed_escalated(sqlite_db, n=2)
    with pytest.raises(DeliveryFailed):
        make_service(sqlite_db, DraftsFolder(fail_times=1)).approve(a["draft_id"],
                                                                     reviewer="ana")
    snap = status_snapshot(sqlite_db, load_settings(None))
    assert snap["review"] == {"pending_review": 1, "approved_undelivered": 1}


def test_reviews_become_gold_training_examples(sqlite_db):
    datasets = pytest.importorskip("storage.datasets", reason="student capability not landed")
    a, b = seed_escalated(sqlite_db, n=2)
    svc = make_service(sqlite_db, DraftsFolder())
    svc.approve(a["draft_id"], reviewer="ana", category="account", priority="high")
    svc.reject(b["draft_id"], reviewer="ana", reason="no reply needed", needs_reply=False)
    by_id = {e.id: e for e in datasets.training_examples(sqlite_db)}
    ea, eb = by_id[str(a["message_db_id"])], by_id[str(b["message_db_id"])]
    assert (ea.category, ea.priority, ea.gold) == ("account", "high", True)
    assert (eb.category, eb.needs_reply, eb.gold) == ("billing", False, True)


def test_corrected_labels_are_put_on_the_message_best_effort(sqlite_db):
    a, b, c = seed_escalated(sqlite_db, n=3)
    calls = []

    def relabel_for(account):
        def relabel(email, category, priority):
            calls.append((email.message_id, category, priority))
            if category == "other":
                raise ConnectionError("message was moved")
        return relabel

    svc = ReviewService(sqlite_db, categories=CATS, priorities=PRIS,
                        appender_for=lambda account: DraftsFolder().append_draft,
                        relabel_for=relabel_for)
    svc.approve(a["draft_id"], reviewer="ana")                       # no correction
    svc.approve(b["draft_id"], reviewer="ana", priority="urgent")
    out = svc.reject(c["draft_id"], reviewer="ana", reason="spam", category="other")
    assert calls == [(b["message_id"], "billing", "urgent"), (c["message_id"], "other", "normal")]
    assert out.status == "rejected"          # a failed relabel never fails the review
