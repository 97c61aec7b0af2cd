"""The student's exception tree. Every message says how to fix the problem."""

from __future__ import annotations


class StudentError(Exception):
    """Base class for errors raised by the distill package."""


class EncoderNotFound(StudentError):
    """The configured encoder is neither an installed package, a local path nor reachable."""


class ModelFormatError(StudentError):
    """A model version directory is missing files or was written by another format."""


class DatasetError(StudentError):
    """The training or evaluation data cannot be used (empty, unlabeled, malformed)."""


class TrainingFailed(StudentError):
    """The training subprocess exited with an error or was killed."""


class NoActiveModel(StudentError):
    """No classifier version has been promoted yet."""
