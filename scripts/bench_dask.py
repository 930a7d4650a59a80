"""A CPU-bound FAN_OUT: in-process worker threads against 2 Dask worker processes.

Runs, in one process, the same pipeline twice: a FAN_OUT of ``--items`` items, each
about ``--seconds`` of pure-Python work (a sync stage body, so in-process it runs in
worker threads that share the GIL), first in-process, then with ``remote=True`` on
a ``LocalCluster`` of ``--workers`` worker processes (one thread each) on 127.0.0.1.
No cache, so every item executes in both. Each variant is run once to warm up (the
workers import twinklr_pipe on their first task) and then timed, best of ``--repeat``.
Cluster start-up is reported separately.

Target on a 2-core machine: Dask at most 0.65x the in-process time.

Usage: ``python scripts/bench_dask.py [--items 16] [--seconds 0.25] [--workers 2]``
(needs ``pip install 'twinklr_pipe[dask]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    stage,
)

#: Loop iterations of ``burn`` per item; calibrated at start-up to ``--seconds``.
ROUNDS = {"n": 1_000_000}


def burn(rounds: int, seed: int) -> int:
    """Pure-Python arithmetic: holds the GIL all the time."""
    total = seed
    for i in range(rounds):
        total = (total * 31 + i) % 1_000_003
    return total


@stage
def work(item: tuple[int, int], context: PipelineContext) -> int:
    rounds, seed = item
    return burn(rounds, seed)


def calibrate(seconds: float) -> int:
    """Rounds of ``burn`` that take about ``seconds`` on one core here."""
    rounds = 100_000
    while True:
        started = time.perf_counter()
        burn(rounds, 1)
        took = time.perf_counter() - started
        if took > 0.05:
            return max(1, int(rounds * seconds / took))
        rounds *= 4


def definition(remote: bool) -> PipelineDefinition:
    return PipelineDefinition(
        "bench-dask",
        [
            StageDefinition(
                "work",
                work,
                pattern=ExecutionPattern.FAN_OUT,
                max_concurrent_fan_out=None,
                remote=remote,
            )
        ],
    )


def timed(executor: PipelineExecutor, remote: bool, items: list[Any], repeat: int) -> float:
    pipeline = definition(remote)
    warm = executor.run(pipeline, items)  # warm-up: thread pool, worker imports
    if not warm.success:
        raise SystemExit(f"warm-up run failed: {warm.stage_results['work'].error}")
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = executor.run(pipeline, items)
        best = min(best, time.perf_counter() - started)
        if not result.success:
            raise SystemExit(f"run failed: {result.stage_results['work'].error}")
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.25, help="CPU time per item")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    try:
        from distributed import LocalCluster

        from twinklr_pipe._dask import DaskRunner
    except ImportError:
        print("needs distributed: pip install 'twinklr_pipe[dask]'", file=sys.stderr)
        return 2

    rounds = calibrate(args.seconds)
    items = [(rounds, seed) for seed in range(args.items)]
    cores = os.cpu_count()
    print(
        f"{args.items} items x ~{args.seconds:.2f} s of pure-Python work "
        f"({rounds:,} rounds), {cores} cores"
    )

    threads = timed(PipelineExecutor(), False, items, args.repeat)
    print(f"in-process (worker threads, GIL):   {threads:6.2f} s")

    started = time.perf_counter()
    with LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        start_up = time.perf_counter() - started
        runner = DaskRunner(cluster.scheduler_address)
        dask = timed(PipelineExecutor(runner=runner), True, items, args.repeat)
    print(f"Dask, {args.workers} worker processes:        {dask:6.2f} s")
    print(f"  (cluster start-up, not included: {start_up:.2f} s)")
    ratio = dask / threads
    print(f"ratio dask / in-process: {ratio:.2f}x (target <= 0.65x)")
    return 0 if ratio <= 0.65 else 1


if __name__ == "__main__":
    sys.exit(main())
