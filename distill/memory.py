"""The student's memory: nearest training examples by the *pretrained* encoder's sentence
embedding, mixed into the classifier's probabilities.

all-MiniLM-L6-v2 was trained for sentence similarity; fine-tuning turns its top blocks into
a classifier. Kept as they were, the same top blocks give a second, independent view of an
email: which labelled emails it resembles. Mixing that view's vote into the classifier's
probabilities ranks emails by confidence better, which is what the certified threshold pays
for. On Banking77 (200 calibration sets of 800 drawn from 2,798 emails; README, "The
student classifier"), weight 0.3 raised the mean certified coverage at 2% risk from 21.5%
to 35.8% for a 10-per-intent student, from 55.4% to 61.2% for one trained on 2,000 emails
and from 73.4% to 76.7% for a full-data one.

Cost: the frozen bottom blocks are shared, so the memory adds the pretrained blocks above
them (1 of MiniLM's 6 with the default ``freeze_layers`` 5) to each forward pass, plus one
(N x 384) similarity product; the version directory gains those blocks' weights (~7 MB
per block, fp32) and the keys (N x 384 fp16, 7.7 MB for 10,000 examples). The vote needs the
whole pretrained encoder's embedding: taken from a lower block it is free but worse than
no memory (``scripts/bench/memory_depth``).

The mixture per head: ``p = (1 - w) * softmax(logits / T) + w * knn``, then a second
temperature, fitted on validation like the first, on ``log p``; thresholds are chosen on
the result. ``knn`` is the labels of the ``k`` nearest training examples (cosine
similarity), weighted by ``softmax(similarity / tau)``.

>>> mem = Memory.build(raw_blocks, start=4, keys=emb, labels={"category": y}, k=10,
...                    tau=0.05, weight=0.3)                             # doctest: +SKIP
>>> mixed = mem.mix(probs, mem.embed(model, hidden, mask))               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from distill.calibrate import mix_views

MEMORY_FILE = "memory.safetensors"
MEMORY_META = "memory.json"


class Memory(nn.Module):
    def __init__(self, blocks: nn.ModuleList, *, start: int, keys: torch.Tensor,
                 labels: dict[str, torch.Tensor], k: int = 10, tau: float = 0.05,
                 weight: float = 0.3, mix_temperatures: dict[str, float] | None = None):
        super().__init__()
        self.blocks = blocks.eval()
        for p in self.blocks.parameters():
            p.requires_grad_(False)
        self.start = start
        self.register_buffer("keys", keys)          # (N, H), L2-normalised
        self.heads = list(labels)                   # per head (N,) class index, <0: none
        for h, y in labels.items():
            self.register_buffer(f"label_{h}", y.long())
        self.k, self.tau, self.weight = k, tau, weight
        self.mix_temperatures = dict(mix_temperatures or {})

    @classmethod
    def pretrained_top(cls, model, start: int) -> nn.ModuleList:
        """A frozen copy of the encoder's blocks from ``start`` on, as they are now (call
        before training changes them)."""
        return copy.deepcopy(model.blocks()[start:]).eval()

    def embed(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pretrained sentence embedding from the shared bottom's output, normalised."""
        return pretrained_embedding(model, self.blocks, hidden, attention_mask)

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, N) cosine similarity to every key; compute once per batch for all heads."""
        return emb.float() @ self.keys.float().T

    def knn(self, emb: torch.Tensor, head: str, n_classes: int,
            sim: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, classes) vote of the nearest labelled training examples, or None."""
        if head not in self.heads:
            return None
        y = getattr(self, f"label_{head}")
        have = y >= 0
        if int(have.sum()) == 0:
            return None
        sim = self.similarity(emb) if sim is None else sim
        if not bool(have.all()):
            sim, y = sim[:, have], y[have]
        v, i = sim.topk(min(self.k, len(y)), dim=-1)
        w = torch.softmax(v / self.tau, dim=-1)
        return torch.zeros(len(emb), n_classes, device=emb.device).scatter_add_(1, y[i], w)

    def mix(self, probs: torch.Tensor, emb: torch.Tensor, head: str,
            temperature: float | None = None, sim: torch.Tensor | None = None) -> torch.Tensor:
        """The mixed, recalibrated probabilities of one head (``probs`` calibrated)."""
        vote = self.knn(emb, head, probs.shape[-1], sim)
        if vote is None:
            return probs
        t = self.mix_temperatures.get(head, 1.0) if temperature is None else temperature
        return mix_views(probs, vote, self.weight, t)

    # ---- files ------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"blocks.{k}": v.contiguous().cpu() for k, v in
                   self.blocks.state_dict().items()}
        tensors["keys"] = self.keys.to(torch.float16).contiguous().cpu()
        tensors.update({f"labels.{h}": getattr(self, f"label_{h}").contiguous().cpu()
                        for h in self.heads})
        save_file(tensors, str(Path(out_dir) / MEMORY_FILE))
        (Path(out_dir) / MEMORY_META).write_text(json.dumps(
            {"start": self.start, "k": self.k, "tau": self.tau, "weight": self.weight,
             "n": len(self.keys), "mix_temperatures": self.mix_temperatures}, indent=2))

    @classmethod
    def load(cls, out_dir: Path, model) -> "Memory | None":
        """The memory saved next to a classifier, or None (trained without one)."""
        from safetensors.torch import load_file

        d = Path(out_dir)
        if not (d / MEMORY_FILE).exists():
            return None
        meta = json.loads((d / MEMORY_META).read_text())
        tensors = load_file(str(d / MEMORY_FILE))
        blocks = copy.deepcopy(model.blocks()[meta["start"]:])
        blocks.load_state_dict({k[len("blocks."):]: v for k, v in tensors.items()
                                if k.startswith("blocks.")})
        labels = {k[len("labels."):]: v for k, v in tensors.items() if k.startswith("labels.")}
        return cls(blocks, start=meta["start"], keys=tensors["keys"].float(), labels=labels,
                   k=meta["k"], tau=meta["tau"], weight=meta["weight"],
                   mix_temperatures=meta.get("mix_temperatures"))


@torch.no_grad()
def pretrained_embedding(model, blocks: nn.ModuleList, hidden: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` (the shared bottom's output) through the pretrained ``blocks``,
    mean-pooled and normalised: the memory's keys and queries."""
    from distill.model import _mean_pool

    out = model._run_blocks(hidden, attention_mask, blocks)
    return nn.functional.normalize(_mean_pool(out.float(), attention_mask), dim=-1)
