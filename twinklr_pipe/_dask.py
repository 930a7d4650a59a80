"""``DaskRunner``: run ``remote=True`` stage bodies on a Dask distributed cluster.

Example::

    from twinklr_pipe._dask import DaskRunner

    executor = PipelineExecutor(cache_dir=".twinklr-cache", runner=DaskRunner("tcp://sched:8786"))
    StageDefinition("render", render, pattern=ExecutionPattern.FAN_OUT, remote=True)

The executor keeps everything else: the cache is consulted before a body is
handed to the runner (hits never reach the cluster) and results are stored when
they come back, so workers need no access to the cache. Pools, retries and
timeouts stay in-process too; the runner submits one task per body (each FAN_OUT
item separately) through an asynchronous ``distributed.Client`` and awaits it.

A remote body receives its input and a *snapshot* of the context: a plain
``PipelineContext`` holding a copy of the picklable ``state`` entries, and no
services. Its state reads and writes and the metrics it adds travel back with
its result and are applied to the run's context, so the cache records and
replays them as for a local stage.

``distributed`` is an optional dependency (``pip install twinklr_pipe[dask]``):
this module imports it only when a runner is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._context import _MISSING, PipelineContext, StateRecorder, recording, set_current_context
from ._results import StageResult
from ._stage import FunctionStage
from .errors import PipeError

if TYPE_CHECKING:
    from ._definition import StageDefinition

__all__ = ["DaskNotInstalled", "DaskRunner", "RemoteError", "RemoteSendError"]

logger = logging.getLogger("twinklr_pipe")

_INSTALL_HINT = "pip install 'twinklr_pipe[dask]'"

#: Payloads above this size go to the cluster with ``Client.scatter``, not inside
#: the task (Dask warns about task graphs above 10 MB).
_SCATTER_BYTES = 1 << 20


class DaskNotInstalled(PipeError, ImportError):
    """Raised when a ``DaskRunner`` is created but ``distributed`` is not installed."""

    def __init__(self, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(
            f"Running stages on Dask needs the 'distributed' package{detail}; "
            f"install it with: {_INSTALL_HINT}"
        )


class RemoteError(PipeError):
    """A remote stage body could not be run on the cluster (connection, lost task, ...)."""


class RemoteSendError(RemoteError, TypeError):
    """A stage, or its input, cannot be pickled for the cluster; nothing was submitted.

    ``stage`` is the stage id, ``where`` what could not be sent (``input['groups'][3]``,
    ``stage object``) and ``value_type`` its type.
    """

    def __init__(self, stage: str, where: str, value_type: type, cause: BaseException) -> None:
        self.stage = stage
        self.where = where
        self.value_type = value_type
        name = f"{value_type.__module__}.{value_type.__qualname__}"
        super().__init__(
            f"Stage '{stage}' cannot run remotely: its {where} of type {name} cannot be "
            f"pickled for the Dask cluster ({type(cause).__name__}: {cause}). Pass picklable "
            "values (plain data, pydantic models, dataclasses, arrays), keep services such as "
            "clients and locks in the context, or run the stage locally (remote=False)."
        )


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise DaskNotInstalled(exc) from None
    return distributed


def _parse_local(target: str) -> int | None:
    """``local:N`` -> N; None when ``target`` is not a ``local:`` spec."""
    if not target.startswith("local:") and target != "local":
        return None
    count = target.partition(":")[2]
    try:
        workers = int(count)
    except ValueError:
        raise ValueError(
            f"Dask target {target!r}: write local:N with N worker processes, e.g. local:2"
        ) from None
    if workers < 1:
        raise ValueError(f"Dask target {target!r}: local:N needs at least 1 worker")
    return workers


class DaskRunner:
    """Runs the bodies of ``remote=True`` stages on a Dask distributed cluster.

    ``PipelineExecutor(runner=DaskRunner(...))``. The runner connects an
    asynchronous client lazily, on the first remote body of a run and inside that
    run's event loop, and closes the client it opened when the run ends.

    Args:
        address_or_client: A scheduler address (``"tcp://host:8786"``), a
            ``distributed.Client`` (asynchronous or not; it is used, never closed),
            or ``"local:N"``: a ``LocalCluster`` of N worker processes on the
            loopback interface, started on first use and kept until ``close()``
            (or the end of a ``with``/``async with`` block).
        state_keys: Which ``context.state`` entries remote bodies receive (None:
            every picklable entry).
        connect_timeout: Seconds to wait for the scheduler.
        retries: Dask's own automatic retries of a task whose function raised an
            infrastructure error (bodies' exceptions come back as failures and
            follow the stage's ``RetryConfig``). A worker that dies mid-task is
            rescheduled by the scheduler in any case.

    Attributes:
        submitted: How many tasks this runner has submitted (cache hits submit none).
    """

    def __init__(
        self,
        address_or_client: Any,
        *,
        state_keys: Iterable[str] | None = None,
        connect_timeout: float = 30.0,
        retries: int = 0,
    ) -> None:
        distributed = _import_distributed()
        self._client: Any = None
        self._address: str | None = None
        self._local_workers: int | None = None
        if isinstance(address_or_client, distributed.Client):
            self._client = address_or_client
        elif isinstance(address_or_client, str):
            self._local_workers = _parse_local(address_or_client)
            if self._local_workers is None:
                self._address = address_or_client
        else:
            raise TypeError(
                "DaskRunner takes a scheduler address ('tcp://host:8786'), 'local:N' or a "
                f"distributed.Client, not {type(address_or_client).__name__}"
            )
        self.state_keys = None if state_keys is None else frozenset(state_keys)
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.submitted = 0
        self._cluster: Any = None
        self._cluster_lock = threading.Lock()
        self._fallback: _Session | None = None

    def __repr__(self) -> str:
        if self._local_workers is not None:
            target = f"local:{self._local_workers}"
        elif self._address is not None:
            target = self._address
        else:
            target = repr(self._client)
        return f"DaskRunner({target})"

    # -- lifecycle ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """Scope of one pipeline run: remote bodies inside share one lazily opened client.

        ``PipelineExecutor`` enters it around a run that has remote stages; the
        client it opened (if any) is closed on exit, shielded from cancellation.
        """
        # No task group here: it would wrap exceptions (even KeyboardInterrupt) leaving the
        # run in an ExceptionGroup. The session's one background task is awaited in aclose.
        session = _Session(self, background=True)
        token = _active.set(session)
        try:
            yield
        finally:
            _active.reset(token)
            await session.aclose()

    async def aclose(self) -> None:
        """Close what the runner opened outside sessions, and its local cluster."""
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.aclose()
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        """Stop the ``local:N`` cluster this runner started (no-op otherwise)."""
        with self._cluster_lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()

    async def __aenter__(self) -> DaskRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _local_address(self) -> str:
        """Start the ``local:N`` cluster (once; blocking, so called in a thread)."""
        with self._cluster_lock:
            if self._cluster is None:
                distributed = _import_distributed()
                started = time.perf_counter()
                self._cluster = distributed.LocalCluster(
                    n_workers=self._local_workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                )
                logger.info(
                    "Started a Dask LocalCluster of %d worker processes at %s in %.1f s",
                    self._local_workers,
                    self._cluster.scheduler_address,
                    time.perf_counter() - started,
                )
            return str(self._cluster.scheduler_address)

    async def _connect(self) -> tuple[Any, bool]:
        """A client usable in the running event loop, and whether we own it."""
        distributed = _import_distributed()
        given = self._client
        if given is not None:
            if getattr(given, "asynchronous", False) and _loop_of(given) is _running_loop():
                return given, False
            address = given.scheduler.address
        elif self._local_workers is not None:
            address = await anyio.to_thread.run_sync(self._local_address)
        else:
            assert self._address is not None
            address = self._address
        try:
            client = await distributed.Client(
                address,
                asynchronous=True,
                set_as_default=False,
                timeout=self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RemoteError(
                f"Cannot connect to the Dask scheduler at {address}: {type(exc).__name__}: {exc}"
            ) from exc
        return client, True

    # -- running one body -------------------------------------------------------------------

    async def run(
        self, sdef: StageDefinition, value: Any, context: PipelineContext
    ) -> StageResult[Any]:
        """Run ``sdef``'s body on ``value`` on the cluster and return its result.

        Nothing is submitted when the stage or the input cannot be pickled
        (``RemoteSendError``). State reads and writes and metrics of the remote body
        are applied to ``context`` as if the body had run here. Cancelling the
        awaiting task cancels the task on the cluster.
        """
        session = _active.get()
        if session is None:
            session = self._fallback_session()
        stage_bytes = session.stage_bytes(sdef)
        value_bytes = _dumps(value, sdef.id, "input")
        sent_state, state_bytes = self._snapshot(context)
        blob = _pickle().dumps((sdef.id, stage_bytes, value_bytes, state_bytes))
        client = await session.client()
        data: Any = blob
        scattered: Any = None
        if len(blob) > _SCATTER_BYTES:
            [scattered] = await client.scatter([blob], hash=False)
            data = scattered
        future = client.submit(
            _run_remote,
            data,
            key=f"{sdef.id}-{uuid.uuid4().hex}",
            pure=False,
            retries=self.retries,
        )
        self.submitted += 1
        try:
            packed = await future
        except anyio.get_cancelled_exc_class():
            # Timed out, fail-fast or cancelled: stop the task on the cluster too.
            with anyio.move_on_after(10, shield=True):
                await client.cancel([future], reason="twinklr_pipe: stage cancelled")
            raise
        except _distributed_cancelled() as exc:
            raise RemoteError(
                f"Stage '{sdef.id}': its Dask task was cancelled on the cluster ({exc})"
            ) from None
        finally:
            future.release()
            if scattered is not None:
                scattered.release()
        try:
            if len(packed) > _SCATTER_BYTES:
                reply = await anyio.to_thread.run_sync(_pickle().loads, packed)
            else:
                reply = _pickle().loads(packed)
        except Exception as exc:
            raise RemoteError(
                f"Stage '{sdef.id}': the result from the Dask worker cannot be unpickled "
                f"here ({type(exc).__name__}: {exc})"
            ) from exc
        return _apply(reply, sdef, context, sent_state)

    def _fallback_session(self) -> _Session:
        """A session for ``run`` called outside ``session()``; closed by ``aclose()``."""
        loop = _running_loop()
        fallback = self._fallback
        if fallback is None or fallback.loop is not loop:
            fallback = self._fallback = _Session(self)
        return fallback

    def _snapshot(self, context: PipelineContext) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The state entries sent to the worker (originals, and their pickles)."""
        sent: dict[str, Any] = {}
        pickled: dict[str, bytes] = {}
        dumps = _pickle().dumps
        # dict.items: a snapshot is not a read; the worker's reads are recorded instead.
        for key, entry in list(dict.items(context.state)):
            if self.state_keys is not None and key not in self.state_keys:
                continue
            try:
                pickled[key] = dumps(entry)
            except Exception as exc:
                logger.debug(
                    "state[%r] (%s) is not sent to Dask workers: %s", key, type(entry), exc
                )
                continue
            sent[key] = entry
        return sent, pickled


# -- per-run sessions ---------------------------------------------------------------------


class _Session:
    """One run's view of the cluster: one client, opened on first use.

    Within ``DaskRunner.session()`` the connection is made by a background task of
    the session (awaited or cancelled when it closes), so a stage that times out or is
    cancelled while waiting for it stops waiting at once, without abandoning a
    half-made connection the other stages share.
    """

    def __init__(self, runner: DaskRunner, *, background: bool = False) -> None:
        self.runner = runner
        self.loop = _running_loop()
        self._background = background
        self._task: asyncio.Task[None] | None = None
        self._lock = anyio.Lock()
        self._ready = anyio.Event()
        self._client: Any = None
        self._owned = False
        self._error: RemoteError | None = None
        self._stages: dict[int, tuple[Any, bytes]] = {}

    async def client(self) -> Any:
        if self._client is None and self._error is None:
            if self._background:
                if self._task is None:
                    self._task = self.loop.create_task(self._connect())
                await self._ready.wait()
            else:
                async with self._lock:
                    if self._client is None and self._error is None:
                        await self._connect()
        if self._error is not None:
            raise self._error  # one failed connection fails every item at once, no re-waits
        return self._client

    async def _connect(self) -> None:
        try:
            self._client, self._owned = await self.runner._connect()
        except RemoteError as exc:
            self._error = exc
        except Exception as exc:
            self._error = RemoteError(f"Cannot connect to Dask: {type(exc).__name__}: {exc}")
        finally:
            self._ready.set()

    def stage_bytes(self, sdef: StageDefinition) -> bytes:
        """The pickled stage object (once per run and stage)."""
        known = self._stages.get(id(sdef))
        if known is not None and known[0] is sdef:
            return known[1]
        data = _dumps(sdef.stage, sdef.id, "stage object")
        self._stages[id(sdef)] = (sdef, data)
        return data

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # the run is over: a connection still being made is abandoned
            with anyio.CancelScope(shield=True):
                await asyncio.wait([task])
        client, self._client = self._client, None
        self._stages.clear()
        if client is not None and self._owned:
            with anyio.move_on_after(10, shield=True):
                await client.close()


_active: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "twinklr_pipe_dask_session", default=None
)


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RemoteError(
            "DaskRunner needs the asyncio event loop (anyio's asyncio backend)"
        ) from None


