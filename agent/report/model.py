"""What a report shows, independent of where it came from (the database or a simulate run).

Every series is plain numbers and labels, so the collectors (``from_db``,
``from_simulation``) and the renderer (``plots``, ``render``) never share ORM rows. An
empty series means "no data yet": the renderer draws a placeholder panel, never crashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouteBucket:
    """Mail decided in one time bucket (or one window of a replay), by route."""

    label: str
    student: int = 0
    teacher: int = 0
    human: int = 0

    @property
    def total(self) -> int:
        return self.student + self.teacher + self.human


@dataclass(frozen=True)
class AuditBucket:
    """Audits (teacher in shadow on student-handled mail) and how many disagreed."""

    label: str
    n: int
    disagreements: int


@dataclass(frozen=True)
class SpendPoint:
    """Cumulative spend after ``emails`` emails: the cascade's and teacher-only's."""

    emails: int
    label: str
    teacher_usd: float
    teacher_only_usd: float


@dataclass(frozen=True)
class CoverageRisk:
    """A coverage-risk curve: at each confidence threshold, share handled and its error."""

    coverage: tuple[float, ...]
    risk: tuple[float, ...]
    operating_point: tuple[float, float] | None = None   # (coverage, risk) at the threshold
    model_version: str | None = None
    n: int = 0
    source: str = ""


@dataclass(frozen=True)
class Confusion:
    labels: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]                  # rows: reference, cols: student
    source: str = ""

    @property
    def n(self) -> int:
        return sum(map(sum, self.matrix))


@dataclass(frozen=True)
class LatencyStat:
    name: str
    n: int
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class ReportData:
    title: str
    source: str
    generated_at: str
    epsilon: float | None = None
    summary: dict[str, object] = field(default_factory=dict)
    routes: tuple[RouteBucket, ...] = ()
    audits: tuple[AuditBucket, ...] = ()
    spend: tuple[SpendPoint, ...] = ()
    coverage_risk: CoverageRisk | None = None
    confusion: Confusion | None = None
    latency: tuple[LatencyStat, ...] = ()
    curve: tuple[dict, ...] = ()                        # per retrain (simulate only)
    notes: tuple[str, ...] = ()


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default).

    >>> lo, hi = wilson(1, 100); round(lo, 4), round(hi, 4)
    (0.0018, 0.0545)
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def percentiles(samples: list[float], name: str) -> LatencyStat | None:
    """p50/p90/p99 by the nearest-rank rule; None for no samples."""
    if not samples:
        return None
    xs = sorted(samples)

    def rank(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    return LatencyStat(name=name, n=len(xs), p50=rank(0.50), p90=rank(0.90), p99=rank(0.99))


def coverage_risk_curve(pairs: list[tuple[float, bool]], points: int = 50
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """From (confidence, correct) pairs: coverage and risk when keeping the most confident.

    Sorted by confidence, descending; the k most confident are "handled alone", so
    coverage = k/n and risk = errors among them / k. ``points`` evenly spaced k's.
    """
    if not pairs:
        return (), ()
    ranked = sorted(pairs, key=lambda p: -p[0])
    n = len(ranked)
    errs, cum = 0, []
    for _, ok in ranked:
        errs += 0 if ok else 1
        cum.append(errs)
    ks = sorted({max(1, round(n * i / points)) for i in range(1, points + 1)})
    return (tuple(k / n for k in ks), tuple(cum[k - 1] / k for k in ks))


def confusion_from_pairs(pairs: list[tuple[str, str]], max_labels: int = 20,
                         source: str = "") -> Confusion | None:
    """Confusion of (reference, predicted) pairs over the ``max_labels`` most frequent labels.

    With many classes (Banking77 has 77) a full matrix is unreadable; the rarest labels
    fold into ``(other)`` so every pair is still counted.
    """
    if not pairs:
        return None
    counts: dict[str, int] = {}
    for ref, pred in pairs:
        counts[ref] = counts.get(ref, 0) + 1
        counts[pred] = counts.get(pred, 0) + 1
    keep = sorted(counts, key=lambda c: (-counts[c], c))
    other = len(keep) > max_labels
    keep = keep[: max_labels - 1] if other else keep
    labels = sorted(keep) + (["(other)"] if other else [])
    index = {c: i for i, c in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for ref, pred in pairs:
        m[index.get(ref, len(labels) - 1)][index.get(pred, len(labels) - 1)] += 1
    return Confusion(labels=tuple(labels), matrix=tuple(tuple(r) for r in m), source=source)
