"""``PipelineExecutor``: a dependency-driven anyio executor with an optional cache.

One task group per run. A stage starts the moment its last input finishes; every
stage body (or FAN_OUT item) goes through ``_Run._invoke``, the one place that
consults the cache, takes concurrency slots, retries, times out and stores.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._context import (
    PipelineContext,
    StateRecorder,
    recording,
    set_current_context,
    stop_recording,
)
from ._definition import ExecutionPattern, PipelineDefinition, StageDefinition
from ._events import (
    FanOutProgress,
    PipelineEvent,
    PoolWaited,
    RunFinished,
    RunStarted,
    StageFinished,
    StageStarted,
)
from ._graph import validate
from ._results import (
    PipelineResult,
    StageResult,
    StageStatus,
    cancelled_result,
    failure_result,
    skipped_result,
    success_result,
)
from ._retry import delay_ms, is_retryable
from ._stage import FunctionStage
from .errors import CacheError, FingerprintError

if TYPE_CHECKING:
    from ._pools import PoolSet
    from .cache._entry import CacheStore
    from .cache._runtime import CacheRuntime, KeyInfo

__all__ = ["PipelineExecutor", "new_run_id"]

logger = logging.getLogger("twinklr_pipe")

EventCallback = Callable[[PipelineEvent], Any]

#: A task running a chain of stages yields to the loop before every this many stages.
_YIELD_EVERY = 16


def new_run_id() -> str:
    """A fresh, sortable run id: ``r-<UTC time>-<random>``."""
    return time.strftime("r-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class PipelineExecutor:
    """Runs ``PipelineDefinition`` objects.

    Example::

        executor = PipelineExecutor(cache_dir=".twinklr-cache")
        result = executor.run(pipeline, initial_input="song.wav")
        result.get_output("export")

    Args:
        cache_dir: Open the default on-disk store (``DiskCacheStore``) there.
        cache: Any ``CacheStore``; takes precedence over ``cache_dir``. With
            neither, nothing is cached across runs and nothing is hashed.
        allow_pickle: Let the cache store outputs the safe codec cannot, with pickle.
        dedupe: Take a cross-process lock per key, so concurrent processes on one
            cache directory compute each missing entry once.
        pools: Shared resource pools: name -> slots (or ``PoolLimit``).
        runner: Where ``remote=True`` stage bodies run (e.g. ``DaskRunner``).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        cache: CacheStore | None = None,
        allow_pickle: bool = False,
        dedupe: bool = False,
        pools: Mapping[str, Any] | None = None,
        runner: Any = None,
    ) -> None:
        if cache is None and cache_dir is not None:
            from .cache._store import DiskCacheStore

            cache = DiskCacheStore(Path(cache_dir))
        self.store: CacheStore | None = cache
        self.allow_pickle = allow_pickle
        self.dedupe = dedupe
        self.pools = dict(pools or {})
        self.runner = runner

    def run(
        self,
        pipeline: PipelineDefinition,
        initial_input: Any = None,
        context: PipelineContext | None = None,
        *,
        force: Iterable[str] = (),
        run_id: str | None = None,
        on_event: EventCallback | None = None,
    ) -> PipelineResult:
        """Synchronous ``execute`` for scripts: runs its own event loop."""
        results: list[PipelineResult] = []

        async def main() -> None:
            # The result is not the main task's return value: on Python 3.11, asyncio's
            # runner formats the main task (its result included) when it restores the
            # SIGINT handler, and repr() of a result with large outputs takes seconds.
            results.append(
                await self.execute(
                    pipeline, initial_input, context, force=force, run_id=run_id, on_event=on_event
                )
            )

        anyio.run(main)
        return results[0]

    async def execute(
        self,
        pipeline: PipelineDefinition,
        initial_input: Any = None,
        context: PipelineContext | None = None,
        *,
        force: Iterable[str] = (),
        run_id: str | None = None,
        on_event: EventCallback | None = None,
    ) -> PipelineResult:
        """Run ``pipeline`` and return its result; never raises for stage failures.

        Args:
            pipeline: What to run. An invalid definition returns a failed result
                whose ``metadata["errors"]`` lists every problem.
            initial_input: What entry stages (those without inputs) receive.
            context: Shared services and state; a fresh one when omitted.
            force: Stage ids to re-run even when cached.
            run_id: Names the run (generated when omitted).
            on_event: Called with each ``PipelineEvent`` as the run progresses.
        """
        run_id = run_id or new_run_id()
        force = tuple(force)
        problems = validate(pipeline)
        known = {s.id for s in pipeline.stages}
        problems += [
            f"force names unknown stage '{sid}'; stages are: {', '.join(sorted(known))}"
            for sid in force
            if sid not in known
        ]
        for s in pipeline.stages:
            unknown_pools = [p for p in s.pools if p not in self.pools]
            if unknown_pools:
                problems.append(
                    f"Stage '{s.id}' uses unknown resource pool(s) {unknown_pools}; "
                    f"pass pools={{...}} to PipelineExecutor (it has: "
                    f"{', '.join(sorted(self.pools)) or 'none'})"
                )
            if s.remote and self.runner is None:
                problems.append(
                    f"Stage '{s.id}' is remote=True but the executor has no runner; "
                    "pass runner=DaskRunner(...) to PipelineExecutor"
                )
        if problems:
            return PipelineResult(
                success=False, run_id=run_id, metadata={"errors": problems, "invalid": True}
            )
        context = context if context is not None else PipelineContext()
        if on_event is not None and (
            inspect.iscoroutinefunction(on_event)
            or inspect.iscoroutinefunction(getattr(on_event, "__call__", None))  # noqa: B004
        ):
            raise TypeError(
                "on_event must be a plain (synchronous) callable; it is called in the event "
                "loop's thread as the run progresses. Wrap async work in a memory object "
                "stream or a task of your own."
            )
        run = _Run(self, pipeline, initial_input, context, set(force), run_id, on_event)
        return await run.execute()


