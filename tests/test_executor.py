"""PipelineExecutor semantics: inputs, scheduling, FAN_OUT, CONDITIONAL, errors, retries,
fail-fast, results, metrics, events and the context."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import CallRecorder, InFlight, pipeline, run

import twinklr_pipe._executor as executor_module
from twinklr_pipe import (
    ExecutionPattern,
    FanOutProgress,
    PipelineContext,
    PipelineEvent,
    PipelineExecutor,
    RetryConfig,
    RunFinished,
    RunStarted,
    StageDefinition,
    StageFinished,
    StageResult,
    StageStarted,
    StageStatus,
    current_context,
    failure_result,
    stage,
    success_result,
)
from twinklr_pipe._retry import delay_ms

FAN_OUT = ExecutionPattern.FAN_OUT
CONDITIONAL = ExecutionPattern.CONDITIONAL


def echo(name: str, recorder: CallRecorder | None = None) -> Any:
    """An async stage that records its start and returns its input."""

    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> Any:
        if recorder is not None:
            recorder.record(name)
        return input

    return body


def const(value: Any, name: str = "const") -> Any:
    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> Any:
        return value

    return body


def raising(exc: BaseException, recorder: CallRecorder | None = None, name: str = "bad") -> Any:
    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> Any:
        if recorder is not None:
            recorder.record(name)
        raise exc

    return body


def sleeper(seconds: float, recorder: CallRecorder, name: str) -> Any:
    """Records start and end around ``anyio.sleep(seconds)``."""

    @stage(name=name)
    async def body(input: Any, context: PipelineContext) -> Any:
        recorder.record(name, "start")
        await anyio.sleep(seconds)
        recorder.record(name, "end")
        return name

    return body


class ReturnsRaw:
    """A PipelineStage (no decorator) returning whatever it was given, unwrapped."""

    name = "raw"

    def __init__(self, value: Any) -> None:
        self.value = value

    async def execute(self, input: Any, context: PipelineContext) -> Any:
        return self.value


class TestInputs:
    async def test_entry_stage_receives_the_initial_input(self) -> None:
        """A stage without inputs gets ``initial_input``."""
        result = await run([StageDefinition("a", echo("a"))], initial_input="song.wav")
        assert result.get_output("a") == "song.wav"

    async def test_every_entry_stage_receives_the_initial_input(self) -> None:
        """Several entry points all get the same initial input."""
        result = await run([StageDefinition("a", echo("a")), StageDefinition("b", echo("b"))], 7)
        assert result.outputs == {"a": 7, "b": 7}

    async def test_one_input_receives_that_output(self) -> None:
        """A single input is passed as the upstream output itself."""
        result = await run(
            [StageDefinition("a", const([1, 2])), StageDefinition("b", echo("b"), inputs=["a"])]
        )
        assert result.get_output("b") == [1, 2]

    async def test_several_inputs_receive_a_dict_by_id(self) -> None:
        """Several inputs are passed as ``{input_id: output}``."""
        result = await run(
            [
                StageDefinition("a", const(1)),
                StageDefinition("b", const(2)),
                StageDefinition("c", echo("c"), inputs=["b", "a"]),
            ]
        )
        assert result.get_output("c") == {"b": 2, "a": 1}

    async def test_stage_object_without_decorator_is_run(self) -> None:
        """Any object with ``name`` and an async ``execute`` is a stage."""

        class Upper:
            name = "upper"

            async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
                return success_result(input.upper(), stage_name=self.name)

        result = await run([StageDefinition("u", Upper())], "abc")
        assert result.get_output("u") == "ABC"
        assert result.get_result("u").stage_name == "upper"


class TestScheduling:
    async def test_fast_branch_finishes_before_slow_sibling_ends(
        self, recorder: CallRecorder
    ) -> None:
        """A 0.05 s branch (two stages) completes while a 0.5 s sibling is still running."""
        result = await run(
            [
                StageDefinition("root", echo("root")),
                StageDefinition("slow", sleeper(0.5, recorder, "slow"), inputs=["root"]),
                StageDefinition("fast", sleeper(0.05, recorder, "fast"), inputs=["root"]),
                StageDefinition("after_fast", sleeper(0, recorder, "after_fast"), inputs=["fast"]),
            ]
        )
        assert result.success
        assert recorder.time_of("after_fast", "end") < recorder.time_of("slow", "end")
        assert recorder.index("after_fast", "end") < recorder.index("slow", "end")

    async def test_a_stage_starts_when_its_last_input_completes_not_in_waves(self) -> None:
        """A dependant of a fast stage runs while its slow cousin still waits (no levels)."""
        downstream_ran = anyio.Event()

        @stage
        async def slow(input: Any, context: PipelineContext) -> str:
            # Only finishes once the other branch's second stage has run: with
            # wave scheduling that stage would wait for this one, a deadlock.
            with anyio.fail_after(5):
                await downstream_ran.wait()
            return "slow"

        @stage
        async def fast(input: Any, context: PipelineContext) -> str:
            return "fast"

        @stage
        async def after_fast(input: Any, context: PipelineContext) -> str:
            downstream_ran.set()
            return "after"

        result = await run(
            [
                StageDefinition("slow", slow),
                StageDefinition("fast", fast),
                StageDefinition("after_fast", after_fast, inputs=["fast"]),
                StageDefinition("join", echo("join"), inputs=["slow", "after_fast"]),
            ]
        )
        assert result.success
        assert result.get_output("join") == {"slow": "slow", "after_fast": "after"}

    async def test_independent_stages_run_concurrently(self) -> None:
        """Three independent stages are all in flight at once."""
        in_flight = InFlight()
        all_in = anyio.Event()

        def concurrent(name: str) -> Any:
            @stage(name=name)
            async def body(input: Any, context: PipelineContext) -> str:
                with in_flight:
                    if in_flight.current == 3:
                        all_in.set()
                    with anyio.fail_after(5):
                        await all_in.wait()
                return name

            return body

        result = await run([StageDefinition(n, concurrent(n)) for n in ("a", "b", "c")])
        assert result.success and in_flight.peak == 3

    async def test_a_stage_waits_for_all_of_its_inputs(self, recorder: CallRecorder) -> None:
        """A join starts only after every input has ended."""
        result = await run(
            [
                StageDefinition("a", sleeper(0.02, recorder, "a")),
                StageDefinition("b", sleeper(0, recorder, "b")),
                StageDefinition("join", sleeper(0, recorder, "join"), inputs=["a", "b"]),
            ]
        )
        assert result.success
        assert recorder.index("join", "start") > recorder.index("a", "end")
        assert recorder.index("join", "start") > recorder.index("b", "end")

    async def test_a_long_chain_of_trivial_stages_runs_in_order(self) -> None:
        """300 chained stages that never await each see their predecessor's output."""

        @stage
        async def increment(value: int, context: PipelineContext) -> int:
            return value + 1

        stages = [StageDefinition("s0", increment)]
        stages += [StageDefinition(f"s{i}", increment, inputs=[f"s{i - 1}"]) for i in range(1, 300)]
        result = await run(stages, 0)
        assert result.get_output("s299") == 300
        assert len(result.executed) == 300

    async def test_a_chain_of_trivial_stages_does_not_starve_other_tasks(self) -> None:
        """A sibling keeps making progress while a 200-stage non-awaiting chain runs."""
        progress: list[int] = []

        @stage
        async def increment(value: int, context: PipelineContext) -> int:
            progress.append(-1)
            return value + 1

        @stage
        async def ticker(value: Any, context: PipelineContext) -> None:
            for tick in range(3):
                await anyio.lowlevel.checkpoint()
                progress.append(tick)

        stages = [StageDefinition("ticker", ticker), StageDefinition("s0", increment)]
        stages += [StageDefinition(f"s{i}", increment, inputs=[f"s{i - 1}"]) for i in range(1, 200)]
        result = await run(stages, 0)
        assert result.success
        assert progress.index(2) < len(progress) - 1
        assert progress[-1] == -1

    async def test_parallel_behaves_like_sequential(self) -> None:
        """PARALLEL is a readability alias: same inputs, same output."""
        result = await run(
            [
                StageDefinition("a", const(5)),
                StageDefinition("p", echo("p"), pattern=ExecutionPattern.PARALLEL, inputs=["a"]),
            ]
        )
        assert result.get_output("p") == 5
        assert result.get_result("p").metadata["status"] == "succeeded"

    async def test_each_stage_of_a_diamond_runs_once(self, recorder: CallRecorder) -> None:
        """A shared input runs once however many stages use it."""
        result = await run(
            [
                StageDefinition("a", echo("a", recorder)),
                StageDefinition("b", echo("b", recorder), inputs=["a"]),
                StageDefinition("c", echo("c", recorder), inputs=["a"]),
                StageDefinition("d", echo("d", recorder), inputs=["b", "c"]),
            ],
            1,
        )
        assert sorted(recorder.names()) == ["a", "b", "c", "d"]
        assert result.get_output("d") == {"b": 1, "c": 1}


