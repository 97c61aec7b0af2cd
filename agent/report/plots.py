"""One matplotlib figure per report panel, returned as PNG bytes (None: no data yet).

The Agg backend is forced so the report renders on a server with no display. Figures
are small (about 760x340 px) and use a colour-blind-safe palette: student blue,
teacher orange, human green.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from agent.report.model import (  # noqa: E402
    AuditBucket, Confusion, CoverageRisk, LatencyStat, RouteBucket, SpendPoint, wilson)
from storage.audits import clopper_pearson  # noqa: E402

STUDENT, TEACHER, HUMAN, GREY = "#0072B2", "#E69F00", "#009E73", "#888888"
SIZE = (7.6, 3.4)
PCT = FuncFormatter(lambda v, _: f"{v:.0%}")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _ticks(ax, labels: list[str], max_ticks: int = 10) -> None:
    step = max(1, len(labels) // max_ticks)
    idx = list(range(0, len(labels), step))
    ax.set_xticks(idx)
    ax.set_xticklabels([labels[i] for i in idx], rotation=30, ha="right", fontsize=8)


def routes(buckets: tuple[RouteBucket, ...], xlabel: str) -> bytes | None:
    """Stacked bars: mail decided by the student alone, the teacher and a human."""
    if not buckets or not any(b.total for b in buckets):
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    x = list(range(len(buckets)))
    s = [b.student for b in buckets]
    t = [b.teacher for b in buckets]
    h = [b.human for b in buckets]
    ax.bar(x, s, color=STUDENT, label="student alone")
    ax.bar(x, t, bottom=s, color=TEACHER, label="teacher")
    if any(h):
        ax.bar(x, h, bottom=[a + b for a, b in zip(s, t)], color=HUMAN, label="human")
    _ticks(ax, [b.label for b in buckets])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("emails")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Mail by route")
    return _png(fig)


def escalation(buckets: tuple[RouteBucket, ...], xlabel: str) -> bytes | None:
    """Share of each bucket's mail decided by the teacher, with its 95% interval."""
    pts = [(i, b) for i, b in enumerate(buckets) if b.total]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    xs = [i for i, _ in pts]
    rates = [b.teacher / b.total for _, b in pts]
    lo_hi = [wilson(b.teacher, b.total) for _, b in pts]
    ax.fill_between(xs, [l for l, _ in lo_hi], [h for _, h in lo_hi], color=TEACHER, alpha=0.2,
                    label="95% interval")
    ax.plot(xs, rates, marker="o", ms=3, color=TEACHER, label="escalated to the teacher")
    _ticks(ax, [b.label for b in buckets])
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PCT)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("escalation rate")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Escalation rate")
    return _png(fig)


