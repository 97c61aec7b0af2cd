"""Training, saving, reloading and evaluating a student, end to end on a tiny encoder."""

from __future__ import annotations

from collections import Counter

import pytest

from distill.classifier import Classifier
from distill.data import LabelSpace, read_records_file, write_examples
from distill.evaluate import evaluate
from distill.train import train
from storage.types import Email
from tests.unit.test_student_fixtures import (  # noqa: F401 - fixture
    FAST, synthetic_records, tiny_encoder_dir, write_jsonl)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder_dir):  # noqa: F811
    d = tmp_path_factory.mktemp("train")
    train_ex = read_records_file(write_jsonl(d / "tr.jsonl", synthetic_records(240, 1)))
    val_ex = read_records_file(write_jsonl(d / "va.jsonl", synthetic_records(90, 2)))
    labels = LabelSpace.build(["billing", "technical", "account", "other"],
                              ["low", "normal", "high"], train_ex)
    write_examples(d / "train.jsonl", train_ex)
    write_examples(d / "val.jsonl", val_ex)
    metrics = train({**FAST, "encoder": str(tiny_encoder_dir), "labels": labels.to_dict(),
                     "train_path": str(d / "train.jsonl"), "val_path": str(d / "val.jsonl"),
                     "out_dir": str(d / "v1"), "device": "cpu", "epsilon": 0.1})
    return d, metrics, val_ex


def test_training_reduces_loss_and_beats_the_majority_class(trained):
    _, metrics, val_ex = trained
    hist = metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.7
    majority = Counter(e.category for e in val_ex).most_common(1)[0][1] / len(val_ex)
    assert metrics["category"]["val_accuracy"] > majority + 0.2
    assert metrics["category"]["ece_after"] <= metrics["category"]["ece_before"] + 1e-9


