"""Concurrency: 4 processes run the same pipeline on one cache directory at once, 10
rounds (each round a new input, so every key is new and contended). All succeed with
identical, correct outputs; the store stays consistent (``pipe cache ls --json`` and the
store API agree, no half-written entry); with ``dedupe=True`` no stage or FAN_OUT item
is computed more than once per round (bodies count themselves in O_APPEND files).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reliability.pipelines import (
    TALLY,
    Zygote,
    check_store,
    expected_entries,
    medium_pipeline,
    round_input,
)
from twinklr_pipe import PipelineExecutor
from twinklr_pipe._cli import app
from twinklr_pipe.cache import DiskCacheStore
from twinklr_pipe.cache._fingerprint import fingerprint

PROCESSES = 4
ROUNDS = 10


@pytest.mark.parametrize("dedupe", [False, True], ids=["dedupe off", "dedupe on"])
def test_processes_share_one_cache_directory(dedupe: bool, zygote: Zygote, tmp_path: Path) -> None:
    """4 processes x 10 rounds on one cache: same outputs, a consistent store, no rework."""
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    DiskCacheStore(cache).close()  # created once, as a user's first run would
    references = [
        PipelineExecutor().run(medium_pipeline(), round_input("medium", r)) for r in range(ROUNDS)
    ]
    job = {"cache_dir": str(cache), "work": str(work), "parties": PROCESSES, "rounds": ROUNDS}
    pids = [
        zygote.fork("concurrent", **job, me=me, dedupe=dedupe, which="medium")
        for me in range(PROCESSES)
    ]
    assert [zygote.wait(pid) for pid in pids] == [0] * PROCESSES

    per_round = len(expected_entries(references[0]))
    for r in range(ROUNDS):
        records = [json.loads((work / f"out-{r}-{me}.json").read_text()) for me in range(PROCESSES)]
        for record in records:
            assert record["success"], record["failed"]
            TALLY.check_outputs(record["outputs"], fingerprint(references[r].outputs))
        assert len({rec["outputs"] for rec in records}) == 1, f"round {r}: outputs differ"
        counts = Counter((work / f"count-{r}").read_text().split())
        assert len(counts) == per_round, f"round {r}: not every stage and item ran"
        if dedupe:
            twice = {what: n for what, n in counts.items() if n > 1}
            assert not twice, f"round {r}: computed more than once: {twice}"
        mode = "dedupe on" if dedupe else "dedupe off"
        TALLY.add(f"concurrency: runs ({mode})", PROCESSES)
        extra = sum(n - 1 for n in counts.values())
        TALLY.add(f"concurrency: bodies run more than once in a round ({mode})", extra)

    entries = check_store(cache, expected_entries(*references))
    assert len(entries) == ROUNDS * per_round
    listed = CliRunner().invoke(app, ["cache", "ls", "--json", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert len(rows) == len(entries)
    assert {row["key"] for row in rows} == {eid.split(".")[0] for eid in entries}
    with DiskCacheStore(cache) as store:
        assert sum(row["size_bytes"] for row in rows) == store.size()
    # Every process sees the finished store the same way: a new run is all hits.
    again = PipelineExecutor(cache).run(medium_pipeline(), round_input("medium", ROUNDS - 1))
    assert again.executed == []
