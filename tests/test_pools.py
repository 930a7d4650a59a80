"""Shared resource pools: slot budgets across stages, per-minute rate windows, the
context's ``pool()``, and the time spent waiting in results and events."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineEvent,
    PipelineExecutor,
    PoolWaited,
    StageDefinition,
    StageFinished,
    stage,
)
from twinklr_pipe._pools import PoolLimit, PoolSet, RateWindow
from twinklr_pipe.cache import MemoryStore

FAN_OUT = ExecutionPattern.FAN_OUT


class Peak:
    """Counts bodies running at once (from tasks and threads) and remembers the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.calls = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Peak:
        with self._lock:
            self.current += 1
            self.calls += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.current -= 1


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def pipeline(*stages: StageDefinition) -> PipelineDefinition:
    return PipelineDefinition("pools", list(stages))


class TestPoolLimit:
    def test_an_int_is_a_concurrency_limit(self) -> None:
        """A bare number in ``pools=`` means that many slots and no rate limit."""
        pools = PoolSet({"llm": 3})
        assert pools.pools["llm"].limit == PoolLimit(concurrency=3)
        assert pools.pools["llm"].rate is None

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"concurrency": 0}, "concurrency must be at least 1, got 0"),
            ({"concurrency": 1, "per_minute": 0}, "per_minute must be at least 1, got 0"),
        ],
    )
    def test_non_positive_limits_are_rejected(self, kwargs: dict[str, Any], message: str) -> None:
        """A pool with no slots, or no starts per minute, could never run anything."""
        with pytest.raises(ValueError, match=message):
            PoolLimit(**kwargs)


class TestSharedSlots:
    async def test_two_fan_outs_sharing_a_pool_of_two_never_exceed_two(self) -> None:
        """Two FAN_OUT stages of 20 items on one pool of 2: at most 2 bodies at once."""
        peak = Peak()

        @stage
        async def ask(item: int, context: PipelineContext) -> int:
            with peak:
                await anyio.sleep(0.002)
            return item * 2

        @stage
        def render(item: int, context: PipelineContext) -> int:  # a sync body: a thread
            with peak:
                threading.Event().wait(0.002)
            return item + 1

        items = list(range(20))
        definition = pipeline(
            StageDefinition(
                "ask", ask, pattern=FAN_OUT, pools=["llm"], max_concurrent_fan_out=None
            ),
            StageDefinition("render", render, pattern=FAN_OUT, pools=["llm"]),
        )
        result = await PipelineExecutor(pools={"llm": 2}).execute(definition, items)

        assert result.success, result.failed_stages
        assert result.outputs == {"ask": [i * 2 for i in items], "render": [i + 1 for i in items]}
        assert peak.calls == 40
        assert peak.peak == 2

    async def test_cache_hits_take_no_slot(self) -> None:
        """A cached FAN_OUT is served while another stage holds the pool's only slot."""
        peak = Peak()

        @stage(version="1")
        async def ask(item: int, context: PipelineContext) -> int:
            with peak:
                await anyio.sleep(0)
            return item * 10

        fan = StageDefinition("fan", ask, pattern=FAN_OUT, pools=["llm"])
        executor = PipelineExecutor(cache=MemoryStore(), pools={"llm": 1})
        warm = await executor.execute(pipeline(fan), [1, 2, 3])
        assert warm.success and peak.calls == 3

        fan_done = anyio.Event()

        @stage
        async def hog(value: Any, context: PipelineContext) -> str:
            async with context.pool("llm"):
                await fan_done.wait()  # releases the slot only after "fan" has finished
            return "done"

        waits: list[PoolWaited] = []

        def on_event(event: PipelineEvent) -> None:
            if isinstance(event, PoolWaited):
                waits.append(event)
            if isinstance(event, StageFinished) and event.stage_id == "fan":
                fan_done.set()

        with anyio.fail_after(5):  # a hit that wanted a slot would deadlock with "hog"
            result = await executor.execute(
                pipeline(StageDefinition("hog", hog, cache=False), fan),
                [1, 2, 3],
                on_event=on_event,
            )

        assert result.success, result.failed_stages
        assert result.cached == ["fan"]
        assert result.outputs["fan"] == [10, 20, 30]
        assert peak.calls == 3
        assert "pool_wait_ms" not in result.stage_results["fan"].metadata
        assert waits == []  # context.pool() waits are the stage's own; bodies never waited


