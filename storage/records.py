"""Dataset import and export: teacher records (as plain dicts) in and out of SQL.

Import stores each record as a message (``state = 'imported'``: it is never triaged or
touched in a mailbox) with one teacher ``model_calls`` row (backend ``recorded``) holding
its labels, so the training-data queries see it like any other teacher answer; a record
marked ``source = 'human'`` also gets a gold review. Re-importing a file adds nothing:
records are keyed by id (``messages.external_id``).

Export writes one record per message that has a usable teacher answer or a gold label:
the newest teacher answer, with every field a human review set overriding it.

The dicts use the interchange keys of design.md (``id``, ``from``, ``subject``, ``body``,
``category``, ``category_probs``, ``priority``, ``needs_reply``, ``draft``,
``rationale``, plus ``source``); ``agent.teacher.records`` validates them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from sqlalchemy import select

from storage.calls import digest_text, record_call
from storage.models import DraftRow, Message, ModelCall, Review

IMPORTED = "imported"
IMPORT_BATCH = 500


@dataclass(frozen=True)
class ImportStats:
    imported: int
    skipped_existing: int
    gold: int


def import_records(db, records: Iterable[dict[str, Any]], *, source: str = "import"
                   ) -> ImportStats:
    """Store records (interchange dicts); commits every few hundred so big files stream."""
    imported = skipped = gold = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal imported, skipped, gold
        if not pending:
            return
        with db.session() as s:
            ids = [r["id"] for r in pending]
            existing = set(s.scalars(select(Message.external_id)
                                     .where(Message.external_id.in_(ids))))
            for r in pending:
                if r["id"] in existing:
                    skipped += 1
                    continue
                existing.add(r["id"])
                _store(s, r, source)
                imported += 1
                gold += r.get("source") == "human"
        pending.clear()

    for r in records:
        pending.append(r)
        if len(pending) >= IMPORT_BATCH:
            flush()
    flush()
    return ImportStats(imported=imported, skipped_existing=skipped, gold=gold)


def _store(s, r: dict[str, Any], source: str) -> None:
    body = r["body"]
    msg = Message(external_id=r["id"], content_hash=hashlib.sha256(body.encode()).hexdigest(),
                  subject=r.get("subject") or "", from_addr=r.get("from") or "",
                  body_text=body, new_text=body, state=IMPORTED)
    s.add(msg)
    s.flush()
    output = {k: r.get(k) for k in ("category", "priority", "needs_reply", "draft", "rationale")}
    record_call(s, message_id=msg.id, role="teacher", purpose="label", backend="recorded",
                model_id=f"recorded:{source}"[:200], input_digest=digest_text(
                    r.get("subject") or "", body), output=output,
                probs=r.get("category_probs"),   # absent stays absent: unknown, not one-hot
                confidence=max(r["category_probs"].values()) if r.get("category_probs") else None)
    if r.get("source") == "human":
        s.add(Review(message_id=msg.id, action="edit", reviewer=f"import:{source}",
                     category=r["category"], priority=r.get("priority"),
                     needs_reply=r.get("needs_reply"), final_draft=r.get("draft"),
                     is_gold=True))


def export_records(db, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Interchange dicts, oldest message first: teacher answers, corrected by gold reviews."""
    with db.session() as s:
        teacher: dict[int, ModelCall] = {}
        for call in s.scalars(select(ModelCall).where(
                ModelCall.role == "teacher", ModelCall.error.is_(None),
                ModelCall.purpose.in_(("label", "audit"))).order_by(ModelCall.id)):
            if call.message_id is not None and (call.output or {}).get("category"):
                teacher[call.message_id] = call          # the newest answer wins
        reviews: dict[int, Review] = {}
        for rv in s.scalars(select(Review).where(Review.is_gold.is_(True))
                            .order_by(Review.id)):
            if rv.category or rv.priority or rv.needs_reply is not None or rv.final_draft:
                reviews[rv.message_id] = rv
        drafts = {d.message_id: d for d in s.scalars(select(DraftRow).where(
            DraftRow.message_id.in_(list(reviews))))} if reviews else {}
        ids = sorted(set(teacher) | set(reviews))
        if limit:
            ids = ids[-limit:]
        for start in range(0, len(ids), IMPORT_BATCH):
            chunk = ids[start:start + IMPORT_BATCH]
            msgs = {m.id: m for m in s.scalars(select(Message).where(Message.id.in_(chunk)))}
            for mid in chunk:
                rec = _record(msgs[mid], teacher.get(mid), reviews.get(mid), drafts.get(mid))
                if rec is not None:
                    yield rec


def _record(m: Message, call: ModelCall | None, rv: Review | None,
            draft: DraftRow | None) -> dict[str, Any] | None:
    out = dict(call.output or {}) if call else {}
    rec: dict[str, Any] = {
        "id": m.external_id or m.message_id or str(m.id), "from": m.from_addr or None,
        "subject": m.subject or None, "body": m.new_text or m.body_text or "",
        "category": out.get("category"), "category_probs": call.probs if call else None,
        "priority": out.get("priority"), "needs_reply": out.get("needs_reply"),
        "draft": out.get("draft"), "rationale": out.get("rationale"),
        "source": "teacher" if call else None,
    }
    if rv is not None:
        if rv.category and rv.category != rec["category"]:
            rec["category_probs"] = None       # the teacher's soft label was wrong
        rec["category"] = rv.category or rec["category"]
        rec["priority"] = rv.priority or rec["priority"]
        if rv.needs_reply is not None:
            rec["needs_reply"] = rv.needs_reply
        final = rv.final_draft or (draft.final_body if draft else None)
        rec["draft"] = final or rec["draft"]
        rec["source"] = "human"
    if not rec["category"] or not rec["body"]:
        return None
    if rec["category_probs"] and rec["category"] not in rec["category_probs"]:
        rec["category_probs"] = None
    return {k: v for k, v in rec.items() if v is not None}


def _unlabelled(limit: int | None):
    labelled = (select(ModelCall.message_id)
                .where(ModelCall.role == "teacher", ModelCall.error.is_(None),
                       ModelCall.message_id.is_not(None)))
    q = (select(Message).where(Message.state != IMPORTED, Message.id.not_in(labelled))
         .order_by(Message.id))
    return q.limit(limit) if limit else q


def unlabelled_emails(db, limit: int | None = None) -> list:
    """Stored emails with no usable teacher answer yet, oldest first (for backfill)."""
    from storage.reviews import email_from_row

    with db.session() as s:
        return [email_from_row(m, None, None) for m in s.scalars(_unlabelled(limit))]


def unlabelled_stats(db, limit: int | None = None) -> tuple[int, float]:
    """(how many emails lack a teacher answer, their mean body length in characters)."""
    with db.session() as s:
        sizes = [len(m.new_text or m.body_text or "") + len(m.subject or "")
                 for m in s.scalars(_unlabelled(limit))]
    return len(sizes), (sum(sizes) / len(sizes) if sizes else 0.0)
