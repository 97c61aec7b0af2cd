"""The Claude teacher, on the ``anthropic`` SDK, with structured output and prompt caching.

Structured output: ``output_config={"format": {"type": "json_schema", "schema": ...}}`` on
``messages.create`` (GA in the installed SDK, no beta header). No forced tool_choice and no
temperature: current models reject both. The system prompt (taxonomy + instructions) is
marked ``cache_control: ephemeral``; the email goes in the user turn as delimited data.

Retries: the SDK's own retries are switched off (``max_retries=0``) and done here, so that
each attempt is counted into the model_calls row, ``retry-after`` is honoured up to a cap,
and a teacher that stays down turns into :class:`TeacherUnavailable` for the caller (who
leaves the mail waiting) instead of a long block inside the SDK.

>>> teacher = ClaudeTeacher(model="claude-sonnet-4-5", api_key="sk-...",  # doctest: +SKIP
...                         taxonomy=tax, prices=PriceTable())
>>> [r.category for r in teacher.label([email])]                      # doctest: +SKIP
['billing']
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Sequence

import anthropic
import structlog

from agent.teacher.base import (MAX_EMAIL_CHARS, Answer, InvalidAnswer, Taxonomy, answer_schema,
                                parse_answer, prompt_tokens, system_prompt, user_content, vote)
from agent.teacher.budget import SpendGuard
from agent.teacher.errors import TeacherUnavailable
from agent.teacher.pricing import MIN_CACHEABLE_TOKENS, call_cost, estimate_cost
from config import PriceTable
from storage.calls import digest_text
from storage.types import Email, TeacherResult

log = structlog.get_logger(__name__)

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


class _GaveUp(Exception):
    def __init__(self, reason: str, retries: int, retry_after_s: float | None):
        super().__init__(reason)
        self.retries, self.retry_after_s = retries, retry_after_s


class _Rejected(Exception):
    def __init__(self, reason: str, retries: int):
        super().__init__(reason)
        self.retries = retries


class _Skipped(Exception):
    """Not sent: the teacher became unavailable while this email waited for a slot."""


class ClaudeTeacher:
    """Teacher protocol on Claude. See the module docstring for retries and caching."""

    backend = "anthropic"

    def __init__(self, *, model: str, api_key: str | None, taxonomy: Taxonomy,
                 prices: PriceTable, base_url: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 4, max_output_tokens: int = 1024,
                 self_consistency_k: int = 1, guard: SpendGuard | None = None,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 max_retry_after_s: float = 120.0, max_email_chars: int = MAX_EMAIL_CHARS,
                 concurrency: int = 4, sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.concurrency = concurrency
        self.taxonomy = taxonomy
        self.prices = prices
        self.max_retries = max_retries
        self.max_output_tokens = max_output_tokens
        self.k = self_consistency_k
        self.guard = guard or SpendGuard(0.0)
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.max_email_chars = max_email_chars
        self._sleep = sleep
        self._system = system_prompt(taxonomy)
        self._schema = answer_schema(taxonomy)
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url,
                                          timeout=timeout_s, max_retries=0)
        self.log = log.bind(teacher="anthropic", model=model)

    # -- the protocol ----------------------------------------------------------------
    def label(self, emails: Sequence[Email]) -> list[TeacherResult]:
        """One result per email, in order. Raises only :class:`TeacherUnavailable`.

        Up to ``concurrency`` calls run at once (the API's latency is seconds per email).
        When the teacher becomes unavailable, emails not yet started are not sent; the
        exception carries every result obtained, in email order.
        """
        self.guard.recorded()
        if self.concurrency <= 1 or len(emails) <= 1:
            results: list[TeacherResult] = []
            for email in emails:
                results.append(self._label_one(email, results))
            return results
        stop = threading.Event()

        def one(email: Email) -> TeacherResult:
            if stop.is_set():
                raise _Skipped()
            try:
                return self._label_one(email, [])
            except TeacherUnavailable:
                stop.set()
                raise

        with ThreadPoolExecutor(min(self.concurrency, len(emails)),
                                thread_name_prefix="teacher") as pool:
            futures = [pool.submit(one, e) for e in emails]
        got: list[TeacherResult] = []
        first: TeacherUnavailable | None = None
        for f in futures:
            try:
                got.append(f.result())
            except _Skipped:
                continue
            except TeacherUnavailable as e:
                got.extend(e.results)          # this email's failure result
                first = first or e
        if first is not None:
            raise type(first)(str(first), got, retry_after_s=first.retry_after_s)
        return got

    def params(self, email: Email) -> dict[str, Any]:
        """The ``messages.create`` arguments for one email (also the batch request params)."""
        return {
            "model": self.model,
            "max_tokens": self.max_output_tokens,
            "system": [{"type": "text", "text": self._system,
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user",
                          "content": user_content(email, self.max_email_chars)}],
            "output_config": {"format": {"type": "json_schema", "schema": self._schema}},
        }

    def estimate(self, n_emails: int, avg_chars: float, batch: bool = False) -> float:
        """Planning estimate in USD (see :func:`agent.teacher.pricing.estimate_cost`)."""
        fixed = prompt_tokens(self.taxonomy)
        return estimate_cost(n_emails, avg_chars, self.prices, k=self.k, batch=batch,
                             system_tokens=fixed, cached_system=fixed >= MIN_CACHEABLE_TOKENS)

    # -- one email -------------------------------------------------------------------
    def _label_one(self, email: Email, done: list[TeacherResult]) -> TeacherResult:
        params = self.params(email)
        digest = digest_text(self.model, self._system, params["messages"][0]["content"])
        base = TeacherResult(email_id=email.id, category="", category_probs={}, priority=None,
                             needs_reply=None, draft=None, rationale=None, model_id=self.model,
                             backend=self.backend, input_digest=digest)
        answers: list[Answer] = []
        totals = base
        errors: list[str] = []
        for sample in range(self.k):
            if sample == 0:       # never stop between samples: those already paid are kept
                self.guard.check(done)
            t0 = time.perf_counter()
            try:
                msg, retries = self._with_retries(lambda: self.client.messages.create(**params),
                                                  email_id=email.id)
            except _GaveUp as e:
                failed = replace(totals, retries=totals.retries + e.retries,
                                 latency_ms=totals.latency_ms + _ms(t0),
                                 error=f"teacher unavailable: {e}")
                self.log.warning("teacher unavailable", email_id=email.id, error=str(e),
                                 retries=failed.retries)
                raise TeacherUnavailable(str(e), done + [failed],
                                         retry_after_s=e.retry_after_s) from None
            except _Rejected as e:
                errors.append(f"request rejected: {e}")
                totals = replace(totals, retries=totals.retries + e.retries,
                                 latency_ms=totals.latency_ms + _ms(t0))
                continue
            cost = self._cost(msg.usage, batch=False)
            self.guard.add(cost)
            totals = _add_usage(totals, msg.usage, cost, _ms(t0), retries,
                                getattr(msg, "_request_id", None))
            try:
                answers.append(self._parse(msg))
            except InvalidAnswer as e:
                errors.append(str(e))
                totals = replace(totals, raw_output=_text_of(msg)[:20_000])
        return self._finish(totals, answers, errors, email)

    def _finish(self, totals: TeacherResult, answers: list[Answer], errors: list[str],
                email: Email) -> TeacherResult:
        if not answers:
            self.log.warning("invalid teacher answer", email_id=email.id, error=errors[-1],
                             request_id=totals.request_id)
            error = errors[-1] if errors[-1].startswith("request rejected") \
                else f"invalid answer: {errors[-1]}"
            return replace(totals, error=error)
        a = vote(answers)
        self.log.info("teacher answered", email_id=email.id, category=a.category,
                      cost_usd=round(totals.cost_usd, 6), retries=totals.retries,
                      request_id=totals.request_id)
        return replace(totals, category=a.category, category_probs=a.category_probs,
                       priority=a.priority, needs_reply=a.needs_reply, draft=a.draft,
                       rationale=a.rationale, raw_output=None)

    def _parse(self, msg: Any) -> Answer:
        if msg.stop_reason == "refusal":
            raise InvalidAnswer("the model refused to answer")
        if msg.stop_reason == "max_tokens":
            raise InvalidAnswer("output cut at max_tokens (raise teacher.max_output_tokens)")
        return parse_answer(_text_of(msg), self.taxonomy)

    def _cost(self, usage: Any, batch: bool) -> float:
        return call_cost(self.prices, input_tokens=usage.input_tokens or 0,
                         output_tokens=usage.output_tokens or 0,
                         cache_read_tokens=getattr(usage, "cache_read_input_tokens", 0) or 0,
                         cache_write_tokens=getattr(usage, "cache_creation_input_tokens", 0) or 0,
                         batch=batch)

    # -- retries ---------------------------------------------------------------------
    def _with_retries(self, call: Callable[[], Any], **ctx: Any) -> tuple[Any, int]:
        """``call()`` with up to ``max_retries`` retries; returns (value, retries made)."""
        attempt = 0
        while True:
            try:
                return call(), attempt
            except anthropic.APIStatusError as e:
                if e.status_code in (401, 403):
                    raise _GaveUp(f"HTTP {e.status_code}: the API key was refused; check "
                                  "teacher.api_key_env", attempt, None) from e
                if e.status_code == 404:      # every email would fail the same way
                    raise _GaveUp(f"HTTP 404: {_err_message(e)}; check teacher.model "
                                  f"({self.model}) and teacher.base_url", attempt, None) from e
                if e.status_code not in RETRYABLE_STATUS and e.status_code < 500:
                    # This request is wrong (too large, refused schema): retrying cannot
                    # help, and the teacher is not down. A failure for this email only.
                    raise _Rejected(f"HTTP {e.status_code}: {_err_message(e)}", attempt) from e
                reason, hint = f"HTTP {e.status_code}: {_err_message(e)}", _retry_after(e)
            except anthropic.APIConnectionError as e:
                reason = "timed out" if isinstance(e, anthropic.APITimeoutError) \
                    else f"connection failed: {e}"
                hint = None
            except anthropic.AnthropicError as e:
                # e.g. a response the SDK cannot validate: this call failed, the API is up.
                raise _Rejected(f"{type(e).__name__}: {e}"[:300], attempt) from e
            if attempt >= self.max_retries:
                raise _GaveUp(f"{reason} (after {attempt} retries)", attempt,
                              hint if hint is not None else self.backoff_max_s)
            delay = self._delay(attempt, hint)
            self.log.info("teacher retry", attempt=attempt + 1, reason=reason,
                          delay_s=round(delay, 3), **ctx)
            self._sleep(delay)
            attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        # Exponential backoff with jitter, so parallel workers do not retry in lockstep.
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt) * \
            random.uniform(0.5, 1.0)

    # -- Message Batches backfill ----------------------------------------------------
    def label_batch(self, emails: Sequence[Email], *, poll_interval_s: float = 30.0,
                    max_wait_s: float = 24 * 3600.0,
                    on_submitted: Callable[[str], None] | None = None) -> list[TeacherResult]:
        """Label through the Message Batches API (half price, answers within 24 h).

        Blocks, polling every ``poll_interval_s``, until the batch ends; raises
        :class:`TeacherUnavailable` if it has not ended after ``max_wait_s`` (the batch id
        is in the message: results can be fetched later with :meth:`collect_batch`).
        """
        if not emails:
            return []
        self.guard.recorded()
        self.guard.check()
        avg = sum(len(e.new_text or e.text) for e in emails) / len(emails)
        estimate = self.estimate(len(emails), avg, batch=True)
        if self.guard.cap_usd > 0 and estimate > self.guard.remaining_usd():
            from agent.teacher.errors import SpendCapReached
            raise SpendCapReached(
                f"this batch would cost about ${estimate:.4f} but only "
                f"${self.guard.remaining_usd():.4f} of today's cap is left; label fewer "
                "emails (--limit) or raise teacher.daily_spend_cap_usd")
        requests = [{"custom_id": f"e{i}-s{j}", "params": self.params(e)}
                    for i, e in enumerate(emails) for j in range(self.k)]
        try:
            batch, _ = self._with_retries(
                lambda: self.client.messages.batches.create(requests=requests), op="batch")
        except (_GaveUp, _Rejected) as e:
            raise TeacherUnavailable(f"could not submit the batch: {e}",
                                     retry_after_s=getattr(e, "retry_after_s", None)) from None
        self.log.info("batch submitted", batch_id=batch.id, requests=len(requests))
        if on_submitted:
            on_submitted(batch.id)
        deadline = time.monotonic() + max_wait_s
        while batch.processing_status != "ended":
            if time.monotonic() > deadline:
                raise TeacherUnavailable(f"batch {batch.id} has not ended after {max_wait_s:.0f}"
                                         " s; collect it later", retry_after_s=poll_interval_s)
            self._sleep(poll_interval_s)
            try:
                batch, _ = self._with_retries(
                    lambda: self.client.messages.batches.retrieve(batch.id), op="batch poll")
            except (_GaveUp, _Rejected) as e:
                raise TeacherUnavailable(f"lost batch {batch.id} while polling: {e}",
                                         retry_after_s=poll_interval_s) from None
        return self.collect_batch(batch.id, emails)

    def collect_batch(self, batch_id: str, emails: Sequence[Email]) -> list[TeacherResult]:
        """Results of an ended batch, one per email in ``emails`` order (batch prices)."""
        by_id: dict[str, Any] = {}
        for item in self.client.messages.batches.results(batch_id):
            by_id[item.custom_id] = item.result
        out = []
        for i, email in enumerate(emails):
            params = self.params(email)
            totals = TeacherResult(
                email_id=email.id, category="", category_probs={}, priority=None,
                needs_reply=None, draft=None, rationale=None, model_id=self.model,
                backend="anthropic-batch", batch_id=batch_id,
                input_digest=digest_text(self.model, self._system,
                                         params["messages"][0]["content"]))
            answers, errors = [], []
            for j in range(self.k):
                res = by_id.get(f"e{i}-s{j}")
                if res is None or res.type != "succeeded":
                    kind = "missing" if res is None else res.type
                    errors.append(f"batch request {kind}")
                    continue
                msg = res.message
                cost = self._cost(msg.usage, batch=True)
                self.guard.add(cost)
                totals = _add_usage(totals, msg.usage, cost, 0.0, 0, msg.id)
                try:
                    answers.append(self._parse(msg))
                except InvalidAnswer as e:
                    errors.append(str(e))
                    totals = replace(totals, raw_output=_text_of(msg)[:20_000])
            out.append(self._finish(totals, answers, errors, email))
        return out


def _add_usage(r: TeacherResult, usage: Any, cost: float, latency_ms: float, retries: int,
               request_id: str | None) -> TeacherResult:
    return replace(
        r, input_tokens=r.input_tokens + (usage.input_tokens or 0),
        output_tokens=r.output_tokens + (usage.output_tokens or 0),
        cache_read_tokens=r.cache_read_tokens + (getattr(usage, "cache_read_input_tokens", 0) or 0),
        cache_write_tokens=r.cache_write_tokens
        + (getattr(usage, "cache_creation_input_tokens", 0) or 0),
        cost_usd=r.cost_usd + cost, latency_ms=r.latency_ms + latency_ms,
        retries=r.retries + retries, request_id=request_id or r.request_id)


def _text_of(msg: Any) -> str:
    # Adaptive-thinking models put thinking blocks first: the answer is the text blocks.
    return "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _err_message(e: anthropic.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    return str(err.get("message") or e.message)[:300]


def _retry_after(e: anthropic.APIStatusError) -> float | None:
    headers = e.response.headers if e.response is not None else {}
    for key, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(key)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue   # an HTTP date: fall back to our own backoff
    return None
