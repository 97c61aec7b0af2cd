"""``understudy run``: watchers, the triage worker and the scheduler in one process.

Threads:

* one **watcher** per (account, folder): it takes the folder's lease (one watcher per
  folder across every daemon of the database), then runs the mail source's IDLE loop,
  which stores new mail and calls ``on_new`` (waking the worker). Losing the lease (a
  stall longer than its TTL) stops the watcher; it tries to take the lease again later.
* the **keeper**: heartbeats this worker, renews held leases, and hands back claims of
  workers that stopped heartbeating (a ``kill -9`` of another daemon).
* the **scheduler** (APScheduler, leader only) and the optional **metrics** server.
* the main thread runs the **worker loop**: triage passes, sleeping on a wake event when
  the queue is empty, polling the registry for a promoted student between passes.

SIGTERM or SIGINT: the current pass finishes (its decisions commit, its actions run),
watchers stop, claims and leases are released, and the process exits 0.

SQLite allows one daemon per database file (an exclusive file lock next to it; use
PostgreSQL for many workers). Whoever holds it may hand back every claim it finds.
"""

from __future__ import annotations

import fcntl
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from agent.logs import get_logger
from storage import leases, work
from storage.db import Database

log = get_logger(component="daemon")

WatchFn = Callable[[str, threading.Event, Callable[..., None]], Any]


class DaemonError(Exception):
    """The daemon cannot start; the message says how to fix it."""


@dataclass
class Watched:
    """One folder to watch: ``watch(folder, stop, on_new)`` runs until ``stop`` is set."""

    account: str
    folder: str
    watch: WatchFn
    sync: Callable[[], Any] | None = None


