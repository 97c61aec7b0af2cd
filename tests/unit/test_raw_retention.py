"""Raw email retention: old acted emails lose their raw bytes, nothing else does."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import select
from typer.testing import CliRunner

from agent.scheduler import Leader, RetrainScheduler
from storage.models import Message
from storage.raw_retention import prune_raw

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _seed(db):
    """(subject -> expected raw kept) for a mix of ages, states and parse failures."""
    rows = [  # subject, state, age in days, parse error, raw size
        ("old-acted", "acted", 100, None, 3000),
        ("old-acted-2", "acted", 91, None, 5000),
        ("new-acted", "acted", 10, None, 700),
        ("old-waiting", "waiting", 120, None, 800),
        ("old-pending", "pending", 120, None, 900),
        ("old-broken", "acted", 200, "no headers", 400),
        ("old-no-raw", "acted", 200, None, None),
    ]
    with db.session() as s:
        for i, (subj, state, age, err, size) in enumerate(rows):
            s.add(Message(content_hash=f"{i:064d}", subject=subj, body_text=f"text of {subj}",
                          new_text=f"text of {subj}", state=state, parse_error=err,
                          raw=None if size is None else b"x" * size,
                          created_at=NOW - timedelta(days=age)))
    return {"old-acted": False, "old-acted-2": False, "new-acted": True, "old-waiting": True,
            "old-pending": True, "old-broken": True, "old-no-raw": False}


def _raws(db):
    with db.session() as s:
        return {m.subject: (m.raw is not None, m.body_text)
                for m in s.scalars(select(Message))}


def test_prune_raw_keeps_text_and_only_drops_old_acted_bytes(db):
    keep = _seed(db)
    before = _raws(db)
    dry = prune_raw(db, older_than_days=90, now=NOW, dry_run=True)
    assert (dry.messages, dry.bytes, dry.dry_run) == (2, 8000, True)
    assert _raws(db) == before                               # a dry run changes nothing
    r = prune_raw(db, older_than_days=90, now=NOW)
    assert (r.messages, r.bytes) == (2, 8000) and r.cutoff == NOW - timedelta(days=90)
    after = _raws(db)
    assert {k: v[0] for k, v in after.items()} == keep
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert prune_raw(db, older_than_days=90, now=NOW).messages == 0     # idempotent
    # A shorter retention reaches the newer one too.
    assert prune_raw(db, older_than_days=5, now=NOW).messages == 1


def test_prune_raw_works_in_chunks(sqlite_db, monkeypatch):
    import storage.raw_retention as rr

    monkeypatch.setattr(rr, "CHUNK", 3)
    with sqlite_db.session() as s:
        s.add_all([Message(content_hash=f"{i:064d}", subject=f"m{i}", state="acted",
                           raw=b"y" * (i + 1), created_at=NOW - timedelta(days=100))
                   for i in range(10)])
    r = prune_raw(sqlite_db, older_than_days=30, now=NOW)
    assert (r.messages, r.bytes) == (10, sum(range(1, 11)))
    assert not any(v[0] for v in _raws(sqlite_db).values())


def test_nightly_job_runs_housekeeping_even_without_a_retrain(sqlite_db):
    _seed(sqlite_db)
    ran = []

    def housekeeping():
        ran.append(prune_raw(sqlite_db, older_than_days=90, now=NOW).messages)
        raise RuntimeError("disk hiccup")            # logged; the job goes on

    job = RetrainScheduler(sqlite_db, cron="0 3 * * *", min_new_examples=5,
                           retrain=lambda t: None, leader=Leader(sqlite_db),
                           housekeeping=housekeeping)
    assert job.run_job()["reason"] == "too few new examples"
    assert ran == [2]


def test_db_prune_raw_command(sqlite_db):
    from agent.cli import app

    _seed(sqlite_db)           # ingested 91+ days before 2026-06-01: long before today too
    base = ["--database-url", sqlite_db.url, "db", "prune-raw"]
    r = CliRunner().invoke(app, [*base, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["messages"] == 3 and out["dry_run"] and out["older_than_days"] == 90
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0 and "deleted the raw bytes of 3 email(s)" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--older-than-days", "0"])
    assert r.exit_code != 0
    r = CliRunner(env={"UNDERSTUDY_SCHEDULER__KEEP_RAW_DAYS": "0"}).invoke(app, base)
    assert r.exit_code == 1 and "keep forever" in r.output
