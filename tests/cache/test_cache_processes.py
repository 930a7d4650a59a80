"""The cache across processes: new interpreters, hash seeds, SIGKILL, concurrent runs.

Each test writes a pipeline module to ``tmp_path`` and runs it with ``python`` in a
subprocess. Stage bodies append their name to a log file, so executions are counted
across processes; the child prints what its run executed and served from the cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

#: The pipeline module run by every child. ``{helper}`` is the body of ``scale``.
MODULE = '''\
"""A pipeline run in a child process by test_cache_processes."""
import json
import os
import sys
import time
from pathlib import Path

from twinklr_pipe import PipelineDefinition, PipelineExecutor, StageDefinition, stage
from twinklr_pipe.cache import fingerprint

# Settings are read when a stage runs: module constants would be part of its source hash.


def record(name):
    with open(os.environ["PIPE_LOG"], "a") as f:
        f.write(name + "\\n")
    time.sleep(float(os.environ.get("PIPE_DELAY", "0")))


def scale(x):
{helper}


@stage(version="1")
def load(song, context):
    record("load")
    return {{"song": song, "beats": list(range(8))}}


@stage(version="1")
def analyze(track, context):
    record("analyze")
    return {{
        "groups": {{frozenset({{"arch", "tree", str(b)}}) for b in track["beats"]}},
        "colors": {{f"c{{i}}": i * 3 for i in range(40)}},
        "song": track["song"],
    }}


@stage
def plan(analysis, context):
    record("plan")
    marker = os.environ.get("PIPE_MARKER")
    if marker and not Path(marker).exists():
        Path(marker).touch()
        time.sleep(60)  # killed here
    return sorted(scale(len(g)) for g in analysis["groups"])


@stage(version="1")
def render(steps, context):
    record("render")
    return {{"frames": steps, "count": len(steps)}}


pipeline = PipelineDefinition(
    "show",
    [
        StageDefinition("load", load),
        StageDefinition("analyze", analyze, inputs=["load"]),
        StageDefinition("plan", plan, inputs=["analyze"]),
        StageDefinition("render", render, inputs=["plan"]),
    ],
)

if __name__ == "__main__":
    executor = PipelineExecutor(
        os.environ["PIPE_CACHE"], dedupe=os.environ.get("PIPE_DEDUPE") == "1"
    )
    result = executor.run(pipeline, "song.wav")
    value = {{frozenset({{"a", "b", 3}}): [{{"x", "y"}}, (1.5, -0.0)], "k": {{"b": 1, "a": 2}}}}
    json.dump(
        {{
            "success": result.success,
            "executed": sorted(result.executed),
            "cached": sorted(result.cached),
            "keys": {{sid: r.metadata.get("key") for sid, r in result.stage_results.items()}},
            "outputs": {{sid: fingerprint(v) for sid, v in result.outputs.items()}},
            "value": fingerprint(value),
            "errors": {{sid: r.error for sid, r in result.stage_results.items() if r.error}},
        }},
        sys.stdout,
    )
'''

HELPER = "    return x * 2"


class Child:
    """One pipeline module in ``tmp_path``, its cache directory and its execution log."""

    def __init__(self, root: Path, helper: str = HELPER) -> None:
        self.root = root
        self.module = root / "show_pipeline.py"
        self.log = root / "executions.log"
        self.cache = root / "cache"
        self.write(helper)

    def write(self, helper: str) -> None:
        self.module.write_text(MODULE.format(helper=helper))

    def env(self, seed: str = "0", **extra: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONHASHSEED": seed, "PIPE_LOG": str(self.log)}
        env.update(PIPE_CACHE=str(self.cache), **extra)
        return env

    def start(self, seed: str = "0", **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(self.module)],
            env=self.env(seed, **extra),
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, seed: str = "0", **extra: str) -> dict[str, Any]:
        return self.finish(self.start(seed, **extra))

    @staticmethod
    def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        data: dict[str, Any] = json.loads(out)
        assert data["success"], data["errors"]
        return data

    def executions(self) -> list[str]:
        """Stage bodies run since the last call, in order."""
        if not self.log.exists():
            return []
        names = self.log.read_text().split()
        self.log.unlink()
        return names


ALL = ["analyze", "load", "plan", "render"]


def test_new_processes_with_other_hash_seeds_agree_on_everything(tmp_path: Path) -> None:
    """A second interpreter (another PYTHONHASHSEED) runs nothing; a third computes equal keys."""
    child = Child(tmp_path)
    first = child.run(seed="1")
    assert sorted(child.executions()) == ALL and first["executed"] == ALL

    again = child.run(seed="2")
    assert child.executions() == []
    assert again["executed"] == [] and again["cached"] == ALL
    assert again["keys"] == first["keys"] and again["outputs"] == first["outputs"]

    (tmp_path / "elsewhere").mkdir()
    elsewhere = Child(tmp_path / "elsewhere")
    fresh = elsewhere.run(seed="4242")
    assert sorted(elsewhere.executions()) == ALL
    assert fresh["keys"] == first["keys"]
    assert fresh["outputs"] == first["outputs"]
    assert fresh["value"] == first["value"] == again["value"]
    assert all(len(key) == 32 for key in first["keys"].values())


def test_sigkill_in_the_middle_of_a_stage_resumes_with_unfinished_stages(tmp_path: Path) -> None:
    """A run killed inside ``plan`` leaves a usable store; the re-run runs plan and render only."""
    child = Child(tmp_path)
    marker = tmp_path / "plan-started"
    proc = child.start(PIPE_MARKER=str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "plan never started"
        time.sleep(0.02)
    time.sleep(0.1)  # let load's and analyze's stored entries be long committed
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert child.executions() == ["load", "analyze", "plan"]

    resumed = child.run(PIPE_MARKER=str(marker))
    assert child.executions() == ["plan", "render"]
    assert resumed["cached"] == ["analyze", "load"]
    assert resumed["executed"] == ["plan", "render"]
    assert child.run()["executed"] == []


@pytest.mark.parametrize("dedupe", [False, True])
def test_two_processes_at_once_both_succeed_with_identical_outputs(
    tmp_path: Path, dedupe: bool
) -> None:
    """Two concurrent runs on one directory agree; with ``dedupe`` each stage runs once."""
    child = Child(tmp_path)
    extra = {"PIPE_DELAY": "0.3", "PIPE_DEDUPE": "1" if dedupe else "0"}
    procs = [child.start(**extra), child.start(**extra)]
    first, second = (Child.finish(p) for p in procs)
    assert first["outputs"] == second["outputs"]
    assert first["keys"] == second["keys"]
    runs = child.executions()
    if dedupe:
        assert sorted(runs) == ALL
        assert sorted(first["executed"] + second["executed"]) == ALL
    else:
        assert set(runs) == set(ALL) and len(runs) <= 8
    assert child.run()["executed"] == []


def test_source_hash_follows_helpers_and_ignores_formatting(tmp_path: Path) -> None:
    """Editing a helper re-runs its (unversioned) stage in a new process; reformatting does not."""
    child = Child(tmp_path)
    first = child.run()
    child.executions()

    child.write(
        "    # a comment, and the same code formatted differently\n    return (x *\n        2)"
    )
    assert child.run()["executed"] == [] and child.executions() == []

    child.write("    return x * 3")
    edited = child.run()
    assert child.executions() == ["plan", "render"]
    assert edited["cached"] == ["analyze", "load"]
    assert edited["keys"]["plan"] != first["keys"]["plan"]

    child.write(HELPER)
    assert child.run()["executed"] == [] and child.executions() == []
