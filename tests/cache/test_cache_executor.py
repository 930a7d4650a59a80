"""The executor with a cache: hits, misses, force, opt-out, fan-out, single flight, state, safety.

Every test proves what ran by counting stage-body executions (a ``Log`` the bodies
append to); cache metadata and ``PipelineResult`` lists are checked against it.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from helpers import Log, Step, run

from twinklr_pipe import (
    ExecutionPattern,
    FanOutProgress,
    PipelineContext,
    PipelineDefinition,
    PipelineEvent,
    PipelineExecutor,
    StageDefinition,
    StageResult,
    stage,
    success_result,
)
from twinklr_pipe.cache import DiskCacheStore, FileInput, MemoryStore, fingerprint

FAN_OUT = ExecutionPattern.FAN_OUT
CONDITIONAL = ExecutionPattern.CONDITIONAL


class Thing:
    """A plain class instance: the safe codec cannot store it (pickle can)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thing) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class Costly:
    """A class stage that reads and writes state, spends tokens and takes a while."""

    name = "costly"
    version = "3"

    def __init__(self, log: Log, model: str = "offline-1") -> None:
        self.model = model
        self._log = log

    def cache_params(self) -> dict[str, Any]:
        return {"model": self.model}

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        self._log.add("costly")
        lang = context.state["lang"]
        context.set_state("seen", [input, lang])
        context.increment_metric("tokens", 42)
        await anyio.sleep(0.02)
        return success_result({"text": f"{lang}:{input}"}, stage_name=self.name)


class TestResults:
    async def test_cached_and_executed_lists(self) -> None:
        """``cached`` lists hits, ``executed`` lists stages whose body ran; skips are neither."""
        log, store = Log(), MemoryStore()
        stages = [
            StageDefinition("a", Step("a", log)),
            StageDefinition("b", Step("b", log), inputs=["a"]),
            StageDefinition(
                "never", Step("never", log), CONDITIONAL, inputs=["a"], condition=lambda c: False
            ),
        ]
        await run(stages, 1, store=store)
        stages[1] = StageDefinition("b", Step("b", log, version="2"), inputs=["a"])
        result = await run(stages, 1, store=store)
        assert log.take() == ["a", "b", "b"]
        assert result.cached == ["a"]
        assert result.executed == ["b"]
        assert result.skipped == ["never"]
        assert result.stage_results["never"].metadata["cache"] == "off"

    async def test_entry_metadata_records_everything(self, tmp_path: Path) -> None:
        """An entry holds its key's parts, what it cost, its run and its state reads/writes."""
        log = Log()
        store = DiskCacheStore(tmp_path / "cache")
        costly = Costly(log)
        pipe = PipelineDefinition("meta-pipe", [StageDefinition("think", costly)])
        before = time.time()
        result = await run(
            pipe, "hello", store=store, context=PipelineContext(state={"lang": "en"})
        )
        assert result.success and log.take() == ["costly"]
        (meta,) = list(store.iter_metadata())
        assert meta.key == result.stage_results["think"].metadata["key"]
        assert meta.pipeline == "meta-pipe"
        assert meta.stage_id == "think"
        assert meta.stage_identity == f"{Costly.__module__}:{Costly.__qualname__}"
        assert meta.version == "3" and not meta.version_is_source_hash
        assert meta.config_fields == {"model": fingerprint("offline-1")}
        assert meta.config_fingerprint == fingerprint({"model": fingerprint("offline-1")})
        assert meta.input_names == ["<initial input>"]
        assert meta.input_hashes == [fingerprint("hello")]
        assert meta.output_hash == fingerprint({"text": "en:hello"})
        assert meta.codec == "json/1"
        got = store.get(meta.entry_id)
        assert got is not None and meta.size_bytes == len(got[1]) > 0
        assert before <= meta.created_at <= meta.last_used_at <= time.time()
        assert meta.compute_duration_ms >= 15
        assert meta.run_id == result.run_id
        assert meta.state_reads == {"lang": fingerprint("en")}
        assert set(meta.state_writes) == {"seen"}
        assert meta.metrics == {"tokens": 42}
        assert meta.item_index is None and meta.item_fingerprint is None

        # A hit within a minute of the entry's last use records nothing: re-runs seconds
        # apart do not rewrite every entry's access time.
        second = await run(
            pipe, "hello", store=store, context=PipelineContext(state={"lang": "en"})
        )
        assert log.take() == [] and second.cached == ["think"]
        (same,) = list(store.iter_metadata())
        assert same.last_used_at == meta.last_used_at

        # An older last use moves to now; created-at and the run that stored it stay.
        got = store.get(meta.entry_id)
        assert got is not None
        old = meta.model_copy(update={"created_at": before - 300, "last_used_at": before - 120})
        store.put(old, got[1])
        third = await run(pipe, "hello", store=store, context=PipelineContext(state={"lang": "en"}))
        assert log.take() == [] and third.cached == ["think"]
        (again,) = list(store.iter_metadata())
        assert again.created_at == before - 300
        assert before <= again.last_used_at <= time.time()
        assert again.run_id == result.run_id
        store.close()

    async def test_a_hit_run_reports_what_the_cache_saved(self) -> None:
        """``metadata["cache"]`` sums the stored compute time and metrics of every hit."""
        log, store = Log(), MemoryStore()
        pipe = [StageDefinition("think", Costly(log))]
        first = await run(pipe, "x", store=store, context=PipelineContext(state={"lang": "en"}))
        assert first.metadata["cache"]["stored"] == 1
        assert first.metadata["cache"]["saved_ms"] == 0
        second = await run(pipe, "x", store=store, context=PipelineContext(state={"lang": "en"}))
        assert log.take() == ["costly"]
        summary = second.metadata["cache"]
        assert summary["hits"] == 1 and summary["stored"] == 0
        assert summary["saved_ms"] >= 15
        assert summary["saved_metrics"] == {"tokens": 42}
        assert second.stage_results["think"].metadata["saved_ms"] == summary["saved_ms"]


