"""Claim / release / backoff / lease / recovery queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from storage import leases, work
from storage.calls import record_call
from storage.models import DecisionRow, DraftRow, Message, ModelCall


def _seed(db, n: int) -> list[int]:
    with db.session() as s:
        rows = [Message(content_hash=f"{i:064d}", subject=f"s{i}", body_text=f"body {i}")
                for i in range(n)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _state(db, i):
    with db.session() as s:
        return s.get(Message, i).state


def test_claims_are_exclusive_and_oldest_first(db):
    ids = _seed(db, 10)
    a = work.claim_batch(db, "a", 4)
    b = work.claim_batch(db, "b", 4)
    c = work.claim_batch(db, "c", 4)
    assert a == ids[:4] and b == ids[4:8] and c == ids[8:]
    assert work.claim_batch(db, "d", 4) == []
    emails = work.load_emails(db, a)
    assert [e.db_id for e in emails] == a and emails[0].subject == "s0"


def test_concurrent_claimers_never_share_a_message(db):
    ids = _seed(db, 200)
    got: dict[str, list[int]] = {}

    def claimer(name):
        mine = []
        while batch := work.claim_batch(db, name, 7):
            mine += batch
        got[name] = mine

    threads = [threading.Thread(target=claimer, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for v in got.values() for i in v]
    assert sorted(everything) == ids                     # none missed, none twice


def test_release_and_defer_with_backoff(db):
    ids = _seed(db, 3)
    claimed = work.claim_batch(db, "w", 3)
    assert work.release(db, claimed[:1], "w") == 1
    assert _state(db, ids[0]) == "pending"
    now = datetime.now(timezone.utc)
    assert work.defer(db, ids[1], "w", delay_s=60, error="teacher down", now=now)
    assert not work.defer(db, ids[1], "w", delay_s=60, error="again")   # not claimed any more
    # Not due yet: only the released one comes back.
    assert work.claim_batch(db, "w", 10, now=now + timedelta(seconds=1)) == [ids[0]]
    assert work.claim_batch(db, "w", 10, now=now + timedelta(seconds=61)) == [ids[1]]
    # The teacher is back: waiting escalations become due at once.
    assert work.defer(db, ids[1], "w", delay_s=600, error="down again", now=now)
    assert work.claim_batch(db, "w", 10, now=now + timedelta(seconds=2)) == []
    assert work.wake_waiting(db, now=now + timedelta(seconds=2)) == 1
    assert work.claim_batch(db, "w", 10, now=now + timedelta(seconds=2)) == [ids[1]]
    assert work.backoff_s(1) == 5 and work.backoff_s(3) == 20 and work.backoff_s(50) == 300


def test_stale_claims_of_a_dead_worker_are_recovered(db):
    ids = _seed(db, 4)
    work.heartbeat(db, "live")
    work.claim_batch(db, "live", 2)
    work.claim_batch(db, "dead", 2)        # never sent a heartbeat
    assert work.recover_stale_claims(db, ttl_s=30) == 2
    assert [_state(db, i) for i in ids] == ["claimed", "claimed", "pending", "pending"]
    # The live one goes stale once its heartbeat is older than the ttl.
    later = datetime.now(timezone.utc) + timedelta(seconds=60)
    assert work.live_workers(db, 30, now=later) == set()
    assert work.recover_stale_claims(db, ttl_s=30, now=later) == 2


def test_commit_decision_once_then_actions(db):
    ids = _seed(db, 1)
    [i] = work.claim_batch(db, "w", 1)
    def call(session, message_id):
        return record_call(session, message_id=message_id, role="student", purpose="classify",
                           backend="torch", model_id="m", output={"category": "x"})

    dec = dict(source="student", category="billing", priority="normal", needs_reply=True)
    draft = dict(source="student", body="Hello", status="to_append", draft_message_id="<d@x>")
    assert work.commit_decision(db, i, "w", decision=dec, calls=[call], deciding_call=0,
                                draft=draft)
    # A second commit (a re-run after a crash) writes nothing.
    assert not work.commit_decision(db, i, "w", decision=dec, calls=[call])
    assert _state(db, i) == "decided"
    # Crash before actions: the holder dies, the decided message is claimable again.
    assert work.recover_stale_claims(db, ttl_s=30, alive=set()) == 1
    assert work.claim_batch(db, "w2", 5) == [i]
    assert _state(db, i) == "decided"
    assert work.states_of(db, [i]) == {i: ("decided", True)}
    work.mark_action(db, i, "keywords")
    work.mark_action(db, i, "draft", draft_append={"folder": "Drafts", "uid": 3})
    left = work.pending_actions(db, i)
    assert left["done"] == ["keywords", "draft"] and left["draft"]["status"] == "appended"
    assert work.mark_acted(db, i, "w2") and _state(db, i) == "acted"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(DecisionRow)) == 1
        assert s.scalar(select(func.count()).select_from(DraftRow)) == 1
        assert s.scalar(select(func.count()).select_from(ModelCall)) == 1
        assert s.scalar(select(DecisionRow.model_call_id)) is not None
    assert ids == [i]


def test_folder_lease_has_one_holder_until_it_expires(db):
    mb = leases.mailbox_id(db, "acct", "INBOX")
    assert leases.mailbox_id(db, "acct", "INBOX") == mb
    now = datetime.now(timezone.utc)
    assert leases.acquire_lease(db, mb, "a", 30, now=now)
    assert not leases.acquire_lease(db, mb, "b", 30, now=now)
    assert leases.acquire_lease(db, mb, "a", 30, now=now)           # renew
    assert leases.acquire_lease(db, mb, "b", 30, now=now + timedelta(seconds=31))
    assert leases.lease_holder(db, mb)[0] == "b"
    leases.release_lease(db, mb, "a")                                 # not the holder: no-op
    assert leases.lease_holder(db, mb)[0] == "b"
    leases.release_lease(db, mb, "b")
    assert leases.acquire_lease(db, mb, "a", 30, now=now)
