"""Pipelines and process helpers shared by the reliability tests.

Imported as ``reliability.pipelines`` both by the tests and by the worker processes
they start, so stage identities (and cache keys) are the same on both sides. The
CLI tests load this file by path instead (``tests/reliability/pipelines.py:attr``);
only the Ctrl-C pipeline is meant for that.

Worker processes are forked from a *zygote*: one ``python`` process that imports
everything once and then forks a child per job, so a trial costs a fork (a few
milliseconds) instead of an interpreter start (seconds on a busy machine).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    PipelineResult,
    StageDefinition,
    StageFinished,
    StageResult,
    StageStatus,
    success_result,
)
from twinklr_pipe.cache import fingerprint

TESTS_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# -- figures for docs/reliability.md ---------------------------------------------------------


class Tally:
    """What the reliability tests tried and found, printed at the end of the session."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.wrong_outputs = 0

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def check_outputs(self, got: Any, expected: Any) -> bool:
        """Count one output comparison; a mismatch is a wrong output."""
        self.add("all: outputs and stored values compared with the expected value")
        if got != expected:
            self.wrong_outputs += 1
            return False
        return True

    def lines(self) -> list[str]:
        lines = [f"{what}: {n}" for what, n in sorted(self.counts.items())]
        lines.append(f"wrong outputs served: {self.wrong_outputs}")
        return lines


TALLY = Tally()


# -- the crash pipeline: 30 stages, one FAN_OUT of 200 items ---------------------------------

FAN_ITEMS = 200
#: Outputs this big are stored by diskcache in a value file of their own (> 32 KiB).
BIG_BYTES = 40 * 1024
#: Stage bodies append "<stage>:<item>" here (O_APPEND), when set (concurrency tests).
COUNT_ENV = "TWINKLR_REL_COUNT_FILE"


def _no_key(default: Any) -> Any:
    """A dataclass field kept out of the cache key (it changes timing, not output)."""
    return dataclasses.field(default=default, metadata={"cache": False}, repr=False)


