"""Distillation loss per head: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE(hard).

Where an example has no soft label the loss is hard cross-entropy alone; gold (human)
labels never carry a soft label (they override the teacher) and weigh ``gold_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.data import IGNORE


def class_weights(targets: torch.Tensor, n_classes: int, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights, softened by ``power`` (0.5 = inverse square root).

    Full inverse frequency over-corrects on small data (a class seen twice would weigh
    hundreds of times more); the square root keeps rare classes visible, and the mean
    weight over the training examples stays 1.
    """
    valid = targets[targets != IGNORE]
    counts = torch.bincount(valid, minlength=n_classes).float().clamp(min=1.0)
    w = counts.pow(-power)
    return w / (w[valid].mean() if len(valid) else 1.0)


def head_loss(logits: torch.Tensor, hard: torch.Tensor, weight: torch.Tensor, *,
              soft: torch.Tensor | None = None, has_soft: torch.Tensor | None = None,
              alpha: float = 0.5, temperature: float = 2.0,
              cls_weight: torch.Tensor | None = None,
              label_smoothing: float = 0.0) -> torch.Tensor:
    """Weighted mean loss over the examples of a batch that carry a label for this head."""
    labelled = hard != IGNORE
    if soft is not None and has_soft is not None:
        labelled = labelled | has_soft
    if not labelled.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, hard.clamp(min=0), weight=cls_weight,
                         label_smoothing=label_smoothing, reduction="none")
    ce = torch.where(hard != IGNORE, ce, torch.zeros_like(ce))
    loss = ce
    if soft is not None and has_soft is not None and has_soft.any() and alpha > 0:
        t = temperature
        # Teacher distribution at temperature T: p^(1/T), renormalised.
        teacher = soft.clamp(min=1e-8).pow(1.0 / t)
        teacher = teacher / teacher.sum(-1, keepdim=True)
        kl = (teacher * (teacher.log() - F.log_softmax(logits / t, -1))).sum(-1) * t * t
        mixed = alpha * kl + (1.0 - alpha) * ce
        loss = torch.where(has_soft, mixed, ce)
    w = weight * labelled.float()
    return (loss * w).sum() / w.sum().clamp(min=1e-8)
