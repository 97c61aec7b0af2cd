"""Queries the other packages need. They return plain dicts or storage.types objects."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select

from storage.db import Database
from storage.models import DecisionRow, Message, ModelCall, ModelVersion, TrainingRun


def start_of_utc_day(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def teacher_spend_since(db: Database, since: datetime) -> float:
    with db.session() as s:
        total = s.scalar(select(func.coalesce(func.sum(ModelCall.cost_usd), 0.0))
                         .where(ModelCall.role == "teacher", ModelCall.created_at >= since))
    return float(total or 0.0)


def status_snapshot(db: Database, settings: Any) -> dict[str, Any]:
    """Everything `understudy status` shows, as one JSON-able dict."""
    now = datetime.now(timezone.utc)
    with db.session() as s:
        by_state = dict(s.execute(select(Message.state, func.count()).group_by(Message.state)).all())
        parse_errors = s.scalar(select(func.count()).where(Message.parse_error.is_not(None)))
        recent_parse = [
            {"id": i, "subject": subj, "error": err}
            for i, subj, err in s.execute(
                select(Message.id, Message.subject, Message.parse_error)
                .where(Message.parse_error.is_not(None)).order_by(Message.id.desc()).limit(5))
        ]
        by_source = dict(s.execute(
            select(DecisionRow.source, func.count()).group_by(DecisionRow.source)).all())
        call_errors = s.scalar(select(func.count()).where(
            ModelCall.error.is_not(None), ModelCall.created_at >= now - timedelta(days=1)))
        last_errors = [
            {"id": i, "role": r, "message_id": m, "error": e}
            for i, r, m, e in s.execute(
                select(ModelCall.id, ModelCall.role, ModelCall.message_id, ModelCall.error)
                .where(ModelCall.error.is_not(None)).order_by(ModelCall.id.desc()).limit(5))
        ]
        active = s.scalars(select(ModelVersion).where(ModelVersion.status == "active")
                           .order_by(ModelVersion.promoted_at.desc())).all()
        last_run = s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(1)).first()
    spend = teacher_spend_since(db, start_of_utc_day(now))
    cap = settings.teacher.daily_spend_cap_usd
    return {
        "database": db.redacted_url(),
        "messages": {"total": sum(by_state.values()), "by_state": by_state,
                     "backlog": by_state.get("pending", 0) + by_state.get("waiting", 0)
                     + by_state.get("claimed", 0)},
        "parse_errors": {"count": parse_errors, "recent": recent_parse},
        "decisions_by_source": by_source,
        "model_call_errors_24h": call_errors,
        "recent_model_call_errors": last_errors,
        "teacher": {"spend_today_usd": round(spend, 6), "daily_cap_usd": cap,
                    "paused_by_cap": cap > 0 and spend >= cap},
        "active_models": [
            {"version": m.version, "kind": m.kind, "thresholds": m.thresholds,
             "promoted_at": m.promoted_at} for m in active],
        "last_training_run": None if last_run is None else {
            "id": last_run.id, "status": last_run.status, "started_at": last_run.started_at,
            "candidate": last_run.candidate_version, "promoted": last_run.promoted,
            "error": last_run.error},
        # --- added by the daemon capability (issue 6) ---
        **_daemon_keys(db, settings, active),
        # --- added by the review capability (issue 7) ---
        "review": _review_keys(db),
        # --- added by the teacher capability (issue 4) ---
        "teacher_calls": _teacher_keys(db, now),
        # --- added by the mail capability (issue 3) ---
        "mailboxes": _mail_keys(db),
    }


def _mail_keys(db: Database) -> list[dict[str, Any]]:
    from storage.ingest import mailbox_status

    return mailbox_status(db)


def _teacher_keys(db: Database, now: datetime) -> dict[str, Any]:
    """Teacher calls today (UTC) and the last day's failures by kind: an invalid answer
    (the email stays queued and is asked again) or the teacher being unavailable."""
    since = now - timedelta(days=1)
    with db.session() as s:
        calls_today = s.scalar(select(func.count()).where(
            ModelCall.role == "teacher", ModelCall.created_at >= start_of_utc_day(now)))
        errors = list(s.scalars(select(ModelCall.error).where(
            ModelCall.role == "teacher", ModelCall.error.is_not(None),
            ModelCall.created_at >= since)))
    invalid = sum(e.startswith("invalid answer") for e in errors)
    unavailable = sum(e.startswith("teacher unavailable") for e in errors)
    return {"calls_today": calls_today, "invalid_answers_24h": invalid,
            "unavailable_24h": unavailable, "other_failures_24h": len(errors) - invalid - unavailable}


def _review_keys(db: Database) -> dict[str, int]:
    """Drafts waiting for a human, and approvals not yet written to the mailbox."""
    from storage.reviews import queue_counts

    return queue_counts(db)


def _daemon_keys(db: Database, settings: Any, active: list) -> dict[str, Any]:
    """Live audit disagreement of the active classifier (95% interval vs its promise
    epsilon) and the escalations waiting for the teacher."""
    from storage.audits import audit_summary

    clf = next((m for m in active if m.kind == "classifier"), None)
    eps = settings.router.target_risk
    if clf is not None:
        stored = clf.thresholds or {}
        cat = stored.get("category") if isinstance(stored.get("category"), dict) else {}
        eps = stored.get("epsilon", cat.get("epsilon", eps))
    audit = audit_summary(db, epsilon=float(eps), level=0.95,
                          student_version=clf.version if clf is not None else None)
    with db.session() as s:
        waiting, next_at = s.execute(
            select(func.count(), func.min(Message.next_attempt_at))
            .where(Message.state == "waiting")).one()
        last_err = s.scalar(select(Message.last_error).where(Message.state == "waiting")
                            .order_by(Message.next_attempt_at.desc()).limit(1))
    return {"audit": audit,
            "escalations_waiting": {"count": waiting, "next_attempt_at": next_at,
                                    "last_error": last_err}}
