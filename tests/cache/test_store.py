"""The CacheStore contract, run on both stores, then what only DiskCacheStore promises."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import xxhash

from twinklr_pipe.cache import _store
from twinklr_pipe.cache._entry import CACHE_FORMAT_VERSION, CacheStore, EntryMeta, EntrySummary
from twinklr_pipe.cache._store import DiskCacheStore, MemoryStore
from twinklr_pipe.errors import CacheFormatError, StoreError

KEY = "3f9a1c2e" + "0" * 24
BIG = 2**16  # over diskcache's disk_min_file_size (32 KiB): stored in a file


def meta_for(
    payload: bytes,
    key: str = KEY,
    variant: str = "0",
    used: float = 1000.0,
    stage: str = "parse",
) -> EntryMeta:
    return EntryMeta(
        key=key,
        variant=variant,
        stage_id=stage,
        codec="json/1",
        payload_checksum=xxhash.xxh3_128_hexdigest(payload),
        size_bytes=len(payload),
        created_at=used,
        last_used_at=used,
        config_fields={"model": "m1"},
        metrics={"tokens": 12},
    )


def put(store: Any, payload: bytes = b"payload", **kwargs: Any) -> EntryMeta:
    meta = meta_for(payload, **kwargs)
    store.put(meta, payload)
    return meta


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made: Any = MemoryStore() if request.param == "memory" else DiskCacheStore(tmp_path / "c")
    yield made
    made.close()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[DiskCacheStore]:
    made = DiskCacheStore(tmp_path / "c")
    yield made
    made.close()


@pytest.fixture
def warnings_(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="twinklr_pipe")
    return caplog


def warning_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


class TestContract:
    """Every CacheStore behaves the same."""

    def test_is_a_cache_store(self, store: Any) -> None:
        """Both stores satisfy the runtime-checkable protocol."""
        assert isinstance(store, CacheStore)

    def test_round_trip(self, store: Any) -> None:
        """What is put comes back equal, metadata and payload."""
        meta = put(store, b"\x00binary\xff" * 10)
        found = store.get(meta.entry_id)
        assert found == (meta, b"\x00binary\xff" * 10)
        assert store.get_meta(meta.entry_id) == meta

    def test_big_and_empty_payloads_round_trip(self, store: Any) -> None:
        """Payloads stored in files and empty payloads come back whole."""
        big = os.urandom(BIG)
        meta_big = put(store, big, variant="big")
        meta_empty = put(store, b"", variant="empty")
        assert store.get(meta_big.entry_id) == (meta_big, big)
        assert store.get(meta_empty.entry_id) == (meta_empty, b"")

    def test_missing_entry_is_none(self, store: Any) -> None:
        """Unknown ids miss."""
        assert store.get("nope.0") is None
        assert store.get_meta("nope.0") is None
        assert store.variants("nope") == []

    def test_put_fills_checksum_and_size(self, store: Any) -> None:
        """A meta without checksum gets one, and size_bytes is the payload length."""
        store.put(EntryMeta(key=KEY, stage_id="parse"), b"12345")
        meta = store.get_meta(f"{KEY}.0")
        assert meta.payload_checksum == xxhash.xxh3_128_hexdigest(b"12345")
        assert meta.size_bytes == 5

    def test_put_rejects_a_wrong_checksum_and_non_bytes(self, store: Any) -> None:
        """A checksum that does not match the payload is a caller bug: nothing is stored."""
        meta = meta_for(b"one")
        with pytest.raises(ValueError, match="payload_checksum of the entry of stage 'parse'"):
            store.put(meta, b"two")
        with pytest.raises(TypeError, match="bytes"):
            store.put(meta, bytearray(b"one"))
        assert store.get(meta.entry_id) is None

    def test_put_replaces_the_same_entry_id(self, store: Any) -> None:
        """A second put of an id replaces the first."""
        put(store, b"old" * 20_000)
        meta = put(store, b"new", used=2000.0)
        assert store.get(meta.entry_id) == (meta, b"new")
        assert [m.variant for m in store.variants(KEY)] == ["0"]
        assert store.size() == 3

    def test_variants_most_recently_used_first(self, store: Any) -> None:
        """variants() orders by last_used_at, newest first, and only for that key."""
        for variant, used in [("a", 10.0), ("b", 30.0), ("c", 20.0)]:
            put(store, variant=variant, used=used)
        put(store, key=KEY + ".x", variant="z")  # entry id KEY.x.z: not a variant of KEY
        put(store, key="other", variant="a")
        assert [m.variant for m in store.variants(KEY)] == ["b", "c", "a"]
        assert [m.variant for m in store.variants(KEY + ".x")] == ["z"]

    def test_get_after_variants(self, store: Any) -> None:
        """The executor's hot path, variants() then get(), returns what a plain get() does."""
        small = put(store, b"small", variant="a", used=20.0)
        big = put(store, b"b" * BIG, variant="b", used=10.0)
        assert store.variants(KEY) == [small, big]
        assert store.get(small.entry_id) == (small, b"small")
        assert store.get(big.entry_id) == (big, b"b" * BIG)
        assert store.get(small.entry_id) == (small, b"small")

    def test_get_after_variants_and_delete_is_none(self, store: Any) -> None:
        """A write through the store between variants() and get() is seen by get()."""
        meta = put(store)
        assert store.variants(KEY) == [meta]
        store.delete(meta.entry_id)
        assert store.get(meta.entry_id) is None
        meta = put(store, b"again")
        assert store.variants(KEY) == [meta]
        put(store, b"replaced", used=3000.0)
        assert store.get(meta.entry_id)[1] == b"replaced"

    def test_a_fifth_variant_drops_the_least_recently_used(self, store: Any) -> None:
        """At most four variants per key; the new one is kept even if it is the oldest."""
        for index, variant in enumerate("abcd"):
            put(store, variant=variant, used=100.0 + index)
        put(store, variant="e", used=1.0)
        assert sorted(m.variant for m in store.variants(KEY)) == ["b", "c", "d", "e"]
        assert store.get(f"{KEY}.a") is None
        put(store, variant="f", used=500.0)  # now "e" is the least recently used
        assert sorted(m.variant for m in store.variants(KEY)) == ["b", "c", "d", "f"]

    def test_touch_sets_last_used(self, store: Any) -> None:
        """touch() updates last_used_at of existing entries and ignores missing ones."""
        put(store, variant="a", used=10.0)
        put(store, variant="b", used=20.0)
        store.touch([f"{KEY}.a", "missing.0"], 99.0)
        assert [(m.variant, m.last_used_at) for m in store.variants(KEY)] == [
            ("a", 99.0),
            ("b", 20.0),
        ]
        store.touch([], 5.0)

    def test_touch_decides_which_variant_is_dropped(self, store: Any) -> None:
        """A touched variant survives the cap; the untouched oldest goes."""
        for index, variant in enumerate("abcd"):
            put(store, variant=variant, used=100.0 + index)
        store.touch([f"{KEY}.a"], 900.0)
        put(store, variant="e", used=1000.0)
        assert sorted(m.variant for m in store.variants(KEY)) == ["a", "c", "d", "e"]

    def test_delete(self, store: Any) -> None:
        """delete() removes an entry and says whether it existed."""
        meta = put(store, b"x" * BIG)
        assert store.delete(meta.entry_id) is True
        assert store.delete(meta.entry_id) is False
        assert store.get(meta.entry_id) is None
        assert store.size() == 0

    def test_iter_metadata_and_size(self, store: Any) -> None:
        """iter_metadata() yields every entry once; size() sums the payloads."""
        metas = [put(store, b"p" * n, key=f"{n:032x}") for n in (0, 10, BIG)]
        assert sorted(store.iter_metadata(), key=lambda m: m.key) == metas
        assert store.size() == 10 + BIG

    def test_touch_is_seen_everywhere_and_only_moves_forward(self, store: Any) -> None:
        """After touch(), every read reports the new last_used_at; an older time is ignored."""
        a = put(store, variant="a", used=10.0)
        put(store, variant="b", used=20.0)
        store.touch([a.entry_id], 30.0)
        assert [m.variant for m in store.variants(KEY)] == ["a", "b"]
        assert store.get(a.entry_id)[0].last_used_at == 30.0
        assert store.get_meta(a.entry_id).last_used_at == 30.0
        assert store.get_meta(a.entry_id).created_at == 10.0
        used = {m.variant: m.last_used_at for m in store.iter_metadata()}
        assert used == {"a": 30.0, "b": 20.0}
        assert {s.variant: s.last_used_at for s in store.iter_summaries()} == used
        store.touch([a.entry_id, f"{KEY}.b"], 25.0)  # "a" stays at 30: never moves back
        assert [(m.variant, m.last_used_at) for m in store.variants(KEY)] == [
            ("a", 30.0),
            ("b", 25.0),
        ]
        # A replaced entry reports what it was stored with.
        put(store, variant="a", used=12.0)
        assert store.get_meta(a.entry_id).last_used_at == 12.0
        assert [m.variant for m in store.variants(KEY)] == ["b", "a"]

    def test_iter_summaries_agrees_with_iter_metadata(self, store: Any) -> None:
        """Every summary field equals the metadata's, for odd values and big records too."""
        put(store, b"p", key="k1", stage="a")
        put(store, b"q" * BIG, key="k2", variant="v.9", stage='we"ird\u00e9\n')
        store.put(
            EntryMeta(
                key="k3.x",
                variant="0",
                pipeline="naïve ☃",
                stage_id="fan",
                stage_identity="mod:fan",
                version="src:" + "a" * 32,
                version_is_source_hash=True,
                item_index=7,
                codec="bytes/1",
                created_at=5,
                last_used_at=6,
                compute_duration_ms=1.25,
                run_id="r-1",
                state_writes={"blob": {"value": "x" * 100_000}},
            ),
            b"z",
        )
        store.touch(["k1.0"], 2000.0)
        expected = sorted(EntrySummary.of(m) for m in store.iter_metadata())
        summaries = sorted(store.iter_summaries())
        assert summaries == expected
        assert len(summaries) == 3
        for summary in summaries:
            assert [type(v) for v in summary] == [
                type(v) for v in EntrySummary.of(store.get_meta(summary.entry_id))
            ]
        assert {s.entry_id: s.last_used_at for s in summaries}["k1.0"] == 2000.0

    def test_lock_excludes_a_second_holder(self, store: Any) -> None:
        """While one thread holds lock(key), another blocks until it is released."""
        acquired = threading.Event()

        def second() -> None:
            with store.lock(KEY):
                acquired.set()

        with store.lock(KEY):
            thread = threading.Thread(target=second)
            thread.start()
            assert not acquired.wait(0.3)
            with store.lock("another key"):  # other keys are independent
                pass
        assert acquired.wait(10)
        thread.join(10)


