"""Banking77 as a mailbox: a fixed held-out test file and a shuffled arrival stream.

Both files are teacher records (design.md's interchange format) whose ``category`` is the
Banking77 intent, a hard label. The split is stratified and keyed on a seeded hash of
the text, so it does not depend on row order and is the same on every machine.

>>> rows = read_banking77(Path("../shared/data/banking77/train.csv"))   # doctest: +SKIP
>>> stream, test = split_stream_test(rows, test_fraction=0.2, seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agent.teacher.records import write_records


class SimulationDataError(ValueError):
    """A data file for simulate/report cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Row:
    """One labelled query: a stable id, the text and its intent."""

    id: str
    text: str
    category: str


def read_banking77(path: Path) -> list[Row]:
    """Read train.csv (columns text,category); ids are ``b77-<row number>``."""
    path = Path(path)
    if not path.exists():
        raise SimulationDataError(
            f"{path} not found: pass the Banking77 train.csv (shared/data/banking77/train.csv)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"text", "category"} <= set(reader.fieldnames):
            raise SimulationDataError(f"{path}: expected a header 'text,category'")
        return [Row(id=f"b77-{i:05d}", text=r["text"].strip(), category=r["category"].strip())
                for i, r in enumerate(reader) if r["text"].strip()]


def _key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_stream_test(rows: Sequence[Row], *, test_fraction: float = 0.2, seed: int = 0
                      ) -> tuple[list[Row], list[Row]]:
    """Stratified split: per intent, the ``test_fraction`` with the smallest seeded hash.

    The stream is then shuffled (seeded) into an arrival order; the test file is sorted
    by id. Every intent keeps at least one example on each side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise SimulationDataError("test_fraction must be between 0 and 1 (e.g. 0.2)")
    by_cat: dict[str, list[Row]] = {}
    for r in rows:
        by_cat.setdefault(r.category, []).append(r)
    stream, test = [], []
    for cat in sorted(by_cat):
        group = sorted(by_cat[cat], key=lambda r: _key(seed, r.text))
        n_test = min(max(1, round(len(group) * test_fraction)), len(group) - 1)
        test.extend(group[:n_test])
        stream.extend(group[n_test:])
    random.Random(seed).shuffle(stream)
    test.sort(key=lambda r: r.id)
    return stream, test


# Short, neutral subjects so a record looks like a support email without leaking the
# label: the student sees subject + body, and a subject naming the intent would be a cheat.
_SUBJECTS = ("Question about my account", "Help please", "Support request", "Quick question",
             "Need assistance", "Problem with my card", "Enquiry", "Hello")


def subject_for(row_id: str) -> str:
    """A neutral subject line picked by the id's hash (never by the label)."""
    return _SUBJECTS[int(hashlib.sha256(row_id.encode()).hexdigest(), 16) % len(_SUBJECTS)]


def to_record(row: Row, *, subject: bool = False) -> dict:
    """One teacher record (hard label) for a query.

    No subject by default: the replay then sees exactly the Banking77 text, as the
    student's own Banking77 experiments do (distill, scripts/bench/banking77). The demo
    inbox asks for one (``subject=True``) so the emails look like email.
    """
    h = int(hashlib.sha256(row.id.encode()).hexdigest(), 16)
    rec = {"id": row.id, "from": f"customer{h % 997:03d}@example.com", "body": row.text,
           "category": row.category}
    if subject:
        rec["subject"] = subject_for(row.id)
    return rec


def read_jsonl(path: Path) -> list[dict]:
    """Read teacher records minimally (id, body, category required), naming bad lines."""
    path = Path(path)
    if not path.exists():
        raise SimulationDataError(f"{path} not found: build one with scripts/demo-data")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SimulationDataError(f"{path}:{n}: not JSON ({e.msg})") from None
            missing = [k for k in ("id", "body", "category") if not rec.get(k)]
            if missing:
                raise SimulationDataError(f"{path}:{n}: missing {', '.join(missing)}")
            out.append(rec)
    return out


def build_banking77_files(csv_path: Path, out_dir: Path, *, test_fraction: float = 0.2,
                          seed: int = 0, limit: int | None = None) -> dict:
    """Write ``stream.jsonl``, ``test.jsonl`` and ``all.jsonl`` under out_dir; ``limit``
    caps the stream.

    ``all.jsonl`` holds the stream and the test records in one seeded, shuffled arrival
    order: the input of a full-data ``understudy retrain --data``, which holds out the
    *newest* records (file order). ``test.jsonl`` is grouped by intent, so appending it
    to the stream would hold out a few dozen intents only.
    """
    stream, test = split_stream_test(read_banking77(csv_path), test_fraction=test_fraction,
                                     seed=seed)
    if limit is not None:
        stream = stream[:limit]
    everything = stream + test
    random.Random(f"all:{seed}").shuffle(everything)
    out_dir = Path(out_dir)
    n_stream = write_records(out_dir / "stream.jsonl", (to_record(r) for r in stream))
    n_test = write_records(out_dir / "test.jsonl", (to_record(r) for r in test))
    write_records(out_dir / "all.jsonl", (to_record(r) for r in everything))
    return {"stream": str(out_dir / "stream.jsonl"), "test": str(out_dir / "test.jsonl"),
            "all": str(out_dir / "all.jsonl"), "n_stream": n_stream, "n_test": n_test,
            "categories": len({r.category for r in stream} | {r.category for r in test}),
            "seed": seed, "test_fraction": test_fraction}
