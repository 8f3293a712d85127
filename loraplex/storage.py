"""A full disk under the loraplex home, as one typed error.

The home's writes fail in two ways when its filesystem has no room: an OSError (ENOSPC, or
EDQUOT past a quota) from a file write, and SQLite's SQLITE_FULL ("database or disk is full")
from a commit. `is_storage_full` tells those apart from every other failure, so that callers
answer with StorageFull (HTTP 507 insufficient_storage) instead of a server error: the request
was fine, the operator must free space, and a retry then works.
"""

import errno
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
CODE = "insufficient_storage"  # the error code clients see, and the HTTP status's name (507)


class StorageFull(OSError):
    """A write refused because the disk holding the loraplex home is full; nothing half-written
    was kept. An OSError, so that code catching OSError for a clear message still does."""

    def __init__(self, what: str):
        self.message = (f"{what}: the disk holding the loraplex home is full; nothing was "
                        "stored. Free some space and retry.")
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message  # not OSError's "[Errno 28] ..."


def is_storage_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in FULL_ERRNOS
    return (isinstance(error, sqlite3.OperationalError)
            and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


@contextmanager
def full_disk_as(what: str) -> Iterator[None]:
    """Inside, a full disk's OSError or SQLITE_FULL is raised as StorageFull(what)."""
    try:
        yield
    except StorageFull:
        raise
    except (OSError, sqlite3.OperationalError) as e:
        if is_storage_full(e):
            raise StorageFull(what) from e
        raise