class TestDiskLayout:
    """Directory creation, FORMAT marker and opening errors."""

    def test_directory_is_created_owner_only_with_marker(self, tmp_path: Path) -> None:
        """A new directory is 0o700 and gets a FORMAT marker."""
        with DiskCacheStore(tmp_path / "a" / "cache") as made:
            assert made.directory == tmp_path / "a" / "cache"
            assert made.format_version == CACHE_FORMAT_VERSION
        directory = tmp_path / "a" / "cache"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        marker = json.loads((directory / "FORMAT").read_text())
        assert marker == {"format": CACHE_FORMAT_VERSION, "library": "twinklr_pipe"}
        assert (directory / "store" / "cache.db").is_file()

    def test_existing_directory_keeps_its_permissions(self, tmp_path: Path) -> None:
        """A user's existing directory is not chmod-ed."""
        directory = tmp_path / "mine"
        directory.mkdir(mode=0o755)
        os.chmod(directory, 0o755)
        DiskCacheStore(directory).close()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755

    def test_reopen_sees_entries(self, tmp_path: Path) -> None:
        """Entries survive closing and reopening."""
        with DiskCacheStore(tmp_path / "c") as first:
            meta = put(first, b"x" * BIG)
        with DiskCacheStore(tmp_path / "c") as second:
            assert second.get(meta.entry_id) == (meta, b"x" * BIG)

    def test_summaries_and_last_use_survive_reopen(self, tmp_path: Path) -> None:
        """Summaries and touched last uses are in the database, not in the process."""
        with DiskCacheStore(tmp_path / "c") as first:
            put(first, key="k1")
            put(first, key="k2", stage="other")
            first.touch(["k2.0"], 5000.0)
            before = sorted(first.iter_summaries())
        with DiskCacheStore(tmp_path / "c") as second:
            assert sorted(second.iter_summaries()) == before
            assert sorted(EntrySummary.of(m) for m in second.iter_metadata()) == before
            assert second.get_meta("k2.0").last_used_at == 5000.0

    def test_a_file_is_not_a_directory(self, tmp_path: Path) -> None:
        """A path that is a file raises StoreError naming it."""
        path = tmp_path / "cache"
        path.write_text("not a dir")
        with pytest.raises(StoreError, match=f"Cache directory {path} is a file"):
            DiskCacheStore(path)

    def test_newer_format_is_refused_untouched(self, tmp_path: Path) -> None:
        """A marker from a newer format raises CacheFormatError and changes nothing."""
        directory = tmp_path / "c"
        directory.mkdir()
        newer = json.dumps({"format": CACHE_FORMAT_VERSION + 1, "library": "twinklr_pipe"})
        (directory / "FORMAT").write_text(newer)
        with pytest.raises(CacheFormatError) as info:
            DiskCacheStore(directory)
        assert (info.value.found, info.value.supported) == (CACHE_FORMAT_VERSION + 1, 1)
        assert f"store format {CACHE_FORMAT_VERSION + 1}" in str(info.value)
        assert f"reads format {CACHE_FORMAT_VERSION} or older" in str(info.value)
        assert os.listdir(directory) == ["FORMAT"]
        assert (directory / "FORMAT").read_text() == newer

    @pytest.mark.parametrize(
        "garbled",
        [
            b"not json",
            b'{"format": 1, "libr',
            b"\x00" * 44,
            b"",
            b'{"library": "twinklr_pipe"}',
            b'{"format": "1", "library": "twinklr_pipe"}',
            b'{"format": 0, "library": "twinklr_pipe"}',
            b'{"format": 1}',
            b"[1]",
        ],
    )
    def test_garbled_marker_is_repaired(
        self, tmp_path: Path, garbled: bytes, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """Damage is not a newer format: the marker is rewritten, entries are kept."""
        with DiskCacheStore(tmp_path / "c") as first:
            meta = put(first)
        (tmp_path / "c" / "FORMAT").write_bytes(garbled)
        with DiskCacheStore(tmp_path / "c") as second:
            assert second.get(meta.entry_id) is not None
        assert "Cache format marker" in warning_text(warnings_)
        assert json.loads((tmp_path / "c" / "FORMAT").read_bytes())["format"] == 1

    def test_closed_store_raises(self, disk: DiskCacheStore) -> None:
        """Using a closed store is a StoreError, not a silent reopen."""
        disk.close()
        disk.close()
        with pytest.raises(StoreError, match="closed"):
            disk.get("x.0")
        with pytest.raises(StoreError, match="closed"):
            put(disk)


def value_files(store: DiskCacheStore) -> list[Path]:
    return sorted((store.directory / "store").glob("*/*/*.val"))


def raw_sql(store: DiskCacheStore, statement: str, params: tuple[Any, ...] = ()) -> None:
    con = sqlite3.connect(store.directory / "store" / "cache.db")
    with con:
        con.execute(statement, params)
    con.close()


class TestDiskIntegrity:
    """Corrupt entries are misses, evicted with a warning; nothing is ever unpickled."""

    @pytest.mark.parametrize("damage", ["edit", "truncate", "delete"])
    def test_damaged_payload_file_is_a_miss(
        self, disk: DiskCacheStore, warnings_: pytest.LogCaptureFixture, damage: str
    ) -> None:
        """An edited, truncated or missing payload file: None, a warning, entry gone."""
        payload = os.urandom(BIG)
        meta = put(disk, payload, stage="transcribe")
        (path,) = (p for p in value_files(disk) if p.read_bytes() == payload)
        if damage == "edit":
            path.write_bytes(payload[:100] + bytes([payload[100] ^ 1]) + payload[101:])
        elif damage == "truncate":
            path.write_bytes(payload[: BIG // 2])
        else:
            path.unlink()
        assert disk.get(meta.entry_id) is None
        text = warning_text(warnings_)
        assert "stage 'transcribe' (key 3f9a1c2e)" in text
        assert disk.get_meta(meta.entry_id) is None
        assert list(disk.iter_metadata()) == []

    def test_damaged_payload_file_after_variants_is_a_miss(
        self, disk: DiskCacheStore, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """On the hot path too, a changed payload file is caught and the entry removed."""
        payload = os.urandom(BIG)
        meta = put(disk, payload, stage="transcribe")
        assert disk.variants(KEY) == [meta]
        (path,) = value_files(disk)
        path.write_bytes(payload[:-1])
        assert disk.get(meta.entry_id) is None
        assert "stage 'transcribe' (key 3f9a1c2e)" in warning_text(warnings_)
        assert disk.get_meta(meta.entry_id) is None

    def test_prefetched_entry_serves_get_for_a_second_only(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """variants() then get() is one snapshot; past the prefetch window, get() reads again."""
        with DiskCacheStore(tmp_path / "c") as one, DiskCacheStore(tmp_path / "c") as other:
            meta = put(one)
            assert one.variants(KEY) == [meta]
            other.delete(meta.entry_id)  # another process, between the two calls
            assert one.get(meta.entry_id) == (meta, b"payload")  # as variants() saw it
            meta = put(one)
            assert one.variants(KEY) == [meta]
            other.delete(meta.entry_id)
            monkeypatch.setattr(_store, "_PREFETCH_SECONDS", 0.0)
            assert one.get(meta.entry_id) is None

    def test_undecodable_metadata_is_a_miss(
        self, disk: DiskCacheStore, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """Garbled metadata JSON: None, a warning naming the key, entry gone."""
        meta = put(disk, b"x" * BIG)
        raw_sql(
            disk, "UPDATE Cache SET value = ? WHERE key = ?", (b'{"key": ', "m/" + meta.entry_id)
        )
        assert list(disk.iter_metadata()) == []  # skipped, not deleted, by listing
        assert disk.get(meta.entry_id) is None
        assert "key 3f9a1c2e" in warning_text(warnings_)
        assert disk.size() == 0
        assert value_files(disk) == []

    def test_metadata_of_another_entry_is_a_miss(self, disk: DiskCacheStore) -> None:
        """A metadata row that names another entry is not trusted."""
        meta = put(disk, variant="a")
        other = meta_for(b"payload", variant="b").model_dump_json().encode()
        raw_sql(disk, "UPDATE Cache SET value = ? WHERE key = ?", (other, "m/" + meta.entry_id))
        assert disk.get(meta.entry_id) is None
        assert disk.variants(KEY) == []

    def test_metadata_without_payload_is_a_miss(self, disk: DiskCacheStore) -> None:
        """Readers never see metadata without its payload."""
        meta = put(disk)
        raw_sql(disk, "DELETE FROM Cache WHERE key = ?", ("p/" + meta.entry_id,))
        assert disk.variants(KEY) == []
        assert disk.get_meta(meta.entry_id) is None
        assert disk.get(meta.entry_id) is None

    def test_touch_only_updates_access_time(self, disk: DiskCacheStore) -> None:
        """touch() leaves every metadata record as it was: one column of its row changes."""
        put(disk, variant="a")
        put(disk, variant="b")
        db = disk.directory / "store" / "cache.db"

        def rows() -> list[tuple[Any, ...]]:
            con = sqlite3.connect(db)
            try:
                return con.execute(
                    "SELECT key, value, tag, filename, access_time FROM Cache ORDER BY key"
                ).fetchall()
            finally:
                con.close()

        before = rows()
        disk.touch([f"{KEY}.a", "missing.0"], 7777.0)
        after = rows()
        assert [row[:4] for row in after] == [row[:4] for row in before]
        assert {row[0]: row[4] for row in after}[f"m/{KEY}.a"] == 7777.0
        assert json.loads(disk.get(f"{KEY}.a")[0].model_dump_json())["last_used_at"] == 7777.0

    @pytest.mark.parametrize(
        "tag",
        [
            None,  # written before summaries existed
            b"[1]",  # not text
            "[1,",  # not JSON
            '[1,"0"]',  # too short
            '[1,"zz","p","s","i","v",false,null,"c",1,1.0,1.0,1.0,"r"]',  # another variant
            '[1,"0","p","s","i","v",0,null,"c",1,1.0,1.0,1.0,"r"]',  # a field of a wrong type
            '[1,"0","p","s","i","v",false,null,"c",1,1.0,1.0,1.0,"r"] ',  # trailing text
            '[2,"0","p","s","i","v",false,null,"c",1,1.0,1.0,1.0,"r"]',  # a later layout
            # Format 2 (text): the same damage, and each field's own.
            "2\x1f" + KEY + "\x1f0\x1fp",  # too short
            "2\x1f"
            + KEY
            + "\x1fzz\x1fp\x1fs\x1fi\x1fv\x1f0\x1f\x1fc\x1f1\x1f1.0\x1f1.0\x1f1.0\x1fr",
            "2\x1f"
            + KEY
            + "\x1f0\x1fp\x1fs\x1fi\x1fv\x1fno\x1f\x1fc\x1f1\x1f1.0\x1f1.0\x1f1.0\x1fr",
            "2\x1f"
            + KEY
            + "\x1f0\x1fp\x1fs\x1fi\x1fv\x1f0\x1f1.5\x1fc\x1f1\x1f1.0\x1f1.0\x1f1.0\x1fr",
            "2\x1f"
            + KEY
            + "\x1f0\x1fp\x1fs\x1fi\x1fv\x1f0\x1f\x1fc\x1f1.0\x1f1.0\x1f1.0\x1f1.0\x1fr",
            "2\x1f" + KEY + "\x1f0\x1fp\x1fs\x1fi\x1fv\x1f0\x1f\x1fc\x1f1\x1fx\x1f1.0\x1f1.0\x1fr",
            "2\x1f"
            + KEY
            + "\x1f0\x1fp\x1fs\x1fi\x1fv\x1f0\x1f\x1fc\x1f1\x1f1.0\x1f1.0\x1f1.0\x1fr\x1fx",
            b"2\x1f"
            + KEY.encode()
            + b"\x1f0\x1fp\xff\x1fs\x1fi\x1fv\x1f0\x1f\x1fc\x1f1\x1f1.0\x1f1.0\x1f1.0\x1fr",
        ],
    )
    def test_entries_without_a_usable_summary_list_from_their_metadata(
        self, disk: DiskCacheStore, tag: Any
    ) -> None:
        """A missing or unusable summary is never trusted: the metadata is decoded instead."""
        meta = put(disk, variant="0", used=50.0)
        other = put(disk, key="f" * 32, used=60.0)
        disk.touch([meta.entry_id], 70.0)
        raw_sql(disk, "UPDATE Cache SET tag = ? WHERE key = ?", (tag, "m/" + meta.entry_id))
        expected = sorted(EntrySummary.of(m) for m in disk.iter_metadata())
        assert sorted(disk.iter_summaries()) == expected
        assert {s.entry_id: s.last_used_at for s in expected} == {
            meta.entry_id: 70.0,
            other.entry_id: 60.0,
        }

    def test_summaries_are_text_unless_a_field_holds_the_separator(
        self, disk: DiskCacheStore
    ) -> None:
        """``put`` writes a format 2 (text) summary, or format 1 (JSON) when a string
        holds the separator; both read back exactly, odd floats included."""
        text = put(disk, key="a" * 32)
        odd = EntryMeta(
            key="b" * 32,
            stage_id="we\x1fird",
            item_index=0,
            version_is_source_hash=True,
            size_bytes=1,
            created_at=0.1,
            last_used_at=1e300,
            compute_duration_ms=1.5e-7,
        )
        disk.put(odd, b"z")
        third = meta_for(b"q", key="c" * 32).model_copy(
            update={"created_at": -0.0, "compute_duration_ms": 5e-324, "item_index": 12}
        )
        disk.put(third, b"q")
        tags = {
            key[2:]: tag
            for key, tag in _store._connection(disk._cache).execute(
                "SELECT key, tag FROM Cache WHERE key LIKE 'm/%'"
            )
        }
        assert tags[text.entry_id].startswith("2\x1f" + text.key + "\x1f0\x1f")
        assert tags[third.entry_id].startswith("2\x1f")
        assert json.loads(tags[odd.entry_id])[:5] == [1, odd.key, "0", "", "we\x1fird"]
        expected = sorted(EntrySummary.of(m) for m in disk.iter_metadata())
        assert sorted(disk.iter_summaries()) == expected
        for summary in disk.iter_summaries():
            assert [type(v) for v in summary] == [
                type(v) for v in EntrySummary.of(disk.get_meta(summary.entry_id))
            ]

    def test_a_store_with_both_formats_and_damage_lists_every_entry(
        self, disk: DiskCacheStore
    ) -> None:
        """A store written before format 2 (JSON summaries), in part, with rows without or
        with a damaged summary, lists every entry as its metadata says, column-wise too."""
        metas = [put(disk, key=f"{i:032x}", used=100.0 + i) for i in range(12)]
        for meta in metas[:5]:  # written by an older version: format 1
            tag = _store._json_summary_tag(meta)
            raw_sql(disk, "UPDATE Cache SET tag = ? WHERE key = ?", (tag, "m/" + meta.entry_id))
        raw_sql(disk, "UPDATE Cache SET tag = NULL WHERE key = ?", ("m/" + metas[5].entry_id,))
        raw_sql(disk, "UPDATE Cache SET tag = '2' WHERE key = ?", ("m/" + metas[6].entry_id,))
        raw_sql(disk, "UPDATE Cache SET tag = '[1]' WHERE key = ?", ("m/" + metas[1].entry_id,))
        disk.touch([metas[0].entry_id, metas[8].entry_id], 5000.0)
        expected = sorted(EntrySummary.of(m) for m in disk.iter_metadata())
        assert len(expected) == 12
        assert sorted(disk.iter_summaries()) == expected
        columns = disk._summary_columns()
        assert sorted(zip(*columns, strict=True)) == expected
        assert {s.entry_id: s.last_used_at for s in expected}[metas[8].entry_id] == 5000.0

    def test_unreadable_metadata_without_summary_is_skipped_with_a_warning(
        self, disk: DiskCacheStore, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """Listing an old row that does not decode skips it (like iter_metadata)."""
        meta = put(disk)
        good = put(disk, key="f" * 32)
        raw_sql(
            disk,
            "UPDATE Cache SET tag = NULL, value = ? WHERE key = ?",
            (b"{", "m/" + meta.entry_id),
        )
        assert [s.entry_id for s in disk.iter_summaries()] == [good.entry_id]
        assert "Skipped 1 unreadable cache entries" in warning_text(warnings_)

    @pytest.mark.parametrize("row", ["m/", "p/"])
    @pytest.mark.parametrize("size", [10, BIG])
    def test_planted_pickle_row_is_never_unpickled(
        self, disk: DiskCacheStore, warnings_: pytest.LogCaptureFixture, row: str, size: int
    ) -> None:
        """A pickle-mode row written by diskcache's default Disk is refused, not loaded."""
        assert diskcache.Disk("unused").fetch(4, "", pickle.dumps(Exploit(1)), False)
        assert EXPLOITED == ["unpickled x"]  # the exploit works on diskcache's own Disk
        EXPLOITED.clear()
        meta = put(disk)
        planted = diskcache.Cache(str(disk.directory / "store"))  # default Disk: pickles
        planted.set(row + meta.entry_id, Exploit(size))
        planted.close()
        assert disk.get(meta.entry_id) is None
        assert disk.get_meta(meta.entry_id) is None
        assert disk.variants(KEY) == []
        assert list(disk.iter_metadata()) == []
        assert EXPLOITED == []
        assert "mode 4, not raw bytes" in warning_text(warnings_)

    def test_value_file_outside_the_store_is_never_read_or_removed(
        self, disk: DiskCacheStore, tmp_path: Path
    ) -> None:
        """A row naming a file outside diskcache's layout is corrupt; the file is left alone."""
        victim = tmp_path / "victim"
        victim.write_bytes(b"precious")
        meta = put(disk, b"x" * BIG)
        raw_sql(
            disk,
            "UPDATE Cache SET filename = ? WHERE key = ?",
            ("../../victim", "p/" + meta.entry_id),
        )
        assert disk.get(meta.entry_id) is None
        assert victim.read_bytes() == b"precious"

    def test_entry_replaced_while_being_read_is_not_evicted(self, disk: DiskCacheStore) -> None:
        """Eviction deletes only the rows that were read, not a newer entry."""
        meta = put(disk, b"old")
        con = sqlite3.connect(disk.directory / "store" / "cache.db")
        seen = con.execute(_store._ENTRY_SQL, ("m/" + meta.entry_id, "p/" + meta.entry_id))
        rows = seen.fetchall()
        con.close()
        newer = put(disk, b"new", used=2000.0)
        cache = disk._cache
        assert cache is not None
        keys = ("m/" + meta.entry_id, "p/" + meta.entry_id)
        assert disk._evict_if_unchanged(cache, *keys, rows) is False
        assert disk.get(meta.entry_id) == (newer, b"new")


EXPLOITED: list[str] = []


def _record_exploit(what: str) -> str:
    EXPLOITED.append(what)
    return what


class Exploit:
    """Unpickling this calls ``_record_exploit``: the test asserts it never runs."""

    def __init__(self, size: int) -> None:
        self.padding = "x" * size

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_exploit, ("unpickled " + self.padding,))


class TestDiskDamage:
    """A damaged database never stops the store from opening."""

    @pytest.mark.parametrize("damage", ["zeroed", "truncated", "garbage header"])
    def test_damaged_database_reopens_empty(
        self, tmp_path: Path, warnings_: pytest.LogCaptureFixture, damage: str
    ) -> None:
        """The damaged store/ is moved aside, with a warning, and a fresh one opens."""
        with DiskCacheStore(tmp_path / "c") as first:
            for index in range(50):
                put(first, key=f"{index:032x}")
        db = tmp_path / "c" / "store" / "cache.db"
        size = db.stat().st_size
        with open(db, "r+b") as handle:
            if damage == "zeroed":
                handle.write(b"\x00" * size)
            elif damage == "truncated":
                handle.truncate(8192)
            else:
                handle.write(b"garbage" * 20)
        with DiskCacheStore(tmp_path / "c") as second:
            assert list(second.iter_metadata()) == []
            meta = put(second)
            assert second.get(meta.entry_id) is not None
        assert "was damaged" in warning_text(warnings_)
        assert len(list((tmp_path / "c").glob("store.damaged-*"))) == 1

    def test_damage_found_while_running_is_repaired_at_next_open(
        self, tmp_path: Path, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """Pages damaged past the probe: misses and a StoreError, then a fresh store."""
        with DiskCacheStore(tmp_path / "c") as first:
            metas = [put(first, b"p" * 300, key=f"{index:032x}") for index in range(300)]
        db = tmp_path / "c" / "store" / "cache.db"
        page = _leaf_page_of(db, "Cache")  # past the pages the probes read
        with open(db, "r+b") as handle:
            handle.seek(4096 * (page - 1))
            handle.write(b"\xa5" * 4096)
        with DiskCacheStore(tmp_path / "c") as second:
            for meta in metas:  # every answer is right or a miss; none raises
                assert second.get(meta.entry_id) in (None, (meta, b"p" * 300))
            with pytest.raises(StoreError, match="damaged"):
                list(second.iter_metadata())
            with pytest.raises(StoreError, match="damaged"):
                put(second)
            assert (tmp_path / "c" / "DAMAGED").exists()
        with DiskCacheStore(tmp_path / "c") as third:
            assert list(third.iter_metadata()) == []
            assert not (tmp_path / "c" / "DAMAGED").exists()
        assert "lookups miss and writes fail" in warning_text(warnings_)

    def test_damaged_store_in_use_elsewhere_is_not_moved(
        self, tmp_path: Path, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """While another store has it open, a damaged store/ stays: caching is off."""
        holder = DiskCacheStore(tmp_path / "c")
        (tmp_path / "c" / "DAMAGED").write_text("test damage")
        try:
            with DiskCacheStore(tmp_path / "c") as second:
                assert second.get("x.0") is None
                with pytest.raises(StoreError, match="damaged"):
                    put(second)
            assert list((tmp_path / "c").glob("store.damaged-*")) == []
        finally:
            holder.close()
        with DiskCacheStore(tmp_path / "c") as third:
            put(third)
        assert len(list((tmp_path / "c").glob("store.damaged-*"))) == 1

    def test_forked_child_closing_keeps_the_parent_lock(self, disk: DiskCacheStore) -> None:
        """A forked child that closes its copy of the store does not unlock the parent's."""
        with warnings.catch_warnings():  # Python 3.12+ warns when other threads run
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                disk.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        fd = os.open(disk.directory / "store.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert disk.get_meta(put(disk).entry_id) is not None


class TestDiskWrites:
    """Write failures become StoreError; entries are written whole or not at all."""

    def test_disk_full_is_a_store_error(
        self, disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An OSError while writing becomes StoreError naming the directory and the error."""

        def full(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(disk._disk, "_write", full)
        with pytest.raises(StoreError, match="No space left on device") as info:
            put(disk, b"x" * BIG)
        assert str(disk.directory) in str(info.value)
        assert "stage 'parse' (key 3f9a1c2e)" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)

    def test_failure_inside_the_transaction_leaves_nothing(
        self, disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Metadata written, payload fails: rolled back, files removed, entry absent."""
        old = put(disk, b"o" * BIG)
        real = _store._write_row
        calls: list[str] = []

        def payload_fails(con: Any, key: str, *args: Any, **options: Any) -> None:
            calls.append(key)
            if key.startswith("p/"):
                raise sqlite3.OperationalError("database or disk is full")
            real(con, key, *args, **options)

        monkeypatch.setattr(_store, "_write_row", payload_fails)
        with pytest.raises(StoreError, match="database or disk is full"):
            put(disk, b"n" * BIG, used=5000.0)
        assert calls == ["m/" + old.entry_id, "p/" + old.entry_id]
        monkeypatch.undo()
        assert disk.get(old.entry_id) == (old, b"o" * BIG)
        assert len(value_files(disk)) == 1
        put(disk, key="after")  # the connection is usable again

    def test_locked_database_is_a_store_error(self, tmp_path: Path) -> None:
        """Another writer holding the database past the timeout: StoreError, quickly."""
        with DiskCacheStore(tmp_path / "c", timeout=0.1) as made:
            con = sqlite3.connect(tmp_path / "c" / "store" / "cache.db", isolation_level=None)
            con.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(StoreError, match=r"locked for more than 0\.1s"):
                    put(made)
                assert made.get(f"{KEY}.0") is None  # readers are not blocked
            finally:
                con.execute("ROLLBACK")
                con.close()
            put(made)

    def test_two_stores_share_one_directory(self, tmp_path: Path) -> None:
        """Entries written through one store are read through another, and locks exclude."""
        with DiskCacheStore(tmp_path / "c") as one, DiskCacheStore(tmp_path / "c") as two:
            meta = put(one, b"shared" * 10_000)
            assert two.get(meta.entry_id) == (meta, b"shared" * 10_000)
            acquired = threading.Event()

            def take() -> None:
                with two.lock(KEY):
                    acquired.set()

            with one.lock(KEY):
                thread = threading.Thread(target=take)
                thread.start()
                assert not acquired.wait(0.3)
            assert acquired.wait(10)
            thread.join(10)
            assert (tmp_path / "c" / "locks" / f"{KEY}.lock").exists()

    def test_concurrent_writer_processes_keep_the_variant_cap(
        self, tmp_path: Path, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """Two processes writing variants of the same keys: whole entries, at most four each."""
        script = (
            "import sys, os\n"
            "from twinklr_pipe.cache._store import DiskCacheStore\n"
            "from twinklr_pipe.cache._entry import EntryMeta\n"
            "store = DiskCacheStore(sys.argv[1])\n"
            "for i in range(150):\n"
            "    payload = os.urandom(40_000 if i % 3 == 0 else 50)\n"
            "    store.put(EntryMeta(key=f'{i % 10:032x}', variant=f'{sys.argv[2]}{i}',\n"
            "              last_used_at=i), payload)\n"
        )
        writers = [
            subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "c"), name])
            for name in "ab"
        ]
        assert [writer.wait(60) for writer in writers] == [0, 0]
        with DiskCacheStore(tmp_path / "c") as reader:
            for index in range(10):
                variants = reader.variants(f"{index:032x}")
                assert len(variants) == 4
                assert all(reader.get(meta.entry_id) is not None for meta in variants)
            assert len(list(reader.iter_metadata())) == 40
        assert len(list((tmp_path / "c" / "store").glob("*/*/*.val"))) <= 40
        assert warning_text(warnings_) == ""

    def test_sigkill_leaves_whole_entries_or_none(
        self, tmp_path: Path, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """A writer killed at a random instant leaves only whole, valid entries."""
        script = (
            "import sys, os, xxhash\n"
            "from twinklr_pipe.cache._store import DiskCacheStore\n"
            "from twinklr_pipe.cache._entry import EntryMeta\n"
            "store = DiskCacheStore(sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    payload = os.urandom(40_000 if i % 2 else 100)\n"
            "    store.put(EntryMeta(key=f'{i % 300:032x}', variant=str(i % 6),\n"
            "              payload_checksum=xxhash.xxh3_128_hexdigest(payload),\n"
            "              last_used_at=i), payload)\n"
            "    i += 1\n"
        )
        writer = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "c")], stdout=subprocess.PIPE
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(0.5)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
        with DiskCacheStore(tmp_path / "c") as reader:
            metas = list(reader.iter_metadata())
            assert metas
            for meta in metas:
                assert reader.get(meta.entry_id) is not None
                assert len(reader.variants(meta.key)) <= 4
        assert warning_text(warnings_) == ""


class TestHotPath:
    """``try_put`` (a write that never waits) and ``_hit_candidates`` (a hit's one read)."""

    def test_try_put_stores_a_small_entry_like_put(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"small")
        assert disk.try_put(meta, b"small") is True
        got = disk.get(meta.entry_id)
        assert got is not None and got[1] == b"small" and got[0].metrics == {"tokens": 12}
        (summary,) = disk.iter_summaries()
        assert summary.entry_id == meta.entry_id

    def test_try_put_never_waits_for_a_locked_database(self, disk: DiskCacheStore) -> None:
        """Another connection's write lock: False at once (not after ``timeout``), nothing
        written, and the store still waits as usual in ``put``."""
        other = sqlite3.connect(disk.directory / "store" / "cache.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            meta = meta_for(b"small")
            started = time.monotonic()
            assert disk.try_put(meta, b"small") is False
            assert time.monotonic() - started < disk.timeout / 2
            assert disk.get(meta.entry_id) is None
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert disk._cache is not None
        busy = _store._connection(disk._cache).execute("PRAGMA busy_timeout").fetchone()[0]
        assert busy == int(disk.timeout * 1000)  # put waits for a lock again
        assert disk.try_put(meta, b"small") is True
        assert disk.get(meta.entry_id) is not None

    def test_try_put_leaves_large_entries_to_put(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"x" * BIG)
        assert disk.try_put(meta, b"x" * BIG) is False
        assert disk.get(meta.entry_id) is None and value_files(disk) == []

    def test_candidates_agree_with_variants_and_get(self, disk: DiskCacheStore) -> None:
        put(disk, b"one", variant="a", used=10.0)
        put(disk, b"two", variant="b", used=20.0)
        candidates = disk._hit_candidates(KEY)
        assert candidates is not None
        full = [(m, disk.get(m.entry_id)) for m in disk.variants(KEY)]
        assert [(h.entry_id, p) for h, p in candidates] == [
            (m.entry_id, got[1]) for m, got in full if got is not None
        ]
        for (head, _), (meta, _) in zip(candidates, full, strict=True):
            for field in head._fields:
                assert getattr(head, field) == getattr(meta, field), field
        assert disk._hit_candidates("f" * 32) == []

    @pytest.mark.parametrize(
        "damage",
        [
            "UPDATE Cache SET value = X'7b7d7b' WHERE key LIKE 'm/%'",  # undecodable metadata
            "DELETE FROM Cache WHERE key LIKE 'p/%'",  # payload row missing
            "UPDATE Cache SET value = X'00' WHERE key LIKE 'p/%'",  # payload fails checksum
        ],
    )
    def test_anything_unusual_is_left_to_the_full_path(
        self, disk: DiskCacheStore, damage: str, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """None (not a wrong answer, not a silent miss): ``variants``/``get`` evict and warn."""
        meta = put(disk, b"payload")
        raw_sql(disk, damage)
        assert disk._hit_candidates(KEY) is None
        assert all(disk.get(m.entry_id) is None for m in disk.variants(KEY))
        assert "Discarded a corrupt cache entry" in warning_text(warnings_)
        assert disk.get_meta(meta.entry_id) is None
        assert disk._hit_candidates(KEY) == []

    def test_large_payloads_are_left_to_the_full_path(self, disk: DiskCacheStore) -> None:
        put(disk, b"x" * BIG)
        assert disk._hit_candidates(KEY) is None


class TestWarmUp:
    """``remember_run``/``warm_up``: the entries a pipeline's last run used, read at once."""

    def test_warm_up_reads_what_the_last_run_used(self, disk: DiskCacheStore) -> None:
        a = put(disk, b"one", variant="a")
        b = put(disk, b"two", key="b" * 32)
        put(disk, b"unused", key="c" * 32)
        assert disk.warm_up("p") == {}  # no record yet
        disk.remember_run("p", [a.entry_id, b.entry_id, "f" * 32 + ".0"])  # one is gone
        warm = disk.warm_up("p")
        assert sorted(warm) == sorted([KEY, "b" * 32])
        for key, found in warm.items():
            assert [(h.entry_id, p) for h, p in found] == [
                (h.entry_id, p) for h, p in disk._hit_candidates(key) or []
            ]
        assert disk.warm_up("another pipeline") == {}
        # The record is not an entry: listing, sizes and summaries ignore it.
        assert len(list(disk.iter_metadata())) == len(list(disk.iter_summaries())) == 3
        assert disk.size() == len(b"one") + len(b"two") + len(b"unused")

    def test_entries_changed_since_are_left_out(self, disk: DiskCacheStore) -> None:
        a = put(disk, b"one")
        b = put(disk, b"two", key="b" * 32)
        big = put(disk, b"x" * BIG, key="d" * 32)
        disk.remember_run("p", [a.entry_id, b.entry_id, big.entry_id])
        raw_sql(disk, "UPDATE Cache SET value = X'00' WHERE key = ?", ("p/" + b.entry_id,))
        assert sorted(disk.warm_up("p")) == [KEY]  # b fails its checksum; big is a file

    def test_damaged_metadata_turns_it_off(self, disk: DiskCacheStore) -> None:
        a = put(disk, b"one")
        disk.remember_run("p", [a.entry_id])
        raw_sql(disk, "UPDATE Cache SET value = X'7b7d7b' WHERE key = ?", ("m/" + a.entry_id,))
        assert disk.warm_up("p") == {}
        raw_sql(disk, "UPDATE Cache SET value = X'5b5d' WHERE key LIKE 'w/%'")  # an empty list
        assert disk.warm_up("p") == {}
        raw_sql(disk, "UPDATE Cache SET value = X'7b' WHERE key LIKE 'w/%'")  # not JSON
        assert disk.warm_up("p") == {}


def _leaf_page_of(db: Path, table: str) -> int:
    """A leaf page of ``table`` in the middle of the SQLite file ``db`` (from ``dbstat``)."""
    con = sqlite3.connect(db)
    try:
        pages = [
            page
            for (page,) in con.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                (table,),
            )
        ]
    except sqlite3.OperationalError:  # an SQLite built without the dbstat table
        pytest.skip("this SQLite has no dbstat table")
    finally:
        con.close()
    assert len(pages) > 4
    return pages[len(pages) // 2]
