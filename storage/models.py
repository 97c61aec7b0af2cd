"""SQLAlchemy 2 typed models. Schema changes go through Alembic (storage/migrations).

Message states: ``pending`` (stored, awaiting triage) -> ``claimed`` (a worker holds it)
-> ``decided`` (one current decision committed) -> ``acted`` (mailbox actions done).
``waiting`` means the teacher is needed but unavailable (outage, spend cap): the message
is retried after ``next_attempt_at``. ``parse_error`` messages are stored and shown by
``status`` but still triaged on whatever text could be recovered.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


Timestamp = DateTime(timezone=True)


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    user: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    mailboxes: Mapped[list["Mailbox"]] = relationship(back_populates="account")


class Mailbox(Base):
    """One watched folder: its UIDVALIDITY, the UID cursor and the watcher lease."""

    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    name: Mapped[str] = mapped_column(String(500))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_sync_at: Mapped[datetime | None] = mapped_column(Timestamp)
    account: Mapped[Account] = relationship(back_populates="mailboxes")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("mailbox_id", "uidvalidity", "uid", name="uq_messages_mailbox_uid"),
        Index("ix_messages_state_next", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox_id: Mapped[int | None] = mapped_column(ForeignKey("mailboxes.id"))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    uid: Mapped[int | None] = mapped_column(BigInteger)
    external_id: Mapped[str | None] = mapped_column(String(500), index=True)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    internal_date: Mapped[datetime | None] = mapped_column(Timestamp)
    flags: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    from_addr: Mapped[str] = mapped_column(Text, default="")
    to_addrs: Mapped[list[Any]] = mapped_column(default=list)
    reply_to: Mapped[list[Any] | None] = mapped_column(default=list)
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[list[Any]] = mapped_column(default=list)
    body_text: Mapped[str] = mapped_column(Text, default="")
    new_text: Mapped[str] = mapped_column(Text, default="")
    body_html: Mapped[str | None] = mapped_column(Text)
    attachments: Mapped[list[Any]] = mapped_column(default=list)
    parse_error: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)
    decision: Mapped["DecisionRow | None"] = relationship(back_populates="message")


class ModelCall(Base):
    """Every model call, student or teacher, successful or not: the distillation log."""

    __tablename__ = "model_calls"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))          # student | teacher
    purpose: Mapped[str] = mapped_column(String(20))       # classify | draft | label | audit
    backend: Mapped[str] = mapped_column(String(40), default="")
    model_id: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(100))
    input_digest: Mapped[str] = mapped_column(String(64), default="")
    output: Mapped[dict[str, Any] | None] = mapped_column()
    probs: Mapped[dict[str, Any] | None] = mapped_column()
    confidence: Mapped[float | None] = mapped_column(Float)
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    request_id: Mapped[str | None] = mapped_column(String(200))
    batch_id: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)


class DecisionRow(Base):
    """The one current decision per message (unique message_id)."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    source: Mapped[str] = mapped_column(String(20))        # student | teacher | human
    category: Mapped[str] = mapped_column(String(200))
    priority: Mapped[str] = mapped_column(String(50))
    needs_reply: Mapped[bool] = mapped_column(Boolean)
    confidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rationale: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(100))
    model_call_id: Mapped[int | None] = mapped_column(ForeignKey("model_calls.id"))
    escalated: Mapped[bool] = mapped_column(Boolean, default=False)
    audited: Mapped[bool] = mapped_column(Boolean, default=False)
    actions_done: Mapped[list[Any]] = mapped_column(default=list)
    actions_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)
    message: Mapped[Message] = relationship(back_populates="decision")


class DraftRow(Base):
    __tablename__ = "drafts"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"))
    source: Mapped[str] = mapped_column(String(20))
    body: Mapped[str] = mapped_column(Text)
    final_body: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)
    # pending_review | approved | rejected | appended (student draft placed in Drafts)
    status: Mapped[str] = mapped_column(String(20), default="pending_review", index=True)
    draft_message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    appended_folder: Mapped[str | None] = mapped_column(String(500))
    appended_uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    appended_uid: Mapped[int | None] = mapped_column(BigInteger)
    appended_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)


class Review(Base):
    """A human action on an escalated email. Corrections here are gold labels."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    draft_id: Mapped[int | None] = mapped_column(ForeignKey("drafts.id"))
    action: Mapped[str] = mapped_column(String(20))         # approve | edit | reject
    reviewer: Mapped[str] = mapped_column(String(200), default="")
    category: Mapped[str | None] = mapped_column(String(200))
    priority: Mapped[str | None] = mapped_column(String(50))
    needs_reply: Mapped[bool | None] = mapped_column(Boolean)
    final_draft: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running|succeeded|failed|killed
    trigger: Mapped[str] = mapped_column(String(40), default="manual")   # manual|schedule|simulate
    data_source: Mapped[str] = mapped_column(Text, default="sql")
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    candidate_version: Mapped[str | None] = mapped_column(String(100))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    gate_reason: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20), default="classifier")  # classifier | drafter
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="candidate", index=True)
    base_model: Mapped[str] = mapped_column(String(300), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    thresholds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # When `understudy models prune` deleted the files (the row stays: history, metrics).
    pruned_at: Mapped[datetime | None] = mapped_column(Timestamp)


class KeyValue(Base):
    """Small operational state: spend-cap pauses, last retrain, leader heartbeats."""

    __tablename__ = "kv"
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
