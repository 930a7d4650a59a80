"""Shared fixtures and helpers: the anyio backend, a call recorder, an in-flight counter."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from twinklr_pipe import (
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    PipelineResult,
    StageDefinition,
)


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


class CallRecorder:
    """Records what stages did, in order, with monotonic timestamps (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def record(self, name: str, what: str = "start") -> None:
        with self._lock:
            self.calls.append((name, what, time.perf_counter()))

    def names(self, what: str | None = "start") -> list[str]:
        """Names of the stages that recorded ``what`` (every record when None), in order."""
        return [name for name, w, _ in self.calls if what is None or w == what]

    def events(self) -> list[tuple[str, str]]:
        return [(name, what) for name, what, _ in self.calls]

    def index(self, name: str, what: str = "start") -> int:
        return self.events().index((name, what))

    def time_of(self, name: str, what: str = "end") -> float:
        for n, w, t in self.calls:
            if n == name and w == what:
                return t
        raise AssertionError(f"{name!r} never recorded {what!r}; calls: {self.events()}")

    def count(self, name: str, what: str = "start") -> int:
        return sum(1 for n, w, _ in self.calls if n == name and w == what)


class InFlight:
    """Counts bodies running at once and remembers the peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> InFlight:
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.current -= 1


@pytest.fixture
def recorder() -> CallRecorder:
    return CallRecorder()


def pipeline(*stages: StageDefinition, fail_fast: bool = True) -> PipelineDefinition:
    return PipelineDefinition("test", list(stages), fail_fast=fail_fast)


async def run(
    stages: Sequence[StageDefinition],
    initial_input: Any = None,
    context: PipelineContext | None = None,
    *,
    fail_fast: bool = True,
    **kwargs: Any,
) -> PipelineResult:
    """Run ``stages`` as a pipeline named "test" through a fresh executor."""
    definition = PipelineDefinition("test", list(stages), fail_fast=fail_fast)
    return await PipelineExecutor().execute(definition, initial_input, context, **kwargs)
