"""Examples in, tensors out: records files, label spaces, time splits, length-bucketed batches.

>>> ex = read_records_file(Path("teacher.jsonl"))            # doctest: +SKIP
>>> train, val = time_split(ex, val_fraction=0.1)             # newest 10% -> val
>>> train, val = stable_split(ex, val_fraction=0.1)           # 10% by a hash of the id
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from distill.errors import DatasetError
from storage.datasets import TrainingExample

IGNORE = -100


def _example_from_record(r: dict, line: int) -> TrainingExample:
    if not r.get("id") or r.get("body") is None or not r.get("category"):
        raise DatasetError(f"record on line {line} lacks one of id, body, category "
                           "(the three required fields of the interchange format)")
    probs = r.get("category_probs")
    nr = r.get("needs_reply")
    return TrainingExample(
        id=str(r["id"]), subject=str(r.get("subject") or ""), body=str(r["body"]),
        category=str(r["category"]),
        category_probs={str(k): float(v) for k, v in probs.items()} if probs else None,
        priority=r.get("priority") or None, needs_reply=nr if isinstance(nr, bool) else None,
        gold=bool(r.get("gold", False)) or r.get("source") == "human",
        source=str(r.get("source") or "records"),
        representative=bool(r.get("representative", True)))


def read_records_file(path: Path) -> list[TrainingExample]:
    """Teacher records (interchange JSONL) as examples, in file order (= time order).

    Validated by the teacher capability's reader (``agent.teacher.records``) when it is
    installed; its format errors are re-raised as :class:`DatasetError`.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"records file {path} does not exist")
    try:  # the teacher capability owns the format; use its reader when it is installed
        from agent.teacher.records import read_records  # type: ignore
    except ImportError:
        return read_training_file(path)
    out: list[TrainingExample] = []
    try:
        for i, rec in enumerate(read_records(path), 1):
            r = rec if isinstance(rec, dict) else _record_to_dict(rec)
            out.append(_example_from_record(r, i))
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader's own format error
        if e.__class__.__name__ != "RecordsFormatError":
            raise
        raise DatasetError(f"{e}; see the interchange format in the README") from e
    return out


def read_training_file(path: Path) -> list[TrainingExample]:
    """The training subprocess's own input (written by :func:`write_examples`): the
    interchange fields plus ``gold``/``source``, read without the interchange validator
    (a soft label from the SQL log need not name the hard label, nor sum to exactly 1)."""
    return [_example_from_record(r, i) for i, r in _json_lines(Path(path))]


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{i} is not JSON ({e}); one object per line") from e


