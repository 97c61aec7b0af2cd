"""Live audits: a sample of student-handled mail is also labelled by the teacher.

The worker sends the sampled emails (see agent.router) to the teacher in shadow: the
student's decision stands, and the teacher's answer is logged as a ``model_calls`` row
with purpose ``audit`` whose output records both labels. :func:`check` turns those rows
into the live disagreement rate with an exact (Clopper-Pearson) 95% interval and compares
it with the promise epsilon stored with the model; a breach is logged at error level on
every check until the interval comes back under epsilon.

>>> audit_output("v1", "billing", "billing")["agree"]
True
"""

from __future__ import annotations

from typing import Any

from agent.logs import get_logger
from storage.audits import audit_summary, clopper_pearson
from storage.db import Database

__all__ = ["audit_output", "check", "clopper_pearson", "promised_epsilon"]

log = get_logger(component="audit")


def audit_output(student_version: str | None, student_category: str,
                 teacher_category: str | None, teacher_answer: dict | None = None
                 ) -> dict[str, Any]:
    """The ``output`` of an audit call row: the teacher's answer (``category`` etc., which
    storage.datasets reads as a training label) plus the student's label and agreement."""
    return {**(teacher_answer or {}), "category": teacher_category,
            "student_version": student_version, "student_category": student_category,
            "teacher_category": teacher_category,
            "agree": teacher_category is not None and student_category == teacher_category}


def promised_epsilon(stored_thresholds: dict | None, default: float) -> float:
    """The risk the model promised (stored with it), else the configured target risk."""
    stored = stored_thresholds or {}
    eps = stored.get("epsilon")
    if eps is None and isinstance(stored.get("category"), dict):
        eps = stored["category"].get("epsilon")     # per-head shape of distill.classifier
    return float(eps) if isinstance(eps, (int, float)) else default


def check(db: Database, *, student_version: str | None, epsilon: float,
          level: float = 0.95) -> dict[str, Any]:
    """Compute the live disagreement of ``student_version``; log loudly on a breach."""
    summary = audit_summary(db, epsilon=epsilon, level=level, student_version=student_version)
    if summary["breach"]:
        log.error("AUDIT BREACH: the student disagrees with the teacher more than it promised",
                  student_version=student_version, disagreements=summary["disagreements"],
                  audited=summary["n"], interval=summary["interval"], epsilon=epsilon,
                  fix="lower router.target_risk or retrain (understudy retrain); escalations "
                      "keep flowing meanwhile")
    return summary
