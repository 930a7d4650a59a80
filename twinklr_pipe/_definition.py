"""Declarative definitions: ``StageDefinition``, ``PipelineDefinition``, ``RetryConfig``."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from ._context import PipelineContext

__all__ = ["ExecutionPattern", "PipelineDefinition", "RetryConfig", "StageDefinition"]


class ExecutionPattern(str, enum.Enum):  # noqa: UP042 -- keep str()/format() as released
    """How a stage is run once its inputs are ready."""

    SEQUENTIAL = "sequential"  #: once, with its inputs
    PARALLEL = "parallel"  #: same as SEQUENTIAL; parallelism is automatic, this is for readability
    FAN_OUT = "fan_out"  #: once per item of a list input, concurrently, output in input order
    CONDITIONAL = "conditional"  #: once if ``condition(context)`` is true, else skipped


class RetryConfig(BaseModel):
    """When and how often a failing stage (or FAN_OUT item) is tried again.

    After attempt ``n`` fails, the next one starts after
    ``initial_delay_ms * backoff_multiplier ** (n - 1)`` milliseconds, capped at
    ``max_delay_ms`` and spread by ± ``jitter`` (a fraction of the delay). Only
    errors containing one of the ``retryable_errors`` substrings are retried, when
    it is given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = 1
    initial_delay_ms: float = 1000.0
    backoff_multiplier: float = 2.0
    max_delay_ms: float = 60000.0
    jitter: float = 0.0
    retryable_errors: list[str] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class StageDefinition:
    """One stage of a pipeline: what runs, what it needs, and how it is run.

    Args:
        id: Unique id of the stage within its pipeline.
        stage: The ``PipelineStage`` object (anything with ``name`` and ``execute``).
        pattern: How it runs; see ``ExecutionPattern``.
        inputs: Ids of the stages whose outputs it receives. None: the initial
            input; one: that output; several: a dict ``{id: output}``.
        condition: For CONDITIONAL stages, ``condition(context) -> bool``.
        retry_config: Retries with exponential back-off; default is one attempt.
        timeout_ms: Time limit per attempt (per item for FAN_OUT).
        critical: When False, its failure does not fail the pipeline.
        max_concurrent_fan_out: At most this many FAN_OUT items at once (None: unbounded).
        fan_out_over: Which input a FAN_OUT stage fans over (required with several inputs).
        description: Free text, shown by ``pipe graph``.
        cache: False opts the stage out of the cache (side effects, non-determinism).
        pools: Names of executor resource pools a run of its body holds a slot of.
        remote: Run the body on the executor's remote runner (e.g. Dask).
    """

    id: str
    stage: Any
    pattern: ExecutionPattern = ExecutionPattern.SEQUENTIAL
    inputs: Sequence[str] = ()
    condition: Callable[[PipelineContext], bool] | None = None
    retry_config: RetryConfig | None = None
    timeout_ms: float | None = None
    critical: bool = True
    max_concurrent_fan_out: int | None = 4
    fan_out_over: str | None = None
    description: str | None = None
    cache: bool = True
    pools: Sequence[str] = ()
    remote: bool = False

    def __post_init__(self) -> None:
        # Store sequences as tuples so a definition is a value nobody mutates under us.
        object.__setattr__(self, "inputs", _names(self.inputs, "inputs", self.id))
        object.__setattr__(self, "pools", _names(self.pools, "pools", self.id))
        object.__setattr__(self, "pattern", ExecutionPattern(self.pattern))


def _names(value: Sequence[str] | str, field: str, stage_id: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(
            f"Stage '{stage_id}': {field} must be a list of stage ids, not the string "
            f"{value!r}; write {field}=[{value!r}]"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineDefinition:
    """A named set of stages; their ``inputs`` make the dependency graph.

    Example::

        pipeline = PipelineDefinition(
            name="demo",
            stages=[
                StageDefinition("load", load),
                StageDefinition("clean", clean, inputs=["load"]),
            ],
        )

    Args:
        name: The pipeline's name (recorded with cache entries and runs).
        stages: The stages, in any order.
        description: Free text.
        fail_fast: Stop at the first failed critical stage (default), or run
            every stage that does not depend on a failure.
    """

    name: str
    stages: Sequence[StageDefinition]
    description: str | None = None
    fail_fast: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))

    def validate_pipeline(self) -> list[str]:
        """Every problem of this definition, as messages; empty when it can run."""
        from ._graph import validate

        return validate(self)

    def get_stage(self, stage_id: str) -> StageDefinition:
        """The stage with this id; KeyError naming it (and the known ids) otherwise."""
        for definition in self.stages:
            if definition.id == stage_id:
                return definition
        known = ", ".join(s.id for s in self.stages) or "none"
        raise KeyError(f"No stage '{stage_id}' in pipeline '{self.name}' (stages: {known})")

    def get_entry_points(self) -> list[StageDefinition]:
        """Stages without inputs: they receive the initial input."""
        return [s for s in self.stages if not s.inputs]
