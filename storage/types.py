"""Typed, frozen objects that cross package boundaries.

They live here, in the lowest package, so that ``storage`` can build them from rows and
``agent`` and ``distill`` can pass them around without importing each other. No raw
imaplib tuples or ORM rows leave their package: these do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Source = Literal["student", "teacher", "human"]


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True)
class Email:
    """One parsed email. ``text`` is the whole plain text; ``new_text`` drops quotes/signature.

    >>> Email(id="m1", subject="Card not arrived", text="Hi", new_text="Hi").subject
    'Card not arrived'
    """

    id: str                                  # stable id: DB id as str, or the record id
    subject: str = ""
    text: str = ""
    new_text: str = ""
    from_addr: str = ""
    to_addrs: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()           # Reply-To: where a reply goes (else from_addr)
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    date: datetime | None = None
    attachments: tuple[Attachment, ...] = ()
    html: str | None = None                  # raw HTML part, never rendered unsanitized
    account: str | None = None
    folder: str | None = None
    uid: int | None = None
    parse_error: str | None = None
    db_id: int | None = None

    @property
    def reply_addrs(self) -> tuple[str, ...]:
        """Whom a reply is addressed to: Reply-To when the sender set one (web forms,
        ticket systems, mailing lists), else From."""
        return self.reply_to or ((self.from_addr,) if self.from_addr else ())


@dataclass(frozen=True)
class Triage:
    """A classification: labels plus calibrated probabilities per head."""

    category: str
    priority: str
    needs_reply: bool
    category_probs: dict[str, float] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)   # head -> calibrated max prob
    model_version: str | None = None
    latency_ms: float | None = None


@dataclass(frozen=True)
class Draft:
    """A reply draft and the drafter's own uncertainty about it."""

    text: str
    confidence: float | None = None           # e.g. mean token probability
    model_version: str | None = None
    latency_ms: float | None = None
    mean_logprob: float | None = None         # mean log p of the generated tokens
    min_logprob: float | None = None          # the least likely generated token's log p


@dataclass(frozen=True)
class TeacherResult:
    """One teacher answer for one email, with what it cost."""

    email_id: str
    category: str
    category_probs: dict[str, float]
    priority: str | None
    needs_reply: bool | None
    draft: str | None
    rationale: str | None
    model_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    request_id: str | None = None
    error: str | None = None                  # set when the answer is unusable
    # --- added by the teacher capability (issue 4): what the model_calls row needs ---
    retries: int = 0                          # attempts beyond the first (429/529/5xx/timeout)
    backend: str = ""                         # anthropic | anthropic-batch | openai | recorded
    input_digest: str = ""                    # sha256 of the exact prompt sent
    raw_output: str | None = None             # the model's text, kept when it was invalid
    batch_id: str | None = None               # Message Batches id for backfill answers

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Decision:
    """The one current decision for a message."""

    email_id: str
    source: Source
    category: str
    priority: str
    needs_reply: bool
    draft: str | None = None
    confidence: dict[str, float] = field(default_factory=dict)
    rationale: str | None = None
    model_version: str | None = None
    escalated: bool = False
    audit: bool = False