class Daemon:
    def __init__(self, db: Database, *, worker_id: str, worker: Any, folders: Sequence[Watched],
                 scheduler: Any = None, metrics: Any = None, on_pass: Callable | None = None,
                 lease_ttl_s: float = 30.0, heartbeat_s: float = 3.0,
                 idle_wait_s: float = 1.0, audit_every_s: float = 60.0,
                 audit_check: Callable[[], Any] | None = None,
                 warmup: Callable[[], Any] | None = None,
                 sqlite_lock: Path | None = None,
                 on_shutdown: Callable[[], Any] | None = None):
        self.db = db
        self.on_shutdown = on_shutdown   # e.g. stop the vLLM servers the student runs
        self.worker_id = worker_id
        self.worker = worker
        self.folders = list(folders)
        self.scheduler = scheduler
        self.metrics = metrics
        self.on_pass = on_pass
        self.lease_ttl_s = lease_ttl_s
        self.heartbeat_s = heartbeat_s
        self.idle_wait_s = idle_wait_s
        self.audit_every_s = audit_every_s
        self.audit_check = audit_check
        self.sqlite_lock = sqlite_lock
        self.warmup = warmup
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._leases: dict[int, threading.Event] = {}     # mailbox id -> its watcher's stop
        self._leases_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._lock_file = None
        self.log = log.bind(worker=worker_id)

    # ---- lifecycle ------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self._take_sqlite_lock()
        work.heartbeat(self.db, self.worker_id)
        alive = {self.worker_id} if self.sqlite_lock is not None else None
        recovered = work.recover_stale_claims(self.db, self.lease_ttl_s, alive=alive)
        self.log.info("daemon started", folders=[f"{w.account}/{w.folder}" for w in self.folders],
                      recovered_claims=recovered)
        if not self.folders:
            self.log.warning("no mailbox to watch: add an [[accounts]] section to the config "
                             "(`understudy config validate FILE` checks it); until then the "
                             "daemon only triages and retrains on what the database holds")
        self._spawn("keeper", self._keeper)
        if self.warmup is not None:
            # Load the student (and run it once) before watching: the first emails then
            # meet a warm model instead of a many-second load.
            t0 = time.monotonic()
            self.warmup()
            self.log.info("student warmed up", seconds=round(time.monotonic() - t0, 2))
        for w in self.folders:
            self._spawn(f"watch:{w.account}/{w.folder}", self._watch_loop, w)
        if self.scheduler is not None:
            self.scheduler.start()
        try:
            self._work_loop()
        finally:
            self._shutdown()
        return 0

    def request_stop(self) -> None:
        self.stop.set()
        self.wake.set()

    def _on_signal(self, signum, _frame) -> None:
        self.log.info("stopping", signal=signal.Signals(signum).name)
        self.request_stop()

    def _spawn(self, name: str, target, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _shutdown(self) -> None:
        with self._leases_lock:
            for ev in self._leases.values():
                ev.set()
        if self.scheduler is not None:
            try:
                self.scheduler.shutdown()
            except Exception as e:  # noqa: BLE001
                self.log.warning("scheduler shutdown failed", error=str(e))
        deadline = time.monotonic() + 15
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self.worker.release_all()
        if self.on_shutdown is not None:
            try:
                self.on_shutdown()
            except Exception as e:  # noqa: BLE001 - the rest of the shutdown must still run
                self.log.warning("student shutdown failed", error=str(e))
        with self._leases_lock:
            for mb in list(self._leases):
                leases.release_lease(self.db, mb, self.worker_id)
            self._leases.clear()
        work.drop_heartbeat(self.db, self.worker_id)
        if self._lock_file is not None:
            self._lock_file.close()
        self.log.info("daemon stopped cleanly")

    def _take_sqlite_lock(self) -> None:
        if self.sqlite_lock is None:
            return
        self.sqlite_lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.sqlite_lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise DaemonError(
                f"another understudy daemon uses this SQLite database (lock {self.sqlite_lock});"
                " SQLite allows one worker: stop it, or use PostgreSQL (database_url) to run "
                "several") from None
        self._lock_file = f      # the kernel drops the lock if we die, even by kill -9

    # ---- worker loop ------------------------------------------------------------------
    def _work_loop(self) -> None:
        last_audit = 0.0
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                result = self.worker.run_once()
            except Exception as e:  # noqa: BLE001 - a bad pass must not kill the daemon
                self.log.exception("triage pass failed", error=f"{type(e).__name__}: {e}")
                self.stop.wait(2.0)
                continue
            if self.on_pass is not None:
                self.on_pass(result, time.monotonic() - t0)
            if result.claimed:
                self.log.info("triage pass", claimed=result.claimed, routes=result.routes,
                              waiting=result.waiting, acted=result.acted,
                              action_errors=result.action_errors,
                              seconds=round(time.monotonic() - t0, 3))
            if self.audit_check is not None and time.monotonic() - last_audit > self.audit_every_s:
                last_audit = time.monotonic()
                try:
                    self.audit_check()
                except Exception as e:  # noqa: BLE001
                    self.log.warning("audit check failed", error=str(e))
            if result.claimed == 0:
                # Nothing due: sleep until a watcher stores mail (or a waiting escalation
                # may have become due: re-check every idle_wait_s).
                self.wake.wait(self.idle_wait_s)
                self.wake.clear()

    # ---- keeper: heartbeat, lease renewal, dead-worker recovery -------------------------
    def _keeper(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                work.heartbeat(self.db, self.worker_id)
                with self._leases_lock:
                    held = dict(self._leases)
                for mb, ev in held.items():
                    if not leases.acquire_lease(self.db, mb, self.worker_id, self.lease_ttl_s):
                        self.log.warning("folder lease lost; watcher stops", mailbox=mb)
                        ev.set()
                if self.sqlite_lock is None:
                    n = work.recover_stale_claims(self.db, self.lease_ttl_s)
                    if n:
                        self.log.warning("recovered claims of a dead worker", count=n)
                        self.wake.set()
            except Exception as e:  # noqa: BLE001 - database blip: try again next beat
                self.log.warning("keeper beat failed", error=f"{type(e).__name__}: {e}")

    # ---- watchers -----------------------------------------------------------------------
    def _watch_loop(self, w: Watched) -> None:
        lg = self.log.bind(account=w.account, folder=w.folder)
        mb = leases.mailbox_id(self.db, w.account, w.folder)
        backoff = 1.0
        while not self.stop.is_set():
            if not leases.acquire_lease(self.db, mb, self.worker_id, self.lease_ttl_s):
                self.stop.wait(min(5.0, self.lease_ttl_s / 3))
                continue
            mine = threading.Event()
            with self._leases_lock:
                self._leases[mb] = mine
            if self.stop.is_set():
                mine.set()
            lg.info("watching folder (lease held)")
            try:
                w.watch(w.folder, mine, self._on_new)
                backoff = 1.0
                if not self.stop.is_set():
                    self.stop.wait(1.0)      # lease lost or the loop returned: pause, retry
            except Exception as e:  # noqa: BLE001 - reconnect with backoff
                lg.warning("watcher failed; retrying", error=f"{type(e).__name__}: {e}",
                           retry_in_s=backoff)
                self.stop.wait(backoff)
                backoff = min(60.0, backoff * 2)
            finally:
                with self._leases_lock:
                    self._leases.pop(mb, None)
                leases.release_lease(self.db, mb, self.worker_id)

    def _on_new(self, *_args: Any, **_kw: Any) -> None:
        self.wake.set()
