"""Confidence thresholds with a finite-sample guarantee (Learn then Test, fixed sequence).

For a threshold lambda the student handles alone the mail whose confidence is >= lambda;
its risk is the rate of disagreement with the teacher on that mail. We test the null
hypotheses "risk(lambda) > epsilon" along a grid from the strictest threshold downwards,
each with a one-sided Clopper-Pearson upper bound at level delta, and stop at the first
one we cannot reject. Fixed-sequence testing needs no multiplicity correction, so with
probability at least 1 - delta the chosen threshold's true risk is at most epsilon
(Angelopoulos et al., "Learn then Test", 2021).

>>> choice = choose_threshold(conf, correct, epsilon=0.02, delta=0.05)   # doctest: +SKIP
>>> choice.threshold, choice.coverage, choice.bound                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import count, islice

import numpy as np
from scipy.stats import beta

NEVER = 1.01  # a threshold no probability reaches: the head never handles mail alone


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided (1 - delta) upper confidence bound on a binomial rate."""
    return float(_upper_bounds(np.array([errors]), np.array([n]), delta)[0])


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    epsilon: float
    delta: float
    coverage: float        # fraction of the calibration data at or above the threshold
    risk: float            # empirical disagreement among those
    bound: float           # Clopper-Pearson upper bound on that risk (<= epsilon if valid)
    n: int
    first_test: int = 0    # examples the first test handled (where the sequence started)
    start: float = 0.0     # the start as a share of n (with "auto": the one it chose)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_threshold(confidence, correct, *, epsilon: float = 0.02, delta: float = 0.05,
                     grid_size: int = 200, start_fraction: float | str = 0.0) -> ThresholdChoice:
    """The lowest threshold on the grid whose risk is certified below ``epsilon``.

    The grid is fixed before looking at errors (quantiles of the confidences only, which
    do not use the labels), strictest first. If even the strictest fails, the head never
    handles mail alone (threshold > 1).

    ``start_fraction`` starts the sequence deeper, at :func:`first_test_size`: thresholds
    that would handle fewer examples are not tested. That size depends on counts only, so
    the guarantee holds. What it buys is tolerance for a few confident errors among the
    most confident examples: started at the top, the first test needs its 149 examples
    (at 2%, 95%) free of errors, and one disputed label there ends the sequence. The price
    is that no coverage below the start can be certified, and that a cluster of errors
    just above the start ends the sequence there.

    ``"auto"`` picks the start from the confidences alone (:func:`auto_start`).
    """
    if isinstance(start_fraction, str):
        if start_fraction != AUTO:
            raise ValueError(f"start_fraction: {start_fraction!r} is neither a number nor "
                             f"{AUTO!r}")
        start_fraction = auto_start(confidence, epsilon=epsilon, delta=delta,
                                    grid_size=grid_size)
    start = float(start_fraction)
    conf = np.asarray(confidence, dtype=float)
    wrong = ~np.asarray(correct, dtype=bool)
    n = len(conf)
    if n == 0:
        return ThresholdChoice(NEVER, epsilon, delta, 0.0, 0.0, 1.0, 0, start=start)
    k_start = first_test_size(n, epsilon, delta, start)
    qs = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, grid_size + 1)))[::-1]
    order = np.argsort(-conf)
    sorted_conf, cum_wrong = conf[order], np.cumsum(wrong[order])
    ks = np.searchsorted(-sorted_conf, -qs, side="right")        # count conf >= lam
    errs = cum_wrong[np.maximum(ks - 1, 0)]
    bounds = _upper_bounds(errs, ks, delta)                      # one vectorised call
    best = ThresholdChoice(NEVER, epsilon, delta, 0.0, 0.0, 1.0, n, k_start, start)
    for lam, k, e, ub in zip(qs, ks, errs, bounds):
        if k < k_start:
            # Too few examples above lam to certify epsilon even with no errors, or fewer
            # than the chosen start: not a test at all (decided from counts alone, so the
            # sequence stays valid).
            continue
        if ub > epsilon:
            break
        best = ThresholdChoice(float(lam), epsilon, delta, int(k) / n, int(e) / int(k),
                               float(ub), n, k_start, start)
    return best


