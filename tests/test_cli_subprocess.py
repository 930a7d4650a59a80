"""``pipe run`` and ``pipe resume`` as real processes: SIGKILL mid-stage, Ctrl-C mid-fan-out."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinklr_pipe._cli import app
from twinklr_pipe._journal import list_runs
from twinklr_pipe.cache._store import DiskCacheStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

COMMON = """
import pathlib
import time

import anyio

from twinklr_pipe import ExecutionPattern, PipelineDefinition, StageDefinition, stage

HERE = pathlib.Path(__file__).parent


def mark(name):
    with open(HERE / "calls.txt", "a") as f:
        f.write(name + "\\n")
"""

KILL_PIPELINE = (
    COMMON
    + """

@stage(version="1")
def first(x, ctx):
    mark("first")
    return x + 1


@stage(version="1")
def second(x, ctx):
    mark("second")
    return x * 2


@stage(version="1")
def slow(x, ctx):
    mark("slow")
    while not (HERE / "release").exists():
        time.sleep(0.02)
    return x + 100


@stage(version="1")
def last(x, ctx):
    mark("last")
    return x - 1


PIPELINE = PipelineDefinition(
    "kill",
    [
        StageDefinition("first", first),
        StageDefinition("second", second, inputs=["first"]),
        StageDefinition("slow", slow, inputs=["second"]),
        StageDefinition("last", last, inputs=["slow"]),
    ],
)
"""
)

SIGINT_PIPELINE = (
    COMMON
    + """

@stage(version="1")
def items(x, ctx):
    mark("items")
    return list(range(6))


@stage(version="1")
async def work(i, ctx):
    mark(f"start{i}")
    if i >= 2 and not (HERE / "release").exists():
        await anyio.sleep(60)
    return i * 10


@stage(version="1")
def total(values, ctx):
    mark("total")
    return sum(values)


PIPELINE = PipelineDefinition(
    "sigint",
    [
        StageDefinition("items", items),
        StageDefinition(
            "work", work, pattern=ExecutionPattern.FAN_OUT, inputs=["items"],
            max_concurrent_fan_out=6,
        ),
        StageDefinition("total", total, inputs=["work"]),
    ],
)
"""
)


@pytest.fixture(autouse=True)
def _restore(tmp_path):
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "")):
            del sys.modules[name]
    logger = logging.getLogger("twinklr_pipe")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def pipe_process(*args: str, cwd: Path, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TWINKLR_PIPE_CACHE_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "twinklr_pipe", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def calls(folder: Path) -> list[str]:
    path = folder / "calls.txt"
    return path.read_text().split() if path.exists() else []


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"pipe exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_mid_stage_then_resume_runs_only_unfinished_stages(tmp_path):
    """A run killed with SIGKILL inside a stage resumes with only that stage and later ones."""
    (tmp_path / "killpipe.py").write_text(KILL_PIPELINE)
    cache = tmp_path / "cache"
    proc = pipe_process(
        "run", "killpipe.py:PIPELINE", "-i", "1", "--cache-dir", str(cache), cwd=tmp_path
    )
    wait_for(lambda: "slow" in calls(tmp_path), proc, "stage 'slow' to start")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    run = list_runs(cache)[-1]
    assert run.status == "crashed"
    assert run.stages == {
        "first": "succeeded",
        "second": "succeeded",
        "slow": "interrupted",
        "last": "pending",
    }

    (tmp_path / "release").write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resume = pipe_process("resume", run.run_id, "--json", "--cache-dir", str(cache), cwd=elsewhere)
    out, err = resume.communicate(timeout=60)
    assert resume.returncode == 0, err
    data = json.loads(out)
    assert data["cached"] == ["first", "second"]
    assert data["executed"] == ["slow", "last"]
    assert data["outputs"]["last"] == 103
    assert calls(tmp_path) == ["first", "second", "slow", "slow", "last"]
    assert list_runs(cache)[-1].resumed_from == run.run_id


def test_sigint_during_fan_out_exits_130_and_keeps_finished_items(tmp_path, monkeypatch):
    """Ctrl-C mid FAN_OUT: exit 130 with the resume hint; finished items stay cached."""
    (tmp_path / "sigpipe.py").write_text(SIGINT_PIPELINE)
    cache = tmp_path / "cache"
    proc = pipe_process("run", "sigpipe.py:PIPELINE", "--cache-dir", str(cache), cwd=tmp_path)

    def two_items_stored() -> bool:
        if len([c for c in calls(tmp_path) if c.startswith("start")]) < 6:
            return False
        with DiskCacheStore(cache) as store:
            return sum(1 for m in store.iter_metadata() if m.stage_id == "work") == 2

    wait_for(two_items_stored, proc, "two fan-out items to be stored")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    run = list_runs(cache)[-1]
    assert err.strip().splitlines()[-1] == (
        f"Interrupted: completed stages are cached. Resume with: pipe resume {run.run_id}"
    )
    assert "\x1b[" not in out  # a pipe gets plain lines
    assert "cancelled" in out
    assert run.status == "cancelled"
    assert run.stages["work"] == "cancelled"
    with DiskCacheStore(cache) as store:
        done = sorted(m.item_index for m in store.iter_metadata() if m.stage_id == "work")
    assert done == [0, 1]

    (tmp_path / "release").write_text("")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["resume", run.run_id, "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["outputs"]["total"] == 150
    assert data["stages"]["work"]["items_cached"] == 2
    started = [c for c in calls(tmp_path) if c.startswith("start")]
    assert sorted(started) == sorted(["start0", "start1"] + [f"start{i}" for i in range(2, 6)] * 2)
    assert calls(tmp_path).count("items") == 1
