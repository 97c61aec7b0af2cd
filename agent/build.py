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
from pathlib import Path
from typing import Any, Callable

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
                 poll_s: float = 2.0):
        self.db = db
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

    def refresh(self) -> bool:
        """Check the registry now; True when a new version was swapped in."""
        with self._lock:
            self._checked = time.monotonic()
            clf = work.active_model(self.db, "classifier")
            drf = work.active_model(self.db, "drafter")
            want = (clf[0] if clf else None, drf[0] if drf else None)
            if want == self.versions or any(v in self._failed for v in want if v):
                return False
            student = Student(self.current.classifier, self.current.drafter)
            try:
                if want[0] != self.versions[0]:
                    student.classifier = self.load_classifier(clf[1]) if clf else None
                if self.load_drafter is not None and (
                        want[1] != self.versions[1] or student.drafter is None):
                    student.drafter = self.load_drafter(*(drf or (None, None)))
            except Exception as e:  # noqa: BLE001 - keep serving with the old student
                bad = want[0] if want[0] != self.versions[0] else want[1]
                self._failed.add(bad)
                log.error("could not load the promoted student; keeping the old one",
                          version=bad, error=f"{type(e).__name__}: {e}")
                return False
            log.info("student loaded", classifier=want[0], drafter=want[1],
                     previous=self.versions[0])
            self.current, self.versions = student, want
            return True


def build_student(settings: Settings, db: Database, poll_s: float = 2.0) -> ActiveStudent:
    st = settings.student

    def load_classifier(path: str):
        from distill.classifier import Classifier

        return Classifier.load(path, device=st.device, batch_size=st.batch_size,
                               max_input_tokens=st.max_input_tokens)

    load_drafter = None
    if drafting_enabled(settings):
        if st.drafter_backend == "vllm":
            def load_drafter(version: str | None, path: str | None):
                from distill.serving import VllmDrafter, load_adapter

                # Push the promoted adapter to the running vLLM server, then draft with it.
                if version and path:
                    load_adapter(st.vllm_url, version, path)
                return VllmDrafter(st.vllm_url, _base_name(st.drafter), adapter=version,
                                   max_new_tokens=st.draft_max_new_tokens)
        else:
            def load_drafter(version: str | None, path: str | None):
                from distill.drafter import Drafter

                return Drafter.load(st.drafter, Path(path) if path else None, device=st.device,
                                    max_new_tokens=st.draft_max_new_tokens)
    return ActiveStudent(db, load_classifier=load_classifier, load_drafter=load_drafter,
                         poll_s=poll_s)


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


def build_retrain(settings: Settings, db: Database) -> Callable[[str], Any]:
    """trigger -> distill.pipeline.retrain(...) with flat arguments from settings."""
    def retrain(trigger: str):
        from distill.pipeline import retrain_from_settings

        return retrain_from_settings(settings, db, trigger=trigger)
    return retrain
