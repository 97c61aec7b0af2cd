"""Training examples from the SQL log: what the teacher said, corrected by humans.

Sources, weakest to strongest:
  * teacher answers (``model_calls`` rows with role ``teacher``, purpose ``label`` or
    ``audit``, no error); ``probs`` holds the soft label when the backend gave one;
  * human review labels (``reviews`` rows with ``is_gold``): every field a reviewer set
    overrides the teacher's, and the example is flagged gold (it weighs more in the loss).
One example per message (the newest teacher answer), then one per distinct text (the
newest wins), ordered by the time the label was made, oldest first, so the caller can take
the newest slice as validation.

>>> examples = training_examples(db)            # doctest: +SKIP
>>> examples[-1].category, examples[-1].gold     # doctest: +SKIP
('billing', True)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any



@dataclass(frozen=True)
class TrainingExample:
    """One labelled email. ``None`` labels are unknown (never assumed false)."""

    id: str
    subject: str
    body: str
    category: str
    category_probs: dict[str, float] | None = None
    priority: str | None = None
    needs_reply: bool | None = None
    gold: bool = False
    source: str = "teacher"               # teacher | audit | human | records
    created_at: datetime | None = None
    # Labelled whatever the student's confidence: no student yet, or one that certified
    # nothing (every email went to the teacher), or a records file, or in the audit sample
    # (a hash of all arriving mail: audited if handled, labelled anyway if escalated).
    # Other escalations, chosen by a confident student's threshold, are not.
    representative: bool = True

    @property
    def text(self) -> str:
        return email_text(self.subject, self.body)


def email_text(subject: str, body: str) -> str:
    """The student's input: the subject line, then the new text of the email."""
    subject, body = (subject or "").strip(), (body or "").strip()
    return f"{subject}\n{body}" if subject and body else (subject or body)