class Loud:
    """An output whose ``repr`` is counted (and would be slow for a real large value)."""

    reprs = 0

    def __repr__(self) -> str:
        Loud.reprs += 1
        return "Loud()"


class TestSyncRun:
    def test_run_never_formats_the_result(self) -> None:
        """``run()`` does not repr() the result (Python 3.11's runner would, on exit)."""

        @stage(version="1")
        def loud(x: int, context: PipelineContext) -> Loud:
            return Loud()

        Loud.reprs = 0
        pipe = PipelineDefinition("p", [StageDefinition("loud", loud, cache=False)])
        result = PipelineExecutor(cache=MemoryStore()).run(pipe, 1)
        assert result.success and isinstance(result.outputs["loud"], Loud)
        assert Loud.reprs == 0


class TestForceAndOptOut:
    async def test_force_reruns_and_stores_the_new_result(self) -> None:
        """A forced stage runs even when cached ("forced"); later runs hit its new output."""
        log, counter = Log(), itertools.count(1)

        @stage(version="1")
        def roll(x: Any, context: PipelineContext) -> int:
            log.add("roll")
            return next(counter)

        store = MemoryStore()
        stages = [
            StageDefinition("roll", roll),
            StageDefinition("use", Step("use", log), inputs=["roll"]),
        ]
        first = await run(stages, 0, store=store)
        assert first.outputs["roll"] == 1
        forced = await run(stages, 0, store=store, force=["roll"])
        assert log.take() == ["roll", "use", "roll", "use"]
        assert forced.outputs["roll"] == 2
        assert forced.stage_results["roll"].metadata["cache"] == "forced"
        assert forced.stage_results["roll"].metadata["status"] == "succeeded"
        assert forced.executed == ["roll", "use"]
        after = await run(stages, 0, store=store)
        assert log.take() == []
        assert after.outputs["roll"] == 2 and after.outputs["use"] == forced.outputs["use"]

    async def test_forced_fan_out_reruns_every_item(self) -> None:
        """``force`` on a FAN_OUT re-runs all of its items, even cached ones."""
        log, store = Log(), MemoryStore()
        stages = [StageDefinition("each", Step("each", log), FAN_OUT)]
        await run(stages, [1, 2, 3], store=store)
        result = await run(stages, [1, 2, 3], store=store, force=["each"])
        assert log.take() == ["each"] * 6
        assert result.stage_results["each"].metadata["cache"] == "forced"
        assert result.stage_results["each"].metadata["items_executed"] == 3

    async def test_cache_false_opts_a_stage_out(self) -> None:
        """An opted-out stage runs every time ("off"); its unchanged output hits downstream."""
        log, store = Log(), MemoryStore()
        stages = [
            StageDefinition("side", Step("side", log), cache=False),
            StageDefinition("after", Step("after", log), inputs=["side"]),
        ]
        for _ in range(3):
            result = await run(stages, 1, store=store)
            assert result.stage_results["side"].metadata["cache"] == "off"
        assert log.take() == ["side", "after", "side", "side"]
        assert result.executed == ["side"] and result.cached == ["after"]
        assert {m.stage_id for m in store.iter_metadata()} == {"after"}


