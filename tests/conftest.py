"""Shared fixtures. Every test gets its own state dir and SQLite database (autouse).

Fixtures for real servers live in tests/fixtures/ and are loaded as plugins:
``dovecot`` (real IMAP server), ``messages_api`` (the local Messages-API server
that stands in for Claude), ``pg_url`` (a throwaway PostgreSQL database).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

pytest_plugins = [
    "tests.fixtures.databases",
    "tests.fixtures.dovecot",
    "tests.fixtures.messages_api",
    "tests.fixtures.vllm",
]


def pytest_collection_modifyitems(config, items):
    # Tests with no tier marker are unit tests.
    for item in items:
        if not any(item.get_closest_marker(m) for m in ("integration", "e2e")):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    """A fresh state dir and SQLite database per test; no config file leaks in."""
    sd = tmp_path / "state"
    sd.mkdir()
    monkeypatch.setenv("UNDERSTUDY_STATE_DIR", str(sd))
    for var in list(os.environ):
        if var.startswith("UNDERSTUDY_") and var != "UNDERSTUDY_STATE_DIR":
            monkeypatch.delenv(var)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return sd


@pytest.fixture(scope="module")
def one_torch_thread():
    """One OpenMP thread for a module's model tests: decoding a 135M model is thousands of
    tiny ops, and on a busy 2-core machine a team of two spends most of its time waiting
    for a descheduled thread (measured 6x slower under shared CI load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA
