"""retrain(): records file or SQL log -> subprocess training -> gate -> model_versions row."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill import registry
from distill.classifier import Classifier
from distill.pipeline import retrain
from storage import Database
from storage.datasets import training_examples
from storage.models import Message, ModelCall, ModelVersion, Review, TrainingRun
from tests.unit.test_student_fixtures import (  # noqa: F401 - fixture
    FAST, synthetic_records, tiny_encoder_dir, write_jsonl)

CATS = ["billing", "technical", "account", "other"]


@pytest.fixture
def db(state_dir):
    d = Database(f"sqlite:///{state_dir / 'understudy.db'}")
    d.upgrade()
    yield d
    d.dispose()


def _kw(state_dir, enc, **over):
    train_overrides = {k: v for k, v in FAST.items()
                       if k not in ("epochs", "learning_rate", "batch_size")}
    return {**dict(state_dir=state_dir, categories=CATS, priorities=["low", "normal", "high"],
                   encoder=str(enc), epochs=FAST["epochs"], learning_rate=FAST["learning_rate"],
                   batch_size=FAST["batch_size"], device="cpu", target_risk=0.1,
                   train_overrides=train_overrides), **over}


def test_retrain_from_records_creates_a_version_and_gates_the_next(db, state_dir, tmp_path,
                                                                    tiny_encoder_dir):  # noqa: F811
    data = write_jsonl(tmp_path / "t.jsonl", synthetic_records(300, 3))
    r1 = retrain(db, **_kw(state_dir, tiny_encoder_dir), data=data, trigger="manual")
    assert r1.status == "succeeded" and r1.promoted, r1
    assert "first model" in r1.gate_reason
    # The run's log is for reading: the epochs' lines and a few bar frames per epoch
    # (a log file refreshes every 30 s), not a frame per step (13 per epoch here before).
    log = Path(r1.log_path).read_bytes()
    epochs = log.count(b"[train] epoch ")
    assert epochs > 0 and log.count(b"\r") <= 4 * epochs, (log.count(b"\r"), epochs)
    info = registry.active_version(db)
    assert info.version == r1.version and info.status == "active"
    assert set(info.thresholds["category"]) >= {"epsilon", "delta", "threshold", "coverage",
                                                "bound"}
    assert info.metrics["holdout"]["accuracy"] > 0.6
    clf = Classifier.load(info.path, device="cpu")
    assert clf.version == r1.version
    with db.session() as s:
        run = s.get(TrainingRun, r1.run_id)
        assert (run.status, run.promoted, run.candidate_version) == ("succeeded", True,
                                                                      r1.version)
        assert run.config["n_train"] > 0 and run.finished_at is not None

    # Second run: gated against the active model on the same held-out slice.
    r2 = retrain(db, **_kw(state_dir, tiny_encoder_dir, gate_rule="margins",
                           agreement_margin=1.0, coverage_margin=1.0), data=data,
                 trigger="schedule")
    assert r2.status == "succeeded" and r2.promoted and r2.active_metrics is not None
    with db.session() as s:
        statuses = {v.version: v.status for v in s.query(ModelVersion)}
    assert statuses == {r1.version: "retired", r2.version: "active"}

    # Third run, gated by the paired sign test on the per-email outcomes of both models,
    # then pruned to the active and the last retired version (keep_versions=0).
    r3 = retrain(db, **_kw(state_dir, tiny_encoder_dir, gate_rule="sign_test",
                           keep_versions=0), data=data, trigger="manual")
    assert r3.status == "succeeded" and "better /" in r3.gate_reason, r3.gate_reason
    assert (registry.active_version(db).version == r3.version) == r3.promoted
    # promoted: r1 (retired before r2) goes; rejected: r3 itself goes (r1 is last retired)
    gone = r1.version if r3.promoted else r3.version
    pruned = [v for v in registry.list_versions(db) if v.pruned_at]
    assert [v.version for v in pruned] == [gone] and not os.path.exists(pruned[0].path)
    assert all(os.path.isdir(v.path) for v in registry.list_versions(db) if not v.pruned_at)


def test_trainer_progress_is_relayed_line_by_line_and_the_time_limit_holds(tmp_path):
    """retrain shows the trainer's "[train] ..." lines as they come, not after minutes of
    silence; progress-bar fragments (\r) between them are not relayed."""
    import subprocess
    import sys

    from distill.pipeline import _wait_relaying

    script = ("import sys, time\n"
              "for i in range(3):\n"
              "    sys.stderr.write(f'epoch {i}: 50%|###  \\r')\n"
              "    sys.stderr.write(f'[train] epoch {i}: val accuracy 0.{i}\\n')\n"
              "    sys.stderr.flush(); time.sleep(0.3)\n"
              "sys.stderr.write('[train] saved\\n')\n")
    log, got = tmp_path / "train.log", []
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=fh)
        stamps = []
        rc = _wait_relaying(proc, log, 60,
                            lambda m: (got.append(m), stamps.append(time.monotonic())))
    assert rc == 0
    assert got == ["epoch 0: val accuracy 0.0", "epoch 1: val accuracy 0.1",
                   "epoch 2: val accuracy 0.2", "saved"]
    assert stamps[-1] - stamps[0] > 0.4           # relayed while running, not all at the end
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                stderr=fh)
        with pytest.raises(subprocess.TimeoutExpired):
            _wait_relaying(proc, log, 1.0, got.append)
        proc.kill()
        proc.wait()


def test_killed_training_leaves_active_model_and_is_recorded(db, state_dir, tmp_path,
                                                             tiny_encoder_dir):  # noqa: F811
    registry.register(db, "clf-previous", tmp_path / "prev", status="candidate")
    registry.promote(db, "clf-previous")
    data = write_jsonl(tmp_path / "t.jsonl", synthetic_records(300, 4))
    killed = []

    def killer():  # kill -9 the trainer as soon as its pid is recorded
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            with db.session() as s:
                run = s.query(TrainingRun).filter_by(status="running").first()
                if run is not None and run.pid:
                    os.kill(run.pid, signal.SIGKILL)
                    killed.append(run.pid)
            time.sleep(0.05)

    kw = _kw(state_dir, tiny_encoder_dir, epochs=500)
    t = threading.Thread(target=killer)
    t.start()
    try:
        r = retrain(db, **kw, data=data)
    finally:
        killed.append(None) if not killed else None
        t.join()
    assert killed and r.status == "killed" and not r.promoted
    assert "SIGKILL" in r.error
    assert registry.active_version(db).version == "clf-previous"
    with db.session() as s:
        run = s.get(TrainingRun, r.run_id)
        assert run.status == "killed" and run.pid == killed[0] and run.log_path
        assert s.query(ModelVersion).count() == 1        # no candidate row was added


def test_training_examples_from_sql_log(db):
    check_training_examples(db)


def check_training_examples(db):
    """Shared with the PostgreSQL integration test."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with db.session() as s:
        msgs = [Message(content_hash=f"h{i}", subject=f"subject {i}", body_text=f"body {i}",
                        new_text=f"new {i}" if i != 2 else "") for i in range(4)]
        msgs.append(Message(content_hash="dup", subject="subject 0", body_text="x",
                            new_text="new 0"))              # same text as message 0
        s.add_all(msgs)
        s.flush()
        calls = [
            (msgs[0], "billing", {"billing": 0.7, "account": 0.3}, 1, None),
            (msgs[1], "technical", None, 2, None),
            (msgs[2], "account", {"account": 0.9, "other": 0.1}, 3, None),
            (msgs[3], "other", None, 4, "timeout"),             # errored: not a label
            (msgs[4], "account", None, 5, None),                 # duplicate text, newer
            (msgs[1], "billing", None, 6, None),                 # newer answer, same message
        ]
        for m, cat, probs, minute, err in calls:
            s.add(ModelCall(message_id=m.id, role="teacher", purpose="label", model_id="t",
                            output={"category": cat, "priority": "high", "needs_reply": True},
                            probs=probs, error=err, created_at=t0 + timedelta(minutes=minute)))
        s.add(ModelCall(message_id=msgs[3].id, role="student", purpose="classify",
                        model_id="s", output={"category": "spam"}, created_at=t0))
        s.add(Review(message_id=msgs[2].id, action="edit", category="sales",
                     needs_reply=False, created_at=t0 + timedelta(minutes=10)))
        s.add(Review(message_id=msgs[3].id, action="approve", created_at=t0))  # no labels
    ex = training_examples(db)
    assert [e.category for e in ex] == ["account", "billing", "sales"]   # oldest first
    dup, m1, gold = ex
    assert dup.body == "new 0" and dup.category_probs is None           # newest of the pair
    assert m1.category == "billing" and m1.source == "teacher"          # newest answer
    assert gold.gold and gold.source == "human" and gold.category_probs is None
    assert gold.needs_reply is False and gold.priority == "high"        # unset fields kept
    assert gold.body == "body 2"                                        # new_text fallback


