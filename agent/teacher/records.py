"""The teacher-records JSONL interchange format (design.md): read, write, validate.

One JSON object per line. Only ``id``, ``body`` and ``category`` are required; absent
fields are unknown (``None``), never false. ``category_probs``, when present, is the
teacher's soft label. ``source`` ("teacher" or "human") is an optional extension that
``dataset export`` writes so gold labels survive a round trip; unknown keys are ignored.

>>> recs = list(read_records("teacher.jsonl"))          # doctest: +SKIP
>>> recs[0].category, recs[0].category_probs             # doctest: +SKIP
('card_arrival', {'card_arrival': 0.9, 'card_delivery_estimate': 0.1})
>>> write_records("copy.jsonl", recs)                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from agent.teacher.errors import RecordsFormatError
from storage.types import Email

FIELDS = ("id", "from", "subject", "body", "category", "category_probs", "priority",
          "needs_reply", "draft", "rationale", "source")
PROB_SUM_TOLERANCE = 0.05


@dataclass(frozen=True)
class TeacherRecord:
    """One labelled email in the interchange format. ``from`` is spelled ``from_addr``."""

    id: str
    body: str
    category: str
    from_addr: str | None = None
    subject: str | None = None
    category_probs: dict[str, float] | None = None
    priority: str | None = None
    needs_reply: bool | None = None
    draft: str | None = None
    rationale: str | None = None
    source: str | None = None          # "teacher" | "human" (gold); None = unknown

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for one line; absent fields are left out."""
        d = {"id": self.id, "from": self.from_addr, "subject": self.subject, "body": self.body,
             "category": self.category, "category_probs": self.category_probs,
             "priority": self.priority, "needs_reply": self.needs_reply, "draft": self.draft,
             "rationale": self.rationale, "source": self.source}
        return {k: v for k, v in d.items() if v is not None}

    def to_email(self) -> Email:
        """The record as an :class:`Email` (id = record id), e.g. to stream it through triage."""
        return Email(id=self.id, subject=self.subject or "", text=self.body,
                     new_text=self.body, from_addr=self.from_addr or "")

    @classmethod
    def from_dict(cls, d: Any, where: str = "record") -> "TeacherRecord":
        """Validate one JSON object; raises :class:`RecordsFormatError` naming ``where``."""
        if not isinstance(d, dict):
            raise RecordsFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "body", "category") if d.get(k) in (None, "")]
        if missing:
            raise RecordsFormatError(f"{where}: missing required field(s) {', '.join(missing)} "
                                     "(every record needs id, body and category)")
        for key in ("from", "subject", "body", "category", "priority", "draft", "rationale",
                    "source"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise RecordsFormatError(f"{where}: field {key!r} must be a string")
        if d.get("needs_reply") is not None and not isinstance(d["needs_reply"], bool):
            raise RecordsFormatError(f"{where}: field 'needs_reply' must be true or false")
        probs = d.get("category_probs")
        if probs is not None:
            probs = _valid_probs(probs, str(d["category"]), where)
        return cls(id=str(d["id"]), body=d["body"], category=d["category"],
                   from_addr=d.get("from"), subject=d.get("subject"), category_probs=probs,
                   priority=d.get("priority"), needs_reply=d.get("needs_reply"),
                   draft=d.get("draft"), rationale=d.get("rationale"), source=d.get("source"))


def _valid_probs(probs: Any, category: str, where: str) -> dict[str, float]:
    if not isinstance(probs, dict) or not probs:
        raise RecordsFormatError(f"{where}: 'category_probs' must be a non-empty object "
                                 "mapping category -> probability")
    out: dict[str, float] = {}
    for k, v in probs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0 or v > 1:
            raise RecordsFormatError(f"{where}: category_probs[{k!r}] = {v!r} is not a "
                                     "probability in [0, 1]")
        out[str(k)] = float(v)
    total = sum(out.values())
    if abs(total - 1.0) > PROB_SUM_TOLERANCE:
        raise RecordsFormatError(f"{where}: category_probs sum to {total:.3f}, not 1 "
                                 f"(tolerance {PROB_SUM_TOLERANCE})")
    if category not in out:
        raise RecordsFormatError(f"{where}: category {category!r} has no entry in "
                                 "category_probs")
    return {k: v / total for k, v in out.items()}


def read_records(path: str | Path) -> Iterator[TeacherRecord]:
    """Yield the records of a JSONL file; blank lines are skipped.

    Raises :class:`RecordsFormatError` with ``path:line`` for the first bad line, and for
    an id that appears twice (ids must be unique: they key replay and import).
    """
    path = Path(path)
    seen: set[str] = set()
    try:
        fh = path.open(encoding="utf-8")
    except OSError as e:
        raise RecordsFormatError(f"cannot read teacher records {path}: {e.strerror}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordsFormatError(f"{where}: not valid JSON ({e.msg} at column "
                                         f"{e.colno})") from None
            rec = TeacherRecord.from_dict(obj, where)
            if rec.id in seen:
                raise RecordsFormatError(f"{where}: duplicate id {rec.id!r} (ids must be unique)")
            seen.add(rec.id)
            yield rec


def write_records(path: str | Path, records: Iterable[TeacherRecord | dict[str, Any]]) -> int:
    """Write records as JSONL (atomically: a temp file renamed over ``path``); returns count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            rec = r if isinstance(r, TeacherRecord) else TeacherRecord.from_dict(r)
            fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
