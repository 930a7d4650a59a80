"""The ``Summaries`` table: what listing reads, always equal to the entries' summary tags.

Every test compares the table with the summary tags and the metadata records of the
same database; when the table cannot be trusted (written by someone else, tampered
with, not made yet), readers must fall back to the tags and still list every entry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from twinklr_pipe.cache import _layout, _store, _tags
from twinklr_pipe.cache._entry import EntryMeta, EntrySummary
from twinklr_pipe.cache._store import DiskCacheStore


def meta_for(
    payload: bytes,
    key: str,
    variant: str = "0",
    used: float = 1000.0,
    *,
    item: int | None = None,
    source_hash: bool = False,
) -> EntryMeta:
    return EntryMeta(
        key=key,
        variant=variant,
        pipeline="song",
        stage_id="groups" if item is not None else "parse",
        version="src:" + "ab" * 16 if source_hash else "2",
        version_is_source_hash=source_hash,
        item_index=item,
        codec="json/1",
        payload_checksum=xxhash.xxh3_128_hexdigest(payload),
        size_bytes=len(payload),
        created_at=used - 0.25,
        last_used_at=used,
        compute_duration_ms=12.5,
        run_id="r-1",
    )


def key_of(number: int) -> str:
    return f"{number:032x}"


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskCacheStore]:
    monkeypatch.setattr(_store, "_FLUSH_EVERY", 3600.0)  # batches when the test flushes
    made = DiskCacheStore(tmp_path / "c")
    yield made
    made.close()


def database(store: DiskCacheStore) -> Path:
    return store.directory / "store" / "cache.db"


def sql(store: DiskCacheStore, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Run a statement from another connection, as another program would."""
    con = sqlite3.connect(database(store))
    with con:
        con.execute(statement, params)
    con.close()


def table_rows(store: DiskCacheStore) -> list[EntrySummary] | None:
    """The rows of the ``Summaries`` table, or None when readers would not trust it."""
    con = sqlite3.connect(database(store), isolation_level=None)
    try:
        con.execute("BEGIN")
        columns = _tags._read_typed_summaries(con)
    finally:
        con.close()
    return None if columns is None else sorted(_tags._summary_rows(columns))


def tag_rows(store: DiskCacheStore) -> list[EntrySummary]:
    """The summaries in the tags of the metadata rows (all usable in these tests)."""
    con = sqlite3.connect(database(store))
    try:
        rows = con.execute(_layout.TAGS_SQL).fetchall()
    finally:
        con.close()
    keys, tags, used = ([row[i] for row in rows] for i in range(3))
    columns, odd = _tags._parse_summaries(keys, tags, used)
    assert odd == []
    return sorted(_tags._summary_rows(columns))


def metadata_rows(store: DiskCacheStore) -> list[EntrySummary]:
    return sorted(EntrySummary.of(meta) for meta in store.iter_metadata())


def assert_table_agrees(store: DiskCacheStore) -> list[EntrySummary]:
    """The table is trusted and equals the tags and the metadata, field by field."""
    rows = table_rows(store)
    assert rows is not None
    assert rows == tag_rows(store) == metadata_rows(store)
    assert sorted(store.iter_summaries()) == rows
    return rows


