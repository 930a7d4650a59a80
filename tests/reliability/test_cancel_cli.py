"""Cancellation: Ctrl-C (SIGINT) to a real ``pipe run`` during a FAN_OUT leaves every
finished item cached, exits 130 and prints how to resume; ``pipe resume`` then runs
only the unfinished items.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reliability.pipelines import MARKS_ENV, QUICK_ITEMS, SIGINT_ITEMS, SLOW_ENV, TALLY
from twinklr_pipe._cli import app
from twinklr_pipe.cache import DiskCacheStore
from twinklr_pipe.cache._codec import decode

SPEC = f"{Path(__file__).with_name('pipelines.py')}:sigint_pipeline"


def _wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _render_entries(cache: Path) -> dict[int, object]:
    if not (cache / "FORMAT").exists():
        return {}
    with DiskCacheStore(cache) as store:
        found = {}
        for meta in store.iter_metadata():
            if meta.stage_id == "render":
                got = store.get(meta.entry_id)
                assert got is not None
                assert meta.item_index is not None
                found[meta.item_index] = decode(got[0].codec, got[1])
        return found


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_ctrl_c_during_fan_out_keeps_finished_items_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT mid FAN_OUT: exit 130 and the hint; finished items cached; resume runs the rest."""
    cache, marks = tmp_path / "cache", tmp_path / "marks"
    env = {**os.environ, SLOW_ENV: "1", MARKS_ENV: str(marks), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "twinklr_pipe", "run", SPEC, "--input", str(SIGINT_ITEMS)]
    proc = subprocess.Popen(
        [*command, "--cache-dir", str(cache)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The quick items finish; the slow ones then hold every slot until cancelled.
        _wait_for(lambda: len(_lines(marks)) >= QUICK_ITEMS, "the quick items")
        _wait_for(lambda: len(_render_entries(cache)) >= QUICK_ITEMS, "their entries")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    TALLY.add("cancel: SIGINT to pipe run during a FAN_OUT")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    hint = re.search(
        r"Interrupted: completed stages are cached\. Resume with: pipe resume (\S+)", stderr
    )
    assert hint, stderr
    run_id = hint.group(1)

    finished = sorted(int(i) for i in _lines(marks))
    assert finished == list(range(QUICK_ITEMS))
    stored = _render_entries(cache)
    assert sorted(stored) == finished, "a finished item was not cached"
    for i, value in stored.items():
        assert TALLY.check_outputs(value, {"item": i, "frame": i * i})

    # Resume without the slow items: exactly the unfinished ones run.
    resumed_marks = tmp_path / "marks-resume"
    monkeypatch.setenv(SLOW_ENV, "0")
    monkeypatch.setenv(MARKS_ENV, str(resumed_marks))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the spec's directory
    try:
        result = CliRunner().invoke(
            app, ["resume", run_id, "--json", "--cache-dir", str(cache)], catch_exceptions=False
        )
    finally:
        sys.modules.pop("pipelines", None)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["success"]
    assert data["stages"]["frames"]["cache"] == "hit"
    assert data["stages"]["render"]["items_cached"] == QUICK_ITEMS
    assert sorted(int(i) for i in _lines(resumed_marks)) == list(range(QUICK_ITEMS, SIGINT_ITEMS))
    expected = [{"item": i, "frame": i * i} for i in range(SIGINT_ITEMS)]
    assert TALLY.check_outputs(data["outputs"]["render"], expected)
