"""twinklr_pipe: multi-stage async pipelines with a checkpointed, content-addressed cache.

Declare stages and their inputs in a ``PipelineDefinition``; ``PipelineExecutor``
runs each stage as soon as its inputs are ready, and with a cache directory it
skips every stage whose code, configuration and inputs are unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._context import PipelineContext as PipelineContext
    from ._context import current_context as current_context
    from ._dask import DaskRunner as DaskRunner
    from ._definition import ExecutionPattern as ExecutionPattern
    from ._definition import PipelineDefinition as PipelineDefinition
    from ._definition import RetryConfig as RetryConfig
    from ._definition import StageDefinition as StageDefinition
    from ._events import CacheHit as CacheHit
    from ._events import FanOutProgress as FanOutProgress
    from ._events import PipelineEvent as PipelineEvent
    from ._events import PoolWaited as PoolWaited
    from ._events import RunFinished as RunFinished
    from ._events import RunStarted as RunStarted
    from ._events import StageFinished as StageFinished
    from ._events import StageStarted as StageStarted
    from ._executor import PipelineExecutor as PipelineExecutor
    from ._plan import RunPlan as RunPlan
    from ._plan import StagePlan as StagePlan
    from ._plan import plan_run as plan_run
    from ._pools import PoolLimit as PoolLimit
    from ._results import PipelineResult as PipelineResult
    from ._results import StageResult as StageResult
    from ._results import StageStatus as StageStatus
    from ._results import cancelled_result as cancelled_result
    from ._results import failure_result as failure_result
    from ._results import skipped_result as skipped_result
    from ._results import success_result as success_result
    from ._stage import PipelineStage as PipelineStage
    from ._stage import stage as stage
    from .cache._fingerprint import FileInput as FileInput

# Every public name is imported on first use (PEP 562), so that ``import twinklr_pipe``
# costs almost nothing: the ``pipe`` command line imports only what the invoked command
# needs (``pipe cache ls`` never builds the pipeline models or imports the executor,
# anyio or the fingerprinting), and DaskRunner lives behind the optional [dask] extra.
# The imports above are what type checkers and IDEs read; keep both lists in step
# (a test resolves every name in ``__all__``).
_LAZY = {
    "CacheHit": "._events",
    "DaskRunner": "._dask",
    "ExecutionPattern": "._definition",
    "FanOutProgress": "._events",
    "FileInput": ".cache._fingerprint",
    "PipelineContext": "._context",
    "PipelineDefinition": "._definition",
    "PipelineEvent": "._events",
    "PipelineExecutor": "._executor",
    "PipelineResult": "._results",
    "PipelineStage": "._stage",
    "PoolLimit": "._pools",
    "PoolWaited": "._events",
    "RetryConfig": "._definition",
    "RunFinished": "._events",
    "RunPlan": "._plan",
    "RunStarted": "._events",
    "StageDefinition": "._definition",
    "StageFinished": "._events",
    "StagePlan": "._plan",
    "StageResult": "._results",
    "StageStarted": "._events",
    "StageStatus": "._results",
    "cancelled_result": "._results",
    "current_context": "._context",
    "failure_result": "._results",
    "plan_run": "._plan",
    "skipped_result": "._results",
    "stage": "._stage",
    "success_result": "._results",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'twinklr_pipe' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheHit",
    "DaskRunner",
    "ExecutionPattern",
    "FanOutProgress",
    "FileInput",
    "PipelineContext",
    "PipelineDefinition",
    "PipelineEvent",
    "PipelineExecutor",
    "PipelineResult",
    "PipelineStage",
    "PoolLimit",
    "PoolWaited",
    "RetryConfig",
    "RunFinished",
    "RunPlan",
    "RunStarted",
    "StageDefinition",
    "StageFinished",
    "StagePlan",
    "StageResult",
    "StageStarted",
    "StageStatus",
    "__version__",
    "cancelled_result",
    "current_context",
    "failure_result",
    "plan_run",
    "skipped_result",
    "stage",
    "success_result",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
