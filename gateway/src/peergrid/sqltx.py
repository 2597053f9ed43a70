"""One SQLite transaction, rolled back right when a statement in it fails.

On some errors SQLite rolls the transaction back by itself before the
statement returns (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, an interrupted
statement). An explicit ROLLBACK then fails with "cannot rollback - no
transaction is active", and raising that would hide the error that matters
("database or disk is full"). So: roll back only while a transaction is
open, and let the original error through.
"""
from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("peergrid.ingest.store")


def rollback(db: sqlite3.Connection) -> None:
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        # the original error is on its way up; this one only gets logged
        log.warning("ROLLBACK failed", exc_info=True)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on a connection in autocommit mode
    (isolation_level None); on any exception nothing of it stays."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
