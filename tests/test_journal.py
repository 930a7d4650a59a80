"""Tests for the run journal: header first, events, closing record, reading runs back."""

from __future__ import annotations

import json
import os
import time

import anyio
import pytest

from twinklr_pipe import (
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    stage,
)
from twinklr_pipe._journal import (
    InputSpec,
    entries_used_by_recent_runs,
    list_runs,
    load_run,
    open_journal,
    read_run,
    run_journalled,
)
from twinklr_pipe.cache._fingerprint import FileInput
from twinklr_pipe.cache._store import MemoryStore
from twinklr_pipe.errors import RunNotFound


@stage(version="1")
def double(x, ctx):
    return x * 2


@stage(version="1")
def plus_one(x, ctx):
    return x + 1


PIPELINE = PipelineDefinition(
    "journalled",
    [StageDefinition("double", double), StageDefinition("plus", plus_one, inputs=["double"])],
)


def header(**overrides):
    values = {
        "run_id": "r-1",
        "pipeline": "p",
        "spec": "/abs/p.py:p",
        "cwd": "/abs",
        "input": InputSpec(kind="json", value={"a": 1}),
        "input_fingerprint": "f" * 32,
    }
    values.update(overrides)
    return values


class TestWriting:
    def test_header_is_on_disk_before_any_event(self, tmp_path):
        """The header is flushed when the journal opens (a kill right after keeps it)."""
        journal = open_journal(tmp_path, **header())
        lines = journal.path.read_text().splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["type"] == "header"
        assert record["input"] == {"kind": "json", "value": {"a": 1}}
        assert record["pid"] == os.getpid()
        journal.close("succeeded")

    def test_journal_is_private(self, tmp_path):
        """Journal files are created owner-only."""
        journal = open_journal(tmp_path, **header())
        journal.close("succeeded")
        assert journal.path.stat().st_mode & 0o077 == 0

    def test_a_run_writes_events_and_a_closing_record(self, tmp_path):
        """A journalled run records stage events and ends with its status."""
        outcome = run_journalled(
            PipelineExecutor(cache=MemoryStore()),
            PIPELINE,
            cache_dir=tmp_path,
            spec="x.py:PIPELINE",
            cwd=tmp_path,
            input=InputSpec(kind="json", value=3),
        )
        assert outcome.result is not None and outcome.result.success
        assert not outcome.interrupted
        records = [json.loads(line) for line in outcome.journal.read_text().splitlines()]
        assert [r["type"] for r in (records[0], records[-1])] == ["header", "end"]
        assert records[-1]["status"] == "succeeded"
        events = [r["event"] for r in records if r["type"] == "event"]
        assert events[0] == "RunStarted" and events[-1] == "RunFinished"
        run = load_run(tmp_path, outcome.run_id)
        assert run.stages == {"double": "succeeded", "plus": "succeeded"}
        assert run.input_fingerprint is not None
        assert len(run.entry_ids) == 2

    def test_cancelled_run_is_recorded_as_cancelled(self, tmp_path):
        """A run cancelled through its context closes with status cancelled."""

        @stage
        async def slow(x, ctx):
            ctx.cancel()
            await anyio.sleep(10)

        pipeline = PipelineDefinition("c", [StageDefinition("slow", slow)])
        outcome = run_journalled(
            PipelineExecutor(),
            pipeline,
            cache_dir=tmp_path,
            spec="x.py:p",
            cwd=tmp_path,
            input=InputSpec(),
            context=PipelineContext(),
        )
        assert outcome.interrupted
        run = load_run(tmp_path, outcome.run_id)
        assert run.status == "cancelled"
        assert run.stages["slow"] == "cancelled"

    def test_no_cache_dir_writes_nothing(self, tmp_path):
        """With cache_dir=None the run is not journalled."""
        outcome = run_journalled(
            PipelineExecutor(),
            PIPELINE,
            cache_dir=None,
            spec="x.py:p",
            cwd=tmp_path,
            input=InputSpec(kind="json", value=1),
        )
        assert outcome.result is not None and outcome.result.outputs["plus"] == 3
        assert list_runs(tmp_path) == []


class TestReading:
    def test_runs_are_listed_oldest_first(self, tmp_path):
        """list_runs orders by start time."""
        for rid in ("r-b", "r-a", "r-c"):
            open_journal(tmp_path, **header(run_id=rid)).close("succeeded")
            time.sleep(0.01)
        assert [r.run_id for r in list_runs(tmp_path)] == ["r-b", "r-a", "r-c"]

    def test_unknown_run_names_the_latest(self, tmp_path):
        """RunNotFound names the journal and the latest run ids."""
        for rid in ("r-1", "r-2"):
            open_journal(tmp_path, **header(run_id=rid)).close("succeeded")
            time.sleep(0.01)
        with pytest.raises(
            RunNotFound, match=r"No run 'r-9' in journal .*runs \(latest: r-2, r-1\)"
        ):
            load_run(tmp_path, "r-9")

    def test_unique_prefix_and_ambiguous_prefix(self, tmp_path):
        """A unique prefix finds the run; an ambiguous one is an error naming the matches."""
        open_journal(tmp_path, **header(run_id="r-aa1")).close("succeeded")
        open_journal(tmp_path, **header(run_id="r-ab2")).close("succeeded")
        assert load_run(tmp_path, "r-aa").run_id == "r-aa1"
        with pytest.raises(RunNotFound, match="ambiguous"):
            load_run(tmp_path, "r-a")

    def test_killed_run_is_crashed_and_its_running_stage_interrupted(self, tmp_path):
        """Without a closing record and with a dead pid, the run is crashed."""
        journal = open_journal(tmp_path, **header())
        from twinklr_pipe import RunStarted, StageStarted

        journal.record(RunStarted("r-1", "p", ("a", "b")))
        journal.record(StageStarted("r-1", "a"))
        journal._handle.write('{"type": "event", "event": "Stage')  # cut short by a kill
        journal.__exit__(None, None, None)  # closed without a closing record
        lines = journal.path.read_text().splitlines()
        first = json.loads(lines[0])
        first["pid"] = 2**22 + 12345  # no such process
        journal.path.write_text("\n".join([json.dumps(first), *lines[1:]]))
        run = read_run(journal.path)
        assert run is not None
        assert run.status == "crashed"
        assert run.stages == {"a": "interrupted", "b": "pending"}

    def test_live_process_without_closing_record_is_running(self, tmp_path):
        """A run whose process is alive and which has no closing record is running."""
        journal = open_journal(tmp_path, **header())
        assert load_run(tmp_path, "r-1").status == "running"
        journal.close("failed")
        assert load_run(tmp_path, "r-1").status == "failed"

    def test_entries_used_by_recent_runs(self, tmp_path):
        """The entry ids of the last N runs are collected from their StageFinished events."""
        from twinklr_pipe import StageFinished, StageStatus

        for i in range(3):
            journal = open_journal(tmp_path, **header(run_id=f"r-{i}"))
            journal.record(
                StageFinished(f"r-{i}", "a", StageStatus.SUCCEEDED, 1.0, keys=(f"k{i}.0",))
            )
            journal.close("succeeded")
            time.sleep(0.01)
        assert entries_used_by_recent_runs(tmp_path, 2) == {"k1.0", "k2.0"}
        assert entries_used_by_recent_runs(tmp_path, 0) == set()

    def test_input_spec_rebuilds_a_file_input(self, tmp_path):
        """A path input comes back as a FileInput."""
        built = InputSpec(kind="path", value=str(tmp_path / "song.wav")).build()
        assert isinstance(built, FileInput)
