"""Router rules, audit sampling and the audit interval."""

from __future__ import annotations

import random

import pytest

from agent.audit import audit_output, check, promised_epsilon
from agent.router import Router, thresholds_of
from storage.audits import clopper_pearson
from storage.calls import record_call
from storage.types import Draft, Email, Triage
from storage.work import record_calls

T = {"category": 0.9, "priority": 0.8, "needs_reply": 0.85}


def _triage(cat=0.95, pri=0.9, nr=0.9, needs_reply=False, category="technical"):
    return Triage(category, "normal", needs_reply,
                  confidence={"category": cat, "priority": pri, "needs_reply": nr})


def _email(i="1", sender="Ann <ann@example.org>"):
    return Email(id=i, from_addr=sender, message_id=f"<{i}@x>")


def test_cold_start_escalates_everything():
    r = Router()
    route = r.route(_email(), None, None, None)
    assert route.escalate and route.reasons == ("cold_start",)


def test_every_head_must_clear_its_threshold():
    r = Router()
    assert not r.route(_email(), _triage(), None, T).escalate
    for head, kw in (("category", {"cat": 0.89}), ("priority", {"pri": 0.5}),
                     ("needs_reply", {"nr": 0.2})):
        route = r.route(_email(), _triage(**kw), None, T)
        assert route.escalate and route.reasons == (f"low_confidence:{head}",)
    # A threshold exactly met clears; no stored thresholds never clears.
    assert not r.route(_email(), _triage(cat=0.9), None, T).escalate
    assert r.route(_email(), _triage(), None, {}).reasons == ("no_thresholds",)


def test_draft_confidence_and_missing_draft():
    r = Router(draft_min_confidence=0.5)
    t = _triage(needs_reply=True)
    assert r.needs_draft(t)
    assert r.route(_email(), t, None, T).reasons == ("no_draft",)
    assert r.route(_email(), t, Draft("Hi", confidence=0.4), T).reasons == (
        "low_confidence:draft",)
    assert not r.route(_email(), t, Draft("Hi", confidence=0.6), T).escalate
    # With drafting off the student decides reply-needing mail without a draft.
    off = Router(draft_min_confidence=0.5, drafting=False)
    assert not off.needs_draft(t) and not off.route(_email(), t, None, T).escalate


def test_draft_with_one_unsure_token_escalates_when_the_floor_is_set():
    t = _triage(needs_reply=True)
    fluent = Draft("Your card ships Monday.", confidence=0.9, mean_logprob=-0.1,
                   min_logprob=-0.5)
    guessed = Draft("Your refund of 89.90 EUR ...", confidence=0.9, mean_logprob=-0.1,
                    min_logprob=-6.0)
    floor = Router(draft_min_token_logprob=-4.6)
    assert not floor.route(_email(), t, fluent, T).escalate
    assert floor.route(_email(), t, guessed, T).reasons == ("unsure_token:draft",)
    # A backend that reports no token log-probabilities cannot clear a floor.
    assert floor.route(_email(), t, Draft("Hi", confidence=0.9), T).reasons == (
        "unsure_token:draft",)
    # Unset (the default), the minimum is not checked.
    assert not Router().route(_email(), t, guessed, T).escalate
    # The daemon's router takes the floor from the config.
    from agent.build import build_router
    from config.settings import Settings

    built = build_router(Settings.model_validate({"router": {"draft_min_token_logprob": -4.6}}))
    assert built.route(_email(), t, guessed, T).reasons == ("unsure_token:draft",)


def test_rules_force_escalation():
    r = Router(always_escalate={"billing"}, escalate_senders=["*@bank.example", "ceo@*"])
    assert r.route(_email(), _triage(category="billing"), None, T).reasons == (
        "always_escalate:billing",)
    assert r.route(_email(sender="Bank <alerts@BANK.example>"), _triage(), None, T).reasons \
        == ("sender_rule",)
    assert r.route(_email(sender="ceo@corp.example"), _triage(), None, T).escalate
    assert not r.route(_email(sender="ann@corp.example"), _triage(), None, T).escalate


def test_audit_sample_is_deterministic_and_near_the_fraction():
    r = Router(audit_fraction=0.03)
    routes = [r.route(_email(str(i)), _triage(), None, T) for i in range(20000)]
    share = sum(x.audit for x in routes) / len(routes)
    assert 0.025 < share < 0.035
    again = [r.route(_email(str(i)), _triage(), None, T).audit for i in range(200)]
    assert again == [x.audit for x in routes[:200]]
    # Escalated mail is never "audited": the teacher decides it anyway.
    assert not any(r.route(_email(str(i)), _triage(cat=0.1), None, T).audit for i in range(500))
    assert not any(Router().route(_email(str(i)), _triage(), None, T).audit for i in range(500))


def test_thresholds_of_accepts_stored_shapes():
    assert thresholds_of({"category": 0.9, "epsilon": 0.02}) == {"category": 0.9}
    assert thresholds_of({"heads": {"category": {"threshold": 0.8}, "priority": 0.7}}) == {
        "category": 0.8, "priority": 0.7}
    assert thresholds_of(None) == {}
    assert promised_epsilon({"epsilon": 0.05}, 0.02) == 0.05
    assert promised_epsilon({}, 0.02) == 0.02


def test_clopper_pearson_covers_the_true_rate():
    rng = random.Random(0)
    p, n, level = 0.04, 300, 0.95
    misses = 0
    for _ in range(400):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = clopper_pearson(k, n, level)
        assert 0 <= lo <= k / n <= hi <= 1
        misses += not (lo <= p <= hi)
    assert misses / 400 <= 0.05 + 0.02            # exact interval: coverage >= 95%
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(0.0362, abs=1e-3)


def test_live_disagreement_and_breach(sqlite_db, caplog):
    def audits(n, disagree, version="v1"):
        def writer(out):
            return lambda s, mid: record_call(s, message_id=mid, role="teacher",
                                              purpose="audit", backend="t", model_id="claude",
                                              output=out)
        return [writer(audit_output(version, "technical",
                                    "billing" if i < disagree else "technical"))
                for i in range(n)]

    record_calls(sqlite_db, audits(200, 2) + audits(50, 50, version="v0"))
    ok = check(sqlite_db, student_version="v1", epsilon=0.02)
    assert ok["n"] == 200 and ok["disagreements"] == 2 and not ok["breach"]
    assert ok["interval"][0] < 0.01 < ok["interval"][1]
    record_calls(sqlite_db, audits(100, 20))
    bad = check(sqlite_db, student_version="v1", epsilon=0.02)
    assert bad["n"] == 300 and bad["breach"] and bad["interval"][0] > 0.02


def test_per_head_shape_of_the_classifier():
    stored = {"category": {"trained": True, "threshold": 0.9, "epsilon": 0.03},
              "priority": {"trained": False, "threshold": None},
              "needs_reply": {"trained": True, "threshold": 0.7}}
    assert thresholds_of(stored) == {"category": 0.9, "needs_reply": 0.7}
    assert promised_epsilon(stored, 0.02) == 0.03
    t = Triage("technical", "normal", False, confidence={"category": 0.95, "needs_reply": 0.8})
    assert not Router().route(_email(), t, None, thresholds_of(stored)).escalate