def test_saved_model_reloads_to_the_same_predictions(trained):
    d, _, val_ex = trained
    a = Classifier.load(d / "v1", device="cpu")
    b = Classifier.load(d / "v1", device="cpu")
    emails = [Email(id=e.id, subject=e.subject, new_text=e.body) for e in val_ex[:20]]
    ta, tb = a.classify(emails), b.classify(emails)
    assert [t.category for t in ta] == [t.category for t in tb]
    for x, y in zip(ta, tb):
        assert x.confidence == pytest.approx(y.confidence, abs=1e-6)
        assert sum(x.category_probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert x.model_version == "v1"
        assert a.handles_alone(x) == all(
            x.confidence[h] >= a.threshold(h) for h in x.confidence)
    # batch composition does not change an email's answer (dynamic padding is masked)
    one = a.classify(emails[3:4])[0]
    assert one.category == ta[3].category
    assert one.confidence["category"] == pytest.approx(ta[3].confidence["category"], abs=2e-2)
    assert set(a.thresholds) == {"category", "priority", "needs_reply"}
    assert {"epsilon", "delta", "threshold", "coverage", "bound"} <= set(a.thresholds["category"])
    # where the test started is stored with the threshold (the default start, 0.4)
    assert a.thresholds["category"]["start"] == 0.4


def test_eval_output_has_every_field(trained):
    d, _, val_ex = trained
    clf = Classifier.load(d / "v1", device="cpu")
    r = evaluate(clf, val_ex, latency_sample=10)
    for key in ("accuracy", "macro_f1", "ece", "coverage", "selective_risk", "threshold",
                "coverage_at_risk", "latency_ms_p50", "latency_ms_p99", "n", "heads"):
        assert key in r, key
    assert set(r["coverage_at_risk"]) == {"0.01", "0.02", "0.05"}
    assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
    assert {"priority", "needs_reply"} <= set(r["heads"])


def test_frozen_bottom_split_forward_matches_the_full_forward(tiny_encoder_dir):  # noqa: F811
    import torch

    from distill.data import pad
    from distill.model import StudentModel

    m = StudentModel.from_encoder(str(tiny_encoder_dir), {"category": 4, "priority": 3,
                                                          "needs_reply": 2})
    assert m.freeze_bottom(5) == 1          # capped: at least one block always trains
    assert not any(p.requires_grad for p in m.encoder.embeddings.parameters())
    assert all(p.requires_grad for p in m.blocks()[1].parameters())
    m.train()
    assert not m.blocks()[0].training and m.blocks()[1].training
    m.eval()
    ids, mask = pad([[101, 2023, 2003, 102], [101, 2023, 102], [101, 7592, 2088, 999, 2, 102]], 0)
    full = m(ids, mask)
    split = m.top(m.bottom(ids, mask, 1), mask, 1)
    for h in full:
        assert torch.allclose(full[h], split[h], atol=1e-5)


def _small_run(tmp_path, encoder_dir):
    """120 training and 45 validation examples on disk, and a 3-epoch config with 1 of the
    tiny encoder's blocks frozen."""
    train_ex = read_records_file(write_jsonl(tmp_path / "tr.jsonl", synthetic_records(120, 1)))
    val_ex = read_records_file(write_jsonl(tmp_path / "va.jsonl", synthetic_records(45, 2)))
    labels = LabelSpace.build(["billing", "technical", "account"], ["normal", "high"], train_ex)
    write_examples(tmp_path / "train.jsonl", train_ex)
    write_examples(tmp_path / "val.jsonl", val_ex)
    return train_ex, val_ex, {
        **FAST, "epochs": 3, "encoder": str(encoder_dir), "labels": labels.to_dict(),
        "train_path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "val.jsonl"),
        "device": "cpu", "freeze_layers": 1}


def test_training_with_a_frozen_bottom_leaves_it_untouched_and_caching_changes_nothing(
        tmp_path, tiny_encoder_dir):  # noqa: F811
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    train_ex, val_ex, base = _small_run(tmp_path, tiny_encoder_dir)
    cached = train({**base, "out_dir": str(tmp_path / "cached"), "cache_frozen": True})
    plain = train({**base, "out_dir": str(tmp_path / "plain"), "cache_frozen": False})
    # The cache is an optimisation only: same seed, same losses, same model, and the
    # validation split (also run over its cached bottom) scores and calibrates the same.
    assert len(cached["history"]) == len(plain["history"])
    for a, b in zip(cached["history"], plain["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1.5 / len(val_ex))
    assert cached["best_epoch"] == plain["best_epoch"]
    assert cached["category"]["temperature"] == pytest.approx(
        plain["category"]["temperature"], rel=1e-3)
    orig = AutoModel.from_pretrained(str(tiny_encoder_dir)).state_dict()
    w = load_file(str(tmp_path / "cached" / "model.safetensors"))
    for k, v in orig.items():
        saved = w[f"encoder.{k}"]
        if k.startswith(("embeddings.", "encoder.layer.0.")):
            assert torch.equal(saved, v), k            # frozen: bit for bit the pretrained
    moved = [k for k in orig if k.startswith("encoder.layer.1.")
             and not torch.equal(w[f"encoder.{k}"], orig[k])]
    assert moved, "the top block should have trained"


def test_memory_holds_the_pretrained_embeddings_and_mixes_its_vote(tmp_path,
                                                                   tiny_encoder_dir):  # noqa: F811
    """The memory (distill.memory): keys are the *pretrained* encoder's sentence embeddings
    of the training texts (not the fine-tuned one's), its vote is mixed as documented, the
    thresholds are chosen on the mixture, and a reload gives the same probabilities."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from distill.memory import MEMORY_FILE

    train_ex, val_ex, base = _small_run(tmp_path, tiny_encoder_dir)
    base = {**base, "memory_weight": 0.4, "memory_k": 3, "epsilon": 0.1,
            "lexical_weight": 0.0}   # the memory alone: its mixture is checked by hand below
    m = train({**base, "out_dir": str(tmp_path / "mem")})
    assert m["category"]["mix_temperature"] > 0 and "val_accuracy_mixed" in m["category"]
    assert (tmp_path / "mem" / MEMORY_FILE).exists()
    train({**base, "memory_weight": 0.0, "out_dir": str(tmp_path / "nomem")})
    assert not (tmp_path / "nomem" / MEMORY_FILE).exists()

    clf = Classifier.load(tmp_path / "mem", device="cpu")
    mem = clf.memory
    assert mem is not None and mem.start == 1 and len(mem.keys) == len(train_ex)
    # keys: the pretrained encoder's mean-pooled, normalised embedding of each training text
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    enc = AutoModel.from_pretrained(str(tiny_encoder_dir)).eval()
    texts = [e.text for e in train_ex]
    with torch.no_grad():
        t = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hid = enc(**t).last_hidden_state
        mask = t["attention_mask"].unsqueeze(-1).float()
        want = torch.nn.functional.normalize((hid * mask).sum(1) / mask.sum(1), dim=-1)
    cos = (want * mem.keys).sum(-1)
    assert cos.min() > 0.99, cos.min()          # bf16 autocast: close, not bit-equal
    # the vote: labels of the k nearest keys, softmax(similarity / tau)-weighted, mixed in
    queries = [e.text for e in val_ex[:12]]
    mixed = clf.probabilities(queries)["category"]
    clf.memory = None
    plain = clf.probabilities(queries)["category"]
    clf.memory = mem
    assert not torch.allclose(mixed, plain, atol=1e-3)
    with torch.no_grad():
        q = tok(queries, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hq = enc(**q).last_hidden_state
        mq = q["attention_mask"].unsqueeze(-1).float()
        eq = torch.nn.functional.normalize((hq * mq).sum(1) / mq.sum(1), dim=-1)
    sim, idx = (eq @ mem.keys.T).topk(3, dim=-1)
    vote = torch.zeros_like(plain).scatter_add_(1, mem.label_category[idx],
                                                torch.softmax(sim / mem.tau, -1))
    mix = (0.6 * plain + 0.4 * vote).log() / mem.mix_temperatures["category"]
    assert torch.allclose(mixed, torch.softmax(mix, -1), atol=0.02)
    # reload: same probabilities
    again = Classifier.load(tmp_path / "mem", device="cpu").probabilities(queries)["category"]
    assert torch.allclose(again, mixed, atol=1e-5)


def test_lexical_view_matches_sklearn_reloads_and_mixes_as_documented(tmp_path):
    """distill.lexical: its probabilities are those of the same TF-IDF + logistic regression
    fitted by sklearn directly (a class no training email had gets 0; a binary head is
    its sigmoid), saved without pickle they reload to the same numbers, and the mixture is
    (1 - w) p + w lexical under the stored temperature."""
    import numpy as np
    import torch
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from distill.lexical import COMMON, FEATURES, LEXICAL_FILE, Lexical

    recs = synthetic_records(150, 4)
    texts = [f"{r['subject']} {r['body']}" for r in recs]
    cats = ["billing", "technical", "account", "never_seen"]
    y_cat = np.array([cats.index(r["category"]) for r in recs])
    y_reply = np.array([int(r["needs_reply"]) for r in recs])
    lex = Lexical.fit(texts, {"category": y_cat, "needs_reply": y_reply,
                              "priority": np.full(len(recs), -1)},
                      {"category": 4, "needs_reply": 2, "priority": 3}, weight=0.25)
    assert set(lex.heads) == {"category", "needs_reply"}   # no labels: no regression
    queries = ["refund for my invoice please", "the login page shows an error", "hello"]
    got = lex.probabilities(queries)

    vecs = [TfidfVectorizer(**spec, **COMMON, dtype=np.float32) for spec in FEATURES.values()]
    x = hstack([v.fit_transform(texts) for v in vecs]).tocsr()
    xq = hstack([v.transform(queries) for v in vecs]).tocsr()
    for head, y in (("category", y_cat), ("needs_reply", y_reply)):
        want = LogisticRegression(C=10.0, max_iter=2000).fit(x, y).predict_proba(xq)
        cols = sorted(set(y.tolist()))
        assert torch.allclose(got[head][:, cols], torch.tensor(want, dtype=torch.float32),
                              atol=1e-4), head
    assert torch.all(got["category"][:, 3] == 0)            # never_seen: no training email
    assert got["category"][0].argmax() == 0 and got["category"][1].argmax() in (1, 2)

    lex.temperatures["category"] = 0.8
    lex.save(tmp_path)
    assert (tmp_path / LEXICAL_FILE).exists()
    again = Lexical.load(tmp_path)
    for head in got:
        assert torch.equal(again.probabilities(queries)[head], got[head])
    p = torch.softmax(torch.randn(3, 4), -1)
    want = torch.softmax((0.75 * p + 0.25 * got["category"]).log() / 0.8, -1)
    assert torch.allclose(again.mix(p, got["category"], "category"), want, atol=1e-6)
    assert again.mix(p, None, "category") is p and again.mix(p, got["category"], "x") is p
    assert Lexical.load(tmp_path / "nothing-here") is None
    one_class = np.zeros(len(recs), dtype=int)
    assert Lexical.fit(texts, {"category": one_class}, {"category": 4}) is None


def test_training_fits_and_calibrates_the_lexical_view(tmp_path, tiny_encoder_dir):  # noqa: F811
    import torch

    from distill.lexical import LEXICAL_FILE

    _, val_ex, base = _small_run(tmp_path, tiny_encoder_dir)
    m = train({**base, "lexical_weight": 0.3, "out_dir": str(tmp_path / "lex")})
    assert m["category"]["lexical_temperature"] > 0
    assert 0.0 <= m["category"]["val_accuracy_lexical"] <= 1.0
    clf = Classifier.load(tmp_path / "lex", device="cpu")
    assert clf.lexical is not None and clf.lexical.weight == 0.3
    assert clf.lexical.temperatures["category"] == pytest.approx(
        m["category"]["lexical_temperature"])
    queries = [e.text for e in val_ex[:10]]
    mixed = clf.probabilities(queries)["category"]
    lexical, clf.lexical = clf.lexical, None
    without = clf.probabilities(queries)["category"]
    assert not torch.allclose(mixed, without, atol=1e-3)
    want = lexical.mix(without, lexical.probabilities(queries)["category"], "category")
    assert torch.allclose(mixed, want, atol=1e-5)
    train({**base, "lexical_weight": 0.0, "out_dir": str(tmp_path / "nolex")})
    assert not (tmp_path / "nolex" / LEXICAL_FILE).exists()
    assert Classifier.load(tmp_path / "nolex", device="cpu").lexical is None


def test_label_audit_lists_the_disagreements_and_tallies_verdicts(trained, tmp_path):
    """scripts/bench/label_audit: every email where the student and the record differ, most
    confident first; verdicts matched by (id, student label) and counted."""
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    d, _, _ = trained
    recs = synthetic_records(90, 2)   # the validation records
    cats = sorted({r["category"] for r in recs})
    flipped = {r["id"] for r in recs[:8]}
    for r in recs[:8]:   # wrong records: the student, trained on the pattern, disagrees
        r["category"] = cats[(cats.index(r["category"]) + 1) % len(cats)]
    data = write_jsonl(tmp_path / "data.jsonl", recs)
    clf = Classifier.load(d / "v1", device="cpu")
    probs = clf.probabilities([e.text for e in read_records_file(data)])["category"]
    pred = [clf.labels.classes("category")[i] for i in probs.argmax(-1).tolist()]
    want = {r["id"]: p for r, p in zip(recs, pred) if p != r["category"]}
    assert flipped & set(want)   # some wrong records are caught

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "label_audit"

    def audit(*args, check=True):
        return subprocess.run([sys.executable, str(script), "--model", str(d / "v1"),
                               "--data", str(data), "--json", *args],
                              capture_output=True, text=True, check=check)

    first = json.loads(audit("--write", str(tmp_path / "v.tsv")).stdout)
    with (tmp_path / "v.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert {r["id"]: r["student"] for r in rows} == want
    conf = [float(r["confidence"]) for r in rows]
    assert conf == sorted(conf, reverse=True)
    assert first["disagreements"] == len(want) and first["verdicts"] == {"?": len(want)}
    assert first["accuracy"] == pytest.approx(1 - len(want) / 90)
    assert first["to_remove_for_target"] == max(0, len(want) - int(0.055 * 90))

    for r in rows:   # judge: the flipped records are wrong (G), the rest the student's (M)
        r["verdict"] = "G" if r["id"] in flipped else "M"
    with (tmp_path / "v.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    second = json.loads(audit("--verdicts", str(tmp_path / "v.tsv")).stdout)
    n_g = len(flipped & set(want))
    assert second["verdicts"] == {k: v for k, v in
                                  {"G": n_g, "M": len(want) - n_g}.items() if v}
    assert second["accuracy_if_G_right"] == pytest.approx(1 - (len(want) - n_g) / 90)
    # the mail the student would handle alone: its most confident share, and the threshold
    cuts = {h["cut"]: h for h in second["handled"]}
    assert set(cuts) == {"threshold", "coverage 0.8", "coverage 0.9"}
    top = sorted(range(90), key=lambda i: -probs[i].max().item())[:81]
    in_top = {recs[i]["id"] for i in top} & set(want)
    assert (cuts["coverage 0.9"]["emails"], cuts["coverage 0.9"]["disagreements"]) == (
        81, len(in_top))
    assert sum(cuts["coverage 0.9"]["verdicts"].values()) == len(in_top)
    assert cuts["threshold"]["emails"] == int((probs.max(-1).values
                                               >= clf.threshold("category")).sum())

    rows[0]["verdict"] = "X"   # a verdict outside G/A/M is refused, naming the id
    with (tmp_path / "bad.tsv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    bad = audit("--verdicts", str(tmp_path / "bad.tsv"), check=False)
    assert bad.returncode != 0 and rows[0]["id"] in bad.stderr
