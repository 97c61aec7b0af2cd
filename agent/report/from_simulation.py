"""Collect ReportData from a simulate run (the JSON `understudy simulate --json` prints).

Time is the stream position: each window is a slice of arriving emails, so "over time"
reads as "as the mailbox was replayed". The coverage-risk curve and the confusion matrix
are the final student's on the held-out test file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from agent.report.model import (
    AuditBucket, Confusion, CoverageRisk, LatencyStat, ReportData, RouteBucket, SpendPoint)
from agent.simulate.data import SimulationDataError


def load_run(path: Path) -> dict:
    path = Path(path)
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimulationDataError(
            f"{path} not found: write one with `understudy simulate ... --json > {path}`") from None
    except json.JSONDecodeError as e:
        raise SimulationDataError(f"{path}: not JSON ({e.msg}); pass simulate's --json output"
                                  ) from None
    if not isinstance(run, dict) or "windows" not in run or "cost" not in run:
        raise SimulationDataError(f"{path}: not a simulate run (no 'windows'/'cost' keys)")
    return run


def collect_from_simulation(run: dict, *, source: str = "simulate run",
                            title: str = "understudy simulation report") -> ReportData:
    windows = run.get("windows") or []
    label = lambda w: f"{w['start'] + 1}–{w['end']}"  # noqa: E731
    routes = tuple(RouteBucket(label(w), student=w["student"], teacher=w["teacher"])
                   for w in windows)
    audits = tuple(AuditBucket(label(w), w.get("audits", 0), w.get("audit_disagreements", 0))
                   for w in windows)
    spend = tuple(SpendPoint(w["end"], label(w), w["blended_usd"], w["teacher_only_usd"])
                  for w in windows)
    te = run.get("test_eval") or {}
    cr = None
    if (te.get("coverage_risk") or {}).get("coverage"):
        c = te["coverage_risk"]
        op = te.get("operating_point")
        cr = CoverageRisk(coverage=tuple(c["coverage"]), risk=tuple(c["risk"]),
                          operating_point=tuple(op) if op else None,
                          model_version=(run.get("student") or {}).get("version"),
                          n=int(c.get("n", 0)),
                          source="Final student on the held-out test file; the dot is its "
                                 "stored threshold.")
    cm = None
    if (te.get("confusion") or {}).get("labels"):
        m = te["confusion"]
        cm = Confusion(labels=tuple(m["labels"]), matrix=tuple(tuple(r) for r in m["matrix"]),
                       source="Final student vs the records on the test file (all emails, "
                              "also those it would escalate).")
    lat = tuple(LatencyStat(name=k, n=v["n"], p50=v["p50"], p90=v["p90"], p99=v["p99"])
                for k, v in (run.get("latency") or {}).items() if isinstance(v, dict))
    teacher, cost, cascade = run.get("teacher", {}), run.get("cost", {}), run.get("cascade", {})
    student = run.get("student", {})
    summary = {
        "emails_in_stream": run.get("n_stream"),
        "teacher_calls": teacher.get("calls"),
        "teacher_call_share": teacher.get("share"),
        "blended_usd": cost.get("blended_usd"),
        "teacher_only_usd": cost.get("teacher_only_usd"),
        "saved": (1 - cost["blended_usd"] / cost["teacher_only_usd"])
        if cost.get("teacher_only_usd") else None,
        "cascade_stream_accuracy": cascade.get("stream_accuracy"),
        "cascade_test_accuracy": cascade.get("test_accuracy"),
        "student_test_coverage": student.get("test_coverage"),
        "student_test_risk": student.get("test_risk"),
        "retrains": len(run.get("curve") or []),
        "final_student": student.get("version") or "none",
    }
    notes = [f"Stream {run.get('stream')} ({run.get('n_stream')} emails), test "
             f"{run.get('test')} ({run.get('n_test')}), retrain every "
             f"{run.get('retrain_every')} emails, target risk ε = {run.get('risk')}.",
             "Costs are estimates: each teacher call priced at the configured Claude prices "
             f"with {cost.get('mean_input_tokens', '?')} input and "
             f"{cost.get('mean_output_tokens', '?')} output tokens on average (the prompt the "
             "Claude backend would send); student calls cost ~0."]
    if run.get("partial"):
        notes.insert(0, f"PARTIAL RUN: written after retrain {len(run.get('curve') or [])}, "
                        f"{run.get('n_stream')} emails replayed; the student figures are those "
                        "of the model active at that point.")
    notes += list(run.get("notes") or [])
    return ReportData(
        title=title, source=source,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        epsilon=run.get("risk"), summary=summary, routes=routes, audits=audits, spend=spend,
        coverage_risk=cr, confusion=cm, latency=lat, curve=tuple(run.get("curve") or ()),
        notes=tuple(notes))
