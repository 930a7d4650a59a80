"""The public API: names, importability, signatures and import weight."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import twinklr_pipe
from twinklr_pipe import (
    ExecutionPattern,
    PipelineDefinition,
    PipelineExecutor,
    PipelineResult,
    RetryConfig,
    StageDefinition,
    StageResult,
    cancelled_result,
    failure_result,
    skipped_result,
    success_result,
)

PUBLIC_NAMES = [
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


class TestNames:
    def test_all_matches_the_pinned_list(self) -> None:
        """``__all__`` changes only deliberately."""
        assert sorted(twinklr_pipe.__all__) == PUBLIC_NAMES

    @pytest.mark.parametrize("name", PUBLIC_NAMES)
    def test_every_public_name_is_importable(self, name: str) -> None:
        """Every name in ``__all__`` is an attribute of the package."""
        assert getattr(twinklr_pipe, name) is not None

    def test_import_does_not_load_the_cli_dependencies(self) -> None:
        """``import twinklr_pipe`` imports neither typer nor rich."""
        code = (
            "import sys, twinklr_pipe; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'rich')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

    def test_import_is_lazy(self) -> None:
        """``import twinklr_pipe`` loads no submodule, pydantic or anyio; names load on use."""
        code = (
            "import sys, twinklr_pipe; "
            "print(sorted(m for m in sys.modules if m.startswith('twinklr_pipe.') "
            "or m.split('.')[0] in ('pydantic', 'anyio')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

    def test_every_public_name_imports_from_a_fresh_interpreter(self) -> None:
        """``from twinklr_pipe import X`` (and ``import *``) works for every name, first thing."""
        names = ", ".join(n for n in PUBLIC_NAMES if n != "__version__")
        code = (
            f"from twinklr_pipe import {names}\n"
            "import twinklr_pipe\n"
            "ns = {}\n"
            "exec('from twinklr_pipe import *', ns)\n"
            "assert all(getattr(twinklr_pipe, n) is ns[n] for n in twinklr_pipe.__all__)\n"
            "assert set(twinklr_pipe.__all__) <= set(dir(twinklr_pipe))\n"
            "print('ok')"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"

    def test_an_unknown_name_is_an_attribute_error(self) -> None:
        """The lazy loader raises AttributeError (so ``hasattr`` and ``getattr`` defaults work)."""
        assert not hasattr(twinklr_pipe, "NoSuchName")
        assert getattr(twinklr_pipe.cache, "NoSuchName", None) is None

    def test_the_cli_imports_only_what_cache_ls_needs(self, tmp_path: Path) -> None:
        """``pipe``'s module, and running ``cache ls``, leave the executor, anyio and the
        pipeline models unloaded: the command starts fast."""
        code = (
            "import sys\n"
            "import twinklr_pipe._cli as cli\n"
            "heavy = ('twinklr_pipe._executor', 'twinklr_pipe._definition', "
            "'twinklr_pipe._journal', 'twinklr_pipe._loader', 'twinklr_pipe.cache._fingerprint', "
            "'twinklr_pipe.cache._identity', 'anyio', 'rich')\n"
            "print(sorted(m for m in heavy if m in sys.modules), 'pydantic' in sys.modules)\n"
            "sys.argv = ['pipe', 'cache', 'ls', '--cache-dir', sys.argv[1]]\n"
            "try:\n"
            "    cli.main()\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
        )
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "[] False"
        assert lines[-1] == "[]"


class TestSignatures:
    def test_stage_definition_takes_id_and_stage_positionally(self) -> None:
        """``StageDefinition(id, stage)`` with the documented defaults."""
        sdef = StageDefinition("a", object())
        assert sdef.id == "a"
        assert sdef.pattern is ExecutionPattern.SEQUENTIAL
        assert sdef.inputs == ()
        assert sdef.condition is None
        assert sdef.retry_config is None
        assert sdef.timeout_ms is None
        assert sdef.critical is True
        assert sdef.max_concurrent_fan_out == 4
        assert sdef.fan_out_over is None
        assert sdef.description is None

    def test_pipeline_definition_defaults_and_is_frozen(self) -> None:
        """``PipelineDefinition(name, stages)`` fails fast by default and cannot be mutated."""
        pdef = PipelineDefinition("p", [StageDefinition("a", object())])
        assert pdef.fail_fast is True
        assert pdef.description is None
        with pytest.raises(AttributeError):
            pdef.name = "q"  # type: ignore[misc]

    def test_retry_config_defaults_and_is_frozen(self) -> None:
        """RetryConfig has the documented defaults and rejects mutation."""
        rc = RetryConfig()
        assert (rc.max_attempts, rc.initial_delay_ms, rc.backoff_multiplier) == (1, 1000.0, 2.0)
        assert (rc.max_delay_ms, rc.jitter, rc.retryable_errors) == (60000.0, 0.0, None)
        with pytest.raises(ValidationError):
            rc.max_attempts = 3  # type: ignore[misc]

    def test_execution_pattern_is_a_str_enum(self) -> None:
        """The patterns compare equal to their string values."""
        assert [p.name for p in ExecutionPattern] == [
            "SEQUENTIAL",
            "PARALLEL",
            "FAN_OUT",
            "CONDITIONAL",
        ]
        assert isinstance(ExecutionPattern.FAN_OUT, str)

    def test_execute_and_run_share_the_documented_signature(self) -> None:
        """``execute`` and ``run`` take pipeline, initial_input, context, then keywords."""
        expected = [
            ("pipeline", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            ("initial_input", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            ("context", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            ("force", inspect.Parameter.KEYWORD_ONLY),
            ("run_id", inspect.Parameter.KEYWORD_ONLY),
            ("on_event", inspect.Parameter.KEYWORD_ONLY),
        ]
        for method in (PipelineExecutor.execute, PipelineExecutor.run):
            params = list(inspect.signature(method).parameters.values())[1:]
            assert [(p.name, p.kind) for p in params] == expected
        assert inspect.iscoroutinefunction(PipelineExecutor.execute)


class TestResultHelpers:
    def test_success_result_carries_the_output(self) -> None:
        """success_result is a success with the output and a copy of the metadata."""
        meta = {"k": 1}
        result = success_result(3, stage_name="s", metadata=meta)
        assert (result.success, result.output, result.error, result.metadata) == (
            True,
            3,
            None,
            {"k": 1},
        )
        assert result.metadata is not meta

    def test_failure_result_carries_the_error(self) -> None:
        """failure_result is a failure with the error text and no output."""
        result = failure_result("boom", stage_name="s")
        assert (result.success, result.output, result.error) == (False, None, "boom")

    def test_skipped_result_is_a_success_marked_skipped(self) -> None:
        """skipped_result is a success with ``metadata["skipped"] is True``."""
        result = skipped_result(stage_name="s", reason="no lyrics")
        assert result.success is True
        assert result.metadata["skipped"] is True
        assert result.metadata["reason"] == "no lyrics"
        assert result.skipped

    def test_cancelled_result_is_a_failure_marked_cancelled(self) -> None:
        """cancelled_result is a failure with ``metadata["cancelled"] is True``."""
        result = cancelled_result(reason="stop", stage_name="s")
        assert result.success is False
        assert result.metadata["cancelled"] is True
        assert result.cancelled
        assert "stop" in (result.error or "")

    def test_stage_result_is_frozen(self) -> None:
        """A StageResult cannot be changed once made."""
        result: StageResult[int] = success_result(1, stage_name="s")
        with pytest.raises(ValidationError):
            result.output = 2  # type: ignore[misc]

    def test_pipeline_result_is_frozen(self) -> None:
        """A PipelineResult cannot be changed once made."""
        result = PipelineResult(success=True)
        with pytest.raises(ValidationError):
            result.success = False  # type: ignore[misc]


CACHE_NAMES = [
    "CacheStore",
    "DiskCacheStore",
    "EntryMeta",
    "FileInput",
    "MemoryStore",
    "fingerprint",
]

ADMIN_NAMES = [
    "DEFAULT_CACHE_DIR",
    "DoctorReport",
    "EntryRow",
    "Finding",
    "GcReport",
    "InputSpec",
    "RunRecord",
    "accept_stage",
    "clear_entries",
    "doctor",
    "find_entry",
    "gc_entries",
    "graph_text",
    "list_entries",
    "list_runs",
    "load_pipeline",
    "load_run",
    "open_store",
    "parse_duration",
    "parse_size",
    "result_to_dict",
    "run_journalled",
]


class TestSubpackages:
    def test_cache_and_admin_export_exactly_their_pinned_names(self) -> None:
        """``twinklr_pipe.cache`` and ``twinklr_pipe.admin`` grow only deliberately."""
        import twinklr_pipe.admin
        import twinklr_pipe.cache

        assert sorted(twinklr_pipe.cache.__all__) == CACHE_NAMES
        assert sorted(twinklr_pipe.admin.__all__) == ADMIN_NAMES
        for module in (twinklr_pipe.cache, twinklr_pipe.admin):
            for name in module.__all__:
                assert hasattr(module, name), name

    def test_dask_runner_is_public_without_importing_distributed_early(self) -> None:
        """``twinklr_pipe.DaskRunner`` resolves lazily; the core import stays light."""
        code = (
            "import sys, twinklr_pipe, twinklr_pipe.admin;"
            "assert 'distributed' not in sys.modules;"
            "assert 'typer' not in sys.modules and 'rich' not in sys.modules;"
            "from twinklr_pipe import DaskRunner; print(DaskRunner.__name__)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "DaskRunner"
