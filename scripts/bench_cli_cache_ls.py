"""Benchmark: ``pipe cache ls`` over a store of 100,000 entries (target: under 1 s).

Builds a ``DiskCacheStore`` with N entries (default 100,000) in a temporary
directory, as the store writes pending entries (``_write_batch``: batches of one
transaction; ``put`` commits once per entry, which would take minutes), then measures,
in one run:

1. a real ``pipe cache ls`` subprocess (``python -m twinklr_pipe``), interpreter start
   and imports included, its output going to a pipe that is drained: the target;
2. its start-up alone: ``pipe --version``, and ``pipe cache ls`` on an empty cache;
3. reading the ``Summaries`` table without opening the store (``cache._quick``, what
   the command does), and the command through typer and an opened store (``_cli.main``:
   what it does when the quick path declines), for comparison;
4. the listing in process through the store: reading the summaries into columns
   (``DiskCacheStore._summary_columns``) and ordering them (``listing_order``), then the
   formatting alone (``format_columns``);
5. the library calls ``list_entries`` + ``format_entries`` (one ``EntrySummary`` per
   entry), the command in process (typer's ``CliRunner``), ``cache ls --json``, and
   ``sorted(store.iter_metadata())`` (every record decoded) for comparison.

Subprocesses run without ``PYTHONDONTWRITEBYTECODE``, so that, as on any installed
copy, they load cached bytecode (the first run writes it; best-of-N keeps the others):
compiling the package's sources at every start would add ~0.2 s. ``--json-tags`` builds
a store as a version before summaries format 2 and the ``Summaries`` table wrote it
(JSON tags, no table): the first listing reads the tags and adds the table (printed
apart), the next ones read the table.

The machine's speed is printed too (a fixed Python loop); figures scale with it.

Usage::

    python scripts/bench_cli_cache_ls.py [--entries 100000] [--repeat 5] [--json-tags]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import xxhash

from twinklr_pipe._admin import format_entries, list_entries, open_store
from twinklr_pipe._listing import TABLE_FIELDS, format_columns, gc_paused, listing_order, take
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._quick import summary_columns
from twinklr_pipe.cache._store import DiskCacheStore

TARGET_S = 1.0
#: ``pipe`` through typer (``_cli.main``), skipping ``_main``'s quick path.
_TYPER_MAIN = "import sys; from twinklr_pipe._cli import main; sys.argv[0] = 'pipe'; main()"
#: The calibration loop's CPU time on the reference machine (figures are quoted there).
REFERENCE_CALIBRATION_S = 0.57


def build_store(directory: Path, entries: int, json_tags: bool = False) -> None:
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
    _bulk_insert(store, rows, json_tags)
    store.close()


def _bulk_insert(
    store: DiskCacheStore, rows: list[tuple[EntryMeta, bytes]], json_tags: bool
) -> None:
    """Write the entries as the store writes pending ones: batches of one transaction.

    ``json_tags``: as a version before summaries format 2 and the ``Summaries`` table wrote
    them (format 1 tags; the table is dropped afterwards).
    """
    from twinklr_pipe.cache import _layout, _tags
    from twinklr_pipe.cache import _store as internals

    items = []
    for meta, payload in rows:
        meta = internals._checked_for_put(meta, payload)
        items.append((meta, internals._dump_meta(meta), payload))
    tags = getattr(_tags, "_json_tag_of" if json_tags else "_tag_of")
    with mock.patch.object(internals, "_tag_of", tags):
        for start in range(0, len(items), 5000):
            store._write_batch(items[start : start + 5000])
    if json_tags:
        cache = store._cache
        assert cache is not None
        with cache.transact():
            for statement in _layout.SUMMARIES_DROP_SQL:
                internals._connection(cache).execute(statement)


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float]:
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
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--json-tags", action="store_true", help="summaries in format 1 (JSON), as before"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cache-ls-") as tmp:
        cache_dir = Path(tmp) / "cache"
        empty_dir = Path(tmp) / "empty"
        DiskCacheStore(empty_dir).close()
        start = time.perf_counter()
        build_store(cache_dir, args.entries, args.json_tags)
        tags = "format 1 (JSON)" if args.json_tags else "format 2 (text)"
        print(
            f"built a store of {args.entries:,} entries ({tags} summaries) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        # As on an installed copy: subprocesses read (and the first one writes) bytecode.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["COLUMNS"] = "120"
        pipe = [sys.executable, "-m", "twinklr_pipe"]

        def subprocess_ls() -> None:
            proc = subprocess.run(
                [*pipe, "cache", "ls", "--cache-dir", str(cache_dir)],
                capture_output=True,
                check=True,
                env=env,
            )
            assert proc.stdout.count(b"\n") == args.entries + 2

        def typer_ls() -> None:
            # The command through typer and an opened store, as when the quick path declines.
            proc = subprocess.run(
                [sys.executable, "-c", _TYPER_MAIN, "cache", "ls", "--cache-dir", str(cache_dir)],
                capture_output=True,
                check=True,
                env=env,
            )
            assert proc.stdout.count(b"\n") == args.entries + 2

        def quick_read() -> None:
            with gc_paused():  # as the command reads it
                columns = summary_columns(cache_dir.absolute(), TABLE_FIELDS)
            assert columns is not None, "the quick path declined this store"

        def version() -> None:
            subprocess.run([*pipe, "--version"], capture_output=True, check=True, env=env)

        def empty_ls() -> None:
            subprocess.run(
                [*pipe, "cache", "ls", "--cache-dir", str(empty_dir)],
                capture_output=True,
                check=True,
                env=env,
            )

        ordered: list[list[Sequence[Any]]] = []

        def listing() -> None:
            store = open_store(cache_dir, create=False)
            assert isinstance(store, DiskCacheStore)
            try:
                columns = store._summary_columns()
            finally:
                store.close()
            order = listing_order(columns, sort="created")
            ordered[:] = [take([columns[field] for field in TABLE_FIELDS], order)]

        def formatting() -> None:
            text = format_columns(ordered[0])
            assert text.count("\n") == args.entries + 1

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

        def baseline() -> None:
            store = DiskCacheStore(cache_dir)
            try:
                sorted(store.iter_metadata(), key=lambda m: m.created_at)
            finally:
                store.close()

        before = calibration()
        repeat = args.repeat
        if args.json_tags:
            first = best_of(1, subprocess_ls)
            print(
                f"first pipe cache ls (reads the tags, adds the Summaries table): "
                f"{first[0] * 1000:.1f} ms"
            )
        target = best_of(repeat, subprocess_ls)
        figures = [
            ("pipe cache ls, subprocess (the target)", target),
            ("  start-up: pipe --version", best_of(repeat, version)),
            ("  start-up: pipe cache ls, empty cache", best_of(repeat, empty_ls)),
            ("  reading: the Summaries table (_quick)", best_of(repeat, quick_read)),
            ("  the same through typer and the store", best_of(repeat, typer_ls)),
            ("  listing: read columns + order (store)", best_of(repeat, listing)),
            ("  formatting: format_columns", best_of(repeat, formatting)),
            ("list_entries + format_entries (library)", best_of(repeat, library)),
            ("pipe cache ls, in process (CliRunner)", best_of(repeat, command)),
            ("pipe cache ls --json, in process", best_of(repeat, lambda: command("--json"))),
            ("baseline: sorted(store.iter_metadata())", best_of(min(repeat, 2), baseline)),
        ]
        after = calibration()
        print(f"best of {repeat}, {args.entries:,} entries (wall / CPU):")
        for name, (wall, cpu) in figures:
            print(f"  {name:<42} {wall * 1000:8.1f} ms / {cpu * 1000:8.1f} ms")
        load = os.getloadavg()[0]
        print(f"load average {load:.1f} on {os.cpu_count()} cores (figures inflate under load)")
        speed = min(before, after)
        print(
            f"calibration: a 10M-iteration Python loop takes {before:.2f} s CPU before, "
            f"{after:.2f} s after ({REFERENCE_CALIBRATION_S:.2f} s on the reference machine)"
        )
        wall = target[0]
        verdict = "OK" if wall < TARGET_S else "TOO SLOW"
        print(f"target: pipe cache ls under {TARGET_S:.1f} s: {wall:.2f} s -> {verdict}")
        if speed > REFERENCE_CALIBRATION_S * 1.2:
            scaled = wall * REFERENCE_CALIBRATION_S / speed
            print(
                f"  (this machine runs {speed / REFERENCE_CALIBRATION_S:.1f}x slower than the "
                f"reference now: about {scaled:.2f} s there, an estimate)"
            )


if __name__ == "__main__":
    main()
