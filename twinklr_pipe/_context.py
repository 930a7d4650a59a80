"""``PipelineContext``: services, tracked state, metrics and cancellation shared by a run."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel

if TYPE_CHECKING:
    from ._pools import PoolSet

__all__ = ["PipelineContext", "current_context"]

_MISSING: Any = object()

_current_context: contextvars.ContextVar[PipelineContext | None] = contextvars.ContextVar(
    "twinklr_pipe_context", default=None
)


def current_context() -> PipelineContext | None:
    """The context of the stage running in this task or thread, for deep helpers."""
    return _current_context.get()


class StateRecorder:
    """What one stage run read from and wrote to ``context.state``.

    Reads of keys the stage wrote first are not recorded: they do not depend on
    anything outside the stage. A read of every key (iteration) is recorded under
    ``"*"`` with a fingerprint of the whole state.
    """

    def __init__(self) -> None:
        self.reads: dict[str, Any] = {}
        self.writes: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}

    def read(self, key: Any, value: Any) -> None:
        if key not in self.writes and key not in self.reads:
            self.reads[key] = value

    def write(self, key: Any, value: Any) -> None:
        self.writes[key] = value


_recorder: contextvars.ContextVar[StateRecorder | None] = contextvars.ContextVar(
    "twinklr_pipe_state_recorder", default=None
)

#: Serializes ``increment_metric`` across threads. Module-level, not per context, so
#: a context stays picklable (remote runners ship it).
_METRICS_LOCK = threading.Lock()

#: Marks a state key as deleted in a recorder's writes.
DELETED: Any = object()


class _TrackedState(dict[str, Any]):
    """A dict that tells the running stage's recorder what it reads and writes."""

    def __getitem__(self, key: str) -> Any:
        value = super().get(key, _MISSING)
        rec = _recorder.get()
        if rec is not None:
            rec.read(key, value)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = super().get(key, _MISSING)
        rec = _recorder.get()
        if rec is not None:
            rec.read(key, value)
        return default if value is _MISSING else value

    def __contains__(self, key: object) -> bool:
        present = super().__contains__(key)
        rec = _recorder.get()
        if rec is not None:
            rec.read(key, super().get(key, _MISSING))  # type: ignore[call-overload]
        return present

    def __setitem__(self, key: str, value: Any) -> None:
        rec = _recorder.get()
        if rec is not None:
            rec.write(key, value)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        rec = _recorder.get()
        if rec is not None:
            rec.read(key, super().get(key, _MISSING))
            rec.write(key, DELETED)
        super().__delitem__(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self[key] = default
        return default

    def pop(self, key: str, *args: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            if args:
                return args[0]
            raise KeyError(key)
        del self[key]
        return value

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def _read_all(self) -> None:
        rec = _recorder.get()
        if rec is not None and "*" not in rec.reads:
            rec.reads["*"] = dict(super().items())

    def __iter__(self) -> Iterator[str]:
        self._read_all()
        return super().__iter__()

    def __len__(self) -> int:
        self._read_all()
        return super().__len__()

    def keys(self) -> Any:
        self._read_all()
        return super().keys()

    def items(self) -> Any:
        self._read_all()
        return super().items()

    def values(self) -> Any:
        self._read_all()
        return super().values()

    def copy(self) -> dict[str, Any]:
        self._read_all()
        return dict(super().items())

    def __reduce__(self) -> Any:
        return (dict, (dict(super().items()),))


class PipelineContext:
    """What every stage of a run shares: services, state, metrics and cancellation.

    Any keyword becomes an attribute, so services are injected, not imported::

        context = PipelineContext(provider=my_llm_client)
        context.provider  # my_llm_client

    It can be subclassed with typed fields (``provider: LLMProvider``). Reads and
    writes of ``state`` are tracked per stage, so the cache can replay writes on
    a hit and re-run a stage whose state reads changed.
    """

    cancel_token: Any

    def __init__(
        self,
        *,
        state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        cancel_token: Any = None,
        **services: Any,
    ) -> None:
        self._state = _TrackedState(state or {})
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.cancel_token = cancel_token
        self._cancelled = False
        self._own_token = False
        self._loop_token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self._pools: PoolSet | None = None
        for name, value in services.items():
            setattr(self, name, value)

    @property
    def state(self) -> dict[str, Any]:
        """Shared mutable state; reads and writes are tracked per stage for the cache."""
        return self._state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self._state = _TrackedState(value)

    def get_state(self, key: str, default: Any = None) -> Any:
        """``state.get(key, default)``."""
        return self._state.get(key, default)

    def set_state(self, key: str, value: Any) -> None:
        """``state[key] = value``."""
        self._state[key] = value

    def add_metric(self, key: str, value: Any) -> None:
        """Set metric ``key`` to ``value``."""
        self.metrics[key] = value
        rec = _recorder.get()
        if rec is not None:
            rec.metrics[key] = value

    def increment_metric(self, key: str, delta: float = 1) -> None:
        """Add ``delta`` to metric ``key`` (starting from 0); safe from worker threads."""
        rec = _recorder.get()
        # Sync stages run in worker threads: a read-modify-write without the lock can
        # lose increments when two of them count at once.
        with _METRICS_LOCK:
            self.metrics[key] = self.metrics.get(key, 0) + delta
            if rec is not None:
                rec.metrics[key] = rec.metrics.get(key, 0) + delta

    def pool(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one slot of the executor's resource pool ``name`` around a block::

        async with context.pool("llm"):
            reply = await context.provider.complete(prompt)
        """
        pools = self._pools
        if pools is None:
            raise KeyError(
                f"No resource pool '{name}': the executor running this stage has no pools; "
                "pass pools={...} to PipelineExecutor"
            )
        return pools.hold([name])

    def is_cancelled(self) -> bool:
        """Whether ``cancel()`` was called or the cancel token is set."""
        token = self.cancel_token
        return self._cancelled or bool(token is not None and token.is_set())

    def cancel(self) -> None:
        """Cancel the run: running stages are cancelled, pending ones never start.

        Safe to call from a stage, a worker thread, or the code that started the run.
        """
        self._cancelled = True
        token = self.cancel_token
        if token is None:
            return
        if self._loop_token is None or self._loop_thread == threading.get_ident():
            token.set()
            return
        try:
            anyio.from_thread.run_sync(token.set, token=self._loop_token)
        except RuntimeError:  # the run's event loop is gone; nothing left to wake
            token.set()

    def _attach(self) -> None:
        """Bind to the running event loop (the executor calls this at the start of a run)."""
        self._loop_token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        if self.cancel_token is None or self._own_token:
            # A fresh event per run: an event is bound to the loop that first waits on it.
            self.cancel_token = anyio.Event()
            self._own_token = True
        if self._cancelled and not self.cancel_token.is_set():
            self.cancel_token.set()


def recording(recorder: StateRecorder | None) -> contextvars.Token[StateRecorder | None]:
    """Make ``recorder`` receive this task's state reads and writes."""
    return _recorder.set(recorder)


def stop_recording(token: contextvars.Token[StateRecorder | None]) -> None:
    _recorder.reset(token)


def set_current_context(context: PipelineContext) -> contextvars.Token[PipelineContext | None]:
    return _current_context.set(context)
