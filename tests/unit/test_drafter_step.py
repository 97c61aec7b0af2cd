"""The drafter half of a retrain: skipped without pairs, trained and gated in a child."""

from __future__ import annotations

import pytest

from distill import registry
from distill.drafter_step import drafter_step
from storage.calls import record_call
from storage.models import Message


def _seed_pairs(db, n: int) -> None:
    with db.session() as s:
        for i in range(n):
            m = Message(content_hash=f"{i:064d}", subject=f"Card {i} not arrived",
                        body_text=f"Hello, my card number {i} has not arrived yet. Where is it?",
                        new_text=f"Hello, my card number {i} has not arrived yet. Where is it?",
                        state="decided")
            s.add(m)
            s.flush()
            record_call(s, message_id=m.id, role="teacher", purpose="label",
                        backend="recorded", model_id="records",
                        output={"category": "card_arrival",
                                "draft": f"Hi, card {i} ships within 5 working days. Thanks!",
                                "rationale": "A card that has not arrived: tell them when."})


def test_the_settings_reach_the_training_command(sqlite_db):
    from agent.build import build_drafter_step
    from config import load_settings

    on = load_settings(None, student={"drafter_rationale": True, "drafter_patience": 5,
                                      "drafter_max_steps": 7})
    opts = build_drafter_step(on, sqlite_db).train_options
    assert "--rationale" in opts and opts[opts.index("--patience") + 1] == "5"
    assert opts[opts.index("--max-steps") + 1] == "7"
    off = build_drafter_step(load_settings(None), sqlite_db).train_options
    assert "--rationale" not in off and off[off.index("--patience") + 1] == "3"
    # every option is one drafter_train understands
    from distill.drafter_train import _main

    with pytest.raises(SystemExit) as e:
        _main([*opts, "--db", "sqlite://", "--out", "x", "--help"])
    assert e.value.code == 0


def test_too_few_pairs_skips_and_changes_nothing(sqlite_db, state_dir):
    _seed_pairs(sqlite_db, 3)
    out = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=10)(None)
    assert out["drafter"] == "skipped" and "3 reply pairs" in out["reason"]
    assert registry.active_version(sqlite_db, "drafter") is None


def test_a_records_file_is_the_source_when_given(sqlite_db, state_dir, tmp_path):
    # retrain --data F.jsonl: the pairs are the records' drafts, not the SQL log's.
    import json

    _seed_pairs(sqlite_db, 30)
    recs = tmp_path / "records.jsonl"
    recs.write_text("\n".join(json.dumps(
        {"id": str(i), "subject": f"Card {i}", "body": "Where is my card?", "category": "x",
         "draft": "Hi, it ships Monday." if i < 3 else ""}) for i in range(5)) + "\n")
    out = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=10,
                       records=recs)(None)
    assert out["drafter"] == "skipped" and out["reason"].startswith("3 reply pairs")
    # A crash of the child on the records path leaves nothing active either.
    bad = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=1,
                       records=recs, base=str(state_dir / "no-such-model"), timeout_s=300)
    res = bad(None)
    assert res["drafter"] == "failed"
    assert "--records" in res["error"] and "--db" not in res["error"]   # the command it ran
    assert registry.active_version(sqlite_db, "drafter") is None


@pytest.mark.slow
def test_trains_in_a_child_and_promotes_when_held_out_loss_falls(sqlite_db, state_dir):
    # 24 pairs: the newest 6 (a quarter) are held out, the rest train; the replies are formulaic, so
    # a few LoRA steps lower the held-out loss and the adapter is promoted. With the
    # teacher's rationales as the auxiliary task, as student.drafter_rationale turns on.
    _seed_pairs(sqlite_db, 24)
    step = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=20,
                        max_steps=6, max_len=192, val=8, timeout_s=900, rationale=True,
                        patience=2)
    out = step(None)
    assert out["drafter"] == "promoted", out
    assert out["val_loss_after"] < out["val_loss_before"]
    assert out["n_rationale"] == 18 and out["best_step"] > 0
    assert out["val_loss_active"] is None                  # nothing was active yet
    active = registry.active_version(sqlite_db, "drafter")
    assert active is not None and active.version == out["version"]
    from pathlib import Path

    assert (Path(active.path) / "adapter_config.json").exists()
    # A weaker retrain (one step) beats the base model but not the active adapter on the
    # same held-out pairs: it is recorded as rejected and the active one stays.
    weak = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=20,
                        max_steps=1, max_len=192, val=8, timeout_s=900)(None)
    assert weak["drafter"] == "rejected", weak
    assert weak["val_loss_active"] < weak["val_loss_after"]
    assert registry.active_version(sqlite_db, "drafter").version == out["version"]


def test_a_crashing_trainer_leaves_the_active_drafter_alone(sqlite_db, state_dir):
    _seed_pairs(sqlite_db, 5)
    step = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=1,
                        base=str(state_dir / "no-such-model"), timeout_s=300)
    out = step(None)
    assert out["drafter"] == "failed"
    assert registry.active_version(sqlite_db, "drafter") is None
