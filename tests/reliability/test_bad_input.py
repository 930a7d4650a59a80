"""The bad input catalogue: every way a pipeline, a stage, an input, a spec or a cache
directory can be wrong, each pinned to the exact message it gives.

Each mistake gives one clear error naming the stage or argument, never an exception
from inside the library; where stages completed before the mistake struck, a re-run
serves them from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from reliability.pipelines import TALLY
from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    RetryConfig,
    StageDefinition,
    StageResult,
    stage,
    success_result,
)
from twinklr_pipe._cli import app
from twinklr_pipe.cache import DiskCacheStore
from twinklr_pipe.errors import CacheFormatError, DefinitionError, StageFailed, StoreError

FAN_OUT = ExecutionPattern.FAN_OUT
CONDITIONAL = ExecutionPattern.CONDITIONAL
SPEC = f"{Path(__file__).with_name('pipelines.py')}:sigint_pipeline"


@stage(version="1")
def ok(input: Any, context: PipelineContext) -> dict[str, int]:
    return {"v": 1}


@stage(version="1")
def not_a_list(input: Any, context: PipelineContext) -> dict[str, str]:
    return {"not": "a list"}


@stage(version="1")
def boom(input: Any, context: PipelineContext) -> None:
    raise ValueError("boom")


@stage(version="1")
def returns_a_lock(input: Any, context: PipelineContext) -> Any:
    return threading.Lock()


class ReturnsNone:
    name = "returns_none"
    version = "1"

    async def execute(self, input: Any, context: PipelineContext) -> Any:
        return None


class ReturnsInt:
    name = "returns_int"
    version = "1"

    async def execute(self, input: Any, context: PipelineContext) -> Any:
        return 42


class NeverReturns:
    name = "never_returns"
    version = "1"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        await anyio.sleep(3600)
        raise AssertionError("unreachable")


RELEASE = threading.Event()


class BlocksItsThread:
    """A sync stage that blocks its worker thread (until the test releases it)."""

    name = "blocks"
    version = "1"

    def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        RELEASE.wait(30)
        return success_result(1, stage_name=self.name)


@dataclasses.dataclass
class LockedConfig:
    lock: Any
    name: str = "locked"
    version = "1"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        return success_result(1, stage_name=self.name)


def raising_condition(context: PipelineContext) -> bool:
    raise KeyError("mood")


S = StageDefinition


def P(*stages: StageDefinition) -> PipelineDefinition:
    return PipelineDefinition("bad", list(stages))


@dataclasses.dataclass
class Case:
    build: Callable[[], PipelineDefinition]
    #: The exact message(s): definition problems, or the failing stage's error.
    messages: list[str]
    #: The failing stage; None for a definition error (nothing runs).
    stage: str | None = None
    input: Any = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Stages that completed before the failure: the re-run serves them from the cache.
    cached: list[str] = dataclasses.field(default_factory=list)


FP_HINT = (
    "Pass a value of a supported type (a pydantic model, dataclass, JSON-like value, bytes, "
    "FileInput...), give the stage a cache_params() method that returns fingerprintable "
    "values, or set cache=False on its StageDefinition."
)

CASES: dict[str, Case] = {
    "cycle": Case(
        lambda: P(S("a", ok), S("b", ok, inputs=["a", "c"]), S("c", ok, inputs=["b"])),
        ["Circular dependency detected: b -> c -> b"],
    ),
    "self-loop": Case(
        lambda: P(S("a", ok), S("b", ok, inputs=["b"])),
        ["Circular dependency detected: b -> b"],
    ),
    "unknown input": Case(
        lambda: P(S("clean", ok), S("report", ok, inputs=["clen"])),
        ["Stage 'report' depends on unknown stage 'clen' (did you mean 'clean'?)"],
    ),
    "duplicate ids": Case(
        lambda: P(S("a", ok), S("a", ok)),
        ["Duplicate stage IDs: a"],
    ),
    "empty pipeline": Case(
        lambda: P(),
        ["Pipeline 'bad' has no stages; add at least one StageDefinition"],
    ),
    "no entry point": Case(
        lambda: P(S("a", ok, inputs=["b"]), S("b", ok, inputs=["a"])),
        [
            "Circular dependency detected: a -> b -> a",
            "No entry point: every stage has inputs, so nothing can start; "
            "give at least one stage inputs=[]",
        ],
    ),
    "fan_out_over names a non-input": Case(
        lambda: P(
            S("a", ok),
            S("b", ok),
            S("f", ok, pattern=FAN_OUT, inputs=["a", "b"], fan_out_over="zzz"),
        ),
        ["Stage 'f' fans out over 'zzz', which is not one of its inputs ['a', 'b']"],
    ),
    "FAN_OUT over several inputs without fan_out_over": Case(
        lambda: P(S("a", ok), S("b", ok), S("f", ok, pattern=FAN_OUT, inputs=["a", "b"])),
        [
            "Stage 'f' is FAN_OUT with several inputs ['a', 'b']; set fan_out_over to the "
            "input to fan out over"
        ],
    ),
    "zero and negative limits and timeouts": Case(
        lambda: P(
            S("a", ok, timeout_ms=0),
            S("b", ok, inputs=["a"], timeout_ms=-5),
            S("f", ok, pattern=FAN_OUT, inputs=["a"], max_concurrent_fan_out=0),
            S("g", ok, inputs=["a"], max_concurrent_fan_out=-1),
            S("r", ok, inputs=["a"], retry_config=RetryConfig(max_attempts=0)),
            S("d", ok, inputs=["a"], retry_config=RetryConfig(initial_delay_ms=-1)),
        ),
        [
            "Stage 'a': timeout_ms must be positive, got 0",
            "Stage 'b': timeout_ms must be positive, got -5",
            "Stage 'f': max_concurrent_fan_out must be at least 1 (or None for unbounded), got 0",
            "Stage 'g': max_concurrent_fan_out must be at least 1 (or None for unbounded), got -1",
            "Stage 'r': retry_config.max_attempts must be at least 1, got 0",
            "Stage 'd': retry delays must be non-negative and backoff_multiplier positive",
        ],
    ),
    "CONDITIONAL without a condition": Case(
        lambda: P(S("a", ok), S("c", ok, pattern=CONDITIONAL, inputs=["a"])),
        ["Stage 'c' is CONDITIONAL but has no condition; pass condition=..."],
    ),
    "stage object without execute": Case(
        lambda: P(S("a", object())),
        [
            "Stage 'a': object object has no execute() method; pass a PipelineStage (an object "
            "with name and execute) or use @stage"
        ],
    ),
    "force names an unknown stage": Case(
        lambda: P(S("a", ok)),
        ["force names unknown stage 'zz'; stages are: a"],
        kwargs={"force": ["zz"]},
    ),
    "FAN_OUT over a non-list": Case(
        lambda: P(S("src", not_a_list), S("f", ok, pattern=FAN_OUT, inputs=["src"])),
        ["Stage 'f' is FAN_OUT over input 'src', which must be a list or tuple, but got dict"],
        stage="f",
        cached=["src"],
    ),
    "FAN_OUT over a non-list initial input": Case(
        lambda: P(S("f", ok, pattern=FAN_OUT)),
        ["Stage 'f' is FAN_OUT over the initial input, which must be a list or tuple, but got int"],
        stage="f",
        input=5,
    ),
    "a condition that raises": Case(
        lambda: P(S("a", ok), S("c", ok, inputs=["a"], condition=raising_condition)),
        ["condition raised KeyError: 'mood'"],
        stage="c",
        cached=["a"],
    ),
    "a stage that raises": Case(
        lambda: P(S("a", ok), S("b", boom, inputs=["a"])),
        ["ValueError: boom"],
        stage="b",
        cached=["a"],
    ),
    "a stage that returns None": Case(
        lambda: P(S("a", ok), S("b", ReturnsNone(), inputs=["a"])),
        [
            "Stage 'b' returned NoneType, not a StageResult; return success_result(output, "
            "stage_name=...) or decorate a function with @stage"
        ],
        stage="b",
        cached=["a"],
    ),
    "a stage that returns a non-StageResult": Case(
        lambda: P(S("a", ok), S("b", ReturnsInt(), inputs=["a"])),
        [
            "Stage 'b' returned int, not a StageResult; return success_result(output, "
            "stage_name=...) or decorate a function with @stage"
        ],
        stage="b",
        cached=["a"],
    ),
    "a stage that never returns": Case(
        lambda: P(S("a", ok), S("b", NeverReturns(), inputs=["a"], timeout_ms=50)),
        ["Stage 'b' timed out after 50 ms"],
        stage="b",
        cached=["a"],
    ),
    "a sync stage that blocks": Case(
        lambda: P(S("a", ok), S("b", BlocksItsThread(), inputs=["a"], timeout_ms=100)),
        ["Stage 'b' timed out after 100 ms"],
        stage="b",
        cached=["a"],
    ),
    "an output that cannot be stored": Case(
        lambda: P(S("a", ok), S("b", returns_a_lock, inputs=["a"])),
        [
            "Stage 'b': cannot store output of type _thread.lock with the safe codec. Return a "
            "supported value (a pydantic model, dataclass, JSON-like value, bytes, numpy "
            "array...), or opt into pickle for such outputs with "
            "PipelineExecutor(allow_pickle=True)."
        ],
        stage="b",
        cached=["a"],
    ),
    "an input that cannot be fingerprinted": Case(
        lambda: P(S("a", ok)),
        [f"Stage 'a': cannot fingerprint value of type _thread.lock. {FP_HINT}"],
        stage="a",
        input=threading.Lock(),
    ),
    "a FAN_OUT item that cannot be fingerprinted": Case(
        lambda: P(S("f", ok, pattern=FAN_OUT)),
        [
            "item 1 of 2 failed: Stage 'f': cannot fingerprint item 1 (value) of type "
            f"_thread.lock. {FP_HINT}; 1 items were not finished"
        ],
        stage="f",
        input=[1, threading.Lock()],
    ),
    "a configuration field that cannot be fingerprinted": Case(
        lambda: P(S("a", ok), S("b", LockedConfig(threading.Lock()), inputs=["a"])),
        [
            "Stage 'b': cannot fingerprint configuration field 'lock' of type _thread.lock. "
            + FP_HINT
        ],
        stage="b",
        cached=["a"],
    ),
}


@pytest.fixture(autouse=True)
def _release_blocked_threads() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()


class TestPipelineMistakes:
    @pytest.mark.parametrize("name", list(CASES))
    def test_mistake_gives_its_exact_message(
        self, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One clear message naming the stage; completed stages stay cached."""
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        case = CASES[name]
        pipeline = case.build()
        started = time.perf_counter()
        result = PipelineExecutor(tmp_path).run(pipeline, case.input, **case.kwargs)
        elapsed = time.perf_counter() - started
        TALLY.add("bad input: cases tried")
        assert not result.success
        if case.stage is None:
            assert result.metadata["errors"] == case.messages
            assert result.stage_results == {}
            with pytest.raises(DefinitionError) as raised:
                result.raise_for_failure()
            assert str(raised.value) == "; ".join(case.messages)
            return
        (message,) = case.messages
        assert result.failed_stages == [case.stage]
        assert result.stage_results[case.stage].error == message
        with pytest.raises(StageFailed) as failed:
            result.raise_for_failure()
        assert failed.value.stage == case.stage
        assert str(failed.value) == f"Stage '{case.stage}' failed: {message}"
        # Only a user's own exception (a stage or condition that raised) is logged with
        # its traceback; the library's own errors are messages.
        for record in caplog.records:
            if record.exc_info:
                assert record.exc_info[0] in (ValueError, KeyError), record.getMessage()
        if name == "a sync stage that blocks":
            assert elapsed < 5, "the timeout did not fire while the thread blocked"

        rerun = PipelineExecutor(tmp_path).run(pipeline, case.input, **case.kwargs)
        assert not rerun.success and rerun.stage_results[case.stage].error == message
        for sid in case.cached:
            assert rerun.stage_results[sid].metadata["cache"] == "hit", sid
        assert not set(rerun.executed) & set(case.cached)

    def test_function_stage_returning_none_is_an_output(self, tmp_path: Path) -> None:
        """A @stage function returning None succeeds with None (and caches it)."""

        @stage(version="1")
        def nothing(input: Any, context: PipelineContext) -> None:
            return None

        pipeline = P(S("a", nothing))
        first = PipelineExecutor(tmp_path).run(pipeline)
        second = PipelineExecutor(tmp_path).run(pipeline)
        assert first.success and first.outputs == {"a": None}
        assert second.cached == ["a"] and second.outputs == {"a": None}
        TALLY.add("bad input: cases tried")


