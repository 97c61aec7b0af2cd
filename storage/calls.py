"""One ``model_calls`` row per model call, student or teacher, successful or not.

These rows are the distillation dataset and the bill, so every caller goes through
:func:`record_call` (or :func:`record_teacher_result` for a teacher answer) inside the
same transaction as whatever it decides from the call.

>>> with db.session() as s:                                            # doctest: +SKIP
...     call_id = record_call(s, message_id=7, role="student", purpose="classify",
...                           backend="torch", model_id="minilm", model_version="v3",
...                           input_digest=digest_text("Card not arrived"),
...                           output={"category": "card_arrival"}, confidence=0.93)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from sqlalchemy.orm import Session

from storage.models import ModelCall
from storage.types import TeacherResult

Role = Literal["student", "teacher"]
Purpose = Literal["classify", "draft", "label", "audit"]


def digest_text(*parts: str) -> str:
    """sha256 of the model input: equal prompts give equal digests across runs."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()


def record_call(
    session: Session,
    *,
    message_id: int | None,
    role: Role,
    purpose: Purpose,
    backend: str,
    model_id: str,
    model_version: str | None = None,
    input_digest: str = "",
    output: dict[str, Any] | None = None,
    probs: dict[str, Any] | None = None,
    confidence: float | None = None,
    escalated: bool = False,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    cost_usd: float = 0.0,
    latency_ms: float = 0.0,
    retries: int = 0,
    request_id: str | None = None,
    batch_id: str | None = None,
    error: str | None = None,
) -> int:
    """Add one ``model_calls`` row to ``session`` and return its id (flushed, not committed)."""
    row = ModelCall(
        message_id=message_id, role=role, purpose=purpose, backend=backend[:40],
        model_id=model_id[:200], model_version=model_version, input_digest=input_digest,
        output=_jsonable(output), probs=_jsonable(probs), confidence=confidence,
        escalated=escalated, input_tokens=input_tokens, output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens, cache_write_tokens=cache_write_tokens,
        cost_usd=float(cost_usd), latency_ms=float(latency_ms), retries=retries,
        request_id=request_id, batch_id=batch_id, error=error,
    )
    session.add(row)
    session.flush()
    return row.id


def record_teacher_result(
    session: Session,
    result: TeacherResult,
    *,
    message_id: int | None,
    purpose: Purpose = "label",
    escalated: bool = True,
) -> int:
    """Record one :class:`TeacherResult` (a good answer or a failure) as a model_calls row.

    ``output`` holds the structured answer; for a failure it holds the raw text the model
    returned (if any), so invalid answers can be inspected later.
    """
    if result.ok:
        output: dict[str, Any] | None = {
            "category": result.category, "priority": result.priority,
            "needs_reply": result.needs_reply, "draft": result.draft,
            "rationale": result.rationale,
        }
    else:
        output = None if result.raw_output is None else {"raw": result.raw_output}
    probs = dict(result.category_probs) if result.category_probs else None
    return record_call(
        session, message_id=message_id, role="teacher", purpose=purpose,
        backend=result.backend or "teacher", model_id=result.model_id,
        model_version=result.model_id, input_digest=result.input_digest, output=output,
        probs=probs, confidence=max(probs.values()) if probs and result.ok else None,
        escalated=escalated, input_tokens=result.input_tokens,
        output_tokens=result.output_tokens, cache_read_tokens=result.cache_read_tokens,
        cache_write_tokens=result.cache_write_tokens, cost_usd=result.cost_usd,
        latency_ms=result.latency_ms, retries=result.retries, request_id=result.request_id,
        batch_id=result.batch_id, error=result.error,
    )


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    # JSON columns must survive a round trip on both SQLite and PostgreSQL.
    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))
