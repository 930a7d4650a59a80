"""The run journal: one append-only JSON Lines file per run under ``<cache_dir>/runs/``.

A journal starts with a header, written (and flushed to the OS) before the first
stage starts, so a run killed at any instant can be resumed: it names the run,
the pipeline, the spec (a file spec resolved to an absolute path), the working
directory and the initial input (how to rebuild it, and its fingerprint). Then
come the run's stage events, one line each, and a closing record with the final
status, written under a shielded cancel scope. A run without a closing record
was killed (or is still running, when its process is alive).

Record types (field ``type``): ``header``, ``event`` (``event`` names the event
class), ``end``. A half-written last line (a crash mid-write) is ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field

from ._events import (
    PipelineEvent,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
)
from ._results import PipelineResult
from .errors import RunNotFound, StoreError

if TYPE_CHECKING:
    from ._context import PipelineContext
    from ._definition import PipelineDefinition
    from ._executor import PipelineExecutor

__all__ = [
    "InputSpec",
    "JournalledRun",
    "RunJournal",
    "RunRecord",
    "entries_used_by_recent_runs",
    "list_runs",
    "load_run",
    "open_journal",
    "read_run",
    "run_journalled",
    "runs_dir",
]

#: Events worth a journal line (FAN_OUT progress and per-item hits are not).
_JOURNALLED = (RunStarted, StageStarted, StageFinished, RunFinished)


def runs_dir(cache_dir: str | os.PathLike[str]) -> Path:
    """Where the journal files of a cache directory live."""
    return Path(cache_dir) / "runs"


class InputSpec(BaseModel):
    """How to rebuild a run's initial input.

    ``kind`` is ``none`` (no input), ``json`` (``value`` is the parsed JSON value,
    also for ``--input-file``), ``string`` (``value`` is the raw string) or
    ``path`` (``value`` is an absolute path passed as a ``FileInput``).
    """

    model_config = ConfigDict(frozen=True)

    kind: str = "none"
    value: Any = None

    def build(self) -> Any:
        """The initial input this describes."""
        if self.kind == "path":
            from .cache._fingerprint import FileInput

            return FileInput(self.value)
        return self.value


class RunRecord(BaseModel):
    """A run as its journal tells it."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    pipeline: str
    spec: str
    cwd: str
    input: InputSpec = Field(default_factory=InputSpec)
    input_fingerprint: str | None = None
    force: list[str] = Field(default_factory=list)
    started_at: float = 0.0
    ended_at: float | None = None
    #: running | succeeded | failed | cancelled | crashed (killed before its closing record)
    status: str = "running"
    #: Per stage: pending | running | succeeded | cached | failed | skipped | cancelled,
    #: and ``interrupted`` for a stage that was running when the run was killed.
    stages: dict[str, str] = Field(default_factory=dict)
    #: Cache entry ids the run read or wrote.
    entry_ids: list[str] = Field(default_factory=list)
    resumed_from: str | None = None
    pid: int | None = None
    host: str | None = None
    path: str = ""

    @property
    def duration_s(self) -> float | None:
        """Wall time of a finished run."""
        return None if self.ended_at is None else self.ended_at - self.started_at


