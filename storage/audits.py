"""Audits: the live disagreement of the student with the teacher, with an exact interval.

The worker sends a fraction of the mail the student handled alone to the teacher in shadow
and logs each comparison as a ``model_calls`` row of purpose ``audit`` whose output holds
``agree`` and ``student_version``. :func:`audit_summary` turns them into a rate and a
Clopper-Pearson interval next to the promise (epsilon) stored with the model.

A disagreement is not always the student's mistake: the teacher errs too, and some mail
fits two categories (on Banking77, one reader found none of the student's disagreements
above its threshold to be its own fault: README, "How much of the full-data gap is in the
labels"). :func:`list_disputes` lists the disagreements; a person settles one with a gold
label (``understudy review settle``), and :func:`audit_summary` counts whom the settled
ones proved right.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from storage.db import Database

SETTLE = "settle"   # the reviews.action of a gold label that settles an audit disagreement


def in_audit_sample(message_id: str | None, email_id: str, fraction: float,
                    salt: str = "") -> bool:
    """Whether the email is in the audit sample, by its identity (its Message-ID, else its
    stable id: the database id as a string). A hash, not a coin flip, so a crash and a
    re-run pick the same emails, and the sample is a uniform draw from *all* arriving mail,
    whatever the route. The worker audits the sampled emails the student handled; the
    sampled ones it escalated are labelled anyway, so together they are a sample of
    arriving mail (datasets uses them for calibration). The router and datasets both call
    this, so they agree on the identity."""
    if fraction <= 0:
        return False
    key = f"{salt}|{message_id or email_id}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2 ** 64
    return u < fraction


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (conservative, valid at small n)."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def audit_summary(db: Database, *, epsilon: float, level: float = 0.95,
                  student_version: str | None = None) -> dict:
    """Disagreement of audited student decisions with the teacher, with an exact interval.

    ``breach`` is True when the interval's lower end is above ``epsilon``: the data show,
    at ``level`` confidence, that the student breaks its promise.
    """
    from storage.models import ModelCall

    with db.session() as s:
        rows = s.execute(select(ModelCall.message_id, ModelCall.output).where(
            ModelCall.purpose == "audit", ModelCall.error.is_(None))).all()
        rows = [(mid, o) for mid, o in rows if isinstance(o, dict) and "agree" in o
                and (student_version is None or o.get("student_version") == student_version)]
        gold = _gold_reviews(s, [mid for mid, o in rows if not o["agree"]])
    n = len(rows)
    k = sum(1 for _, o in rows if not o["agree"])
    lo, hi = clopper_pearson(k, n, level)
    settled = {"n": 0, "student_right": 0, "teacher_right": 0, "neither": 0}
    for mid, o in rows:
        if not o["agree"] and mid in gold:
            settled["n"] += 1
            settled[_whom(gold[mid][0], o.get("student_category"), _teacher(o))] += 1
    return {"student_version": student_version, "n": n, "disagreements": k,
            "rate": (k / n) if n else None, "interval": [round(lo, 6), round(hi, 6)],
            "level": level, "epsilon": epsilon, "breach": bool(n and lo > epsilon),
            "settled": settled}


@dataclass(frozen=True)
class Dispute:
    """One audit disagreement: the student handled the email alone, the teacher (in shadow)
    chose another category. ``settled`` is the newest gold category a person gave the
    email since (None: unsettled), and ``settled_by`` who gave it."""

    message_db_id: int
    subject: str
    text: str
    student_version: str | None
    student_category: str | None
    teacher_category: str | None
    audited_at: datetime
    settled: str | None = None
    settled_by: str | None = None

    @property
    def proved_right(self) -> str | None:
        """student_right | teacher_right | neither, once settled."""
        if self.settled is None:
            return None
        return _whom(self.settled, self.student_category, self.teacher_category)


def list_disputes(db: Database, *, student_version: str | None = None,
                  include_settled: bool = False, limit: int = 50,
                  message_db_id: int | None = None) -> list[Dispute]:
    """Audit disagreements, newest first (unsettled ones only unless ``include_settled``;
    only that email's with ``message_db_id``).

    >>> list_disputes(db, limit=20)       # doctest: +SKIP
    [Dispute(message_db_id=412, student_category='billing', teacher_category='account', ...)]
    """
    from storage.models import Message, ModelCall

    q = (select(ModelCall.message_id, ModelCall.output, ModelCall.created_at, Message.subject,
                Message.new_text, Message.body_text)
         .join(Message, Message.id == ModelCall.message_id)
         .where(ModelCall.purpose == "audit", ModelCall.error.is_(None))
         .order_by(ModelCall.created_at.desc(), ModelCall.id.desc()))
    if message_db_id is not None:
        q = q.where(ModelCall.message_id == message_db_id)
    out: list[Dispute] = []
    seen: set[int] = set()
    with db.session() as s:
        rows = [r for r in s.execute(q).all() if isinstance(r.output, dict)
                and r.output.get("agree") is False
                and (student_version is None
                     or r.output.get("student_version") == student_version)]
        gold = _gold_reviews(s, [r.message_id for r in rows])
    for r in rows:
        if r.message_id in seen or (r.message_id in gold and not include_settled):
            continue
        seen.add(r.message_id)
        o = r.output
        out.append(Dispute(
            message_db_id=r.message_id, subject=r.subject or "",
            text=(r.new_text or r.body_text or "").strip(),
            student_version=o.get("student_version"),
            student_category=o.get("student_category"),
            teacher_category=_teacher(o),
            audited_at=r.created_at, settled=gold.get(r.message_id, (None, None))[0],
            settled_by=gold.get(r.message_id, (None, None))[1]))
        if len(out) >= limit:
            break
    return out


def _gold_reviews(s, message_ids: list[int]) -> dict[int, tuple[str, str]]:
    """(category, reviewer) of the newest gold review with a category, per message."""
    from storage.models import Review

    if not message_ids:
        return {}
    rows = s.execute(select(Review.message_id, Review.category, Review.reviewer).where(
        Review.message_id.in_(message_ids), Review.is_gold.is_(True),
        Review.category.is_not(None)).order_by(Review.id)).all()
    return {mid: (cat, who) for mid, cat, who in rows}   # newer reviews overwrite older


def _teacher(output: dict) -> str | None:
    """The teacher's category in an audit row (agent.audit.audit_output writes both keys)."""
    return output.get("teacher_category", output.get("category"))


def _whom(gold: str, student: str | None, teacher: str | None) -> str:
    if gold == student:
        return "student_right"
    if gold == teacher:
        return "teacher_right"
    return "neither"