class TestWrites:
    def test_every_way_of_writing_keeps_the_table_equal_to_the_tags(
        self, disk: DiskCacheStore
    ) -> None:
        """put, a variant over the cap, a replaced entry, batches, delete and touch."""
        assert assert_table_agrees(disk) == []
        for number in range(3):
            meta = meta_for(b"x" * number, key_of(number), item=number if number else None)
            disk.put(meta, b"x" * number)
        assert len(assert_table_agrees(disk)) == 3
        # Five variants of one key: the least recently used goes (the cap is four).
        for variant in range(5):
            meta = meta_for(b"v", key_of(9), variant=f"{variant:x}", used=1000.0 + variant)
            disk.put(meta, b"v")
        assert [r.variant for r in assert_table_agrees(disk) if r.key == key_of(9)] == [
            "1",
            "2",
            "3",
            "4",
        ]
        # The same entry id again, with other metadata: replaced, not added.
        disk.put(meta_for(b"new", key_of(0), used=5000.0, source_hash=True), b"new")
        replaced = [r for r in assert_table_agrees(disk) if r.key == key_of(0)]
        assert [(r.size_bytes, r.version_is_source_hash) for r in replaced] == [(3, True)]
        # Pending entries go in by batches: new keys by the multi-row path, a key with
        # rows (a fifth variant) the way put goes.
        for number in range(20, 30):
            assert disk.put_pending(meta_for(b"p", key_of(number)), b"p")
        assert disk.put_pending(meta_for(b"q", key_of(9), variant="9", used=9000.0), b"q")
        disk.flush()
        rows = assert_table_agrees(disk)
        assert len(rows) == 3 + 4 + 10
        assert "1" not in {r.variant for r in rows if r.key == key_of(9)}
        assert disk.delete(f"{key_of(1)}.0")
        assert len(assert_table_agrees(disk)) == 16

    def test_touch_moves_last_used_forward_in_the_table(self, disk: DiskCacheStore) -> None:
        meta = meta_for(b"t", key_of(1))
        disk.put(meta, b"t")
        disk.touch([meta.entry_id], 7000.0)
        (row,) = assert_table_agrees(disk)
        assert row.last_used_at == 7000.0
        disk.touch([meta.entry_id], 6000.0)  # touch never moves it back
        (row,) = assert_table_agrees(disk)
        assert row.last_used_at == 7000.0

    def test_listing_reads_the_table_not_the_tags(
        self, disk: DiskCacheStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for number in range(5):
            disk.put(meta_for(b"l", key_of(number)), b"l")
        expected = assert_table_agrees(disk)

        def no_tags(*args: Any) -> Any:
            raise AssertionError("the tags were parsed")

        monkeypatch.setattr(_tags, "_parse_summaries", no_tags)
        assert sorted(disk.iter_summaries()) == expected


class TestOtherWriters:
    """Rows changed by anyone but the store make readers fall back to the tags."""

    def foreign_insert(self, store: DiskCacheStore, meta: EntryMeta, payload: bytes) -> None:
        """Both rows of an entry, as a version without the table wrote them."""
        data = EntryMeta.__pydantic_serializer__.to_json(meta)
        for key, value, tag in (
            (f"m/{meta.entry_id}", data, _tags._summary_tag(meta)),
            (f"p/{meta.entry_id}", payload, None),
        ):
            sql(
                store,
                _store._INSERT_SQL,
                (key, 1.0, meta.last_used_at, tag, 0, 1, None, value),
            )

    def test_an_entry_written_without_a_row_is_listed_from_its_tag(self, tmp_path: Path) -> None:
        with DiskCacheStore(tmp_path / "c") as store:
            store.put(meta_for(b"a", key_of(1)), b"a")
            meta = meta_for(b"b", key_of(2), used=2000.0)
            self.foreign_insert(store, meta, b"b")
            assert table_rows(store) is None  # one row short: not trusted
            listed = sorted(store.iter_summaries())
            assert listed == tag_rows(store) == metadata_rows(store)
            assert EntrySummary.of(meta) in listed
        with DiskCacheStore(tmp_path / "c") as again:  # the next open makes it complete
            assert len(assert_table_agrees(again)) == 2

    def test_a_tag_changed_by_another_program_is_not_listed_from_the_table(
        self, disk: DiskCacheStore
    ) -> None:
        meta = meta_for(b"a", key_of(1))
        disk.put(meta, b"a")
        other = meta.model_copy(update={"stage_id": "renamed"})
        sql(
            disk,
            "UPDATE Cache SET tag = ? WHERE key = ?",
            (_tags._summary_tag(other), "m/" + meta.entry_id),
        )
        assert table_rows(disk) is None
        assert [s.stage_id for s in disk.iter_summaries()] == ["renamed"]

    def test_last_used_moved_back_by_another_program_drops_the_row(
        self, disk: DiskCacheStore
    ) -> None:
        meta = meta_for(b"a", key_of(1), used=3000.0)
        disk.put(meta, b"a")
        disk.touch([meta.entry_id], 4000.0)
        sql(disk, "UPDATE Cache SET access_time = 1.0 WHERE key = ?", ("m/" + meta.entry_id,))
        assert table_rows(disk) is None
        assert [s.last_used_at for s in disk.iter_summaries()] == [3000.0]

    def test_values_this_library_did_not_write_are_not_trusted(self, disk: DiskCacheStore) -> None:
        """A value of the wrong type in the table: listing reads the tags instead."""
        for number in range(3):
            disk.put(meta_for(b"a", key_of(number)), b"a")
        expected = tag_rows(disk)
        for column, value in (("created_at", "soon"), ("size_bytes", 1.5), ("stage_id", None)):
            sql(disk, f"UPDATE Summaries SET {column} = ? WHERE key = ?", (value, key_of(1)))
            assert table_rows(disk) is None, column
            assert sorted(disk.iter_summaries()) == expected
            disk.put(meta_for(b"a", key_of(1)), b"a")  # rewriting the entry rewrites its row
            assert assert_table_agrees(disk) == expected


class TestMaking:
    def test_a_store_written_before_the_table_gets_it_at_open(self, tmp_path: Path) -> None:
        with DiskCacheStore(tmp_path / "c") as store:
            for number in range(40):
                meta = meta_for(b"o", key_of(number), item=number % 3 or None)
                store.put(meta, b"o")
            expected = assert_table_agrees(store)
            for statement in _layout.SUMMARIES_DROP_SQL:
                sql(store, statement)
            assert table_rows(store) is None
            assert sorted(store.iter_summaries()) == expected  # from the tags meanwhile
        with DiskCacheStore(tmp_path / "c") as store:
            assert assert_table_agrees(store) == expected

    def test_a_missing_trigger_has_the_table_made_again(self, tmp_path: Path) -> None:
        with DiskCacheStore(tmp_path / "c") as store:
            store.put(meta_for(b"a", key_of(1)), b"a")
            sql(store, "DROP TRIGGER Summaries_touch")
            assert table_rows(store) is None
        with DiskCacheStore(tmp_path / "c") as store:
            assert len(assert_table_agrees(store)) == 1
            store.touch([f"{key_of(1)}.0"], 9000.0)
            assert [r.last_used_at for r in assert_table_agrees(store)] == [9000.0]

    def test_rows_without_a_tag_are_filled_from_their_metadata(self, tmp_path: Path) -> None:
        with DiskCacheStore(tmp_path / "c") as store:
            for number in range(3):
                store.put(meta_for(b"a", key_of(number)), b"a")
            expected = metadata_rows(store)
            sql(store, "UPDATE Cache SET tag = NULL WHERE key = ?", (f"m/{key_of(1)}.0",))
            assert table_rows(store) is None  # the trigger dropped that row
            assert sorted(store.iter_summaries()) == expected  # a listing makes it again
            assert table_rows(store) == expected

    def test_a_table_that_lost_rows_is_made_again_by_the_next_listing(self, tmp_path: Path) -> None:
        """Not at open: counting 100,000 rows at every open would cost more."""
        with DiskCacheStore(tmp_path / "c") as store:
            for number in range(3):
                store.put(meta_for(b"a", key_of(number)), b"a")
            expected = metadata_rows(store)
            sql(store, "DELETE FROM Summaries WHERE key = ?", (key_of(2),))
        with DiskCacheStore(tmp_path / "c") as store:
            assert table_rows(store) is None
            assert sorted(store.iter_summaries()) == expected
            assert table_rows(store) == expected

    def test_a_store_that_cannot_make_it_works_without_it(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Making the table fails (a read-only or busy database): the store works on."""
        with DiskCacheStore(tmp_path / "c") as store:
            store.put(meta_for(b"a", key_of(1)), b"a")
            for statement in _layout.SUMMARIES_DROP_SQL:
                sql(store, statement)
        with monkeypatch.context() as patch:
            patch.setattr(_store, "_SUMMARIES_CREATE_SQL", ("CREATE TABLE Cache (x)",))
            with DiskCacheStore(tmp_path / "c") as store:
                assert store._has_summaries is False
                store.put(meta_for(b"b", key_of(2)), b"b")  # writes no row, fails nothing
                assert table_rows(store) is None
                assert len(metadata_rows(store)) == 2
                assert sorted(store.iter_summaries()) == metadata_rows(store)
        with DiskCacheStore(tmp_path / "c") as store:
            assert len(assert_table_agrees(store)) == 2
