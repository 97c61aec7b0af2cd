"""The backend protocols: one narrow call each. Routing and escalation live outside them.

Implementations: ``agent.mail`` (MailSource), ``agent.teacher`` (Teacher),
``distill`` (StudentClassifier, StudentDrafter). Test fakes implement the same protocols.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

from storage.types import Draft, Email, TeacherResult, Triage


@runtime_checkable
class MailSource(Protocol):
    """Fetches new mail from one account and stores it (commit with the cursor)."""

    def sync(self) -> int:
        """One pass over every watched folder; returns how many new messages were stored."""
        ...


@runtime_checkable
class Teacher(Protocol):
    """The expensive, trusted model. Never raises for a bad answer: sets ``error``."""

    def label(self, emails: Sequence[Email]) -> list[TeacherResult]:
        ...


@runtime_checkable
class StudentClassifier(Protocol):
    version: str

    def classify(self, emails: Sequence[Email]) -> list[Triage]:
        ...


@runtime_checkable
class StudentDrafter(Protocol):
    version: str

    def draft(self, emails: Iterable[Email]) -> list[Draft]:
        ...