class _StageState:
    """Bookkeeping of one stage during a run."""

    __slots__ = (
        "digest",
        "done",
        "entry_ids",
        "id",
        "input_ids",
        "output",
        "result",
        "sdef",
        "users",
        "waiting",
    )

    def __init__(self, sdef: StageDefinition) -> None:
        self.sdef = sdef
        self.id = sdef.id
        self.input_ids = tuple(dict.fromkeys(sdef.inputs))
        self.waiting = len(self.input_ids)
        self.users: list[_StageState] = []
        self.result: StageResult[Any] | None = None
        self.output: Any = None
        self.digest: bytes | None = None
        self.done = False
        self.entry_ids: list[str] = []


class _Outcome:
    """What one invocation (a stage, or one FAN_OUT item) produced.

    A cache hit carries no ``StageResult`` (``result`` is None): its caller builds the
    stage's one result with the final metadata, so a hit validates one model, not two.
    """

    __slots__ = (
        "attempts",
        "cache",
        "compute_ms",
        "digest",
        "entry_id",
        "result",
        "saved_ms",
        "value",
    )

    def __init__(
        self,
        result: StageResult[Any] | None,
        *,
        attempts: int = 0,
        cache: str = "off",
        digest: bytes | None = None,
        entry_id: str | None = None,
        saved_ms: float = 0.0,
        value: Any = None,
        compute_ms: float | None = None,
    ) -> None:
        self.result = result
        #: How long the body ran (its last attempt), when it ran.
        self.compute_ms = compute_ms
        self.attempts = attempts
        self.cache = cache
        self.digest = digest
        self.entry_id = entry_id
        self.saved_ms = saved_ms
        self.value = value

    @property
    def success(self) -> bool:
        return self.result is None or self.result.success

    @property
    def output(self) -> Any:
        return self.value if self.result is None else self.result.output

    @property
    def error(self) -> str | None:
        return None if self.result is None else self.result.error


