"""Property: what executes after any sequence of edits is what the key rules predict.

Random DAGs of 4-8 stages run against a ``MemoryStore``; after each random edit
(version bump, output-preserving version bump, configuration change, new initial
input) the set of stage bodies that ran is compared with a reference model: a stage
executes iff its ``(identity, version, config, input output-hashes)`` tuple was never
seen before, and otherwise its earlier output propagates.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from helpers import Log
from hypothesis import given, settings
from hypothesis import strategies as st

from twinklr_pipe import (
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    StageResult,
    success_result,
)
from twinklr_pipe.cache import MemoryStore


def _output(tag: str, salt: int, param: int, inputs: list[Any]) -> str:
    """What a node returns: a short digest of everything its output depends on."""
    return hashlib.sha256(repr((tag, salt, param, inputs)).encode()).hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class Node:
    """A stage whose output depends on its config (``tag``, ``param``), ``salt`` and inputs.

    ``salt`` stands for the code: only a version bump changes it (an output-preserving
    bump leaves it), and it is not configuration.
    """

    tag: str
    param: int
    inputs: tuple[str, ...] = dataclasses.field(metadata={"cache": False})
    version: str = "1"
    salt: int = dataclasses.field(default=0, metadata={"cache": False})
    log: Log = dataclasses.field(default_factory=Log, metadata={"cache": False})

    @property
    def name(self) -> str:
        return self.tag

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        self.log.add(self.tag)
        if not self.inputs:
            values = [input]
        elif len(self.inputs) == 1:
            values = [input]
        else:
            values = [input[dep] for dep in self.inputs]
        return success_result(_output(self.tag, self.salt, self.param, values), stage_name=self.tag)


@dataclasses.dataclass
class Spec:
    """The model's view of one stage."""

    inputs: tuple[str, ...]
    version: int = 1
    salt: int = 0
    param: int = 0


class Model:
    """The reference: key tuples seen so far, and the output stored for each."""

    def __init__(self, specs: dict[str, Spec]) -> None:
        self.specs = specs
        self.seen: dict[tuple[Any, ...], str] = {}

    def step(self, initial: int) -> set[str]:
        """Which stages execute for ``initial``, given everything run before."""
        outputs: dict[str, str] = {}
        executed: set[str] = set()
        for sid, spec in self.specs.items():  # declared in dependency order
            values = [outputs[d] for d in spec.inputs] if spec.inputs else [initial]
            key = ("Node", spec.version, sid, spec.param, tuple(spec.inputs), tuple(values))
            if key not in self.seen:
                executed.add(sid)
                self.seen[key] = _output(sid, spec.salt, spec.param, values)
            outputs[sid] = self.seen[key]
        return executed


def _pipeline(specs: dict[str, Spec], log: Log) -> PipelineDefinition:
    return PipelineDefinition(
        "prop",
        [
            StageDefinition(
                sid,
                Node(sid, s.param, s.inputs, version=str(s.version), salt=s.salt, log=log),
                inputs=list(s.inputs),
            )
            for sid, s in specs.items()
        ],
    )


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Spec]:
    """4-8 stages; each takes a random subset (possibly empty) of the earlier ones."""
    count = draw(st.integers(4, 8))
    specs: dict[str, Spec] = {}
    for i in range(count):
        earlier = list(specs)
        chosen = (
            draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        )
        specs[f"n{i}"] = Spec(inputs=tuple(chosen))
    return specs


EDITS = st.one_of(
    st.tuples(st.just("bump"), st.integers(0, 7)),
    st.tuples(st.just("bump-same-output"), st.integers(0, 7)),
    st.tuples(st.just("config"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("input"), st.integers(0, 2)),
)


@settings(max_examples=30, deadline=None)
@given(specs=dags(), edits=st.lists(EDITS, min_size=1, max_size=6))
def test_executions_match_the_key_rules(specs: dict[str, Spec], edits: list[Any]) -> None:
    """After every edit, exactly the stages whose key tuple is new execute."""
    store, log, model = MemoryStore(), Log(), Model(specs)
    executor = PipelineExecutor(cache=store)
    ids = list(specs)
    initial = 0

    def run_and_compare(note: str) -> None:
        expected = model.step(initial)
        result = executor.run(_pipeline(specs, log), initial)
        ran = log.take()
        assert result.success, result.stage_results
        assert len(ran) == len(set(ran)), f"a body ran twice: {ran}"
        assert set(ran) == expected, f"after {note}: ran {sorted(ran)}, expected {sorted(expected)}"
        assert set(result.executed) == expected
        assert set(result.cached) == set(ids) - expected

    run_and_compare("the first run")
    for edit in edits:
        kind = edit[0]
        if kind == "input":
            initial = edit[1]
        else:
            spec = specs[ids[edit[1] % len(ids)]]
            if kind == "bump":
                spec.version += 1
                spec.salt += 1
            elif kind == "bump-same-output":
                spec.version += 1
            else:
                spec.param = edit[2]
        run_and_compare(repr(edit))
