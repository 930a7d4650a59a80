"""Cache stores: ``MemoryStore`` in process, ``DiskCacheStore`` on diskcache.

Layout of a ``DiskCacheStore`` directory::

    <directory>/                      created 0o700 when missing
        FORMAT                        {"format": 1, "library": "twinklr_pipe"}, replaced atomically
        store/                        the diskcache directory: cache.db and large values' files
        store.lock                    flock: shared by every open store, exclusive while a
                                      damaged store/ is moved aside
        DAMAGED                       left by a store that found cache.db damaged while running;
                                      the next open moves store/ aside
        store.damaged-<time>-<pid>/   a damaged store/ moved aside (safe to delete)
        locks/<key>.lock              per-key flock files of ``DiskCacheStore.lock``
        pending/<pid>-<token>.log     entries on their way into cache.db (``put_pending``,
                                      see ``_pending``)

One entry is two rows of diskcache's ``Cache`` table, written in one transaction::

    m/<key>.<variant>    value: the EntryMeta as JSON bytes
                         tag: the entry's summary, one short line of text (``_tags``)
                         access_time: when the entry was last used (see below)
    p/<key>.<variant>    value: the payload bytes

and, in the same transaction, its summary's row of the ``Summaries`` table (typed
columns; what listing reads; kept honest by triggers against other writers: see
``_layout``).

and one row per pipeline name is a hint, not an entry (``remember_run``)::

    w/<xxh3 of the name>  value: a JSON array of the entry ids its last run used

"Last used" is kept out of the metadata JSON: ``touch`` only updates the ``access_time``
column of the metadata rows (diskcache never updates it itself: the store runs with
eviction off), and every ``EntryMeta`` or ``EntrySummary`` the store returns reports
``last_used_at = max(the value in the JSON, access_time)``. ``put`` sets ``access_time``
to the entry's ``last_used_at``. Rows written before summaries existed have no tag;
listing decodes their metadata instead. Summaries written before format 2 are JSON
arrays (format 1), still read.

Keys are ``str`` stored raw and values are ``bytes``: nothing is ever pickled or
unpickled (see ``_BytesDisk``). Reads go straight to the ``Cache`` table through the
calling thread's SQLite connection, a private diskcache API (pinned ``diskcache>=5.6``):
the public API costs one query per row, and ``pipe cache ls`` lists 100,000 entries
(``scripts/bench_cli_cache_ls.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, Final

import diskcache
import xxhash
from pydantic import ValidationError

from twinklr_pipe.cache._entry import EntryMeta, EntrySummary
from twinklr_pipe.cache._heads import _CANDIDATES_SQL, _WARM_SQL, EntryHead, _heads
from twinklr_pipe.cache._layout import CACHE_FORMAT_VERSION
from twinklr_pipe.cache._layout import DAMAGED_NAME as _DAMAGED_NAME
from twinklr_pipe.cache._layout import LIBRARY as _LIBRARY
from twinklr_pipe.cache._layout import MARKER_NAME as _MARKER_NAME
from twinklr_pipe.cache._layout import META as _META
from twinklr_pipe.cache._layout import META_END as _META_END
from twinklr_pipe.cache._layout import MODE_BINARY as _MODE_BINARY
from twinklr_pipe.cache._layout import MODE_RAW as _MODE_RAW
from twinklr_pipe.cache._layout import PAYLOAD as _PAYLOAD
from twinklr_pipe.cache._layout import PAYLOAD_END as _PAYLOAD_END
from twinklr_pipe.cache._layout import PREFETCH_BYTES as _PREFETCH_BYTES
from twinklr_pipe.cache._layout import PROBE_SQL as _PROBE_SQL
from twinklr_pipe.cache._layout import STORE_LOCK_NAME as _STORE_LOCK_NAME
from twinklr_pipe.cache._layout import STORE_NAME as _STORE_NAME
from twinklr_pipe.cache._layout import SUMMARIES_CREATE_SQL as _SUMMARIES_CREATE_SQL
from twinklr_pipe.cache._layout import SUMMARIES_DROP_SQL as _SUMMARIES_DROP_SQL
from twinklr_pipe.cache._layout import SUMMARIES_INSERT_SQL as _SUMMARIES_INSERT_SQL
from twinklr_pipe.cache._layout import SUMMARY_VALUES as _SUMMARY_VALUES
from twinklr_pipe.cache._layout import WARM as _WARM
from twinklr_pipe.cache._layout import WARM_BYTES as _WARM_BYTES
from twinklr_pipe.cache._layout import WARM_MAX as _WARM_MAX
from twinklr_pipe.cache._layout import marker_bytes as _marker_bytes
from twinklr_pipe.cache._pending import PendingLog, claim_orphans, encode_record, parse_records
from twinklr_pipe.cache._tags import (
    _columns_of,
    _json_summary_tag,  # noqa: F401  # tests reach it here
    _read_summaries,
    _summaries_complete,
    _summaries_installed,
    _summary_rows,
    _summary_values,
    _tag_of,
)
from twinklr_pipe.errors import CacheFormatError, StoreError

__all__ = ["DiskCacheStore", "EntryHead", "MemoryStore"]

_log = logging.getLogger("twinklr_pipe")

#: A key keeps at most this many variants; ``put`` drops the least recently used.
MAX_VARIANTS: Final = 4


_LOCKS_NAME: Final = "locks"

#: ``put_pending``: entries held in memory at most (beyond, it declines), and the count
#: at which the background thread is woken at once rather than after ``_FLUSH_EVERY``.
_PENDING_MAX: Final = 4096
_FLUSH_AT: Final = 64
#: Seconds between two batches of the background thread.
_FLUSH_EVERY: Final = 0.1

#: Room left for an entry's metadata JSON when ``try_put`` judges a payload small.
_META_ROOM: Final = 4096

#: Metadata rows read per query by ``iter_metadata``.
_PAGE_ROWS: Final = 2000


#: diskcache settings; they are stored in cache.db and re-applied on every open.
_DISKCACHE_SETTINGS: Final[dict[str, Any]] = {
    # An entry is two rows: diskcache must never evict one without the other.
    "eviction_policy": "none",
    "cull_limit": 0,
    # Statistics would turn every read into a write transaction.
    "statistics": 0,
    "tag_index": 0,
}

# SQLite result codes (primary code = extended code & 0xFF) that mean a damaged file.
_SQLITE_CORRUPT: Final = 11
_SQLITE_NOTADB: Final = 26

# diskcache names value files "<2 hex>/<2 hex>/<28 hex>.val" (``Disk.filename``). Anything
# else in the ``filename`` column is damage, and must never be read or removed.
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
_SAFE_LOCK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")

# Both rows of an entry in one statement (one snapshot). UNION ALL of two index lookups
# is ~25% faster than "key IN (?, ?)", which builds a temporary table for the list.
# Rows are read as (key, mode, filename, value, access_time): see ``_Row``.
_ENTRY_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache WHERE key = ? AND raw = 1"
    " UNION ALL"
    " SELECT key, mode, filename, value, access_time FROM Cache WHERE key = ? AND raw = 1"
)
# The payload row's value is not read: only its presence matters.
_ENTRY_META_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache WHERE key = ? AND raw = 1"
    " UNION ALL"
    " SELECT key, mode, filename, NULL, access_time FROM Cache WHERE key = ? AND raw = 1"
)
_META_ROW_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache WHERE key = ? AND raw = 1"
)
_RANGE_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache"
    " WHERE key >= ? AND key < ? AND raw = 1"
)
#: How long a prefetched payload may serve ``get`` (seconds).
_PREFETCH_SECONDS: Final = 1.0
# A key's metadata rows, then its payload rows (small inline values only), in one snapshot.
_VARIANTS_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache"
    " WHERE key >= ?1 AND key < ?2 AND raw = 1"
    " UNION ALL SELECT key, mode, filename,"
    f" CASE WHEN mode = {_MODE_RAW} AND length(value) <= {_PREFETCH_BYTES} THEN value END,"
    " access_time FROM Cache WHERE key >= ?3 AND key < ?4 AND raw = 1"
)
# Pages by rowid: a sequential scan of the table, ~2x faster than walking the key index
# and fetching each row from it ("+key" keeps SQLite off the index).
_PAGE_SQL: Final = (
    "SELECT rowid, key, mode, filename, value, access_time FROM Cache WHERE rowid > ?"
    f" AND +key >= '{_META}' AND +key < '{_META_END}' AND raw = 1"
    f" ORDER BY rowid LIMIT {_PAGE_ROWS}"
)
# A table scan too: ~3x faster than the index when most rows are payloads.
_SIZE_SQL: Final = (
    "SELECT COALESCE(SUM(CASE WHEN mode = 2 THEN size ELSE length(value) END), 0)"
    f" FROM Cache WHERE +key >= '{_PAYLOAD}' AND +key < '{_PAYLOAD_END}' AND raw = 1"
)
_FILENAMES_SQL: Final = "SELECT filename FROM Cache WHERE key IN (?, ?) AND raw = 1"
# diskcache's count of the rows of the Cache table (kept by its triggers).
_ROW_COUNT_SQL: Final = "SELECT value FROM Settings WHERE key = 'count'"
# The key of every metadata row (an index-only scan), for keys without a dot (the
# executor's: hex digests).
_KEYS_SQL: Final = (
    f"SELECT DISTINCT substr(key, 3, instr(substr(key, 3), '.') - 1) FROM Cache"
    f" WHERE key >= '{_META}' AND key < '{_META_END}' AND raw = 1"
)
# Which of a JSON array of keys have any row (metadata or payload, any variant).
_TAKEN_SQL: Final = (
    "SELECT DISTINCT j.value FROM json_each(?1) AS j JOIN Cache AS c"
    f" ON c.key >= '{_META}' || j.value || '.' AND c.key < '{_META}' || j.value || '/'"
    " AND c.raw = 1"
    " UNION SELECT j.value FROM json_each(?1) AS j JOIN Cache AS c"
    f" ON c.key >= '{_PAYLOAD}' || j.value || '.' AND c.key < '{_PAYLOAD}' || j.value || '/'"
    " AND c.raw = 1"
)
_DELETE_SQL: Final = "DELETE FROM Cache WHERE key IN (?, ?) AND raw = 1"
_ROW_SQL: Final = "SELECT rowid, filename FROM Cache WHERE key = ? AND raw = 1"
_UPDATE_SQL: Final = (
    "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?, access_count = 0,"
    " tag = ?, size = ?, mode = ?, filename = ?, value = ? WHERE rowid = ?"
)
_INSERT_MANY_SQL: Final = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES "
)
_INSERT_VALUES: Final = "(?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)"
#: Index of "last used" in ``_summary_values``.
_USED: Final = 1 + EntrySummary._fields.index("last_used_at")
#: Rows per INSERT statement (8 parameters each).
_ROWS_PER_INSERT: Final = 500
_INSERT_SQL: Final = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag,"
    " size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)"
)
# ``touch``: "last used" only moves forward (a NULL access_time counts as never).
_TOUCH_SQL: Final = (
    "UPDATE Cache SET access_time = max(coalesce(access_time, ?1), ?1) WHERE key = ?2 AND raw = 1"
)
# The metadata rows without a usable summary are decoded in full: by key when they are
# few, else from one scan of every metadata row.
_UNSUMMARIZED_SQL: Final = (
    "SELECT key, mode, filename, value, access_time FROM Cache"
    f" WHERE +key >= '{_META}' AND +key < '{_META_END}' AND raw = 1"
)
_UNSUMMARIZED_BY_KEY: Final = 1000
#: (key, mode, filename, value, access_time) of a row of diskcache's ``Cache`` table.
_Row = tuple[str, int, str | None, Any, Any]
_Columns = tuple[int, int, str | None, Any]


class _CorruptRow(Exception):
    """A row that cannot be read as one of our entries; the message says why."""


class _DamagedDatabase(Exception):
    """cache.db is damaged (SQLite reports a corrupt file or not a database)."""


def _is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error means a damaged database file (not a busy or full one)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _fetch_bytes(root: str, mode: int, filename: str | None, value: Any) -> bytes:
    """Return a row's bytes, refusing anything but raw bytes (never unpickles).

    Raises:
        _CorruptRow: the row holds a pickle, text, a number or a bad file name.
        OSError: the value's file cannot be read.
    """
    if mode == _MODE_RAW and type(value) is bytes:
        return value
    if mode == _MODE_BINARY and value is None and filename is not None:
        if _VALUE_FILE.fullmatch(filename) is None:
            raise _CorruptRow(f"its value file name {filename!r} is not one diskcache makes")
        with open(os.path.join(root, filename), "rb") as reader:
            return reader.read()
    raise _CorruptRow(f"its row holds a value of mode {mode}, not raw bytes")


class _BytesDisk(diskcache.Disk):
    """A ``diskcache.Disk`` for ``str`` keys and ``bytes`` values, and nothing else.

    diskcache's default ``Disk`` pickles any other value and unpickles any row stored in
    pickle mode, so a planted row could run code. This one refuses to store anything but
    bytes and to fetch anything but raw bytes, and removes only files it could have made.
    """

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self._root = directory

    def put(self, key: Any) -> tuple[str, bool]:  # type: ignore[override]  # stubs overload
        if type(key) is not str:
            raise TypeError(f"cache keys must be str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> str:  # type: ignore[override]  # stubs overload
        if raw and type(key) is str:
            return key
        raise _CorruptRow("its key is not a raw str")

    def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> _Columns:  # type: ignore[override]  # stubs overload
        if read or type(value) is not bytes:
            raise TypeError(f"cache values must be bytes, not {type(value).__name__}")
        columns: _Columns = super().store(value, False, key=key)
        return columns

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:  # type: ignore[override]  # stubs overload
        if read:
            raise TypeError("reading cache values as files is not supported")
        return _fetch_bytes(self._root, mode, filename, value)

    def remove(self, file_path: Any) -> None:
        if isinstance(file_path, str) and _VALUE_FILE.fullmatch(file_path):
            super().remove(file_path)


class _Cache(diskcache.Cache):
    """A ``diskcache.Cache`` that closes its connection when opening fails.

    ``Cache.__init__`` queries the database; when that raises (a damaged file), the
    half-built cache would keep its SQLite connection open until collected, and the
    damaged files must not be moved while a connection is open.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise


