"""Teachers: Claude (``claude``), any OpenAI-compatible server (``openai_compat``) and
recorded answers (``recorded``). All implement :class:`agent.protocols.Teacher`.

The caller records every result (``storage.calls.record_teacher_result``) and catches
:class:`TeacherUnavailable` (outage, retries exhausted) and :class:`SpendCapReached` (daily
cap) to leave mail waiting; both carry ``results`` already paid for, to record too.

>>> teacher = build_teacher(settings, db)                              # doctest: +SKIP
>>> try:
...     results = teacher.label(emails)
... except TeacherUnavailable as e:
...     results = e.results        # record these; the rest waits e.retry_after_s
"""

from __future__ import annotations

from typing import Any

import structlog

from agent.teacher.base import Taxonomy
from agent.teacher.budget import SpendGuard, db_spend_today
from agent.teacher.errors import (RecordsFormatError, SpendCapReached, TeacherConfigError,
                                  TeacherError, TeacherUnavailable)
from agent.teacher.pricing import call_cost, estimate_cost
from agent.teacher.records import TeacherRecord, read_records, write_records

__all__ = ["RecordsFormatError", "SpendCapReached", "SpendGuard", "Taxonomy", "TeacherConfigError",
           "TeacherError", "TeacherRecord", "TeacherUnavailable", "build_teacher", "call_cost",
           "estimate_cost", "read_records", "taxonomy_of", "write_records"]

log = structlog.get_logger(__name__)


def taxonomy_of(settings: Any) -> Taxonomy:
    return Taxonomy(categories=dict(settings.taxonomy.categories),
                    priorities=list(settings.taxonomy.priorities))


def build_teacher(settings: Any, db: Any = None, **overrides: Any):
    """The configured teacher, with the daily spend cap read from ``db`` when given.

    ``overrides`` reach the backend's constructor unchanged (tests shorten
    ``backoff_base_s``; the CLI passes nothing). Raises :class:`TeacherConfigError`
    with a fix when the configuration cannot work (missing API key, bad records file).
    """
    t = settings.teacher
    tax = taxonomy_of(settings)
    guard = SpendGuard(t.daily_spend_cap_usd, db_spend_today(db) if db is not None else None)
    if t.backend == "recorded":
        from agent.teacher.recorded import RecordedTeacher

        try:
            return RecordedTeacher.from_file(t.records, taxonomy_names=tax.names)
        except RecordsFormatError as e:
            raise TeacherConfigError(f"teacher.records: {e}") from None
    api_key = _secret(t.api_key_env)
    if t.backend == "openai":
        from agent.teacher.openai_compat import OpenAICompatTeacher

        if not t.base_url:
            raise TeacherConfigError("teacher.backend = 'openai' needs teacher.base_url "
                                     "(e.g. http://127.0.0.1:8000/v1)")
        kwargs = dict(base_url=t.base_url, model=t.model, api_key=api_key, taxonomy=tax,
                      prices=t.prices, timeout_s=t.timeout_s, max_retries=t.max_retries,
                      max_output_tokens=t.max_output_tokens, guard=guard)
        return OpenAICompatTeacher(**{**kwargs, **overrides})
    from agent.teacher.claude import ClaudeTeacher
    from config.settings import PRICES_PER_MTOK, _model_family

    if api_key is None and not t.base_url:
        raise TeacherConfigError(f"no Anthropic API key: set {t.api_key_env} (or "
                                 f"{t.api_key_env}_FILE), or use teacher.backend = 'recorded'")
    if t.prices is None and _model_family(t.model) not in PRICES_PER_MTOK:
        log.warning("no published prices known for this model; costs use Sonnet prices: "
                    "set [teacher.prices]", model=t.model)
    kwargs = dict(model=t.model, api_key=api_key or "unused", base_url=t.base_url,
                  taxonomy=tax, prices=t.price_table, timeout_s=t.timeout_s,
                  max_retries=t.max_retries, max_output_tokens=t.max_output_tokens,
                  self_consistency_k=t.self_consistency_k, concurrency=t.concurrency,
                  guard=guard)
    return ClaudeTeacher(**{**kwargs, **overrides})


def _secret(env: str) -> str | None:
    from config.secrets import read_secret

    return read_secret(env, required=False)
