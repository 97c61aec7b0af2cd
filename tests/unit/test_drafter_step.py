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
                                "draft": f"Hi, card {i} ships within 5 working days. Thanks!"})


def test_too_few_pairs_skips_and_changes_nothing(sqlite_db, state_dir):
    _seed_pairs(sqlite_db, 3)
    out = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=10)(None)
    assert out["drafter"] == "skipped" and "3 reply pairs" in out["reason"]
    assert registry.active_version(sqlite_db, "drafter") is None


@pytest.mark.slow
def test_trains_in_a_child_and_promotes_when_held_out_loss_falls(sqlite_db, state_dir):
    # 24 pairs: the newest 8 are held out, the rest train; the replies are formulaic, so
    # a few LoRA steps lower the held-out loss and the adapter is promoted.
    _seed_pairs(sqlite_db, 24)
    step = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=20,
                        max_steps=6, max_len=192, val=8, timeout_s=900)
    out = step(None)
    assert out["drafter"] == "promoted", out
    assert out["val_loss_after"] < out["val_loss_before"]
    active = registry.active_version(sqlite_db, "drafter")
    assert active is not None and active.version == out["version"]
    from pathlib import Path

    assert (Path(active.path) / "adapter_config.json").exists()


def test_a_crashing_trainer_leaves_the_active_drafter_alone(sqlite_db, state_dir):
    _seed_pairs(sqlite_db, 5)
    step = drafter_step(sqlite_db, state_dir=state_dir, db_url=sqlite_db.url, min_pairs=1,
                        base=str(state_dir / "no-such-model"), timeout_s=300)
    out = step(None)
    assert out["drafter"] == "failed"
    assert registry.active_version(sqlite_db, "drafter") is None
