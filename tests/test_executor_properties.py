"""Property: random DAGs run by the executor match a sequential reference evaluation.

Every generated stage outputs a deterministic function of its input, so however the
executor interleaves them (async stages yield a random number of times, sync ones
run in worker threads), its outputs must equal a plain loop over the stages in
topological order. The DAGs mix SEQUENTIAL, PARALLEL, FAN_OUT (with random limits
and ``fan_out_over``) and CONDITIONAL stages whose conditions read state written by
their inputs, and some stages fail, under ``fail_fast=False``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    stage,
)

SEQUENTIAL = ExecutionPattern.SEQUENTIAL
PARALLEL = ExecutionPattern.PARALLEL
FAN_OUT = ExecutionPattern.FAN_OUT
CONDITIONAL = ExecutionPattern.CONDITIONAL
MODULUS = 1_000_003


def flatten(value: Any) -> list[int]:
    """Every int in a value built from None, ints, lists, tuples and dicts, in order."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list | tuple):
        return [x for v in value for x in flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in flatten(v)]
    raise TypeError(type(value).__name__)


def mix(values: list[int], salt: int) -> int:
    h = salt
    for v in values:
        h = (h * 31 + v + 1) % MODULUS
    return h


@dataclasses.dataclass(frozen=True)
class Spec:
    """One generated stage."""

    index: int
    inputs: tuple[str, ...]
    pattern: ExecutionPattern
    flag: bool  # a CONDITIONAL stage's own verdict
    fan_out_over: str | None
    limit: int | None
    sync: bool
    yields: int
    fails: bool
    critical: bool

    @property
    def id(self) -> str:
        return f"s{self.index}"


def sequential_output(spec: Spec, value: Any) -> list[int]:
    values = flatten(value)
    return [mix(values, spec.index), len(values)]


def item_output(spec: Spec, value: Any) -> int:
    return mix(flatten(value), 1000 + spec.index)


def ran_key(stage_id: str) -> str:
    return f"ran:{stage_id}"


def make_body(spec: Spec) -> Any:
    """The stage body: writes ``ran:<id>`` to state, then computes its output."""

    def compute(value: Any, context: PipelineContext) -> Any:
        context.set_state(ran_key(spec.id), True)
        if spec.fails:
            raise RuntimeError(f"{spec.id} fails")
        if spec.pattern is FAN_OUT:
            return item_output(spec, value)
        return sequential_output(spec, value)

    if spec.sync:

        @stage(name=spec.id)
        def sync_body(value: Any, context: PipelineContext) -> Any:
            return compute(value, context)

        return sync_body

    @stage(name=spec.id)
    async def async_body(value: Any, context: PipelineContext) -> Any:
        for _ in range(spec.yields):
            await anyio.lowlevel.checkpoint()
        return compute(value, context)

    return async_body


def make_condition(spec: Spec) -> Any:
    def condition(context: PipelineContext) -> bool:
        return spec.flag and all(context.get_state(ran_key(d)) for d in spec.inputs)

    return condition


def definition_of(spec: Spec) -> StageDefinition:
    return StageDefinition(
        spec.id,
        make_body(spec),
        pattern=spec.pattern,
        inputs=list(spec.inputs),
        condition=make_condition(spec) if spec.pattern is CONDITIONAL else None,
        fan_out_over=spec.fan_out_over,
        max_concurrent_fan_out=spec.limit,
        critical=spec.critical,
    )


@st.composite
def dags(draw: st.DrawFn) -> list[Spec]:
    """Stages s0..sN-1, each taking inputs only from earlier ones (so always a DAG)."""
    specs: list[Spec] = []
    for index in range(draw(st.integers(1, 8))):
        earlier = [s.id for s in specs]
        inputs: list[str] = []
        if earlier:
            inputs = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3))
        pattern = draw(st.sampled_from([SEQUENTIAL, PARALLEL, FAN_OUT, CONDITIONAL]))
        fan_out_over = None
        if pattern is FAN_OUT:
            # The fanned input must be a list: never a CONDITIONAL's (maybe None) output.
            listy = [d for d in inputs if specs[int(d[1:])].pattern is not CONDITIONAL]
            if inputs and not listy:
                pattern = SEQUENTIAL
            elif len(inputs) > 1 or (inputs and draw(st.booleans())):
                fan_out_over = draw(st.sampled_from(listy))
        fails = pattern is not FAN_OUT and draw(st.integers(0, 9)) == 0
        specs.append(
            Spec(
                index=index,
                inputs=tuple(inputs),
                pattern=pattern,
                flag=draw(st.booleans()),
                fan_out_over=fan_out_over,
                limit=draw(st.sampled_from([None, 1, 2, 4])),
                sync=draw(st.integers(0, 4)) == 0,
                yields=draw(st.integers(0, 3)),
                fails=fails,
                critical=not fails or draw(st.booleans()),
            )
        )
    return specs


@dataclasses.dataclass
class Expected:
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    executed: set[str] = dataclasses.field(default_factory=set)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> reason
    failed: set[str] = dataclasses.field(default_factory=set)
    upstream_failed: dict[str, str] = dataclasses.field(default_factory=dict)


def reference(specs: list[Spec], initial: list[int]) -> Expected:
    """Evaluate the stages one by one in index (= topological) order."""
    exp = Expected()
    for spec in specs:
        sid = spec.id
        blocked = None
        for dep in spec.inputs:
            if dep in exp.failed:
                blocked = dep
                break
            if dep in exp.upstream_failed:
                blocked = exp.upstream_failed[dep]
                break
        if blocked is not None:
            exp.outputs[sid] = None
            exp.skipped[sid] = f"upstream failed: {blocked}"
            exp.upstream_failed[sid] = blocked
            continue
        if spec.pattern is CONDITIONAL and not (
            spec.flag and all(d in exp.executed for d in spec.inputs)
        ):
            exp.outputs[sid] = None
            exp.skipped[sid] = "condition is false"
            continue
        if not spec.inputs:
            value: Any = initial
        elif len(spec.inputs) == 1:
            value = exp.outputs[spec.inputs[0]]
        else:
            value = {d: exp.outputs[d] for d in spec.inputs}
        if spec.pattern is FAN_OUT:
            fanned = spec.fan_out_over or (spec.inputs[0] if spec.inputs else None)
            if len(spec.inputs) <= 1:
                exp.outputs[sid] = [item_output(spec, item) for item in value]
            else:
                assert fanned is not None
                exp.outputs[sid] = [
                    item_output(spec, {**value, fanned: item}) for item in value[fanned]
                ]
            if exp.outputs[sid]:
                exp.executed.add(sid)
            continue
        exp.executed.add(sid)
        if spec.fails:
            exp.outputs[sid] = None
            exp.failed.add(sid)
        else:
            exp.outputs[sid] = sequential_output(spec, value)
    return exp


class TestRandomDags:
    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        specs=dags(),
        initial=st.lists(st.integers(0, 50), max_size=4),
        order=st.randoms(use_true_random=False),
    )
    def test_outputs_match_a_sequential_reference(
        self, specs: list[Spec], initial: list[int], order: Any
    ) -> None:
        """Outputs, executed, skipped (with reasons) and failures match the reference."""
        definitions = [definition_of(s) for s in specs]
        order.shuffle(definitions)
        pipeline = PipelineDefinition("random", definitions, fail_fast=False)
        assert pipeline.validate_pipeline() == []

        result = PipelineExecutor().run(pipeline, initial)
        exp = reference(specs, initial)

        assert result.outputs == exp.outputs
        assert set(result.executed) == exp.executed
        assert set(result.failed_stages) == exp.failed
        assert {sid: result.stage_results[sid].metadata["reason"] for sid in result.skipped} == (
            exp.skipped
        )
        assert result.cancelled == []
        critical_failure = any(s.id in exp.failed and s.critical for s in specs)
        assert result.success is not critical_failure
        assert len(result.stage_results) == len(specs)
