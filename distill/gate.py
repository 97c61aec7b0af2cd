"""Promotion gate: a candidate replaces the active model only if it is no worse.

Both are measured on the same held-out slice, never trained on (the newest records of a
records file; for the SQL log a stable hash sample of its representative labels, see
``distill.pipeline.split_examples``). "No worse" means agreement with the teacher and
coverage at the target risk each drop by at most the configured margins
(``scheduler.agreement_margin``, ``scheduler.coverage_margin``). The first model always
promotes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(candidate: dict, active: dict | None, *, agreement_margin: float = 0.0,
         coverage_margin: float = 0.0) -> GateDecision:
    """``candidate``/``active``: metrics with ``accuracy`` and ``coverage`` (at stored
    thresholds) measured on the same held-out examples."""
    if active is None:
        return GateDecision(True, "first model: nothing to compare against")
    acc_c, acc_a = candidate["accuracy"], active["accuracy"]
    cov_c, cov_a = candidate["coverage"], active["coverage"]
    problems = []
    if acc_c < acc_a - agreement_margin:
        problems.append(f"agreement {acc_c:.4f} < active {acc_a:.4f} - margin "
                        f"{agreement_margin:.4f}")
    if cov_c < cov_a - coverage_margin:
        problems.append(f"coverage {cov_c:.4f} < active {cov_a:.4f} - margin "
                        f"{coverage_margin:.4f}")
    if problems:
        return GateDecision(False, "; ".join(problems))
    return GateDecision(True, f"agreement {acc_c:.4f} vs {acc_a:.4f}, coverage "
                              f"{cov_c:.4f} vs {cov_a:.4f}: no worse")
