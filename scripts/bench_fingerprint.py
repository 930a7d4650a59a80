"""Benchmark ``fingerprint`` against raw xxh3_128 and against hashing ``json.dumps``.

Run: ``python scripts/bench_fingerprint.py [--mb 256] [--items 100000]``. Best of 3 each.

Targets: bytes hash at >= 0.8x the throughput of raw ``xxh3_128``; a list of small dicts
within ~3x of ``xxh3_128(json.dumps(v, sort_keys=True).encode())``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import xxhash

from twinklr_pipe.cache._codec import encode
from twinklr_pipe.cache._fingerprint import fingerprint


def best_of(*fns: Callable[[], Any], repeat: int = 3) -> list[float]:
    """Best wall time of ``repeat`` calls of each function, in seconds.

    Calls are interleaved (a, b, a, b...) so background load hits each one alike.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256, help="size of the bytes value in MiB")
    parser.add_argument("--items", type=int, default=100_000, help="dicts in the list")
    args = parser.parse_args()

    data = os.urandom(args.mb << 20)
    raw, ours = best_of(lambda: xxhash.xxh3_128(data).digest(), lambda: fingerprint(data))
    mb = len(data) / (1 << 20)
    print(f"bytes, {mb:.0f} MiB:")
    print(f"  xxh3_128(data)     {raw * 1000:8.1f} ms  ({mb / raw:8.0f} MiB/s)")
    print(f"  fingerprint(data)  {ours * 1000:8.1f} ms  ({mb / ours:8.0f} MiB/s)")
    print(f"  throughput ratio   {raw / ours:8.2f}x  (target >= 0.80x)")
    data = b""  # free it before the next benchmark

    value = [{"i": i, "name": f"n{i}", "x": 1.5} for i in range(args.items)]
    ref, ours, dumps, enc = best_of(
        lambda: xxhash.xxh3_128(json.dumps(value, sort_keys=True).encode()).digest(),
        lambda: fingerprint(value),
        lambda: json.dumps(value),
        lambda: encode(value),
    )
    print(f"list of {args.items} small dicts:")
    print(f"  xxh3_128(json.dumps(sort_keys=True))  {ref * 1000:8.1f} ms")
    print(f"  fingerprint(value)                    {ours * 1000:8.1f} ms")
    print(f"  time ratio                            {ours / ref:8.2f}x  (target <= ~3x)")
    print(f"  json.dumps(value)                     {dumps * 1000:8.1f} ms")
    print(f"  codec encode(value)                   {enc * 1000:8.1f} ms  ({enc / dumps:.2f}x)")


if __name__ == "__main__":
    main()