def _loop_of(client: Any) -> Any:
    loop = getattr(client, "loop", None)
    return getattr(loop, "asyncio_loop", None)


def _pickle() -> Any:
    import cloudpickle  # type: ignore[import-untyped]  # comes with distributed

    return cloudpickle


def _distributed_cancelled() -> type[BaseException]:
    from concurrent.futures import CancelledError

    return CancelledError


def _dumps(value: Any, stage_id: str, where: str) -> bytes:
    """cloudpickle ``value``, or a ``RemoteSendError`` naming the part that cannot be sent."""
    dumps = _pickle().dumps
    try:
        data: bytes = dumps(value)
    except Exception as exc:
        path, culprit, cause = _culprit(value, where, exc)
        raise RemoteSendError(stage_id, path, type(culprit), cause) from None
    return data


def _culprit(value: Any, where: str, exc: BaseException) -> tuple[str, Any, BaseException]:
    """The innermost item of a list/tuple/dict/set that cannot be pickled."""
    dumps = _pickle().dumps
    items: Iterable[tuple[str, Any]]
    if isinstance(value, dict):
        items = ((f"{where}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    elif isinstance(value, set | frozenset):
        items = ((f"{where} item", v) for v in value)
    else:
        return where, value, exc
    for path, item in items:
        try:
            dumps(item)
        except Exception as inner:
            return _culprit(item, path, inner)
    return where, value, exc


# -- bringing the result back ----------------------------------------------------------------


class _Deleted:
    """Marks a state key the remote body deleted."""


def _apply(
    reply: tuple[Any, ...], sdef: StageDefinition, context: PipelineContext, sent: dict[str, Any]
) -> StageResult[Any]:
    """Replay the remote body's state reads, writes and metrics here; return its result."""
    kind, body, reads, writes, metric_ops, worker, remote_ms = reply
    from ._context import _recorder

    recorder = _recorder.get()
    state = context.state
    for key in reads:
        if key == "*":
            list(state.keys())  # records a read of the whole state
        elif recorder is not None:
            recorder.read(key, sent.get(key, _MISSING))
        else:
            state.get(key)
    for key, value in writes:
        if isinstance(value, _Deleted):
            state.pop(key, None)
        else:
            state[key] = value
    for op, key, amount in metric_ops:
        if op == "add":
            context.add_metric(key, amount)
        else:
            context.increment_metric(key, amount)
    if kind == "raised":
        exc_bytes, type_name, message, remote_tb = body
        exc: Any = None
        if exc_bytes is not None:
            with contextlib.suppress(Exception):
                exc = _pickle().loads(exc_bytes)
        if not isinstance(exc, Exception):
            exc = RemoteError(f"{type_name}: {message}")
        exc.add_note(f"Raised in stage '{sdef.id}' on Dask worker {worker}:\n{remote_tb}")
        raise exc
    if kind == "unsendable":
        raise RemoteError(f"Stage '{sdef.id}' on Dask worker {worker}: {body}")
    if kind == "other":
        return body  # type: ignore[no-any-return]  # the executor reports the wrong type
    success, stage_name, output, error, metadata = body
    # What the body cost on the worker (the cache records it as the entry's compute
    # time), not the wait for a connection, a worker or the transfer.
    metadata = {"compute_ms": remote_ms, **metadata, "worker": worker, "remote_ms": remote_ms}
    return StageResult[Any](
        success=success, stage_name=stage_name, output=output, error=error, metadata=metadata
    )


# -- on the worker ----------------------------------------------------------------------------


class _RemoteContext(PipelineContext):
    """The context a remote body sees: a state snapshot, metrics, no services."""

    def __init__(self, state: dict[str, Any], stage_id: str) -> None:
        super().__init__(state=state)
        self._stage_id = stage_id
        self.metric_ops: list[tuple[str, str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"Stage '{self.__dict__.get('_stage_id')}' runs on a Dask worker, where the "
            f"context has no service '{name}': services stay in the main process. Pass what "
            "the stage needs in its input or state, or run it locally (remote=False)."
        )

    def add_metric(self, key: str, value: Any) -> None:
        super().add_metric(key, value)
        self.metric_ops.append(("add", key, value))

    def increment_metric(self, key: str, delta: float = 1) -> None:
        super().increment_metric(key, delta)
        ops = self.metric_ops
        if ops and ops[-1][0] == "inc" and ops[-1][1] == key:
            ops[-1] = ("inc", key, ops[-1][2] + delta)
        else:
            ops.append(("inc", key, delta))

    def pool(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        raise KeyError(
            f"Stage '{self._stage_id}' runs on a Dask worker, where resource pools are not "
            f"available; name the pool in StageDefinition(pools=[{name!r}]) so the executor "
            "holds it around the remote call"
        )


def _call_sync(stage: Any, value: Any, context: PipelineContext) -> Any:
    """Run a stage body to completion in this (worker) thread."""
    if isinstance(stage, FunctionStage):
        if stage.is_async:
            return asyncio.run(stage.execute(value, context))
        return stage.execute_sync(value, context)
    execute = stage.execute
    if inspect.iscoroutinefunction(execute):
        return asyncio.run(execute(value, context))
    result = execute(value, context)
    if inspect.isawaitable(result):
        result = asyncio.run(_wait(result))
    return result


async def _wait(awaitable: Any) -> Any:
    return await awaitable


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:
        return "?"


def _run_remote(blob: bytes) -> bytes:
    """The Dask task: unpickle, run the body against a context snapshot, pickle the reply."""
    cloudpickle = _pickle()
    stage_id, stage_bytes, value_bytes, state_bytes = cloudpickle.loads(blob)
    worker = _worker_address()
    what = "stage object"
    try:
        stage = cloudpickle.loads(stage_bytes)
        what = "input"
        value = cloudpickle.loads(value_bytes)
        state = {}
        for key, data in state_bytes.items():
            what = f"state[{key!r}]"
            state[key] = cloudpickle.loads(data)
    except Exception as exc:
        problem = (
            f"the worker cannot unpickle its {what} ({type(exc).__name__}: {exc}). Workers "
            "must be able to import the modules that define remote stages and their values: "
            "install the project on the workers (a local:N cluster shares this sys.path)"
        )
        return bytes(cloudpickle.dumps(("unsendable", problem, [], [], [], worker, 0.0)))
    context = _RemoteContext(state, stage_id)
    recorder = StateRecorder()
    rec_token = recording(recorder)
    ctx_token = set_current_context(context)
    started = time.perf_counter()
    body: Any
    try:
        result = _call_sync(stage, value, context)
        if isinstance(result, StageResult):
            kind = "ok"
            body = (result.success, result.stage_name, result.output, result.error)
            body += (dict(result.metadata),)
        else:
            kind, body = "other", result
    except Exception as exc:
        kind = "raised"
        body = (_exception_bytes(exc), type(exc).__name__, str(exc), traceback.format_exc())
    finally:
        from ._context import _current_context, _recorder

        _recorder.reset(rec_token)
        _current_context.reset(ctx_token)
    remote_ms = (time.perf_counter() - started) * 1000
    reads = list(recorder.reads)
    deleted = _deleted_marker()
    writes = [
        (key, _Deleted() if written is deleted else written)
        for key, written in recorder.writes.items()
    ]
    reply = (kind, body, reads, writes, context.metric_ops, worker, remote_ms)
    with contextlib.suppress(Exception):
        return bytes(cloudpickle.dumps(reply))
    # Something cannot travel back: say what, precisely.
    problem = _unsendable(kind, body, writes, context.metric_ops)
    return bytes(cloudpickle.dumps(("unsendable", problem, [], [], [], worker, remote_ms)))


def _exception_bytes(exc: Exception) -> bytes | None:
    """The pickled exception if it survives a round trip (custom ``__init__`` may not)."""
    cloudpickle = _pickle()
    try:
        data = bytes(cloudpickle.dumps(exc))
        cloudpickle.loads(data)
    except Exception:
        return None
    return data


def _deleted_marker() -> Any:
    from ._context import DELETED

    return DELETED


def _unsendable(kind: str, body: Any, writes: list[tuple[str, Any]], ops: list[Any]) -> str:
    dumps = _pickle().dumps
    candidates: list[tuple[str, Any]] = []
    if kind == "ok":
        candidates += [("output", body[2]), ("result metadata", body[4])]
    elif kind == "other":
        candidates.append(("return value", body))
    candidates += [(f"state[{key!r}] write", value) for key, value in writes]
    candidates += [(f"metric {key!r}", amount) for _, key, amount in ops]
    for what, value in candidates:
        try:
            dumps(value)
        except Exception as exc:
            where, culprit, cause = _culprit(value, what, exc)
            name = f"{type(culprit).__module__}.{type(culprit).__qualname__}"
            return (
                f"its {where} of type {name} cannot be pickled back from the worker "
                f"({type(cause).__name__}: {cause})"
            )
    return "its result cannot be pickled back from the worker"
