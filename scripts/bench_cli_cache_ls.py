"""Benchmark: ``pipe cache ls`` over a store of 100,000 entries (target: under 1 s).

Builds a ``DiskCacheStore`` with N entries (default 100,000) in a temporary
directory, in one SQLite transaction (``put`` commits once per entry, which would
take minutes), then measures, in one run:

1. the listing library calls alone: ``list_entries`` (read + sort) and ``format_entries``;
2. the ``cache ls`` command end to end in this process (typer's ``CliRunner``:
   option parsing, opening the store, listing, sorting, formatting, writing);
3. ``cache ls --json`` the same way;
4. a real ``pipe cache ls`` subprocess (``python -m twinklr_pipe``), interpreter start
   and imports included, its output going to a pipe that is drained.

Usage::

    python scripts/bench_cli_cache_ls.py [--entries 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

from twinklr_pipe._admin import format_entries, list_entries, open_store
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import DiskCacheStore

TARGET_S = 1.0


def build_store(directory: Path, entries: int) -> None:
    """Fill a DiskCacheStore with ``entries`` realistic entries, fast."""
    store = DiskCacheStore(directory)
    now = time.time()
    stages = ["audio", "profile", "lyrics", "macro", "groups", "render", "export"]
    rows = []
    for i in range(entries):
        stage = stages[i % len(stages)]
        key = xxhash.xxh3_128_hexdigest(i.to_bytes(8, "little"))
        payload = (
            b'{"value":' + str(i).encode() + b',"label":"group-' + str(i % 97).encode() + b'"}'
        )
        meta = EntryMeta(
            key=key,
            pipeline="sequencer",
            stage_id=stage,
            stage_identity=f"song.stages:{stage}",
            version="2" if i % 3 else "src:" + f"{i * 7919:032x}",
            version_is_source_hash=not i % 3,
            config_fingerprint="c" * 32,
            config_fields={"prompt": "d" * 32},
            input_names=["<initial input>"],
            input_hashes=[f"{i * 31:032x}"],
            item_index=i % 50 if stage == "groups" else None,
            output_hash=f"{i * 17:032x}",
            codec="json/1",
            size_bytes=len(payload),
            created_at=now - (entries - i) * 3.0,
            last_used_at=now - (entries - i),
            compute_duration_ms=12.5,
            run_id="r-20250101T000000-abcdef",
        )
        rows.append((meta, payload))
    try:
        _bulk_insert(store, rows)
    except AttributeError:  # the store's internals changed: the slow, public way
        for meta, payload in rows:
            store.put(meta, payload)
    store.close()


def _bulk_insert(store: DiskCacheStore, rows: list[tuple[EntryMeta, bytes]]) -> None:
    from twinklr_pipe.cache import _store as internals

    cache = store._cache  # private: one transaction for the whole build
    con = internals._connection(cache)
    now = time.time()
    with cache.transact():
        for meta, payload in rows:
            meta = internals._checked_for_put(meta, payload)
            data = internals._dump_meta(meta)
            # As ``put`` writes them: the metadata row carries the summary and last use.
            for prefix, blob, tag, used in (
                (internals._META, data, internals._summary_tag(meta), meta.last_used_at),
                (internals._PAYLOAD, payload, None, now),
            ):
                con.execute(
                    internals._INSERT_SQL,
                    (
                        prefix + meta.entry_id,
                        now,
                        used,
                        tag,
                        len(blob),
                        internals._MODE_RAW,
                        None,
                        blob,
                    ),
                )


def best_of(repeat: int, fn) -> tuple[float, float]:
    """Best wall time and best CPU time (this process and its children) of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = os.times()
        start = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        after = os.times()
        cpus.append(sum(after[:4]) - sum(before[:4]))
    return min(walls), min(cpus)


def calibration() -> float:
    """CPU seconds of a fixed pure-Python loop, to compare machines and load levels."""
    start = time.process_time()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cache-ls-") as tmp:
        cache_dir = Path(tmp) / "cache"
        start = time.perf_counter()
        build_store(cache_dir, args.entries)
        print(f"built a store of {args.entries:,} entries in {time.perf_counter() - start:.1f} s")

        def library() -> None:
            store = open_store(cache_dir, create=False)
            assert store is not None
            try:
                entries = list_entries(store, sort="created")
            finally:
                store.close()
            text = format_entries(entries)
            assert text.count("\n") == args.entries + 1

        from typer.testing import CliRunner

        from twinklr_pipe._cli import app

        runner = CliRunner()

        def command(*extra: str) -> None:
            result = runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache_dir), *extra])
            assert result.exit_code == 0, result.output

        def subprocess_ls() -> None:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "twinklr_pipe",
                    "cache",
                    "ls",
                    "--cache-dir",
                    str(cache_dir),
                ],
                capture_output=True,
                check=True,
                env={**os.environ, "COLUMNS": "120"},
            )
            assert proc.stdout.count(b"\n") == args.entries + 2

        def startup() -> None:
            subprocess.run(
                [sys.executable, "-m", "twinklr_pipe", "--version"], capture_output=True, check=True
            )

        def baseline() -> None:
            store = DiskCacheStore(cache_dir)
            try:
                sorted(store.iter_metadata(), key=lambda m: m.created_at)
            finally:
                store.close()

        figures = [
            ("baseline: sorted(store.iter_metadata())", best_of(args.repeat, baseline)),
            ("list_entries + format_entries (library)", best_of(args.repeat, library)),
            ("pipe cache ls, in process (CliRunner)", best_of(args.repeat, command)),
            ("pipe cache ls --json, in process", best_of(args.repeat, lambda: command("--json"))),
            ("pipe cache ls, subprocess", best_of(args.repeat, subprocess_ls)),
            ("pipe --version, subprocess (start-up)", best_of(args.repeat, startup)),
        ]
        print(f"best of {args.repeat}, {args.entries:,} entries (wall / CPU):")
        for name, (wall, cpu) in figures:
            print(f"  {name:<42} {wall * 1000:8.1f} ms / {cpu * 1000:8.1f} ms")
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} cores (figures inflate under load)")
        print(f"calibration: a 10M-iteration Python loop takes {calibration():.2f} s CPU here")
        worst = max(
            wall
            for name, (wall, _) in figures
            if "--json" not in name and "start" not in name and "baseline" not in name
        )
        verdict = "OK" if worst < TARGET_S else "TOO SLOW"
        print(f"target: every 'pipe cache ls' under {TARGET_S:.1f} s -> {verdict}")


if __name__ == "__main__":
    main()
