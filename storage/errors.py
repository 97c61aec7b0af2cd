"""Storage exceptions; each message says how to fix the problem."""


class StorageError(Exception):
    """Base class for storage problems."""


class SchemaNotReady(StorageError):
    """The database schema is missing or older than this version of understudy."""


class DatabaseUnreachable(StorageError):
    """The database server could not be reached."""