def _connection(cache: diskcache.Cache) -> sqlite3.Connection:
    """The calling thread's SQLite connection of ``cache`` (diskcache private API)."""
    # diskcache>=5.6: ``Cache._con`` opens one connection per thread (and per process
    # after a fork) and applies the cache's pragmas to it.
    con: sqlite3.Connection = cache._con  # type: ignore[attr-defined]  # private, see above
    return con


def _dump_meta(meta: EntryMeta) -> bytes:
    return EntryMeta.__pydantic_serializer__.to_json(meta)


def _used_at(meta: EntryMeta, used: Any) -> EntryMeta:
    """``meta`` reporting ``last_used_at = max(its own value, used)`` (an access_time).

    ``meta`` must be freshly decoded and not yet shared: the frozen model's field is
    set in place (``model_copy`` costs ~15 µs, a fifth of a cached lookup).
    """
    if type(used) is float and used > meta.last_used_at:
        meta.__dict__["last_used_at"] = used
    return meta


def _checked_for_put(meta: EntryMeta, payload: bytes) -> EntryMeta:
    """Validate an entry before storing it; fill ``payload_checksum`` and ``size_bytes``.

    Raises:
        TypeError: ``payload`` is not ``bytes``.
        ValueError: the key or variant is empty, or ``payload_checksum`` does not
            match the payload.
    """
    if type(payload) is not bytes:
        raise TypeError(f"cache payloads must be bytes, not {type(payload).__name__}")
    if not meta.key or not meta.variant:
        raise ValueError(f"cache entry {meta.entry_id!r} needs a non-empty key and variant")
    checksum = xxhash.xxh3_128_hexdigest(payload)
    if meta.payload_checksum and meta.payload_checksum != checksum:
        raise ValueError(
            f"payload_checksum of the entry of stage '{meta.stage_id}' (key {meta.key[:8]}) "
            f"is {meta.payload_checksum[:8]}, but the payload hashes to {checksum[:8]}"
        )
    updates: dict[str, Any] = {}
    if not meta.payload_checksum:
        updates["payload_checksum"] = checksum
    if meta.size_bytes != len(payload):
        updates["size_bytes"] = len(payload)
    return meta.model_copy(update=updates) if updates else meta


def _recency(meta: EntryMeta | EntryHead) -> tuple[float, float, str]:
    return (meta.last_used_at, meta.created_at, meta.variant)


def _describe(meta: EntryMeta | None, entry: str) -> str:
    if meta is not None and meta.stage_id:
        return f"stage '{meta.stage_id}' (key {meta.key[:8]})"
    return f"key {entry[:8]}"


