"""Disk full and read-only: store writes fail (ENOSPC, EACCES, SQLite "full" and
"readonly", simulated at the store's write points, and a real EFBIG from a file-size
limit in a child process). The pipeline never fails because of it: results come back
uncached and correct, and the problem is logged once per run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reliability.pipelines import (
    SMALL_INPUT,
    TALLY,
    Zygote,
    crash_reference,
    small_pipeline,
)
from twinklr_pipe import PipelineExecutor, PipelineResult
from twinklr_pipe.cache import _store
from twinklr_pipe.cache._fingerprint import fingerprint


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    return exc


#: name -> (where it strikes, the error). "file" is diskcache writing a value file (large
#: payloads), "row" is writing a record inside the SQLite transaction (every entry).
FAULTS: dict[str, tuple[str, Callable[[], Exception]]] = {
    "ENOSPC writing a value file": ("file", lambda: _os_error(errno.ENOSPC)),
    "EACCES writing a value file": ("file", lambda: PermissionError(errno.EACCES, "denied")),
    "SQLITE_FULL writing a record": ("row", lambda: _sqlite_error("database or disk is full", 13)),
    "SQLITE_READONLY writing a record": (
        "row",
        lambda: _sqlite_error("attempt to write a readonly database", 8),
    ),
    "EACCES writing a record": ("row", lambda: PermissionError(errno.EACCES, "denied")),
}


class Fault:
    """Makes every ``every``-th write at ``where`` fail while ``active``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str, make: Callable[[], Exception]):
        self.active = True
        self.every = 1
        self.calls = 0
        self.injected = 0
        if where == "file":
            real_store = _store._BytesDisk.store

            def store(disk: Any, value: Any, read: bool, key: Any = None) -> Any:
                if isinstance(value, bytes) and len(value) > disk.min_file_size:
                    self._maybe_fail(make)
                return real_store(disk, value, read, key=key)

            monkeypatch.setattr(_store._BytesDisk, "store", store)
        else:
            real_row = _store._write_row
            real_insert = _store._insert_rows

            def write_row(*args: Any, **options: Any) -> None:
                self._maybe_fail(make)
                real_row(*args, **options)

            def insert_rows(con: Any, rows: list[Any]) -> None:  # a batch of new rows
                self._maybe_fail(make)
                real_insert(con, rows)

            monkeypatch.setattr(_store, "_write_row", write_row)
            monkeypatch.setattr(_store, "_insert_rows", insert_rows)

    def _maybe_fail(self, make: Callable[[], Exception]) -> None:
        if not self.active:
            return
        self.calls += 1
        if self.calls % self.every == 0:
            self.injected += 1
            raise make()


@pytest.fixture(scope="module")
def reference() -> PipelineResult:
    result = PipelineExecutor().run(small_pipeline(), SMALL_INPUT)
    assert result.success
    return result


@pytest.fixture
def warnings_(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="twinklr_pipe")
    yield caplog


def _run(cache: Path, reference: PipelineResult, caplog: pytest.LogCaptureFixture) -> Any:
    caplog.clear()
    executor = PipelineExecutor(cache)
    try:
        result = executor.run(small_pipeline(), SMALL_INPUT)
    finally:
        assert executor.store is not None
        executor.store.close()
    assert result.success, {s: result.stage_results[s].error for s in result.failed_stages}
    for sid, output in result.outputs.items():
        assert TALLY.check_outputs(output, reference.outputs[sid]), f"wrong output of {sid}"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    return result, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class TestFailingWrites:
    @pytest.mark.parametrize("intermittent", [False, True], ids=["always", "every 2nd entry"])
    @pytest.mark.parametrize("fault", sorted(FAULTS))
    def test_failing_store_writes_do_not_fail_the_pipeline(
        self,
        fault: str,
        intermittent: bool,
        tmp_path: Path,
        reference: PipelineResult,
        monkeypatch: pytest.MonkeyPatch,
        warnings_: pytest.LogCaptureFixture,
    ) -> None:
        """Writes fail: results are returned uncached, the problem is logged once per run."""
        where, make = FAULTS[fault]
        injector = Fault(monkeypatch, where, make)
        if intermittent:  # an entry writes one value file (when large), or two records
            injector.every = 2 if where == "file" else 4
        cache = tmp_path / "cache"
        for run in range(2):  # once per run, not once per process
            result, warnings = _run(cache, reference, warnings_)
            if intermittent and run == 1:
                # What the first run stored is served; a failing re-store logs once.
                assert result.cached and len(warnings) <= 1
                break
            assert result.metadata["cache"]["store_errors"] >= 1
            assert len(warnings) == 1, warnings
            assert warnings[0].startswith("Cache write failed (Cannot store the entry of stage")
            # Small entries reach the pending log; the database refuses them later.
            assert (
                "results of this run are returned uncached" in warnings[0]
                or "waits in the cache's pending log" in warnings[0]
            )
        assert injector.injected >= 1 + (not intermittent)
        TALLY.add(f"disk: fault {fault}", injector.injected)
        TALLY.add("disk: runs with failing store writes (none failed)")
        # The disk recovers: the next run stores what is missing, the one after is all hits.
        injector.active = False
        result, warnings = _run(cache, reference, warnings_)
        assert result.metadata["cache"]["store_errors"] == 0 and not warnings
        result, warnings = _run(cache, reference, warnings_)
        assert result.executed == [] and not warnings

    def test_file_size_limit_makes_real_writes_fail(
        self, zygote: Zygote, tmp_path: Path, warnings_: pytest.LogCaptureFixture
    ) -> None:
        """A real EFBIG (RLIMIT_FSIZE) on SQLite's log and value files: same guarantees."""
        report = tmp_path / "report.json"
        job = {"cache_dir": str(tmp_path / "cache"), "report": str(report), "headroom": 8192}
        assert zygote.run("disk_full_run", **job) == 0
        got = json.loads(report.read_text())
        assert got["success"]
        assert TALLY.check_outputs(got["outputs"], fingerprint(crash_reference().outputs))
        assert got["store_errors"] >= 1
        assert len(got["warnings"]) == 1, got["warnings"]
        assert got["warnings"][0].startswith("Cache write failed")
        TALLY.add("disk: fault EFBIG from RLIMIT_FSIZE", got["store_errors"])
        TALLY.add("disk: runs with failing store writes (none failed)")