class RunJournal:
    """Writes one run's journal. Use ``open_journal`` to create one.

    ``record`` is an ``on_event`` callback: pass it to ``PipelineExecutor.execute``.
    """

    def __init__(self, path: Path, handle: IO[str] | None, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self._handle: IO[str] | None = handle
        self.closed = False

    def _write(self, record: dict[str, Any]) -> None:
        handle = self._handle
        if handle is None:
            return
        handle.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        handle.flush()

    def record(self, event: PipelineEvent) -> None:
        """Append a stage-level event (others are ignored)."""
        if not isinstance(event, _JOURNALLED):
            return
        data = {
            k: (v.value if isinstance(v, enum.Enum) else v)
            for k, v in dataclasses.asdict(event).items()
        }
        data.pop("run_id", None)
        self._write({"type": "event", "event": type(event).__name__, "t": time.time(), **data})

    def close(self, status: str, result: PipelineResult | None = None) -> None:
        """Write the closing record (``succeeded``, ``failed``, ``cancelled``) and close."""
        if self.closed:
            return
        record: dict[str, Any] = {"type": "end", "status": status, "ended_at": time.time()}
        if result is not None:
            record["success"] = result.success
            record["duration_ms"] = result.total_duration_ms
        try:
            self._write(record)
        finally:
            self.closed = True
            handle, self._handle = self._handle, None
            if handle is not None:
                handle.close()

    async def aclose(self, status: str, result: PipelineResult | None = None) -> None:
        """``close`` under a shielded scope, so a cancelled run still records how it ended."""
        with anyio.move_on_after(5, shield=True):
            await anyio.to_thread.run_sync(self.close, status, result)

    def __enter__(self) -> RunJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        # An exception escaped the run (not a normal end): the run counts as crashed.
        if not self.closed:
            handle, self._handle = self._handle, None
            self.closed = True
            if handle is not None:
                handle.close()


def open_journal(
    cache_dir: str | os.PathLike[str],
    *,
    run_id: str,
    pipeline: str,
    spec: str,
    cwd: str | os.PathLike[str],
    input: InputSpec,
    input_fingerprint: str | None,
    force: list[str] | None = None,
    resumed_from: str | None = None,
) -> RunJournal:
    """Create the journal of a new run and write its header (flushed and synced).

    Raises:
        StoreError: the journal directory cannot be created or written.
    """
    folder = runs_dir(cache_dir)
    path = folder / f"{run_id}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    except OSError as exc:
        raise StoreError(
            f"Cannot write the run journal in {folder}: {exc.strerror or exc}"
        ) from exc
    handle = os.fdopen(fd, "w", encoding="utf-8")
    journal = RunJournal(path, handle, run_id)
    header = {
        "type": "header",
        "run_id": run_id,
        "pipeline": pipeline,
        "spec": spec,
        "cwd": str(cwd),
        "input": input.model_dump(),
        "input_fingerprint": input_fingerprint,
        "force": list(force or []),
        "started_at": time.time(),
        "resumed_from": resumed_from,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    try:
        journal._write(header)
        os.fsync(fd)
    except (OSError, TypeError, ValueError) as exc:
        journal.close("failed")
        raise StoreError(f"Cannot write the run journal {path}: {exc}") from exc
    return journal


# -- reading ------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict):
            yield record


def _alive(pid: int | None, host: str | None) -> bool:
    if host is not None and host != socket.gethostname():
        return True  # another machine shares the cache directory: we cannot tell
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    # A zombie (killed, not yet reaped by its parent) is not running.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def read_run(path: Path) -> RunRecord | None:
    """Parse one journal file; None when it has no readable header."""
    header: dict[str, Any] | None = None
    stages: dict[str, str] = {}
    entry_ids: dict[str, None] = {}
    end: dict[str, Any] | None = None
    for record in _records(path):
        kind = record.get("type")
        if kind == "header" and header is None:
            header = record
        elif kind == "event":
            event = record.get("event")
            if event == "RunStarted":
                for sid in record.get("stage_ids") or []:
                    stages.setdefault(str(sid), "pending")
            elif event == "StageStarted":
                stages[str(record.get("stage_id"))] = "running"
            elif event == "StageFinished":
                stages[str(record.get("stage_id"))] = str(record.get("status"))
                for key in record.get("keys") or []:
                    entry_ids[str(key)] = None
        elif kind == "end":
            end = record
    if header is None:
        return None
    if end is not None:
        status = str(end.get("status", "failed"))
        ended_at = end.get("ended_at")
    else:
        running = _alive(header.get("pid"), header.get("host"))
        status = "running" if running else "crashed"
        ended_at = None
        if not running:
            stages = {k: ("interrupted" if v == "running" else v) for k, v in stages.items()}
    try:
        return RunRecord(
            run_id=str(header.get("run_id", path.stem)),
            pipeline=str(header.get("pipeline", "")),
            spec=str(header.get("spec", "")),
            cwd=str(header.get("cwd", "")),
            input=InputSpec.model_validate(header.get("input") or {}),
            input_fingerprint=header.get("input_fingerprint"),
            force=list(header.get("force") or []),
            started_at=float(header.get("started_at", 0.0)),
            ended_at=float(ended_at) if ended_at is not None else None,
            status=status,
            stages=stages,
            entry_ids=list(entry_ids),
            resumed_from=header.get("resumed_from"),
            pid=header.get("pid"),
            host=header.get("host"),
            path=str(path),
        )
    except (ValueError, TypeError):
        return None


def list_runs(cache_dir: str | os.PathLike[str]) -> list[RunRecord]:
    """Every journalled run of a cache directory, oldest first."""
    folder = runs_dir(cache_dir)
    if not folder.is_dir():
        return []
    runs = [r for r in (read_run(p) for p in folder.glob("*.jsonl")) if r is not None]
    runs.sort(key=lambda r: (r.started_at, r.run_id))
    return runs


def load_run(cache_dir: str | os.PathLike[str], run_id: str) -> RunRecord:
    """The run ``run_id`` (or the only run whose id starts with it).

    Raises:
        RunNotFound: no such run, or the prefix matches several runs; the message
            names the latest run ids.
    """
    folder = runs_dir(cache_dir)
    exact = folder / f"{run_id}.jsonl"
    if run_id and "/" not in run_id and exact.is_file():
        record = read_run(exact)
        if record is not None:
            return record
    runs = list_runs(cache_dir)
    matches = [r for r in runs if r.run_id.startswith(run_id)] if run_id else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        ids = ", ".join(r.run_id for r in matches[-3:])
        raise RunNotFound(f"Run id '{run_id}' is ambiguous in journal {folder} (matches {ids})")
    latest = ", ".join(r.run_id for r in reversed(runs[-3:])) or "none"
    raise RunNotFound(f"No run '{run_id}' in journal {folder} (latest: {latest})")


def entries_used_by_recent_runs(cache_dir: str | os.PathLike[str], runs: int) -> set[str]:
    """Entry ids read or written by the last ``runs`` journalled runs."""
    if runs <= 0:
        return set()
    used: set[str] = set()
    for record in list_runs(cache_dir)[-runs:]:
        used.update(record.entry_ids)
    return used


# -- running with a journal -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JournalledRun:
    """What ``run_journalled`` returns."""

    #: None only when a second Ctrl-C aborted the run before it could assemble a result.
    result: PipelineResult | None
    run_id: str
    #: Ctrl-C (SIGINT) or ``context.cancel()`` stopped the run.
    interrupted: bool
    journal: Path


def run_journalled(
    executor: PipelineExecutor,
    pipeline: PipelineDefinition,
    *,
    cache_dir: str | os.PathLike[str] | None,
    spec: str,
    cwd: str | os.PathLike[str],
    input: InputSpec,
    context: PipelineContext | None = None,
    force: Iterable[str] = (),
    run_id: str | None = None,
    on_event: Callable[[PipelineEvent], Any] | None = None,
    resumed_from: str | None = None,
    handle_sigint: bool = True,
) -> JournalledRun:
    """Run ``pipeline`` with a journal, so it can be listed and resumed.

    The header is written before the first stage starts; events follow; the closing
    record (succeeded, failed or cancelled) is written under a shielded scope. With
    ``handle_sigint`` (and in the main thread), the first Ctrl-C cancels the run
    cleanly through ``context.cancel()``: running stages are cancelled, completed
    ones stay cached. A second Ctrl-C aborts at once (the journal still closes).
    With ``cache_dir=None`` nothing is journalled.

    Raises:
        StoreError: the journal cannot be written.
        FingerprintError: the input cannot be fingerprinted.
    """
    from ._context import PipelineContext
    from ._executor import new_run_id

    run_id = run_id or new_run_id()
    initial_input = input.build()
    input_fp: str | None = None
    if executor.store is not None:
        from .cache._fingerprint import fingerprint

        input_fp = fingerprint(initial_input)
    context = context if context is not None else PipelineContext()
    forced = list(force)
    if cache_dir is None:
        journal = RunJournal(Path(os.devnull), None, run_id)
    else:
        journal = open_journal(
            cache_dir,
            run_id=run_id,
            pipeline=pipeline.name,
            spec=spec,
            cwd=cwd,
            input=input,
            input_fingerprint=input_fp,
            force=forced,
            resumed_from=resumed_from,
        )
    interrupted = False
    result: PipelineResult | None = None

    def events(event: PipelineEvent) -> None:
        journal.record(event)
        if on_event is not None:
            on_event(event)

    async def watch_sigint(
        scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if interrupted:
                    scope.cancel()  # a second Ctrl-C: stop waiting for the stages
                    return
                interrupted = True
                context.cancel()

    async def main() -> None:
        nonlocal result
        try:
            async with anyio.create_task_group() as tg:
                if handle_sigint and threading.current_thread() is threading.main_thread():
                    await tg.start(watch_sigint, tg.cancel_scope)
                result = await executor.execute(
                    pipeline,
                    initial_input,
                    context,
                    force=forced,
                    run_id=run_id,
                    on_event=events,
                )
                tg.cancel_scope.cancel()
        finally:
            if result is None or interrupted or context.is_cancelled():
                status = "cancelled"
            else:
                status = "succeeded" if result.success else "failed"
            await journal.aclose(status, result)

    with journal:
        anyio.run(main)
    return JournalledRun(
        result=result,
        run_id=run_id,
        interrupted=interrupted or context.is_cancelled() or result is None,
        journal=journal.path,
    )
