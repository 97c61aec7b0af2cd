"""Audit disagreements: listed, settled by a person as gold labels, counted in the summary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.review.disputes import DisputeNotFound, settle
from agent.review.errors import InvalidCorrection
from storage.audits import audit_summary, list_disputes
from storage.datasets import training_examples
from tests.unit.review_seed import seed_audited

CATS = ["billing", "technical", "account", "sales", "feedback", "other"]


def test_disputes_are_listed_settled_and_counted(db):   # SQLite and PostgreSQL
    agree, a, b, c = seed_audited(db, [("billing", "billing"), ("billing", "account"),
                                              ("technical", "billing"), ("sales", "other")])
    listed = list_disputes(db)
    assert [d.message_db_id for d in listed] == [c, b, a]   # newest first; agreement absent
    assert (listed[2].student_category, listed[2].teacher_category) == ("billing", "account")
    assert all(d.settled is None and d.student_version == "v1" for d in listed)
    assert list_disputes(db, student_version="v0") == []

    one = settle(db, a, category="billing", reviewer="ann", categories=CATS)
    assert one.proved_right == "student_right" and one.changed
    two = settle(db, b, category="billing", reviewer="bob", categories=CATS)
    assert two.proved_right == "teacher_right"
    assert [d.message_db_id for d in list_disputes(db)] == [c]   # left to settle
    done = {d.message_db_id: d for d in list_disputes(db, include_settled=True)}
    assert (done[a].settled, done[a].settled_by, done[a].proved_right) == (
        "billing", "ann", "student_right")

    s = audit_summary(db, epsilon=0.02, student_version="v1")
    assert (s["n"], s["disagreements"]) == (4, 3)   # settling does not hide a disagreement
    assert s["settled"] == {"n": 2, "student_right": 1, "teacher_right": 1, "neither": 0}

    # the settled category is a gold label: it replaces the teacher's in training
    ex = {e.id: e for e in training_examples(db)}
    assert ex[str(a)].category == "billing" and ex[str(a)].gold
    assert ex[str(b)].category == "billing" and ex[str(b)].gold
    assert ex[str(c)].category == "other" and not ex[str(c)].gold   # still the teacher's

    # settling again with the same answer changes nothing; another answer replaces it
    assert not settle(db, a, category="billing", reviewer="ann",
                      categories=CATS).changed
    three = settle(db, a, category="sales", reviewer="cy", categories=CATS)
    assert three.changed and three.proved_right == "neither"
    assert audit_summary(db, epsilon=0.02)["settled"]["neither"] == 1
    assert {e.id: e for e in training_examples(db)}[str(a)].category == "sales"


def test_settle_refuses_what_it_cannot_record(sqlite_db):
    agree, a = seed_audited(sqlite_db, [("billing", "billing"), ("billing", "legacy_cat")])
    with pytest.raises(DisputeNotFound, match="review disputes"):
        settle(sqlite_db, agree, category="billing", reviewer="ann", categories=CATS)
    with pytest.raises(DisputeNotFound):
        settle(sqlite_db, 99999, category="billing", reviewer="ann", categories=CATS)
    with pytest.raises(InvalidCorrection, match="choose one of"):
        settle(sqlite_db, a, category="nonsense", reviewer="ann", categories=CATS)
    with pytest.raises(InvalidCorrection, match="priority"):
        settle(sqlite_db, a, category="billing", priority="asap", reviewer="ann",
               categories=CATS, priorities=["low", "normal", "high"])
    assert list_disputes(sqlite_db, include_settled=True)[0].settled is None   # nothing kept
    # the teacher's category is accepted although the taxonomy no longer has it
    assert settle(sqlite_db, a, category="legacy_cat", reviewer="ann",
                  categories=CATS).proved_right == "teacher_right"


def test_disputes_and_settle_through_the_cli(sqlite_db):
    runner = CliRunner()
    a, b = seed_audited(sqlite_db, [("billing", "account"), ("technical", "billing")])
    r = runner.invoke(app, ["review", "disputes"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert [int(x.split()[0]) for x in lines[:-1]] == [b, a]
    assert "student billing (v1)  teacher account" in lines[1]
    assert lines[-1].startswith("2 dispute(s) to settle")

    r = runner.invoke(app, ["review", "settle", str(a), "--category", "account",
                            "--reviewer", "ann"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"email {a} settled as account: the teacher was right"
    r = runner.invoke(app, ["review", "settle", str(b), "--category", "nope"])
    assert r.exit_code == 1 and "unknown category 'nope'" in r.output
    r = runner.invoke(app, ["review", "disputes", "--all", "--json"])
    items = {d["message_db_id"]: d for d in json.loads(r.stdout)["items"]}
    assert items[a]["settled"] == "account" and items[a]["proved_right"] == "teacher_right"
    assert items[b]["settled"] is None

    r = runner.invoke(app, ["status"])
    assert r.exit_code == 0, r.output
    assert ("disputes     1 settled: the student right in 0, the teacher in 1, neither in 0; "
            "1 to settle") in r.stdout


def test_settling_against_the_decision_corrects_the_keyword_best_effort(sqlite_db):
    a, b, c = seed_audited(sqlite_db, [("billing", "account"), ("technical", "billing"),
                                       ("sales", "other")])
    calls = []

    def relabel_for(account):
        def relabel(email, category, priority):
            calls.append((email.db_id, account, category, priority))
            if category == "feedback":
                raise ConnectionError("message was moved")
        return relabel

    # the student was right: its decision stands as it is, nothing to relabel
    settle(sqlite_db, a, category="billing", reviewer="ann", categories=CATS,
           relabel_for=relabel_for)
    settle(sqlite_db, b, category="billing", reviewer="ann", categories=CATS,
           relabel_for=relabel_for)
    out = settle(sqlite_db, c, category="feedback", reviewer="ann", categories=CATS,
                 relabel_for=relabel_for)
    assert calls == [(b, "test", "billing", "normal"), (c, "test", "feedback", "normal")]
    assert out.changed and out.proved_right == "neither"   # a failed relabel never fails it
    assert list_disputes(sqlite_db) == []
