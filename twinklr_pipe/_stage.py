"""The ``PipelineStage`` protocol and the ``@stage`` decorator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, overload, runtime_checkable

from ._results import StageResult, success_result

if TYPE_CHECKING:
    from ._context import PipelineContext

__all__ = ["FunctionStage", "PipelineStage", "stage"]


@runtime_checkable
class PipelineStage(Protocol):
    """What the executor runs: anything with a ``name`` and an ``execute`` method.

    No inheritance is needed. ``execute`` may be ``async def`` or a plain ``def``;
    a plain one is run in a worker thread so it never blocks the event loop.
    An optional ``version: str`` attribute names the stage's code version for the
    cache, and an optional ``cache_params()`` method returns its configuration.
    """

    @property
    def name(self) -> str: ...

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]: ...


class FunctionStage:
    """A stage made from a function by ``@stage``.

    The function's return value becomes a success result, an exception a failure
    (the executor reports it), and a returned ``StageResult`` is passed through.
    """

    __twinklr_function_stage__ = True

    def __init__(
        self,
        fn: Callable[[Any, PipelineContext], Any],
        *,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.version = version
        self.is_async = inspect.iscoroutinefunction(fn)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<stage {self.name!r} from {self.fn.__module__}.{self.fn.__qualname__}>"

    def execute_sync(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        """Run a synchronous function body (the executor calls this in a worker thread)."""
        return _wrap(self.name, self.fn(input, context))

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        """Run the function and wrap its return value in a success result."""
        if self.is_async:
            value = await self.fn(input, context)
        else:
            value = self.fn(input, context)
        return _wrap(self.name, value)


def _wrap(name: str, value: Any) -> StageResult[Any]:
    if isinstance(value, StageResult):
        return value
    return success_result(value, stage_name=name)


StageFunction = (
    Callable[[Any, "PipelineContext"], Awaitable[Any]] | Callable[[Any, "PipelineContext"], Any]
)


@overload
def stage(fn: Callable[..., Any], /) -> FunctionStage: ...


@overload
def stage(
    *, name: str | None = None, version: str | None = None
) -> Callable[[Callable[..., Any]], FunctionStage]: ...


def stage(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    version: str | None = None,
) -> FunctionStage | Callable[[Callable[..., Any]], FunctionStage]:
    """Turn ``f(input, context) -> T`` (async or sync) into a ``PipelineStage``.

    Example::

        @stage(version="2")
        async def summarize(text: str, context: PipelineContext) -> str:
            return text[:100]

    Args:
        fn: The function, when used as ``@stage`` without arguments.
        name: The stage's name; defaults to the function's name.
        version: The code version used in cache keys. Without it, a hash of the
            function's source (and the helpers it calls) stands in.
    """

    def decorate(f: Callable[..., Any]) -> FunctionStage:
        return FunctionStage(f, name=name, version=version)

    if fn is not None:
        return decorate(fn)
    return decorate
