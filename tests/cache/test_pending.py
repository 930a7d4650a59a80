"""The pending log: small entries stored with one write, moved into the database in
batches, and never lost or half-read after a crash."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from twinklr_pipe.cache import _pending, _store
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import DiskCacheStore
from twinklr_pipe.errors import StoreError

KEY = "5e1f" + "0" * 28


def meta_for(payload: bytes, key: str = KEY, variant: str = "0") -> EntryMeta:
    return EntryMeta(
        key=key,
        variant=variant,
        stage_id="parse",
        codec="json/1",
        payload_checksum=xxhash.xxh3_128_hexdigest(payload),
        size_bytes=len(payload),
        created_at=1000.0,
        last_used_at=1000.0,
    )


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskCacheStore]:
    # Batches only when asked (flush), so the tests see entries while they wait.
    monkeypatch.setattr(_store, "_FLUSH_EVERY", 3600.0)
    made = DiskCacheStore(tmp_path / "c")
    yield made
    made.close()


def in_database(directory: Path, entry_id: str) -> bool:
    """Whether another store (as another process would) finds the entry."""
    other = DiskCacheStore(directory)
    try:
        return other.get(entry_id) is not None
    finally:
        other.close()


def logs(directory: Path) -> list[Path]:
    return sorted((directory / "pending").glob("*.log"))


class TestPutPending:
    def test_served_at_once_and_stored_by_flush(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"one")
        assert disk.put_pending(meta, b"one") is True
        got = disk.get(meta.entry_id)
        assert got is not None and got[1] == b"one"
        assert disk.get_meta(meta.entry_id) == got[0]
        assert [m.entry_id for m in disk.variants(KEY)] == [meta.entry_id]
        assert disk._hit_candidates(KEY) is None  # the full path merges waiting entries
        assert not in_database(disk.directory, meta.entry_id)
        assert logs(disk.directory) != []
        disk.flush()
        assert in_database(disk.directory, meta.entry_id)
        candidates = disk._hit_candidates(KEY)
        assert candidates is not None and [p for _, p in candidates] == [b"one"]

    def test_whole_store_reads_see_waiting_entries(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"two")
        disk.put_pending(meta, b"two")
        assert [m.entry_id for m in disk.iter_metadata()] == [meta.entry_id]
        assert [s.entry_id for s in disk.iter_summaries()] == [meta.entry_id]
        assert disk.size() == 3

    def test_delete_removes_a_waiting_entry(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"gone")
        disk.put_pending(meta, b"gone")
        assert disk.delete(meta.entry_id) is True
        assert disk.get(meta.entry_id) is None
        disk.flush()
        assert not in_database(disk.directory, meta.entry_id)

    def test_close_stores_what_waits_and_removes_the_log(self, tmp_path: Path) -> None:
        store = DiskCacheStore(tmp_path / "c")
        meta = meta_for(b"kept")
        store.put_pending(meta, b"kept")
        store.close()
        assert logs(tmp_path / "c") == []
        assert in_database(tmp_path / "c", meta.entry_id)

    def test_an_idle_store_keeps_no_thread_and_no_log(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_store, "_FLUSH_EVERY", 0.01)
        store = DiskCacheStore(tmp_path / "c")
        meta = meta_for(b"soon")
        store.put_pending(meta, b"soon")
        deadline = time.monotonic() + 10
        while (store._flusher is not None or logs(tmp_path / "c")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store._flusher is None and logs(tmp_path / "c") == []
        assert in_database(tmp_path / "c", meta.entry_id)
        assert store.put_pending(meta_for(b"again", variant="1"), b"again")  # starts again
        store.close()
        assert not [t for t in threading.enumerate() if t.name == "twinklr-pipe-cache-flush"]

    def test_declines_what_put_must_store(
        self, disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        big = b"x" * 2**16
        assert disk.put_pending(meta_for(big), big) is False  # a value file
        monkeypatch.setattr(_store, "_PENDING_MAX", 1)
        assert disk.put_pending(meta_for(b"a", variant="a"), b"a") is True
        assert disk.put_pending(meta_for(b"b", variant="b"), b"b") is False  # full
        monkeypatch.setattr(disk, "_pid", -1)  # as in a forked child
        monkeypatch.setattr(_store, "_PENDING_MAX", 100)
        assert disk.put_pending(meta_for(b"c", variant="c"), b"c") is False

    def test_a_failed_append_is_cut_off_and_reported(
        self, disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Disk full halfway through a record: StoreError, the partial record removed, the
        log still usable, and the entry not served."""
        disk.put_pending(meta_for(b"first", variant="1"), b"first")
        real_write = os.write
        calls = [0]

        def half_then_full(fd: int, data: Any) -> int:
            calls[0] += 1
            if calls[0] == 1:
                return real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(_pending.os, "write", half_then_full)
        meta = meta_for(b"second", variant="2")
        with pytest.raises(StoreError, match="No space left on device"):
            disk.put_pending(meta, b"second")
        monkeypatch.undo()
        assert disk.get(meta.entry_id) is None
        (log,) = logs(disk.directory)
        assert len(_pending.parse_records(log.read_bytes())) == 1  # no torn record left
        assert disk.put_pending(meta_for(b"third", variant="3"), b"third") is True
        assert len(_pending.parse_records(log.read_bytes())) == 2


