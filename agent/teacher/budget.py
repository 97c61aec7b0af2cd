"""The daily spend cap: stop asking the teacher once today's (UTC) spend reaches it.

Spend is read from the ``model_calls`` rows (every teacher call is one), plus what this
process has spent and not yet seen recorded, so the cap holds within one ``label()`` batch
too. A cap of 0 disables it. When the cap is reached the guard raises
:class:`SpendCapReached` (mail waits; nothing is dropped) and logs it once per day.

>>> guard = SpendGuard(cap_usd=5.0, spent_today=lambda: 4.2)
>>> guard.remaining_usd()
0.8
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

import structlog

from agent.teacher.errors import SpendCapReached

log = structlog.get_logger(__name__)


def db_spend_today(db) -> Callable[[], float]:
    """A ``spent_today`` callable reading the teacher spend of the current UTC day."""
    from storage.queries import start_of_utc_day, teacher_spend_since

    return lambda: teacher_spend_since(db, start_of_utc_day())


def seconds_to_utc_midnight(now: datetime | None = None) -> float:
    now = now or datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class SpendGuard:
    """Checks today's teacher spend against a cap before each call."""

    def __init__(self, cap_usd: float, spent_today: Callable[[], float] | None = None):
        self.cap_usd = cap_usd
        self._spent_today = spent_today
        self._unrecorded = 0.0          # spent by this process since the last check
        self._local_day = self._today()
        self._local_total = 0.0         # used when there is no database to ask
        self._warned_day: str | None = None
        self._lock = threading.Lock()         # concurrent teacher calls add spend

    @staticmethod
    def _today() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%d")

    def spent_usd(self) -> float:
        if self._today() != self._local_day:
            self._local_day, self._local_total, self._unrecorded = self._today(), 0.0, 0.0
        if self._spent_today is None:
            return self._local_total
        return self._spent_today() + self._unrecorded

    def remaining_usd(self) -> float:
        return round(max(0.0, self.cap_usd - self.spent_usd()), 9)

    def add(self, usd: float) -> None:
        """Count a call this process made (its row may not be committed yet)."""
        with self._lock:
            self._unrecorded += usd
            self._local_total += usd

    def recorded(self) -> None:
        """The rows of the calls counted so far are in the database now.

        Teachers call this at the start of each ``label()``: by contract the caller has
        recorded the previous batch's results before asking again.
        """
        self._unrecorded = 0.0

    def check(self, results=()) -> None:
        """Raise :class:`SpendCapReached` (carrying ``results``) when the cap is reached."""
        if self.cap_usd <= 0:
            return
        spent = self.spent_usd()
        if spent < self.cap_usd:
            return
        wait = seconds_to_utc_midnight()
        if self._warned_day != self._today():
            self._warned_day = self._today()
            log.warning("teacher paused: daily spend cap reached", spent_usd=round(spent, 4),
                        cap_usd=self.cap_usd, resumes_in_s=round(wait))
        raise SpendCapReached(
            f"teacher spend today is ${spent:.4f}, at or over the daily cap of "
            f"${self.cap_usd:.2f}; escalation resumes at 00:00 UTC (raise "
            "teacher.daily_spend_cap_usd to resume now)", results, retry_after_s=wait)
