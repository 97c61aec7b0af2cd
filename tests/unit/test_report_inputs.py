"""What the report and simulate are fed: the Banking77 split and the teacher cost model."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from agent.simulate.cost import CostModel
from agent.simulate.data import (
    SimulationDataError, build_banking77_files, read_banking77, read_jsonl, split_stream_test)
from agent.teacher.records import read_records
from config import PriceTable


@pytest.fixture
def rows(data_dir):
    return read_banking77(data_dir / "banking77" / "train.csv")


def test_split_is_stratified_disjoint_and_seeded(rows):
    stream, test = split_stream_test(rows, test_fraction=0.2, seed=0)
    assert len(stream) + len(test) == len(rows) == 10_003
    assert not {r.id for r in stream} & {r.id for r in test}
    per_all, per_test = Counter(r.category for r in rows), Counter(r.category for r in test)
    assert set(per_test) == set(per_all) and len(per_all) == 77
    for cat, n in per_all.items():
        assert abs(per_test[cat] - 0.2 * n) <= 1, cat
    again_stream, again_test = split_stream_test(rows, test_fraction=0.2, seed=0)
    assert [r.id for r in again_stream] == [r.id for r in stream]      # same arrival order
    other_stream, other_test = split_stream_test(rows, test_fraction=0.2, seed=1)
    assert {r.id for r in other_test} != {r.id for r in test}
    # Arrival order is shuffled, not grouped by intent.
    assert len({r.category for r in stream[:100]}) > 40


def test_files_are_teacher_records(data_dir, tmp_path):
    info = build_banking77_files(data_dir / "banking77" / "train.csv", tmp_path, limit=300)
    assert info["n_stream"] == 300 and info["n_test"] > 1900
    recs = list(read_records(tmp_path / "stream.jsonl"))       # the teacher's own reader
    assert len(recs) == 300 and all(r.category and r.body for r in recs)
    assert read_jsonl(tmp_path / "test.jsonl")[0]["id"].startswith("b77-")
    # all.jsonl: stream + test in a shuffled order, so its newest tenth spans the intents
    every = read_jsonl(tmp_path / "all.jsonl")
    assert sorted(r["id"] for r in every) == sorted(
        [r.id for r in recs] + [r["id"] for r in read_jsonl(tmp_path / "test.jsonl")])
    assert len({r["category"] for r in every[-200:]}) > 60


def test_bad_inputs_say_how_to_fix(tmp_path):
    with pytest.raises(SimulationDataError, match="train.csv"):
        read_banking77(tmp_path / "nope.csv")
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"id": "1", "body": "hi"}) + "\n")
    with pytest.raises(SimulationDataError, match=r"x.jsonl:1: missing category"):
        read_jsonl(bad)


def test_simulate_with_a_missing_or_broken_file_is_a_one_line_error(tmp_path, state_dir):
    from typer.testing import CliRunner

    from agent.cli import app

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "1", "body": "hi", "category": "a"}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1\n')
    for stream, test, says in ((tmp_path / "nope.jsonl", good, "cannot read teacher records"),
                               (good, broken, "broken.jsonl:1: not valid JSON")):
        r = CliRunner().invoke(app, ["simulate", "--stream", str(stream), "--test", str(test),
                                     "--work-dir", str(tmp_path / "w")])
        assert r.exit_code != 0 and says in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def test_cost_model_prices_like_the_claude_backend():
    prices = PriceTable(input=3.0, output=15.0, cache_write=3.75, cache_read=0.3)
    cats = {f"intent_{i}": f"intent {i}" for i in range(77)}
    cm = CostModel(prices, cats, ["low", "normal", "high", "urgent"])
    # The taxonomy is in the (cached) prefix: 77 categories make it long.
    assert cm.system_tokens > 1_000
    cold = cm.call("Help", "Where is my card?", {"category": "intent_1"}, cached=False)
    warm = cm.call("Help", "Where is my card?", {"category": "intent_1"}, cached=True)
    assert cold.cache_write_tokens == warm.cache_read_tokens == cm.system_tokens
    assert cold.usd > warm.usd > 0
    assert warm.usd == pytest.approx((warm.input_tokens * 3 + warm.output_tokens * 15
                                      + warm.cache_read_tokens * 0.3) / 1e6)
    long = cm.call("Help", "Where is my card? " * 50, {"category": "intent_1"})
    assert long.input_tokens > warm.input_tokens and long.usd > warm.usd
    # A recorded draft replaces the assumed one; needs_reply false means no draft at all.
    no_reply = cm.call("Help", "Thanks!", {"category": "x", "needs_reply": False})
    assert no_reply.output_tokens < warm.output_tokens
