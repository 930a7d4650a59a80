"""Entries on their way into the database: one append-only file per open store.

``DiskCacheStore.put_pending`` appends an entry to its store's log with one ``write``
and returns: from then on the entry survives a crash of the process (SIGKILL), as a
committed SQLite transaction does in WAL mode. A background thread of the store moves
the log's entries into the database in batches, one transaction per batch; the store
serves them from memory meanwhile. A log whose owner died (its ``flock`` is free) is an
orphan: the next store to open the directory moves its entries into the database.

Layout::

    <cache directory>/pending/           created 0o700 on first use
        <pid>-<token>.log                0o600, flock'ed by its owner while open

A log is a sequence of records, each::

    b"TPE1" | u32 body length | u64 xxh3_64 of the body | body
    body = u32 metadata length | metadata JSON | payload

A crash can cut the last record short; reading stops at the first record that is
short or fails its checksum, and everything before it is whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import xxhash

from ._layout import PENDING_DIR

__all__ = ["PendingLog", "claim_orphans", "encode_record", "parse_records"]

_MAGIC: Final = b"TPE1"
_HEAD: Final = struct.Struct("<4sIQ")
_LENGTH: Final = struct.Struct("<I")


def encode_record(data: bytes, payload: bytes) -> bytes:
    """One log record holding an entry's metadata JSON (``data``) and its payload."""
    body = _LENGTH.pack(len(data)) + data + payload
    return _HEAD.pack(_MAGIC, len(body), xxhash.xxh3_64_intdigest(body)) + body


def parse_records(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The whole records at the start of a log, as ``(metadata JSON, payload)`` pairs."""
    records: list[tuple[bytes, bytes]] = []
    view = memoryview(raw)
    at, end = 0, len(raw)
    while at + _HEAD.size <= end:
        magic, length, check = _HEAD.unpack_from(view, at)
        body_at = at + _HEAD.size
        if magic != _MAGIC or body_at + length > end or length < _LENGTH.size:
            break
        body = bytes(view[body_at : body_at + length])
        if xxhash.xxh3_64_intdigest(body) != check:
            break
        (meta_length,) = _LENGTH.unpack_from(body)
        if _LENGTH.size + meta_length > length:
            break
        records.append(
            (
                body[_LENGTH.size : _LENGTH.size + meta_length],
                body[_LENGTH.size + meta_length :],
            )
        )
        at = body_at + length
    return records


class PendingLog:
    """The log of one open store: created on first use, locked while open."""

    def __init__(self, directory: Path) -> None:
        """Create a new log in ``directory/pending`` and lock it.

        Raises:
            OSError: the directory or the file cannot be created or locked.
        """
        folder = directory / PENDING_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        self.path = folder / f"{os.getpid()}-{secrets.token_hex(6)}.log"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise
        self._size = 0
        #: Set when a failed append could not be cut off: append no more.
        self.broken = False

    def append(self, record: bytes) -> None:
        """Append one record. A failed write is cut back off, so the log stays readable.

        Raises:
            OSError: the write failed (disk full...). If cutting the partial record off
                failed too, ``broken`` is set: the log must not be appended to again.
        """
        view = memoryview(record)
        written = 0
        try:
            while written < len(record):
                written += os.write(self._fd, view[written:])
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self.broken = True
            raise
        self._size += written

    def clear(self) -> None:
        """Empty the log (its entries are all in the database)."""
        os.ftruncate(self._fd, 0)
        self._size = 0

    @property
    def empty(self) -> bool:
        return self._size == 0

    def close(self, *, remove: bool) -> None:
        """Close (and with ``remove``, delete) the log, releasing its lock."""
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self._fd)


def claim_orphans(directory: Path) -> Iterator[tuple[Path, bytes]]:
    """``(path, content)`` of each log in ``directory/pending`` whose owner is gone.

    Each log is locked while the caller handles it (between two iterations): the caller
    moves its entries into the database and then deletes the file. A log another store
    holds is skipped; one deleted meanwhile too.
    """
    folder = directory / PENDING_DIR
    try:
        names = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        if not name.endswith(".log"):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its store is open (in this process or another)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            yield path, b"".join(chunks)
        finally:
            os.close(fd)