def _items_stage(log: Log, fail_once: set[int] | None = None, delay: float = 0.0) -> Any:
    """A FAN_OUT body ``x -> x * 10`` logging ``item:<x>``; items in ``fail_once`` raise once."""
    pending = set(fail_once or ())

    @stage(version="1")
    async def times_ten(x: int, context: PipelineContext) -> int:
        log.add(f"item:{x}")
        if delay:
            await anyio.sleep(delay)
        if x in pending:
            pending.discard(x)
            raise RuntimeError(f"flaky item {x}")
        return x * 10

    return times_ten


class TestFanOut:
    async def test_failed_run_resumes_with_only_unfinished_items(self) -> None:
        """Items stored before a failure are hits; only the failed and unstarted ones run."""
        log, store = Log(), MemoryStore()
        succeeded: list[int] = []
        crashed = False

        @stage(version="1")
        async def body(x: int, context: PipelineContext) -> int:
            nonlocal crashed
            log.add(f"item:{x}")
            if x == 5 and not crashed:
                # Fail the first time, once four other items have finished.
                while len(succeeded) < 4:
                    await anyio.sleep(0.001)
                crashed = True
                raise RuntimeError("flaky item 5")
            await anyio.lowlevel.checkpoint()
            succeeded.append(x)
            return x * 10

        stages = [StageDefinition("each", body, FAN_OUT, max_concurrent_fan_out=2)]
        items = list(range(20))
        first = await run(stages, items, store=store)
        assert not first.success
        assert "item 5 of 20 failed" in (first.stage_results["each"].error or "")
        ran_first = log.take()
        stored = {m.item_fingerprint for m in store.iter_metadata()}
        assert stored == {fingerprint(x) for x in succeeded} and len(stored) >= 4
        assert len(ran_first) < 20  # the failure stopped the rest

        second = await run(stages, items, store=store)
        assert second.success
        rerun = sorted(int(e.split(":")[1]) for e in log.take())
        assert rerun == sorted(set(items) - set(succeeded[: len(stored)]))
        assert 5 in rerun and len(rerun) == 20 - len(stored)
        assert second.outputs["each"] == [i * 10 for i in items]
        meta = second.stage_results["each"].metadata
        assert meta["cache"] == "miss"
        assert (meta["items_cached"], meta["items_executed"]) == (len(stored), len(rerun))
        assert second.executed == ["each"]

    async def test_changing_one_item_reruns_only_that_item(self) -> None:
        """Items are keyed by their content, not their index: one new value, one execution."""
        log, store = Log(), MemoryStore()
        stages = [
            StageDefinition("each", _items_stage(log), FAN_OUT),
            StageDefinition("total", Step("total", log), inputs=["each"]),
        ]
        await run(stages, [1, 2, 3, 4], store=store)
        log.take()
        result = await run(stages, [4, 2, 30, 1], store=store)  # reordered, one changed
        assert log.take() == ["item:30", "total"]
        assert result.outputs["each"] == [40, 20, 300, 10]
        fully = await run(stages, [4, 2, 30, 1], store=store)
        assert log.take() == [] and sorted(fully.cached) == ["each", "total"]
        assert fully.stage_results["each"].metadata["cache"] == "hit"

    async def test_fan_out_output_hash_is_the_list_fingerprint(self) -> None:
        """A FAN_OUT's list output has the same hash as the same list from an ordinary stage."""
        log, store = Log(), MemoryStore()
        sink = Step("sink", log)
        fanned = [
            StageDefinition("each", _items_stage(log), FAN_OUT),
            StageDefinition("sink", sink, inputs=["each"]),
        ]
        await run(fanned, [1, 2], store=store)

        @stage(version="1")
        def whole(xs: list[int], context: PipelineContext) -> list[int]:
            log.add("whole")
            return [x * 10 for x in xs]

        plain = [StageDefinition("whole", whole), StageDefinition("sink", sink, inputs=["whole"])]
        result = await run(plain, [1, 2], store=store)
        assert log.take() == ["item:1", "item:2", "sink", "whole"]
        assert result.cached == ["sink"]

    async def test_cached_items_never_wait_for_a_slot(self) -> None:
        """With one slot held by a blocked new item, every cached item is still served."""
        log, store = Log(), MemoryStore()
        release = anyio.Event()

        @stage(version="1")
        async def body(x: int, context: PipelineContext) -> int:
            log.add(f"item:{x}")
            if x == 0:
                await release.wait()
            return x

        stages = [StageDefinition("each", body, FAN_OUT, max_concurrent_fan_out=1)]
        release.set()
        await run(stages, list(range(1, 21)), store=store)
        log.take()
        release = anyio.Event()

        def on_event(event: PipelineEvent) -> None:
            # Only once all 20 hits are served does the new item let go of the one slot:
            # were hits queued behind it, this would never happen (fail_after fails it).
            if isinstance(event, FanOutProgress) and event.cached == 20:
                release.set()

        with anyio.fail_after(10):
            result = await run(stages, [0, *range(1, 21)], store=store, on_event=on_event)
        assert result.success and log.take() == ["item:0"]
        assert result.stage_results["each"].metadata["items_cached"] == 20

    async def test_fully_cached_large_fan_out_is_quick_with_one_slot(self) -> None:
        """10,000 cached items with ``max_concurrent_fan_out=1`` do not queue for the slot.

        The items are 1,000 distinct values, each ten times, so filling the cache takes
        1,000 executions; every one of the 10,000 items is then looked up on its own.
        """
        log, store = Log(), MemoryStore()
        distinct = list(range(1_000))
        items = distinct * 10
        body = _items_stage(log, delay=0.01)
        populate = [StageDefinition("each", body, FAN_OUT, max_concurrent_fan_out=None)]
        await run(populate, distinct, store=store)
        assert len(log.take()) == 1_000

        limited = [StageDefinition("each", body, FAN_OUT, max_concurrent_fan_out=1)]
        started = time.perf_counter()
        result = await run(limited, items, store=store)
        elapsed = time.perf_counter() - started
        assert log.take() == []
        assert result.cached == ["each"] and len(result.outputs["each"]) == 10_000
        assert result.stage_results["each"].metadata["items_cached"] == 10_000
        # Through one slot, 10,000 bodies of 10 ms would take >= 100 s: an order less.
        assert elapsed < 10.0, f"cached fan-out took {elapsed:.1f} s"

    async def test_identical_items_in_flight_run_once(self) -> None:
        """Two items with the same value share one execution (single flight per key)."""
        log, store = Log(), MemoryStore()
        stages = [StageDefinition("each", _items_stage(log, delay=0.05), FAN_OUT)]
        result = await run(stages, [7, 7, 8, 7], store=store)
        assert sorted(log.take()) == ["item:7", "item:8"]
        assert result.outputs["each"] == [70, 70, 80, 70]
        assert result.stage_results["each"].metadata["items_cached"] == 2

    async def test_unfingerprintable_item_fails_naming_stage_and_item(self) -> None:
        """An item that cannot be hashed fails its stage with a message naming both."""
        log = Log()
        stages = [StageDefinition("each", _items_stage(log), FAN_OUT)]
        result = await run(stages, [1, object()], store=MemoryStore())
        error = result.stage_results["each"].error or ""
        assert not result.success
        assert "Stage 'each'" in error and "item 1" in error and "builtins.object" in error