class _KeyLocks:
    """One ``threading.Lock`` per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class MemoryStore:
    """A ``CacheStore`` in a dict, for tests and ``twinklr_pipe.testing``.

    Behaves like ``DiskCacheStore``: metadata goes through its JSON form (so what comes
    back equals what a disk store would return), a key keeps at most ``MAX_VARIANTS``
    variants, ``put`` fills ``payload_checksum`` and ``size_bytes``, and ``touch`` only
    moves "last used" forward, outside the metadata record. Thread-safe.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, bytes]] = {}
        # id -> (summary as put, last use recorded by ``put`` or ``touch``)
        self._summaries: dict[str, tuple[EntrySummary, float]] = {}
        # key -> ids of its variants, and id -> key: a lookup must not scan every entry.
        self._ids: dict[str, dict[str, None]] = {}
        self._key_of: dict[str, str] = {}
        self._mutex = threading.Lock()
        self._key_locks = _KeyLocks()

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._entries)} entries)"

    def _decoded(self, entry_id: str, data: bytes) -> EntryMeta:
        return _used_at(EntryMeta.model_validate_json(data), self._summaries[entry_id][1])

    def get(self, entry_id: str) -> tuple[EntryMeta, bytes] | None:
        """Return an entry's metadata and payload, or None when absent."""
        with self._mutex:
            found = self._entries.get(entry_id)
            if found is None:
                return None
            return self._decoded(entry_id, found[0]), found[1]

    def get_meta(self, entry_id: str) -> EntryMeta | None:
        """Return an entry's metadata, or None when absent."""
        with self._mutex:
            found = self._entries.get(entry_id)
            return None if found is None else self._decoded(entry_id, found[0])

    def variants(self, key: str) -> list[EntryMeta]:
        """Metadata of every stored variant of ``key``, most recently used first."""
        return sorted(self._variants(key), key=_recency, reverse=True)

    def _variants(self, key: str) -> list[EntryMeta]:
        with self._mutex:
            return self._variants_locked(key)

    def put(self, meta: EntryMeta, payload: bytes) -> None:
        """Store an entry, replacing one with the same id; keep at most 4 variants per key.

        Raises:
            TypeError: ``payload`` is not ``bytes``.
            ValueError: the key or variant is empty, or ``payload_checksum`` is wrong.
        """
        meta = _checked_for_put(meta, payload)
        data = _dump_meta(meta)
        summary = EntrySummary.of(meta)
        with self._mutex:
            self._delete_locked(meta.entry_id)  # replaced: its id may be indexed under a key
            self._entries[meta.entry_id] = (data, payload)
            self._summaries[meta.entry_id] = (summary, meta.last_used_at)
            self._ids.setdefault(meta.key, {})[meta.entry_id] = None
            self._key_of[meta.entry_id] = meta.key
            others = [m for m in self._variants_locked(meta.key) if m.variant != meta.variant]
            excess = len(others) + 1 - MAX_VARIANTS
            for old in sorted(others, key=_recency)[: max(excess, 0)]:
                self._delete_locked(old.entry_id)

    def _variants_locked(self, key: str) -> list[EntryMeta]:
        metas = (self._decoded(eid, self._entries[eid][0]) for eid in self._ids.get(key, ()))
        return [meta for meta in metas if meta.key == key]

    def _delete_locked(self, entry_id: str) -> bool:
        if self._entries.pop(entry_id, None) is None:
            return False
        del self._summaries[entry_id]
        key = self._key_of.pop(entry_id)
        ids = self._ids[key]
        del ids[entry_id]
        if not ids:
            del self._ids[key]
        return True

    def delete(self, entry_id: str) -> bool:
        """Remove an entry; return whether it existed."""
        with self._mutex:
            return self._delete_locked(entry_id)

    def touch(self, entry_ids: Iterable[str], when: float) -> None:
        """Record a use of the given entries at ``when`` (missing ones are ignored).

        ``last_used_at`` becomes ``when`` unless it is already later.
        """
        when = float(when)
        with self._mutex:
            for eid in set(entry_ids):
                found = self._summaries.get(eid)
                if found is not None and when > found[1]:
                    self._summaries[eid] = (found[0], when)

    def iter_metadata(self) -> Iterator[EntryMeta]:
        """Every entry's metadata (a snapshot), in no particular order."""
        with self._mutex:
            raw = [(meta, self._summaries[eid][1]) for eid, (meta, _) in self._entries.items()]
        for data, used in raw:
            yield _used_at(EntryMeta.model_validate_json(data), used)

    def iter_summaries(self) -> Iterator[EntrySummary]:
        """Every entry's ``EntrySummary`` (a snapshot), in no particular order.

        Agrees with ``iter_metadata`` field by field, without decoding any metadata.
        """
        with self._mutex:
            found = list(self._summaries.values())
        for summary, used in found:
            yield summary._replace(last_used_at=used) if used > summary.last_used_at else summary

    def size(self) -> int:
        """Total size in bytes of the stored payloads."""
        with self._mutex:
            return sum(len(payload) for _, payload in self._entries.values())

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive, non-reentrant lock on ``key`` among this process's threads (blocking)."""
        return self._key_locks.hold(key)

    def close(self) -> None:
        """Nothing to release."""