class TestBatches:
    def test_a_batch_keeps_the_variant_cap_and_replaces_entries(self, disk: DiskCacheStore) -> None:
        """New keys take the batch insert; keys with rows, or twice in the batch, take
        ``put``'s way: at most four variants per key, and an entry id stored again is
        replaced."""
        for i in range(4):
            disk.put(meta_for(b"v%d" % i, variant=f"v{i}"), b"v%d" % i)
        replaced = meta_for(b"new", key="a" * 32)
        disk.put(meta_for(b"old", key="a" * 32), b"old")
        disk.put_pending(meta_for(b"v4", variant="v4"), b"v4")  # a fifth variant
        disk.put_pending(replaced, b"new")
        disk.put_pending(meta_for(b"b1", key="b" * 32, variant="1"), b"b1")
        disk.put_pending(meta_for(b"b2", key="b" * 32, variant="2"), b"b2")  # twice
        disk.put_pending(meta_for(b"c", key="c" * 32), b"c")  # a fresh key
        disk.flush()
        with DiskCacheStore(disk.directory) as other:
            assert len(other.variants(KEY)) == 4
            assert "v4" in {m.variant for m in other.variants(KEY)}
            got = other.get(replaced.entry_id)
            assert got is not None and got[1] == b"new"
            assert {m.variant for m in other.variants("b" * 32)} == {"1", "2"}
            assert other.get(meta_for(b"c", key="c" * 32).entry_id) is not None
            summaries = {s.entry_id: s for s in other.iter_summaries()}
            assert summaries[replaced.entry_id].size_bytes == 3
            assert len(summaries) == 4 + 1 + 2 + 1


class TestRecords:
    def test_round_trip_and_torn_tails(self) -> None:
        records = [(b'{"a":1}', b"payload"), (b"{}", b""), (b'{"b":2}', bytes(range(256)))]
        raw = b"".join(_pending.encode_record(m, p) for m, p in records)
        assert _pending.parse_records(raw) == records
        for cut in range(len(raw)):
            whole = _pending.parse_records(raw[:cut])
            assert whole == records[: len(whole)]
        flipped = bytearray(raw)
        flipped[len(raw) - 3] ^= 0x01
        assert _pending.parse_records(bytes(flipped)) == records[:2]


ORPHAN_SCRIPT = """
import os, signal, sys, xxhash
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import DiskCacheStore
from twinklr_pipe.cache import _store
_store._FLUSH_EVERY = 3600.0
store = DiskCacheStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    payload = b"value-%d" % i
    store.put_pending(EntryMeta(key="%032x" % i, codec="json/1",
                                payload_checksum=xxhash.xxh3_128_hexdigest(payload),
                                size_bytes=len(payload)), payload)
if sys.argv[3] == "torn":  # a record cut short by the crash
    os.write(store._log._fd, b"TPE1\\x40\\x00\\x00\\x00")
os.kill(os.getpid(), signal.SIGKILL)
"""


class TestOrphans:
    @pytest.mark.parametrize("tail", ["whole", "torn"])
    def test_a_killed_writers_log_is_read_by_the_next_open(
        self, tmp_path: Path, tail: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        directory = tmp_path / "c"
        done = subprocess.run(
            [sys.executable, "-c", ORPHAN_SCRIPT, str(directory), "20", tail], check=False
        )
        assert done.returncode == -signal.SIGKILL
        assert len(logs(directory)) == 1
        with DiskCacheStore(directory) as store:
            assert logs(directory) == []
            for i in range(20):
                got = store.get(f"{i:032x}.0")
                assert got is not None and got[1] == b"value-%d" % i
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_a_live_stores_log_is_left_alone(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"mine")
        disk.put_pending(meta, b"mine")
        assert not in_database(disk.directory, meta.entry_id)  # not claimed by that open
        assert len(logs(disk.directory)) == 1


class TestFork:
    def test_a_forked_child_leaves_its_parents_entries_and_log_alone(
        self, disk: DiskCacheStore
    ) -> None:
        meta = meta_for(b"parent's")
        disk.put_pending(meta, b"parent's")
        (log,) = logs(disk.directory)
        size = log.stat().st_size
        pid = os.fork()
        if pid == 0:  # the child: whole-store reads, then close, then exit at once
            code = 0
            try:
                list(disk.iter_summaries())
                disk.close()
                code = 0 if log.stat().st_size == size else 3
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert log.stat().st_size == size  # not emptied by the child
        assert disk.get(meta.entry_id) is not None
        disk.flush()
        assert in_database(disk.directory, meta.entry_id)