def read_unlabeled_file(path: Path) -> list[dict]:
    """Unlabeled emails (JSONL: ``id``, ``body``, optional ``subject``; any other field,
    a label included, is ignored) as ``{"id", "subject", "body"}`` dicts, in file order.
    ``retrain --unlabeled`` reads these for the assistant teacher to label."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"unlabeled file {path} does not exist")
    out, seen = [], set()
    for i, r in _json_lines(path):
        if not isinstance(r, dict) or not r.get("id") or r.get("body") is None:
            raise DatasetError(f"{path}:{i} lacks an id or a body (an unlabeled email "
                               'is {"id": ..., "subject": ..., "body": ...})')
        if str(r["id"]) not in seen:
            seen.add(str(r["id"]))
            out.append({"id": str(r["id"]), "subject": str(r.get("subject") or ""),
                        "body": str(r["body"])})
    return out


def _record_to_dict(rec) -> dict:
    if hasattr(rec, "to_dict"):
        return rec.to_dict()
    if hasattr(rec, "__dataclass_fields__"):
        d = asdict(rec)
        if "from_addr" in d and "from" not in d:
            d["from"] = d["from_addr"]
        return d
    return dict(rec)


def write_examples(path: Path, examples: Sequence[TrainingExample]) -> None:
    """Examples as JSONL (interchange fields plus gold/source) for the training subprocess."""
    with Path(path).open("w", encoding="utf-8") as f:
        for e in examples:
            d = asdict(e)
            d.pop("created_at", None)
            f.write(json.dumps(d) + "\n")


@dataclass(frozen=True)
class LabelSpace:
    """The classes of each head, in logit order."""

    category: tuple[str, ...]
    priority: tuple[str, ...]
    needs_reply: tuple[str, ...] = ("false", "true")

    def classes(self, head: str) -> tuple[str, ...]:
        return getattr(self, head)

    def sizes(self) -> dict[str, int]:
        return {h: len(self.classes(h)) for h in ("category", "priority", "needs_reply")}

    def to_dict(self) -> dict:
        return {h: list(self.classes(h)) for h in ("category", "priority", "needs_reply")}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        return cls(tuple(d["category"]), tuple(d["priority"]), tuple(d["needs_reply"]))

    @classmethod
    def build(cls, categories: Sequence[str], priorities: Sequence[str],
              examples: Sequence[TrainingExample]) -> "LabelSpace":
        """The configured taxonomy, plus any category the data uses that it lacks.

        A records file from another taxonomy (Banking77's 77 intents) must still train; the
        daemon only sees the configured names because its teacher only answers with those.
        """
        seen = sorted({e.category for e in examples} - set(categories))
        return cls(tuple(categories) + tuple(seen), tuple(priorities))


def time_split(examples: Sequence[TrainingExample], val_fraction: float,
               min_val: int = 1) -> tuple[list, list]:
    """The newest ``val_fraction`` (examples are oldest first) is validation."""
    n_val = max(min_val, round(len(examples) * val_fraction))
    if len(examples) - n_val < 1:
        raise DatasetError(f"{len(examples)} examples are too few to split off {n_val} for "
                           "validation; label more mail first")
    return list(examples[:-n_val]), list(examples[-n_val:])


def stable_split(examples: Sequence[TrainingExample], val_fraction: float,
                 min_val: int = 1, salt: str = "val") -> tuple[list, list]:
    """Split by a hash of each example's id, order kept: the same id always falls on the
    same side for a given fraction and salt, whenever and however often it is asked, so with
    a fixed fraction an email once held out stays held out as the log grows (why the SQL log
    is split this way: ``distill.pipeline.split_examples``).
    """
    if len(examples) - min_val < 1:
        raise DatasetError(f"{len(examples)} examples are too few to split off {min_val} "
                           "for validation; label more mail first")
    cut = val_fraction * 2.0 ** 64
    held = {i for i, e in enumerate(examples) if _unit_hash(salt, e.id) < cut}
    if len(held) < min_val or len(held) == len(examples):
        order = sorted(range(len(examples)), key=lambda i: _unit_hash(salt, examples[i].id))
        held = set(order[:min(max(min_val, len(held)), len(examples) - 1)])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def _unit_hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")


@dataclass
class Encoded:
    """Token ids (unpadded, per example) and per-head targets."""

    ids: list[list[int]]
    hard: dict[str, torch.Tensor]                 # head -> (N,) class index or IGNORE
    soft: torch.Tensor | None = None              # (N, C) category soft label
    has_soft: torch.Tensor | None = None          # (N,) bool
    weight: torch.Tensor = field(default=None)    # (N,) loss weight (gold more, assistant less)

    def __len__(self) -> int:
        return len(self.ids)


def encode(examples: Sequence[TrainingExample], tokenizer, labels: LabelSpace,
           max_tokens: int, gold_weight: float = 1.0,
           assistant_weight: float = 1.0) -> Encoded:
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_tokens,
                    add_special_tokens=True)["input_ids"]
    cat_index = {c: i for i, c in enumerate(labels.category)}
    pri_index = {c: i for i, c in enumerate(labels.priority)}
    hard = {
        "category": torch.tensor([cat_index.get(e.category, IGNORE) for e in examples]),
        "priority": torch.tensor([pri_index.get(e.priority, IGNORE) if e.priority else IGNORE
                                  for e in examples]),
        "needs_reply": torch.tensor([IGNORE if e.needs_reply is None else int(e.needs_reply)
                                     for e in examples]),
    }
    soft = torch.zeros(len(examples), len(labels.category))
    has_soft = torch.zeros(len(examples), dtype=torch.bool)
    for i, e in enumerate(examples):
        if e.category_probs and not e.gold:
            for c, p in e.category_probs.items():
                if c in cat_index:
                    soft[i, cat_index[c]] = p
            total = soft[i].sum()
            if total > 0:
                soft[i] /= total
                has_soft[i] = True
    weight = torch.tensor([gold_weight if e.gold else
                           assistant_weight if e.source == "assistant" else 1.0
                           for e in examples])
    return Encoded(ids, hard, soft, has_soft, weight)


def pad(seqs: Sequence[list[int]], pad_id: int,
        multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence, rounded up to ``multiple``.

    Rounding keeps the number of distinct shapes small: oneDNN (bf16/AMX on CPU) builds
    kernels per shape, and the first call at a new shape costs seconds.
    """
    n = max(len(s) for s in seqs)
    n = -(-n // multiple) * multiple
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def bucketed_batches(lengths: Sequence[int], batch_size: int, shuffle: bool,
                     rng: random.Random | None = None) -> Iterator[list[int]]:
    """Index batches of similar length: padding to the longest in a batch costs little.

    For training, examples are shuffled, cut into chunks of 50 batches, sorted by length
    within a chunk, and the batches are shuffled: close to random order, little padding.
    """
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        for k in range(0, len(idx), batch_size):
            yield idx[k:k + batch_size]
        return
    rng = rng or random.Random(0)
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for k in range(0, len(idx), chunk):
        part = sorted(idx[k:k + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    yield from batches