class _Run:
    def __init__(
        self,
        executor: PipelineExecutor,
        pipeline: PipelineDefinition,
        initial_input: Any,
        context: PipelineContext,
        force: set[str],
        run_id: str,
        on_event: EventCallback | None,
    ) -> None:
        self.executor = executor
        self.pipeline = pipeline
        self.initial_input = initial_input
        self.initial_digest: bytes | None = None
        self.context = context
        self.force = force
        self.run_id = run_id
        self.on_event = on_event
        self.states = {s.id: _StageState(s) for s in pipeline.stages}
        for st in self.states.values():
            for dep in st.input_ids:
                self.states[dep].users.append(st)
        self.finished = 0
        # Stage id -> the dependant its task runs next (see ``_run_stage``); an id is
        # present while its own task runs it and can still take one.
        self.handoff: dict[str, _StageState | None] = {}
        self.cancel_reason: str | None = None
        self.tg: anyio.abc.TaskGroup | None = None
        self.watch_scope = anyio.CancelScope()
        self.cache: CacheRuntime | None = None
        if executor.store is not None:
            from .cache._runtime import CacheRuntime

            self.cache = CacheRuntime(
                executor.store,
                pipeline=pipeline.name,
                run_id=run_id,
                allow_pickle=executor.allow_pickle,
                dedupe=executor.dedupe,
            )
        self.pools: PoolSet | None = None
        self.pool_wait: dict[str, float] = {}
        if executor.pools:
            from ._pools import PoolSet

            self.pools = PoolSet(executor.pools)
        context._pools = self.pools

    # -- events -------------------------------------------------------------------------

    def emit(self, event: PipelineEvent) -> None:
        callback = self.on_event
        if callback is None:
            return
        try:
            callback(event)
        except Exception:
            logger.exception(
                "on_event callback raised on %s; the run goes on", type(event).__name__
            )

    # -- the run ------------------------------------------------------------------------

    async def execute(self) -> PipelineResult:
        started = time.perf_counter()
        context = self.context
        context._attach()
        ctx_token = set_current_context(context)
        self.emit(RunStarted(self.run_id, self.pipeline.name, tuple(self.states)))
        try:
            if context.is_cancelled():
                self.cancel_reason = "pipeline cancelled"
            else:
                if self.cache is not None:
                    await self.cache.start()
                async with self._runner_session(), anyio.create_task_group() as tg:
                    self.tg = tg
                    tg.start_soon(self._watch_cancel)
                    for st in self.states.values():
                        if st.waiting == 0:
                            tg.start_soon(self._run_stage, st)
                    if not self.states:
                        self.watch_scope.cancel()
        finally:
            if self.cache is not None:
                with anyio.CancelScope(shield=True):
                    await self.cache.finish()
            from ._context import _current_context

            _current_context.reset(ctx_token)
        result = self._assemble(time.perf_counter() - started)
        self.emit(RunFinished(self.run_id, result.success, result.total_duration_ms))
        return result

    def _runner_session(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """The remote runner's scope for this run (it opens a client lazily, closes it after)."""
        session = getattr(self.executor.runner, "session", None)
        if session is None or not any(s.remote for s in self.pipeline.stages):
            return contextlib.nullcontext()
        return session()  # type: ignore[no-any-return]

    async def _watch_cancel(self) -> None:
        with self.watch_scope:
            await self.context.cancel_token.wait()
            if self.cancel_reason is None:
                self.cancel_reason = "pipeline cancelled"
            assert self.tg is not None
            self.tg.cancel_scope.cancel()

    def _stop(self, reason: str) -> None:
        """Fail fast: cancel what runs, start nothing new."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        assert self.tg is not None
        self.tg.cancel_scope.cancel()

    def _finish(self, st: _StageState, result: StageResult[Any], output: Any = None) -> None:
        if st.done:
            return
        st.done = True
        st.result = result
        st.output = output if result.success else None
        self.finished += 1
        if self.on_event is not None:
            meta = result.metadata
            self.emit(
                StageFinished(
                    self.run_id,
                    st.id,
                    StageStatus(meta["status"]),
                    meta.get("duration_ms", 0.0),
                    result.error,
                    meta.get("cache", "off"),
                    meta.get("key"),
                    meta.get("saved_ms", 0.0),
                    tuple(st.entry_ids),
                )
            )
        if self.finished == len(self.states):
            self.watch_scope.cancel()
            return
        if not result.success and not result.metadata.get("cancelled"):
            if st.sdef.critical and self.pipeline.fail_fast:
                self._stop(f"fail-fast: stage '{st.id}' failed")
                return
        tg = self.tg
        assert tg is not None
        if tg.cancel_scope.cancel_called or self.context.is_cancelled():
            return  # stopping (the watcher may not have run yet): nothing new starts
        handoff = self.handoff
        for user in st.users:
            user.waiting -= 1
            if user.waiting == 0:
                if st.id in handoff and handoff[st.id] is None:
                    handoff[st.id] = user
                else:
                    tg.start_soon(self._run_stage, user)

    async def _run_stage(self, st: _StageState) -> None:
        # A finishing stage hands its first newly ready dependant back to this task
        # (``_finish``), so a chain runs in one task instead of spawning one per stage.
        current: _StageState | None = st
        hops = 0
        while current is not None:
            started = time.perf_counter()
            self.handoff[current.id] = None
            try:
                hops += 1
                if hops % _YIELD_EVERY:
                    # Fail-fast or a cancel came first: never run the body.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                else:
                    # Now and then let other tasks run, however trivial the bodies.
                    await anyio.lowlevel.checkpoint()
                await self._run_stage_inner(current, started)
            except anyio.get_cancelled_exc_class():
                self.handoff.pop(current.id, None)
                self._finish(current, self._cancelled(current, started))
                raise
            current = self.handoff.pop(current.id, None)

    def _cancelled(self, st: _StageState, started: float | None = None) -> StageResult[Any]:
        result = cancelled_result(
            reason=self.cancel_reason or "pipeline cancelled", stage_name=st.id
        )
        duration = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        return result.model_copy(
            update={
                "metadata": {
                    **result.metadata,
                    "status": StageStatus.CANCELLED.value,
                    "duration_ms": duration,
                }
            }
        )

    async def _run_stage_inner(self, st: _StageState, started: float) -> None:
        sdef = st.sdef
        # An upstream failure (or a skip caused by one) skips this stage.
        for dep in st.input_ids:
            dep_result = self.states[dep].result
            assert dep_result is not None
            if not dep_result.success:
                self._finish(st, _skip(st.id, f"upstream failed: {dep}", started))
                return
            upstream = dep_result.metadata.get("upstream_failed")
            if upstream:
                self._finish(st, _skip(st.id, f"upstream failed: {upstream}", started, upstream))
                return
        if sdef.condition is not None:
            try:
                verdict = sdef.condition(self.context)
                if inspect.isawaitable(verdict):  # an async condition: a coroutine is truthy
                    verdict = await verdict
                go = bool(verdict)
            except Exception as exc:
                logger.warning("Condition of stage %r raised", st.id, exc_info=True)
                self._finish(
                    st,
                    _fail(
                        st.id,
                        f"condition raised {type(exc).__name__}: {exc}",
                        started,
                    ),
                )
                return
            if not go:
                self._finish(st, _skip(st.id, "condition is false", started))
                return
        if self.on_event is not None:
            self.emit(StageStarted(self.run_id, st.id))
        value = self._input_of(st)
        if sdef.pattern is ExecutionPattern.FAN_OUT:
            await self._fan_out(st, value, started)
            return
        outcome = await self._invoke(st, value, self._keyer(st, None), None, None)
        result = outcome.result
        if outcome.entry_id:
            st.entry_ids.append(outcome.entry_id)
        st.digest = outcome.digest
        status = (
            StageStatus.CACHED
            if result is None
            else StageStatus.SUCCEEDED
            if result.success
            else StageStatus.FAILED
        )
        meta = {
            **(result.metadata if result is not None else {}),
            **({"compute_ms": outcome.compute_ms} if outcome.compute_ms is not None else {}),
            "status": status.value,
            "duration_ms": (time.perf_counter() - started) * 1000,
            "attempts": outcome.attempts,
            "cache": outcome.cache,
        }
        if outcome.entry_id:
            meta["key"] = outcome.entry_id.split(".")[0]
        if outcome.saved_ms:
            meta["saved_ms"] = outcome.saved_ms
        if st.id in self.pool_wait:
            meta["pool_wait_ms"] = self.pool_wait[st.id]
        if result is None:  # a hit: its one result, built here
            self._finish(
                st,
                success_result(outcome.value, stage_name=_name(sdef), metadata=meta),
                outcome.value,
            )
            return
        self._finish(st, result.model_copy(update={"metadata": meta}), result.output)

    def _input_of(self, st: _StageState) -> Any:
        ids = st.sdef.inputs
        if not ids:
            return self.initial_input
        if len(ids) == 1:
            return self.states[ids[0]].output
        return {dep: self.states[dep].output for dep in ids}

    # -- cache keys ---------------------------------------------------------------------

    def _digest_of(self, sid: str | None) -> bytes:
        from .cache._fingerprint import digest

        if sid is None:
            if self.initial_digest is None:
                self.initial_digest = digest(self.initial_input)
            return self.initial_digest
        st = self.states[sid]
        if st.digest is None:
            st.digest = digest(st.output)
        return st.digest

    def _keyer(self, st: _StageState, item_digest: bytes | None) -> Callable[[], KeyInfo] | None:
        """A function computing the cache key of ``st`` (for one item), or None when off."""
        cache = self.cache
        if cache is None or not st.sdef.cache:
            return None
        sdef = st.sdef
        fanned = _fanned(sdef) if item_digest is not None else None

        def key() -> KeyInfo:
            parts = cache.stage_parts(sdef)
            if not sdef.inputs:
                digests = [item_digest if item_digest is not None else self._digest_of(None)]
                return cache.key(parts, (), digests, item_digest)
            digests = []
            for dep in sdef.inputs:
                if dep == fanned:
                    assert item_digest is not None
                    digests.append(item_digest)
                    continue
                try:
                    digests.append(self._digest_of(dep))
                except FingerprintError as exc:
                    raise FingerprintError(
                        exc.value_type, f"input '{dep}' ({exc.where})", sdef.id
                    ) from None
            return cache.key(parts, sdef.inputs, digests, item_digest)

        return key

    # -- the one place that runs a stage body ---------------------------------------------

    async def _invoke(
        self,
        st: _StageState,
        value: Any,
        keyer: Callable[[], KeyInfo] | None,
        item_index: int | None,
        limiter: anyio.CapacityLimiter | None,
    ) -> _Outcome:
        """Run one stage body (or FAN_OUT item) through cache, limits, retries and timeouts."""
        sdef = st.sdef
        cache = self.cache
        if cache is None or keyer is None:
            outcome = await self._attempts(sdef, value, None, limiter)
            if cache is not None and outcome.success:
                outcome.cache = "off"
            return outcome
        try:
            info = keyer()
        except (FingerprintError, CacheError) as exc:
            return _Outcome(_fail_result(sdef.id, _with_stage(exc, sdef.id)))
        key = info.key
        forced = sdef.id in self.force
        if not forced:
            hit = cache.lookup(key, self.context, sdef.id)
            if hit is not None:
                return self._serve(st, hit, item_index)
        async with cache.single_flight(key) as recheck:
            if not forced and recheck:
                hit = await cache.lookup_async(key, self.context, sdef.id)
                if hit is not None:
                    return self._serve(st, hit, item_index)
            recorder = StateRecorder()
            outcome = await self._attempts(sdef, value, recorder, limiter)
            outcome.cache = "forced" if forced else "miss"
            done = outcome.result
            if done is not None and done.success:
                try:
                    outcome.digest, outcome.entry_id = await cache.save(
                        info,
                        sdef,
                        done.output,
                        recorder,
                        item_index=item_index,
                        duration_ms=outcome.compute_ms or 0.0,
                    )
                except CacheError as exc:
                    # The output cannot be stored (codec) or fingerprinted: the stage fails
                    # with one clear message; nothing half-written is left behind.
                    return _Outcome(
                        _fail_result(sdef.id, _with_stage(exc, sdef.id)),
                        attempts=outcome.attempts,
                    )
            return outcome

    def _serve(self, st: _StageState, hit: Any, item_index: int | None) -> _Outcome:
        assert self.cache is not None
        self.cache.replay(hit, self.context)
        meta = hit.meta
        if self.on_event is not None:
            from ._events import CacheHit

            self.emit(CacheHit(self.run_id, st.id, meta.key, item_index, meta.compute_duration_ms))
        return _Outcome(
            None,
            value=hit.value,
            cache="hit",
            digest=hit.digest,
            entry_id=meta.entry_id,
            saved_ms=meta.compute_duration_ms,
        )

    async def _attempts(
        self,
        sdef: StageDefinition,
        value: Any,
        recorder: StateRecorder | None,
        limiter: anyio.CapacityLimiter | None,
    ) -> _Outcome:
        """Run the body with retries; each attempt under its own timeout."""
        retry = sdef.retry_config
        max_attempts = retry.max_attempts if retry is not None else 1
        attempt = 0
        compute_ms = 0.0
        while True:
            attempt += 1
            if limiter is not None:
                async with limiter:
                    t0 = time.perf_counter()
                    result = await self._attempt(sdef, value, recorder)
            else:
                t0 = time.perf_counter()
                result = await self._attempt(sdef, value, recorder)
            compute_ms = (time.perf_counter() - t0) * 1000
            if result.success:
                break
            error = result.error or ""
            if retry is None or attempt >= max_attempts or not is_retryable(retry, error):
                break
            wait = delay_ms(retry, attempt)
            logger.info(
                "Stage %r attempt %d of %d failed (%s); retrying in %.0f ms",
                sdef.id,
                attempt,
                max_attempts,
                error,
                wait,
            )
            await anyio.sleep(wait / 1000)
        reported = result.metadata.get("compute_ms")  # a remote runner's own measure
        return _Outcome(
            result, attempts=attempt, compute_ms=compute_ms if reported is None else reported
        )

    async def _attempt(
        self, sdef: StageDefinition, value: Any, recorder: StateRecorder | None
    ) -> StageResult[Any]:
        """One attempt: call the body, apply the timeout, turn errors into failures."""
        if recorder is not None:
            recorder.reads.clear()
            recorder.writes.clear()
            recorder.metrics.clear()
        token = recording(recorder)
        try:
            if sdef.timeout_ms is None:
                result = await self._call(sdef, value)
            else:
                with anyio.CancelScope(
                    deadline=anyio.current_time() + sdef.timeout_ms / 1000
                ) as scope:
                    result = await self._call(sdef, value)
                if scope.cancelled_caught:
                    return failure_result(
                        f"Stage '{sdef.id}' timed out after {_ms(sdef.timeout_ms)} ms",
                        stage_name=_name(sdef),
                    )
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            logger.warning("Stage %r raised %s", sdef.id, type(exc).__name__, exc_info=True)
            return failure_result(f"{type(exc).__name__}: {exc}", stage_name=_name(sdef))
        finally:
            stop_recording(token)
        if not isinstance(result, StageResult):
            return failure_result(
                f"Stage '{sdef.id}' returned {type(result).__name__}, not a StageResult; "
                "return success_result(output, stage_name=...) or decorate a function with @stage",
                stage_name=_name(sdef),
            )
        return result

    async def _call(self, sdef: StageDefinition, value: Any) -> Any:
        if self.pools is not None and sdef.pools:

            def waited(pool: str, ms: float) -> None:
                self.pool_wait[sdef.id] = self.pool_wait.get(sdef.id, 0.0) + ms
                if self.on_event is not None:
                    self.emit(PoolWaited(self.run_id, sdef.id, pool, ms))

            async with self.pools.hold(sdef.pools, waited):
                return await self._call_here_or_remote(sdef, value)
        return await self._call_here_or_remote(sdef, value)

    async def _call_here_or_remote(self, sdef: StageDefinition, value: Any) -> Any:
        # Pools are held here, around the remote call too: a "gpu" pool bounds remote tasks.
        if self.executor.runner is not None and sdef.remote:
            return await self.executor.runner.run(sdef, value, self.context)
        return await _call_body(sdef.stage, value, self.context)

    # -- FAN_OUT --------------------------------------------------------------------------

    async def _fan_out(self, st: _StageState, value: Any, started: float) -> None:
        sdef = st.sdef
        fanned = _fanned(sdef)
        items = value if len(sdef.inputs) <= 1 else value[fanned]
        if not isinstance(items, list | tuple):
            source = f"input '{fanned}'" if fanned else "the initial input"
            self._finish(
                st,
                _fail(
                    st.id,
                    f"Stage '{st.id}' is FAN_OUT over {source}, which must be a list or tuple, "
                    f"but got {type(items).__name__}",
                    started,
                ),
            )
            return
        total = len(items)
        outcomes: list[_Outcome | None] = [None] * total
        limit = sdef.max_concurrent_fan_out
        limiter = anyio.CapacityLimiter(limit) if limit is not None else None
        if self.cache is not None and sdef.cache:
            # Only a cached stage hashes its items; without a cache nothing is hashed.
            from .cache._fingerprint import digest

        def call_value(item: Any) -> Any:
            if len(sdef.inputs) <= 1:
                return item
            return {**value, fanned: item}

        keyers: list[Callable[[], KeyInfo] | None] = [None] * total
        done = 0
        cached = 0
        pending: list[int] = []
        for i, item in enumerate(items):
            keyer = None
            if self.cache is not None and sdef.cache:
                try:
                    item_digest = digest(item)
                except FingerprintError as exc:
                    outcomes[i] = _Outcome(
                        _fail_result(
                            sdef.id,
                            _with_stage(
                                FingerprintError(exc.value_type, f"item {i} ({exc.where})"),
                                sdef.id,
                            ),
                        )
                    )
                    done += 1
                    continue
                keyer = self._keyer(st, item_digest)
            keyers[i] = keyer
            # Consult the cache before taking a slot: cached items never wait.
            if keyer is not None and sdef.id not in self.force and self.cache is not None:
                try:
                    info = keyer()
                except (FingerprintError, CacheError) as exc:
                    outcomes[i] = _Outcome(_fail_result(sdef.id, _with_stage(exc, sdef.id)))
                    done += 1
                    continue
                hit = self.cache.lookup(info.key, self.context, sdef.id)
                if hit is not None:
                    outcomes[i] = self._serve(st, hit, i)
                    done += 1
                    cached += 1
                    continue
                keyers[i] = _const(info)
            pending.append(i)
        if self.on_event is not None and done:
            self.emit(FanOutProgress(self.run_id, st.id, done, total, cached))

        stop_on_failure = sdef.critical and self.pipeline.fail_fast
        failed_early = any(o is not None and not o.success for o in outcomes)
        if pending and not (failed_early and stop_on_failure):
            async with anyio.create_task_group() as ftg:

                async def run_item(i: int) -> None:
                    nonlocal done, cached
                    outcome = await self._invoke(st, call_value(items[i]), keyers[i], i, limiter)
                    outcomes[i] = outcome
                    done += 1
                    if outcome.cache == "hit":
                        cached += 1
                    if self.on_event is not None:
                        self.emit(FanOutProgress(self.run_id, st.id, done, total, cached))
                    if not outcome.success and stop_on_failure:
                        ftg.cancel_scope.cancel()

                for i in pending:
                    ftg.start_soon(run_item, i)
        self._finish_fan_out(st, outcomes, started)

    def _finish_fan_out(
        self, st: _StageState, outcomes: list[_Outcome | None], started: float
    ) -> None:
        total = len(outcomes)
        errors = [(i, o.error) for i, o in enumerate(outcomes) if o is not None and not o.success]
        unfinished = sum(1 for o in outcomes if o is None)
        hits = sum(1 for o in outcomes if o is not None and o.cache == "hit")
        ran = sum(1 for o in outcomes if o is not None and o.cache != "hit" and o.success)
        for o in outcomes:
            if o is not None and o.entry_id:
                st.entry_ids.append(o.entry_id)
        meta: dict[str, Any] = {
            "duration_ms": (time.perf_counter() - started) * 1000,
            "attempts": max((o.attempts for o in outcomes if o is not None), default=0),
            "items": total,
            "items_cached": hits,
            "items_executed": ran,
            "saved_ms": sum(o.saved_ms for o in outcomes if o is not None),
        }
        if st.id in self.pool_wait:
            meta["pool_wait_ms"] = self.pool_wait[st.id]
        if self.cache is not None and st.sdef.cache:
            meta["cache"] = (
                "hit" if hits == total and total else ("forced" if st.id in self.force else "miss")
            )
        else:
            meta["cache"] = "off"
        if errors:
            first_index, first_error = errors[0]
            message = f"item {first_index} of {total} failed: {first_error}"
            if len(errors) > 1:
                message += f" ({len(errors)} items failed)"
            if unfinished:
                message += f"; {unfinished} items were not finished"
            meta["status"] = StageStatus.FAILED.value
            meta["failed_items"] = [i for i, _ in errors]
            self._finish(st, failure_result(message, stage_name=_name(st.sdef), metadata=meta))
            return
        output = [o.output for o in outcomes if o is not None]
        if self.cache is not None:
            from .cache._fingerprint import sequence_digest

            digests = [o.digest for o in outcomes if o is not None]
            if all(d is not None for d in digests):
                st.digest = sequence_digest([d for d in digests if d is not None], tuple_=False)
        meta["status"] = (
            StageStatus.CACHED.value if meta["cache"] == "hit" else StageStatus.SUCCEEDED.value
        )
        self._finish(st, success_result(output, stage_name=_name(st.sdef), metadata=meta), output)

    # -- the result -----------------------------------------------------------------------

    def _assemble(self, seconds: float) -> PipelineResult:
        for st in self.states.values():
            if st.result is None:
                # Never started (fail-fast or a cancel came first): it still ends with one
                # cancelled result and one StageFinished, so the journal and live view agree.
                st.result = self._cancelled(st)
                st.done = True
                if self.on_event is not None:
                    self.emit(
                        StageFinished(
                            self.run_id, st.id, StageStatus.CANCELLED, 0.0, st.result.error
                        )
                    )
        results = {sid: st.result for sid, st in self.states.items() if st.result is not None}
        outputs = {sid: st.output for sid, st in self.states.items()}
        failed, executed, cached, skipped, cancelled = [], [], [], [], []
        for sid, result in results.items():
            status = result.metadata.get("status")
            if status == StageStatus.CANCELLED.value:
                cancelled.append(sid)
            elif status == StageStatus.FAILED.value:
                failed.append(sid)
            elif status == StageStatus.SKIPPED.value:
                skipped.append(sid)
            elif status == StageStatus.CACHED.value:
                cached.append(sid)
            # Executed: the body ran (at least one attempt), whether it then succeeded
            # or failed; not a condition that raised, nor a FAN_OUT with no items.
            if status in (StageStatus.SUCCEEDED.value, StageStatus.FAILED.value):
                if result.metadata.get("attempts", 0) > 0:
                    executed.append(sid)
        critical_failure = any(self.states[sid].sdef.critical for sid in failed)
        success = not critical_failure and not cancelled
        metadata: dict[str, Any] = {"metrics": dict(self.context.metrics)}
        if self.cancel_reason:
            metadata["cancel_reason"] = self.cancel_reason
        if self.cache is not None:
            metadata["cache"] = self.cache.summary()
        return PipelineResult(
            success=success,
            outputs=outputs,
            stage_results=results,
            failed_stages=failed,
            executed=executed,
            cached=cached,
            skipped=skipped,
            cancelled=cancelled,
            total_duration_ms=seconds * 1000,
            run_id=self.run_id,
            metadata=metadata,
        )


# -- helpers ------------------------------------------------------------------------------

_BODY_KIND: dict[type, str] = {}


async def _call_body(stage: Any, value: Any, context: PipelineContext) -> Any:
    """Call a stage's body: async on the loop, sync in a worker thread."""
    kind = _BODY_KIND.get(type(stage))
    if kind is None:
        if isinstance(stage, FunctionStage):
            kind = "function"
        elif inspect.iscoroutinefunction(stage.execute):
            kind = "async"
        else:
            kind = "sync"
        if type(stage) is not FunctionStage:
            _BODY_KIND[type(stage)] = kind
    if kind == "function":
        if stage.is_async:
            return await stage.execute(value, context)
        return await anyio.to_thread.run_sync(
            stage.execute_sync, value, context, abandon_on_cancel=True
        )
    if kind == "async":
        return await stage.execute(value, context)
    result = await anyio.to_thread.run_sync(stage.execute, value, context, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        result = await result
    return result


def _fanned(sdef: StageDefinition) -> str | None:
    if sdef.fan_out_over is not None:
        return sdef.fan_out_over
    return sdef.inputs[0] if sdef.inputs else None


def _const(value: KeyInfo) -> Callable[[], KeyInfo]:
    return lambda: value


def _name(sdef: StageDefinition) -> str:
    name = getattr(sdef.stage, "name", None)
    return name if isinstance(name, str) else sdef.id


def _ms(value: float) -> str:
    return f"{value:g}"


def _with_stage(exc: Exception, stage_id: str) -> str:
    if isinstance(exc, FingerprintError):
        return str(exc.for_stage(stage_id)) if exc.stage is None else str(exc)
    message = str(exc)
    return message if f"'{stage_id}'" in message else f"Stage '{stage_id}': {message}"


def _fail_result(stage_id: str, error: str) -> StageResult[Any]:
    return failure_result(error, stage_name=stage_id)


def _skip(
    stage_id: str, reason: str, started: float, upstream: str | None = None
) -> StageResult[Any]:
    result = skipped_result(stage_name=stage_id, reason=reason)
    meta = {
        **result.metadata,
        "status": StageStatus.SKIPPED.value,
        "duration_ms": (time.perf_counter() - started) * 1000,
        "cache": "off",
    }
    if reason.startswith("upstream failed"):
        meta["upstream_failed"] = upstream or reason.split(": ", 1)[1]
    return result.model_copy(update={"metadata": meta})


def _fail(stage_id: str, error: str, started: float) -> StageResult[Any]:
    return failure_result(
        error,
        stage_name=stage_id,
        metadata={
            "status": StageStatus.FAILED.value,
            "duration_ms": (time.perf_counter() - started) * 1000,
            "attempts": 0,
            "cache": "off",
        },
    )
