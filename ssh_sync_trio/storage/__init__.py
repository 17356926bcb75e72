"""Storage: the Go server's tables, on SQLite or PostgreSQL, behind `Store`."""

from ssh_sync_trio.storage.store import (
    Conflict,
    NotFound,
    NotYours,
    RotationPending,
    Store,
    open_store,
)

__all__ = ["Conflict", "NotFound", "NotYours", "RotationPending", "Store", "open_store"]
