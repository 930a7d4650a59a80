"""Crash anywhere: SIGKILL runs of the 30-stage pipeline (a FAN_OUT of 200 items) at
random instants and at chosen points inside cache writes.

Trials are chained per cache directory to keep the suite fast: the run after a kill
is the re-run (and may be killed in turn, a crash during recovery), and a last,
uninterrupted run completes each chain. After every kill: the store opens, holds only
whole entries, each equal to what an uninterrupted run produces; a re-run serves every
stage that had completed (from any earlier trial) from the cache; the final outputs
equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reliability.pipelines import (
    PENDING_PHASES,
    TALLY,
    Where,
    Zygote,
    check_store,
    crash_input,
    crash_pipeline,
    crash_reference,
    expected_entries,
)
from twinklr_pipe import PipelineExecutor, PipelineResult

SEED = 20240611
#: SIGKILLs at random instants that must land (a child that finishes first is no kill).
RANDOM_KILLS = 30
KILLS_PER_CHAIN = 5
#: (stage, seconds): the first kill of the first chains comes at a random instant within
#: this window after the stage completed (None: after the run started). Later chains'
#: first kills come anywhere in a cold run.
LANDMARKS: list[tuple[str | None, float]] = [
    (None, 0.05),  # while the child creates the store
    ("s00", 0.02),
    ("a04", 0.02),
    ("items", 0.05),  # in the FAN_OUT
    ("fan", 0.02),  # in the tail
    ("t05", 0.01),
    (None, 0.05),
    ("agg", 0.02),
]
#: Kills placed inside cache writes, per phase (see ``pipelines._install_write_kill``).
WRITE_KILLS = {
    "files": 3,
    "meta": 3,
    "rows": 3,
    "commit": 3,
    "append": 3,
    "flush": 3,
    "flushed": 3,
}
#: Phases after which the interrupted entry must be there: committed to the database, or
#: whole in the pending log (read into the database by the next open).
WRITTEN_PHASES = {"commit", "flush", "flushed"}

Expected = dict[Where, list[Any]]


@pytest.fixture(scope="module")
def reference() -> PipelineResult:
    return crash_reference()


@dataclass
class Chain:
    """Kills on one cache directory, each run resuming the previous one."""

    zygote: Zygote
    root: Path
    expected: Expected
    caplog: pytest.LogCaptureFixture
    completed: set[str] = field(default_factory=set)
    trials: int = 0
    kills: int = 0
    fan_entries: int = 0
    done: bool = False

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def trial(
        self,
        *,
        delay: float | None = None,
        after: str | None = None,
        resume_first: bool = False,
        **write_kill: Any,
    ) -> dict[str, Any]:
        """Run once, killed inside a write or after ``delay`` seconds; check everything.

        The delay starts when the run starts, or once stage ``after`` completed, or
        (``resume_first``) once the run has served every stage completed before.
        """
        log = self.root / f"log{self.trials}"
        self.trials += 1
        pid = self.zygote.fork(
            "crash_run", cache_dir=str(self.cache_dir), log=str(log), **write_kill
        )
        if delay is not None:
            if after is not None or resume_first:
                self._wait_for(log, after)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        status = self.zygote.wait(pid)
        assert status in (-signal.SIGKILL, 0), f"the child failed (status {status})"
        lines = log.read_text().splitlines() if log.exists() else []
        logged = [line for line in lines if line.startswith("#warning")]
        assert not logged, f"the run after a kill saw damage: {logged}"
        finished = [line.split() for line in lines if not line.startswith("#")]
        for sid, cache in finished:
            # Completed in an earlier trial: this re-run must have served it from the cache.
            if sid in self.completed:
                assert cache == "hit", f"{sid} had completed before a kill but re-ran"
                TALLY.add("crash: completed stages served from the cache by the next run")
        self.completed |= {sid for sid, _ in finished}
        self.caplog.clear()
        entries = check_store(self.cache_dir, self.expected) if self.cache_dir.exists() else {}
        warnings = [r.getMessage() for r in self.caplog.records if r.levelno >= logging.WARNING]
        assert not warnings, f"a crash looked like damage: {warnings}"
        self.fan_entries = sum(1 for sid, _ in entries.values() if sid == "fan")
        killed = status == -signal.SIGKILL
        self.kills += killed
        TALLY.add("crash: runs started")
        if not killed:
            TALLY.add("crash: runs that finished before their kill")
        elif delay is not None:
            TALLY.add(f"crash: random kills {self.position()}")
        self.done = "#done" in lines
        return {
            "killed": killed,
            "entries": entries,
            "finished": len(finished),
            "position": self.position(),
        }

    def _wait_for(self, log: Path, stage: str | None, timeout: float = 30.0) -> None:
        """Wait until the run logged ``stage`` (None: every stage completed before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = log.read_text().splitlines() if log.exists() else []
            if "#done" in lines:
                return
            done = [line.split()[0] for line in lines if not line.startswith("#")]
            if stage in done if stage is not None else len(done) >= len(self.completed):
                return
            time.sleep(0.001)

    def position(self) -> str:
        """Where the pipeline had got to (over every run of the chain) at a kill."""
        if not self.completed:
            return "before any stage completed (store opening, s00)"
        if "items" not in self.completed:
            return "in the branches before the FAN_OUT"
        if "fan" not in self.completed:
            return "during the FAN_OUT of 200 items"
        return "in the tail after the FAN_OUT"

    def finish(self, reference: PipelineResult) -> None:
        """An uninterrupted re-run: every completed stage a hit, outputs as expected."""
        self.caplog.clear()
        rerun = PipelineExecutor(self.cache_dir).run(crash_pipeline(0.0, 0.0), crash_input())
        assert rerun.success
        assert not [r for r in self.caplog.records if r.levelno >= logging.WARNING]
        for sid, output in rerun.outputs.items():
            assert TALLY.check_outputs(output, reference.outputs[sid]), f"wrong output of {sid}"
        for sid in self.completed:
            assert rerun.stage_results[sid].metadata["cache"] == "hit", (
                f"{sid} completed before a kill but was not a hit"
            )
        assert rerun.stage_results["fan"].metadata["items_cached"] == self.fan_entries
        TALLY.add(
            "crash: stages completed before a kill (hits in the final run)", len(self.completed)
        )
        TALLY.add(
            "crash: fan-out items stored before a kill (hits in the final run)", self.fan_entries
        )


def _cold_run_seconds(zygote: Zygote, tmp: Path) -> float:
    """How long an uninterrupted cold run takes in a child (the faster of two)."""
    times = []
    for n in range(2):
        started = time.perf_counter()
        job = {"cache_dir": str(tmp / f"cache{n}"), "log": str(tmp / f"log{n}")}
        assert zygote.run("crash_run", **job) == 0
        times.append(time.perf_counter() - started)
    return min(times)


class TestSigkill:
    def test_sigkill_at_random_instants(
        self,
        zygote: Zygote,
        tmp_path: Path,
        reference: PipelineResult,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Killed anywhere in a run, nothing completed is lost and nothing wrong is kept."""
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        expected = expected_entries(reference)
        span = max(_cold_run_seconds(zygote, tmp_path / "calibrate"), 0.2)
        rng = random.Random(SEED)
        kills, chains, positions = 0, 0, {}
        while kills < RANDOM_KILLS:
            assert chains < RANDOM_KILLS, "too many runs finished before their kill"
            chain = Chain(zygote, tmp_path / f"chain{chains}", expected, caplog)
            # The first run of a chain dies at a random instant shortly after a landmark
            # (its start, a stage completing), so that every part of the run is hit
            # whatever the machine's speed, or (past the landmarks) anywhere in the run.
            # Each next run resumes the last and dies at a random instant after it has
            # served what was completed before.
            after, window = LANDMARKS[chains] if chains < len(LANDMARKS) else (None, span)
            chains += 1
            while (
                not chain.done
                and chain.trials < KILLS_PER_CHAIN
                and kills + chain.kills < RANDOM_KILLS
            ):
                if chain.trials == 0:
                    outcome = chain.trial(delay=rng.uniform(0.0, window), after=after)
                else:
                    outcome = chain.trial(delay=rng.uniform(0.0, span / 2), resume_first=True)
                if outcome["killed"]:
                    positions[outcome["position"]] = positions.get(outcome["position"], 0) + 1
            kills += chain.kills
            chain.finish(reference)
        TALLY.add("crash: SIGKILL at a random instant", kills)
        # The instants spread over the whole run: early, mid-run and late kills.
        assert len(positions) == 4 and min(positions.values()) >= 2, positions

    @pytest.mark.parametrize("phase", sorted(WRITE_KILLS))
    def test_sigkill_inside_a_cache_write(
        self,
        phase: str,
        zygote: Zygote,
        tmp_path: Path,
        reference: PipelineResult,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Killed between a write's value files, rows and commit: the entry is all or nothing."""
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        expected = expected_entries(reference)
        chain = Chain(zygote, tmp_path, expected, caplog)
        rng = random.Random(f"{SEED}-{phase}")
        for n in range(WRITE_KILLS[phase]):
            if phase in PENDING_PHASES and n:
                # A batch may be moved in at the end of the run: the re-run would then
                # have no write left to kill. Each of these kills starts a cold run.
                chain.finish(reference)
                chain = Chain(zygote, tmp_path / f"cold{n}", expected, caplog)
                chain.root.mkdir()
            outcome = chain.trial(kill_put=rng.randint(1, 40), phase=phase)
            assert outcome["killed"]
            entry, killed_in = (chain.root / f"log{chain.trials - 1}.killed").read_text().split()
            assert killed_in == phase
            # The interrupted entry is there, whole, once committed or in the pending log;
            # else it is absent.
            assert (entry in outcome["entries"]) == (phase in WRITTEN_PHASES)
            TALLY.add(f"crash: SIGKILL inside a cache write ({phase})")
        chain.finish(reference)
