"""Shared resource pools: one budget of slots (and optionally starts per minute) per name.

``PipelineExecutor(pools={"llm": 8, "gpu": PoolLimit(concurrency=1)})`` and
``StageDefinition(..., pools=["llm"])``: a stage body (each FAN_OUT item counts as
one) holds a slot of every pool it names while it runs. Cache hits take no slot.
A stage can also hold a slot around just one call: ``async with context.pool("llm"):``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio

__all__ = ["PoolLimit", "PoolSet", "RateWindow"]


@dataclasses.dataclass(frozen=True)
class PoolLimit:
    """The budget of one pool.

    Args:
        concurrency: Slots: at most this many holders at once.
        per_minute: At most this many slot acquisitions in any 60-second window
            (None: no rate limit). Bursts beyond it wait for the window to slide.
    """

    concurrency: int
    per_minute: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"PoolLimit.concurrency must be at least 1, got {self.concurrency}")
        if self.per_minute is not None and self.per_minute < 1:
            raise ValueError(f"PoolLimit.per_minute must be at least 1, got {self.per_minute}")


class RateWindow:
    """At most ``per_minute`` acquisitions in any sliding 60-second window.

    ``clock`` and ``sleep`` are injectable so tests can use a fake clock.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = anyio.sleep,
        window: float = 60.0,
    ) -> None:
        self.per_minute = per_minute
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._starts: deque[float] = deque()
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        """Wait until one more start fits in the window, then record it."""
        async with self._lock:
            while True:
                now = self._clock()
                while self._starts and self._starts[0] <= now - self.window:
                    self._starts.popleft()
                if len(self._starts) < self.per_minute:
                    self._starts.append(now)
                    return
                await self._sleep(self._starts[0] + self.window - now)


class _Pool:
    def __init__(self, name: str, limit: PoolLimit) -> None:
        self.name = name
        self.limit = limit
        self.slots = anyio.CapacityLimiter(limit.concurrency)
        self.rate = RateWindow(limit.per_minute) if limit.per_minute else None


class PoolSet:
    """The pools of one run."""

    def __init__(self, pools: Mapping[str, int | PoolLimit]) -> None:
        self.pools: dict[str, _Pool] = {}
        for name, spec in pools.items():
            limit = spec if isinstance(spec, PoolLimit) else PoolLimit(concurrency=int(spec))
            self.pools[name] = _Pool(name, limit)
        self.waited_ms: dict[str, float] = {}

    def check(self, names: Iterable[str]) -> list[str]:
        """Names that are not pools of this executor."""
        return [n for n in names if n not in self.pools]

    @contextlib.asynccontextmanager
    async def hold(
        self,
        names: Iterable[str],
        on_wait: Callable[[str, float], None] | None = None,
    ) -> AsyncIterator[None]:
        """Hold one slot of each named pool (acquired in sorted order: no deadlocks)."""
        async with contextlib.AsyncExitStack() as stack:
            for name in sorted(set(names)):
                pool = self.pools.get(name)
                if pool is None:
                    raise KeyError(
                        f"No resource pool '{name}'; the executor has: "
                        f"{', '.join(sorted(self.pools)) or 'none'}"
                    )
                started = time.perf_counter()
                await stack.enter_async_context(pool.slots)
                if pool.rate is not None:
                    await pool.rate.acquire()
                waited = (time.perf_counter() - started) * 1000
                if on_wait is not None:
                    on_wait(name, waited)
            yield
