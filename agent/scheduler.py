"""Scheduled retraining (and the nightly housekeeping), run by one leader per database.

APScheduler (BackgroundScheduler) fires ``scheduler.retrain_cron``; the job retrains only
when this process is the leader and at least ``scheduler.min_new_examples`` new training
examples (teacher answers, audits, human corrections) arrived since the last training
run. Leadership is a PostgreSQL session advisory lock held on a dedicated connection:
the database releases it when the process dies, so a ``kill -9`` hands leadership to the
next daemon within one try. On SQLite one daemon owns the database (a file lock in
agent.daemon), so it is always the leader.

>>> leader = Leader(db)                                      # doctest: +SKIP
>>> sched = RetrainScheduler(db, cron="0 3 * * *", min_new_examples=200,
...                          retrain=lambda trigger: ..., leader=leader)
>>> sched.start()                                            # doctest: +SKIP
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import select, text

from agent.logs import get_logger
from storage.db import Database
from storage.models import TrainingRun

log = get_logger(component="scheduler")

# A fixed 64-bit key: "understudy scheduler leader". Any constant works as long as every
# daemon of this database uses the same one.
LEADER_LOCK_KEY = 0x756E64657273_01


class Leader:
    """Holds (or tries to take) the scheduler leadership of one database."""

    def __init__(self, db: Database):
        self.db = db
        self._conn = None
        self._lock = threading.Lock()

    @property
    def always(self) -> bool:
        return self.db.dialect != "postgresql"

    def is_leader(self) -> bool:
        """True when this process holds leadership; tries to take it when it does not."""
        if self.always:
            return True
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT 1"))
                    return True
                except Exception:  # noqa: BLE001 - lost the connection: lost the lock
                    self._drop()
            conn = self.db.engine.connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                               {"k": LEADER_LOCK_KEY}).scalar()
            conn.commit()
            if got:
                self._conn = conn
                log.info("scheduler leadership taken")
                return True
            conn.close()
            return False

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                       {"k": LEADER_LOCK_KEY})
                    self._conn.commit()
                finally:
                    self._drop()

    def _drop(self) -> None:
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001
            pass
        self._conn = None


def new_examples_since_last_run(db: Database) -> int:
    """Training examples (teacher, audit, human) newer than the last training run's start."""
    from storage.datasets import training_examples

    with db.session() as s:
        since: datetime | None = s.scalar(select(TrainingRun.started_at)
                                          .order_by(TrainingRun.id.desc()).limit(1))
    return len(training_examples(db, since=since))


class RetrainScheduler:
    """The retraining job on a cron, gated by leadership and by new data."""

    def __init__(self, db: Database, *, cron: str, min_new_examples: int,
                 retrain: Callable[[str], Any], leader: Leader,
                 on_result: Callable[[Any], None] | None = None, timezone: str | None = None,
                 housekeeping: Callable[[], Any] | None = None):
        self.db = db
        self.cron = cron
        self.min_new_examples = min_new_examples
        self.retrain = retrain
        self.leader = leader
        self.on_result = on_result
        self.timezone = timezone
        self.housekeeping = housekeeping
        self._sched = None
        self._running = threading.Lock()

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger

        self._sched = BackgroundScheduler(daemon=True)
        trigger = CronTrigger.from_crontab(self.cron, timezone=self.timezone)
        # max_instances=1 and coalesce: a slow run never overlaps the next firing.
        self._sched.add_job(self.run_job, trigger, id="retrain", max_instances=1,
                            coalesce=True, misfire_grace_time=3600)
        self._sched.start()
        log.info("scheduler started", cron=self.cron, min_new_examples=self.min_new_examples)

    def shutdown(self) -> None:
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None
        self.leader.release()

    def run_job(self) -> dict[str, Any]:
        """One firing: returns what happened (also logged)."""
        if not self._running.acquire(blocking=False):
            return {"ran": False, "reason": "a retrain is already running"}
        try:
            if not self.leader.is_leader():
                log.info("retrain skipped: another daemon is the scheduler leader")
                return {"ran": False, "reason": "not leader"}
            self._housekeeping()
            n = new_examples_since_last_run(self.db)
            if n < self.min_new_examples:
                log.info("retrain skipped: too few new examples", new_examples=n,
                         min_new_examples=self.min_new_examples)
                return {"ran": False, "reason": "too few new examples", "new_examples": n}
            log.info("retrain starting", new_examples=n)
            try:
                result = self.retrain("schedule")
            except Exception as e:  # noqa: BLE001 - the daemon keeps running; the run row says why
                log.error("retrain failed", error=f"{type(e).__name__}: {e}")
                return {"ran": True, "error": f"{type(e).__name__}: {e}", "new_examples": n}
            log.info("retrain finished", result=str(result)[:500])
            if self.on_result is not None:
                self.on_result(result)
            return {"ran": True, "result": result, "new_examples": n}
        finally:
            self._running.release()

    def _housekeeping(self) -> None:
        """The leader's nightly clean-up (raw email retention), before the retrain check;
        a failure is logged and does not stop the retrain."""
        if self.housekeeping is None:
            return
        try:
            out = self.housekeeping()
            log.info("housekeeping done", result=out)
        except Exception as e:  # noqa: BLE001 - the daemon keeps running
            log.error("housekeeping failed", error=f"{type(e).__name__}: {e}")
