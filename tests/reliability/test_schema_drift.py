"""Schema drift: a cached pydantic output whose model changed between runs is a miss
(recomputed with a warning), never a crash and never a wrong object.

The model lives in a module written to a temporary directory; each run is a new
process that imports it afresh. The stage keeps an explicit ``version``, so its key is
unchanged by the edit and only the stored entry itself can notice the drift.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from reliability.pipelines import TALLY, Zygote

MODULE = """\
from pydantic import BaseModel

from twinklr_pipe import PipelineDefinition, StageDefinition, stage


class Out(BaseModel):
{fields}


@stage(version="1")
def make(input, context):
    return Out({values})


pipeline = PipelineDefinition("drift", [StageDefinition("make", make)])
"""

V1 = ("    a: int", "a=1")
#: name -> (fields, constructor arguments, the warning's reason, the new output) of the
#: edited model.
DRIFTS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "gained a required field": (
        "    a: int\n    b: str",
        "a=1, b='new'",
        "no longer validates",
        {"a": 1, "b": "new"},
    ),
    "changed a field's type (int to str)": (
        "    a: str",
        "a='one'",
        "no longer validates",
        {"a": "one"},
    ),
    "changed a field's type (int to float)": (
        "    a: float",
        "a=1.5",
        "decodes to a different value",
        {"a": 1.5},
    ),
    "gained a field with a default": (
        "    a: int\n    b: str = 'default'",
        "a=1",
        "decodes to a different value",
        {"a": 1, "b": "default"},
    ),
    "renamed a field": ("    alpha: int", "alpha=1", "no longer validates", {"alpha": 1}),
}


def _write(workdir: Path, fields: str, values: str) -> None:
    shutil.rmtree(workdir / "__pycache__", ignore_errors=True)
    (workdir / "driftmod.py").write_text(MODULE.format(fields=fields, values=values))


def _run(zygote: Zygote, workdir: Path, n: int) -> dict[str, Any]:
    report = workdir / f"report{n}.json"
    job = {"workdir": str(workdir), "cache_dir": str(workdir / "cache"), "report": str(report)}
    assert zygote.run("drift_run", **job) == 0
    result: dict[str, Any] = json.loads(report.read_text())
    return result


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_changed_model_is_a_miss_not_a_wrong_object(
    drift: str, zygote: Zygote, tmp_path: Path
) -> None:
    """After the model changes, the stale entry is refused and the stage runs again."""
    _write(tmp_path, *V1)
    first = _run(zygote, tmp_path, 1)
    assert first["success"] and first["executed"] == ["make"]
    assert first["output"] == {"a": 1}

    fields, values, reason, expected = DRIFTS[drift]
    _write(tmp_path, fields, values)
    second = _run(zygote, tmp_path, 2)
    TALLY.add("schema drift: model changes tried")
    assert second["success"], second["error"]
    assert second["executed"] == ["make"], "a stale entry was served"
    assert second["type"] == "driftmod.Out"
    assert TALLY.check_outputs(second["output"], expected)
    (warning,) = second["warnings"]
    assert "of stage 'make'" in warning and reason in warning and "recomputing" in warning

    third = _run(zygote, tmp_path, 3)  # the recomputed entry is served from now on
    assert third["cached"] == ["make"] and third["warnings"] == []
    assert TALLY.check_outputs(third["output"], expected)
