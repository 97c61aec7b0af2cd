"""The OpenAI-compatible teacher against a real vLLM CPU server (fixture ``vllm_server``)."""

from __future__ import annotations

import pytest

from agent.teacher import build_teacher, taxonomy_of
from agent.teacher.base import Taxonomy
from agent.teacher.openai_compat import OpenAICompatTeacher
from config import load_settings
from storage.calls import record_teacher_result
from storage.models import ModelCall
from storage.types import Email

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

EMAILS = [
    Email(id="1", subject="Charged twice", text="I was charged twice on my invoice. "
          "Please refund the second payment."),
    Email(id="2", subject="Crash", text="The app crashes with an error every time I export."),
]


@pytest.fixture
def vllm(request):
    try:
        return request.getfixturevalue("vllm_server")
    except pytest.FixtureLookupError:
        pytest.skip("no vllm_server fixture in this build (tests/fixtures/vllm.py)")


def test_soft_labels_from_logprobs_and_drafts_from_generation(vllm, sqlite_db):
    settings = load_settings(None, teacher={"backend": "openai", "base_url": vllm.base_url,
                                            "model": vllm.model, "timeout_s": 120,
                                            "max_output_tokens": 64})
    teacher = build_teacher(settings, sqlite_db)
    assert isinstance(teacher, OpenAICompatTeacher)
    tax = taxonomy_of(settings)
    results = teacher.label(EMAILS)
    for r in results:
        assert r.ok, r.error
        assert set(r.category_probs) == set(tax.names)
        assert sum(r.category_probs.values()) == pytest.approx(1.0)
        assert r.category == max(r.category_probs, key=r.category_probs.get)
        assert r.priority in tax.priorities and isinstance(r.needs_reply, bool)
        assert (r.draft is not None) == r.needs_reply
        assert r.input_tokens > 0 and r.output_tokens > 0 and r.cost_usd == 0.0
    with sqlite_db.session() as s:
        ids = [record_teacher_result(s, r, message_id=None) for r in results]
        rows = [s.get(ModelCall, i) for i in ids]
    assert all(row.backend == "openai" and row.probs for row in rows)


def test_names_sharing_a_first_token_are_told_apart(vllm):
    # card_* share their first tokens: the walk must continue past "card" to split them.
    tax = Taxonomy({"card_arrival": "My card has not arrived yet.",
                    "card_linking": "Link an existing card to the app.",
                    "cash_withdrawal": "ATM cash withdrawals."}, ["normal", "high"])
    teacher = OpenAICompatTeacher(base_url=vllm.base_url, model=vllm.model, api_key=None,
                                  taxonomy=tax, timeout_s=120, max_output_tokens=32)
    [r] = teacher.label([Email(id="c", subject="Card", text="My new card has still not "
                                                          "arrived after two weeks.")])
    assert r.ok, r.error
    assert sum(r.category_probs.values()) == pytest.approx(1.0)
    # both card_* names got their own share, not an even split of one "card" token
    a, b = r.category_probs["card_arrival"], r.category_probs["card_linking"]
    assert a > 0 and b > 0 and abs(a - b) > 1e-6
