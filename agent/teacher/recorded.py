"""The recorded teacher: answers read from a teacher-records JSONL file.

For replay, the demo and offline bootstrapping. An email is matched to a record by id
(``Email.id``, then ``Email.message_id``), then by its text (subject + body, whitespace
and case folded), so records survive a trip through IMAP. An email with no record gets a
result with ``error`` set (a bad answer, not an outage). Costs nothing.

>>> t = RecordedTeacher.from_file("teacher.jsonl", taxonomy_names=["billing", "other"])  # doctest: +SKIP
>>> t.label([Email(id="r1", text="refund please")])[0].category                         # doctest: +SKIP
'billing'
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterable, Sequence

import structlog

from agent.teacher.records import TeacherRecord, read_records
from storage.calls import digest_text
from storage.types import Email, TeacherResult

log = structlog.get_logger(__name__)


def _text_key(subject: str | None, body: str | None) -> str:
    text = " ".join(f"{subject or ''} {body or ''}".split()).lower()
    return hashlib.sha256(text.encode()).hexdigest()


class RecordedTeacher:
    """Teacher protocol over a fixed set of records."""

    backend = "recorded"

    def __init__(self, records: Iterable[TeacherRecord], *, name: str = "recorded",
                 taxonomy_names: Sequence[str] | None = None):
        self.model_id = f"recorded:{name}"
        self._by_id: dict[str, TeacherRecord] = {}
        self._by_text: dict[str, TeacherRecord] = {}
        self._by_body: dict[str, TeacherRecord] = {}
        for r in records:
            self._by_id[r.id] = r
            self._by_text.setdefault(_text_key(r.subject, r.body), r)
            self._by_body.setdefault(_text_key(None, r.body), r)
        self._names = list(taxonomy_names) if taxonomy_names else None
        self.log = log.bind(teacher="recorded", records=len(self._by_id), source=name)

    @classmethod
    def from_file(cls, path: str | Path, taxonomy_names: Sequence[str] | None = None
                  ) -> "RecordedTeacher":
        path = Path(path)
        return cls(read_records(path), name=path.name, taxonomy_names=taxonomy_names)

    def __len__(self) -> int:
        return len(self._by_id)

    def find(self, email: Email) -> TeacherRecord | None:
        for key in (email.id, email.message_id):
            if key and key in self._by_id:
                return self._by_id[key]
        body = email.new_text or email.text
        return (self._by_text.get(_text_key(email.subject, body))
                or self._by_body.get(_text_key(None, body))
                or self._by_body.get(_text_key(None, email.text)))

    def label(self, emails: Sequence[Email]) -> list[TeacherResult]:
        return [self._one(e) for e in emails]

    def _one(self, email: Email) -> TeacherResult:
        t0 = time.perf_counter()
        rec = self.find(email)
        digest = digest_text(self.model_id, email.subject, email.new_text or email.text)
        if rec is None:
            return TeacherResult(
                email_id=email.id, category="", category_probs={}, priority=None,
                needs_reply=None, draft=None, rationale=None, model_id=self.model_id,
                backend=self.backend, input_digest=digest,
                error=f"no recorded answer for email {email.id!r} (matched by id, "
                      "Message-ID and text)")
        error = None
        if self._names is not None and rec.category not in self._names:
            error = f"invalid answer: recorded category {rec.category!r} is not in the taxonomy"
        probs = rec.category_probs or {rec.category: 1.0}
        return TeacherResult(
            email_id=email.id, category=rec.category if error is None else "",
            category_probs=dict(probs) if error is None else {}, priority=rec.priority,
            needs_reply=rec.needs_reply, draft=rec.draft, rationale=rec.rationale,
            model_id=self.model_id, backend=self.backend, input_digest=digest,
            latency_ms=(time.perf_counter() - t0) * 1000, request_id=rec.id, error=error,
            raw_output=None if error is None else rec.category)
