"""Triage passes against the local Messages-API teacher (no IMAP: accounts not configured)."""

from __future__ import annotations

from sqlalchemy import func, select

from agent.build import build_worker
from config import load_settings
from storage.models import DecisionRow, Message, ModelCall
from storage.work import queue_depth

BODIES = ["I was charged twice, please refund the invoice", "The app crashes with an error",
          "I cannot log in, my password fails", "What is the price of the pro plan?"]


def _seed(db, n):
    with db.session() as s:
        s.add_all([Message(content_hash=f"{i:064d}", subject=f"q{i}",
                           body_text=BODIES[i % 4], new_text=BODIES[i % 4]) for i in range(n)])


def _settings(messages_api, monkeypatch, db, **teacher):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    return load_settings(None, database_url=db.url, teacher={
        "base_url": messages_api.base_url, "max_retries": 0, "timeout_s": 5, **teacher},
        student={"drafter": "none"}, daemon={"triage_batch": 8})


def test_cold_start_sends_everything_to_the_teacher(sqlite_db, messages_api, monkeypatch):
    _seed(sqlite_db, 20)
    w = build_worker(_settings(messages_api, monkeypatch, sqlite_db), sqlite_db, worker_id="w1")
    r = w.run_until_empty()
    assert r.routes == {"teacher": 20} and r.waiting == 0 and r.acted == 20
    assert len(messages_api.message_requests()) == 20
    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(DecisionRow)) == 20
        assert set(s.scalars(select(Message.state))) == {"acted"}
        cats = dict(s.execute(select(Message.body_text, DecisionRow.category)
                              .join(DecisionRow)).all())
        assert s.scalar(select(func.count()).where(ModelCall.role == "teacher")) == 20
        assert s.scalar(select(func.count()).where(DecisionRow.model_call_id.is_(None))) == 0
    assert cats[BODIES[0]] == "billing" and cats[BODIES[1]] == "technical"
    # A second pass finds nothing: no decision twice.
    assert w.run_until_empty().claimed == 0


def test_teacher_outage_parks_escalations_then_drains(sqlite_db, messages_api, monkeypatch):
    _seed(sqlite_db, 10)
    w = build_worker(_settings(messages_api, monkeypatch, sqlite_db), sqlite_db, worker_id="w1")
    w.backoff_base_s = 2.0
    messages_api.start_outage(529)
    r1, r2 = w.run_once(), w.run_once()          # batches of 8 and 2
    assert r1.waiting + r2.waiting == 10 and not r1.routes and not r2.routes
    assert queue_depth(sqlite_db) == {"waiting": 10}
    failed_requests = len(messages_api.message_requests())
    assert failed_requests >= 1
    messages_api.end_outage()
    import time

    deadline = time.monotonic() + 30
    total = 0
    while total < 10 and time.monotonic() < deadline:
        total += sum(w.run_until_empty().routes.values())
        time.sleep(0.2)
    assert total == 10 and queue_depth(sqlite_db) == {}
    with sqlite_db.session() as s:
        assert s.scalar(select(func.count()).select_from(DecisionRow)) == 10
        # Each failed request is a row too (the teacher gives up at the first failure of
        # a batch, the rest of the batch is never sent, and the second batch finds the
        # teacher paused: no call).
        assert s.scalar(select(func.count()).where(ModelCall.error.is_not(None))) \
            == failed_requests


def test_triage_command_one_pass_json(sqlite_db, messages_api, monkeypatch):
    import json

    from typer.testing import CliRunner

    from agent.cli import app

    _seed(sqlite_db, 5)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("UNDERSTUDY_TEACHER__BASE_URL", messages_api.base_url)
    monkeypatch.setenv("UNDERSTUDY_TEACHER__MAX_RETRIES", "0")
    monkeypatch.setenv("UNDERSTUDY_STUDENT__DRAFTER", "none")
    r = CliRunner().invoke(app, ["--database-url", sqlite_db.url, "triage", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["decided"] == 5 and out["routes"] == {"teacher": 5} and out["waiting"] == 0
    r = CliRunner().invoke(app, ["--database-url", sqlite_db.url, "triage"])
    assert r.exit_code == 0 and "triaged 0 email(s)" in r.output


def test_breaker_pauses_double_up_to_the_cap_and_reset_on_an_answer():
    from agent.worker import TeacherBreaker

    now = [100.0]
    b = TeacherBreaker(base_s=5.0, cap_s=60.0, clock=lambda: now[0])
    assert b.remaining() == 0.0 and not b.probing
    pauses = [b.failed("529") for _ in range(6)]
    assert pauses == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert b.remaining() == 60.0 and not b.probing
    now[0] += 59.0
    assert b.remaining() == 1.0
    now[0] += 1.0
    assert b.probing and b.remaining() == 0.0
    assert b.answered() is True and b.failures == 0 and not b.probing
    assert b.answered() is False                     # answering while up ends nothing
    assert b.failed("spend cap", 900.0) == 900.0     # a spent cap brings its own pause


def test_outage_backlog_is_not_sent_batch_after_batch_and_one_email_probes(
        sqlite_db, messages_api, monkeypatch):
    """During an outage a backlog waits without a teacher call per batch; when the pause
    ends, one email probes, and only when it is answered does the rest follow."""
    from agent.worker import TeacherBreaker

    _seed(sqlite_db, 24)
    now = [0.0]
    w = build_worker(_settings(messages_api, monkeypatch, sqlite_db, concurrency=1),
                     sqlite_db, worker_id="w1")    # one request per failed call, exactly
    assert w.teacher.concurrency == 1
    w.breaker = TeacherBreaker(base_s=5.0, cap_s=60.0, clock=lambda: now[0])
    messages_api.start_outage(529)
    r = w.run_until_empty()                       # 3 batches of 8
    assert r.waiting == 24 and not r.routes
    assert len(messages_api.message_requests()) == 1   # the first call; then the pause
    with sqlite_db.session() as s:
        errors = list(s.scalars(select(Message.last_error)))
        assert all("paused" in e for e in errors[8:]), errors
    # The pause passes, the teacher is still down: one email probes, and fails.
    now[0] += 5.0
    _due_now(sqlite_db)
    r = w.run_once()
    assert r.waiting == 8 and len(messages_api.message_requests()) == 2
    assert w.breaker.failures == 2 and w.breaker.remaining() == 10.0
    # The teacher is back: the probe answers, the rest of the batch follows, and the
    # whole backlog drains.
    messages_api.end_outage()
    now[0] += 10.0
    _due_now(sqlite_db)
    total = w.run_until_empty()
    assert total.routes == {"teacher": 24} and w.breaker.failures == 0
    assert queue_depth(sqlite_db) == {}
    assert len(messages_api.message_requests()) == 2 + 24


def _due_now(db):
    """The messages' own backoff is wall-clock: make the waiting ones due (the breaker's
    clock is the test's)."""
    from sqlalchemy import update

    from storage.work import _now

    with db.session() as s:
        s.execute(update(Message).where(Message.state == "waiting")
                  .values(next_attempt_at=_now()))
