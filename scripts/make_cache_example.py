"""Regenerate ``.cache-example/``: a real cache directory, committed, from the shipped example.

It runs ``twinklr_pipe.examples.sequencer`` once, with no input (so the ``audio`` stage
analyses the bundled clip), into a fresh ``.cache-example/`` at the repository root.
On a fresh clone, then::

    pipe cache ls --cache-dir .cache-example
    pipe plan twinklr_pipe.examples.sequencer:pipeline --cache-dir .cache-example

list real entries and say that every stage but ``export`` (``cache=False``) is cached.
``tests/test_cache_example.py`` opens a copy with the current code: when the store
format or the key recipe changes, that test fails until this script is run again and
``CACHE_FORMAT_VERSION`` is bumped, because users' existing caches are in the old format.

What is (and is not) in the directory:

* ``FORMAT``, ``store.lock`` and ``store/cache.db`` (diskcache's SQLite database; every
  payload of the example is small enough to live inside it).
* No ``runs/`` journal: the script calls the executor directly rather than ``pipe run``,
  so there are no absolute paths, host names or process ids of the machine that made it.
  The entries' ``run_id`` is ``cache-example``.
* No SQLite ``-wal``/``-shm`` files: the store is closed, the write-ahead log is
  checkpointed into ``cache.db`` before the script exits, and the database is left in
  rollback-journal mode (readers of a WAL database create those files).

Usage::

    python scripts/make_cache_example.py [DIRECTORY]
"""

from __future__ import annotations

import gc
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from twinklr_pipe import PipelineContext, PipelineExecutor
from twinklr_pipe.cache import DiskCacheStore
from twinklr_pipe.examples import sequencer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIRECTORY = ROOT / ".cache-example"
#: The ``run_id`` recorded in every entry, so ``pipe cache show`` says where it came from.
RUN_ID = "cache-example"
#: The committed directory must stay small.
MAX_BYTES = 1_000_000


def make(directory: Path) -> int:
    """Run the example into a fresh cache at ``directory``; return the number of entries."""
    if directory.exists():
        shutil.rmtree(directory)
    store = DiskCacheStore(directory)
    try:
        with tempfile.TemporaryDirectory() as out:
            # export writes its .xsq file here, not into the repository.
            definition = sequencer.build_pipeline(output_dir=out)
            context = PipelineContext(provider=sequencer.offline_provider())
            result = PipelineExecutor(cache=store).run(definition, context=context, run_id=RUN_ID)
        if not result.success:
            errors = {sid: r.error for sid, r in result.stage_results.items() if r.error}
            raise SystemExit(f"the example failed: {errors}")
        count = sum(1 for _ in store.iter_metadata())
    finally:
        store.close()
    # Worker threads' SQLite connections close when the store's diskcache object is
    # collected; until then SQLite keeps the -wal and -shm files.
    gc.collect()
    _checkpoint(directory / "store" / "cache.db")
    return count


def _checkpoint(database: Path) -> None:
    """Fold any write-ahead log into the database, so only ``cache.db`` is committed.

    The last connection to close removes ``cache.db-wal`` and ``cache.db-shm``. The file
    is left in rollback-journal mode, so that reading it (``pipe cache ls`` reads without
    opening the store) creates no ``-wal``/``-shm`` files in a clone; a store that opens
    it switches it back to WAL, as diskcache does with every database.
    """
    con = sqlite3.connect(database)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode = DELETE")
    finally:
        con.close()
    leftovers = [p.name for p in database.parent.glob("cache.db-*")]
    if leftovers:
        raise SystemExit(f"SQLite files left next to {database}: {leftovers}")


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main(argv: list[str]) -> None:
    directory = Path(argv[1]).absolute() if len(argv) > 1 else DEFAULT_DIRECTORY
    count = make(directory)
    size = _size(directory)
    if size > MAX_BYTES:
        raise SystemExit(f"{directory} is {size} bytes, over the {MAX_BYTES} byte budget")
    print(f"{directory}: {count} entries, {size} bytes")


if __name__ == "__main__":
    main(sys.argv)