class TestFanOut:
    async def test_output_keeps_input_order(self) -> None:
        """Items finishing in reverse order still give outputs in input order."""

        @stage
        async def later_first(item: int, context: PipelineContext) -> int:
            await anyio.sleep((5 - item) * 0.005)
            return item * 10

        result = await run(
            [StageDefinition("f", later_first, pattern=FAN_OUT, max_concurrent_fan_out=None)],
            [0, 1, 2, 3, 4],
        )
        assert result.get_output("f") == [0, 10, 20, 30, 40]

    async def test_concurrency_never_exceeds_the_limit(self) -> None:
        """At most ``max_concurrent_fan_out`` item bodies run at once, and the limit is used."""
        in_flight = InFlight()

        @stage
        async def item_body(item: int, context: PipelineContext) -> int:
            with in_flight:
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
            return item

        result = await run(
            [StageDefinition("f", item_body, pattern=FAN_OUT, max_concurrent_fan_out=3)],
            list(range(30)),
        )
        assert result.get_output("f") == list(range(30))
        assert in_flight.peak == 3

    async def test_none_means_unbounded(self) -> None:
        """With no limit all 60 items are in flight together."""
        in_flight = InFlight()
        all_in = anyio.Event()

        @stage
        async def item_body(item: int, context: PipelineContext) -> int:
            with in_flight:
                if in_flight.current == 60:
                    all_in.set()
                with anyio.fail_after(5):
                    await all_in.wait()
            return item

        result = await run(
            [StageDefinition("f", item_body, pattern=FAN_OUT, max_concurrent_fan_out=None)],
            list(range(60)),
        )
        assert result.success and in_flight.peak == 60

    async def test_tuple_input_fans_out(self) -> None:
        """A tuple is fanned like a list; the output is a list."""

        @stage
        async def double(item: int, context: PipelineContext) -> int:
            return item * 2

        result = await run([StageDefinition("f", double, pattern=FAN_OUT)], (1, 2, 3))
        assert result.get_output("f") == [2, 4, 6]

    async def test_empty_list_gives_empty_output(self) -> None:
        """Zero items run nothing and output ``[]``."""
        result = await run([StageDefinition("f", raising(ValueError()), pattern=FAN_OUT)], [])
        assert result.success and result.get_output("f") == []

    async def test_fan_out_over_one_of_several_inputs(self) -> None:
        """Each call gets the inputs dict with the fanned input replaced by its item."""

        @stage
        async def tag(value: dict[str, Any], context: PipelineContext) -> str:
            return f"{value['prefix']}{value['groups']}"

        result = await run(
            [
                StageDefinition("prefix", const("g-")),
                StageDefinition("groups", const(["a", "b", "c"])),
                StageDefinition(
                    "f", tag, pattern=FAN_OUT, inputs=["prefix", "groups"], fan_out_over="groups"
                ),
            ]
        )
        assert result.get_output("f") == ["g-a", "g-b", "g-c"]

    async def test_non_list_input_fails_naming_stage_and_type(self) -> None:
        """Fanning over a dict fails clearly instead of iterating its keys."""
        result = await run(
            [
                StageDefinition("src", const({"a": 1})),
                StageDefinition("f", echo("f"), pattern=FAN_OUT, inputs=["src"]),
            ]
        )
        assert not result.success
        assert result.get_result("f").error == (
            "Stage 'f' is FAN_OUT over input 'src', which must be a list or tuple, but got dict"
        )
        assert result.failed_stages == ["f"]

    async def test_non_list_initial_input_names_the_initial_input(self) -> None:
        """An entry FAN_OUT stage given a string names the initial input and str."""
        result = await run([StageDefinition("f", echo("f"), pattern=FAN_OUT)], "abc")
        assert result.get_result("f").error == (
            "Stage 'f' is FAN_OUT over the initial input, which must be a list or tuple, "
            "but got str"
        )

    async def test_any_failed_item_fails_the_stage(self) -> None:
        """One raising item fails the stage, naming the item and its error."""

        @stage
        async def picky(item: int, context: PipelineContext) -> int:
            if item == 2:
                raise ValueError("two is bad")
            return item

        result = await run(
            [
                StageDefinition("f", picky, pattern=FAN_OUT),
                StageDefinition("after", echo("after"), inputs=["f"]),
            ],
            [0, 1, 2, 3],
        )
        assert not result.success
        failed = result.get_result("f")
        assert failed.error is not None
        assert failed.error.startswith("item 2 of 4 failed: ValueError: two is bad")
        assert failed.metadata["failed_items"] == [2]
        assert result.get_output("f") is None
        assert "after" in result.cancelled

    async def test_retries_apply_per_item(self) -> None:
        """Only the flaky item is retried; the stage succeeds."""
        calls: dict[int, int] = {}

        @stage
        async def flaky(item: int, context: PipelineContext) -> int:
            calls[item] = calls.get(item, 0) + 1
            if item == 1 and calls[item] < 3:
                raise ConnectionError("try again")
            return item

        retry = RetryConfig(max_attempts=3, initial_delay_ms=1)
        result = await run(
            [StageDefinition("f", flaky, pattern=FAN_OUT, retry_config=retry)], [0, 1, 2]
        )
        assert result.get_output("f") == [0, 1, 2]
        assert calls == {0: 1, 1: 3, 2: 1}
        assert result.get_result("f").metadata["attempts"] == 3

    async def test_timeouts_apply_per_item(self) -> None:
        """Each item has its own time limit: a slow item times out, quick ones do not."""

        @stage
        async def maybe_slow(item: int, context: PipelineContext) -> int:
            if item == 1:
                await anyio.sleep(10)
            return item

        result = await run(
            [
                StageDefinition(
                    "f", maybe_slow, pattern=FAN_OUT, timeout_ms=50, max_concurrent_fan_out=1
                )
            ],
            [0, 1, 2],
            fail_fast=False,
        )
        error = result.get_result("f").error
        assert error == "item 1 of 3 failed: Stage 'f' timed out after 50 ms"

    async def test_failure_with_fail_fast_stops_remaining_items(self) -> None:
        """A failed item with fail-fast cancels items not yet finished."""
        started: list[int] = []

        @stage
        async def first_fails(item: int, context: PipelineContext) -> int:
            started.append(item)
            if item == 0:
                raise RuntimeError("first")
            await anyio.sleep(10)
            return item

        with anyio.fail_after(5):
            result = await run(
                [StageDefinition("f", first_fails, pattern=FAN_OUT, max_concurrent_fan_out=2)],
                list(range(10)),
            )
        assert not result.success
        assert len(started) < 10
        assert "items were not finished" in (result.get_result("f").error or "")