def text_digest(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()


def _soft_label(probs: Any) -> dict[str, float] | None:
    if not isinstance(probs, dict) or not probs:
        return None
    if isinstance(probs.get("category"), dict):   # {"category": {...}, ...} per head
        probs = probs["category"]
    try:
        clean = {str(k): float(v) for k, v in probs.items() if float(v) >= 0}
    except (TypeError, ValueError):
        return None
    total = sum(clean.values())
    return {k: v / total for k, v in clean.items()} if total > 0 else None


def _bool_or_none(v: Any) -> bool | None:
    return v if isinstance(v, bool) else None


def training_examples(db, *, since: datetime | None = None, limit: int | None = None,
                      audit_fraction: float = 0.0) -> list[TrainingExample]:
    """Every usable labelled email in the database, deduplicated, oldest label first.

    ``audit_fraction`` is the router's: the labelled emails of its audit sample (audits
    of handled mail and sampled escalations alike) are a uniform sample of arriving mail,
    so they count as representative next to the labels of the cold start.
    """
    # Imported here so the training subprocess (and a GPU box) can read TrainingExample
    # without the SQL stack.
    from sqlalchemy import select

    from storage.audits import in_audit_sample
    from storage.models import Message, ModelCall, Review

    by_message: dict[int, TrainingExample] = {}
    with db.session() as s:
        selective = _selective_students(s)
        q = (select(ModelCall, Message)
             .join(Message, ModelCall.message_id == Message.id)
             .where(ModelCall.role == "teacher", ModelCall.error.is_(None),
                    ModelCall.purpose.in_(("label", "audit")))
             .order_by(ModelCall.created_at, ModelCall.id))
        if since is not None:
            q = q.where(ModelCall.created_at >= since)
        for call, msg in s.execute(q):
            out = call.output or {}
            soft = _soft_label(call.probs) or _soft_label(out.get("category_probs"))
            category = out.get("category") or (max(soft, key=soft.get) if soft else None)
            if not category:
                continue
            by_message[msg.id] = TrainingExample(
                id=str(msg.id), subject=msg.subject or "",
                body=msg.new_text or msg.body_text or "", category=str(category),
                category_probs=soft, priority=out.get("priority"),
                needs_reply=_bool_or_none(out.get("needs_reply")),
                source="audit" if call.purpose == "audit" else "teacher",
                created_at=call.created_at,
                representative=(
                    (call.purpose != "audit" and selective.get(msg.id) is not True)
                    or in_audit_sample(msg.message_id, str(msg.id), audit_fraction)))

        rq = (select(Review, Message).join(Message, Review.message_id == Message.id)
              .where(Review.is_gold.is_(True)).order_by(Review.created_at, Review.id))
        for review, msg in s.execute(rq):
            fields = {k: getattr(review, k) for k in ("category", "priority", "needs_reply")
                      if getattr(review, k) is not None}
            if not fields:
                continue  # an approval without labels confirms nothing about the labels
            base = by_message.get(msg.id)
            if base is None:
                if "category" not in fields:
                    continue
                base = TrainingExample(id=str(msg.id), subject=msg.subject or "",
                                       body=msg.new_text or msg.body_text or "",
                                       category=fields["category"], representative=False)
            if "category" in fields and fields["category"] != base.category:
                base = replace(base, category_probs=None)  # the teacher's soft label was wrong
            by_message[msg.id] = replace(base, **fields, gold=True, source="human",
                                         created_at=review.created_at)

    return dedupe_by_text(sorted(by_message.values(), key=_time_key), limit=limit)


def unlabeled_emails(db, *, limit: int) -> list[dict]:
    """Parsed emails that no teacher answer and no review labelled (those the student
    handled alone, mostly), newest first, as ``{"id", "subject", "body"}`` dicts whose ids
    are the message ids :func:`training_examples` uses. The assistant teacher labels them.
    """
    from sqlalchemy import exists, select

    from storage.models import Message, ModelCall, Review

    labelled = exists().where(ModelCall.message_id == Message.id, ModelCall.role == "teacher",
                              ModelCall.error.is_(None),
                              ModelCall.purpose.in_(("label", "audit")))
    reviewed = exists().where(Review.message_id == Message.id, Review.is_gold.is_(True))
    q = (select(Message.id, Message.subject, Message.new_text, Message.body_text)
         .where(Message.parse_error.is_(None), ~labelled, ~reviewed)
         .order_by(Message.created_at.desc(), Message.id.desc()).limit(max(0, limit)))
    with db.session() as s:
        rows = s.execute(q).all()
    return [{"id": str(i), "subject": subj or "", "body": new or body or ""}
            for i, subj, new, body in rows if (new or body or subj)]


def _selective_students(s) -> dict[int, bool]:
    """message id -> whether the student that classified it could handle mail alone (a
    certified category threshold), i.e. whether its confidence chose what the teacher saw."""
    from sqlalchemy import select
    from storage.models import ModelCall, ModelVersion

    can_handle = {}
    for version, thresholds in s.execute(select(ModelVersion.version, ModelVersion.thresholds)
                                         .where(ModelVersion.kind == "classifier")):
        t = ((thresholds or {}).get("category") or {}).get("threshold")
        can_handle[version] = t is not None and float(t) <= 1.0
    out: dict[int, bool] = {}
    q = (select(ModelCall.message_id, ModelCall.model_version)
         .where(ModelCall.role == "student", ModelCall.purpose == "classify",
                ModelCall.message_id.is_not(None))
         .order_by(ModelCall.created_at, ModelCall.id))
    for message_id, version in s.execute(q):
        out[message_id] = can_handle.get(version, True)   # unknown version: assume chosen
    return out


def _time_key(e: TrainingExample):
    return (e.created_at is None, e.created_at or datetime.min, e.id)


def dedupe_by_text(examples: list[TrainingExample],
                   limit: int | None = None) -> list[TrainingExample]:
    """Keep the newest example per distinct text (order preserved); gold beats non-gold."""
    keep: dict[str, int] = {}
    for i, e in enumerate(examples):
        d = text_digest(e.text)
        j = keep.get(d)
        if j is None or e.gold or not examples[j].gold:
            keep[d] = i
    out = [examples[i] for i in sorted(keep.values())]
    return out[-limit:] if limit else out
