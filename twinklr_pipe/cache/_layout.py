"""The layout of a ``DiskCacheStore``: its directory, its rows in diskcache's ``Cache`` table.

Kept apart from ``_store`` (which imports diskcache and pydantic) so that a reader of the
listing (``_quick``) can find its way in a store directory without them.
"""

from __future__ import annotations

import json
from itertools import repeat
from typing import Final

from ._summary import EntrySummary

__all__: list[str] = []

#: Version of the key recipe and of the entry layout. Bump it (and regenerate
#: ``.cache-example``) whenever keys or stored entries change meaning.
CACHE_FORMAT_VERSION: Final = 1

# -- the directory (see ``_store``'s docstring) --
#: The cache directory of the ``pipe`` commands when neither ``--cache-dir`` nor the
#: environment variable ``CACHE_DIR_ENV`` is given (relative to the working directory).
DEFAULT_CACHE_DIR: Final = ".twinklr-cache"
CACHE_DIR_ENV: Final = "TWINKLR_PIPE_CACHE_DIR"
MARKER_NAME: Final = "FORMAT"
LIBRARY: Final = "twinklr_pipe"
STORE_NAME: Final = "store"
STORE_LOCK_NAME: Final = "store.lock"
DAMAGED_NAME: Final = "DAMAGED"
#: diskcache's database file in ``STORE_NAME`` (``diskcache.core.DBNAME``).
DB_NAME: Final = "cache.db"
#: Where ``put_pending`` logs live (``_pending``).
PENDING_DIR: Final = "pending"

# -- the rows --
META: Final = "m/"
PAYLOAD: Final = "p/"
#: ``w/<xxh3 of a pipeline name>``: the entry ids its last run used (``remember_run``).
WARM: Final = "w/"
#: Entry ids a warm set holds at most, and payload bytes ``warm_up`` keeps in memory.
WARM_MAX: Final = 20_000
WARM_BYTES: Final = 32 << 20
#: Upper bounds of the two key ranges: "0" is the character after "/".
META_END: Final = "m0"
PAYLOAD_END: Final = "p0"

MODE_RAW: Final = 1  # diskcache.core.MODE_RAW: bytes inline in the ``value`` column
MODE_BINARY: Final = 2  # diskcache.core.MODE_BINARY: bytes in a file named by ``filename``

#: Inline payloads up to this size are read along with ``variants``.
PREFETCH_BYTES: Final = 8192