class TestConditional:
    async def test_true_condition_runs_the_stage(self) -> None:
        """A true condition runs the stage normally."""
        result = await run(
            [StageDefinition("c", const("ran"), pattern=CONDITIONAL, condition=lambda ctx: True)]
        )
        assert result.get_output("c") == "ran"
        assert result.executed == ["c"]

    async def test_false_condition_skips_and_dependants_receive_none(
        self, recorder: CallRecorder
    ) -> None:
        """A skipped stage outputs None, and its dependants still run with None for it."""
        result = await run(
            [
                StageDefinition("audio", const("wav")),
                StageDefinition(
                    "lyrics",
                    echo("lyrics", recorder),
                    pattern=CONDITIONAL,
                    inputs=["audio"],
                    condition=lambda ctx: False,
                ),
                StageDefinition("plan", echo("plan"), inputs=["audio", "lyrics"]),
                StageDefinition("only_lyrics", echo("only_lyrics"), inputs=["lyrics"]),
            ]
        )
        assert result.success
        assert recorder.names() == []
        skipped = result.get_result("lyrics")
        assert skipped.success and skipped.skipped
        assert skipped.metadata["reason"] == "condition is false"
        assert result.skipped == ["lyrics"]
        assert result.outputs["lyrics"] is None
        assert result.get_output("plan") == {"audio": "wav", "lyrics": None}
        assert result.get_output("only_lyrics") is None
        assert "only_lyrics" in result.executed

    async def test_condition_sees_state_set_by_upstream(self) -> None:
        """The condition is evaluated after the inputs ran, so it reads their state."""

        @stage
        async def detect(input: Any, context: PipelineContext) -> str:
            context.set_state("has_vocals", input == "song")
            return input

        def make(initial: str) -> list[StageDefinition]:
            return [
                StageDefinition("detect", detect),
                StageDefinition(
                    "lyrics",
                    const("la la"),
                    pattern=CONDITIONAL,
                    inputs=["detect"],
                    condition=lambda ctx: bool(ctx.get_state("has_vocals")),
                ),
            ]

        song = await run(make("song"), "song")
        instrumental = await run(make("instrumental"), "instrumental")
        assert song.get_output("lyrics") == "la la"
        assert instrumental.get_result("lyrics").skipped

    async def test_async_condition_is_awaited_not_taken_as_true(self) -> None:
        """An ``async def`` condition returning False skips the stage (a coroutine is truthy)."""

        async def no(ctx: PipelineContext) -> bool:
            await anyio.lowlevel.checkpoint()
            return False

        async def yes(ctx: PipelineContext) -> bool:
            return True

        result = await run(
            [
                StageDefinition("off", const(1), pattern=CONDITIONAL, condition=no),  # type: ignore[arg-type]
                StageDefinition("on", const(2), pattern=CONDITIONAL, condition=yes),  # type: ignore[arg-type]
            ]
        )
        assert result.get_result("off").skipped
        assert result.get_output("on") == 2

    async def test_raising_condition_fails_the_stage(self) -> None:
        """An exception in the condition fails that stage, naming the exception."""

        def broken(ctx: PipelineContext) -> bool:
            raise RuntimeError("no config")

        result = await run([StageDefinition("c", const(1), pattern=CONDITIONAL, condition=broken)])
        assert not result.success
        assert result.failed_stages == ["c"]
        assert result.get_result("c").error == "condition raised RuntimeError: no config"
        assert result.executed == []