def _upper_bounds(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """:func:`clopper_pearson_upper` over arrays of counts."""
    errors, n = np.asarray(errors), np.asarray(n)
    some = (n > 0) & (errors < n)
    out = np.ones(len(n))
    out[some] = beta.ppf(1.0 - delta, errors[some] + 1, n[some] - errors[some])
    return out


AUTO = "auto"
AUTO_CANDIDATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def auto_start(confidence, *, epsilon: float = 0.02, delta: float = 0.05,
               candidates: Sequence[float] = AUTO_CANDIDATES, draws: int = 200,
               grid_size: int = 200, seed: int = 0) -> float:
    """The start that certifies most on average if the confidences were honest.

    Where a fixed sequence should start depends on where the errors lie: from the top it
    needs the first 149 free of them, from 40% a cluster just above that point ends it.
    This simulates the calibration set ``draws`` times with each example wrong with
    probability ``1 - confidence`` (the calibrated model's own estimate), runs the
    sequence from every candidate start on each, and returns the start whose mean
    certified coverage is highest (the shallower one on ties). It reads the confidences
    only, never which examples are wrong, so, like the grid, it is fixed before the test
    sees a label and the guarantee holds.

    On draws from a replay's test file it chose the best of the fixed starts every time
    (``scripts/bench/valsize --starts 0 0.4 auto``).
    """
    conf = np.asarray(confidence, dtype=float)
    if len(conf) == 0:
        return float(candidates[0])
    order = np.argsort(-conf)
    wrong = np.empty((draws, len(conf)), dtype=bool)    # drawn in confidence order
    wrong[:, order] = np.random.default_rng(seed).random(wrong.shape) < 1.0 - conf[order]
    mean_cov = _sequence_coverage(conf, wrong, candidates, epsilon, delta, grid_size).mean(0)
    return float(candidates[int(np.argmax(mean_cov))])    # argmax: the first of equals


def _sequence_coverage(conf: np.ndarray, wrong: np.ndarray, starts: Sequence[float],
                       epsilon: float, delta: float, grid_size: int) -> np.ndarray:
    """(rows of ``wrong``, starts): the coverage :func:`choose_threshold` certifies from
    each start for each row of error indicators, all at once."""
    n = len(conf)
    order = np.argsort(-conf)
    sorted_conf = conf[order]
    qs = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, grid_size + 1)))[::-1]
    ks = np.searchsorted(-sorted_conf, -qs, side="right")
    ks = ks[ks > 0]                                   # counts handled, strictest first
    allowed = _allowed_errors(n, epsilon, delta)
    cum = np.cumsum(wrong[:, order], axis=1)
    passed = cum[:, ks - 1] <= allowed[ks][None, :]   # (rows, grid)
    out = np.zeros((len(wrong), len(starts)))
    for j, s in enumerate(starts):
        tested = ks >= first_test_size(n, epsilon, delta, s)
        k_t, ok = ks[tested], passed[:, tested]
        if k_t.size:
            runs = np.cumprod(ok, axis=1).sum(axis=1)  # tests passed before the first failure
            out[:, j] = np.where(runs > 0, k_t[np.maximum(runs - 1, 0)], 0) / n
    return out


def _allowed_errors(n: int, epsilon: float, delta: float) -> np.ndarray:
    """For k = 0..n, the most errors among k handled examples that still certify
    ``epsilon`` (-1: none can)."""
    allowed = np.full(n + 1, -1, dtype=np.int64)
    for errors, k in enumerate(_certifiable_counts(epsilon, delta)):
        if k > n:
            break
        allowed[k:] = errors
    return allowed


def min_certifiable(epsilon: float, delta: float, errors: int = 0) -> int:
    """The fewest handled examples that can certify ``epsilon`` with ``errors`` among them.

    >>> [min_certifiable(0.02, 0.05, e) for e in range(5)]
    [149, 236, 313, 386, 456]
    """
    return next(islice(_certifiable_counts(epsilon, delta), errors, None))


_COUNTS: dict[tuple[float, float], list[int]] = {}   # (epsilon, delta) -> counts found so far


