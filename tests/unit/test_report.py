"""The HTML report renders on an empty database, a small one and a simulate run.

The small database is written through the daemon's own storage calls (commit_decision,
record_call), so the report reads what the worker really writes. Images are decoded from
the HTML and checked to be real, non-trivial PNGs.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from agent.audit import audit_output
from agent.cli import app
from agent.report import collect_from_db, render_html
from agent.report.from_simulation import collect_from_simulation, load_run
from agent.report.model import confusion_from_pairs, coverage_risk_curve, percentiles, wilson
from agent.simulate.data import SimulationDataError
from storage.audits import audit_summary
from storage.calls import record_call
from storage.models import Message, ModelVersion
from storage.work import commit_decision

PANELS = ["routes", "escalation", "audits", "coverage-risk", "confusion", "spend", "latency"]


def images(html: str) -> dict[str, bytes]:
    """Panel id -> decoded PNG bytes, for every panel that has an image."""
    out = {}
    for pid, body in re.findall(r'<div class="panel" id="([^"]+)">(.*?)</div>\s*(?=<div class="panel"|</div>)',
                                html, re.S):
        m = re.search(r'src="data:image/png;base64,([^"]+)"', body)
        if m:
            out[pid] = base64.b64decode(m.group(1))
    return out


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", png[16:24])


def assert_real_png(png: bytes) -> None:
    w, h = png_size(png)
    assert w >= 300 and h >= 200, (w, h)
    assert len(png) > 5_000      # a blank canvas of that size compresses to far less


def test_empty_database_renders_placeholders(sqlite_db):
    d = collect_from_db(sqlite_db, epsilon=0.02)
    html = render_html(d)
    assert images(html) == {}
    assert html.count("no data yet") == len(PANELS)
    for pid in PANELS:
        assert f'id="{pid}"' in html
    assert d.summary["emails_decided"] == 0


def _small_db(db, n: int = 40):
    """n messages over two hours: cold start (teacher), then a student with audits."""
    t0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
    cats = ["billing", "technical", "account"]
    with db.session() as s:
        s.add(ModelVersion(version="clf-test", kind="classifier", path="/nowhere", status="active",
                           thresholds={"category": {"threshold": 0.8, "trained": True,
                                                    "epsilon": 0.02}},
                           promoted_at=t0 + timedelta(minutes=30)))
        msgs = [Message(content_hash=f"h{i}", subject=f"s{i}", body_text="b", state="claimed",
                        claimed_by="w", created_at=t0 + timedelta(minutes=3 * i))
                for i in range(n)]
        s.add_all(msgs)
        s.flush()
        ids = [m.id for m in msgs]
    for i, mid in enumerate(ids):
        truth = cats[i % 3]
        when = t0 + timedelta(minutes=3 * i, seconds=2)
        calls = []
        student_cat = truth if i % 7 else cats[(i + 1) % 3]    # the student errs sometimes
        conf = 0.95 if i % 4 else 0.6
        if i >= 10:
            calls.append(lambda s, m, c=student_cat, p=conf: record_call(
                s, message_id=m, role="student", purpose="classify", backend="torch",
                model_id="minilm", model_version="clf-test", output={"category": c},
                confidence=p, latency_ms=8.0 + p))
        escalate = i < 10 or conf < 0.8
        if escalate:
            calls.append(lambda s, m, c=truth: record_call(
                s, message_id=m, role="teacher", purpose="label", backend="anthropic",
                model_id="claude-sonnet-4-5", output={"category": c}, cost_usd=0.004,
                input_tokens=900, output_tokens=150, latency_ms=1800.0, escalated=True))
            decision = dict(source="teacher", category=truth, priority="normal",
                            needs_reply=True, escalated=True)
        else:
            decision = dict(source="student", category=student_cat, priority="normal",
                            needs_reply=True, audited=i % 3 == 0)
            if i % 3 == 0:
                calls.append(lambda s, m, c=truth, sc=student_cat: record_call(
                    s, message_id=m, role="teacher", purpose="audit", backend="anthropic",
                    model_id="claude-sonnet-4-5", output=audit_output("clf-test", sc, c),
                    cost_usd=0.004, latency_ms=1700.0))
        assert commit_decision(db, mid, "w", decision=decision, calls=calls,
                               deciding_call=len(calls) - 1 if calls else None)
        # Spread the rows in time, as a day of mail would be.
        from sqlalchemy import update

        from storage.models import DecisionRow, ModelCall
        with db.session() as s:
            s.execute(update(DecisionRow).where(DecisionRow.message_id == mid)
                      .values(created_at=when))
            s.execute(update(ModelCall).where(ModelCall.message_id == mid)
                      .values(created_at=when))
    return ids


def test_small_database_every_panel_has_an_image(sqlite_db):
    _small_db(sqlite_db)
    d = collect_from_db(sqlite_db, epsilon=0.02)
    assert d.summary["emails_decided"] == 40
    assert sum(b.total for b in d.routes) == 40
    assert sum(b.teacher for b in d.routes) == d.summary["escalation_rate"] * 40
    assert sum(a.n for a in d.audits) == d.summary["audits"] > 0
    # Spend is cumulative: never decreasing, never above teacher-only at the end.
    spent = [p.teacher_usd for p in d.spend]
    assert spent == sorted(spent) and spent[-1] <= d.spend[-1].teacher_only_usd
    assert d.coverage_risk is not None and d.coverage_risk.model_version == "clf-test"
    assert d.confusion is not None and d.confusion.n > 0
    html = render_html(d)
    imgs = images(html)
    assert set(imgs) == set(PANELS), set(PANELS) - set(imgs)
    for png in imgs.values():
        assert_real_png(png)
    assert "no data yet" not in html
    # The audit interval is the one `status` shows for the same audits (exact, 95%).
    a = audit_summary(sqlite_db, epsilon=0.02)
    lo, hi = a["interval"]
    assert f"{a['disagreements']}/{a['n']}" in html
    assert f"exact 95% interval {lo:.1%}–{hi:.1%}" in html
    assert "teacher-only cost" in html and "only usd" not in html   # captions read as words


def _run_json(n_windows: int = 8) -> dict:
    windows, blended, only = [], 0.0, 0.0
    for w in range(n_windows):
        teacher = max(2, 50 - 6 * w)
        blended += teacher * 0.0036
        only += 50 * 0.0036
        windows.append({"start": 50 * w, "end": 50 * (w + 1), "student": 50 - teacher,
                        "teacher": teacher, "audits": 1 if w else 0,
                        "audit_disagreements": int(w == 3), "blended_usd": blended,
                        "teacher_only_usd": only, "correct": 49})
    cov, risk = coverage_risk_curve([(i / 100, i > 8) for i in range(100)])
    cm = confusion_from_pairs([("a", "a")] * 30 + [("a", "b")] * 2 + [("b", "b")] * 20)
    return {"n_stream": 400, "n_test": 100, "retrain_every": 100, "risk": 0.02,
            "stream": "s.jsonl", "test": "t.jsonl",
            "teacher": {"calls": 200, "share": 0.5}, "windows": windows,
            "cost": {"blended_usd": blended, "teacher_only_usd": only, "ratio": blended / only,
                     "mean_input_tokens": 2700, "mean_output_tokens": 180},
            "cascade": {"stream_accuracy": 0.98, "test_accuracy": 0.99},
            "student": {"version": "clf-x", "test_coverage": 0.8, "test_risk": 0.015},
            "curve": [{"emails_seen": 100 * (i + 1), "n_examples": 90 * (i + 1),
                       "promoted": True, "active_version": f"v{i}", "teacher_calls": 60 * i,
                       "test_coverage": 0.2 * i, "test_risk": 0.01, "gate_reason": "better"}
                      for i in range(4)],
            "test_eval": {"coverage_risk": {"coverage": list(cov), "risk": list(risk), "n": 100},
                          "operating_point": [0.8, 0.015],
                          "confusion": {"labels": list(cm.labels),
                                        "matrix": [list(r) for r in cm.matrix]}},
            "latency": {"student classify": {"n": 300, "p50": 4.0, "p90": 6.0, "p99": 9.0}}}


def test_simulation_run_renders(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_run_json()))
    d = collect_from_simulation(load_run(path))
    html = render_html(d, xlabel="stream emails")
    imgs = images(html)
    assert set(imgs) == set(PANELS)
    for png in imgs.values():
        assert_real_png(png)
    assert html.count("<tr>") == 1 + 4          # header + one row per retrain
    assert "clf-x" in html


def test_load_run_rejects_what_is_not_a_run(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(SimulationDataError, match="not a simulate run"):
        load_run(bad)
    with pytest.raises(SimulationDataError, match="not found"):
        load_run(tmp_path / "missing.json")


def test_report_command_on_empty_database(tmp_path, state_dir):
    r = CliRunner().invoke(app, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "r.html"
    r = CliRunner().invoke(app, ["report", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["out"] == str(out) and out.stat().st_size == data["bytes"]
    assert "no data yet" in out.read_text()


def test_report_command_from_simulation(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run_json()))
    out = tmp_path / "sim.html"
    r = CliRunner().invoke(app, ["report", "--from-simulation", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "report written to" in r.output
    assert len(images(out.read_text())) == len(PANELS)


def test_statistics_helpers():
    lo, hi = wilson(0, 50)
    assert lo == 0.0 and 0.05 < hi < 0.08
    assert wilson(5, 10)[0] < 0.5 < wilson(5, 10)[1]
    st = percentiles([float(i) for i in range(1, 101)], "x")
    assert (st.p50, st.p90, st.p99) == (50.0, 90.0, 99.0)
    cov, risk = coverage_risk_curve([(0.9, True), (0.8, True), (0.7, False), (0.6, False)],
                                    points=4)
    assert cov == (0.25, 0.5, 0.75, 1.0) and risk == (0.0, 0.0, 1 / 3, 0.5)
    cm = confusion_from_pairs([(f"c{i}", f"c{i}") for i in range(30)], max_labels=5)
    assert cm.labels[-1] == "(other)" and cm.n == 30 and len(cm.labels) == 5


def test_recorded_teacher_spend_is_estimated_at_configured_prices(sqlite_db):
    from sqlalchemy import update

    from config import PriceTable
    from storage.models import ModelCall

    _small_db(sqlite_db)
    with sqlite_db.session() as s:      # a recorded teacher bills nothing
        s.execute(update(ModelCall).values(cost_usd=0.0))
    assert collect_from_db(sqlite_db).spend == ()
    d = collect_from_db(sqlite_db, price_table=PriceTable())
    assert d.spend and d.spend[-1].teacher_usd < d.spend[-1].teacher_only_usd
    assert d.summary["teacher_spend_estimated_usd"] > 0
    assert any("estimated" in n for n in d.notes)
    assert "spend" in images(render_html(d))


def test_report_counts_whom_the_settled_disputes_proved_right(sqlite_db):
    from agent.review.disputes import settle
    from storage.audits import list_disputes

    _small_db(sqlite_db)
    d = collect_from_db(sqlite_db, epsilon=0.02)
    k = audit_summary(sqlite_db, epsilon=0.02)["disagreements"]
    assert k > 0
    assert d.summary["disputes_settled"] == (
        f"0 of {k}: student right 0, teacher right 0, neither 0")
    first = list_disputes(sqlite_db)[0]
    settle(sqlite_db, first.message_db_id, category=first.student_category, reviewer="ann",
           categories=["billing", "technical", "account"])
    d = collect_from_db(sqlite_db, epsilon=0.02)
    assert d.summary["disputes_settled"] == (
        f"1 of {k}: student right 1, teacher right 0, neither 0")
    assert "disputes settled" in render_html(d)
