"""`understudy models list|promote|prune` and distill.retention on a real database and disk."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from typer.testing import CliRunner

from agent.build import ActiveStudent
from agent.cli import app
from distill import registry
from distill.retention import plan_prune
from storage.models import ModelVersion, TrainingRun

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def make_version(db, state_dir: Path, version: str, status: str, day: int, *,
                 kind: str = "classifier", mb: float = 1.0, run_id: int | None = None,
                 path: Path | None = None) -> Path:
    """A version directory with files of the right names and a model_versions row."""
    d = path or registry.version_dir(state_dir, version)
    d.mkdir(parents=True)
    names = ("meta.json", "model.safetensors") if kind == "classifier" \
        else ("understudy_drafter.json", "adapter_model.safetensors")
    (d / names[0]).write_text("{}")
    (d / names[1]).write_bytes(b"\0" * int(mb * 1e6))
    registry.register(db, version, d, kind=kind, status=status, training_run_id=run_id,
                      metrics={"holdout": {"accuracy": 0.9, "coverage": 0.6}})
    with db.session() as s:
        row = s.query(ModelVersion).filter_by(version=version).one()
        row.created_at = T0 + timedelta(days=day)
        if status in ("active", "retired"):
            row.promoted_at = T0 + timedelta(days=day, hours=1)
    return d


def test_prune_keeps_active_last_retired_and_the_newest_others(sqlite_db, state_dir):
    db = sqlite_db
    with db.session() as s:
        s.add(TrainingRun(id=7, status="succeeded", trigger="schedule", data_source="sql"))
    runs7 = state_dir / "runs" / "7"
    runs7.mkdir(parents=True)
    for n in ("train.jsonl", "val.jsonl", "train.log"):
        (runs7 / n).write_text("x" * 1000)
    dirs = {v: make_version(db, state_dir, v, st, day, run_id=7 if v == "clf-1" else None)
            for v, st, day in [("clf-1", "retired", 1), ("clf-2", "rejected", 2),
                               ("clf-3", "retired", 3), ("clf-4", "rejected", 4),
                               ("clf-5", "active", 5), ("clf-6", "rejected", 6)]}
    dirs["dft-1"] = make_version(db, state_dir, "dft-1", "active", 1, kind="drafter")
    orphan = registry.models_dir(state_dir) / "clf-20261102-000000-dead"   # a killed training
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"\0" * 1000)
    (registry.models_dir(state_dir) / "notes").mkdir()                    # not ours: kept

    r = cli("models", "prune", "--keep", "1", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    # kept: active clf-5, last retired clf-3, the newest other clf-6; dft-1 active
    assert set(out["kept"]) == {"clf-5", "clf-3", "clf-6", "dft-1"}
    assert {d["version"] for d in out["deleted"]} == {"clf-1", "clf-2", "clf-4", orphan.name}
    assert out["bytes"] > 3e6 and all(d.exists() for d in dirs.values())   # dry run: no change

    r = cli("models", "prune", "--keep", "1")
    assert r.exit_code == 0, r.output
    assert "deleted 4 version(s)" in r.output
    gone = {v for v, d in dirs.items() if not d.exists()}
    assert gone == {"clf-1", "clf-2", "clf-4"} and not orphan.exists()
    assert (registry.models_dir(state_dir) / "notes").exists()
    assert not (runs7 / "train.jsonl").exists() and (runs7 / "train.log").exists()
    assert {v.version for v in registry.list_versions(db) if v.pruned_at} == gone
    assert len(registry.list_versions(db)) == 7                     # rows stay

    r = cli("models", "list")
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines()[1:-1]}
    assert lines["clf-1"].endswith("pruned") and lines["clf-5"].endswith("1 MB")
    assert "acc 0.900 cov 0.600" in lines["clf-5"]
    assert list(lines)[:2] == ["clf-6", "clf-5"]                     # newest first
    assert cli("models", "prune", "--keep", "1", "--json").stdout.count('"deleted": []') == 1


def test_prune_leaves_orphans_while_training_runs_and_paths_outside_models(
        sqlite_db, state_dir, tmp_path):
    db = sqlite_db
    make_version(db, state_dir, "clf-1", "active", 1)
    make_version(db, state_dir, "clf-0", "rejected", 0, path=tmp_path / "elsewhere")
    orphan = registry.models_dir(state_dir) / "clf-20261130-000000-beef"
    orphan.mkdir()
    with db.session() as s:
        s.add(TrainingRun(status="running", trigger="manual", data_source="sql"))
    plan = plan_prune(db, state_dir, keep=0)
    assert plan.delete == ()                       # orphan: training running; clf-0 outside
    assert any("outside" in n for n in plan.notes) and any("running" in n for n in plan.notes)
    with db.session() as s:                        # a "running" row from a crash a week ago
        s.query(TrainingRun).update({"started_at": T0})
    assert [i.version for i in plan_prune(db, state_dir, keep=0).delete] == [orphan.name]


def test_promote_rolls_back_and_the_daemon_swaps(sqlite_db, state_dir):
    db = sqlite_db
    make_version(db, state_dir, "clf-1", "retired", 1)
    make_version(db, state_dir, "clf-2", "rejected", 2)
    make_version(db, state_dir, "clf-3", "active", 3)
    make_version(db, state_dir, "clf-4", "retired", 4)
    loaded = []
    slot = ActiveStudent(db, poll_s=0.0, load_drafter=None, load_classifier=lambda p: (
        loaded.append(Path(p).name) or type("C", (), {"version": Path(p).name})()))
    assert slot().version == "clf-3"

    r = cli("models", "promote", "clf-1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"version": "clf-1", "kind": "classifier",
                                    "promoted": True, "previous": "clf-3"}
    assert slot().version == "clf-1" and loaded == ["clf-3", "clf-1"]
    assert registry.get_version(db, "clf-3").status == "retired"

    r = cli("models", "promote", "clf-2")
    assert r.exit_code == 1 and "rejected by the promotion gate" in r.output
    assert cli("models", "promote", "clf-2", "--force").exit_code == 0
    assert registry.active_version(db).version == "clf-2"
    assert "already the active" in cli("models", "promote", "clf-2").output

    assert cli("models", "prune", "--keep", "0").exit_code == 0    # clf-1 was last retired
    assert registry.get_version(db, "clf-4").pruned_at is not None
    r = cli("models", "promote", "clf-4")
    assert r.exit_code == 1 and "deleted by `understudy models prune`" in r.output
    (registry.version_dir(state_dir, "clf-1") / "model.safetensors").unlink()
    r = cli("models", "promote", "clf-1")
    assert r.exit_code == 1 and "lacks model.safetensors" in r.output
    r = cli("models", "promote", "clf-nope")
    assert r.exit_code == 1 and "models list" in r.output
    assert registry.active_version(db).version == "clf-2"


def test_models_list_on_an_empty_database(sqlite_db):
    r = cli("models", "list")
    assert r.exit_code == 0 and "no model versions yet" in r.output
    assert json.loads(cli("models", "list", "--json").stdout) == {"versions": [], "bytes": 0}
    assert cli("models", "list", "--kind", "nope").exit_code == 1


def test_eval_and_export_name_a_pruned_version(sqlite_db, state_dir, tmp_path):
    make_version(sqlite_db, state_dir, "clf-1", "active", 2)
    make_version(sqlite_db, state_dir, "clf-0", "rejected", 1)
    make_version(sqlite_db, state_dir, "dft-1", "active", 2, kind="drafter")
    make_version(sqlite_db, state_dir, "dft-0", "rejected", 1, kind="drafter")
    assert cli("models", "prune", "--keep", "0").exit_code == 0
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1", "body": "hi", "category": "other"}\n')
    r = cli("eval", "--data", str(data), "--model", "clf-0")
    assert r.exit_code == 1 and "deleted by `understudy models prune`" in r.output
    r = cli("export-drafter", "dft-0", "--out", str(tmp_path / "m"))
    assert r.exit_code == 1 and "deleted by `understudy models prune`" in r.output
