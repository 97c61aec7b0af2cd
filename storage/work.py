"""Work-queue queries for the triage worker: claims, releases, backoff, recovery, decisions.

Folder leases live in :mod:`storage.leases`, audit statistics in :mod:`storage.audits`.

A message moves ``pending -> claimed -> decided -> acted`` (see storage.models). A claim
records ``claimed_by`` (a worker id) and ``claimed_at``. A worker proves it is alive with a
heartbeat row in ``kv`` (key ``worker:<id>``, its ``updated_at``); claims held by a worker
whose heartbeat is older than the TTL are handed back by :func:`recover_stale_claims`, so
a ``kill -9`` loses nothing. PostgreSQL claims with ``FOR UPDATE SKIP LOCKED`` so many
workers share the queue without blocking each other; SQLite serialises writers, and the
daemon lets only one worker use a SQLite database (a file lock, see agent.daemon).

>>> ids = claim_batch(db, "host:123", limit=32)          # doctest: +SKIP
>>> emails = load_emails(db, ids)                         # doctest: +SKIP
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Sequence

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Account, DecisionRow, KeyValue, Mailbox, Message
from storage.types import Email

HEARTBEAT_PREFIX = "worker:"
CLAIMABLE_DECIDED = "decided"   # decided but its mailbox actions not done, holder gone


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(ts: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes for timezone-aware columns; they are UTC.
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts


def _due_filter(now: datetime):
    return or_(
        Message.state == "pending",
        and_(Message.state == "waiting",
             or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now)),
        # Decided before a crash, actions not done, and nobody holds it any more.
        and_(Message.state == CLAIMABLE_DECIDED, Message.claimed_by.is_(None),
             or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now)),
    )


def claim_batch(db: Database, worker_id: str, limit: int, now: datetime | None = None) -> list[int]:
    """Claim up to ``limit`` due messages for ``worker_id``, oldest first; return their ids.

    Due: ``pending``; ``waiting`` whose ``next_attempt_at`` has passed; ``decided`` with no
    holder (a crash between decision and mailbox actions). Each id goes to one worker.
    """
    now = now or _now()
    with db.session() as s:
        q = select(Message.id).where(_due_filter(now)).order_by(Message.id).limit(limit)
        if db.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        ids = list(s.scalars(q))
        if not ids:
            return []
        # The same due filter in the UPDATE keeps SQLite safe against a second writer
        # that slipped in between the SELECT and here (rowcount tells who won).
        s.execute(update(Message).where(Message.id.in_(ids), _due_filter(now)).values(
            state=_keep_decided(), claimed_by=worker_id, claimed_at=now,
            attempts=Message.attempts + 1).execution_options(synchronize_session=False))
        got = list(s.scalars(select(Message.id).where(
            Message.id.in_(ids), Message.claimed_by == worker_id, Message.claimed_at == now)))
    return sorted(got)


def _keep_decided():
    from sqlalchemy import case

    return case((Message.state == CLAIMABLE_DECIDED, CLAIMABLE_DECIDED), else_="claimed")


def release(db: Database, ids: Iterable[int], worker_id: str) -> int:
    """Give claims back (shutdown): claimed -> pending, decided keeps its state."""
    ids = list(ids)
    if not ids:
        return 0
    with db.session() as s:
        n = s.execute(update(Message).where(
            Message.id.in_(ids), Message.claimed_by == worker_id, Message.state == "claimed")
            .values(state="pending", claimed_by=None, claimed_at=None)).rowcount
        s.execute(update(Message).where(
            Message.id.in_(ids), Message.claimed_by == worker_id,
            Message.state == CLAIMABLE_DECIDED).values(claimed_by=None, claimed_at=None))
    return n


def defer(db: Database, message_id: int, worker_id: str, *, delay_s: float, error: str,
          now: datetime | None = None) -> bool:
    """Park a claimed message as ``waiting`` until ``now + delay_s`` (teacher unavailable)."""
    now = now or _now()
    with db.session() as s:
        return s.execute(update(Message).where(
            Message.id == message_id, Message.claimed_by == worker_id,
            Message.state == "claimed").values(
            state="waiting", claimed_by=None, claimed_at=None, last_error=error[:2000],
            next_attempt_at=now + timedelta(seconds=delay_s))).rowcount == 1


def defer_actions(db: Database, message_id: int, worker_id: str, *, delay_s: float,
                  now: datetime | None = None) -> bool:
    """A decided message whose mailbox actions failed: let go of it, retry after a pause."""
    now = now or _now()
    with db.session() as s:
        return s.execute(update(Message).where(
            Message.id == message_id, Message.claimed_by == worker_id,
            Message.state == CLAIMABLE_DECIDED).values(
            claimed_by=None, claimed_at=None,
            next_attempt_at=now + timedelta(seconds=delay_s))).rowcount == 1


def wake_waiting(db: Database, now: datetime | None = None) -> int:
    """The teacher answers again: make every waiting escalation due now (drain the backlog
    at once instead of at each message's backoff)."""
    now = now or _now()
    with db.session() as s:
        return s.execute(update(Message).where(
            Message.state == "waiting", Message.next_attempt_at > now)
            .values(next_attempt_at=now)).rowcount


def backoff_s(attempts: int, base_s: float = 5.0, cap_s: float = 300.0) -> float:
    """Exponential backoff for waiting escalations: base * 2^(attempts-1), capped."""
    return min(cap_s, base_s * (2 ** max(0, attempts - 1)))


def heartbeat(db: Database, worker_id: str, info: dict | None = None) -> None:
    """Record that ``worker_id`` is alive (call every few seconds)."""
    key = HEARTBEAT_PREFIX + worker_id
    now = _now()
    with db.session() as s:
        row = s.get(KeyValue, key)
        if row is None:
            s.add(KeyValue(key=key, value=info or {}, updated_at=now))
        else:
            row.updated_at = now
            if info is not None:
                row.value = info
    # A concurrent first insert of the same key cannot happen: the id is ours alone.


def drop_heartbeat(db: Database, worker_id: str) -> None:
    with db.session() as s:
        row = s.get(KeyValue, HEARTBEAT_PREFIX + worker_id)
        if row is not None:
            s.delete(row)


def live_workers(db: Database, ttl_s: float, now: datetime | None = None) -> set[str]:
    now = now or _now()
    with db.session() as s:
        rows = s.execute(select(KeyValue.key, KeyValue.updated_at)
                         .where(KeyValue.key.like(HEARTBEAT_PREFIX + "%"))).all()
    return {k[len(HEARTBEAT_PREFIX):] for k, ts in rows
            if _aware(ts) >= now - timedelta(seconds=ttl_s)}


def recover_stale_claims(db: Database, ttl_s: float, *, alive: set[str] | None = None,
                         now: datetime | None = None) -> int:
    """Hand back claims whose holder has no fresh heartbeat; returns how many.

    ``alive`` overrides the heartbeat check (the SQLite daemon, sole worker by file lock,
    passes ``{its own id}``: any other holder is a crashed predecessor).
    """
    now = now or _now()
    alive = live_workers(db, ttl_s, now) if alive is None else alive
    held = Message.claimed_by.is_not(None)
    stale = held if not alive else and_(held, Message.claimed_by.not_in(sorted(alive)))
    with db.session() as s:
        n = s.execute(update(Message).where(stale, Message.state == "claimed").values(
            state="pending", claimed_by=None, claimed_at=None)).rowcount
        n += s.execute(update(Message).where(stale, Message.state == CLAIMABLE_DECIDED)
                       .values(claimed_by=None, claimed_at=None)).rowcount
        # Heartbeat rows of dead workers are garbage now.
        for key, ts in s.execute(select(KeyValue.key, KeyValue.updated_at).where(
                KeyValue.key.like(HEARTBEAT_PREFIX + "%"))).all():
            if key[len(HEARTBEAT_PREFIX):] not in alive and \
                    _aware(ts) < now - timedelta(seconds=ttl_s):
                s.delete(s.get(KeyValue, key))
    return n


def load_emails(db: Database, ids: Sequence[int]) -> list[Email]:
    """Typed :class:`Email` objects for message ids (order kept), with account and folder."""
    if not ids:
        return []
    with db.session() as s:
        rows = s.execute(
            select(Message, Mailbox.name, Account.name)
            .outerjoin(Mailbox, Message.mailbox_id == Mailbox.id)
            .outerjoin(Account, Mailbox.account_id == Account.id)
            .where(Message.id.in_(list(ids)))).all()
    by_id = {m.id: (m, folder, account) for m, folder, account in rows}
    return [_to_email(*by_id[i]) for i in ids if i in by_id]


def _to_email(m: Message, folder: str | None, account: str | None) -> Email:
    return Email(
        id=str(m.id), subject=m.subject or "", text=m.body_text or "",
        new_text=m.new_text or m.body_text or "", from_addr=m.from_addr or "",
        to_addrs=tuple(m.to_addrs or ()), reply_to=tuple(m.reply_to or ()),
        message_id=m.message_id, in_reply_to=m.in_reply_to,
        references=tuple(m.references or ()), date=_aware(m.sent_at), html=m.body_html,
        account=account, folder=folder, uid=m.uid, parse_error=m.parse_error, db_id=m.id)


def states_of(db: Database, ids: Sequence[int]) -> dict[int, tuple[str, bool]]:
    """id -> (state, has a decision) for claimed ids (decided ones skip triage)."""
    with db.session() as s:
        rows = s.execute(select(Message.id, Message.state, DecisionRow.id)
                         .outerjoin(DecisionRow, DecisionRow.message_id == Message.id)
                         .where(Message.id.in_(list(ids)))).all()
    return {i: (st, d is not None) for i, st, d in rows}


# --- decisions: commit first, act after ------------------------------------------------

CallWriter = Callable[[Session, int | None], int]
"""Writes one model_calls row in the given session for a message id; returns the row id
(e.g. a closure over storage.calls.record_call or record_teacher_result)."""


def record_calls(db: Database, calls: Sequence[CallWriter],
                 message_id: int | None = None) -> list[int]:
    """Write model_calls rows outside a decision (failed teacher calls, audits)."""
    with db.session() as s:
        return [c(s, message_id) for c in calls]


def commit_decision(db: Database, message_id: int, worker_id: str, *, decision: dict,
                    calls: Sequence[CallWriter], deciding_call: int | None = None,
                    draft: dict | None = None) -> bool:
    """Commit the one decision of a claimed message with its model_calls and draft rows.

    ``decision``/``draft`` are DecisionRow/DraftRow column dicts; ``deciding_call`` is the
    index in ``calls`` of the call the decision came from. Returns False (and writes
    nothing) when the message is no longer claimed by ``worker_id`` or already has a
    decision, so a worker whose claim was recovered after a stall never decides twice.
    """
    from storage.models import DraftRow

    with db.session() as s:
        q = select(Message).where(Message.id == message_id)
        if db.dialect == "postgresql":
            q = q.with_for_update()
        m = s.scalar(q)
        if m is None or m.state != "claimed" or m.claimed_by != worker_id:
            return False
        if s.scalar(select(DecisionRow.id).where(DecisionRow.message_id == message_id)):
            return False
        call_ids = [c(s, message_id) for c in calls]
        d = DecisionRow(message_id=message_id, **decision,
                        model_call_id=call_ids[deciding_call] if deciding_call is not None
                        else None)
        s.add(d)
        s.flush()
        if draft is not None:
            s.add(DraftRow(message_id=message_id, decision_id=d.id, **draft))
        m.state = CLAIMABLE_DECIDED
        m.last_error = None
        m.next_attempt_at = None
    return True


def pending_actions(db: Database, message_id: int) -> dict:
    """What is left to do on the mailbox for a decided message (for resuming a crash)."""
    from storage.models import DraftRow

    with db.session() as s:
        d = s.scalar(select(DecisionRow).where(DecisionRow.message_id == message_id))
        dr = s.scalar(select(DraftRow).where(DraftRow.message_id == message_id))
        return {
            "category": d.category, "priority": d.priority, "source": d.source,
            "done": list(d.actions_done or []),
            "draft": None if dr is None else {
                "id": dr.id, "status": dr.status, "body": dr.body,
                "draft_message_id": dr.draft_message_id},
        }


def mark_action(db: Database, message_id: int, action: str, *, draft_append: dict | None = None,
                error: str | None = None) -> None:
    """Record one mailbox action as done (``actions_done``), or its error."""
    from storage.models import DraftRow

    with db.session() as s:
        d = s.scalar(select(DecisionRow).where(DecisionRow.message_id == message_id))
        if error is not None:
            d.actions_error = error[:2000]
            return
        if action not in (d.actions_done or []):
            d.actions_done = [*(d.actions_done or []), action]
        if draft_append is not None:
            dr = s.scalar(select(DraftRow).where(DraftRow.message_id == message_id))
            dr.status = "appended"
            dr.appended_folder = draft_append.get("folder")
            dr.appended_uidvalidity = draft_append.get("uidvalidity")
            dr.appended_uid = draft_append.get("uid")
            dr.appended_at = _now()


def mark_acted(db: Database, message_id: int, worker_id: str) -> bool:
    """All mailbox actions done: the message leaves the queue."""
    with db.session() as s:
        return s.execute(update(Message).where(
            Message.id == message_id, Message.claimed_by == worker_id,
            Message.state == CLAIMABLE_DECIDED).values(
            state="acted", claimed_by=None, claimed_at=None)).rowcount == 1


def queue_depth(db: Database) -> dict[str, int]:
    from sqlalchemy import func

    with db.session() as s:
        rows = s.execute(select(Message.state, func.count()).where(
            Message.state.in_(["pending", "claimed", "waiting", CLAIMABLE_DECIDED]))
            .group_by(Message.state)).all()
    return {k: int(v) for k, v in rows}


def active_model(db: Database, kind: str = "classifier") -> tuple[str, str] | None:
    """(version, path) of the active model of ``kind``; one indexed query, cheap to poll."""
    from storage.models import ModelVersion

    with db.session() as s:
        row = s.execute(select(ModelVersion.version, ModelVersion.path).where(
            ModelVersion.kind == kind, ModelVersion.status == "active")
            .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).first()
    return None if row is None else (row[0], row[1])
