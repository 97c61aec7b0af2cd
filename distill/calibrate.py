"""Temperature scaling per head, and the expected calibration error it is judged by.

>>> t = fit_temperature(val_logits, val_labels)    # doctest: +SKIP
>>> ece(torch.softmax(val_logits / t, -1), val_labels)   # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins."""
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.float().mean().item() * abs(
                conf[in_bin].mean().item() - correct[in_bin].mean().item())
    return total


def mix_views(probs: torch.Tensor, view: torch.Tensor, weight: float,
                temperature: float) -> torch.Tensor:
    """``(1 - weight) * probs + weight * view``, recalibrated: softmax(log(mixture) / T).
    How the memory's vote and the lexical view join the classifier's probabilities."""
    p = (1.0 - weight) * probs + weight * view
    return torch.softmax(p.clamp(min=1e-12).log() / temperature, dim=-1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising validation NLL (one parameter: accuracy is unchanged).

    A coarse grid over log T, then a golden-section refinement: robust where L-BFGS on a
    handful of examples can wander off.
    """
    logits, labels = logits.float(), labels.long()
    if len(labels) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / float(torch.exp(torch.tensor(log_t))), labels).item()

    grid = torch.linspace(-3.0, 3.0, 61).tolist()
    best = min(grid, key=nll)
    lo, hi = best - 0.1, best + 0.1
    g = (5 ** 0.5 - 1) / 2
    for _ in range(30):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(torch.exp(torch.tensor((lo + hi) / 2)))
