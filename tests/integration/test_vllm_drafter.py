"""The served drafter: a real vLLM CPU server (scripts/serve-student) with LoRA hot reload."""

from __future__ import annotations

import pytest

from distill.drafter_train import ReplyPair, train_drafter
from distill.serving import ServingError, VllmDrafter, list_models, load_adapter
from storage.types import Email

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

EMAILS = [
    Email(id="a", subject="Where is my order?", new_text="Order 1182 has not arrived yet."),
    Email(id="b", subject="Meeting", new_text="Can we move our call to Thursday at 3pm?"),
]
REPLY = "Hello, order 1182 ships today. Tracking follows by email. Best, Support"


def test_serves_the_base_model_and_drafts_with_logprobs(vllm_server):
    assert vllm_server.model in list_models(vllm_server.base_url)
    d = VllmDrafter(vllm_server.base_url, vllm_server.model, max_new_tokens=24)
    drafts = d.draft(EMAILS)
    assert len(drafts) == 2
    for x in drafts:
        assert x.text.strip()
        assert 0.0 < x.confidence <= 1.0            # from the server's token logprobs
        assert x.model_version == vllm_server.model and x.latency_ms > 0


def test_an_adapter_loaded_at_run_time_is_served_and_changes_the_drafts(vllm_server, tmp_path):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)       # the server is busy on the same two cores
    try:
        adapter = tmp_path / "drafter-it"
        pairs = [ReplyPair(EMAILS[0], REPLY)] * 2
        m = train_drafter(pairs, adapter, max_steps=8, lr=3e-3, rank=4, lora_alpha=8,
                          batch_size=2, max_len=256, progress=False)
    finally:
        torch.set_num_threads(n)
    assert m["train_loss_after"] < m["train_loss_before"]

    url = vllm_server.base_url
    base = VllmDrafter(url, vllm_server.model, max_new_tokens=24).draft(EMAILS[:1])[0]
    with pytest.raises(ServingError, match="adapter"):
        VllmDrafter(url, vllm_server.model, adapter="drafter-it").draft(EMAILS[:1])

    assert load_adapter(url, "drafter-it", adapter) is True
    assert "drafter-it" in list_models(url)
    assert load_adapter(url, "drafter-it", adapter) is False          # idempotent
    tuned = VllmDrafter(url, vllm_server.model, adapter="drafter-it", max_new_tokens=24)
    [draft] = tuned.draft(EMAILS[:1])
    assert draft.model_version == "drafter-it" and 0.0 < draft.confidence <= 1.0
    assert draft.text != base.text
    assert "1182" in draft.text                   # it learned the reply it was trained on
    assert load_adapter(url, "drafter-it", adapter, replace=True) is True
    assert tuned.draft(EMAILS[:1])[0].text == draft.text             # greedy: reproducible