class TestRateWindow:
    async def test_at_most_per_minute_starts_in_any_window(self) -> None:
        """Bursts wait for the window to slide: 3 per minute gives starts at 0, 0, 0, 60..."""
        clock = FakeClock()
        window = RateWindow(3, clock=clock, sleep=clock.sleep)
        starts = []
        for _ in range(7):
            await window.acquire()
            starts.append(clock.now)

        assert starts == [0, 0, 0, 60, 60, 60, 120]
        for t in starts:  # no 60-second window holds more than 3 starts
            assert sum(1 for s in starts if t <= s < t + 60) <= 3

    async def test_the_window_slides_with_each_start(self) -> None:
        """A start frees its place exactly 60 s after it was made, not at a fixed boundary."""
        clock = FakeClock()
        window = RateWindow(2, clock=clock, sleep=clock.sleep)
        await window.acquire()  # t=0
        clock.now = 45.0
        await window.acquire()  # t=45
        clock.now = 50.0
        await window.acquire()  # must wait for t=0 to leave: until t=60
        assert clock.now == 60.0
        await window.acquire()  # next frees at 45 + 60
        assert clock.now == 105.0
        assert clock.sleeps == [10.0, 45.0]

    async def test_concurrent_waiters_are_served_in_turn(self) -> None:
        """Ten tasks racing for a 4-per-minute pool start in three minutes' worth of windows."""
        clock = FakeClock()
        pools = PoolSet({"llm": PoolLimit(concurrency=10, per_minute=4)})
        pools.pools["llm"].rate = RateWindow(4, clock=clock, sleep=clock.sleep)
        starts: list[float] = []

        async def call() -> None:
            async with pools.hold(["llm"]):
                starts.append(clock.now)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(call)

        assert sorted(starts) == [0] * 4 + [60] * 4 + [120] * 2

    def test_a_pool_with_per_minute_gets_a_rate_window(self) -> None:
        """``PoolLimit(per_minute=...)`` attaches a 60-second window to the pool."""
        pools = PoolSet({"llm": PoolLimit(concurrency=8, per_minute=60)})
        rate = pools.pools["llm"].rate
        assert rate is not None and rate.per_minute == 60 and rate.window == 60


class TestContextPool:
    async def test_context_pool_holds_a_slot_around_a_block(self) -> None:
        """Stages holding ``context.pool("llm")`` themselves share its one slot."""
        peak = Peak()

        def caller(name: str) -> Any:
            @stage(name=name)
            async def body(value: Any, context: PipelineContext) -> str:
                await anyio.sleep(0)  # work outside the pool runs concurrently
                async with context.pool("llm"):
                    with peak:
                        await anyio.sleep(0.005)
                return name

            return body

        definition = pipeline(*(StageDefinition(n, caller(n)) for n in ("a", "b", "c")))
        result = await PipelineExecutor(pools={"llm": 1}).execute(definition)

        assert result.success
        assert peak.calls == 3
        assert peak.peak == 1

    async def test_unknown_pool_in_context_is_a_clear_error(self) -> None:
        """``context.pool`` with a name the executor lacks fails the stage naming both."""

        @stage
        async def body(value: Any, context: PipelineContext) -> str:
            async with context.pool("gpu"):
                return "never"

        result = await PipelineExecutor(pools={"llm": 1}).execute(
            pipeline(StageDefinition("s", body))
        )
        error = result.stage_results["s"].error or ""
        assert "No resource pool 'gpu'; the executor has: llm" in error

    async def test_context_pool_without_pools_is_a_clear_error(self) -> None:
        """With no pools configured at all, the message says how to add one."""

        @stage
        async def body(value: Any, context: PipelineContext) -> str:
            async with context.pool("llm"):
                return "never"

        result = await PipelineExecutor().execute(pipeline(StageDefinition("s", body)))
        error = result.stage_results["s"].error or ""
        assert "No resource pool 'llm'" in error
        assert "pass pools={...} to PipelineExecutor" in error

    async def test_unknown_pool_in_a_definition_is_a_validation_problem(self) -> None:
        """A stage naming a pool the executor lacks fails the run before anything starts."""
        ran = []

        @stage
        async def body(value: Any, context: PipelineContext) -> None:
            ran.append(value)

        result = await PipelineExecutor(pools={"llm": 1}).execute(
            pipeline(StageDefinition("s", body, pools=["gpu"]))
        )
        assert not result.success and ran == []
        assert result.metadata["errors"] == [
            "Stage 's' uses unknown resource pool(s) ['gpu']; pass pools={...} to "
            "PipelineExecutor (it has: llm)"
        ]