class TestSingleFlight:
    async def test_two_stages_with_the_same_work_run_once(self) -> None:
        """Two stages with the same stage object and input run one body between them."""
        log, store = Log(), MemoryStore()
        shared = Step("shared", log, delay=0.05)
        stages = [
            StageDefinition("src", Step("src", log)),
            StageDefinition("left", shared, inputs=["src"]),
            StageDefinition("right", shared, inputs=["src"]),
        ]
        result = await run(stages, 1, store=store)
        assert log.take() == ["src", "shared"]
        assert result.outputs["left"] == result.outputs["right"]
        caches = sorted(result.stage_results[s].metadata["cache"] for s in ("left", "right"))
        assert caches == ["hit", "miss"]
        assert sorted(result.executed) == sorted(
            ["src", *[s for s in ("left", "right") if s not in result.cached]]
        )

    async def test_without_a_cache_identical_work_runs_twice(self) -> None:
        """Without a cache nothing is keyed, so nothing is shared."""
        log = Log()
        shared = Step("shared", log)
        stages = [StageDefinition("left", shared), StageDefinition("right", shared)]
        executor = PipelineExecutor()
        await executor.execute(PipelineDefinition("p", stages), 1)
        assert log.take() == ["shared", "shared"]


class TestState:
    async def test_state_writes_replay_on_a_hit(self) -> None:
        """A hit replays its state writes, so a downstream CONDITIONAL decides the same way."""
        log, store = Log(), MemoryStore()

        @stage(version="1")
        def detect(x: int, context: PipelineContext) -> int:
            log.add("detect")
            context.set_state("mode", "loud" if x > 5 else "quiet")
            return x

        @stage(version="1")
        def react(x: int, context: PipelineContext) -> str:
            log.add("react")
            return f"{context.state['mode']}:{x}"

        stages = [
            StageDefinition("detect", detect),
            StageDefinition(
                "loud",
                react,
                CONDITIONAL,
                ["detect"],
                condition=lambda c: c.state["mode"] == "loud",
            ),
            StageDefinition(
                "quiet",
                react,
                CONDITIONAL,
                ["detect"],
                condition=lambda c: c.state["mode"] == "quiet",
            ),
        ]
        first = await run(stages, 9, store=store)
        assert log.take() == ["detect", "react"]
        context = PipelineContext()
        second = await run(stages, 9, store=store, context=context)
        assert log.take() == []
        assert context.state == {"mode": "loud"}
        assert sorted(second.cached) == ["detect", "loud"] and second.skipped == ["quiet"]
        assert second.outputs == first.outputs

        third = await run(stages, 1, store=store)
        assert log.take() == ["detect", "react"]
        assert third.skipped == ["loud"] and third.outputs["quiet"] == "quiet:1"

    async def test_deleting_state_is_replayed(self) -> None:
        """A stage that deletes a state key deletes it again when served from the cache."""
        log, store = Log(), MemoryStore()

        @stage(version="1")
        def forget(x: int, context: PipelineContext) -> int:
            log.add("forget")
            context.state.pop("secret", None)
            return x

        stages = [StageDefinition("forget", forget)]
        await run(stages, 1, store=store, context=PipelineContext(state={"secret": 1}))
        context = PipelineContext(state={"secret": 1})
        result = await run(stages, 1, store=store, context=context)
        assert log.take() == ["forget"]
        assert result.cached == ["forget"] and "secret" not in context.state

    async def test_changed_state_read_is_a_miss_and_variants_live_side_by_side(self) -> None:
        """A different value of a read state key misses; alternating values both hit later."""
        log, store = Log(), MemoryStore()

        @stage(version="1")
        def greet(x: str, context: PipelineContext) -> str:
            log.add("greet")
            return f"{context.state['lang']}:{x}"

        stages = [StageDefinition("greet", greet)]

        async def with_lang(lang: str) -> Any:
            return await run(
                stages, "bob", store=store, context=PipelineContext(state={"lang": lang})
            )

        assert (await with_lang("en")).outputs["greet"] == "en:bob"
        assert (await with_lang("fr")).outputs["greet"] == "fr:bob"
        assert log.take() == ["greet", "greet"]
        for lang in ("en", "fr", "en", "fr"):
            result = await with_lang(lang)
            assert result.outputs["greet"] == f"{lang}:bob" and result.cached == ["greet"]
        assert log.take() == []
        key = result.stage_results["greet"].metadata["key"]
        assert len(store.variants(key)) == 2

    async def test_reading_an_absent_key_is_recorded(self) -> None:
        """A stage that found a state key absent misses once the key is set."""
        log, store = Log(), MemoryStore()

        @stage(version="1")
        def maybe(x: int, context: PipelineContext) -> Any:
            log.add("maybe")
            return context.state.get("extra", "none")

        stages = [StageDefinition("maybe", maybe)]
        await run(stages, 1, store=store)
        await run(stages, 1, store=store)
        result = await run(stages, 1, store=store, context=PipelineContext(state={"extra": "x"}))
        assert log.take() == ["maybe", "maybe"]
        assert result.outputs["maybe"] == "x"


