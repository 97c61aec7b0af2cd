"""Measure a classifier on labelled examples: agreement, calibration, coverage, latency.

>>> report = evaluate(clf, read_records_file(Path("test.jsonl")))   # doctest: +SKIP
>>> report["accuracy"], report["coverage_at_risk"]["0.02"]          # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from distill.calibrate import ece
from distill.model import HEADS
from distill.thresholds import coverage_at_risk, selective
from storage.datasets import TrainingExample
from storage.types import Email

RISKS = (0.01, 0.02, 0.05)


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Mean F1 over the classes that occur in ``gold`` or ``pred``."""
    f1s = []
    for c in np.union1d(pred, gold):
        tp = np.sum((pred == c) & (gold == c))
        fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor,
                       threshold: float | None) -> dict:
    """Accuracy, macro-F1, ECE, selective metrics at ``threshold`` and hindsight coverage.

    ``labels`` may hold -1 for categories the model does not know (always an error).
    """
    conf, pred = probs.max(-1)
    correct = (pred == labels).numpy()
    conf_np = conf.numpy()
    known = labels >= 0
    cov, risk = selective(conf_np, correct, threshold) if threshold is not None else (0.0, 0.0)
    return {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()) if len(labels) else 0.0,
        "macro_f1": macro_f1(pred.numpy(), labels.numpy()),
        "ece": ece(probs[known], labels[known]) if known.any() else 0.0,
        "threshold": threshold,
        "coverage": cov,
        "selective_risk": risk,
        "coverage_at_risk": {str(r): coverage_at_risk(conf_np, correct, r) for r in RISKS},
    }


def category_targets(clf, examples: Sequence[TrainingExample]) -> torch.Tensor:
    """The records' categories as the classifier's class indices (-1: not in its taxonomy)."""
    index = {c: i for i, c in enumerate(clf.labels.category)}
    return torch.tensor([index.get(e.category, -1) for e in examples])


def scored(clf, examples: Sequence[TrainingExample]) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the category head's calibrated confidence and whether its prediction
    agrees with the record (what thresholds and the gate are judged on)."""
    probs = clf.probabilities([e.text for e in examples])["category"]
    conf, pred = probs.max(-1)
    return conf.numpy(), (pred == category_targets(clf, examples)).numpy()


def evaluate(clf, examples: Sequence[TrainingExample], *, latency_sample: int = 200) -> dict:
    """Every figure `understudy eval` prints, for the category head (plus the others when
    the examples carry their labels)."""
    texts = [e.text for e in examples]
    t0 = time.perf_counter()
    probs = clf.probabilities(texts)
    batch_s = time.perf_counter() - t0
    y = category_targets(clf, examples)
    report = metrics_from_probs(probs["category"], y, clf.threshold("category"))
    report["unknown_categories"] = int((y < 0).sum())
    heads = {}
    for h in HEADS[1:]:
        classes = clf.labels.classes(h)
        vals = [(i, e.priority if h == "priority" else
                 (None if e.needs_reply is None else str(e.needs_reply).lower()))
                for i, e in enumerate(examples)]
        vals = [(i, v) for i, v in vals if v is not None and v in classes]
        if vals and clf._trained(h):
            rows = torch.tensor([i for i, _ in vals])
            yh = torch.tensor([classes.index(v) for _, v in vals])
            heads[h] = metrics_from_probs(probs[h][rows], yh, clf.threshold(h))
    report["heads"] = heads
    # Handled alone = every trained head clears its threshold (what the router does).
    handled = torch.ones(len(examples), dtype=torch.bool)
    for h in HEADS:
        if clf._trained(h):
            t = clf.threshold(h)
            handled &= probs[h].max(-1).values >= (t if t is not None else 2.0)
    report["coverage_all_heads"] = float(handled.float().mean()) if len(examples) else 0.0
    report["emails_per_s_batched"] = len(examples) / batch_s if batch_s > 0 else None
    report.update(latency(clf, examples[:latency_sample]))
    report["model_version"] = clf.version
    return report


def latency(clf, examples: Sequence[TrainingExample]) -> dict:
    """p50/p99 of the whole classify path, one email per call (what a lone new mail sees)."""
    if not examples:
        return {"latency_ms_p50": None, "latency_ms_p99": None}
    emails = [Email(id=e.id, subject=e.subject, new_text=e.body) for e in examples]
    clf.classify(emails[:2])  # warm-up: first call at a shape builds kernels
    times = []
    for em in emails:
        t0 = time.perf_counter()
        clf.classify([em])
        times.append((time.perf_counter() - t0) * 1000)
    return {"latency_ms_p50": float(np.percentile(times, 50)),
            "latency_ms_p99": float(np.percentile(times, 99))}
