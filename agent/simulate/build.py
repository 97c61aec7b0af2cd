"""Settings -> the replay's components, in an isolated state dir with its own database.

The replay never touches the configured database or models: it gets a fresh work dir
(SQLite + models), a recorded teacher answering from the stream file, the taxonomy of the
records (their categories), and the student and router settings of the user's config.

>>> result = run_simulation_from_settings(load_settings(None), stream=Path("s.jsonl"),
...                                       test=Path("t.jsonl"))            # doctest: +SKIP
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from agent.simulate.cost import CostModel
from agent.simulate.engine import WORKER, PricedTeacher, Replay, SimulationError
from agent.teacher.records import read_records
from config import Settings
from storage.db import Database


def work_dir_for(settings: Settings, work_dir: Path | None) -> Path:
    d = Path(work_dir).expanduser().absolute() if work_dir else (
        settings.state_dir / "simulations" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    if d.exists() and any(d.iterdir()):
        raise SimulationError(f"work dir {d} is not empty: a replay needs a fresh state; "
                              "pass another --work-dir or delete it")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sim_settings(settings: Settings, work: Path, stream: Path, categories: list[str],
                 risk: float | None, audit_fraction: float | None, epochs: int | None) -> Settings:
    """The user's settings with the replay's state dir, database, taxonomy and teacher."""
    data = settings.model_dump(mode="python")
    data.update(state_dir=work, database_url=f"sqlite:///{work / 'understudy.db'}", accounts=[])
    data["taxonomy"] = {"categories": {c: c.replace("_", " ") for c in categories},
                        "priorities": list(settings.taxonomy.priorities), "always_escalate": []}
    data["teacher"] = {**data["teacher"], "backend": "recorded", "records": stream,
                       "daily_spend_cap_usd": 0.0, "prices": settings.teacher.price_table}
    if risk is not None:
        data["router"]["target_risk"] = risk
    if audit_fraction is not None:
        data["router"]["audit_fraction"] = audit_fraction
    if epochs is not None:
        data["student"]["epochs"] = epochs
    data["student"]["drafter"] = "none"      # a replay measures triage, not drafting
    data["scheduler"] = {**data["scheduler"], "enabled": False}
    return Settings(**data)


def run_simulation_from_settings(settings: Settings, *, stream: Path, test: Path,
                                 retrain_every: int = 1000, risk: float | None = None,
                                 audit_fraction: float | None = None, epochs: int | None = None,
                                 work_dir: Path | None = None, limit: int | None = None,
                                 out: Path | None = None,
                                 progress: Callable[[str], None] = lambda _l: None) -> dict:
    """Build the daemon's components for an isolated work dir and run one replay.

    The result is also written to ``out`` (default ``<work dir>/run.json``): after every
    retrain as a partial result (``"partial": true``), at the end complete.
    """
    from agent.build import build_router, build_student, build_worker
    from agent.teacher import build_teacher

    stream_recs = list(read_records(stream))
    test_recs = list(read_records(test))
    if limit is not None:
        stream_recs = stream_recs[:limit]
    if not stream_recs:
        raise SimulationError(f"{stream} holds no records")
    categories = sorted({r.category for r in stream_recs} | {r.category for r in test_recs})
    work = work_dir_for(settings, work_dir)
    s = sim_settings(settings, work, Path(stream).resolve(), categories, risk, audit_fraction,
                     epochs)
    db = Database(s.db_url)
    db.upgrade()
    cost = CostModel(s.teacher.price_table, s.taxonomy.categories, s.taxonomy.priorities)
    teacher = PricedTeacher(build_teacher(s, db=None), cost)
    # poll_s=0: the worker asks the registry on every pass, so a promoted student is used
    # from the very next email (the daemon polls every few seconds).
    student = build_student(s, db, poll_s=0.0)
    worker = build_worker(s, db, worker_id=WORKER, student=student, teacher=teacher)
    r = s.router
    meta = dict(stream=str(stream), test=str(test), risk=r.target_risk,
                audit_fraction=r.audit_fraction, work_dir=str(work), database=s.db_url,
                teacher_model=s.teacher.model, prices=s.teacher.price_table.model_dump(),
                notes=["Drafting is off in a replay (classification only); the teacher's "
                       "answers are priced as if it drafted a reply for each email."])
    path = Path(out) if out else work / "run.json"

    def finish(result: dict) -> dict:
        result.update(meta)
        result["targets"] = targets(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        tmp.replace(path)
        result["run_json"] = str(path)
        return result

    replay = Replay(db, worker=worker, student=student, teacher=teacher, cost=cost,
                    router=build_router(s), retrain=_retrainer(s, db),
                    retrain_every=retrain_every, progress=progress, checkpoint=finish)
    progress(f"[simulate] {len(stream_recs)} stream emails, {len(test_recs)} test, "
             f"{len(categories)} categories, retrain every {retrain_every}; work dir {work}")
    try:
        return finish(replay.run(stream_recs, test_recs))
    finally:
        db.dispose()


def _retrainer(s: Settings, db: Database) -> Callable[[str], object]:
    """trigger -> distill.pipeline.retrain on the replay's SQL log (the real gate).

    Every version's files stay (no pruning): a replay's models are for studying afterwards
    (`understudy eval`, scripts/bench/valsize)."""
    def retrain(trigger: str):
        from distill.pipeline import retrain as run, retrain_kwargs

        return run(db, **{**retrain_kwargs(s), "keep_versions": None}, trigger=trigger)
    return retrain


def targets(result: dict) -> dict:
    """The issue's targets, each with the figure reached and whether it is met."""
    t, c, k, st = result["teacher"], result["cost"], result["cascade"], result["student"]

    def item(value, limit, ok):
        return {"value": value, "target": limit, "met": bool(value is not None and ok(value))}

    return {
        "teacher_share": item(t["share"], "<= 0.25", lambda v: v <= 0.25),
        "student_test_coverage": item(st["test_coverage"], ">= 0.85", lambda v: v >= 0.85),
        "student_test_risk": item(st["test_risk"], "<= 0.02", lambda v: v <= 0.02),
        "cascade_relative_accuracy": item(k["test_relative"], ">= 0.98", lambda v: v >= 0.98),
        "cost_ratio": item(c["ratio"], "<= 0.1", lambda v: v <= 0.1),
    }