class TestFileInput:
    async def test_changed_file_is_a_miss(self, tmp_path: Path) -> None:
        """A ``FileInput`` is keyed by its content: an edit misses, the same bytes hit."""
        log, store = Log(), MemoryStore()
        path = tmp_path / "song.txt"
        path.write_text("verse one")

        @stage(version="1")
        def read(f: FileInput, context: PipelineContext) -> str:
            log.add("read")
            return f.path.read_text()

        stages = [
            StageDefinition("read", read),
            StageDefinition("up", Step("up", log), inputs=["read"]),
        ]
        await run(stages, FileInput(path), store=store)
        await run(stages, FileInput(path), store=store)
        assert log.take() == ["read", "up"]
        path.write_text("verse two")  # same size: only the content tells
        result = await run(stages, FileInput(path), store=store)
        assert log.take() == ["read", "up"]
        assert result.outputs["read"] == "verse two"
        copy = tmp_path / "copy.txt"
        copy.write_text("verse two")
        result = await run(stages, FileInput(copy), store=store)
        assert log.take() == [] and sorted(result.cached) == ["read", "up"]


class TestWarmUp:
    async def test_a_rerun_reads_the_entries_of_the_last_run_and_nothing_stale(
        self, tmp_path: Path
    ) -> None:
        """The second run serves every stage from what the first run used; an entry deleted
        since is recomputed (what the last run used is a hint, never a copy)."""
        log = Log()
        store = DiskCacheStore(tmp_path / "cache")
        stages = [StageDefinition("a", Step("a", log))]
        stages += [StageDefinition(f"s{i}", Step(f"s{i}", log), inputs=["a"]) for i in range(4)]
        first = await run(stages, 1, store=store)
        assert len(log.take()) == 5
        assert len(store.warm_up("t")) == 5
        second = await run(stages, 1, store=store)
        assert log.take() == [] and len(second.cached) == 5

        gone = second.stage_results["s2"].metadata["key"]
        (entry,) = [m for m in store.iter_metadata() if m.key == gone]
        assert store.delete(entry.entry_id)
        third = await run(stages, 1, store=store)
        assert log.take() == ["s2"] and third.outputs == first.outputs
        store.close()


