"""Frozen results: ``StageResult``, ``PipelineResult`` and the helpers that build them."""

from __future__ import annotations

import enum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .errors import DefinitionError, StageFailed

__all__ = [
    "PipelineResult",
    "StageResult",
    "StageStatus",
    "cancelled_result",
    "failure_result",
    "skipped_result",
    "success_result",
]

T = TypeVar("T")


class StageStatus(str, enum.Enum):  # noqa: UP042 -- keep str()/format() as released
    """How a stage ended in a run."""

    SUCCEEDED = "succeeded"  #: its body ran and succeeded
    CACHED = "cached"  #: its output was served from the cache
    FAILED = "failed"  #: it failed (after its retries)
    SKIPPED = "skipped"  #: its condition was false, or an upstream stage failed
    CANCELLED = "cancelled"  #: the run was cancelled, or fail-fast stopped it


class StageResult(BaseModel, Generic[T]):
    """The outcome of one stage: frozen, safe to share between tasks."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    success: bool
    stage_name: str
    output: T | None = None
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        """True when the stage was skipped (its condition was false or an upstream failed)."""
        return bool(self.metadata.get("skipped"))

    @property
    def cancelled(self) -> bool:
        """True when the stage was cancelled."""
        return bool(self.metadata.get("cancelled"))


#: ``StageResult[Any]``, parametrized once: subscripting a generic model costs a
#: cache-key computation on every call, and the helpers below run once per stage.
_AnyResult = StageResult[Any]


def success_result(
    output: T, *, stage_name: str, metadata: dict[str, Any] | None = None
) -> StageResult[T]:
    """A successful result carrying ``output``."""
    return _AnyResult(
        success=True, stage_name=stage_name, output=output, metadata=dict(metadata or {})
    )


def failure_result(
    error: str, *, stage_name: str, metadata: dict[str, Any] | None = None
) -> StageResult[Any]:
    """A failed result with a human-readable ``error``."""
    return _AnyResult(
        success=False, stage_name=stage_name, error=error, metadata=dict(metadata or {})
    )


def skipped_result(*, stage_name: str, reason: str) -> StageResult[Any]:
    """A skipped stage: a success with no output and ``metadata["skipped"] is True``."""
    return _AnyResult(
        success=True,
        stage_name=stage_name,
        output=None,
        metadata={"skipped": True, "reason": reason},
    )


def cancelled_result(*, reason: str, stage_name: str) -> StageResult[Any]:
    """A cancelled stage: a failure with ``metadata["cancelled"] is True``."""
    return _AnyResult(
        success=False,
        stage_name=stage_name,
        error=f"cancelled: {reason}",
        metadata={"cancelled": True, "reason": reason},
    )


class PipelineResult(BaseModel):
    """The outcome of a whole run. Every stage has exactly one ``StageResult``.

    Skipped and cancelled stages appear in ``outputs`` with ``None``.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    success: bool
    outputs: dict[str, Any] = Field(default_factory=dict)
    stage_results: dict[str, StageResult[Any]] = Field(default_factory=dict)
    failed_stages: list[str] = Field(default_factory=list)
    #: Stages whose body ran in this run (at least one item, for FAN_OUT).
    executed: list[str] = Field(default_factory=list)
    #: Stages served entirely from the cache.
    cached: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    cancelled: list[str] = Field(default_factory=list)
    total_duration_ms: float = 0.0
    run_id: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    def get_output(self, stage_id: str) -> Any:
        """The output of ``stage_id``; KeyError naming the id when there is no such stage."""
        if stage_id not in self.outputs:
            raise KeyError(_unknown(stage_id, self.outputs))
        return self.outputs[stage_id]

    def get_result(self, stage_id: str) -> StageResult[Any]:
        """The ``StageResult`` of ``stage_id``; KeyError naming the id when unknown."""
        if stage_id not in self.stage_results:
            raise KeyError(_unknown(stage_id, self.stage_results))
        return self.stage_results[stage_id]

    def status(self, stage_id: str) -> StageStatus:
        """How ``stage_id`` ended."""
        return StageStatus(self.get_result(stage_id).metadata["status"])

    def raise_for_failure(self) -> None:
        """Raise ``StageFailed`` for the first failed stage, if the run failed.

        An invalid definition (nothing ran) raises ``DefinitionError`` listing every
        problem, as ``validate_pipeline()`` reports them.
        """
        if self.success:
            return
        for sid in self.failed_stages:
            raise StageFailed(sid, self.stage_results[sid].error)
        for sid in self.cancelled:
            raise StageFailed(sid, self.stage_results[sid].error)
        errors = self.metadata.get("errors")
        if errors:
            raise DefinitionError([str(e) for e in errors])
        raise StageFailed("<pipeline>", "the run failed")


def _unknown(stage_id: str, known: dict[str, Any]) -> str:
    names = ", ".join(sorted(known)) or "none"
    return f"No stage '{stage_id}' in this result (stages: {names})"
