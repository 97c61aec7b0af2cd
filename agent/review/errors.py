"""Review exceptions; each message says what to do about it."""


class ReviewError(Exception):
    """Base class for review problems."""


class DraftNotFound(ReviewError):
    """No draft has the given id."""


class AlreadyReviewed(ReviewError):
    """The draft was approved or rejected before; a second action would change nothing."""


class InvalidCorrection(ReviewError):
    """A corrected category or priority is not in the configured taxonomy."""


class DeliveryFailed(ReviewError):
    """The approved draft could not be written to the mailbox (or sent); retry approves it."""


class AuthNotConfigured(ReviewError):
    """Neither a password hash nor a token is set for the review app."""


class BadPasswordHash(ReviewError):
    """The configured password hash is not one `understudy review hash-password` made."""
