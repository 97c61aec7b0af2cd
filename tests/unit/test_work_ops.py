"""Scheduler leadership and gating, metrics and health endpoints, and the student hot swap."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from agent.build import ActiveStudent
from agent.metrics import Metrics
from agent.scheduler import Leader, RetrainScheduler
from agent.worker import PassResult
from storage.calls import record_call
from storage.models import Message, ModelVersion, TrainingRun
from storage.work import record_calls
from tests.e2e.daemon_kit import wait_for


def test_one_scheduler_leader_per_postgresql_database(pg_url):
    from storage import Database

    db = Database(pg_url)
    db.upgrade()
    a, b = Leader(Database(pg_url)), Leader(Database(pg_url))
    assert a.is_leader() and not b.is_leader()
    assert a.is_leader()                     # keeps it
    a.release()
    assert b.is_leader() and not a.is_leader()
    b.release()
    # The lock dies with its connection (a kill -9): the next one takes it. The server
    # ends the dead backend, and frees its lock, a moment after the socket closes (CI
    # once saw the first try lose that race), so b tries again, as its scheduler would.
    assert a.is_leader()
    a.db.engine.dispose()
    a._conn.invalidate()
    wait_for(b.is_leader, 10, every=0.1, what="the dead connection's lock to be freed")
    b.release()


def test_sqlite_daemon_is_always_leader(sqlite_db):
    assert Leader(sqlite_db).is_leader()


def _teacher_labels(db, n, start=0):
    with db.session() as s:
        ms = [Message(content_hash=f"{i:064d}", subject=f"s{i}", body_text=f"body {i}",
                      new_text=f"body {i}") for i in range(start, start + n)]
        s.add_all(ms)
        s.flush()
        ids = [m.id for m in ms]
    for i in ids:
        record_calls(db, [lambda s, mid: record_call(
            s, message_id=mid, role="teacher", purpose="label", backend="t", model_id="c",
            output={"category": "billing"})], i)


def test_retrain_job_needs_leadership_and_enough_new_examples(sqlite_db, pg_url):
    from storage import Database

    calls = []

    def retrain(trigger):
        calls.append(trigger)
        with sqlite_db.session() as s:
            s.add(TrainingRun(status="succeeded", trigger=trigger))
        return {"promoted": True}

    results = []
    job = RetrainScheduler(sqlite_db, cron="0 3 * * *", min_new_examples=5, retrain=retrain,
                           leader=Leader(sqlite_db), on_result=results.append)
    _teacher_labels(sqlite_db, 3)
    assert job.run_job() == {"ran": False, "reason": "too few new examples", "new_examples": 3}
    _teacher_labels(sqlite_db, 3, start=3)
    assert job.run_job()["ran"] and calls == ["schedule"] and results == [{"promoted": True}]
    # Counted from the last run: nothing new since.
    assert job.run_job()["reason"] == "too few new examples"
    # A follower never runs it.
    pg = Database(pg_url)
    pg.upgrade()
    holder = Leader(pg)
    assert holder.is_leader()
    follower = RetrainScheduler(pg, cron="0 3 * * *", min_new_examples=1, retrain=retrain,
                                leader=Leader(Database(pg_url)))
    assert follower.run_job() == {"ran": False, "reason": "not leader"}
    holder.release()


def test_cron_job_is_registered_and_shuts_down(sqlite_db):
    job = RetrainScheduler(sqlite_db, cron="*/5 * * * *", min_new_examples=1,
                           retrain=lambda t: None, leader=Leader(sqlite_db))
    job.start()
    try:
        j = job._sched.get_job("retrain")
        assert j is not None and j.next_run_time is not None
        assert j.next_run_time.minute % 5 == 0
    finally:
        job.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthz_and_metrics(sqlite_db):
    with sqlite_db.session() as s:
        s.add_all([Message(content_hash="a" * 64, state="pending"),
                   Message(content_hash="b" * 64, state="waiting")])
    m = Metrics(sqlite_db, epsilon=0.02, student_version=lambda: "v1")
    port = _free_port()
    server = m.serve("127.0.0.1", port)
    try:
        r = PassResult(claimed=4, routes={"student": 3, "teacher": 1}, acted=4,
                       latencies_s=[0.2, 0.4, 0.6, 1.5], audits=2, audit_disagreements=1)
        m.observe_pass(r, 1.7)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
        assert health["ok"] and health["database"] == "ok"
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'understudy_emails_total{route="student"} 3.0' in text
        assert 'understudy_emails_total{route="teacher"} 1.0' in text
        assert "understudy_escalation_rate 0.25" in text
        assert 'understudy_queue_depth{state="waiting"} 1.0' in text
        assert 'understudy_queue_depth{state="pending"} 1.0' in text
        assert 'understudy_audits_total{agree="false"} 1.0' in text
        assert "understudy_triage_latency_seconds_count 4.0" in text
        assert "understudy_teacher_spend_today_usd 0.0" in text
        assert 'understudy_student_info{version="v1"} 1.0' in text
        m.last_pass -= 1000                   # a stalled worker turns /healthz red
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
        assert e.value.code == 503
    finally:
        server.shutdown()


def test_active_student_swaps_on_promotion_and_survives_a_bad_version(sqlite_db):
    loaded = []

    def load(path):
        if "broken" in path:
            raise OSError("no weights")
        loaded.append(path)
        return type("C", (), {"version": path.rsplit("/", 1)[-1], "thresholds": {}})()

    slot = ActiveStudent(sqlite_db, load_classifier=load, load_drafter=None, poll_s=0.0)
    assert slot().classifier is None                         # cold start
    with sqlite_db.session() as s:
        s.add(ModelVersion(version="v1", path="/m/v1", status="active"))
    assert slot().version == "v1" and not slot.refresh()     # unchanged: no reload
    with sqlite_db.session() as s:
        s.query(ModelVersion).update({"status": "retired"})
        s.add(ModelVersion(version="v2", path="/m/broken", status="active"))
    assert slot().version == "v1"                            # keeps the old one
    assert loaded == ["/m/v1"]
