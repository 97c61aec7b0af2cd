"""`understudy simulate` on a small Banking77 stream: the real worker, router, recorded
teacher, retraining with the real gate and the real student, then the report.

One replay (module scope) serves every assertion: it trains real students, which is the
expensive part (about a minute per retrain here).
"""

from __future__ import annotations

import base64
import json
import re

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from agent.cli import app
from agent.simulate.data import read_banking77, split_stream_test, to_record
from agent.teacher.records import write_records
from storage.db import Database
from storage.models import DecisionRow, ModelCall, ModelVersion, TrainingRun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CATS = ("card_arrival", "lost_or_stolen_card", "exchange_rate", "pin_blocked",
        "age_limit", "terminate_account")
# Small enough for the suite's budget; a loose target risk so that even a student trained
# on 80 labels (8 in its validation split) certifies a threshold and handles some mail.
N_STREAM, RETRAIN_EVERY, N_TEST, RISK = 160, 80, 60, "0.4"


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    from tests.conftest import DATA

    csv = DATA / "banking77" / "train.csv"
    if not csv.exists():
        pytest.skip(f"shared data not found at {csv}")
    tmp = tmp_path_factory.mktemp("simulate")
    rows = [r for r in read_banking77(csv) if r.category in CATS]
    stream, test = split_stream_test(rows, test_fraction=0.2, seed=0)
    write_records(tmp / "stream.jsonl", (to_record(r) for r in stream[:N_STREAM]))
    write_records(tmp / "test.jsonl", (to_record(r) for r in test[:N_TEST]))
    mp = pytest.MonkeyPatch()
    mp.setenv("UNDERSTUDY_STATE_DIR", str(tmp / "state"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("UNDERSTUDY_STUDENT__EPOCHS", "2")
    try:
        r = CliRunner().invoke(app, [
            "simulate", "--stream", str(tmp / "stream.jsonl"), "--test", str(tmp / "test.jsonl"),
            "--retrain-every", str(RETRAIN_EVERY), "--risk", RISK, "--audit-fraction", "0.3",
            "--work-dir", str(tmp / "work"), "--out", str(tmp / "run.json"), "--json"])
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return {"result": result, "dir": tmp, "stderr": r.stderr}


def test_every_field_is_there(replay):
    r = replay["result"]
    for key in ("n_stream", "n_test", "retrain_every", "teacher", "cost", "cascade", "student",
                "audits", "curve", "windows", "test_eval", "latency", "targets", "work_dir"):
        assert key in r, key
    assert r["n_stream"] == N_STREAM and r["n_test"] == N_TEST
    assert set(r["teacher"]) >= {"calls", "escalations", "audits", "share"}
    assert set(r["cost"]) >= {"blended_usd", "teacher_only_usd", "ratio", "student_usd"}
    assert set(r["cascade"]) >= {"stream_accuracy", "test_accuracy", "teacher_accuracy"}
    assert set(r["student"]) >= {"version", "test_coverage", "test_risk",
                                 "test_hindsight_coverage", "epsilon"}
    assert len(r["curve"]) == N_STREAM // RETRAIN_EVERY
    for p in r["curve"]:
        assert set(p) >= {"emails_seen", "n_examples", "promoted", "gate_reason",
                          "teacher_calls", "test_coverage", "test_risk",
                          "test_hindsight_coverage"}
    assert set(r["targets"]) == {"teacher_share", "student_test_coverage", "student_test_risk",
                                 "cascade_relative_accuracy", "cost_ratio"}
    assert "[simulate] retrain 1 at" in replay["stderr"]


def test_cost_accounting_is_monotone_and_consistent(replay):
    r = replay["result"]
    t, c = r["teacher"], r["cost"]
    assert t["calls"] == t["escalations"] + t["audits"]
    assert t["share"] == pytest.approx(t["calls"] / r["n_stream"])
    # The cold start (first N emails, no student yet) all go to the teacher.
    first = r["curve"][0]
    assert first["teacher_calls"] >= RETRAIN_EVERY
    prev_b = prev_o = 0.0
    for w in r["windows"]:
        assert w["blended_usd"] >= prev_b and w["teacher_only_usd"] > prev_o
        assert w["blended_usd"] <= w["teacher_only_usd"] + 1e-9
        prev_b, prev_o = w["blended_usd"], w["teacher_only_usd"]
    assert prev_b == pytest.approx(c["blended_usd"], abs=1e-6)
    assert prev_o == pytest.approx(c["teacher_only_usd"], abs=1e-6)
    # The dollar figures are rounded to micro-dollars, the ratio is not: a few cents of
    # spend leave a relative difference of ~1e-6 between the two.
    assert c["ratio"] == pytest.approx(c["blended_usd"] / c["teacher_only_usd"], rel=1e-4)
    calls = [p["teacher_calls"] for p in r["curve"]]
    assert calls == sorted(calls)
    assert sum(w["student"] + w["teacher"] for w in r["windows"]) == r["n_stream"]
    # The bill in the database is the bill in the result.
    db = Database(r["database"])
    with db.session() as s:
        spent = s.scalar(select(func.sum(ModelCall.cost_usd)).where(ModelCall.role == "teacher"))
        n_teacher = s.scalar(select(func.count()).where(ModelCall.role == "teacher"))
        decisions = s.scalar(select(func.count()).select_from(DecisionRow))
        runs = s.scalar(select(func.count()).select_from(TrainingRun))
        versions = s.scalar(select(func.count()).select_from(ModelVersion))
    db.dispose()
    assert spent == pytest.approx(c["blended_usd"], abs=1e-6)
    assert n_teacher == t["calls"] and decisions == r["n_stream"]
    assert runs == len(r["curve"]) and versions >= sum(p["promoted"] for p in r["curve"])


def test_real_students_were_trained_and_used(replay):
    r = replay["result"]
    assert r["curve"][0]["promoted"], r["curve"][0]      # the first model always promotes
    assert r["student"]["version"] is not None
    assert 0.0 <= r["student"]["test_coverage"] <= 1.0
    # After the first promotion every email is classified by the student first.
    after = [w for w in r["windows"] if w["start"] >= RETRAIN_EVERY]
    assert after and all(w["active_version"] for w in after)
    assert r["latency"]["student classify"]["n"] == N_STREAM - RETRAIN_EVERY
    # Cascade on the test file: the student's errors are the only errors.
    st = r["student"]
    assert r["cascade"]["test_accuracy"] == pytest.approx(
        1 - st["test_coverage"] * st["test_risk"], abs=1e-9)
    cr = r["test_eval"]["coverage_risk"]
    assert cr["coverage"][-1] == pytest.approx(1.0) and len(cr["coverage"]) == len(cr["risk"])
    # The model's limit next to its certificate: the largest share of the test file a
    # threshold picked in hindsight hands it at the same risk target.
    eps, hind = st["epsilon"], st["test_hindsight_coverage"]
    assert eps == pytest.approx(float(RISK))
    assert 0.0 <= hind <= 1.0
    best_on_curve = max((c for c, k in zip(cr["coverage"], cr["risk"]) if k <= eps), default=0)
    assert hind >= best_on_curve - 2 / N_TEST     # the curve samples cuts; ties move one
    last = r["curve"][-1]
    if last["active_version"] == st["version"]:   # the same model on the same file
        assert last["test_hindsight_coverage"] == pytest.approx(hind)


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([^"]+)"', html)]


def test_report_from_the_run_and_from_its_database(replay, tmp_path):
    r = replay["result"]
    for args in (["report", "--from-simulation", str(replay["dir"] / "run.json")],
                 ["--database-url", r["database"], "report"]):
        out = tmp_path / "r.html"
        res = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert res.exit_code == 0, res.output
        html = out.read_text()
        pngs = _pngs(html)
        # Every panel has a plot, except audits when the student handled nothing alone.
        assert len(pngs) == 7 - (r["audits"]["n"] == 0)
        assert html.count("no data yet") == (r["audits"]["n"] == 0)
        for png in pngs:
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