def _count(tag: str) -> None:
    path = os.environ.get(COUNT_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{tag}\n".encode())
        finally:
            os.close(fd)


@dataclasses.dataclass(eq=False)
class Mix:
    """A stage whose output is a deterministic function of its tag and its input.

    ``big`` stages return ``BIG_BYTES`` of bytes (a value file in the store), the others
    a small dict (a row in cache.db). ``items`` returns the list the FAN_OUT fans over.
    """

    tag: str
    kind: str = "small"  # small | big | items
    delay: float = _no_key(0.002)
    n: int = FAN_ITEMS  # how many items an "items" stage makes
    version = "1"

    @property
    def name(self) -> str:
        return self.tag

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        await anyio.sleep(self.delay)
        _count(self.tag)
        seed = f"{self.tag}|{fingerprint(input)}"
        if self.kind == "big":
            out: Any = hashlib.shake_128(seed.encode()).digest(BIG_BYTES)
        elif self.kind == "items":
            base = hashlib.sha256(seed.encode()).hexdigest()[:12]
            out = [{"i": i, "base": base} for i in range(self.n)]
        else:
            out = {"tag": self.tag, "of": hashlib.sha256(seed.encode()).hexdigest()[:16]}
        return success_result(out, stage_name=self.tag)


@dataclasses.dataclass(eq=False)
class Item:
    """The FAN_OUT body: one small dict per item."""

    tag: str = "fan"
    delay: float = _no_key(0.0005)
    version = "1"

    @property
    def name(self) -> str:
        return self.tag

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        await anyio.sleep(self.delay)
        _count(f"{self.tag}:{input['i']}")
        digest = hashlib.sha256(f"{input['i']}|{input['base']}".encode()).hexdigest()[:16]
        return success_result({"i": input["i"], "d": digest}, stage_name=self.tag)


def crash_pipeline(delay: float = 0.002, item_delay: float = 0.0005) -> PipelineDefinition:
    """30 stages: a diamond-rich DAG around one FAN_OUT of ``FAN_ITEMS`` items.

    Entry ``s00`` feeds two branches; ``items`` makes the list ``fan`` fans over;
    ``agg`` joins the fan-out with a branch; a tail of stages follows. Four stages
    return large bytes so crashes also land while value files are written.
    """

    def mix(sid: str, inputs: list[str], kind: str = "small") -> StageDefinition:
        return StageDefinition(sid, Mix(sid, kind, delay), inputs=inputs)

    stages = [mix("s00", [])]
    prev_a, prev_b = "s00", "s00"
    for n in range(1, 9):  # two interleaved branches: a01..a08, b01..b08 (16 stages)
        kind = "big" if n in (3, 6) else "small"
        stages.append(mix(f"a{n:02d}", [prev_a], kind))
        stages.append(mix(f"b{n:02d}", [prev_b, prev_a] if n % 3 == 0 else [prev_b], kind))
        prev_a, prev_b = f"a{n:02d}", f"b{n:02d}"
    stages.append(mix("items", [prev_a], "items"))
    stages.append(
        StageDefinition(
            "fan",
            Item("fan", item_delay),
            pattern=ExecutionPattern.FAN_OUT,
            inputs=["items"],
            max_concurrent_fan_out=8,
        )
    )
    stages.append(mix("agg", ["fan", prev_b]))
    prev = "agg"
    for n in range(1, 11):  # the tail: t01..t10
        stages.append(mix(f"t{n:02d}", [prev, "s00"] if n % 4 == 0 else [prev]))
        prev = f"t{n:02d}"
    assert len(stages) == 30, len(stages)
    return PipelineDefinition("crash", stages)


CRASH_INPUT: dict[str, Any] = {"song": "reliability"}


def small_pipeline(items: int = 10) -> PipelineDefinition:
    """7 stages: two big outputs (value files) and a FAN_OUT of ``items`` items."""

    def mix(sid: str, inputs: list[str], kind: str = "small") -> StageDefinition:
        return StageDefinition(sid, Mix(sid, kind, 0.0), inputs=inputs)

    return PipelineDefinition(
        "small",
        [
            mix("s00", []),
            mix("big1", ["s00"], "big"),
            mix("mid", ["big1"]),
            StageDefinition("items", Mix("items", "items", 0.0, n=items), inputs=["s00"]),
            StageDefinition(
                "fan", Item("fan", 0.0), pattern=ExecutionPattern.FAN_OUT, inputs=["items"]
            ),
            mix("agg", ["fan", "mid"]),
            mix("big2", ["agg"], "big"),
        ],
    )


SMALL_INPUT: dict[str, Any] = {"song": "corruption"}


def medium_pipeline() -> PipelineDefinition:
    """The small pipeline with a FAN_OUT of 24 items (more than any thread limiter)."""
    return small_pipeline(24)


PIPELINES: dict[str, Callable[[], PipelineDefinition]] = {
    "crash": crash_pipeline,
    "small": small_pipeline,
    "medium": medium_pipeline,
}
INPUTS: dict[str, dict[str, Any]] = {
    "crash": CRASH_INPUT,
    "small": SMALL_INPUT,
    "medium": SMALL_INPUT,
}


def crash_input() -> dict[str, Any]:
    return dict(CRASH_INPUT)


Where = tuple[str, int | None]


def expected_entries(*results: PipelineResult) -> dict[Where, list[Any]]:
    """(stage id, item index) -> the outputs an entry of that stage (item) may hold."""
    expected: dict[Where, list[Any]] = {}
    for result in results:
        for sid, output in result.outputs.items():
            if sid == "fan":
                for i, item in enumerate(output):
                    expected.setdefault((sid, i), []).append(item)
            else:
                expected.setdefault((sid, None), []).append(output)
    return expected


def check_store(cache_dir: Path, expected: dict[Where, list[Any]]) -> dict[str, Where]:
    """The store opens, has no half-written entry, and every entry holds a right value.

    Returns entry id -> (stage id, item index) of every entry.
    """
    import sqlite3

    from twinklr_pipe.cache import DiskCacheStore
    from twinklr_pipe.cache._codec import decode
    from twinklr_pipe.cache._fingerprint import digest

    with DiskCacheStore(cache_dir) as store:
        con = sqlite3.connect(f"file:{cache_dir / 'store' / 'cache.db'}?mode=ro", uri=True)
        try:
            keys = [k for (k,) in con.execute("SELECT key FROM Cache")]
        finally:
            con.close()
        metas = {k[2:] for k in keys if k.startswith("m/")}
        payloads = {k[2:] for k in keys if k.startswith("p/")}
        assert metas == payloads, f"half-written entries: {metas ^ payloads}"
        found: dict[str, Where] = {}
        for meta in store.iter_metadata():
            got = store.get(meta.entry_id)
            assert got is not None, f"entry {meta.entry_id} of {meta.stage_id} is unreadable"
            meta, payload = got
            value = decode(meta.codec, payload)
            assert digest(value).hex() == meta.output_hash
            where = (meta.stage_id, meta.item_index)
            TALLY.add("all: outputs and stored values compared with the expected value")
            if value not in expected[where]:
                TALLY.wrong_outputs += 1
                raise AssertionError(f"entry {meta.entry_id} of {where} holds a wrong value")
            found[meta.entry_id] = where
        assert set(found) == metas
        TALLY.add("all: stored entries decoded and verified", len(found))
        return found


def crash_reference() -> PipelineResult:
    """An uninterrupted run of the crash pipeline, without a cache."""
    result = PipelineExecutor().run(crash_pipeline(0.0, 0.0), crash_input())
    assert result.success, result.failed_stages
    return result


# -- jobs run in forked children ----------------------------------------------------------------


def _append_line(path: str, line: str) -> None:
    """Append one line with one ``write`` (O_APPEND).

    Not fsync'd: a SIGKILL ends the process, not the kernel, so what ``write`` handed
    to the page cache is in the file for the parent to read.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _completion_logger(path: str) -> Callable[[Any], None]:
    """An ``on_event`` that appends ``"<stage> <cache>"`` for each stage that completed.

    A stage completes (``StageFinished``) after its entry is committed, so every stage
    in the log must be a hit from then on.
    """

    def on_event(event: Any) -> None:
        if isinstance(event, StageFinished) and event.status in (
            StageStatus.SUCCEEDED,
            StageStatus.CACHED,
        ):
            _append_line(path, f"{event.stage_id} {event.cache}")

    return on_event


#: Kill phases in the pending log's path (the others are in ``put``'s transaction).
PENDING_PHASES = ("append", "flush", "flushed")


def _install_write_kill(put_index: int, phase: str, note: str) -> None:
    """SIGKILL this process at one point of its ``put_index``-th cache write.

    Small entries go to the store's pending log (``put_pending``), then into the
    database in batches. Phases there: ``append`` (half of the entry's log record
    written), ``flush`` (its rows written inside the batch's transaction, not
    committed), ``flushed`` (the batch committed, the log not yet emptied).

    The other phases turn the pending log off, so entries take ``put``'s transaction:
    ``files`` (value files written, transaction not begun), ``meta`` (metadata row
    written inside the transaction), ``rows`` (both rows written, not committed),
    ``commit`` (committed, replaced files not yet removed). The entry id is appended
    to ``note`` first.
    """
    if phase in PENDING_PHASES:
        _install_pending_kill(put_index, phase, note)
        return
    import threading

    from twinklr_pipe.cache import _store

    _store.DiskCacheStore.put_pending = lambda self, meta, payload: False  # type: ignore[method-assign]

    real_put = _store.DiskCacheStore._put  # under put() and try_put()
    real_row = _store._write_row
    lock = threading.Lock()
    puts = [0]
    local = threading.local()

    def kill() -> None:
        _append_line(note, f"{local.entry} {phase}")
        os.kill(os.getpid(), signal.SIGKILL)

    def put(self: Any, meta: Any, payload: bytes, **options: Any) -> bool:
        with lock:
            puts[0] += 1
            local.armed = puts[0] == put_index
        local.rows = 0
        local.entry = meta.entry_id
        stored: bool = real_put(self, meta, payload, **options)
        if local.armed and phase == "commit" and stored:
            kill()
        return stored

    def write_row(*args: Any, **options: Any) -> None:
        local.rows = getattr(local, "rows", 0) + 1
        armed = getattr(local, "armed", False)
        if armed and phase == "files" and local.rows == 1:
            kill()
        real_row(*args, **options)
        if armed and phase == "meta" and local.rows == 1:
            kill()
        if armed and phase == "rows" and local.rows == 2:
            kill()

    _store.DiskCacheStore._put = put  # type: ignore[method-assign]
    _store._write_row = write_row  # type: ignore[assignment]


def _install_pending_kill(put_index: int, phase: str, note: str) -> None:
    """``_install_write_kill`` for the pending log's phases."""
    import threading

    from twinklr_pipe.cache import _pending, _store

    real_append = _pending.PendingLog.append
    real_batch = _store.DiskCacheStore._write_batch
    real_row = _store._write_row
    real_insert = _store._insert_rows
    lock = threading.Lock()
    appends = [0]
    armed: list[str] = []  # the entry id whose write is to be killed

    def kill(entry: str) -> None:
        _append_line(note, f"{entry} {phase}")
        os.kill(os.getpid(), signal.SIGKILL)

    def append(self: Any, record: bytes) -> None:
        with lock:
            appends[0] += 1
            mine = appends[0] == put_index
        if mine:
            ((data, _),) = _pending.parse_records(record)
            meta = json.loads(data)
            armed.append(f"{meta['key']}.{meta['variant']}")
            if phase == "append":
                os.write(self._fd, record[: len(record) // 2])
                kill(armed[0])
        real_append(self, record)

    def write_row(*args: Any, **options: Any) -> None:
        real_row(*args, **options)
        if phase == "flush" and armed and args[1] == "p/" + armed[0]:
            kill(armed[0])

    def insert_rows(con: Any, rows: list[tuple[Any, ...]]) -> None:
        real_insert(con, rows)
        if phase == "flush" and armed and any(row[0] == "p/" + armed[0] for row in rows):
            kill(armed[0])

    def write_batch(self: Any, items: Any) -> None:
        real_batch(self, items)
        if phase == "flushed" and armed and any(m.entry_id == armed[0] for m, _, _ in items):
            kill(armed[0])

    _pending.PendingLog.append = append  # type: ignore[method-assign]
    _store._write_row = write_row  # type: ignore[assignment]
    _store._insert_rows = insert_rows  # type: ignore[assignment]
    _store.DiskCacheStore._write_batch = write_batch  # type: ignore[method-assign]


def job_crash_run(
    cache_dir: str,
    log: str,
    kill_put: int | None = None,
    phase: str = "files",
    crash_at_end: bool = False,
    which: str = "crash",
) -> int:
    """Run the crash (or small) pipeline on ``cache_dir``, logging completed stages to ``log``."""
    if kill_put is not None:
        _install_write_kill(kill_put, phase, log + ".killed")

    class Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _append_line(log, "#warning " + record.getMessage().replace("\n", " "))

    logging.getLogger("twinklr_pipe").addHandler(Warnings(logging.WARNING))
    executor = PipelineExecutor(cache_dir)
    result = executor.run(PIPELINES[which](), INPUTS[which], on_event=_completion_logger(log))
    if crash_at_end:  # leave cache.db-wal behind, as a crashed writer does
        os.kill(os.getpid(), signal.SIGKILL)
    _append_line(log, "#done" if result.success else "#failed")
    return 0 if result.success else 1


def _barrier(directory: str, name: str, parties: int, me: int, timeout: float = 30.0) -> None:
    Path(directory, f"{name}.{me}").touch()
    deadline = time.monotonic() + timeout
    while (
        sum(1 for i in range(parties) if os.path.exists(os.path.join(directory, f"{name}.{i}")))
        < parties
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: not every process arrived")
        time.sleep(0.001)


def round_input(which: str, round_no: int) -> dict[str, Any]:
    """The input of one concurrency round: keys no other round shares."""
    return {**INPUTS[which], "round": round_no}


def job_concurrent(
    cache_dir: str,
    work: str,
    me: int,
    parties: int,
    rounds: int,
    dedupe: bool,
    which: str = "small",
) -> int:
    """One of ``parties`` processes running ``rounds`` rounds on one cache directory.

    Every round starts together (a file barrier) with an input of its own, so every
    key is new; bodies count their executions in ``count-<round>``; the outputs'
    fingerprint goes to ``out-<round>-<me>.json``.
    """
    pipeline = PIPELINES[which]()
    for r in range(rounds):
        os.environ[COUNT_ENV] = os.path.join(work, f"count-{r}")
        _barrier(work, f"start-{r}", parties, me)
        executor = PipelineExecutor(cache_dir, dedupe=dedupe)
        try:
            result = executor.run(pipeline, round_input(which, r))
        finally:
            assert executor.store is not None
            executor.store.close()
        record = {
            "success": result.success,
            "failed": {s: result.stage_results[s].error for s in result.failed_stages},
            "outputs": fingerprint(result.outputs),
            "executed": sorted(result.executed),
            "cached": sorted(result.cached),
        }
        Path(work, f"out-{r}-{me}.json").write_text(json.dumps(record))
    return 0


JOBS: dict[str, Callable[..., int]] = {
    "crash_run": job_crash_run,
    "concurrent": job_concurrent,
}


def register_job(name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    def add(fn: Callable[..., int]) -> Callable[..., int]:
        JOBS[name] = fn
        return fn

    return add


@register_job("drift_run")
def job_drift_run(workdir: str, cache_dir: str, report: str) -> int:
    """Import ``driftmod`` from ``workdir`` (fresh in this child) and run its pipeline."""
    sys.dont_write_bytecode = True  # an edit within the same second must not hit a stale .pyc
    sys.path.insert(0, workdir)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("twinklr_pipe").addHandler(Collect(logging.WARNING))
    import driftmod  # type: ignore[import-not-found]

    executor = PipelineExecutor(cache_dir)
    result = executor.run(driftmod.pipeline, None)
    output = result.outputs.get("make")
    Path(report).write_text(
        json.dumps(
            {
                "success": result.success,
                "error": result.stage_results["make"].error,
                "executed": result.executed,
                "cached": result.cached,
                "type": f"{type(output).__module__}.{type(output).__qualname__}",
                "output": output.model_dump(mode="json") if output is not None else None,
                "warnings": records,
            }
        )
    )
    return 0


@register_job("disk_full_run")
def job_disk_full_run(cache_dir: str, report: str, headroom: int) -> int:
    """Run with RLIMIT_FSIZE just above what is on disk: real failing writes (EFBIG)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() with EFBIG instead
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("twinklr_pipe").addHandler(Collect(logging.WARNING))
    executor = PipelineExecutor(cache_dir)  # opened before the limit: the store exists
    biggest = max((p.stat().st_size for p in Path(cache_dir).rglob("*") if p.is_file()), default=0)
    resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + headroom, resource.RLIM_INFINITY))
    result = executor.run(crash_pipeline(0.0, 0.0), crash_input())
    Path(report).write_text(
        json.dumps(
            {
                "success": result.success,
                "outputs": fingerprint(result.outputs),
                "executed": len(result.executed),
                "store_errors": result.metadata["cache"]["store_errors"],
                "warnings": records,
            }
        )
    )
    return 0


#: A forked job still running after this many seconds dumps its stacks and exits.
HANG_SECONDS = 90


# -- the zygote -------------------------------------------------------------------------------


def _child(job: str, kwargs: dict[str, Any]) -> None:
    code = 1
    # stdout is the zygote's reply pipe: nothing a job prints may reach it.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    # A job that hangs shows every thread's stack (on stderr) before the test times out.
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = JOBS[job](**kwargs)
    except BaseException:
        traceback.print_exc()
        code = 3
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _preload() -> None:
    """Import what a run imports lazily, so that forked children start warm."""
    import anyio._backends._asyncio
    import anyio.to_thread  # noqa: F401

    import twinklr_pipe._cli
    import twinklr_pipe._executor
    import twinklr_pipe._journal
    import twinklr_pipe._live
    import twinklr_pipe._loader
    import twinklr_pipe.cache._codec
    import twinklr_pipe.cache._keys
    import twinklr_pipe.cache._runtime
    import twinklr_pipe.cache._store  # noqa: F401

    # Build (not run) every pipeline once: class-level caches fill before the fork.
    crash_pipeline()


def zygote_main() -> None:
    """Serve fork requests: one JSON command per stdin line, one JSON reply per line.

    ``{"fork": job, "kwargs": {...}}`` -> ``{"pid": pid}``;
    ``{"wait": pid}`` -> ``{"pid": pid, "status": raw_wait_status}``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _preload()
    out = sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if "fork" in cmd:
            out.flush()
            pid = os.fork()
            if pid == 0:
                _child(cmd["fork"], cmd.get("kwargs", {}))
            reply: dict[str, Any] = {"pid": pid}
        elif "wait" in cmd:
            _, status = os.waitpid(cmd["wait"], 0)
            reply = {"pid": cmd["wait"], "status": status}
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Zygote:
    """Parent side of ``zygote_main``: fork jobs, kill them, reap them."""

    def __init__(self) -> None:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from reliability.pipelines import zygote_main; zygote_main()"
        )
        self.proc = subprocess.Popen(
            [PYTHON, "-c", code, str(TESTS_DIR)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote died (exit {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def fork(self, job: str, **kwargs: Any) -> int:
        pid: int = self._ask({"fork": job, "kwargs": kwargs})["pid"]
        return pid

    def wait(self, pid: int) -> int:
        """Reap ``pid``; return its exit code, or ``-signal`` when a signal killed it."""
        status: int = self._ask({"wait": pid})["status"]
        if os.WIFSIGNALED(status):
            return -os.WTERMSIG(status)
        return os.WEXITSTATUS(status)

    def run(self, job: str, **kwargs: Any) -> int:
        return self.wait(self.fork(job, **kwargs))

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# -- the Ctrl-C pipeline (loaded by `pipe run` from this file) ------------------------------------

#: Items >= this many sleep until cancelled while TWINKLR_REL_SLOW is "1".
QUICK_ITEMS = 12
SIGINT_ITEMS = 40
MARKS_ENV = "TWINKLR_REL_MARKS"
SLOW_ENV = "TWINKLR_REL_SLOW"


@dataclasses.dataclass(eq=False)
class Render:
    """A FAN_OUT body: quick for the first items, then (in slow mode) waits to be cancelled."""

    version = "1"

    @property
    def name(self) -> str:
        return "render"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        if input >= QUICK_ITEMS and os.environ.get(SLOW_ENV) == "1":
            await anyio.sleep(3600)
        marks = os.environ.get(MARKS_ENV)
        if marks:
            _append_line(marks, str(input))
        return success_result({"item": input, "frame": input * input}, stage_name="render")


@dataclasses.dataclass(eq=False)
class Frames:
    version = "1"

    @property
    def name(self) -> str:
        return "frames"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        return success_result(list(range(int(input))), stage_name="frames")


def sigint_pipeline() -> PipelineDefinition:
    return PipelineDefinition(
        "sigint",
        [
            StageDefinition("frames", Frames()),
            StageDefinition(
                "render",
                Render(),
                pattern=ExecutionPattern.FAN_OUT,
                inputs=["frames"],
                max_concurrent_fan_out=4,
            ),
        ],
    )