class DiskCacheStore:
    """The default ``CacheStore``: diskcache (SQLite plus files) in one directory.

    Several processes may use one directory at once, and every method is thread-safe.
    An entry's metadata and payload rows are written in one SQLite transaction, so a
    crash leaves the whole entry or none. Reads verify the payload's checksum; a
    corrupt or unreadable entry is a miss, removed with a warning. A damaged database
    is moved aside (``store.damaged-*``) and replaced by an empty one, at open or, when
    found while running, at the next open; until then lookups miss and writes raise
    ``StoreError``.

    Attributes:
        directory: The cache directory (absolute).
        format_version: The store format of the directory (``CACHE_FORMAT_VERSION``).
        timeout: Seconds a write waits for another process's write to finish.
    """

    def __init__(self, directory: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        """Open (or create) the cache in ``directory``.

        Raises:
            CacheFormatError: the directory was written by a newer store format.
            StoreError: the path is a file, or the directory cannot be created, written
                or opened.
        """
        self.directory = Path(os.fspath(directory)).expanduser().absolute()
        self.timeout = timeout
        self._store_dir = self.directory / _STORE_NAME
        self._root = str(self._store_dir)
        self._cache: diskcache.Cache | None = None
        # ``_live`` is ``_cache`` while the database is usable, else None (hot path check).
        self._live: diskcache.Cache | None = None
        self._damaged: str | None = None
        self._closed = False
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        # Per thread: what the last ``variants`` call read, for the ``get`` that follows.
        self._prefetched = threading.local()
        # Entries appended by ``put_pending`` and not yet in the database: entry id ->
        # (metadata, its JSON, payload); key -> entry ids. Guarded by ``_pending_lock``.
        self._pending: dict[str, tuple[EntryMeta, bytes, bytes]] = {}
        self._pending_keys: dict[str, set[str]] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._log: PendingLog | None = None
        self._log_off = False
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        # Whether this database has the ``Summaries`` table: entries written then add a row.
        self._has_summaries = False
        try:
            self.format_version = self._prepare_directory()
            self._open()
            self._install_summaries()
            self._ingest_orphans()
        except (StoreError, CacheFormatError):
            self._release_store_lock()
            raise
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self._release_store_lock()
            raise StoreError(f"Cannot open the cache in {self.directory}: {exc}") from exc

    def __repr__(self) -> str:
        return f"DiskCacheStore({str(self.directory)!r})"

    def __enter__(self) -> DiskCacheStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening -------------------------------------------------------------------

    def _prepare_directory(self) -> int:
        """Create the directory and check or write its FORMAT marker; return the format."""
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise StoreError(
                f"Cache directory {directory} is a file, not a directory. Pass another "
                "cache directory, or move the file away."
            )
        marker = directory / _MARKER_NAME
        found: int | None = None
        problem: str | None = None
        if directory.is_dir():
            try:
                raw = marker.read_bytes()
            except FileNotFoundError:
                pass
            else:
                found, problem = _parse_marker(raw)
                if found is not None and found > CACHE_FORMAT_VERSION:
                    raise CacheFormatError(str(directory), found, CACHE_FORMAT_VERSION)
        else:
            try:
                directory.mkdir(mode=0o700, parents=True)
            except FileExistsError:  # made by another process meanwhile: not ours to chmod
                pass
            else:
                os.chmod(directory, 0o700)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StoreError(
                f"Cache directory {directory} is not writable. Fix its permissions, or pass "
                "another cache directory."
            )
        if problem is not None:
            _log.warning(
                "Cache format marker %s is damaged (%s); rewriting it for format %d",
                marker,
                problem,
                CACHE_FORMAT_VERSION,
            )
        if found is None:
            _write_atomically(marker, _marker_bytes())
            return CACHE_FORMAT_VERSION
        return found

    def _open(self) -> None:
        """Take the shared store lock and open diskcache, recovering a damaged store."""
        lock_path = self.directory / _STORE_LOCK_NAME
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        flag = self.directory / _DAMAGED_NAME
        if flag.exists():
            reason = flag.read_text(encoding="utf-8", errors="replace").strip()
            self._recover(reason or "found damaged by an earlier run")
            return
        try:
            self._set_cache(self._open_cache())
        except _DamagedDatabase as exc:
            self._recover(str(exc))

    def _open_cache(self) -> diskcache.Cache:
        """Open diskcache in ``store/`` and probe it.

        Raises:
            _DamagedDatabase: cache.db is damaged.
        """
        try:
            cache = _Cache(
                self._root,
                timeout=self.timeout,
                disk=_BytesDisk,
                **_DISKCACHE_SETTINGS,
            )
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise _DamagedDatabase(str(exc)) from exc
            raise
        try:
            con = _connection(cache)
            for probe in _PROBE_SQL:
                con.execute(probe).fetchall()
        except sqlite3.DatabaseError as exc:
            cache.close()
            if _is_damage(exc):
                raise _DamagedDatabase(str(exc)) from exc
            raise
        return cache

    def _install_summaries(self) -> None:
        """At open: make the ``Summaries`` table and its triggers unless they all exist.

        Once per database (a store of 100,000 entries written before the table existed
        takes ~2 s); checking costs a lookup in the schema. A table that lost rows (an
        older version of this library wrote entries) is made again by the next listing
        (``_summary_columns``): counting rows at every open would cost more than that.
        """
        cache = self._live
        if cache is not None:
            self._has_summaries = self._make_summaries(cache, unless_installed=True)

    def _make_summaries(self, cache: diskcache.Cache, *, unless_installed: bool = False) -> bool:
        """Drop whatever part of ``Summaries`` exists, create it and fill it from the tags.

        One transaction. With ``unless_installed``, nothing when its objects all exist
        (in the transaction: when it is complete, made by another process meanwhile).
        Best effort: returns False when it could not be made (a database locked or
        read-only meanwhile); the store works without it, listing reads the tags.
        """
        con = _connection(cache)
        try:
            if unless_installed and _summaries_installed(con):
                return True
            with cache.transact():
                if unless_installed and _summaries_complete(con):
                    return True
                for statement in (*_SUMMARIES_DROP_SQL, *_SUMMARIES_CREATE_SQL):
                    con.execute(statement)
                columns = self._summary_columns(repair=False)  # from the tags: no rows yet
                entries = map("{}{}.{}".format, repeat(_META), columns[0], columns[1])
                con.executemany(
                    _SUMMARIES_INSERT_SQL + _SUMMARY_VALUES, zip(entries, *columns, strict=False)
                )
        except (sqlite3.Error, diskcache.Timeout, StoreError) as exc:
            _rollback(cache)
            _log.debug("Cannot make the summaries table of %s: %s", self._store_dir, exc)
            return False
        return True

    def _recover(self, reason: str) -> None:
        """Move a damaged ``store/`` aside and open an empty one, if no one else uses it.

        Called holding the shared store lock and no connection. SQLite deletes a WAL file
        by name when its last connection closes, so ``store/`` is only moved while no other
        store (in any process) has it open: under the exclusive store lock.
        """
        assert self._lock_fd is not None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_store_lock()
            self._flag_damaged(reason)
            self._damaged = reason
            _log.warning(
                "Cache database in %s is damaged (%s) and another process is using it: "
                "caching is off for this store; it will be rebuilt at the next open",
                self._store_dir,
                reason,
            )
            return
        aside = self.directory / (
            f"{_STORE_NAME}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
        )
        if self._store_dir.exists():
            os.rename(self._store_dir, aside)
            _log.warning(
                "Cache database in %s was damaged (%s): moved it to %s and started an empty "
                "cache. Delete %s when you no longer need it.",
                self.directory,
                reason,
                aside,
                aside,
            )
        with contextlib.suppress(FileNotFoundError):
            (self.directory / _DAMAGED_NAME).unlink()
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            self._set_cache(self._open_cache())
        except _DamagedDatabase as exc:
            raise StoreError(
                f"A new, empty cache database in {self._store_dir} is damaged at once ({exc}); "
                "check the disk, or pass another cache directory."
            ) from exc

    def _set_cache(self, cache: diskcache.Cache) -> None:
        self._cache = cache
        self._live = cache
        disk = cache.disk
        assert isinstance(disk, _BytesDisk)
        self._disk = disk

    def _flag_damaged(self, reason: str) -> None:
        """Leave the DAMAGED flag so that the next open rebuilds the store (best effort)."""
        try:
            (self.directory / _DAMAGED_NAME).write_text(reason + "\n", encoding="utf-8")
        except OSError as exc:
            _log.warning("Cannot flag the damaged cache in %s: %s", self.directory, exc)

    def _mark_damaged(self, exc: BaseException) -> None:
        """Switch to misses after finding cache.db damaged while running."""
        if self._damaged is not None:
            return
        self._damaged = str(exc)
        self._live = None
        self._flag_damaged(self._damaged)
        _log.warning(
            "Cache database in %s is damaged (%s): lookups miss and writes fail until it is "
            "rebuilt; the next open moves it aside and starts an empty cache",
            self._store_dir,
            exc,
        )

    def _release_store_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # A forked child shares the lock with its parent: unlocking would release
            # the parent's lock too. Closing its copy of the descriptor does not.
            if os.getpid() == self._pid:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- access to the database --------------------------------------------------

    def _reader(self) -> diskcache.Cache | None:
        """The cache to read from, or None when the database is damaged (a miss)."""
        cache = self._live
        if cache is None and self._closed:
            raise StoreError(f"The cache store in {self.directory} is closed")
        return cache

    def _scanner(self, action: str) -> diskcache.Cache:
        """The cache to scan: listing a damaged or closed store raises StoreError."""
        cache = self._live
        if cache is None:
            raise self._unusable(action)
        return cache

    def _unusable(self, action: str) -> StoreError:
        if self._closed:
            return StoreError(f"Cannot {action}: the cache store in {self.directory} is closed")
        return StoreError(
            f"Cannot {action}: the cache database in {self._store_dir} is damaged "
            f"({self._damaged}). It is moved aside and replaced by an empty cache the next "
            "time the cache is opened while no other process uses it; run the command again."
        )

    def _read_failed(self, exc: sqlite3.Error, entry: str) -> None:
        if _is_damage(exc):
            self._mark_damaged(exc)
        else:
            _log.warning(
                "Cache lookup of key %s in %s failed (%s); treating it as a miss",
                entry[:8],
                self._store_dir,
                exc,
            )

    def _scan_failed(self, exc: sqlite3.Error, action: str) -> StoreError:
        if _is_damage(exc):
            self._mark_damaged(exc)
            return self._unusable(action)
        return StoreError(f"Cannot {action} in {self._store_dir}: {exc}")

    @contextlib.contextmanager
    def _writing(self, action: str) -> Iterator[diskcache.Cache]:
        """The one place write failures become ``StoreError``.

        Raises:
            StoreError: the store is closed or damaged, another process held the database
                longer than ``timeout``, or SQLite or the file system failed (disk full,
                permission denied...).
        """
        cache = self._live
        if cache is None:
            raise self._unusable(action)
        try:
            yield cache
        except diskcache.Timeout as exc:
            raise StoreError(
                f"Cannot {action}: another process kept the cache database in "
                f"{self._store_dir} locked for more than {self.timeout:g}s"
            ) from exc
        except sqlite3.Error as exc:
            _rollback(cache)
            if _is_damage(exc):
                self._mark_damaged(exc)
            raise StoreError(f"Cannot {action} in cache directory {self.directory}: {exc}") from exc
        except OSError as exc:
            _rollback(cache)
            raise StoreError(f"Cannot {action} in cache directory {self.directory}: {exc}") from exc

    def _remove_files(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name is not None:
                self._disk.remove(name)

    # -- reading -----------------------------------------------------------------

    def _decode_meta(self, row: _Row, entry: str) -> EntryMeta:
        """Decode a metadata row stored for ``entry`` (its last use: see ``_used_at``).

        Raises:
            _CorruptRow: the row is not raw bytes, or not the metadata of ``entry``.
            OSError: its file cannot be read.
        """
        data = _fetch_bytes(self._root, row[1], row[2], row[3])
        try:
            meta = EntryMeta.model_validate_json(data)
        except ValidationError as exc:
            raise _CorruptRow("its metadata cannot be decoded") from exc
        if meta.entry_id != entry:
            raise _CorruptRow(f"its metadata belongs to entry {meta.entry_id[:8]}")
        return _used_at(meta, row[4])

    def get(self, entry_id: str) -> tuple[EntryMeta, bytes] | None:
        """Return an entry's metadata and payload, or None when absent or unreadable.

        An entry whose metadata cannot be decoded or whose payload is missing or fails
        its checksum is deleted, with a warning naming its stage and key. Right after
        ``variants`` in the same thread (within a second, no write in between), a small
        entry is served from what ``variants`` read: the entry as it was then.
        """
        waiting = self._pending_entry(entry_id)
        if waiting is not None:
            return waiting[0], waiting[2]
        cache = self._reader()
        if cache is None:
            return None
        prefetched = getattr(self._prefetched, "rows", None)
        if prefetched is not None:
            found = prefetched[1].pop(entry_id, None)
            if found is not None and time.monotonic() - prefetched[0] < _PREFETCH_SECONDS:
                # Read by ``variants`` in one snapshot and validated there; a payload that
                # fails here is judged again by the full path below.
                known, row = found
                try:
                    payload = _fetch_bytes(self._root, row[1], row[2], row[3])
                except (_CorruptRow, OSError):
                    pass
                else:
                    if xxhash.xxh3_128_hexdigest(payload) == known.payload_checksum:
                        return known, payload
        meta_key = _META + entry_id
        payload_key = _PAYLOAD + entry_id
        for _ in range(2):  # once more if the entry was replaced while it was read
            try:
                rows = _connection(cache).execute(_ENTRY_SQL, (meta_key, payload_key)).fetchall()
            except sqlite3.Error as exc:
                self._read_failed(exc, entry_id)
                return None
            meta_row = payload_row = None
            for row in rows:
                if row[0] == meta_key:
                    meta_row = row
                else:
                    payload_row = row
            if meta_row is None:
                return None
            meta: EntryMeta | None = None
            try:
                meta = self._decode_meta(meta_row, entry_id)
                if payload_row is None:
                    raise _CorruptRow("its payload is missing")
                payload = _fetch_bytes(self._root, payload_row[1], payload_row[2], payload_row[3])
            except _CorruptRow as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"its payload file cannot be read ({exc.strerror or exc})"
            else:
                if xxhash.xxh3_128_hexdigest(payload) == meta.payload_checksum:
                    return meta, payload
                problem = "its payload does not match its checksum (changed or truncated)"
            if self._evict_if_unchanged(cache, meta_key, payload_key, rows):
                self._warn_corrupt(meta, entry_id, problem)
                return None
        return None

    def get_meta(self, entry_id: str) -> EntryMeta | None:
        """Return an entry's metadata without reading its payload.

        The payload's presence is checked, not its checksum (``get`` does that).
        """
        waiting = self._pending_entry(entry_id)
        if waiting is not None:
            return waiting[0]
        cache = self._reader()
        if cache is None:
            return None
        meta_key = _META + entry_id
        payload_key = _PAYLOAD + entry_id
        try:
            rows = _connection(cache).execute(_ENTRY_META_SQL, (meta_key, payload_key)).fetchall()
        except sqlite3.Error as exc:
            self._read_failed(exc, entry_id)
            return None
        meta_row = next((row for row in rows if row[0] == meta_key), None)
        if meta_row is None:
            return None
        meta: EntryMeta | None = None
        try:
            meta = self._decode_meta(meta_row, entry_id)
            if len(rows) == 2:
                return meta
            problem = "its payload is missing"
        except _CorruptRow as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"its metadata file cannot be read ({exc.strerror or exc})"
        # The payload row was not read in full, so compare the metadata row alone.
        if self._evict_if_unchanged(cache, meta_key, None, [meta_row]):
            self._warn_corrupt(meta, entry_id, problem)
        return None

    def variants(self, key: str) -> list[EntryMeta]:
        """Metadata of every stored variant of ``key``, most recently used first.

        One statement over diskcache's key index reads the key's metadata rows and its
        small payloads. Undecodable metadata is deleted with a warning; metadata without
        a payload is left out. The payloads are kept, in this thread, for the ``get`` that
        usually follows (the executor's hot path): it then needs no query of its own.
        """
        cache = self._reader()
        if cache is None:
            return []
        meta_low = _META + key + "."
        payload_low = _PAYLOAD + key + "."
        bounds = (meta_low, meta_low[:-1] + "/", payload_low, payload_low[:-1] + "/")
        try:
            rows = _connection(cache).execute(_VARIANTS_SQL, bounds).fetchall()
        except sqlite3.Error as exc:
            self._read_failed(exc, key)
            return []
        payloads = {row[0][len(_PAYLOAD) :]: row for row in rows if row[0][0] == "p"}
        metas: list[EntryMeta] = []
        prefetched: dict[str, tuple[EntryMeta, _Row]] = {}
        for row in rows:
            if row[0][0] != "m":
                continue
            entry = row[0][len(_META) :]
            try:
                meta = self._decode_meta(row, entry)
            except (_CorruptRow, OSError) as exc:
                if self._evict_if_unchanged(cache, row[0], None, [row]):
                    self._warn_corrupt(None, entry, str(exc))
                continue
            payload_row = payloads.get(entry)
            # "k.a.b" is variant "a.b" of "k", or variant "b" of "k.a".
            if meta.key != key:
                continue
            if payload_row is None:
                # Both rows are written in one transaction and read here in one statement:
                # metadata without its payload is damage, never a write in progress.
                if self._evict_if_unchanged(cache, row[0], None, [row]):
                    self._warn_corrupt(meta, entry, "its payload record is missing")
                continue
            metas.append(meta)
            if payload_row[1] != _MODE_RAW or payload_row[3] is not None:
                prefetched[entry] = (meta, payload_row)
        self._prefetched.rows = (time.monotonic(), prefetched) if prefetched else None
        if self._pending:
            with self._pending_lock:
                waiting = [self._pending[e][0] for e in self._pending_keys.get(key, ())]
            if waiting:
                ids = {m.entry_id for m in waiting}
                metas = [m for m in metas if m.entry_id not in ids] + waiting
        if len(metas) > 1:
            metas.sort(key=_recency, reverse=True)
        return metas

    def _hit_candidates(self, key: str) -> list[tuple[EntryHead, bytes]] | None:
        """The variants of ``key`` with their payloads, most recently used first, or None.

        The executor's hot path: the statement ``variants`` runs, decoding only each
        entry's ``EntryHead``, and every payload checked against its checksum. It answers
        only when every row is ordinary: it returns None (take ``variants`` and ``get``,
        which evict damage with a warning and read large payloads) when a row is damaged,
        a payload is missing, stored in a file, larger than 8 KiB or fails its checksum,
        or SQLite fails. ``[]``: no entry, or the database is damaged (a miss).
        """
        if key in self._pending_keys:
            return None  # entries waiting in memory: ``variants`` merges them
        cache = self._reader()
        if cache is None:
            return []
        low = _META + key + "."
        try:
            rows = _connection(cache).execute(_CANDIDATES_SQL, (low, low[:-1] + "/")).fetchall()
        except sqlite3.Error:
            return None  # a record that is not JSON, among others
        found = _heads(rows, key)
        if found is not None and len(found) > 1:
            found.sort(key=lambda hp: _recency(hp[0]), reverse=True)
        return found

    def iter_metadata(self) -> Iterator[EntryMeta]:
        """Every entry's metadata, in storage order.

        Pages of 2,000 records, each one query on the calling thread's connection (so the
        iterator may be consumed from any thread, and holds no read transaction between
        pages). Unreadable records are skipped, with one warning at the end, not deleted.

        Raises:
            StoreError: the database is damaged or closed, or SQLite fails.
        """
        self._settle()
        action = "list the cache entries"
        cache = self._scanner(action)
        after = 0
        skipped = 0
        while True:
            try:
                rows = _connection(cache).execute(_PAGE_SQL, (after,)).fetchall()
            except sqlite3.Error as exc:
                raise self._scan_failed(exc, action) from exc
            if not rows:
                break
            after = rows[-1][0]
            metas = self._decode_page(rows)
            skipped += len(rows) - len(metas)
            yield from metas
            if len(rows) < _PAGE_ROWS:
                break
        if skipped:
            _log.warning(
                "Skipped %d unreadable cache entries in %s; the next lookup of each removes it",
                skipped,
                self._store_dir,
            )

    def _decode_page(
        self, rows: Sequence[tuple[Any, str, int, str | None, Any, Any]]
    ) -> list[EntryMeta]:
        """Decode metadata rows; skip unreadable ones and ones not matching their key."""
        metas: list[EntryMeta] = []
        append = metas.append
        decode = EntryMeta.model_validate_json
        with _gc_paused():
            for _, key, mode, filename, value, used in rows:
                try:
                    if mode != _MODE_RAW or type(value) is not bytes:  # in a file, or damaged
                        value = _fetch_bytes(self._root, mode, filename, value)
                    meta = decode(value)
                except (_CorruptRow, OSError, ValidationError):
                    continue
                if meta.entry_id == key[2:]:
                    append(_used_at(meta, used))
        return metas

    def iter_summaries(self) -> Iterator[EntrySummary]:
        """Every entry's ``EntrySummary`` (what ``pipe cache ls`` lists), mostly in write order.

        One query reads the ``Summaries`` table (written by ``put`` and the pending
        batches in each entry's transaction; see ``_layout``); no metadata record is
        decoded. When that table cannot be trusted, one query reads each metadata row's
        summary tag and last use instead; rows without a usable tag are decoded in full
        (and listed last, as are format 1 summaries in a store that also holds format 2
        ones). Agrees with ``iter_metadata`` field by field, and like it skips unreadable
        records (one warning at the end) without deleting them.

        Raises:
            StoreError: the database is damaged or closed, or SQLite fails.
        """
        # A list's iterator: consuming it costs nothing per entry (a generator would
        # resume 100,000 times). The list is what one query read: a snapshot.
        self._settle()
        return iter(self._summaries())

    def _summaries(self) -> list[EntrySummary]:
        columns = self._summary_columns()
        with _gc_paused():
            return _summary_rows(columns)

    def _summary_columns(self, *, repair: bool = True) -> list[Sequence[Any]]:
        """``iter_summaries`` as columns: ``EntrySummary``'s fields in order, one sequence each.

        What ``pipe cache ls`` reads (``twinklr_pipe._listing``): it filters, sorts and
        formats 100,000 entries column by column, never building a row. With ``repair``,
        a ``Summaries`` table it could not trust (rows missing, values of the wrong type)
        is made again afterwards (best effort), so that the next listings read it.

        Raises:
            StoreError: the database is damaged or closed, or SQLite fails.
        """
        action = "list the cache entries"
        cache = self._scanner(action)
        con = _connection(cache)
        with _gc_paused():
            try:
                # odd: keys without a usable summary tag
                columns, odd, from_table = _read_summaries(con)
            except sqlite3.Error as exc:
                raise self._scan_failed(exc, action) from exc
        if repair and not from_table and self._has_summaries:
            self._make_summaries(cache)
        if not odd:
            return columns
        try:
            if len(odd) <= _UNSUMMARIZED_BY_KEY:
                one = (con.execute(_META_ROW_SQL, (key,)).fetchone() for key in odd)
                rows = [row for row in one if row is not None]  # None: deleted meanwhile
            else:
                wanted = set(odd)
                rows = [r for r in con.execute(_UNSUMMARIZED_SQL).fetchall() if r[0] in wanted]
        except sqlite3.Error as exc:
            raise self._scan_failed(exc, action) from exc
        metas = self._decode_page([(None, *row) for row in rows])
        skipped = len(rows) - len(metas)
        if skipped:
            _log.warning(
                "Skipped %d unreadable cache entries in %s; the next lookup of each removes it",
                skipped,
                self._store_dir,
            )
        decoded = _columns_of([EntrySummary.of(meta) for meta in metas])
        return [[*column, *more] for column, more in zip(columns, decoded, strict=True)]

    def size(self) -> int:
        """Total size in bytes of the stored payloads (one query).

        Raises:
            StoreError: the database is damaged or closed, or SQLite fails.
        """
        self._settle()
        action = "measure the cache"
        cache = self._scanner(action)
        try:
            total = _connection(cache).execute(_SIZE_SQL).fetchone()[0]
        except sqlite3.Error as exc:
            raise self._scan_failed(exc, action) from exc
        return int(total)

    def _warn_corrupt(self, meta: EntryMeta | None, entry: str, problem: str) -> None:
        _log.warning(
            "Discarded a corrupt cache entry of %s in %s: %s; it will be computed again",
            _describe(meta, entry),
            self._store_dir,
            problem,
        )

    def _evict_if_unchanged(
        self,
        cache: diskcache.Cache,
        meta_key: str,
        payload_key: str | None,
        seen: Sequence[_Row],
    ) -> bool:
        """Delete a corrupt entry, unless another writer replaced it since it was read.

        Returns False only when the rows changed (the caller may read again); True when
        they were deleted, or could not be (best effort: the next read retries).
        """
        stale: list[str | None] = []
        try:
            with cache.transact():
                con = _connection(cache)
                if payload_key is None:  # only the metadata row was compared
                    current = con.execute(_META_ROW_SQL, (meta_key,)).fetchall()
                else:
                    current = con.execute(_ENTRY_SQL, (meta_key, payload_key)).fetchall()
                if {row[0]: row for row in current} != {row[0]: row for row in seen}:
                    return False
                entry = meta_key[len(_META) :]
                both = (_META + entry, _PAYLOAD + entry)
                stale = [name for (name,) in con.execute(_FILENAMES_SQL, both)]
                con.execute(_DELETE_SQL, both)
        except (sqlite3.Error, diskcache.Timeout, OSError) as exc:
            _rollback(cache)
            if _is_damage(exc):
                self._mark_damaged(exc)
            _log.debug("Could not delete corrupt cache entry %s: %s", meta_key, exc)
            return True
        self._remove_files(stale)
        return True

    # -- writing -----------------------------------------------------------------

    def put(self, meta: EntryMeta, payload: bytes) -> None:
        """Store an entry atomically, replacing one with the same entry id.

        Fills ``payload_checksum`` (when empty) and ``size_bytes``. When ``key`` already
        has ``MAX_VARIANTS`` other variants, the least recently used ones are deleted in
        the same transaction. Large values are written to files before the transaction,
        and replaced files removed after it commits.

        Raises:
            TypeError: ``payload`` is not ``bytes``.
            ValueError: the key or variant is empty, or ``payload_checksum`` is wrong.
            StoreError: the store cannot be written (see ``_writing``).
        """
        self._put(meta, payload, wait=True)

    def try_put(self, meta: EntryMeta, payload: bytes) -> bool:
        """``put``, but only when that needs no waiting; return whether it stored the entry.

        It stores nothing and returns False when the payload or metadata would go to a
        value file (file I/O), or when another connection holds the database's write
        lock (instead of waiting up to ``timeout``): call ``put`` from a worker thread
        then. The executor calls this on its event loop, which saves a round trip to a
        thread for every small entry.

        Raises:
            TypeError, ValueError, StoreError: as ``put``.
        """
        if self._live is None:
            return False  # damaged or closed: ``put`` raises the StoreError that says so
        limit = self._disk.min_file_size
        if len(payload) + _META_ROOM >= limit:
            return False
        return self._put(meta, payload, wait=False)

    def _put(self, meta: EntryMeta, payload: bytes, *, wait: bool) -> bool:
        meta = _checked_for_put(meta, payload)
        data = _dump_meta(meta)
        entry = meta.entry_id
        self._prefetched.rows = None
        with self._writing(f"store the entry of {_describe(meta, entry)}") as cache:
            if not wait and len(data) >= self._disk.min_file_size:
                return False
            new_files: list[str | None] = []
            old_files: list[str | None] = []
            committed = False
            try:
                meta_columns = self._disk.store(data, False)
                new_files.append(meta_columns[2])
                payload_columns = self._disk.store(payload, False)
                new_files.append(payload_columns[2])
                with self._transaction(cache, wait) as con:
                    if con is None:
                        return False  # the write lock is taken: the caller waits in a thread
                    self._write_entry(
                        con, meta, meta_columns, payload_columns, time.time(), old_files
                    )
                committed = True
            finally:
                if not committed:
                    self._remove_files(new_files)
            self._remove_files(old_files)
        return True

    @contextlib.contextmanager
    def _transaction(
        self, cache: diskcache.Cache, wait: bool
    ) -> Iterator[sqlite3.Connection | None]:
        """diskcache's write transaction on this thread's connection.

        With ``wait`` False, SQLite's busy timeout is 0 while the transaction begins,
        and a database locked by another connection yields None instead of a connection.
        """
        con = _connection(cache)
        if wait:
            with cache.transact():
                yield con
            return
        began = contextlib.ExitStack()
        locked = False
        con.execute("PRAGMA busy_timeout = 0")
        try:
            began.enter_context(cache.transact())
        except diskcache.Timeout:
            locked = True
        finally:
            con.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        if locked:
            yield None
            return
        with began:
            yield con

    # -- warm-up: what a pipeline's last run used, read in one statement ---------------

    def remember_run(self, pipeline: str, entry_ids: Sequence[str]) -> None:
        """Record the entries a run of ``pipeline`` used, for the next run's ``warm_up``.

        One row (``w/<hash of the name>``, never listed as an entry) holding the last
        ``_WARM_MAX`` ids; it is only a hint: ``warm_up`` reads the entries themselves.

        Raises:
            StoreError: the store cannot be written.
        """
        ids = list(dict.fromkeys(entry_ids))[-_WARM_MAX:]
        data = json.dumps(ids, separators=(",", ":")).encode()
        key = _WARM + xxhash.xxh3_128_hexdigest(pipeline.encode())
        with self._writing(f"record the entries of a run of '{pipeline}'") as cache:
            old_files: list[str | None] = []
            with cache.transact():
                con = _connection(cache)
                # Inline whatever its size (one read at the next run's start).
                _write_row(con, key, (0, _MODE_RAW, None, data), time.time(), old_files)
            self._remove_files(old_files)

    def warm_up(self, pipeline: str) -> dict[str, list[tuple[EntryHead, bytes]]]:
        """The entries the last run of ``pipeline`` used, by key, read in one statement.

        What ``_hit_candidates`` answers for each of those keys (only entries whose rows
        are ordinary, with small payloads that pass their checksum), without one query
        per key. Every other variant of the keys is left out: a lookup that finds no
        usable one here asks the database. Empty when there is no record, or on any error.
        """
        cache = self._reader()
        if cache is None:
            return {}
        key = _WARM + xxhash.xxh3_128_hexdigest(pipeline.encode())
        try:
            con = _connection(cache)
            row = con.execute(_META_ROW_SQL, (key,)).fetchone()
            if row is None or row[1] != _MODE_RAW or type(row[3]) is not bytes:
                return {}
            rows = con.execute(_WARM_SQL, (row[3].decode(),)).fetchall()
        except (sqlite3.Error, UnicodeDecodeError):
            return {}
        warm: dict[str, list[tuple[EntryHead, bytes]]] = {}
        kept = 0
        for head, payload in _heads(rows, None, skip=True) or ():
            kept += len(payload)
            if kept > _WARM_BYTES:
                break
            warm.setdefault(head.key, []).append((head, payload))
        return warm

    def known_keys(self, limit: int) -> set[str] | None:
        """The keys of every stored entry (waiting ones included), if there are few.

        One scan of the key index; None when the store holds more than about ``limit``
        entries (diskcache's row count says so without a scan), or on any error. A run
        skips the lookup of a key that is not among them: it is a miss unless another
        process stored it since, and then computing it again is harmless.
        """
        cache = self._reader()
        if cache is None:
            return None
        try:
            con = _connection(cache)
            (rows,) = con.execute(_ROW_COUNT_SQL).fetchone() or (None,)
            if type(rows) is not int or rows > 2 * limit:
                return None
            keys = {key for (key,) in con.execute(_KEYS_SQL)}
        except sqlite3.Error:
            return None
        if self._pending:
            with self._pending_lock:
                keys.update(self._pending_keys)
        return keys

    # -- pending entries (see ``_pending``) ----------------------------------------

    def put_pending(self, meta: EntryMeta, payload: bytes) -> bool:
        """Store a small entry without waiting for the database; return whether it did.

        The entry is appended to this store's pending log with one ``write`` (from then
        on it survives a crash of the process) and served from memory by this store at
        once; a background thread moves it into the database within ``_FLUSH_EVERY``
        seconds (``flush`` does it now). Other processes see it from then on. It
        declines (False, nothing stored) for a payload or metadata that would go to a
        value file, in a forked child, while ``_PENDING_MAX`` entries wait, and after
        the log failed; use ``try_put`` or ``put`` then.

        Raises:
            TypeError, ValueError: as ``put``.
            StoreError: the log cannot be created or written (disk full...).
        """
        if self._live is None or self._log_off or os.getpid() != self._pid:
            return False  # damaged or closed (``put`` says so), or not ours to append to
        limit = self._disk.min_file_size
        if len(payload) + _META_ROOM >= limit:
            return False
        meta = _checked_for_put(meta, payload)
        data = _dump_meta(meta)
        if len(data) + len(payload) >= limit:
            return False
        entry = meta.entry_id
        record = encode_record(data, payload)
        with self._pending_lock:
            if len(self._pending) >= _PENDING_MAX or self._stopping:
                return False
            try:
                log = self._log
                if log is None:
                    log = self._log = PendingLog(self.directory)
                log.append(record)
            except OSError as exc:
                if self._log is not None and self._log.broken:
                    self._log_off = True
                raise StoreError(
                    f"Cannot store the entry of {_describe(meta, entry)} in cache directory "
                    f"{self.directory}: {exc}"
                ) from exc
            self._pending[entry] = (meta, data, payload)
            self._pending_keys.setdefault(meta.key, set()).add(entry)
            waiting = len(self._pending)
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="twinklr-pipe-cache-flush", daemon=True
                )
                self._flusher.start()
        if waiting >= _FLUSH_AT:
            self._wake.set()
        return True

    def flush(self) -> None:
        """Move the entries waiting in the pending log into the database (one transaction).

        Raises:
            StoreError: the database cannot be written; the entries keep waiting (in
                memory and in the log, which the next store to open the directory reads
                if this process ends first).
        """
        if os.getpid() != self._pid:
            return  # a forked child: what waits, and the log, are its parent's
        with self._flush_lock:
            with self._pending_lock:
                batch = list(self._pending.items())
            if not batch:
                return
            failure: StoreError | None = None
            try:
                self._write_batch([item for _, item in batch])
            except StoreError:
                # One entry at a time, so that one the database refuses does not hold
                # back the others; what fails keeps waiting.
                stored = []
                for entry, item in batch:
                    try:
                        self._write_batch([item])
                    except StoreError as exc:
                        failure = failure or exc
                    else:
                        stored.append((entry, item))
                batch = stored
            with self._pending_lock:
                for entry, item in batch:
                    if self._pending.get(entry) is item:
                        del self._pending[entry]
                        entries = self._pending_keys[item[0].key]
                        entries.discard(entry)
                        if not entries:
                            del self._pending_keys[item[0].key]
                if not self._pending and self._log is not None:
                    try:
                        self._log.clear()
                    except OSError:
                        self._log_off = True  # its records are stored: reading them is harmless
            if failure is not None:
                raise failure

    def _write_batch(self, items: Sequence[tuple[EntryMeta, bytes, bytes]]) -> None:
        """Write entries (metadata, its JSON, payload: all small) in one transaction."""
        what = (
            f"store the entry of {_describe(items[0][0], items[0][0].entry_id)}"
            if len(items) == 1
            else f"store {len(items)} cache entries"
        )
        with self._writing(what) as cache:
            old_files: list[str | None] = []
            with cache.transact():
                con = _connection(cache)
                now = time.time()
                # Keys with no row yet (the usual case) take two INSERT statements for the
                # whole batch; a key with rows (other variants to cap, a row to replace)
                # or twice in the batch takes the way ``put`` goes.
                counts: dict[str, int] = {}
                for meta, _, _ in items:
                    counts[meta.key] = counts.get(meta.key, 0) + 1
                taken = {key for (key,) in con.execute(_TAKEN_SQL, (json.dumps(list(counts)),))}
                fresh: list[tuple[EntryMeta, bytes, bytes]] = []
                others: list[tuple[EntryMeta, bytes, bytes]] = []
                for item in items:
                    key = item[0].key
                    (fresh if counts[key] == 1 and key not in taken else others).append(item)
                # In small chunks: the statements hand the GIL over while SQLite works, so
                # the event loop's thread never waits long for this one.
                for start in range(0, len(fresh), _ROWS_PER_INSERT // 2):
                    chunk = fresh[start : start + _ROWS_PER_INSERT // 2]
                    summaries = [_summary_values(meta) for meta, _, _ in chunk]
                    _insert_rows(con, _fresh_rows(chunk, summaries, now))
                    if self._has_summaries:
                        _insert_summaries(con, summaries)
                for meta, data, payload in others:
                    self._write_entry(
                        con,
                        meta,
                        self._disk.store(data, False),
                        self._disk.store(payload, False),
                        now,
                        old_files,
                    )
            self._remove_files(old_files)

    def _write_entry(
        self,
        con: sqlite3.Connection,
        meta: EntryMeta,
        meta_columns: _Columns,
        payload_columns: _Columns,
        now: float,
        old_files: list[str | None],
    ) -> None:
        """Within a write transaction: both rows of one entry, as ``put`` writes them.

        First the key's other variants over the cap go, and whether this entry is new is
        known (then its rows are inserted without a lookup).
        """
        entry = meta.entry_id
        new = not self._drop_old_variants(con, meta, old_files)
        summary = _summary_values(meta)
        _write_row(
            con,
            _META + entry,
            meta_columns,
            now,
            old_files,
            _tag_of(summary),
            meta.last_used_at,
            new=new,
        )
        if self._has_summaries:
            _insert_summaries(con, [summary])
        _write_row(con, _PAYLOAD + entry, payload_columns, now, old_files, new=new)

    def _flush_loop(self) -> None:
        """The background thread: a batch every ``_FLUSH_EVERY`` seconds, or when woken.

        It ends once nothing waits (``put_pending`` starts another), closing and deleting
        the empty log: an idle store holds no thread and no file.
        """
        while not self._stopping:
            self._wake.wait(_FLUSH_EVERY)
            self._wake.clear()
            if self._stopping:
                return
            with self._pending_lock:
                if not self._pending:
                    self._flusher = None
                    log, self._log = self._log, None
                    if log is not None:
                        log.close(remove=log.empty)
                    return
            try:
                self.flush()
            except StoreError as exc:
                # They keep waiting; ``flush`` at the end of the run reports the failure.
                _log.debug("Cannot move pending cache entries into the database: %s", exc)
                self._wake.wait(_FLUSH_EVERY * 10)
            except Exception:  # never die silently with entries waiting
                _log.exception("Moving pending cache entries into the database failed")
                self._wake.wait(_FLUSH_EVERY * 10)

    def _settle(self) -> None:
        """Before reading or changing the whole store: move pending entries in first."""
        if not self._pending:
            return
        try:
            self.flush()
        except StoreError as exc:
            # Reported by ``flush`` at the end of the run; they wait for the next open.
            _log.debug("Cannot move pending cache entries into the database: %s", exc)

    def _pending_entry(self, entry_id: str) -> tuple[EntryMeta, bytes, bytes] | None:
        if not self._pending:
            return None
        with self._pending_lock:
            return self._pending.get(entry_id)

    def _close_pending(self) -> None:
        """Stop the background thread, store what waits, and close (or leave) the log."""
        with self._pending_lock:
            self._stopping = True  # put_pending declines from now on
            flusher, self._flusher = self._flusher, None
        if flusher is not None and flusher is not threading.current_thread():
            self._wake.set()
            flusher.join()
        if os.getpid() != self._pid:
            return  # a forked child: the log is its parent's
        self._settle()
        log, self._log = self._log, None
        if log is not None:
            # Entries the database refused stay in the log for the next open.
            log.close(remove=not self._pending and log.empty)

    def _ingest_orphans(self) -> None:
        """Move the entries of logs left by stores that are gone into the database."""
        if self._live is None:
            return  # a damaged database: the logs wait for the rebuilt one
        for path, raw in claim_orphans(self.directory):
            items: list[tuple[EntryMeta, bytes, bytes]] = []
            for data, payload in parse_records(raw):
                try:
                    meta = EntryMeta.model_validate_json(data)
                    if not meta.key or meta.payload_checksum != xxhash.xxh3_128_hexdigest(payload):
                        continue
                except ValidationError:
                    continue
                items.append((meta, data, payload))
            try:
                if items:
                    self._write_batch(items)
            except StoreError as exc:
                # A run on this store reports failing writes (once); the log waits.
                _log.debug("Cannot move the pending cache entries of %s in: %s", path, exc)
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _drop_old_variants(
        self, con: sqlite3.Connection, meta: EntryMeta, old_files: list[str | None]
    ) -> bool:
        """Within ``put``'s transaction: delete the least recently used variants over the cap.

        Returns whether the metadata row of ``meta``'s own entry exists.
        """
        low, high = _META + meta.key + ".", _META + meta.key + "/"
        ranked: list[tuple[tuple[float, float, str], str]] = []
        exists = False
        for row in con.execute(_RANGE_SQL, (low, high)).fetchall():
            entry = row[0][len(_META) :]
            if entry == meta.entry_id:
                exists = True
                continue
            try:
                other = self._decode_meta(row, entry)
            except (_CorruptRow, OSError):
                ranked.append(((float("-inf"), float("-inf"), ""), entry))  # corrupt: first
                continue
            if other.key == meta.key:
                ranked.append((_recency(other), entry))
        excess = len(ranked) + 1 - MAX_VARIANTS
        if excess > 0:
            ranked.sort()
            for _, entry in ranked[:excess]:
                _delete_rows(con, entry, old_files)
        return exists

    def delete(self, entry_id: str) -> bool:
        """Remove an entry; return whether it existed.

        Raises:
            StoreError: the store cannot be written.
        """
        self._settle()
        forgotten = self._forget_pending(entry_id)
        old_files: list[str | None] = []
        self._prefetched.rows = None
        with self._writing(f"delete the entry of key {entry_id[:8]}") as cache:
            with cache.transact():
                existed = _delete_rows(_connection(cache), entry_id, old_files)
            self._remove_files(old_files)
        return existed or forgotten

    def _forget_pending(self, entry_id: str) -> bool:
        """Drop a pending entry that ``flush`` could not store (deleting it)."""
        if not self._pending:
            return False
        with self._pending_lock:
            item = self._pending.pop(entry_id, None)
            if item is None:
                return False
            entries = self._pending_keys[item[0].key]
            entries.discard(entry_id)
            if not entries:
                del self._pending_keys[item[0].key]
            return True

    def touch(self, entry_ids: Iterable[str], when: float) -> None:
        """Record a use of the given entries at ``when``, in one transaction.

        One ``UPDATE`` of the ``access_time`` column per entry (the metadata record is
        not rewritten): ``last_used_at`` becomes ``when`` unless it is already later.
        Missing entries are ignored.

        Raises:
            StoreError: the store cannot be written.
        """
        when = float(when)
        params = [(when, _META + entry) for entry in sorted(set(entry_ids))]
        if not params:
            return
        self._settle()
        with self._writing(f"record the use of {len(params)} cache entries") as cache:
            with cache.transact():
                _connection(cache).executemany(_TOUCH_SQL, params)

    # -- locks and closing ----------------------------------------------------------

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        name = (
            key
            if _SAFE_LOCK_NAME.fullmatch(key)
            else "h-" + xxhash.xxh3_128_hexdigest(key.encode())
        )
        locks = self.directory / _LOCKS_NAME
        try:
            locks.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"Cannot lock cache key {key[:8]} in {locks}: {exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # e.g. ENOLCK on a network file system
                raise StoreError(f"Cannot lock cache key {key[:8]} in {locks}: {exc}") from exc
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def lock(self, key: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock on ``key`` across processes and threads (blocking).

        A ``flock`` on ``locks/<key>.lock``, taken on entering and released on exit. Not
        reentrant: a holder that takes it again waits forever. Lock files are kept
        (deleting one while another process waits on it would break the exclusion).

        Raises:
            StoreError: (on entering) the lock file cannot be created or locked.
        """
        return self._key_lock(key)

    def close(self) -> None:
        """Close the database and release the store lock. Later calls raise StoreError.

        Dropping the ``diskcache.Cache`` frees every thread's SQLite connection, not only
        the calling thread's (which ``Cache.close`` closes).
        """
        if self._closed:
            return
        self._close_pending()
        self._closed = True
        cache, self._cache, self._live = self._cache, None, None
        if cache is not None:
            cache.close()
            del cache
        self._release_store_lock()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while decoding one page of metadata.

    Each EntryMeta holds several containers; while a caller collects 100,000 of them the
    collector runs over a thousand times and triples the cost of listing. Paused per
    page (milliseconds), it runs once per page instead. Not re-enabled if it was off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _rollback(cache: diskcache.Cache) -> None:
    """Roll back a transaction a failed COMMIT may have left open on this connection."""
    with contextlib.suppress(Exception):
        con = _connection(cache)
        if con.in_transaction:
            con.execute("ROLLBACK")


def _write_row(
    con: sqlite3.Connection,
    key: str,
    columns: _Columns,
    now: float,
    old_files: list[str | None],
    tag: str | None = None,
    used: float | None = None,
    *,
    new: bool = False,
) -> None:
    """Insert or replace one row, as ``Cache.set`` does; its old file goes to ``old_files``.

    ``tag`` and ``used`` (the access_time, default ``now``) are set for metadata rows.
    ``new``: the row is most likely absent, so it is inserted without a lookup first
    (a row that is there after all, a leftover, is then replaced as usual).
    """
    size, mode, filename, value = columns
    access = now if used is None else float(used)
    if new:
        try:
            con.execute(_INSERT_SQL, (key, now, access, tag, size, mode, filename, value))
        except sqlite3.IntegrityError:
            pass  # (key, raw) is taken: replace that row below
        else:
            return
    found = con.execute(_ROW_SQL, (key,)).fetchone()
    if found is None:
        con.execute(_INSERT_SQL, (key, now, access, tag, size, mode, filename, value))
    else:
        old_files.append(found[1])
        con.execute(_UPDATE_SQL, (now, access, tag, size, mode, filename, value, found[0]))


def _fresh_rows(
    items: Sequence[tuple[EntryMeta, bytes, bytes]],
    summaries: Sequence[tuple[Any, ...]],
    now: float,
) -> list[tuple[Any, ...]]:
    """``_INSERT_SQL`` parameters of both rows of entries whose keys have no row yet.

    ``summaries``: each entry's ``_summary_values`` (its row key, tag and last use).
    """
    rows: list[tuple[Any, ...]] = [
        (summary[0], now, summary[_USED], _tag_of(summary), 0, _MODE_RAW, None, data)
        for (_, data, _), summary in zip(items, summaries, strict=True)
    ]
    rows += [
        (_PAYLOAD + meta.entry_id, now, now, None, 0, _MODE_RAW, None, payload)
        for meta, _, payload in items
    ]
    return rows


def _insert_rows(con: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert new rows (inside a transaction): the batch path of ``_write_row``.

    Up to ``_ROWS_PER_INSERT`` rows per statement: ``executemany`` would step once per
    row, handing the GIL back and forth with the event loop's thread each time.
    """
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        con.execute(
            _INSERT_MANY_SQL + ",".join([_INSERT_VALUES] * len(chunk)),
            [value for row in chunk for value in row],
        )


def _insert_summaries(con: sqlite3.Connection, summaries: Sequence[tuple[Any, ...]]) -> None:
    """Insert or replace ``Summaries`` rows (``_summary_values``), in one statement.

    Inside the transaction that writes the entries' rows of ``Cache``, after them (their
    triggers drop any row of the same entry).
    """
    if summaries:
        con.execute(
            _SUMMARIES_INSERT_SQL + ",".join([_SUMMARY_VALUES] * len(summaries)),
            [value for summary in summaries for value in summary],
        )


def _delete_rows(con: sqlite3.Connection, entry: str, old_files: list[str | None]) -> bool:
    keys = (_META + entry, _PAYLOAD + entry)
    names = [name for (name,) in con.execute(_FILENAMES_SQL, keys)]
    if not names:
        return False
    old_files.extend(names)
    con.execute(_DELETE_SQL, keys)
    return True


def _parse_marker(raw: bytes) -> tuple[int | None, str | None]:
    """Return ``(format, None)`` for a valid FORMAT marker, else ``(None, problem)``.

    A valid number newer than ours is returned even when the rest is wrong: refusing
    such a directory is safer than overwriting its marker.
    """
    try:
        data = json.loads(raw)
    except ValueError:
        return None, "not JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    found = data.get("format")
    if type(found) is not int or found < 1:
        return None, f"bad format number {found!r}"
    if found > CACHE_FORMAT_VERSION:
        return found, None
    if data.get("library") != _LIBRARY:
        return None, f"library is {data.get('library')!r}, not {_LIBRARY!r}"
    return found, None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as writer:
            writer.write(data)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
