"""Cancellation: ``context.cancel()`` and the cancel token stop a run promptly."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from conftest import CallRecorder, run

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineResult,
    RetryConfig,
    StageDefinition,
    stage,
)


def long_stage(started: anyio.Event, name: str = "long") -> Any:
    """An async stage that announces itself and then sleeps 10 s."""

    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> str:
        started.set()
        await anyio.sleep(10)
        return "finished"

    return body


def recording(recorder: CallRecorder, name: str) -> Any:
    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> Any:
        recorder.record(name)
        return input

    return body


async def run_and_cancel_when(
    started: anyio.Event,
    stages: list[StageDefinition],
    context: PipelineContext,
    cancel: Any = None,
    initial_input: Any = None,
) -> tuple[PipelineResult, float]:
    """Run ``stages``; once ``started`` is set, cancel; return the result and the delay.

    ``cancel`` (default ``context.cancel``) may be a plain or an async callable.
    """
    box: dict[str, Any] = {}

    async def runner() -> None:
        box["result"] = await run(stages, initial_input, context=context)
        box["ended"] = time.perf_counter()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await started.wait()
            await anyio.wait_all_tasks_blocked()
            cancelled_at = time.perf_counter()
            outcome = (cancel or context.cancel)()
            if inspect.isawaitable(outcome):
                await outcome
    return box["result"], box["ended"] - cancelled_at


class TestCancel:
    async def test_cancel_from_another_task_stops_a_long_stage(
        self, recorder: CallRecorder
    ) -> None:
        """A 10 s stage stops well under 0.5 s after cancel(); pending stages never start."""
        started = anyio.Event()
        context = PipelineContext()
        stages = [
            StageDefinition("long", long_stage(started)),
            StageDefinition("next", recording(recorder, "next"), inputs=["long"]),
            StageDefinition("last", recording(recorder, "last"), inputs=["next"]),
        ]
        result, delay = await run_and_cancel_when(started, stages, context)
        assert delay < 0.5
        assert not result.success
        assert sorted(result.cancelled) == ["last", "long", "next"]
        assert recorder.names() == []
        for sid in ("long", "next", "last"):
            stage_result = result.get_result(sid)
            assert stage_result.cancelled and not stage_result.success
            assert result.outputs[sid] is None
        assert result.get_result("long").metadata["reason"] == "pipeline cancelled"
        assert result.metadata["cancel_reason"] == "pipeline cancelled"
        assert result.executed == []
        assert context.is_cancelled()

    async def test_setting_the_cancel_token_cancels(self) -> None:
        """Setting a caller-owned anyio.Event token cancels like cancel()."""
        started = anyio.Event()
        token = anyio.Event()
        context = PipelineContext(cancel_token=token)
        result, delay = await run_and_cancel_when(
            started, [StageDefinition("long", long_stage(started))], context, cancel=token.set
        )
        assert delay < 0.5
        assert result.cancelled == ["long"]
        assert context.cancel_token is token

    async def test_an_asyncio_event_works_as_cancel_token(self) -> None:
        """An asyncio.Event is accepted as the cancel token."""
        started = anyio.Event()
        token = asyncio.Event()
        context = PipelineContext(cancel_token=token)
        result, delay = await run_and_cancel_when(
            started, [StageDefinition("long", long_stage(started))], context, cancel=token.set
        )
        assert delay < 0.5
        assert result.cancelled == ["long"]

    async def test_cancel_from_a_sync_stage_in_a_worker_thread(
        self, recorder: CallRecorder
    ) -> None:
        """A sync stage calling cancel() from its thread stops the run, even while it blocks."""
        release = threading.Event()
        sibling_started = anyio.Event()

        @stage
        def canceller(input: Any, context: PipelineContext) -> str:
            anyio.from_thread.run(sibling_started.wait)
            context.cancel()
            release.wait(10)
            return "late"

        context = PipelineContext()
        stages = [
            StageDefinition("canceller", canceller),
            StageDefinition("sibling", long_stage(sibling_started, "sibling")),
            StageDefinition("after", recording(recorder, "after"), inputs=["canceller"]),
        ]
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(5):
                result = await run(stages, context=context)
        finally:
            release.set()
        assert time.perf_counter() - t0 < 2
        assert sorted(result.cancelled) == ["after", "canceller", "sibling"]
        assert recorder.names() == []
        assert not result.success

    async def test_cancel_from_a_foreign_thread(self) -> None:
        """cancel() from a thread anyio does not know still wakes the run's loop."""
        started = anyio.Event()
        context = PipelineContext()

        async def cancel_from_thread() -> None:
            thread = threading.Thread(target=context.cancel)
            thread.start()
            await anyio.to_thread.run_sync(thread.join, 5)

        result, delay = await run_and_cancel_when(
            started,
            [StageDefinition("long", long_stage(started))],
            context,
            cancel=cancel_from_thread,
        )
        assert delay < 0.5
        assert result.cancelled == ["long"]

    async def test_cancel_from_inside_a_stage_starts_nothing_new(
        self, recorder: CallRecorder
    ) -> None:
        """A stage that calls cancel() and returns at once does not let its dependant start."""

        @stage
        async def stopper(input: Any, context: PipelineContext) -> str:
            context.cancel()
            return "done"

        result = await run(
            [
                StageDefinition("stopper", stopper),
                StageDefinition("after", recording(recorder, "after"), inputs=["stopper"]),
            ]
        )
        assert recorder.names() == []
        assert not result.success
        assert "after" in result.cancelled

    async def test_cancel_before_the_run_runs_nothing(self, recorder: CallRecorder) -> None:
        """A context cancelled in advance cancels every stage without starting any."""
        context = PipelineContext()
        context.cancel()
        result = await run(
            [
                StageDefinition("a", recording(recorder, "a")),
                StageDefinition("b", recording(recorder, "b"), inputs=["a"]),
            ],
            context=context,
        )
        assert recorder.names() == []
        assert not result.success
        assert sorted(result.cancelled) == ["a", "b"]
        assert sorted(result.stage_results) == ["a", "b"]

    async def test_cancel_during_back_off_ends_at_once(self) -> None:
        """A 10 s back-off wait is cut short by cancel()."""
        failed_once = anyio.Event()

        @stage
        async def flaky(input: Any, context: PipelineContext) -> None:
            failed_once.set()
            raise ConnectionError("down")

        retry = RetryConfig(max_attempts=3, initial_delay_ms=10_000)
        context = PipelineContext()
        result, delay = await run_and_cancel_when(
            failed_once, [StageDefinition("s", flaky, retry_config=retry)], context
        )
        assert delay < 0.5
        assert result.cancelled == ["s"]

    async def test_cancel_during_fan_out_cancels_the_stage(self) -> None:
        """Cancelling mid-FAN_OUT reports the stage cancelled, not failed."""
        started = anyio.Event()

        @stage
        async def item(value: int, context: PipelineContext) -> int:
            started.set()
            await anyio.sleep(10)
            return value

        context = PipelineContext()
        result, delay = await run_and_cancel_when(
            started,
            [StageDefinition("f", item, pattern=ExecutionPattern.FAN_OUT)],
            context,
            initial_input=[1, 2, 3],
        )
        assert delay < 0.5
        assert result.cancelled == ["f"]
        assert result.failed_stages == []

    async def test_a_finished_stage_keeps_its_result(self) -> None:
        """Stages that ended before the cancel keep their successful results."""
        started = anyio.Event()

        @stage
        async def quick(input: Any, context: PipelineContext) -> str:
            return "quick"

        context = PipelineContext()
        result, _ = await run_and_cancel_when(
            started,
            [
                StageDefinition("quick", quick),
                StageDefinition("long", long_stage(started), inputs=["quick"]),
            ],
            context,
        )
        assert result.get_output("quick") == "quick"
        assert result.executed == ["quick"]
        assert result.cancelled == ["long"]


class TestTimeoutIsNotCancellation:
    @pytest.mark.parametrize("fail_fast", [True, False])
    async def test_a_timeout_is_a_failure_not_a_cancel(self, fail_fast: bool) -> None:
        """A stage hitting its time limit is failed, and the run is not marked cancelled."""
        started = anyio.Event()
        result = await run(
            [StageDefinition("t", long_stage(started), timeout_ms=20)], fail_fast=fail_fast
        )
        assert result.failed_stages == ["t"]
        assert result.cancelled == []
        assert "cancel_reason" not in result.metadata
