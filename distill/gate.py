"""Promotion gate: a candidate replaces the active model only if it is no worse.

Both are measured on the same held-out slice, never trained on (the newest records of a
records file; for the SQL log a stable hash sample of its representative labels, see
``distill.pipeline.split_examples``). Two rules for "no worse" (``scheduler.gate_rule``):

``margins``
    agreement with the teacher and coverage at the stored threshold each drop by at most
    the configured margins (``scheduler.agreement_margin``, ``scheduler.coverage_margin``).
    On a slice of ~190 emails one email is half a point, so with margins 0 one email can
    keep a better candidate out.
``sign_test``
    keep the candidate out only if a one-sided exact sign test on the emails where the two
    models differ says it is worse (agreement or coverage) at level ``scheduler.gate_alpha``.
    Needs the per-email outcomes of both models (``outcomes``). Where the two differ on
    fewer than 4 emails the test cannot reach 0.1 (1/2^3 > 0.1), so a candidate behind by
    three emails or fewer promotes: on a slice of 190 that is under 2 points, the noise
    this rule is for; on a slice of 20 it is 15 points, so prefer margins while the
    held-out slice is tiny.

The first model always promotes. Every model's threshold is certified on its own
validation data, but choosing among models by coverage favours a candidate whose
calibration draw was lucky (a threshold too low): for a clearly worse candidate, the rare
promotions broke the promise about as often as delta allows; the model served after the
gate stayed far inside it (README, "Gate" under "The student classifier";
``scripts/bench/gatenoise --val``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GATE_RULES = ("margins", "sign_test")


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class Outcomes:
    """Per held-out email: does the model agree with the teacher, does it handle it alone."""
    agrees: Sequence[bool]
    handles: Sequence[bool]


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test: P(at least ``worse`` of the ``worse + better`` discordant
    emails go against the candidate | both models equally good)."""
    from scipy.stats import binom

    n = worse + better
    if n == 0:
        return 1.0
    return float(binom.sf(worse - 1, n, 0.5))


@dataclass(frozen=True)
class SignTest:
    """The candidate against the active model on one measure, email by email."""
    worse: int      # emails where only the active model succeeds
    better: int     # emails where only the candidate does
    p: float        # sign_test_p(worse, better)

    def significantly_worse(self, alpha: float) -> bool:
        return self.worse > self.better and self.p <= alpha


def sign_test(cand: Sequence[bool], active: Sequence[bool]) -> SignTest:
    """Paired sign test of the candidate's per-email outcomes against the active model's."""
    if len(cand) != len(active):
        raise ValueError(f"paired outcomes differ in length: {len(cand)} vs {len(active)}")
    worse = sum(1 for c, a in zip(cand, active) if a and not c)
    better = sum(1 for c, a in zip(cand, active) if c and not a)
    return SignTest(worse, better, sign_test_p(worse, better))


def gate(candidate: dict, active: dict | None, *, agreement_margin: float = 0.0,
         coverage_margin: float = 0.0, rule: str = "margins", alpha: float = 0.1,
         outcomes: tuple[Outcomes, Outcomes] | None = None) -> GateDecision:
    """``candidate``/``active``: metrics with ``accuracy`` and ``coverage`` (at stored
    thresholds) measured on the same held-out examples; ``outcomes``: (candidate, active)
    per-email outcomes on those examples, required by ``rule="sign_test"``."""
    if rule not in GATE_RULES:
        raise ValueError(f"unknown gate rule {rule!r}: use one of {', '.join(GATE_RULES)}")
    if active is None:
        return GateDecision(True, "first model: nothing to compare against")
    acc_c, acc_a = candidate["accuracy"], active["accuracy"]
    cov_c, cov_a = candidate["coverage"], active["coverage"]
    summary = f"agreement {acc_c:.4f} vs {acc_a:.4f}, coverage {cov_c:.4f} vs {cov_a:.4f}"
    if rule == "sign_test":
        if outcomes is None:
            raise ValueError("the sign_test gate needs both models' per-email outcomes")
        oc, oa = outcomes
        problems, tests = [], []
        for what, c, a in (("agreement", oc.agrees, oa.agrees),
                           ("coverage", oc.handles, oa.handles)):
            t = sign_test(c, a)
            tests.append(f"{what} {t.better} better / {t.worse} worse (p={t.p:.3f})")
            if t.significantly_worse(alpha):
                problems.append(f"{what} worse: {t.worse} emails against {t.better} "
                                f"(sign test p={t.p:.3f} <= {alpha})")
        if problems:
            return GateDecision(False, "; ".join(problems) + f" [{summary}]")
        return GateDecision(True, f"{summary}; {', '.join(tests)}: not significantly worse "
                                  f"at {alpha}")
    problems = []
    if acc_c < acc_a - agreement_margin:
        problems.append(f"agreement {acc_c:.4f} < active {acc_a:.4f} - margin "
                        f"{agreement_margin:.4f}")
    if cov_c < cov_a - coverage_margin:
        problems.append(f"coverage {cov_c:.4f} < active {cov_a:.4f} - margin "
                        f"{coverage_margin:.4f}")
    if problems:
        return GateDecision(False, "; ".join(problems))
    return GateDecision(True, f"{summary}: no worse")
