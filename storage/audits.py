"""Audits: the live disagreement of the student with the teacher, with an exact interval.

The worker sends a fraction of the mail the student handled alone to the teacher in shadow
and logs each comparison as a ``model_calls`` row of purpose ``audit`` whose output holds
``agree`` and ``student_version``. :func:`audit_summary` turns them into a rate and a
Clopper-Pearson interval next to the promise (epsilon) stored with the model.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from storage.db import Database


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
        outs = s.scalars(select(ModelCall.output).where(
            ModelCall.purpose == "audit", ModelCall.error.is_(None))).all()
    outs = [o for o in outs if isinstance(o, dict) and "agree" in o
            and (student_version is None or o.get("student_version") == student_version)]
    n = len(outs)
    k = sum(1 for o in outs if not o["agree"])
    lo, hi = clopper_pearson(k, n, level)
    return {"student_version": student_version, "n": n, "disagreements": k,
            "rate": (k / n) if n else None, "interval": [round(lo, 6), round(hi, 6)],
            "level": level, "epsilon": epsilon, "breach": bool(n and lo > epsilon)}
