"""Orchestration overhead of ``PipelineExecutor`` against hand-written anyio code.

Runs, in one process and one run (best of 5 each):

1. a 1,000-stage chain of trivial async stages through the executor, and the same
   chain hand-written with anyio (one task per stage in a task group, each awaiting
   its predecessor's ``anyio.Event``). Targets: at most 3x the hand-written
   baseline and at most 50 µs per stage;
2. a FAN_OUT of 1,000 items that each sleep 10 ms with ``max_concurrent_fan_out=50``,
   and the same fan-out hand-written with a task group and ``CapacityLimiter(50)``.
   Target: at most 1.1x (both near the ideal 200 ms).

Usage: ``python scripts/bench_executor.py [--profile]``. ``--profile`` prints the
cProfile of one executor chain run instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    StageResult,
    success_result,
)

CHAIN_LENGTH = 1_000
FAN_OUT_ITEMS = 1_000
FAN_OUT_SLEEP_S = 0.01
FAN_OUT_LIMIT = 50
REPEATS = 5


class Increment:
    """A trivial async stage: adds one to its input."""

    name = "increment"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        return success_result((input or 0) + 1, stage_name=self.name)


class Nap:
    """A FAN_OUT item body: sleeps 10 ms and echoes the item."""

    name = "nap"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        await anyio.sleep(FAN_OUT_SLEEP_S)
        return success_result(input, stage_name=self.name)


def chain_pipeline(length: int) -> PipelineDefinition:
    body = Increment()
    stages = [StageDefinition("s0", body)]
    stages += [StageDefinition(f"s{i}", body, inputs=[f"s{i - 1}"]) for i in range(1, length)]
    return PipelineDefinition("bench-chain", stages)


def fan_out_pipeline() -> PipelineDefinition:
    return PipelineDefinition(
        "bench-fan-out",
        [
            StageDefinition(
                "fan",
                Nap(),
                pattern=ExecutionPattern.FAN_OUT,
                max_concurrent_fan_out=FAN_OUT_LIMIT,
            )
        ],
    )


async def executor_chain(executor: PipelineExecutor, pipeline: PipelineDefinition) -> None:
    result = await executor.execute(pipeline, 0)
    assert result.success and result.outputs[f"s{CHAIN_LENGTH - 1}"] == CHAIN_LENGTH


async def hand_written_chain() -> None:
    """One task per stage; each waits for its predecessor's event, then sets its own."""
    events = [anyio.Event() for _ in range(CHAIN_LENGTH)]
    values = [0] * CHAIN_LENGTH

    async def first() -> None:
        values[0] = 1
        events[0].set()

    async def link(i: int) -> None:
        await events[i - 1].wait()
        values[i] = values[i - 1] + 1
        events[i].set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        for i in range(1, CHAIN_LENGTH):
            tg.start_soon(link, i)
    assert values[-1] == CHAIN_LENGTH


async def executor_fan_out(executor: PipelineExecutor, pipeline: PipelineDefinition) -> None:
    result = await executor.execute(pipeline, list(range(FAN_OUT_ITEMS)))
    assert result.success and len(result.outputs["fan"]) == FAN_OUT_ITEMS


async def hand_written_fan_out() -> None:
    limiter = anyio.CapacityLimiter(FAN_OUT_LIMIT)
    outputs: list[Any] = [None] * FAN_OUT_ITEMS

    async def item(i: int) -> None:
        async with limiter:
            await anyio.sleep(FAN_OUT_SLEEP_S)
            outputs[i] = i

    async with anyio.create_task_group() as tg:
        for i in range(FAN_OUT_ITEMS):
            tg.start_soon(item, i)
    assert outputs[-1] == FAN_OUT_ITEMS - 1


async def best_of(repeats: int, fn: Callable[[], Awaitable[None]]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        best = min(best, time.perf_counter() - t0)
    return best


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


async def main() -> int:
    executor = PipelineExecutor()
    chain = chain_pipeline(CHAIN_LENGTH)
    fan = fan_out_pipeline()

    # Warm up both sides once (imports, thread pools, caches of the executor).
    await executor_chain(executor, chain)
    await hand_written_chain()

    t_exec = await best_of(REPEATS, lambda: executor_chain(executor, chain))
    t_hand = await best_of(REPEATS, hand_written_chain)
    per_stage_us = t_exec / CHAIN_LENGTH * 1e6
    ratio = t_exec / t_hand
    print(f"chain of {CHAIN_LENGTH} trivial stages (best of {REPEATS})")
    print(f"  executor      {t_exec * 1000:8.1f} ms  {per_stage_us:6.1f} µs/stage")
    print(f"  hand-written  {t_hand * 1000:8.1f} ms  {t_hand / CHAIN_LENGTH * 1e6:6.1f} µs/stage")
    print(
        f"  ratio         {ratio:8.2f}x   target ≤ 3x: {verdict(ratio <= 3)}; "
        f"≤ 50 µs/stage: {verdict(per_stage_us <= 50)}"
    )

    f_exec = await best_of(REPEATS, lambda: executor_fan_out(executor, fan))
    f_hand = await best_of(REPEATS, hand_written_fan_out)
    f_ratio = f_exec / f_hand
    print(
        f"FAN_OUT of {FAN_OUT_ITEMS} items x {FAN_OUT_SLEEP_S * 1000:g} ms sleep, "
        f"limit {FAN_OUT_LIMIT} (best of {REPEATS}; ideal "
        f"{FAN_OUT_ITEMS / FAN_OUT_LIMIT * FAN_OUT_SLEEP_S * 1000:g} ms)"
    )
    print(f"  executor      {f_exec * 1000:8.1f} ms")
    print(f"  hand-written  {f_hand * 1000:8.1f} ms")
    print(f"  ratio         {f_ratio:8.2f}x   target ≤ 1.1x: {verdict(f_ratio <= 1.1)}")
    met = ratio <= 3 and per_stage_us <= 50 and f_ratio <= 1.1
    return 0 if met else 1


def profile() -> None:
    executor = PipelineExecutor()
    chain = chain_pipeline(CHAIN_LENGTH)
    profiler = cProfile.Profile()

    async def runs() -> None:
        await executor_chain(executor, chain)
        profiler.enable()
        for _ in range(REPEATS):
            await executor_chain(executor, chain)
        profiler.disable()

    anyio.run(runs)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="profile the executor chain")
    if parser.parse_args().profile:
        profile()
        sys.exit(0)
    sys.exit(anyio.run(main))
