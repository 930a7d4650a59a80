"""Typed, frozen events that describe a run as it progresses.

``PipelineExecutor.execute(on_event=...)`` receives them in order; the CLI's live
view and the run journal are built on them. A callback that raises is logged and
never breaks the run.
"""

from __future__ import annotations

import dataclasses

from ._results import StageStatus

__all__ = [
    "CacheHit",
    "FanOutProgress",
    "PipelineEvent",
    "PoolWaited",
    "RunFinished",
    "RunStarted",
    "StageFinished",
    "StageStarted",
]


@dataclasses.dataclass(frozen=True, slots=True)
class RunStarted:
    """The run is validated and about to start its first stage."""

    run_id: str
    pipeline: str
    stage_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class StageStarted:
    """A stage's inputs are ready and it starts (cache lookup included)."""

    run_id: str
    stage_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class CacheHit:
    """A stage (or one FAN_OUT item, ``item_index``) was served from the cache."""

    run_id: str
    stage_id: str
    key: str
    item_index: int | None
    saved_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class FanOutProgress:
    """``done`` of ``total`` FAN_OUT items have finished (``cached`` of them from the cache)."""

    run_id: str
    stage_id: str
    done: int
    total: int
    cached: int


@dataclasses.dataclass(frozen=True, slots=True)
class PoolWaited:
    """A stage body waited ``waited_ms`` for a slot of resource pool ``pool``."""

    run_id: str
    stage_id: str
    pool: str
    waited_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class StageFinished:
    """A stage ended. ``keys`` are the cache entries it read or wrote."""

    run_id: str
    stage_id: str
    status: StageStatus
    duration_ms: float
    error: str | None = None
    cache: str = "off"
    key: str | None = None
    saved_ms: float = 0.0
    keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RunFinished:
    """The run ended."""

    run_id: str
    success: bool
    duration_ms: float


PipelineEvent = (
    RunStarted | StageStarted | CacheHit | FanOutProgress | PoolWaited | StageFinished | RunFinished
)
