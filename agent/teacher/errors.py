"""Teacher exceptions. A bad *answer* is never an exception (it is a result with ``error``);
these are the conditions under which the caller must stop asking and leave mail waiting.
"""

from __future__ import annotations

from typing import Sequence

from storage.types import TeacherResult


class TeacherError(Exception):
    """Base class for teacher problems."""


class TeacherConfigError(TeacherError):
    """The teacher cannot be built from the configuration (missing key, bad records file)."""


class TeacherUnavailable(TeacherError):
    """The teacher cannot answer now (outage, rate limits past the retry budget).

    ``results`` holds every answer obtained (and paid for) before it gave up, plus a
    failure result for the email it was working on: record them all, then leave the
    remaining emails waiting and try again after ``retry_after_s``.
    """

    def __init__(self, message: str, results: Sequence[TeacherResult] = (),
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.results = list(results)
        self.retry_after_s = retry_after_s


class SpendCapReached(TeacherUnavailable):
    """Today's teacher spend reached ``teacher.daily_spend_cap_usd``; resumes at 00:00 UTC."""


class RecordsFormatError(TeacherError):
    """A teacher-records JSONL file has a bad line; the message names the line number."""
