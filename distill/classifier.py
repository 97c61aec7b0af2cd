"""The student classifier as the daemon uses it: load a version directory, classify emails.

>>> clf = Classifier.load(state_dir / "models" / "clf-20260101-000000-ab12")  # doctest: +SKIP
>>> [t] = clf.classify([Email(id="1", subject="Refund?", new_text="I was charged twice")])
>>> t.category, t.confidence["category"], clf.handles_alone(t)               # doctest: +SKIP
('billing', 0.991, True)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from distill.data import LabelSpace, bucketed_batches, pad
from distill.errors import ModelFormatError
from distill.lexical import Lexical
from distill.memory import Memory
from distill.model import HEADS, StudentModel, autocast_for, pick_device
from storage.datasets import email_text
from storage.types import Email, Triage

META = "meta.json"
WEIGHTS = "model.safetensors"


def missing_files(version_dir: str | Path) -> list[str]:
    """The files a classifier version needs that ``version_dir`` lacks (empty: loadable)."""
    return [n for n in (META, WEIGHTS) if not (Path(version_dir) / n).is_file()]


class Classifier:
    """Implements :class:`agent.protocols.StudentClassifier` (plus thresholds)."""

    def __init__(self, model: StudentModel, tokenizer, labels: LabelSpace, *, version: str,
                 temperatures: dict[str, float], thresholds: dict[str, dict],
                 max_input_tokens: int, device: torch.device, batch_size: int = 32,
                 bf16: bool = True, metrics: dict | None = None, config: dict | None = None,
                 memory=None, lexical=None):
        self.model = model.eval()
        self.memory = memory  # distill.memory.Memory, or None (trained without one)
        self.lexical = lexical  # distill.lexical.Lexical, or None (trained without one)
        self.tokenizer = tokenizer
        self.labels = labels
        self.version = version
        self.temperatures = temperatures
        self.thresholds = thresholds
        self.max_input_tokens = max_input_tokens
        self.device = device
        self.batch_size = batch_size
        self.bf16 = bf16
        self.metrics = metrics or {}
        self.config = config or {}

    @classmethod
    def load(cls, version_dir: str | Path, device: str = "auto", batch_size: int = 32,
             max_input_tokens: int | None = None, num_threads: int | None = None) -> "Classifier":
        """Load a version directory written by ``distill.train`` (its name is the version)."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        d = Path(version_dir)
        if missing_files(d):
            raise ModelFormatError(f"{d} is not a classifier version (needs {META} and "
                                   f"{WEIGHTS}); train one with `understudy retrain`")
        meta = json.loads((d / META).read_text())
        labels = LabelSpace.from_dict(meta["labels"])
        if num_threads:
            torch.set_num_threads(num_threads)
        dev = pick_device(device)
        model = StudentModel.from_config_dir(d, labels.sizes())
        model.load_state_dict(load_file(str(d / WEIGHTS)))
        model.to(dev)
        memory = Memory.load(d, model)
        if memory is not None:
            memory.to(dev)
        tok = AutoTokenizer.from_pretrained(str(d))
        return cls(model, tok, labels, version=d.name, temperatures=meta["temperatures"],
                   thresholds=meta["thresholds"],
                   max_input_tokens=max_input_tokens or meta["max_input_tokens"],
                   device=dev, batch_size=batch_size, metrics=meta.get("metrics"),
                   config=meta.get("config"), memory=memory, lexical=Lexical.load(d))

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def probabilities(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Calibrated probabilities per head, (N, classes), in input order."""
        if not texts:
            return {h: torch.empty(0, len(self.labels.classes(h))) for h in HEADS}
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_input_tokens)[
            "input_ids"]
        out = {h: torch.empty(len(ids), len(self.labels.classes(h))) for h in HEADS}
        lex = self.lexical.probabilities(texts) if self.lexical is not None else {}
        for batch in bucketed_batches([len(s) for s in ids], self.batch_size, shuffle=False):
            input_ids, mask = pad([ids[i] for i in batch], self.tokenizer.pad_token_id)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            emb = None
            with autocast_for(self.device, self.bf16):
                if self.memory is None:
                    logits = self.model(input_ids, mask)
                else:   # the bottom blocks are shared by the classifier and the memory
                    k = self.memory.start
                    hidden = self.model.bottom(input_ids, mask, k)
                    logits = self.model.top(hidden, mask, k)
                    emb = self.memory.embed(self.model, hidden, mask)
            index = torch.tensor(batch)
            sim = None if emb is None else self.memory.similarity(emb)
            for h in HEADS:
                t = float(self.temperatures.get(h, 1.0))
                p = torch.softmax(logits[h].float() / t, -1)
                if emb is not None:
                    p = self.memory.mix(p, emb, h, sim=sim)
                if h in lex:
                    p = self.lexical.mix(p.cpu(), lex[h][index], h)
                out[h][index] = p.cpu()
        return out

    def classify(self, emails: Sequence[Email]) -> list[Triage]:
        t0 = time.perf_counter()
        texts = [email_text(e.subject, e.new_text or e.text) for e in emails]
        probs = self.probabilities(texts)
        per_email_ms = (time.perf_counter() - t0) * 1000 / max(1, len(emails))
        cats, pris = self.labels.category, self.labels.priority
        out = []
        for i in range(len(emails)):
            pc, pp, pn = probs["category"][i], probs["priority"][i], probs["needs_reply"][i]
            conf = {"category": float(pc.max()), "priority": float(pp.max()),
                    "needs_reply": float(pn.max())}
            pri = pris[int(pp.argmax())] if self._trained("priority") else self._default_pri()
            out.append(Triage(
                category=cats[int(pc.argmax())], priority=pri,
                needs_reply=bool(pn.argmax()) if self._trained("needs_reply") else False,
                category_probs={c: float(p) for c, p in zip(cats, pc.tolist()) if p >= 1e-4},
                confidence={h: v for h, v in conf.items() if self._trained(h)},
                model_version=self.version, latency_ms=per_email_ms))
        return out

    # ---- routing helpers -------------------------------------------------------------------
    def _trained(self, head: str) -> bool:
        return bool(self.thresholds.get(head, {}).get("trained", False))

    def _default_pri(self) -> str:
        pris = self.labels.priority
        return "normal" if "normal" in pris else pris[len(pris) // 2]

    def threshold(self, head: str) -> float | None:
        return self.thresholds.get(head, {}).get("threshold")

    def handles_alone(self, triage: Triage) -> bool:
        """True when every trained head's confidence clears its certified threshold.

        Heads that never saw a label (e.g. no teacher ever gave a priority) do not vote;
        their output is a default and the confidence dict omits them.
        """
        for head in HEADS:
            if not self._trained(head):
                continue
            t = self.threshold(head)
            if t is None or triage.confidence.get(head, 0.0) < t:
                return False
        return True