def test_representative_labels_and_the_split_that_uses_them(db):
    """Labels a certified student's confidence chose (escalations, audits) are not a sample
    of arriving mail; the cold start's and the audit sample's are, and calibration and
    gating are drawn from them."""
    from distill.pipeline import split_examples

    from agent.router import Router
    from storage.types import Email

    # Message-IDs for 2 and 3 such that the router's 30% audit sample holds 2, not 3.
    router = Router(audit_fraction=0.3)
    keys = [f"<k{i}@x>" for i in range(100)]
    inside = next(k for k in keys if router.sampled_for_audit(Email(id="", message_id=k)))
    outside = next(k for k in keys if not router.sampled_for_audit(Email(id="", message_id=k)))
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with db.session() as s:
        s.add_all([ModelVersion(version="never", path="x", status="retired",
                                thresholds={"category": {"threshold": 1.01}}),
                   ModelVersion(version="certified", path="y", status="active",
                                thresholds={"category": {"threshold": 0.9}})])
        msgs = [Message(content_hash=f"r{i}", subject="", body_text=f"mail {i}",
                        new_text=f"mail {i}", message_id=[None, None, inside, outside][i])
                for i in range(4)]
        s.add_all(msgs)
        s.flush()
        # 0: no student yet; 1: a student that certified nothing; 2: escalated by a
        # certified one; 3: handled by it, audited.
        for m, version in ((msgs[1], "never"), (msgs[2], "certified"), (msgs[3], "certified")):
            s.add(ModelCall(message_id=m.id, role="student", purpose="classify", model_id="s",
                            model_version=version, output={}, created_at=t0))
        for i, m in enumerate(msgs):
            s.add(ModelCall(message_id=m.id, role="teacher",
                            purpose="audit" if i == 3 else "label", model_id="t",
                            output={"category": "billing"},
                            created_at=t0 + timedelta(minutes=i + 1)))
    ex = training_examples(db)
    assert [e.representative for e in ex] == [True, True, False, False]
    # The audit sample is a hash of all arriving mail: its labelled members are a sample of
    # arriving mail whatever their route. 2 was escalated but is in the sample: it counts.
    # 3 is outside today's sample (audited under an earlier, larger fraction): it does not.
    ex = training_examples(db, audit_fraction=0.3)
    assert [e.representative for e in ex] == [True, True, True, False]

    # 1,000 cold-start labels, then 3,000 chosen by a certified student.
    from storage.datasets import TrainingExample
    many = [TrainingExample(id=str(i), subject="", body=f"m{i}", category="c",
                            representative=i < 1000) for i in range(4000)]
    train, val, held, how = split_examples(many, "stable", holdout_fraction=0.1, n_val=600,
                                           min_pool_val=298)
    assert how == "stable-representative"
    assert all(e.representative for e in val + held) and len(val) > 298 and len(held) > 50
    assert len(train) + len(val) + len(held) == 4000
    assert sum(not e.representative for e in train) == 3000       # all selected ones train
    # Too few representative labels to calibrate on: the whole log, by hash.
    _, val2, held2, how2 = split_examples(many[600:], "stable", holdout_fraction=0.1,
                                          n_val=600, min_pool_val=298)
    assert how2 == "stable" and any(not e.representative for e in val2 + held2)
    # Held-out ids stay held out when the pool mode starts.
    assert {e.id for e in held2 if e.representative} <= {e.id for e in held}
    # A records file: by time, newest held out.
    _, _, held3, how3 = split_examples(many, "time", holdout_fraction=0.1, n_val=600,
                                       min_pool_val=298)
    assert how3 == "time" and [e.id for e in held3] == [str(i) for i in range(3600, 4000)]


