"""Corruption: truncate, zero, bit-flip or delete each kind of file (and record) in a
cache directory, one at a time, then run the pipeline on it.

Every case must end in correct outputs, with no exception and no traceback logged,
and the run after it fully cached. Where the damage can be seen, it is reported:
a damaged entry is recomputed with a warning naming its stage, a damaged database is
moved aside and replaced with a message, a damaged FORMAT marker is rewritten. SQLite
drops a damaged write-ahead log's frames silently (they are checksummed), so those
entries are simply missing and recomputed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reliability.pipelines import SMALL_INPUT, TALLY, Zygote, small_pipeline
from twinklr_pipe import PipelineExecutor, PipelineResult
from twinklr_pipe._cli import app
from twinklr_pipe.cache import DiskCacheStore
from twinklr_pipe.errors import CacheFormatError

SEED = 4242
#: Bit flips of cache.db at this many seeded offsets (each a case of its own).
DB_BITFLIPS = 6
#: Bits flipped in every byte of FORMAT: they turn the digit 1 into 0 and 9.
MARKER_BITS = (0, 3)

Damage = Callable[[bytes, random.Random], bytes | None]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: len(data) // 2]


def zero(data: bytes, rng: random.Random) -> bytes:
    return bytes(len(data))


def bitflip(data: bytes, rng: random.Random) -> bytes:
    flipped = bytearray(data)
    flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def delete(data: bytes, rng: random.Random) -> None:
    return None


DAMAGES: dict[str, Damage] = {
    "truncate": truncate,
    "zero": zero,
    "bitflip": bitflip,
    "delete": delete,
}


def damage_file(path: Path, how: str, rng: random.Random) -> None:
    data = DAMAGES[how](path.read_bytes(), rng)
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)


@pytest.fixture(scope="module")
def reference() -> PipelineResult:
    result = PipelineExecutor().run(small_pipeline(), SMALL_INPUT)
    assert result.success
    return result


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory, zygote: Zygote) -> Path:
    """A complete cache left by a writer killed after its run: cache.db, -wal, -shm."""
    root = tmp_path_factory.mktemp("seed")
    job = {"cache_dir": str(root / "cache"), "log": str(root / "log")}
    assert zygote.run("crash_run", **job, crash_at_end=True, which="small") == -9
    store = root / "cache" / "store"
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        assert (store / name).exists(), name
    assert len(list(store.glob("*/*/*.val"))) == 2
    return root / "cache"


def copy_of(seed: Path, tmp: Path, *, checkpoint: bool) -> Path:
    """A copy of the seed cache; ``checkpoint`` moves the log into cache.db first."""
    target = tmp / "cache"
    shutil.copytree(seed, target)
    if checkpoint:
        con = sqlite3.connect(target / "store" / "cache.db")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
    return target


def run_and_check(
    cache: Path, reference: PipelineResult, caplog: pytest.LogCaptureFixture
) -> tuple[PipelineResult, str]:
    """Run on a damaged cache: correct outputs and no traceback; then a fully cached run.

    Returns the first run's result and its warnings, one per line.
    """
    caplog.clear()
    executor = PipelineExecutor(cache)
    result = executor.run(small_pipeline(), SMALL_INPUT)
    assert executor.store is not None
    executor.store.close()  # as when its process ends
    assert result.success, result.failed_stages
    for sid, output in result.outputs.items():
        assert TALLY.check_outputs(output, reference.outputs[sid]), f"wrong output of {sid}"
    records = [r for r in caplog.records if r.name.startswith("twinklr_pipe")]
    assert not [r for r in records if r.exc_info], "a traceback was logged"
    warnings = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
    if "lookups miss and writes fail until it is rebuilt" in warnings:
        # Found damaged while running (not at open): that run stored nothing, and the
        # next open rebuilds the database, so the next run computes everything again.
        caplog.clear()
        rebuilt = PipelineExecutor(cache).run(small_pipeline(), SMALL_INPUT)
        assert rebuilt.success and "started an empty cache" in caplog.text
        for sid, output in rebuilt.outputs.items():
            assert TALLY.check_outputs(output, reference.outputs[sid])
        TALLY.add("corruption: cases found damaged while running, rebuilt by the next open")
    caplog.clear()
    again = PipelineExecutor(cache).run(small_pipeline(), SMALL_INPUT)
    assert again.success and again.executed == [], "the cache did not heal"
    for sid, output in again.outputs.items():
        assert TALLY.check_outputs(output, reference.outputs[sid])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    TALLY.add("corruption: cases ending in correct outputs")
    if warnings:
        TALLY.add("corruption: cases reported with a warning")
    elif result.executed:
        TALLY.add("corruption: cases recomputed without a warning (log frames, half entries)")
    else:
        TALLY.add("corruption: cases without effect (unused bytes)")
    return result, warnings


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="twinklr_pipe")


FILE_CASES = [
    *[("payload file", how) for how in DAMAGES],
    *[("FORMAT marker", how) for how in DAMAGES],
    *[("cache.db", how) for how in ("truncate", "zero", "delete")],
    *[("cache.db", f"bitflip-{n}") for n in range(DB_BITFLIPS)],
    *[("cache.db-wal", how) for how in DAMAGES],
    *[("cache.db-shm", how) for how in DAMAGES],
]


class TestFileDamage:
    @pytest.mark.parametrize(("kind", "how"), FILE_CASES)
    def test_damaged_file_never_serves_a_wrong_output(
        self,
        kind: str,
        how: str,
        seed_dir: Path,
        tmp_path: Path,
        reference: PipelineResult,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Each kind of file, damaged each way, ends in correct outputs and a healed cache."""
        # Damage to cache.db is tested with the log checkpointed into it, damage to the
        # log with the entries still in it, as a crashed writer leaves them.
        cache = copy_of(seed_dir, tmp_path, checkpoint=kind in ("cache.db", "payload file"))
        store = cache / "store"
        target = {
            "payload file": sorted(store.glob("*/*/*.val"))[0],
            "FORMAT marker": cache / "FORMAT",
            "cache.db": store / "cache.db",
            "cache.db-wal": store / "cache.db-wal",
            "cache.db-shm": store / "cache.db-shm",
        }[kind]
        damage_file(target, how.split("-")[0], random.Random(f"{SEED}-{kind}-{how}"))
        TALLY.add(f"corruption: fault {how.split('-')[0]} {kind}")
        result, warnings = run_and_check(cache, reference, caplog)

        if kind == "payload file":
            # The entry whose value file was damaged is recomputed, with a warning naming it.
            (stage,) = result.executed
            assert stage in ("big1", "big2")
            assert set(result.cached) == set(reference.outputs) - {stage}
            assert f"Discarded a corrupt cache entry of stage '{stage}'" in warnings
            assert "it will be computed again" in warnings
        elif kind == "FORMAT marker":
            # A damaged marker is repaired, not refused; the entries stay usable.
            assert result.executed == []
            if how in ("truncate", "zero"):
                assert "is damaged (not JSON); rewriting it for format 1" in warnings
            assert json.loads((cache / "FORMAT").read_text())["format"] == 1
        elif kind == "cache.db" and how == "zero":
            assert "was damaged (file is not a database)" in warnings
            assert "started an empty cache" in warnings
            assert len(list(cache.glob("store.damaged-*"))) == 1
        elif kind == "cache.db" and how == "truncate":
            assert "was damaged (database disk image is malformed)" in warnings
        elif kind == "cache.db-shm":
            assert result.executed == [] and not warnings  # rebuilt from the log


