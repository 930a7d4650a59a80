"""Stages shared by the cache tests: each appends its tag to a log when its body runs.

Counting executions is how every cache test proves what ran: a hit never calls the
body, so it never appends.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio

from twinklr_pipe import (
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    PipelineResult,
    StageDefinition,
    StageResult,
    success_result,
)
from twinklr_pipe.cache import CacheStore, MemoryStore


class Log:
    """What stage bodies ran, in order (thread-safe: sync bodies run in worker threads)."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self.entries.append(name)

    def take(self) -> list[str]:
        """Everything logged since the last ``take``, and forget it."""
        with self._lock:
            taken, self.entries = self.entries, []
        return taken

    def take_set(self) -> set[str]:
        return set(self.take())

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.entries)


#: Dataclass fields that are not configuration (they stay out of the key).
_NOT_CONFIG = {"cache": False}


@dataclasses.dataclass(eq=False)
class Step:
    """A class stage: output ``{"tag", "salt", "input"}``; logs ``tag`` when its body runs.

    ``tag`` and ``param`` are configuration; ``salt`` changes the output without being
    part of the key (only a version bump may change it, as a code edit would).
    """

    tag: str
    log: Log = dataclasses.field(default_factory=Log, metadata=_NOT_CONFIG, repr=False)
    version: str = "1"
    param: int = 0
    salt: int = dataclasses.field(default=0, metadata=_NOT_CONFIG)
    delay: float = dataclasses.field(default=0.0, metadata=_NOT_CONFIG)

    @property
    def name(self) -> str:
        return self.tag

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        self.log.add(self.tag)
        if self.delay:
            await anyio.sleep(self.delay)
        return success_result(
            {"tag": self.tag, "param": self.param, "salt": self.salt, "input": input},
            stage_name=self.tag,
        )


@dataclasses.dataclass(eq=False)
class Pick:
    """A class stage whose output is one field of its (dict) input: it ignores the rest."""

    tag: str
    field: str
    log: Log = dataclasses.field(default_factory=Log, metadata=_NOT_CONFIG, repr=False)
    version: str = "1"

    @property
    def name(self) -> str:
        return self.tag

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        self.log.add(self.tag)
        return success_result(input[self.field], stage_name=self.tag)


def pipeline(*stages: StageDefinition, name: str = "cache-test") -> PipelineDefinition:
    return PipelineDefinition(name, list(stages))


async def run(
    stages: Sequence[StageDefinition] | PipelineDefinition,
    initial_input: Any = None,
    *,
    store: CacheStore | None = None,
    context: PipelineContext | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> PipelineResult:
    """Run through a fresh executor on ``store`` (a fresh ``MemoryStore`` when None)."""
    definition = (
        stages if isinstance(stages, PipelineDefinition) else PipelineDefinition("t", stages)
    )
    executor = PipelineExecutor(
        cache=store if store is not None else MemoryStore(), allow_pickle=allow_pickle
    )
    return await executor.execute(definition, initial_input, context, **kwargs)