class TestWaitReporting:
    async def test_pool_wait_ms_in_metadata_and_pool_waited_events(self) -> None:
        """Each body reports its wait per pool; the stage's metadata sums them."""
        events: list[PoolWaited] = []
        release = anyio.Event()

        @stage
        async def slow(item: int, context: PipelineContext) -> int:
            await release.wait()
            return item

        @stage
        async def quick(value: Any, context: PipelineContext) -> str:
            return "ok"

        async def let_go() -> None:
            await anyio.wait_all_tasks_blocked()  # one item holds "llm", two queue on it
            await anyio.sleep(0.02)
            release.set()

        definition = pipeline(
            StageDefinition("fan", slow, pattern=FAN_OUT, pools=["llm", "gpu"]),
            StageDefinition("one", quick, inputs=["fan"], pools=["llm"]),
        )
        executor = PipelineExecutor(pools={"llm": 1, "gpu": 3})
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            result = await executor.execute(
                definition,
                [1, 2, 3],
                on_event=lambda e: events.append(e) if isinstance(e, PoolWaited) else None,
            )

        assert result.success
        fan_waits = [e for e in events if e.stage_id == "fan"]
        assert (
            sorted((e.pool, e.stage_id) for e in fan_waits)
            == [("gpu", "fan")] * 3 + [("llm", "fan")] * 3
        )
        assert max(e.waited_ms for e in fan_waits if e.pool == "llm") >= 20
        fan_meta = result.stage_results["fan"].metadata
        assert fan_meta["pool_wait_ms"] == pytest.approx(sum(e.waited_ms for e in fan_waits))
        assert [(e.stage_id, e.pool) for e in events if e.stage_id == "one"] == [("one", "llm")]
        assert "pool_wait_ms" in result.stage_results["one"].metadata


class TestPoolWaitReporting:
    async def test_json_result_and_summary_show_pool_waiting_time(self) -> None:
        """``pipe run --json`` and the summary table report time spent waiting for pools."""
        import io

        from twinklr_pipe import PipelineDefinition, PipelineExecutor, StageDefinition, stage
        from twinklr_pipe._admin import result_to_dict
        from twinklr_pipe._live import LiveView

        @stage
        async def slow(value: object, context: object) -> int:
            await anyio.sleep(0.05)
            return 1

        pipeline = PipelineDefinition(
            "pooled",
            [
                StageDefinition("first", slow, pools=["gpu"]),
                StageDefinition("second", slow, pools=["gpu"]),
            ],
        )
        out = io.StringIO()
        view = LiveView(["first", "second"], live=False, file=out)
        result = await PipelineExecutor(pools={"gpu": 1}).execute(pipeline, on_event=view.on_event)
        view.print_summary(result)
        waits = [
            result_to_dict(result)["stages"][sid]["pool_wait_ms"] for sid in ("first", "second")
        ]
        assert max(waits) >= 30  # one of them waited for the other's slot
        assert "POOL WAIT" in out.getvalue()
        assert "for pools)" in out.getvalue()
