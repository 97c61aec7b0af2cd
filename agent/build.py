"""Builders: Settings in, components with flat constructor arguments out.

Nothing below :func:`build_daemon` sees the Settings object; this module is the one
place that reads it for the daemon's parts.

>>> from config import load_settings
>>> s = load_settings(None)
>>> build_router(s).audit_fraction
0.03
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.logs import get_logger
from agent.router import Router
from agent.worker import Student, TriageWorker
from config import Settings
from storage import work
from storage.db import Database

log = get_logger(component="build")

# student.drafter values that turn student drafting off: reply-needing mail is then
# decided by the student without a draft (the teacher still drafts what it decides).
NO_DRAFTER = {"", "none", "off"}


def worker_identity(settings: Settings) -> str:
    """daemon.worker_id, else host:pid (unique per process, visible in claims and leases)."""
    return settings.daemon.worker_id or f"{socket.gethostname()}:{os.getpid()}"


def drafting_enabled(settings: Settings) -> bool:
    return settings.student.drafter.strip().lower() not in NO_DRAFTER


def build_router(settings: Settings) -> Router:
    r = settings.router
    return Router(always_escalate=settings.taxonomy.always_escalate,
                  escalate_senders=r.escalate_senders,
                  draft_min_confidence=r.draft_min_confidence,
                  draft_min_token_logprob=r.draft_min_token_logprob,
                  audit_fraction=r.audit_fraction, drafting=drafting_enabled(settings))


class ActiveStudent:
    """The active student, reloaded when a new version is promoted (no restart).

    Calling it returns the current :class:`agent.worker.Student`; at most every
    ``poll_s`` seconds it asks the database which version is active (one indexed query)
    and, when that changed, loads the new one and swaps it in. A version that fails to
    load is logged and the old one kept.
    """

    def __init__(self, db: Database, *, load_classifier: Callable[[str], Any],
                 load_drafter: Callable[[str | None, str | None], Any] | None,
                 poll_s: float = 2.0, closers: list[Callable[[], Any]] | None = None):
        self.db = db
        self.closers = closers if closers is not None else []
        self.load_classifier = load_classifier
        self.load_drafter = load_drafter
        self.poll_s = poll_s
        self.current = Student()
        self.versions: tuple[str | None, str | None] = (None, None)
        self._checked = 0.0
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self) -> Student:
        if time.monotonic() - self._checked >= self.poll_s:
            self.refresh()
        return self.current

    @property
    def version(self) -> str | None:
        return self.current.version

    def close(self) -> None:
        """Release what the loaders started (the blue/green vLLM servers); idempotent."""
        for close in self.closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001 - shutting down: log and go on
                log.warning("student close failed", error=f"{type(e).__name__}: {e}")

    def refresh(self) -> bool:
        """Check the registry now; True when a new version was swapped in."""
        with self._lock:
            self._checked = time.monotonic()
            clf = work.active_model(self.db, "classifier")
            drf = work.active_model(self.db, "drafter")
            want = (clf[0] if clf else None, drf[0] if drf else None)
            if want == self.versions:
                return False
            student = Student(self.current.classifier, self.current.drafter)
            got = list(self.versions)
            if want[0] != self.versions[0] and want[0] not in self._failed:
                try:
                    student.classifier = self.load_classifier(clf[1]) if clf else None
                    got[0] = want[0]
                except Exception as e:  # noqa: BLE001 - keep serving with the old student
                    self._failed.add(want[0])
                    log.error("could not load the promoted classifier; keeping the old one",
                              version=want[0], error=f"{type(e).__name__}: {e}")
            drafter_key = f"drafter:{want[1]}"
            if self.load_drafter is not None and drafter_key not in self._failed and (
                    want[1] != self.versions[1] or student.drafter is None):
                try:
                    student.drafter = self.load_drafter(*(drf or (None, None)))
                    got[1] = want[1]
                except Exception as e:  # noqa: BLE001 - no drafter: reply-needing mail escalates
                    self._failed.add(drafter_key)
                    log.error("could not load the drafter; mail that needs a reply escalates",
                              version=want[1], error=f"{type(e).__name__}: {e}")
            if tuple(got) == self.versions and student.drafter is self.current.drafter:
                return False
            log.info("student loaded", classifier=got[0], drafter=got[1],
                     previous=self.versions[0])
            self.current, self.versions = student, (got[0], got[1])
            return True


def build_student(settings: Settings, db: Database, poll_s: float = 2.0) -> ActiveStudent:
    st = settings.student

    def load_classifier(path: str):
        from distill.classifier import Classifier

        # One core less than the machine has: the watchers, IMAP actions and SQL need
        # one, and an oversubscribed torch pool (threads spinning against each other)
        # measured 3-10x slower per batch than a single thread on a busy 2-core box.
        return Classifier.load(path, device=st.device, batch_size=st.batch_size,
                               num_threads=max(1, (os.cpu_count() or 2) - 1))

    load_drafter = None
    closers: list[Callable[[], Any]] = []
    if drafting_enabled(settings):
        if st.drafter_backend == "vllm":
            load_drafter = vllm_drafter_loader(settings, closers)
        else:
            def load_drafter(version: str | None, path: str | None):
                from distill.drafter import Drafter

                return Drafter.load(st.drafter, Path(path) if path else None, device=st.device,
                                    max_new_tokens=st.draft_max_new_tokens)
    return ActiveStudent(db, load_classifier=load_classifier, load_drafter=load_drafter,
                         poll_s=poll_s, closers=closers)


def vllm_drafter_loader(settings: Settings, closers: list[Callable[[], Any]] | None = None
                        ) -> Callable[[str | None, str | None], Any]:
    """load_drafter for student.drafter_backend = "vllm": moves the vLLM server(s) to the
    promoted version as student.vllm_switch says, and returns a drafter that follows it.

    * "adapter": the running server at student.vllm_url (scripts/serve-student) loads the
      adapter under its version name; the previous adapter is unloaded once its in-flight
      requests finished (:class:`distill.serving.AdapterSwitch`).
    * "bluegreen": the daemon runs the servers itself, on merged weights, alternating
      between the two student.vllm_ports (:class:`distill.bluegreen.BlueGreen`); the
      first load waits for its server, later ones switch in the background.

    The same drafter object is returned for every version: each request goes to what the
    switch serves at that moment, so a worker holding the previous student moves too.
    ``closers`` receives the switch's close (stops the servers the daemon started).
    """
    from urllib.parse import urlparse

    from distill.serving import AdapterSwitch, VllmDrafter

    st = settings.student
    state: dict[str, Any] = {}
    lock = threading.Lock()

    def switch():
        with lock:
            if "switch" not in state:
                if st.vllm_switch == "bluegreen":
                    import torch

                    from distill.bluegreen import BlueGreen
                    from distill.drafter import cpu_has_fast_bf16

                    # The in-process drafter's "auto" dtype: bf16 only where it is fast.
                    fast = torch.cuda.is_available() or cpu_has_fast_bf16()
                    sw = BlueGreen(base=st.drafter, ports=st.vllm_ports,
                                   host=urlparse(st.vllm_url).hostname or "127.0.0.1",
                                   run_dir=Path(settings.state_dir) / "vllm",
                                   dtype="bfloat16" if fast else "float32",
                                   start_timeout_s=st.vllm_start_timeout_s)
                    if closers is not None:
                        closers.append(sw.close)
                else:
                    sw = AdapterSwitch(st.vllm_url, _base_name(st.drafter))
                state["switch"] = sw
                state["drafter"] = VllmDrafter(switch=sw, max_new_tokens=st.draft_max_new_tokens)
            return state["switch"], state["drafter"]

    def load_drafter(version: str | None, path: str | None):
        sw, drafter = switch()
        sw.promote(version, path)
        return drafter

    load_drafter.switch = lambda: switch()[0]     # type: ignore[attr-defined]
    return load_drafter


def _base_name(drafter: str) -> str:
    return Path(drafter).name if "/" in drafter and Path(drafter).exists() else drafter


def build_teacher_or_none(settings: Settings, db: Database):
    """The teacher, or None when it cannot be built (escalations then wait, with a log)."""
    try:
        from agent.teacher import build_teacher

        return build_teacher(settings, db=db)
    except Exception as e:  # noqa: BLE001 - missing key etc.: keep triaging what the student can
        log.error("teacher unavailable: escalations will wait until it is configured",
                  error=f"{type(e).__name__}: {e}")
        return None


def build_actions_factory(settings: Settings) -> Callable[[str], Any]:
    """account name -> MailboxActions (one per account, built on first use)."""
    cache: dict[str, Any] = {}
    known = {a.name for a in settings.accounts}

    def actions_for(account: str):
        if account not in known:
            return None
        if account not in cache:
            from agent.mail import build_mailbox_actions

            cache[account] = build_mailbox_actions(settings, account)
        return cache[account]
    return actions_for


def build_worker(settings: Settings, db: Database, *, worker_id: str | None = None,
                 student: Callable[[], Student] | None = None,
                 teacher: Any = "build") -> TriageWorker:
    return TriageWorker(
        db, worker_id=worker_id or worker_identity(settings), router=build_router(settings),
        student=student or build_student(settings, db),
        teacher=build_teacher_or_none(settings, db) if teacher == "build" else teacher,
        actions_for=build_actions_factory(settings),
        move_rules={a.name: dict(a.move_rules) for a in settings.accounts},
        batch_size=settings.daemon.triage_batch)


def build_housekeeping(settings: Settings, db: Database) -> Callable[[], Any] | None:
    """The nightly clean-up: raw email bytes past scheduler.keep_raw_days (None: keep)."""
    days = settings.scheduler.keep_raw_days
    if not days:
        return None

    def housekeeping() -> dict:
        from storage.raw_retention import prune_raw

        return {"raw": prune_raw(db, older_than_days=days).as_dict()}
    return housekeeping


def build_retrain(settings: Settings, db: Database) -> Callable[[str], Any]:
    """trigger -> distill.pipeline.retrain(...) with flat arguments from settings."""
    def retrain(trigger: str):
        from distill.pipeline import retrain as run, retrain_kwargs

        return run(db, **retrain_kwargs(settings), data=None, trigger=trigger,
                   after_classifier=build_drafter_step(settings, db))
    return retrain


def build_drafter_step(settings: Settings, db: Database,
                       records: Path | None = None) -> Callable[[Any], dict] | None:
    """The drafter half of a retrain (LoRA in a child process), or None when drafting is
    off or student.drafter_retrain is false."""
    st = settings.student
    if not drafting_enabled(settings) or not st.drafter_retrain:
        return None
    from distill.drafter_step import drafter_step

    return drafter_step(db, state_dir=settings.state_dir, db_url=db.url, base=st.drafter,
                        min_pairs=st.drafter_min_pairs, max_steps=st.drafter_max_steps,
                        timeout_s=st.drafter_timeout_s, patience=st.drafter_patience,
                        rationale=st.drafter_rationale, records=records)


def build_daemon(settings: Settings, db: Database, *, worker_id: str | None = None,
                 metrics_port: int | None = None, scheduler: bool = True,
                 lease_ttl_s: float = 30.0, heartbeat_s: float = 3.0):
    """The whole daemon: watchers for every account folder, worker, scheduler, metrics."""
    from agent import audit
    from agent.daemon import Daemon, Watched
    from agent.mail import build_mail_sources
    from agent.metrics import Metrics
    from agent.scheduler import Leader, RetrainScheduler

    wid = worker_id or worker_identity(settings)
    student = build_student(settings, db)
    worker = build_worker(settings, db, worker_id=wid, student=student)
    folders = [Watched(src.account, folder, src.watch)
               for src in build_mail_sources(settings, db) for folder in src.folders]
    sched = None
    if scheduler and settings.scheduler.enabled:
        sc = settings.scheduler
        sched = RetrainScheduler(db, cron=sc.retrain_cron, min_new_examples=sc.min_new_examples,
                                 retrain=build_retrain(settings, db), leader=Leader(db),
                                 on_result=lambda _r: student.refresh(),
                                 housekeeping=build_housekeeping(settings, db))
    r = settings.router

    def epsilon() -> float:
        clf = student.current.classifier
        return audit.promised_epsilon(getattr(clf, "thresholds", None), r.target_risk)

    metrics = Metrics(db, epsilon=r.target_risk, student_version=lambda: student.version)
    port = metrics_port if metrics_port is not None else settings.daemon.metrics_port
    if port is not None:
        metrics.serve("127.0.0.1", port)
    sqlite_lock = None
    if db.dialect == "sqlite":
        sqlite_lock = Path(db.engine.url.database or "understudy.db").with_suffix(".daemon.lock")
    return Daemon(db, worker_id=wid, worker=worker, folders=folders, scheduler=sched,
                  metrics=metrics, on_pass=metrics.observe_pass, lease_ttl_s=lease_ttl_s,
                  heartbeat_s=heartbeat_s,
                  audit_check=lambda: _audit_check(db, student, metrics, epsilon()),
                  warmup=lambda: warm_up(student()), sqlite_lock=sqlite_lock,
                  on_shutdown=student.close)


def _audit_check(db: Database, student: ActiveStudent, metrics: Any, epsilon: float):
    from agent import audit

    metrics.epsilon = epsilon          # the promise of the model now active
    return audit.check(db, student_version=student.version, epsilon=epsilon)


def warm_up(student: Student) -> None:
    """Run the student once so its first real batch does not pay for lazy initialisation."""
    from storage.types import Email

    probe = [Email(id="warmup", subject="warm up", text="warm up", new_text="warm up")]
    if student.classifier is not None:
        student.classifier.classify(probe)
    if student.drafter is not None:
        student.drafter.draft(probe)