class TestKnownKeys:
    async def test_keys_absent_at_the_start_are_not_looked_up(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With few entries, a run reads the store's keys once and looks up only those
        (and what it stores itself); with many, it looks every key up."""
        from twinklr_pipe.cache import _runtime

        log = Log()
        store = DiskCacheStore(tmp_path / "cache")
        stages = [StageDefinition("a", Step("a", log))]
        stages += [StageDefinition(f"s{i}", Step(f"s{i}", log), inputs=["a"]) for i in range(3)]
        looked_up: list[str] = []
        real = store._hit_candidates

        def counting(key: str) -> Any:
            looked_up.append(key)
            return real(key)

        monkeypatch.setattr(store, "_hit_candidates", counting)
        await run(stages, 1, store=store)
        assert len(log.take()) == 4 and looked_up == []  # an empty store: nothing to ask
        await run(stages[:1], 2, store=store)  # a new input: one new key, not looked up
        assert log.take() == ["a"] and looked_up == []

        monkeypatch.setattr(_runtime, "_KNOWN_KEYS_LIMIT", 0)  # "many entries"
        again = await run(stages, 3, store=store)
        assert len(log.take()) == 4 and len(looked_up) == 4  # every miss asked
        assert len(again.executed) == 4
        store.close()


class TestLockedDatabase:
    async def test_entries_are_stored_while_another_connection_holds_the_lock(
        self, tmp_path: Path
    ) -> None:
        """Writes that cannot happen on the event loop at once wait in a thread: the run
        goes on, and every entry is stored once the lock is released."""
        import sqlite3
        import threading

        log = Log()
        store = DiskCacheStore(tmp_path / "cache")
        stages = [StageDefinition("a", Step("a", log))]
        stages += [StageDefinition(f"s{i}", Step(f"s{i}", log), inputs=["a"]) for i in range(5)]
        other = sqlite3.connect(
            store.directory / "store" / "cache.db", isolation_level=None, check_same_thread=False
        )
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()
        first = await run(stages, 1, store=store)
        assert first.success and len(log.take()) == 6
        assert first.metadata["cache"]["stored"] == 6
        again = await run(stages, 1, store=store)
        assert log.take() == [] and len(again.cached) == 6
        other.close()
        store.close()


class TestSafety:
    async def test_corrupted_payload_is_recomputed_with_a_warning(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A payload file with flipped bytes is a miss: warned, evicted, computed again."""
        log = Log()

        @stage(version="1")
        def big(x: int, context: PipelineContext) -> str:
            log.add("big")
            return "x" * 40_000 + str(x)  # > 32 KB: stored as its own file

        @stage(version="1")
        def after(text: str, context: PipelineContext) -> int:
            log.add("after")
            return len(text)

        stages = [StageDefinition("big", big), StageDefinition("after", after, inputs=["big"])]
        with DiskCacheStore(tmp_path / "cache") as store:
            first = await run(stages, 1, store=store)
        (payload_file,) = [p for p in (tmp_path / "cache").rglob("*") if p.suffix == ".val"]
        data = bytearray(payload_file.read_bytes())
        data[1000:1004] = b"yyyy"
        payload_file.write_bytes(bytes(data))
        log.take()

        with (
            caplog.at_level(logging.WARNING, logger="twinklr_pipe"),
            DiskCacheStore(tmp_path / "cache") as store,
        ):
            second = await run(stages, 1, store=store)
            assert log.take() == ["big"]
            assert second.success and second.outputs == first.outputs
            assert second.stage_results["big"].metadata["cache"] == "miss"
            assert second.cached == ["after"]
            third = await run(stages, 1, store=store)
            assert log.take() == [] and sorted(third.cached) == ["after", "big"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("'big'" in w and "corrupt" in w for w in warnings), warnings

    @pytest.mark.parametrize(
        ("output", "tamper"),
        [
            ({"plain": [1, 2]}, lambda payload: b'{"plain":[1,3]}'),  # other valid JSON
            (b"raw bytes", lambda payload: b"raw bytez"),
            ((1, "tagged"), lambda payload: payload.replace(b"tagged", b"taggeX")),
        ],
        ids=["json", "bytes", "tagged-json"],
    )
    async def test_payload_changed_under_a_store_that_does_not_check_is_a_miss(
        self, output: Any, tamper: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Served payloads are checked against the entry, whatever the store checks itself."""
        log = Log()

        class Tampering(MemoryStore):
            def get(self, entry_id: str) -> Any:
                got = super().get(entry_id)
                return None if got is None else (got[0], tamper(got[1]))

        @stage(version="1")
        def make(x: int, context: PipelineContext) -> Any:
            log.add("make")
            return output

        store = Tampering()
        stages = [StageDefinition("make", make)]
        await run(stages, 1, store=store)
        with caplog.at_level(logging.WARNING, logger="twinklr_pipe"):
            result = await run(stages, 1, store=store)
        assert log.take() == ["make", "make"]
        assert result.outputs["make"] == output and result.executed == ["make"]
        assert any("'make'" in r.getMessage() for r in caplog.records)

    async def test_damaged_output_hash_is_a_miss(self) -> None:
        """Metadata whose recorded output hash is damaged is never served."""
        log = Log()

        class Damaging(MemoryStore):
            def get(self, entry_id: str) -> Any:
                got = super().get(entry_id)
                if got is None:
                    return None
                return got[0].model_copy(update={"output_hash": "0" * 30}), got[1]

        stages = [
            StageDefinition("s", Step("s", log)),
            StageDefinition("t", Step("t", log), inputs=["s"]),
        ]
        store = Damaging()
        await run(stages, 1, store=store)
        result = await run(stages, 1, store=store)
        assert log.take() == ["s", "t", "s", "t"]
        assert result.success

    async def test_non_cacheable_output_fails_with_the_way_out(self) -> None:
        """An output the safe codec cannot store fails naming the stage, type and opt-in."""
        log = Log()

        @stage(version="1")
        def make(x: int, context: PipelineContext) -> Thing:
            log.add("make")
            return Thing(x)

        stages = [StageDefinition("make", make)]
        result = await run(stages, 1, store=MemoryStore())
        error = result.stage_results["make"].error or ""
        assert not result.success and result.failed_stages == ["make"]
        assert "Stage 'make'" in error
        assert f"{Thing.__module__}.Thing" in error
        assert "allow_pickle=True" in error
        assert error.count("Stage 'make'") == 1

    async def test_allow_pickle_stores_and_serves_it(self) -> None:
        """With ``allow_pickle=True`` it is stored and served; without, never unpickled."""
        log, store = Log(), MemoryStore()

        @stage(version="1")
        def make(x: int, context: PipelineContext) -> Thing:
            log.add("make")
            return Thing(x)

        stages = [
            StageDefinition("make", make),
            StageDefinition("after", Step("after", log), inputs=["make"]),
        ]
        first = await run(stages, 1, store=store, allow_pickle=True)
        assert first.success
        second = await run(stages, 1, store=store, allow_pickle=True)
        assert log.take() == ["make", "after"]
        assert second.outputs["make"] == Thing(1) and sorted(second.cached) == ["after", "make"]

        refused = await run(stages, 1, store=store)  # allow_pickle=False: a miss, then fails
        assert log.take() == ["make"]
        assert "allow_pickle=True" in (refused.stage_results["make"].error or "")

    async def test_unfingerprintable_input_fails_naming_the_stage(self) -> None:
        """An initial input that cannot be hashed fails the entry stage, naming it; no body runs."""
        log = Log()
        result = await run(
            [StageDefinition("entry", Step("entry", log))], object(), store=MemoryStore()
        )
        error = result.stage_results["entry"].error or ""
        assert not result.success and log.take() == []
        assert "Stage 'entry'" in error and "builtins.object" in error and "cache=False" in error

    async def test_unfingerprintable_upstream_output_names_stage_and_input(self) -> None:
        """Downstream of an opted-out stage, an unhashable input fails naming stage and input."""
        log = Log()

        @stage(version="1")
        def opaque(x: int, context: PipelineContext) -> Any:
            log.add("opaque")
            return {"handle": object()}

        stages = [
            StageDefinition("opaque", opaque, cache=False),
            StageDefinition("next", Step("next", log), inputs=["opaque"]),
        ]
        result = await run(stages, 1, store=MemoryStore())
        error = result.stage_results["next"].error or ""
        assert result.failed_stages == ["next"] and log.take() == ["opaque"]
        assert "Stage 'next'" in error and "input 'opaque'" in error
        assert "builtins.object" in error

    async def test_failures_are_never_cached(self) -> None:
        """A failed stage runs again next time; nothing was stored for it."""
        log, store = Log(), MemoryStore()
        attempts = itertools.count()

        @stage(version="1")
        def flaky(x: int, context: PipelineContext) -> int:
            log.add("flaky")
            if next(attempts) == 0:
                raise RuntimeError("first time")
            return x

        stages = [StageDefinition("flaky", flaky)]
        assert not (await run(stages, 1, store=store)).success
        assert list(store.iter_metadata()) == []
        assert (await run(stages, 1, store=store)).executed == ["flaky"]
        assert (await run(stages, 1, store=store)).cached == ["flaky"]
        assert log.take() == ["flaky", "flaky"]


class TestStageKeyErrors:
    async def test_a_non_str_version_fails_the_stage_with_one_clear_error(self) -> None:
        """A stage whose version is not a str fails by name; the run returns normally."""
        from twinklr_pipe import PipelineDefinition, PipelineExecutor, success_result

        class Numbered:
            name = "numbered"
            version = 3

            async def execute(self, value: object, context: object) -> object:
                return success_result(1, stage_name="numbered")

        pipeline = PipelineDefinition("p", [StageDefinition("s", Numbered())])
        result = await PipelineExecutor(cache=MemoryStore()).execute(pipeline)
        assert not result.success
        error = result.get_result("s").error
        assert error is not None
        assert error.startswith("Stage 's': cannot compute its cache key: TypeError: ")
        assert "version must be a str" in error

    async def test_lambdas_and_factory_closures_never_share_entries(self) -> None:
        """Same-named lambdas or factory-made stages with one explicit version never collide."""
        from twinklr_pipe import PipelineDefinition, PipelineExecutor, stage

        def make(k: int) -> object:
            @stage(version="1")
            async def mul(x: int, context: object) -> int:
                return x * k

            return mul

        plus = stage(lambda x, c: x + 1, version="1")
        double = stage(lambda x, c: x * 2, version="1")
        executor = PipelineExecutor(cache=MemoryStore())
        outputs = []
        for body in (plus, double, make(2), make(3)):
            result = await executor.execute(
                PipelineDefinition("p", [StageDefinition("s", body)]), 10
            )
            assert result.cached == []
            outputs.append(result.get_output("s"))
        assert outputs == [11, 20, 20, 30]
        again = await executor.execute(PipelineDefinition("p", [StageDefinition("s", make(3))]), 10)
        assert again.cached == ["s"] and again.get_output("s") == 30
