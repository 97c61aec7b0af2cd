"""SQL storage: models, sessions, migrations and the queries the other packages need."""

from storage.db import Database, make_engine
from storage.errors import DatabaseUnreachable, SchemaNotReady, StorageError

__all__ = ["Database", "DatabaseUnreachable", "SchemaNotReady", "StorageError", "make_engine"]