# -- the summaries table --
#: ``Summaries`` holds every entry's ``EntrySummary`` in typed columns, one row per
#: metadata row, so that listing 100,000 entries reads ~150 bytes of ready values per entry
#: instead of scanning ``Cache`` (whose rows hold the metadata JSON and every payload
#: under 32 KB) and parsing each summary tag. ``DiskCacheStore`` writes an entry's row in
#: the transaction of its ``Cache`` rows, creates and fills the table at open when it is
#: missing (``_store._install_summaries``), and again when listing could not trust it
#: (``_store.DiskCacheStore._summary_columns``). Triggers on ``Cache`` delete the row of
#: a metadata row anyone else inserts, changes or deletes (diskcache's own API, an older
#: version of this library), and carry "last used" forward when ``touch`` moves it
#: forward. So readers
#: trust it when its five objects exist and it has as many rows as there are metadata
#: rows; otherwise they read the tags (``_tags._read_summaries``).
SUMMARIES: Final = "Summaries"
SUMMARIES_OBJECTS: Final = (
    SUMMARIES,
    f"{SUMMARIES}_insert",
    f"{SUMMARIES}_update",
    f"{SUMMARIES}_touch",
    f"{SUMMARIES}_delete",
)
#: ``EntrySummary``'s fields: the columns of ``Summaries`` after ``entry`` (the metadata
#: row's key).
SUMMARY_FIELDS: Final = EntrySummary._fields
_NEW_META = f"new.raw = 1 AND new.key >= '{META}' AND new.key < '{META_END}'"
_OLD_META = f"old.raw = 1 AND old.key >= '{META}' AND old.key < '{META_END}'"
# ``touch`` moved "last used" forward: what readers of tags compute, max(the summary's
# value, access_time), moves the same way; any other change of access_time drops the row.
_FORWARD = (
    "typeof(new.access_time) = 'real' AND typeof(old.access_time) = 'real'"
    " AND new.access_time >= old.access_time"
)
#: Creates ``Summaries`` (empty, none of its objects existing).
SUMMARIES_CREATE_SQL: Final = (
    f"CREATE TABLE {SUMMARIES} (row INTEGER PRIMARY KEY, entry TEXT NOT NULL UNIQUE,"
    f" {', '.join(SUMMARY_FIELDS)})",
    f"CREATE TRIGGER {SUMMARIES}_insert AFTER INSERT ON Cache WHEN {_NEW_META}"
    f" BEGIN DELETE FROM {SUMMARIES} WHERE entry = new.key; END",
    f"CREATE TRIGGER {SUMMARIES}_update"
    " AFTER UPDATE OF key, raw, tag, value, mode, filename ON Cache"
    f" WHEN {_OLD_META} OR {_NEW_META}"
    f" BEGIN DELETE FROM {SUMMARIES} WHERE entry IN (old.key, new.key); END",
    f"CREATE TRIGGER {SUMMARIES}_touch AFTER UPDATE OF access_time ON Cache WHEN {_NEW_META}"
    f" BEGIN UPDATE {SUMMARIES} SET last_used_at = max(last_used_at, new.access_time)"
    f" WHERE entry = new.key AND {_FORWARD};"
    f" DELETE FROM {SUMMARIES} WHERE entry = new.key AND NOT ({_FORWARD}); END",
    f"CREATE TRIGGER {SUMMARIES}_delete AFTER DELETE ON Cache WHEN {_OLD_META}"
    f" BEGIN DELETE FROM {SUMMARIES} WHERE entry = old.key; END",
)
#: Drops whatever part of ``Summaries`` exists (before creating it again).
SUMMARIES_DROP_SQL: Final = tuple(
    f"DROP {'TABLE' if name == SUMMARIES else 'TRIGGER'} IF EXISTS {name}"
    for name in reversed(SUMMARIES_OBJECTS)
)
#: How many of ``Summaries``' objects exist.
SUMMARIES_FOUND_SQL: Final = (
    "SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'trigger')"
    f" AND name IN ({', '.join(repeat('?', len(SUMMARIES_OBJECTS)))})"
)
#: 1 when ``Summaries`` has one row per metadata row (an index-only count of these).
SUMMARIES_COMPLETE_SQL: Final = (
    f"SELECT (SELECT count(*) FROM {SUMMARIES}) = (SELECT count(*) FROM Cache"
    f" WHERE key >= '{META}' AND key < '{META_END}' AND raw = 1)"
)
#: ``INSERT OR REPLACE`` of summaries: this, then one ``SUMMARY_VALUES`` per entry.
SUMMARIES_INSERT_SQL: Final = (
    f"INSERT OR REPLACE INTO {SUMMARIES} (entry, {', '.join(SUMMARY_FIELDS)}) VALUES "
)
SUMMARY_VALUES: Final = f"({', '.join(repeat('?', len(SUMMARY_FIELDS) + 1))})"
# Every metadata row's key, summary tag (as bytes: text that is not UTF-8 must not fail
# the query, only that row's summary) and access_time, by a scan of ``Cache`` in rowid
# order ("+key": walking the key index and looking each row up costs more).
TAGS_SQL: Final = (
    "SELECT key, CAST(tag AS BLOB), access_time FROM Cache"
    f" WHERE +key >= '{META}' AND +key < '{META_END}' AND raw = 1"
)

# A healthy database answers these without touching much of the file; a zeroed or
# truncated one fails here, at open, rather than in the middle of a run.
PROBE_SQL: Final = (
    "SELECT COUNT(*) FROM Settings",
    f"SELECT key, mode FROM Cache WHERE key >= '{META}' AND raw = 1 ORDER BY key LIMIT 1",
    "SELECT key, mode FROM Cache ORDER BY rowid DESC LIMIT 1",
)


def marker_bytes() -> bytes:
    """The content of the FORMAT marker this version writes."""
    return json.dumps({"format": CACHE_FORMAT_VERSION, "library": LIBRARY}).encode() + b"\n"
