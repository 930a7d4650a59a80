"""Benchmark the figures ``pipe cache ls`` and fully cached re-runs depend on.

Creates a ``DiskCacheStore`` with N entries (default 100,000), then times:

- ``list(store.iter_metadata())`` plus sorting by last use: what ``pipe cache ls`` does;
- a cold subprocess that imports twinklr_pipe, opens the store and does the same;
- the executor's hot path on a fully cached re-run: ``variants(key)`` then ``get(id)``,
  averaged over 10,000 calls on random keys.

Usage::

    python scripts/bench_cache_ls.py [--entries 100000] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import xxhash

from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import DiskCacheStore

_COLD = """
import sys, time
t0 = time.perf_counter()
from twinklr_pipe.cache._store import DiskCacheStore
t1 = time.perf_counter()
store = DiskCacheStore(sys.argv[1])
t2 = time.perf_counter()
metas = sorted(store.iter_metadata(), key=lambda m: m.last_used_at, reverse=True)
t3 = time.perf_counter()
store.close()
print(len(metas), t1 - t0, t2 - t1, t3 - t2)
"""


def _meta(index: int, payload: bytes) -> EntryMeta:
    key = xxhash.xxh3_128_hexdigest(f"key-{index}".encode())
    now = time.time() - index
    return EntryMeta(
        key=key,
        variant="0",
        pipeline="bench",
        stage_id=f"stage_{index % 20}",
        stage_identity=f"bench.stages:Stage{index % 20}",
        version="1",
        config_fingerprint=xxhash.xxh3_128_hexdigest(b"config"),
        config_fields={"model": xxhash.xxh3_128_hexdigest(b"m"), "limit": "3f9a1c2e"},
        input_names=["document", "settings"],
        input_hashes=[xxhash.xxh3_128_hexdigest(b"a"), xxhash.xxh3_128_hexdigest(b"b")],
        output_hash=xxhash.xxh3_128_hexdigest(payload),
        codec="json/1",
        payload_checksum=xxhash.xxh3_128_hexdigest(payload),
        size_bytes=len(payload),
        created_at=now,
        last_used_at=now,
        compute_duration_ms=12.5,
        metrics={"tokens": 1234, "calls": 2},
        run_id="r-7c1e0a2b",
    )


def _fill(store: DiskCacheStore, entries: int) -> list[EntryMeta]:
    payload = b'{"value": "' + b"x" * 180 + b'"}'
    metas = [_meta(index, payload) for index in range(entries)]
    cache = store._cache  # private: one big transaction makes the bulk insert ~20x faster
    assert cache is not None
    batch = 10_000
    for start in range(0, entries, batch):
        with cache.transact():
            for meta in metas[start : start + batch]:
                store.put(meta, payload)
    return metas


def _time_ls(store: DiskCacheStore, repeat: int) -> tuple[list[float], float]:
    """Seconds of ``iter_metadata`` + sort per run, and the best run's pace extrapolated.

    The extrapolation takes the fastest 2,000-record stretch of any run times the number
    of stretches: on a shared, loaded machine it estimates the uncontended figure.
    """
    times = []
    best_stretch = float("inf")
    stretches = 1
    for _ in range(repeat):
        start = last = time.perf_counter()
        metas = []
        for count, meta in enumerate(store.iter_metadata(), 1):
            metas.append(meta)
            if count % 2000 == 0:
                now = time.perf_counter()
                best_stretch = min(best_stretch, now - last)
                last = now
        stretches = max(len(metas) // 2000, 1)
        metas.sort(key=lambda meta: meta.last_used_at, reverse=True)
        times.append(time.perf_counter() - start)
    return times, best_stretch * stretches


def _time_hot_path(store: DiskCacheStore, metas: list[EntryMeta], calls: int) -> list[float]:
    """Seconds per call of ``variants(key)`` + ``get(id)``, for each batch of 100 calls."""
    picks = [random.choice(metas) for _ in range(calls)]
    per_call = []
    for start in range(0, calls, 100):
        batch = picks[start : start + 100]
        began = time.perf_counter()
        for meta in batch:
            found = store.variants(meta.key)
            hit = store.get(found[0].entry_id)
            assert hit is not None
        per_call.append((time.perf_counter() - began) / len(batch))
    return per_call


def _calibration() -> float:
    """Best time of a fixed CPU-bound loop, to compare figures across machines and loads."""
    return min(timeit.repeat("sum(range(1000))", number=1000, repeat=20)) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--dir", type=Path, default=None, help="cache directory, kept and reused (default: temp)"
    )
    args = parser.parse_args()
    calibration = _calibration() * 1e6
    print(f"load average {os.getloadavg()[0]:.2f}; sum(range(1000)) takes {calibration:.1f} µs")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        directory = args.dir or Path(tmp) / "cache"
        store = DiskCacheStore(directory)
        metas = list(store.iter_metadata())
        if len(metas) != args.entries:
            store.close()
            shutil.rmtree(directory)
            store = DiskCacheStore(directory)
            start = time.perf_counter()
            metas = _fill(store, args.entries)
            fill = time.perf_counter() - start
            each = fill / args.entries * 1e6
            print(f"insert {args.entries:,} entries: {fill:.2f} s ({each:.0f} µs each)")

        ls, pace = _time_ls(store, repeat=5)
        print(
            f"iter_metadata + sort ({args.entries:,}): best {min(ls):.3f} s, "
            f"median {statistics.median(ls):.3f} s (fastest stretch extrapolated: {pace:.3f} s)"
        )

        store.get(metas[0].entry_id)  # warm up
        per_call = _time_hot_path(store, metas, 10_000)
        print(
            f"hot path variants(key) + get(id), 10,000 calls: mean "
            f"{statistics.fmean(per_call) * 1e6:.1f} µs per call (best batch of 100: "
            f"{min(per_call) * 1e6:.1f} µs)"
        )
        store.close()

        for _ in range(3):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _COLD, str(directory)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            total = time.perf_counter() - start
            count, imports, opening, listing = int(out[0]), *map(float, out[1:])
            print(
                f"cold subprocess: {total:.3f} s total ({count:,} entries; import {imports:.3f} s, "
                f"open {opening:.3f} s, iterate + sort {listing:.3f} s)"
            )


if __name__ == "__main__":
    main()