def _entry_rows(cache: Path) -> dict[str, tuple[str, bytes]]:
    """entry id -> (stage id, inline payload) of the entries whose payload is in cache.db."""
    con = sqlite3.connect(cache / "store" / "cache.db")
    try:
        rows = dict(con.execute("SELECT key, value FROM Cache WHERE value IS NOT NULL"))
    finally:
        con.close()
    found = {}
    for key, value in rows.items():
        if key.startswith("m/") and rows.get("p/" + key[2:]) is not None:
            found[key[2:]] = (json.loads(value)["stage_id"], rows["p/" + key[2:]])
    return found


class TestRecordDamage:
    @pytest.mark.parametrize("how", sorted(DAMAGES))
    @pytest.mark.parametrize("record", ["metadata", "payload"])
    def test_damaged_record_never_serves_a_wrong_output(
        self,
        record: str,
        how: str,
        seed_dir: Path,
        tmp_path: Path,
        reference: PipelineResult,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A damaged metadata or payload record inside cache.db is a miss, never a wrong value."""
        cache = copy_of(seed_dir, tmp_path, checkpoint=True)
        entries = _entry_rows(cache)
        rng = random.Random(f"{SEED}-{record}-{how}")
        entry = sorted(eid for eid, (sid, _) in entries.items() if sid == "mid")[0]
        key = ("m/" if record == "metadata" else "p/") + entry
        con = sqlite3.connect(cache / "store" / "cache.db")
        try:
            (value,) = con.execute("SELECT value FROM Cache WHERE key = ?", (key,)).fetchone()
            damaged = DAMAGES[how](value, rng)
            if damaged is None:
                con.execute("DELETE FROM Cache WHERE key = ?", (key,))
            else:
                con.execute("UPDATE Cache SET value = ? WHERE key = ?", (damaged, key))
            con.commit()
        finally:
            con.close()
        TALLY.add(f"corruption: fault {how} {record} record")
        result, warnings = run_and_check(cache, reference, caplog)
        if how == "delete":
            # Half an entry is no entry: a miss, and the re-run's write replaces the rest.
            # Metadata without its payload is reported; a payload without metadata cannot
            # be found by any lookup, so it is simply overwritten.
            assert result.executed == ["mid"]
            if record == "payload":
                assert "its payload record is missing" in warnings
        elif how != "bitflip":
            assert result.executed == ["mid"]
            assert "Discarded a corrupt cache entry of" in warnings
        else:
            # A flip is caught by the payload checksum, the metadata decoder or the output
            # hash, unless it hit a byte that changes nothing served (a timestamp digit).
            assert result.executed in ([], ["mid"])
            assert bool(result.executed) == bool(warnings)


class TestMarker:
    def test_marker_bitflips_are_repaired_or_refused_by_number(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Single-bit flips of FORMAT are repaired, harmless, or read as a newer format.

        A flip that turns the version digit into a larger digit cannot be told from a
        newer store: it is refused naming both versions (delete FORMAT to repair it).
        """
        cache = tmp_path / "cache"
        DiskCacheStore(cache).close()
        marker = cache / "FORMAT"
        original = marker.read_bytes()
        outcomes: dict[str, int] = {}
        for offset in range(len(original)):
            for bit in MARKER_BITS:
                flipped = bytearray(original)
                flipped[offset] ^= 1 << bit
                marker.write_bytes(bytes(flipped))
                caplog.clear()
                try:
                    DiskCacheStore(cache).close()
                except CacheFormatError as exc:
                    digit = chr(flipped[offset])
                    assert digit.isdigit() and int(digit) > 1, bytes(flipped)
                    assert str(exc) == (
                        f"Cache directory {cache} uses store format {digit}, but this version "
                        "of twinklr_pipe reads format 1 or older. Upgrade twinklr_pipe, or "
                        "use another --cache-dir."
                    )
                    assert marker.read_bytes() == bytes(flipped)  # left for the user
                    outcome = "refused as a newer format"
                else:
                    repaired = any("is damaged" in r.getMessage() for r in caplog.records)
                    outcome = "repaired" if repaired else "harmless"
                    if repaired:
                        assert marker.read_bytes() == original
                    else:
                        assert json.loads(marker.read_bytes())["format"] == 1
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                marker.write_bytes(original)
        flips = sum(outcomes.values())
        TALLY.add("corruption: fault single-bit flips of FORMAT", flips)
        for outcome, n in outcomes.items():
            TALLY.add(f"corruption: FORMAT bit flips {outcome}", n)
        assert outcomes["repaired"] > 0.9 * flips
        assert outcomes.get("refused as a newer format", 0) <= 3


class TestDamageWhileRunning:
    def test_database_damaged_under_an_open_store(
        self,
        seed_dir: Path,
        tmp_path: Path,
        reference: PipelineResult,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """cache.db zeroed while a run has it open: the run succeeds, the next open rebuilds."""
        cache = copy_of(seed_dir, tmp_path, checkpoint=True)
        executor = PipelineExecutor(cache)  # opened before the damage
        db = cache / "store" / "cache.db"
        db.write_bytes(bytes(db.stat().st_size))
        TALLY.add("corruption: fault zero cache.db under an open store")
        caplog.clear()
        result = executor.run(small_pipeline(), SMALL_INPUT)
        assert executor.store is not None
        executor.store.close()
        assert result.success
        for sid, output in result.outputs.items():
            assert TALLY.check_outputs(output, reference.outputs[sid])
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [r for r in caplog.records if r.exc_info]
        assert any("is damaged" in w and "the next open moves it aside" in w for w in warnings)
        _, after = run_and_check(cache, reference, caplog)
        assert "was damaged" in after and "started an empty cache" in after


class TestCli:
    def test_cache_ls_on_a_damaged_database_is_a_message_not_a_traceback(
        self, seed_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """`pipe cache ls` on a zeroed cache.db says what it did and lists an empty cache.

        (The warning reaches stderr through logging; here pytest's handler captures it.)
        """
        cache = copy_of(seed_dir, tmp_path, checkpoint=True)
        db = cache / "store" / "cache.db"
        db.write_bytes(bytes(db.stat().st_size))
        TALLY.add("corruption: fault zero cache.db (pipe cache ls)")
        result = CliRunner().invoke(app, ["cache", "ls", "--json", "--cache-dir", str(cache)])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == []
        assert "was damaged (file is not a database)" in caplog.text
        assert "Traceback" not in result.output and result.exception is None