class TestCacheDirectoryMistakes:
    def test_cache_dir_that_is_a_file(self, tmp_path: Path) -> None:
        """A file where the cache directory should be is refused, naming it."""
        path = tmp_path / "not-a-dir"
        path.write_text("x")
        message = (
            f"Cache directory {path} is a file, not a directory. Pass another cache "
            "directory, or move the file away."
        )
        with pytest.raises(StoreError) as raised:
            PipelineExecutor(path)
        assert str(raised.value) == message
        with pytest.raises(StoreError):
            DiskCacheStore(path)
        assert path.read_text() == "x"
        TALLY.add("bad input: cases tried")

    def test_cache_dir_from_a_newer_format(self, tmp_path: Path) -> None:
        """A directory written by a newer store format is refused, naming both versions."""
        (tmp_path / "FORMAT").write_text(json.dumps({"format": 7, "library": "twinklr_pipe"}))
        with pytest.raises(CacheFormatError) as raised:
            PipelineExecutor(tmp_path)
        assert str(raised.value) == (
            f"Cache directory {tmp_path} uses store format 7, but this version of twinklr_pipe "
            "reads format 1 or older. Upgrade twinklr_pipe, or use another --cache-dir."
        )
        assert (raised.value.found, raised.value.supported) == (7, 1)
        assert json.loads((tmp_path / "FORMAT").read_text())["format"] == 7  # untouched
        TALLY.add("bad input: cases tried")

    @pytest.mark.parametrize(
        ("content", "problem"),
        [
            (b"", "not JSON"),
            (b"\x00\x00\x00", "not JSON"),
            (b"[1]", "not a JSON object"),
            (b'{"format": "one", "library": "twinklr_pipe"}', "bad format number 'one'"),
            (b'{"format": 0, "library": "twinklr_pipe"}', "bad format number 0"),
            (b'{"format": 1, "library": "other"}', "library is 'other', not 'twinklr_pipe'"),
        ],
    )
    def test_damaged_format_marker_is_repaired_not_refused(
        self, content: bytes, problem: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A damaged or unreadable marker is rewritten with a warning; the cache opens."""
        DiskCacheStore(tmp_path).close()
        (tmp_path / "FORMAT").write_bytes(content)
        caplog.set_level(logging.WARNING, logger="twinklr_pipe")
        PipelineExecutor(tmp_path).store.close()  # type: ignore[union-attr]
        assert [r.getMessage() for r in caplog.records] == [
            f"Cache format marker {tmp_path / 'FORMAT'} is damaged ({problem}); "
            "rewriting it for format 1"
        ]
        assert json.loads((tmp_path / "FORMAT").read_text()) == {
            "format": 1,
            "library": "twinklr_pipe",
        }
        TALLY.add("bad input: cases tried")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Invoke ``pipe`` in-process from ``tmp_path``; undo what loading a spec file does."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)

    def invoke(*args: str) -> Any:
        TALLY.add("bad input: cases tried")
        return CliRunner().invoke(app, list(args))

    yield invoke
    for name in set(sys.modules) - before:
        if name in ("pipelines", "syntax_error", "raises_on_import"):
            del sys.modules[name]


class TestCliMistakes:
    @pytest.mark.parametrize(
        ("files", "spec", "message"),
        [
            (
                {},
                "nosuchmod_xyz:pipeline",
                "Spec 'nosuchmod_xyz:pipeline': no module named 'nosuchmod_xyz' "
                "(looked in {cwd} and the installed packages)",
            ),
            (
                {"syntax_error.py": "def broken(:\n"},
                "syntax_error.py:p",
                "Spec 'syntax_error.py:p': importing syntax_error.py raised SyntaxError: "
                "invalid syntax (syntax_error.py, line 1)",
            ),
            (
                {"raises_on_import.py": "raise RuntimeError('no database')\n"},
                "raises_on_import.py:p",
                "Spec 'raises_on_import.py:p': importing raises_on_import.py raised "
                "RuntimeError: no database (raises_on_import.py, line 1)",
            ),
            ({}, "missing.py:p", "Spec 'missing.py:p': file missing.py does not exist"),
            (
                {},
                "nocolon",
                "Spec 'nocolon' must have the form 'module.path:attr' or 'path/to/file.py:attr'",
            ),
        ],
        ids=["no module", "syntax error", "raises on import", "no file", "no attr part"],
    )
    def test_spec_that_does_not_import(
        self,
        files: dict[str, str],
        spec: str,
        message: str,
        tmp_path: Path,
        cli: Callable[..., Any],
    ) -> None:
        """A bad spec is one `error:` line, exit code 2, no traceback."""
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        result = cli("run", spec, "--cache-dir", str(tmp_path / "cache"))
        assert result.exit_code == 2
        assert result.stderr == f"error: {message.format(cwd=tmp_path)}\n"
        assert "Traceback" not in result.output

    def test_cache_dir_that_is_a_file(self, tmp_path: Path, cli: Callable[..., Any]) -> None:
        """`pipe run --cache-dir FILE` says what to pass instead."""
        path = tmp_path / "cachefile"
        path.write_text("x")
        result = cli("run", SPEC, "--input", "3", "--cache-dir", str(path))
        assert result.exit_code == 2
        assert result.stderr == (
            f"error: Cache directory {path} is a file, not a directory; pass --cache-dir DIR "
            "(or set TWINKLR_PIPE_CACHE_DIR) to a directory\n"
        )

    def test_cache_dir_from_a_newer_format(self, tmp_path: Path, cli: Callable[..., Any]) -> None:
        """`pipe run` refuses a newer store, naming both versions."""
        cache = tmp_path / "cache"
        cache.mkdir()
        (cache / "FORMAT").write_text(json.dumps({"format": 2, "library": "twinklr_pipe"}))
        result = cli("run", SPEC, "--input", "3", "--cache-dir", str(cache))
        assert result.exit_code == 2
        assert result.stderr == (
            f"error: Cache directory {cache} uses store format 2, but this version of "
            "twinklr_pipe reads format 1 or older. Upgrade twinklr_pipe, or use another "
            "--cache-dir.\n"
        )

    def test_damaged_format_marker_is_repaired(
        self, tmp_path: Path, cli: Callable[..., Any]
    ) -> None:
        """`pipe run` on a cache with a garbled marker warns, repairs it and runs."""
        cache = tmp_path / "cache"
        DiskCacheStore(cache).close()
        (cache / "FORMAT").write_bytes(b"\x00garbage")
        result = cli("run", SPEC, "--input", "3", "--cache-dir", str(cache), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["success"]
        assert (
            f"warning: Cache format marker {cache / 'FORMAT'} is damaged (not JSON); "
            "rewriting it for format 1\n"
        ) in result.stderr
