"""Reading every entry's summary straight from a store's database, without opening the store.

``pipe cache ls`` over 100,000 entries should answer in under a second, interpreter start
included (``scripts/bench_cli_cache_ls.py``). Opening a ``DiskCacheStore`` imports diskcache
and pydantic (~0.2 s of the budget) and, being a writer, moves pending logs into the
database and rebuilds damaged stores. ``summary_columns`` reads the ``Summaries`` table
with the store's own code (``_tags._read_typed_summaries``), imports neither, and writes
nothing (SQLite may create the ``-shm`` and an empty ``-wal`` file beside the database,
as for any reader of a WAL database). It answers only when the directory is plainly
healthy and the table complete, and returns None otherwise, so that the caller opens the
store, which deals with the rest (and says what it did).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from ._layout import (
    DAMAGED_NAME,
    DB_NAME,
    MARKER_NAME,
    PENDING_DIR,
    PROBE_SQL,
    STORE_LOCK_NAME,
    STORE_NAME,
    marker_bytes,
)
from ._tags import _read_typed_summaries

__all__ = ["summary_columns"]


def summary_columns(
    directory: Path, fields: Collection[int] | None = None
) -> list[Sequence[Any]] | None:
    """``DiskCacheStore(directory)._summary_columns()``, when it can be read without the store.

    ``fields``: the indices of the ``EntrySummary`` fields to read (the other columns are
    None); all by default.

    Returns None, having written nothing, unless all of these hold: the directory's FORMAT
    marker is exactly the one this version writes; the directory is writable (the store
    refuses it otherwise); no DAMAGED flag is set; no pending log waits in ``pending/``
    (the store would move its entries in first); the database opens read-only and answers
    the store's probes; and its ``Summaries`` table is complete (else the store reads the
    summary tags, decodes the metadata of rows without one, and makes the table).

    Like an open store, it holds the shared store lock while the database is open, so a
    damaged ``store/`` is not moved aside meanwhile.
    """
    try:
        if (directory / MARKER_NAME).read_bytes() != marker_bytes():
            return None
        if not os.access(directory, os.W_OK | os.X_OK) or (directory / DAMAGED_NAME).exists():
            return None
        with contextlib.suppress(FileNotFoundError):
            if any(name.endswith(".log") for name in os.listdir(directory / PENDING_DIR)):
                return None
        lock = os.open(directory / STORE_LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        database = directory / STORE_NAME / DB_NAME
        if not database.is_file():
            return None
        con = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            for probe in PROBE_SQL:
                con.execute(probe).fetchall()
            con.execute("BEGIN")  # the check and the read see one snapshot
            return _read_typed_summaries(con, fields)
        finally:
            con.close()
    except (OSError, sqlite3.Error):
        return None
    finally:
        os.close(lock)
