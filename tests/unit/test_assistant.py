"""distill.assistant's pure parts: which unlabeled mail is labelled, how soft labels mix."""

from __future__ import annotations

import json

import pytest

from distill.assistant import mix, pseudo_labelled, select_unlabeled
from distill.data import read_unlabeled_file
from distill.errors import DatasetError
from storage.datasets import TrainingExample


def test_select_unlabeled_skips_labelled_ids_and_texts_and_repeats():
    labelled = [TrainingExample(id="1", subject="Card", body="where is my card", category="a")]
    cands = [{"id": "1", "subject": "", "body": "other text"},           # a labelled id
             {"id": "2", "subject": "card", "body": "Where is  my card"},  # its text, reworded
             {"id": "3", "subject": "", "body": "refund please"},
             {"id": "4", "subject": "", "body": "Refund please"},          # repeats 3
             {"id": "5", "subject": "", "body": "new pin"},
             {"id": "6", "subject": "", "body": "lost phone"}]
    assert [c["id"] for c in select_unlabeled(cands, labelled, 10)] == ["3", "5", "6"]
    assert [c["id"] for c in select_unlabeled(cands, labelled, 2)] == ["3", "5"]


def test_mix_weighs_the_assistant_and_falls_back_to_it():
    a = {"x": {"p": 0.9, "q": 0.1}, "y": {"q": 1.0}}
    own = {"x": {"p": 0.1, "r": 0.9}}                     # no opinion on y
    m = mix(a, own, 0.7)
    assert m["x"] == pytest.approx({"p": 0.66, "q": 0.07, "r": 0.27})
    assert m["y"] == pytest.approx({"q": 1.0})
    assert mix(a, own, 1.0) is a and mix(a, None, 0.5) is a


def test_pseudo_labelled_takes_the_most_likely_category_and_is_never_representative():
    rows = [{"id": "u1", "subject": "s", "body": "b"}, {"id": "u2", "subject": "", "body": "c"}]
    out = pseudo_labelled(rows, {"u1": {"a": 0.2, "b": 0.8}})
    assert len(out) == 1                                  # u2 has no prediction
    e = out[0]
    assert (e.id, e.category, e.source, e.representative, e.gold) == ("u1", "b", "assistant",
                                                                      False, False)
    assert e.category_probs == {"a": 0.2, "b": 0.8} and e.text == "s\nb"


def test_read_unlabeled_file_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_unlabeled_file(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "body": "ok"}\nnot json\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2 is not JSON"):
        read_unlabeled_file(bad)
    bad.write_text(json.dumps({"id": "1", "subject": "no body"}) + "\n")
    with pytest.raises(DatasetError, match=":1 lacks an id or a body"):
        read_unlabeled_file(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": 7, "body": "a", "category": "ignored"}, {"id": "7", "body": "again"},
        {"id": "8", "subject": None, "body": "b"})))
    assert read_unlabeled_file(ok) == [{"id": "7", "subject": "", "body": "a"},
                                       {"id": "8", "subject": "", "body": "b"}]