def audits(buckets: tuple[AuditBucket, ...], epsilon: float | None, xlabel: str) -> bytes | None:
    """Running audit disagreement (all audits so far) with its exact (Clopper-Pearson) 95%
    band, against ε: the interval `status` and the audit check use.

    Cumulative, not per bucket: a handful of audits per bucket gives intervals too wide
    to read, while the running rate is what the promise is about.
    """
    if not buckets or not any(b.n for b in buckets):
        return None
    xs, rates, los, his, n, k = [], [], [], [], 0, 0
    for i, b in enumerate(buckets):
        n, k = n + b.n, k + b.disagreements
        if n:
            lo, hi = clopper_pearson(k, n)
            xs.append(i)
            rates.append(k / n)
            los.append(lo)
            his.append(hi)
    # Each bucket's value spans its own slot (i - 0.5 .. i + 0.5): the newest, which holds
    # every audit, would otherwise be a step of no width at the right edge.
    edges = [x - 0.5 for x in xs] + [xs[-1] + 0.5]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.fill_between(edges, los + los[-1:], his + his[-1:], color=STUDENT, alpha=0.18,
                    step="post", label="95% interval")
    ax.step(edges, rates + rates[-1:], where="post", color=STUDENT, lw=2,
            label=f"disagreement so far ({k}/{n})")
    if epsilon is not None:
        ax.axhline(epsilon, color="#D55E00", ls="--", lw=1, label=f"promise ε = {epsilon:.0%}")
    _ticks(ax, [b.label for b in buckets])
    ax.set_xlim(-0.5, len(buckets) - 0.5)
    ax.yaxis.set_major_formatter(PCT)
    ax.set_ylim(0, max(0.05, min(1.0, max(his) * 1.1)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("student ≠ teacher (audits)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Audit disagreement (cumulative)")
    return _png(fig)


def coverage_risk(cr: CoverageRisk | None, epsilon: float | None) -> bytes | None:
    if cr is None or not cr.coverage:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    # A few stored points (held-out coverage at fixed risks) get markers; a dense curve not.
    ax.plot(cr.coverage, cr.risk, color=STUDENT, lw=2, label="student",
            marker="o" if len(cr.coverage) < 15 else None, ms=4)
    if cr.operating_point is not None:
        c, r = cr.operating_point
        ax.plot([c], [r], "o", color="#D55E00", ms=7, label=f"threshold: {c:.0%} at {r:.1%}")
    if epsilon is not None:
        ax.axhline(epsilon, color=GREY, ls="--", lw=1, label=f"ε = {epsilon:.0%}")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(PCT)
    ax.yaxis.set_major_formatter(PCT)
    ax.set_xlabel("coverage (share handled by the student alone)")
    ax.set_ylabel("selective risk")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Coverage–risk, model {cr.model_version or '?'} (n={cr.n})")
    return _png(fig)


def confusion(cm: Confusion | None) -> bytes | None:
    if cm is None or cm.n == 0:
        return None
    k = len(cm.labels)
    side = min(9.0, max(4.5, 0.32 * k + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    # Row-normalised so rare and frequent categories read alike; counts go in the cells.
    norm = [[v / max(1, sum(row)) for v in row] for row in cm.matrix]
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    fs = 8 if k <= 12 else 6
    ax.set_xticklabels(cm.labels, rotation=60, ha="right", fontsize=fs)
    ax.set_yticklabels(cm.labels, fontsize=fs)
    if k <= 20:
        for i, row in enumerate(cm.matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=fs - 1,
                            color="white" if norm[i][j] > 0.5 else "black")
    ax.set_xlabel("student")
    ax.set_ylabel("reference (teacher / records)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, format=PCT)
    ax.set_title(f"Confusion (n={cm.n})")
    return _png(fig)


def spend(points: tuple[SpendPoint, ...], xlabel: str) -> bytes | None:
    if not points or not any(p.teacher_only_usd or p.teacher_usd for p in points):
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    xs = [p.emails for p in points]
    ax.plot(xs, [p.teacher_only_usd for p in points], color=GREY, ls="--", lw=2,
            label="teacher only")
    ax.plot(xs, [p.teacher_usd for p in points], color=TEACHER, lw=2, label="cascade (teacher part)")
    ax.fill_between(xs, [p.teacher_usd for p in points], [p.teacher_only_usd for p in points],
                    color=HUMAN, alpha=0.15, label="saved")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cumulative USD")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Teacher spend and savings")
    return _png(fig)


def latency(stats: tuple[LatencyStat, ...]) -> bytes | None:
    if not stats:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    names = [f"{s.name}\n(n={s.n})" for s in stats]
    width = 0.27
    for k, (q, colour) in enumerate((("p50", STUDENT), ("p90", TEACHER), ("p99", "#D55E00"))):
        vals = [getattr(s, q) for s in stats]
        ax.bar([i + (k - 1) * width for i in range(len(stats))], vals, width, color=colour, label=q)
    ax.set_xticks(range(len(stats)))
    ax.set_xticklabels(names, fontsize=8)
    if max(max(s.p99, s.p50) for s in stats) / max(1e-3, min(s.p50 for s in stats)) > 50:
        ax.set_yscale("log")
    ax.set_ylabel("milliseconds")
    ax.legend(fontsize=8)
    ax.set_title("Latency percentiles")
    return _png(fig)