class TestErrors:
    async def test_exception_becomes_a_failure_naming_type_and_message(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The error is ``Type: message`` and the traceback is logged."""
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        result = await run([StageDefinition("s", raising(ValueError("bad input")))])
        assert not result.success
        assert result.get_result("s").error == "ValueError: bad input"
        records = [r for r in caplog.records if r.name == "twinklr_pipe" and r.exc_info]
        assert records and records[0].exc_info is not None
        assert records[0].exc_info[0] is ValueError

    @pytest.mark.parametrize(
        ("value", "type_name"), [({"a": 1}, "dict"), (None, "NoneType"), ("text", "str")]
    )
    async def test_non_stage_result_return_is_a_failure_naming_the_type(
        self, value: Any, type_name: str
    ) -> None:
        """A PipelineStage returning something else than a StageResult fails clearly."""
        result = await run([StageDefinition("s", ReturnsRaw(value))])
        error = result.get_result("s").error
        assert error is not None
        assert error.startswith(f"Stage 's' returned {type_name}, not a StageResult")

    async def test_returned_failure_result_fails_the_stage(self) -> None:
        """A stage may report failure by returning failure_result."""

        class Refuses:
            name = "refuses"

            async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
                return failure_result("quota exceeded", stage_name=self.name)

        result = await run([StageDefinition("s", Refuses())])
        assert result.get_result("s").error == "quota exceeded"
        assert result.failed_stages == ["s"]

    async def test_decorated_function_returning_none_succeeds_with_none(self) -> None:
        """@stage wraps the return value, so None is a valid output."""
        result = await run([StageDefinition("s", const(None))])
        assert result.success and result.get_output("s") is None

    async def test_sync_stage_runs_in_a_worker_thread(self) -> None:
        """A plain-def stage runs off the event loop's thread."""
        loop_thread = threading.get_ident()

        @stage
        def where(input: Any, context: PipelineContext) -> int:
            return threading.get_ident()

        class SyncObject:
            name = "sync_object"

            def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
                return success_result(threading.get_ident(), stage_name=self.name)

        result = await run([StageDefinition("f", where), StageDefinition("o", SyncObject())])
        assert result.success
        assert result.get_output("f") != loop_thread
        assert result.get_output("o") != loop_thread

    async def test_sync_stage_never_blocks_the_loop(self) -> None:
        """A blocking sync stage waits while an async sibling keeps running and unblocks it."""
        release = threading.Event()

        @stage
        def blocking(input: Any, context: PipelineContext) -> bool:
            return release.wait(5)

        @stage
        async def releaser(input: Any, context: PipelineContext) -> str:
            await anyio.sleep(0.01)
            release.set()
            return "released"

        result = await run([StageDefinition("b", blocking), StageDefinition("r", releaser)])
        assert result.get_output("b") is True

    async def test_timeout_fails_with_the_limit(self) -> None:
        """A stage over its time limit fails with "timed out after N ms"."""
        result = await run([StageDefinition("t", sleeper(10, CallRecorder(), "t"), timeout_ms=50)])
        assert result.get_result("t").error == "Stage 't' timed out after 50 ms"
        assert result.failed_stages == ["t"]

    async def test_sync_stage_times_out_too(self) -> None:
        """A blocking sync stage is abandoned at its time limit."""
        release = threading.Event()

        @stage
        def stuck(input: Any, context: PipelineContext) -> bool:
            return release.wait(10)

        try:
            with anyio.fail_after(5):
                result = await run([StageDefinition("t", stuck, timeout_ms=50.5)])
        finally:
            release.set()
        assert result.get_result("t").error == "Stage 't' timed out after 50.5 ms"


class TestRetries:
    async def test_attempts_are_counted_in_metadata(self) -> None:
        """A stage failing twice then succeeding reports three attempts."""
        calls = 0

        @stage
        async def flaky(input: Any, context: PipelineContext) -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ConnectionError(f"attempt {calls}")
            return "ok"

        retry = RetryConfig(max_attempts=5, initial_delay_ms=1)
        result = await run([StageDefinition("s", flaky, retry_config=retry)])
        assert result.get_output("s") == "ok"
        assert result.get_result("s").metadata["attempts"] == 3

    async def test_exhausted_retries_fail_with_the_last_error(self) -> None:
        """After max_attempts the stage fails with the last attempt's error."""
        calls = 0

        @stage
        async def always(input: Any, context: PipelineContext) -> str:
            nonlocal calls
            calls += 1
            raise ConnectionError(f"attempt {calls}")

        retry = RetryConfig(max_attempts=3, initial_delay_ms=1)
        result = await run([StageDefinition("s", always, retry_config=retry)])
        failed = result.get_result("s")
        assert failed.error == "ConnectionError: attempt 3"
        assert failed.metadata["attempts"] == 3

    async def test_back_off_follows_the_schedule(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The executor waits delay_ms(config, n) after attempt n: 10, 20, 40 ms."""
        asked: list[float] = []

        def recording_delay(config: RetryConfig, attempt: int) -> float:
            asked.append(delay_ms(config, attempt))
            return 0.0

        monkeypatch.setattr(executor_module, "delay_ms", recording_delay)
        retry = RetryConfig(max_attempts=4, initial_delay_ms=10, backoff_multiplier=2)
        result = await run([StageDefinition("s", raising(OSError("x")), retry_config=retry)])
        assert result.get_result("s").metadata["attempts"] == 4
        assert asked == [10, 20, 40]

    async def test_back_off_waits_grow(self) -> None:
        """Real waits between attempts are at least 10, 20 and 40 ms, in that order."""
        stamps: list[float] = []

        @stage
        async def failing(input: Any, context: PipelineContext) -> None:
            stamps.append(anyio.current_time())
            raise OSError("again")

        retry = RetryConfig(max_attempts=4, initial_delay_ms=10, backoff_multiplier=2)
        await run([StageDefinition("s", failing, retry_config=retry)])
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert len(gaps) == 3
        for gap, nominal in zip(gaps, (0.010, 0.020, 0.040), strict=True):
            assert gap >= nominal * 0.9

    async def test_timeouts_are_retried(self) -> None:
        """A timed-out attempt counts as a failure and is retried."""
        calls = 0

        @stage
        async def slow_then_fast(input: Any, context: PipelineContext) -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                await anyio.sleep(10)
            return "fast"

        retry = RetryConfig(max_attempts=2, initial_delay_ms=1)
        result = await run(
            [StageDefinition("s", slow_then_fast, timeout_ms=30, retry_config=retry)]
        )
        assert result.get_output("s") == "fast"
        assert result.get_result("s").metadata["attempts"] == 2

    async def test_only_retryable_errors_are_retried(self) -> None:
        """An error not matching retryable_errors fails after one attempt."""
        retry = RetryConfig(max_attempts=5, initial_delay_ms=1, retryable_errors=["Timeout"])
        permanent = await run(
            [StageDefinition("s", raising(ValueError("bad")), retry_config=retry)]
        )
        transient = await run(
            [StageDefinition("s", raising(TimeoutError("slow")), retry_config=retry)]
        )
        assert permanent.get_result("s").metadata["attempts"] == 1
        assert transient.get_result("s").metadata["attempts"] == 5

    async def test_no_retry_config_means_one_attempt(self) -> None:
        """Without retry_config a failure is final."""
        result = await run([StageDefinition("s", raising(OSError("x")))])
        assert result.get_result("s").metadata["attempts"] == 1


class TestFailFast:
    async def test_failure_cancels_a_running_sibling(self, recorder: CallRecorder) -> None:
        """The running sibling reports cancelled; its dependant never starts."""
        sibling_started = anyio.Event()

        @stage
        async def sibling(input: Any, context: PipelineContext) -> str:
            sibling_started.set()
            await anyio.sleep(10)
            return "never"

        @stage
        async def bad(input: Any, context: PipelineContext) -> str:
            await sibling_started.wait()
            raise RuntimeError("broken")

        with anyio.fail_after(5):
            result = await run(
                [
                    StageDefinition("sibling", sibling),
                    StageDefinition("bad", bad),
                    StageDefinition("after", echo("after", recorder), inputs=["sibling"]),
                    StageDefinition("after_bad", echo("after_bad", recorder), inputs=["bad"]),
                ]
            )
        assert not result.success
        assert result.failed_stages == ["bad"]
        assert sorted(result.cancelled) == ["after", "after_bad", "sibling"]
        cancelled = result.get_result("sibling")
        assert cancelled.cancelled and not cancelled.success
        assert cancelled.metadata["reason"] == "fail-fast: stage 'bad' failed"
        assert result.metadata["cancel_reason"] == "fail-fast: stage 'bad' failed"
        assert recorder.names() == []
        assert result.executed == ["bad"]

    async def test_nothing_new_starts_after_a_failure(self, recorder: CallRecorder) -> None:
        """A sibling scheduled alongside a failing stage does not run its body after it."""
        result = await run(
            [
                StageDefinition("bad", raising(RuntimeError("now"), recorder)),
                StageDefinition("other", echo("other", recorder)),
            ]
        )
        assert not result.success
        assert recorder.names() == ["bad"]
        assert result.cancelled == ["other"]

    async def test_continue_on_error_runs_the_independent_branch(
        self, recorder: CallRecorder
    ) -> None:
        """With fail_fast=False unrelated stages run; dependants are skipped naming the failure."""
        result = await run(
            [
                StageDefinition("bad", raising(RuntimeError("x"))),
                StageDefinition("child", echo("child", recorder), inputs=["bad"]),
                StageDefinition("grandchild", echo("grandchild", recorder), inputs=["child"]),
                StageDefinition("good", sleeper(0.02, recorder, "good")),
                StageDefinition("after_good", echo("after_good", recorder), inputs=["good"]),
            ],
            fail_fast=False,
        )
        assert not result.success
        assert result.failed_stages == ["bad"]
        assert sorted(recorder.names()) == ["after_good", "good"]
        assert result.get_output("after_good") == "good"
        for sid in ("child", "grandchild"):
            skipped = result.get_result(sid)
            assert skipped.skipped
            assert skipped.metadata["reason"] == "upstream failed: bad"
            assert result.outputs[sid] is None
        assert sorted(result.skipped) == ["child", "grandchild"]
        assert result.cancelled == []

    async def test_non_critical_failure_does_not_fail_the_pipeline(
        self, recorder: CallRecorder
    ) -> None:
        """A critical=False failure is recorded; the run succeeds and its dependants skip."""
        result = await run(
            [
                StageDefinition("optional", raising(RuntimeError("meh")), critical=False),
                StageDefinition("uses_it", echo("uses_it", recorder), inputs=["optional"]),
                StageDefinition("other", sleeper(0.02, recorder, "other")),
            ]
        )
        assert result.success
        assert result.failed_stages == ["optional"]
        assert result.get_result("uses_it").metadata["reason"].startswith("upstream failed")
        assert result.get_output("other") == "other"
        assert result.cancelled == []
        assert recorder.names() == ["other"]


class TestResults:
    async def test_every_stage_ends_with_exactly_one_result(self) -> None:
        """Succeeded, skipped, failed and cancelled stages all have one StageResult."""
        stages = [
            StageDefinition("ok", const(1)),
            StageDefinition("off", const(2), pattern=CONDITIONAL, condition=lambda c: False),
            StageDefinition("bad", raising(RuntimeError("x")), inputs=["ok"]),
            StageDefinition("after_bad", echo("after_bad"), inputs=["bad"]),
            StageDefinition("after_off", echo("after_off"), inputs=["off"]),
        ]
        for fail_fast in (True, False):
            result = await run(stages, fail_fast=fail_fast)
            ids = [s.id for s in stages]
            assert sorted(result.stage_results) == sorted(ids)
            assert sorted(result.outputs) == sorted(ids)
            for sid in result.skipped + result.cancelled:
                assert result.outputs[sid] is None
            statuses = {sid: result.status(sid) for sid in ids}
            assert statuses["ok"] is StageStatus.SUCCEEDED
            assert statuses["bad"] is StageStatus.FAILED

    async def test_get_output_and_get_result_name_a_missing_id(self) -> None:
        """KeyError messages name the id asked for."""
        result = await run([StageDefinition("a", const(1))])
        with pytest.raises(KeyError, match="'nope'"):
            result.get_output("nope")
        with pytest.raises(KeyError, match="'nope'"):
            result.get_result("nope")

    async def test_invalid_pipeline_lists_every_problem(self, recorder: CallRecorder) -> None:
        """Nothing runs; ``metadata["errors"]`` holds what validate_pipeline() reports."""
        stages = [
            StageDefinition("a", echo("a", recorder)),
            StageDefinition("a", echo("a", recorder)),
            StageDefinition("b", echo("b", recorder), inputs=["x"]),
        ]
        result = await run(stages)
        assert not result.success
        assert recorder.names() == []
        assert result.metadata["errors"] == pipeline(*stages).validate_pipeline()
        assert len(result.metadata["errors"]) == 2

    async def test_force_naming_an_unknown_stage_is_reported(self) -> None:
        """``force`` with a typo is an error, not silently ignored."""
        result = await run([StageDefinition("a", const(1))], force=["b"])
        assert not result.success
        assert result.metadata["errors"] == ["force names unknown stage 'b'; stages are: a"]

    async def test_run_id_is_generated_or_passed_through(self) -> None:
        """A run gets a fresh id unless one is given."""
        stages = [StageDefinition("a", const(1))]
        first, second = await run(stages), await run(stages)
        assert first.run_id and first.run_id != second.run_id
        named = await run(stages, run_id="r-mine")
        assert named.run_id == "r-mine"

    async def test_stage_metadata_has_duration_and_attempts(self) -> None:
        """Each result carries its duration in ms and its attempts."""
        result = await run(
            [StageDefinition("s", sleeper(0.02, CallRecorder(), "s"))], initial_input=None
        )
        meta = result.get_result("s").metadata
        assert meta["duration_ms"] >= 15
        assert meta["attempts"] == 1
        assert result.total_duration_ms >= meta["duration_ms"]

    async def test_context_metrics_reach_the_result(self) -> None:
        """add_metric and increment_metric from stages end up in ``metadata["metrics"]``."""

        @stage
        async def count(input: Any, context: PipelineContext) -> None:
            context.increment_metric("tokens", 10)
            context.increment_metric("calls")
            context.add_metric("model", "small")

        result = await run([StageDefinition("a", count), StageDefinition("b", count, inputs=["a"])])
        assert result.metadata["metrics"] == {"tokens": 20, "calls": 2, "model": "small"}

    async def test_executed_lists_stages_whose_body_ran(self) -> None:
        """Skipped stages are not executed; a stage that failed after running is."""

        @stage
        async def all_fail(item: int, context: PipelineContext) -> None:
            raise ValueError(item)

        result = await run(
            [
                StageDefinition("ran", const(1)),
                StageDefinition("off", const(2), pattern=CONDITIONAL, condition=lambda c: False),
                StageDefinition("fan", all_fail, pattern=FAN_OUT, inputs=["list"]),
                StageDefinition("list", const([1, 2])),
                StageDefinition("bad", raising(RuntimeError("x")), inputs=["ran"]),
            ],
            fail_fast=False,
        )
        assert sorted(result.executed) == ["bad", "fan", "list", "ran"]

    def test_sync_run_works_without_an_event_loop(self) -> None:
        """``run()`` executes from plain synchronous code."""
        definition = pipeline(
            StageDefinition("a", const(1)), StageDefinition("b", echo("b"), inputs=["a"])
        )
        result = PipelineExecutor().run(definition, None)
        assert result.success and result.get_output("b") == 1


class TestEvents:
    async def test_events_arrive_in_a_sensible_order(self) -> None:
        """RunStarted first, RunFinished last, each stage started before finished,
        a dependant started after its input finished, FAN_OUT progress counts up."""
        events: list[PipelineEvent] = []

        @stage
        async def split(input: Any, context: PipelineContext) -> list[int]:
            return [1, 2, 3]

        result = await run(
            [
                StageDefinition("split", split),
                StageDefinition("each", echo("each"), pattern=FAN_OUT, inputs=["split"]),
                StageDefinition("join", echo("join"), inputs=["each"]),
            ],
            on_event=events.append,
            run_id="r-events",
        )
        assert result.success
        assert isinstance(events[0], RunStarted)
        assert events[0].stage_ids == ("split", "each", "join")
        assert isinstance(events[-1], RunFinished) and events[-1].success
        assert all(e.run_id == "r-events" for e in events)

        def position(kind: type, sid: str) -> int:
            return next(
                i
                for i, e in enumerate(events)
                if isinstance(e, kind) and getattr(e, "stage_id", None) == sid
            )

        for sid in ("split", "each", "join"):
            assert position(StageStarted, sid) < position(StageFinished, sid)
        assert position(StageFinished, "split") < position(StageStarted, "each")
        assert position(StageFinished, "each") < position(StageStarted, "join")
        progress = [e for e in events if isinstance(e, FanOutProgress)]
        assert [(p.done, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
        first_progress = events.index(progress[0])
        assert position(StageStarted, "each") < first_progress
        assert events.index(progress[-1]) < position(StageFinished, "each")
        finished = [e for e in events if isinstance(e, StageFinished)]
        assert {e.stage_id: e.status for e in finished} == {
            "split": StageStatus.SUCCEEDED,
            "each": StageStatus.SUCCEEDED,
            "join": StageStatus.SUCCEEDED,
        }

    async def test_finished_events_carry_failure_status_and_error(self) -> None:
        """A failing stage's StageFinished has status FAILED and the error text."""
        events: list[PipelineEvent] = []
        await run([StageDefinition("s", raising(KeyError("k")))], on_event=events.append)
        finished = [e for e in events if isinstance(e, StageFinished)]
        assert len(finished) == 1
        assert finished[0].status is StageStatus.FAILED
        assert finished[0].error == "KeyError: 'k'"

    @pytest.mark.parametrize("fail_fast", [True, False])
    async def test_every_stage_gets_exactly_one_finished_event(self, fail_fast: bool) -> None:
        """Stages that fail-fast stops before they start still get one StageFinished."""
        events: list[PipelineEvent] = []
        result = await run(
            [
                StageDefinition("bad", raising(RuntimeError("x"))),
                StageDefinition("child", echo("child"), inputs=["bad"]),
                StageDefinition("grandchild", echo("grandchild"), inputs=["child"]),
                StageDefinition("other", echo("other")),
            ],
            fail_fast=fail_fast,
            on_event=events.append,
        )
        finished = [e for e in events if isinstance(e, StageFinished)]
        assert sorted(e.stage_id for e in finished) == ["bad", "child", "grandchild", "other"]
        statuses = {e.stage_id: e.status for e in finished}
        assert statuses == {sid: result.status(sid) for sid in result.stage_results}
        assert isinstance(events[-1], RunFinished)

    async def test_a_raising_callback_is_logged_and_the_run_succeeds(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An on_event callback that raises never breaks the run."""

        def broken(event: PipelineEvent) -> None:
            raise RuntimeError("ui crashed")

        caplog.set_level(logging.ERROR, logger="twinklr_pipe")
        result = await run(
            [StageDefinition("a", const(1)), StageDefinition("b", echo("b"), inputs=["a"])],
            on_event=broken,
        )
        assert result.success and result.get_output("b") == 1
        messages = [r.getMessage() for r in caplog.records if r.name == "twinklr_pipe"]
        assert any("on_event callback raised on RunStarted" in m for m in messages)
        assert any("on_event callback raised on RunFinished" in m for m in messages)

    async def test_events_are_frozen(self) -> None:
        """Events cannot be altered by a callback."""
        events: list[PipelineEvent] = []
        await run([StageDefinition("a", const(1))], on_event=events.append)
        with pytest.raises(dataclasses.FrozenInstanceError):
            events[0].run_id = "x"  # type: ignore[misc]


class TestContext:
    def test_keywords_become_attributes(self) -> None:
        """``PipelineContext(provider=p).provider`` is p."""
        provider = object()
        assert PipelineContext(provider=provider).provider is provider

    def test_state_and_metric_helpers(self) -> None:
        """get_state/set_state read and write state; add_metric sets, increment_metric adds."""
        context = PipelineContext(state={"a": 1})
        assert context.get_state("a") == 1
        assert context.get_state("missing", "dflt") == "dflt"
        context.set_state("b", 2)
        assert context.state == {"a": 1, "b": 2}
        context.add_metric("m", 5)
        context.add_metric("m", 7)
        context.increment_metric("n")
        context.increment_metric("n", 2.5)
        assert context.metrics == {"m": 7, "n": 3.5}

    async def test_increments_from_sync_stages_in_threads_are_not_lost(self) -> None:
        """Concurrent increment_metric calls from worker threads all count."""

        @stage
        def bump(item: int, context: PipelineContext) -> None:
            for _ in range(20_000):
                context.increment_metric("n")

        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often, to expose lost updates
        try:
            result = await run(
                [StageDefinition("f", bump, pattern=FAN_OUT, max_concurrent_fan_out=None)],
                list(range(8)),
            )
        finally:
            sys.setswitchinterval(previous)
        assert result.metadata["metrics"] == {"n": 160_000}

    async def test_subclass_with_typed_fields_is_passed_to_stages(self) -> None:
        """A typed subclass reaches every stage, services included."""

        class Provider:
            def complete(self, prompt: str) -> str:
                return prompt.upper()

        class AppContext(PipelineContext):
            provider: Provider
            temperature: float = 0.5

        @stage
        async def ask(input: str, context: AppContext) -> str:
            return f"{context.provider.complete(input)}@{context.temperature}"

        context = AppContext(provider=Provider())
        result = await run([StageDefinition("ask", ask)], "hi", context)
        assert result.get_output("ask") == "HI@0.5"

    async def test_state_flows_between_stages_and_back_to_the_caller(self) -> None:
        """State set by one stage is visible to its dependant and to the caller."""

        @stage
        async def writer(input: Any, context: PipelineContext) -> None:
            context.set_state("tempo", 120)

        @stage
        async def reader(input: Any, context: PipelineContext) -> Any:
            return context.get_state("tempo")

        context = PipelineContext()
        result = await run(
            [StageDefinition("w", writer), StageDefinition("r", reader, inputs=["w"])],
            context=context,
        )
        assert result.get_output("r") == 120
        assert context.get_state("tempo") == 120

    async def test_current_context_is_the_running_context(self) -> None:
        """current_context() inside a stage (async or sync) is the run's context."""

        @stage
        async def async_body(input: Any, context: PipelineContext) -> bool:
            return current_context() is context

        @stage
        def sync_body(input: Any, context: PipelineContext) -> bool:
            return current_context() is context

        result = await run([StageDefinition("a", async_body), StageDefinition("s", sync_body)])
        assert result.outputs == {"a": True, "s": True}
        assert current_context() is None

    async def test_a_fresh_context_is_made_when_omitted(self) -> None:
        """Without a context each run gets its own, empty one."""

        @stage
        async def touch(input: Any, context: PipelineContext) -> Any:
            seen = context.get_state("seen")
            context.set_state("seen", True)
            return seen

        first = await run([StageDefinition("t", touch)])
        second = await run([StageDefinition("t", touch)])
        assert first.get_output("t") is None and second.get_output("t") is None