def test_cli_retrain_and_eval(tmp_path, state_dir, monkeypatch, tiny_encoder_dir):  # noqa: F811
    """Relative paths (--state-dir, the encoder directory, --data) mean what they mean in
    the working directory, although the trainer runs as a child process elsewhere."""
    import shutil

    from agent.cli import app

    work = tmp_path / "work"
    shutil.copytree(tiny_encoder_dir, work / "enc")
    monkeypatch.chdir(work)
    monkeypatch.setenv("UNDERSTUDY_STUDENT__ENCODER", "enc")
    monkeypatch.setenv("UNDERSTUDY_STUDENT__EPOCHS", "12")
    monkeypatch.setenv("UNDERSTUDY_STUDENT__LEARNING_RATE", "0.002")
    monkeypatch.setenv("UNDERSTUDY_STUDENT__DEVICE", "cpu")
    write_jsonl(work / "t.jsonl", synthetic_records(200, 5))
    data = "t.jsonl"
    runner = CliRunner()
    rel = ["--state-dir", "st"]
    assert runner.invoke(app, [*rel, "db", "upgrade"]).exit_code == 0
    res = runner.invoke(app, [*rel, "retrain", "--data", data, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and out["promoted"], out
    assert (work / "st" / "models" / out["version"]).is_dir()
    monkeypatch.setenv("UNDERSTUDY_STATE_DIR", str(work / "st"))
    res = runner.invoke(app, ["eval", "--data", str(data), "--latency-sample", "5", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout.strip().splitlines()[-1])
    assert ev["model_version"] == out["version"] and ev["n"] == 200
    for k in ("accuracy", "macro_f1", "ece", "coverage", "selective_risk",
              "coverage_at_risk", "latency_ms_p50", "latency_ms_p99"):
        assert k in ev
    res = runner.invoke(app, ["eval", "--data", str(data), "--latency-sample", "5"])
    assert res.exit_code == 0 and "accuracy" in res.stdout and "p99" in res.stdout
    res = runner.invoke(app, ["eval", "--data", str(data), "--latency-sample", "0"])
    assert res.exit_code == 0 and "latency not measured" in res.stdout, res.output


def test_the_assistant_teacher_labels_unlabeled_mail_for_the_student(db, state_dir, tmp_path,
                                                                     tiny_encoder_dir):  # noqa: F811
    """retrain --unlabeled: an assistant trains on the same labels, labels the unlabeled
    emails (not those whose text is labelled already), and the student trains on both."""
    from distill.data import read_training_file

    recs = synthetic_records(420, 7)
    labelled, rest = recs[:200], recs[200:]
    data = write_jsonl(tmp_path / "t.jsonl", labelled)
    unl = write_jsonl(tmp_path / "u.jsonl", [
        {"id": f"u{r['id']}", "subject": r["subject"], "body": r["body"]} for r in rest]
        + [{"id": "copy", "subject": labelled[0]["subject"], "body": labelled[0]["body"]}])
    fast = {k: v for k, v in FAST.items() if k != "progress"}
    kw = _kw(state_dir, tiny_encoder_dir, assistant_encoder=str(tiny_encoder_dir),
             assistant_overrides=fast)
    r = retrain(db, **kw, data=data, unlabeled=unl)
    assert r.status == "succeeded", r
    run_dir = state_dir / "runs" / str(r.run_id)
    assisted = [e for e in read_training_file(run_dir / "train.jsonl")
                if e.source == "assistant"]
    truth = {f"u{x['id']}": x["category"] for x in rest}
    assert sorted(e.id for e in assisted) == sorted(truth)          # not the labelled copy
    agree = sum(e.category == truth[e.id] for e in assisted) / len(assisted)
    assert agree > 0.8, agree                 # the majority class is about 43% of them
    assert all(abs(sum(e.category_probs.values()) - 1) < 1e-3 and not e.gold
               for e in assisted)
    assert not (run_dir / "assistant").exists()                    # not a model version
    assert b"[train] labelled 220 unlabeled emails" in (run_dir / "assistant.log").read_bytes()
    with db.session() as s:
        note = s.get(TrainingRun, r.run_id).config["assistant"]
    assert note["used"] and note["n_labelled"] == 220 and note["mix"] == 0.7, note
    assert min(note["val_accuracy"].values()) > 0.6, note   # the assistant, the own student
    assert (run_dir / "assistant-student-labels.jsonl").exists()
    assert not (run_dir / "assistant-student").exists()
    # Its pseudo-labels fill the student's memory: the student's vote weight is the
    # assistant's (the label-only student inside kept memory_weight, 0.3).
    assert json.loads((run_dir / "run.json").read_text())["memory_weight"] == 0.5
    assert json.loads((run_dir / "assistant-student.json").read_text())["memory_weight"] == 0.3

    # A records file with no --unlabeled: nothing to label; too many labels: not run.
    r2 = retrain(db, **kw, data=data)
    run2 = state_dir / "runs" / str(r2.run_id) / "run.json"
    assert json.loads(run2.read_text())["memory_weight"] == 0.3
    r3 = retrain(db, **{**kw, "assistant_max_labels": 10}, data=data, unlabeled=unl)
    with db.session() as s:
        notes = [s.get(TrainingRun, x.run_id).config["assistant"] for x in (r2, r3)]
    assert notes[0] == {"used": False, "reason": "no unlabeled mail"}
    assert not notes[1]["used"] and "assistant_max_labels 10" in notes[1]["reason"]
    assert r2.status == r3.status == "succeeded"
    r4 = retrain(db, **{**kw, "assistant_encoder": str(tmp_path / "no-such-encoder")},
                 data=data, unlabeled=unl)
    with db.session() as s:
        note = s.get(TrainingRun, r4.run_id).config["assistant"]
    assert r4.status == "succeeded" and not note["used"] and "fetch-mpnet" in note["reason"]
    # An assistant past its time limit is killed; the student still trains, without it.
    r5 = retrain(db, **{**kw, "assistant_timeout_s": 1.0}, data=data, unlabeled=unl)
    with db.session() as s:
        note = s.get(TrainingRun, r5.run_id).config["assistant"]
    assert r5.status == "succeeded" and not note["used"], note
    assert note["reason"].startswith("assistant killed") and "time limit" in note["reason"]
    train5 = read_training_file(state_dir / "runs" / str(r5.run_id) / "train.jsonl")
    assert train5 and not any(e.source == "assistant" for e in train5)


def test_unlabeled_emails_are_those_no_teacher_or_reviewer_labelled(db):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with db.session() as s:
        msgs = [Message(content_hash=f"h{i}", subject=f"s{i}", body_text=f"body {i}",
                        new_text=f"new {i}", created_at=t0 + timedelta(minutes=i))
                for i in range(5)]
        msgs.append(Message(content_hash="bad", subject="x", parse_error="boom",
                            created_at=t0 + timedelta(minutes=9)))
        s.add_all(msgs)
        s.flush()
        s.add(ModelCall(message_id=msgs[0].id, role="teacher", purpose="label", model_id="t",
                        output={"category": "billing"}))
        s.add(ModelCall(message_id=msgs[1].id, role="teacher", purpose="label", model_id="t",
                        output={}, error="timeout"))                # failed: still unlabeled
        s.add(ModelCall(message_id=msgs[2].id, role="student", purpose="classify",
                        model_id="s", output={"category": "billing"}))  # the student's only
        s.add(Review(message_id=msgs[3].id, action="edit", category="account", is_gold=True))
        ids = [str(m.id) for m in msgs]
    from storage.datasets import unlabeled_emails

    got = unlabeled_emails(db, limit=10)
    assert [g["id"] for g in got] == [ids[4], ids[2], ids[1]]       # newest first
    assert got[0] == {"id": ids[4], "subject": "s4", "body": "new 4"}
    assert [g["id"] for g in unlabeled_emails(db, limit=1)] == [ids[4]]


def test_cli_retrain_unlabeled_needs_an_assistant(tmp_path, state_dir, monkeypatch):
    from agent.cli import app

    monkeypatch.setenv("UNDERSTUDY_STATE_DIR", str(state_dir))
    write_jsonl(tmp_path / "u.jsonl", [{"id": "1", "body": "hello"}])
    res = CliRunner().invoke(app, ["retrain", "--data", str(tmp_path / "u.jsonl"),
                                   "--unlabeled", str(tmp_path / "u.jsonl")])
    assert res.exit_code == 1 and "student.assistant_encoder" in res.output, res.output


def test_the_assistant_labels_the_sql_logs_unlabeled_mail(db, state_dir, tiny_encoder_dir):  # noqa: F811
    """From the SQL log, the assistant labels the stored mail no teacher labelled."""
    recs = synthetic_records(160, 9)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with db.session() as s:
        msgs = [Message(content_hash=f"h{i}", subject=r["subject"], body_text=r["body"],
                        new_text=r["body"], created_at=t0 + timedelta(minutes=i))
                for i, r in enumerate(recs)]
        s.add_all(msgs)
        s.flush()
        for m, r in zip(msgs[:120], recs[:120]):
            s.add(ModelCall(message_id=m.id, role="teacher", purpose="label", model_id="t",
                            output={"category": r["category"]}, created_at=m.created_at))
    fast = {k: v for k, v in FAST.items() if k != "progress"}
    r = retrain(db, **_kw(state_dir, tiny_encoder_dir, assistant_encoder=str(tiny_encoder_dir),
                          assistant_overrides=fast, assistant_mix=1.0))
    assert r.status == "succeeded", r
    with db.session() as s:
        note = s.get(TrainingRun, r.run_id).config["assistant"]
    assert note["used"] and note["n_labelled"] == 40 and note["mix"] == 1.0, note
    assert list(note["val_accuracy"]) == ["assistant"]          # mix 1: no second training
