"""structlog setup: JSON lines for the daemon, readable console output otherwise.

Every event passes through :func:`redact` before it is rendered, and so do records from
the standard ``logging`` module (imapclient, httpx, anthropic, uvicorn): passwords, API
keys, Authorization headers and IMAP LOGIN/AUTHENTICATE arguments never reach the output.

>>> configure_logging(json=False)
>>> structlog.get_logger().info("fetched", account="support", uid=42)   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

from config.secrets import known_secrets

MASK = "***"
_SECRET_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|api[_-]?key|authorization|auth[_-]?header|cookie|"
    r"credential|private[_-]?key|password_hash)$",
    re.I,
)
_PATTERNS = [
    # IMAP: a LOGIN command's arguments, AUTHENTICATE's payload (raw protocol dumps)
    (re.compile(r"(\bLOGIN\s+)(\"[^\"]*\"|\S+)(\s+)(\"[^\"]*\"|\S+)", re.I), r"\1\2\3" + MASK),
    (re.compile(r"(\bAUTHENTICATE\s+\S+\s+)(\S+)", re.I), r"\1" + MASK),
    # HTTP headers
    (re.compile(r"(authorization['\"]?\s*[:=]\s*['\"]?)(bearer\s+|basic\s+)?[^\s'\",}]+", re.I),
     r"\1\2" + MASK),
    (re.compile(r"(x-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+", re.I), r"\1" + MASK),
    # Provider key shapes
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"), MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), MASK),
    # key=value or key: value for secret-looking keys inside free text
    (re.compile(r"\b((?:password|passwd|secret|api_key|apikey|token)\s*[=:]\s*)([^\s,;&]+)", re.I),
     r"\1" + MASK),
]


def redact_text(text: str) -> str:
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _redact_value(key: str | None, value: Any) -> Any:
    if key is not None and _SECRET_KEY.search(str(key)) and value not in (None, "", False):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {k: _redact_value(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(None, v) for v in value)
    return value


def redact(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: mask secret keys and secret-looking substrings."""
    return {k: (_redact_value(k, v) if k != "event" else _redact_value(None, v))
            for k, v in event_dict.items()}


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was at
    configuration: a harness that swaps it (pytest's capture, then closing the swapped
    stream) must not leave the handler writing to a closed file."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(json: bool = False, level: str = "info", stream=None) -> None:
    """Configure structlog and the stdlib root logger once for the process.

    ``stream``: where records go; default: the process's stderr at each record."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    pre_chain = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Exceptions are rendered to text before redaction, so a secret in a
        # traceback is masked too.
        structlog.processors.format_exc_info,
        redact,
    ]
    # A plain traceback: the default console one (rich) prints every frame's local
    # variables (request headers, session ids), after redaction has run.
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(
                    colors=False, exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *pre_chain,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redact, renderer],
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           _render_stdlib_message],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # A server started with uvicorn's own log config (its default) gives its loggers
    # handlers of their own that bypass redaction and stop propagation: every record
    # goes through the one redacting handler here instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
    # Chatty libraries stay at warning unless debugging.
    for name in ("httpx", "httpcore", "urllib3", "filelock", "alembic"):
        logging.getLogger(name).setLevel(lvl if lvl <= logging.DEBUG else logging.WARNING)


def _render_stdlib_message(_logger: Any, _method: str, event_dict: dict) -> dict:
    record = event_dict.get("_record")
    if record is not None and record.exc_info and "exception" not in event_dict:
        event_dict["exception"] = logging.Formatter().formatException(record.exc_info)
    # Rendered to text above (and redacted next): the renderer must not format it again.
    event_dict.pop("exc_info", None)
    return event_dict


def get_logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**bound)