def _certifiable_counts(epsilon: float, delta: float) -> Iterator[int]:
    """:func:`min_certifiable` for 0, 1, 2, ... errors, in one walk up the counts (each is
    at least the one before, so the walk never goes back). The walk costs a Clopper-Pearson
    bound per count, so the counts found are kept for the next call."""
    known = _COUNTS.setdefault((epsilon, delta), [])
    if not known:
        known.append(int(np.ceil(np.log(delta) / np.log1p(-epsilon))))  # zero: closed form
    for errors in count(0):
        if errors == len(known):
            k = known[-1]
            while clopper_pearson_upper(errors, k, delta) > epsilon:
                k += 1
            known.append(k)
        yield known[errors]


def first_test_size(n: int, epsilon: float, delta: float, fraction: float) -> int:
    """How many examples the first test of the fixed sequence handles.

    The largest of the counts :func:`min_certifiable` gives for 0, 1, 2, ... errors that is
    at most ``fraction`` of the ``n`` calibration examples, and never fewer than the
    zero-error count (149 at 2%, 95%). Snapping to those counts matters: the first test
    tolerates ``e`` errors from ``min_certifiable(..., e)`` examples on, so starting just
    below one of them tolerates an error less for almost the same coverage.

    >>> [first_test_size(n, 0.02, 0.05, 0.4) for n in (300, 600, 894, 1000)]
    [149, 236, 313, 386]
    """
    counts = _certifiable_counts(epsilon, delta)
    start = next(counts)
    while (k := next(counts)) <= fraction * n:
        start = k
    return start


def calibration_size(n_total: int, *, epsilon: float, delta: float, fraction: float = 0.1,
                     cap: float = 0.4, floor_multiple: int = 9) -> int:
    """How many of ``n_total`` labelled examples to set aside for calibration.

    ``fraction`` of them, but at least ``floor_multiple`` times :func:`min_certifiable`
    (1,341 at epsilon 2%, delta 5%), and never more than ``cap`` of the data.

    Why so many: the fixed sequence stops at its first failure, and its first test needs
    the ``min_certifiable`` most confident examples (149) to hold no error at all. With a
    few hundred examples a single confident mistake among them decides: drawing validation
    sets from a replay's test file, a 300-example set certified a threshold for the same
    88%-accurate student in 53% of the draws (mean coverage 32%), 600 in 97% (43%), 900 in
    every draw (60%) (``scripts/bench/valsize``). More keeps paying: with the test started
    at 40% (``start_fraction``), two replay students (90-91% accurate) certified 54-58% of
    the mail on average from 894 examples and 73-79% from 1,341. They are taken from
    training: with 4,000 labels the student trains on about 2,300 instead of 2,700. In two
    seeded Banking77 replays the larger set with the sign-test gate cut teacher calls by 3
    points and left a final student covering 65-70% instead of 57-62% (README, "How many
    calibration labels").

    >>> [calibration_size(n, epsilon=0.02, delta=0.05) for n in (1000, 2000, 4000, 20000)]
    [400, 800, 1341, 2000]
    """
    want = max(round(n_total * fraction), floor_multiple * min_certifiable(epsilon, delta))
    return max(1, min(want, round(n_total * cap)))


def coverage_at_risk(confidence, correct, risk: float) -> float:
    """Hindsight coverage: the largest fraction handled with empirical risk <= ``risk``."""
    conf = np.asarray(confidence, dtype=float)
    if len(conf) == 0:
        return 0.0
    order = np.argsort(-conf, kind="stable")
    wrong = (~np.asarray(correct, dtype=bool))[order]
    sc = conf[order]
    rates = np.cumsum(wrong) / np.arange(1, len(conf) + 1)
    # Only cut between distinct confidences: ties are handled together by a threshold.
    cut_ok = np.append(sc[1:] < sc[:-1], True)
    ok = np.nonzero((rates <= risk) & cut_ok)[0]
    return float((ok[-1] + 1) / len(conf)) if len(ok) else 0.0


def selective(confidence, correct, threshold: float) -> tuple[float, float]:
    """(coverage, selective risk) at a threshold."""
    conf = np.asarray(confidence, dtype=float)
    handled = conf >= threshold
    if not handled.any():
        return 0.0, 0.0
    return float(handled.mean()), float((~np.asarray(correct, dtype=bool)[handled]).mean())
