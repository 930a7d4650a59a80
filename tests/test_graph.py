"""Pure graph logic: validation messages, cycles, order, and linear-time validation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    RetryConfig,
    StageDefinition,
    StageResult,
    success_result,
)
from twinklr_pipe._graph import dependants, downstream, find_cycle, topological_order


class Echo:
    """A minimal PipelineStage."""

    name = "echo"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        return success_result(input, stage_name=self.name)


ECHO = Echo()


def sd(stage_id: str, *inputs: str, **kwargs: Any) -> StageDefinition:
    return StageDefinition(stage_id, ECHO, inputs=list(inputs), **kwargs)


def problems(*stages: StageDefinition) -> list[str]:
    return PipelineDefinition("p", list(stages)).validate_pipeline()


def chain(length: int) -> PipelineDefinition:
    stages = [sd("s0")] + [sd(f"s{i}", f"s{i - 1}") for i in range(1, length)]
    return PipelineDefinition("chain", stages)


class TestValidate:
    def test_valid_pipeline_has_no_problems(self) -> None:
        """A well-formed diamond validates clean."""
        assert problems(sd("a"), sd("b", "a"), sd("c", "a"), sd("d", "b", "c")) == []

    def test_every_problem_is_reported_in_the_documented_order(self) -> None:
        """Duplicates, unknown inputs, cycles, no entry point, FAN_OUT, limits: in that order."""
        found = problems(
            sd("t", "a", timeout_ms=0),
            sd("f", "a", pattern=ExecutionPattern.FAN_OUT, fan_out_over="zz"),
            sd("a", "b"),
            sd("b", "a"),
            sd("a", "b"),
            sd("c", "x"),
        )
        assert found == [
            "Duplicate stage IDs: a",
            "Stage 'c' depends on unknown stage 'x'",
            "Circular dependency detected: a -> b -> a",
            "No entry point: every stage has inputs, so nothing can start; "
            "give at least one stage inputs=[]",
            "Stage 'f' fans out over 'zz', which is not one of its inputs ['a']",
            "Stage 't': timeout_ms must be positive, got 0",
        ]

    def test_kinds_stay_grouped_across_stages(self) -> None:
        """Problems of one kind are listed together, even when they come from several stages."""
        fan = ExecutionPattern.FAN_OUT
        found = problems(
            sd("root"),
            sd("c1", "root", pattern=ExecutionPattern.CONDITIONAL),
            sd("f1", "root", pattern=fan, fan_out_over="nope"),
            sd("l1", "root", max_concurrent_fan_out=0),
            sd("f2", "root", "c1", pattern=fan),
        )
        assert [p.split(" ", 2)[1] for p in found] == ["'f1'", "'f2'", "'l1':", "'c1'"]

    def test_all_duplicate_ids_are_named_once(self) -> None:
        """Each duplicated id is listed once, in order of first repetition."""
        assert problems(sd("a"), sd("b"), sd("b"), sd("a"), sd("a")) == [
            "Duplicate stage IDs: b, a"
        ]

    def test_unknown_input_suggests_a_close_name(self) -> None:
        """A typo in an input names the stage it probably meant."""
        assert problems(sd("load_audio"), sd("beats", "load_audo")) == [
            "Stage 'beats' depends on unknown stage 'load_audo' (did you mean 'load_audio'?)"
        ]

    def test_cycle_is_reported_with_its_path(self) -> None:
        """A cycle names every stage on it, in data-flow order."""
        found = problems(sd("entry"), sd("a", "c"), sd("b", "a"), sd("c", "b"))
        assert found == ["Circular dependency detected: a -> b -> c -> a"]

    def test_self_loop_is_a_cycle(self) -> None:
        """A stage that takes its own output is a one-stage cycle."""
        assert problems(sd("entry"), sd("a", "a")) == ["Circular dependency detected: a -> a"]

    def test_no_entry_point_is_reported(self) -> None:
        """With every stage taking inputs nothing can start."""
        found = problems(sd("a", "b"), sd("b", "a"))
        assert found[-1].startswith("No entry point")

    def test_fan_out_with_several_inputs_needs_fan_out_over(self) -> None:
        """Several inputs without fan_out_over is ambiguous, so it is an error."""
        found = problems(sd("a"), sd("b"), sd("f", "a", "b", pattern=ExecutionPattern.FAN_OUT))
        assert found == [
            "Stage 'f' is FAN_OUT with several inputs ['a', 'b']; "
            "set fan_out_over to the input to fan out over"
        ]

    def test_fan_out_over_one_of_its_inputs_is_valid(self) -> None:
        """fan_out_over naming one of several inputs validates."""
        fan = sd("f", "a", "b", pattern=ExecutionPattern.FAN_OUT, fan_out_over="b")
        assert problems(sd("a"), sd("b"), fan) == []

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"timeout_ms": -5}, "Stage 's': timeout_ms must be positive, got -5"),
            (
                {"max_concurrent_fan_out": 0},
                "Stage 's': max_concurrent_fan_out must be at least 1 (or None for unbounded), "
                "got 0",
            ),
            (
                {"retry_config": RetryConfig(max_attempts=0)},
                "Stage 's': retry_config.max_attempts must be at least 1, got 0",
            ),
            (
                {"retry_config": RetryConfig(initial_delay_ms=-1)},
                "Stage 's': retry delays must be non-negative and backoff_multiplier positive",
            ),
            (
                {"retry_config": RetryConfig(jitter=1.5)},
                "Stage 's': retry jitter must be between 0 and 1",
            ),
        ],
    )
    def test_non_positive_limits_are_reported(self, kwargs: dict[str, Any], message: str) -> None:
        """Limits that can never be met are named with the value given."""
        assert problems(sd("s", **kwargs)) == [message]

    def test_unbounded_fan_out_is_valid(self) -> None:
        """``max_concurrent_fan_out=None`` means unbounded, not an error."""
        assert (
            problems(sd("s", pattern=ExecutionPattern.FAN_OUT, max_concurrent_fan_out=None)) == []
        )

    def test_conditional_without_condition_is_reported(self) -> None:
        """A CONDITIONAL stage needs a condition."""
        assert problems(sd("s", pattern=ExecutionPattern.CONDITIONAL)) == [
            "Stage 's' is CONDITIONAL but has no condition; pass condition=..."
        ]

    def test_stage_without_execute_is_reported(self) -> None:
        """A stage object without ``execute`` is named with its type."""
        found = problems(StageDefinition("s", 42))
        assert found == [
            "Stage 's': int object has no execute() method; "
            "pass a PipelineStage (an object with name and execute) or use @stage"
        ]

    def test_empty_pipeline_is_reported(self) -> None:
        """A pipeline without stages cannot run."""
        assert problems() == ["Pipeline 'p' has no stages; add at least one StageDefinition"]

    def test_inputs_given_as_a_string_is_a_type_error(self) -> None:
        """``inputs="a"`` would iterate characters, so it is refused at once."""
        with pytest.raises(TypeError, match=r"write inputs=\['a'\]"):
            StageDefinition("b", ECHO, inputs="a")


class TestPipelineDefinition:
    def test_get_stage_returns_the_definition(self) -> None:
        """get_stage finds a stage by id."""
        b = sd("b", "a")
        assert PipelineDefinition("p", [sd("a"), b]).get_stage("b") is b

    def test_get_stage_names_the_missing_id(self) -> None:
        """An unknown id raises KeyError naming it and the known ids."""
        with pytest.raises(KeyError, match=r"No stage 'zz' in pipeline 'p' \(stages: a\)"):
            PipelineDefinition("p", [sd("a")]).get_stage("zz")

    def test_entry_points_are_the_stages_without_inputs(self) -> None:
        """get_entry_points lists the stages that receive the initial input."""
        pdef = PipelineDefinition("p", [sd("a"), sd("b", "a"), sd("c")])
        assert [s.id for s in pdef.get_entry_points()] == ["a", "c"]


class TestGraphHelpers:
    def test_topological_order_puts_inputs_first_and_is_stable(self) -> None:
        """Every stage follows its inputs; ties keep definition order."""
        edges = {"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": [], "e": []}
        assert topological_order(edges) == ["a", "e", "b", "c", "d"]

    def test_duplicate_inputs_count_once(self) -> None:
        """A stage listing an input twice still becomes ready."""
        assert topological_order({"a": [], "b": ["a", "a"]}) == ["a", "b"]

    def test_dependants_inverts_edges(self) -> None:
        """dependants maps each stage to the stages that take it as input."""
        assert dependants({"a": [], "b": ["a"], "c": ["a", "b"]}) == {
            "a": ["b", "c"],
            "b": ["c"],
            "c": [],
        }

    def test_downstream_includes_roots_and_transitive_users(self) -> None:
        """downstream follows dependants transitively."""
        edges = {"a": [], "b": ["a"], "c": ["b"], "x": []}
        assert downstream(edges, ["a"]) == {"a", "b", "c"}

    def test_find_cycle_is_none_for_a_dag(self) -> None:
        """A DAG has no cycle."""
        assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


class TestScale:
    def test_a_10000_stage_chain_validates_quickly(self) -> None:
        """10,000 stages validate well within a second (the target is 100 ms)."""
        pdef = chain(10_000)
        t0 = time.perf_counter()
        assert pdef.validate_pipeline() == []
        assert time.perf_counter() - t0 < 1.0

    def test_validation_is_linear_in_stages(self) -> None:
        """4x the stages costs about 4x the time (16x would mean quadratic)."""

        def best(pdef: PipelineDefinition) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                pdef.validate_pipeline()
                times.append(time.perf_counter() - t0)
            return min(times)

        small, large = best(chain(10_000)), best(chain(40_000))
        assert large < 10 * small

    def test_a_deep_cycle_is_found_without_recursion(self) -> None:
        """A 20,000-stage cycle is found iteratively (no RecursionError)."""
        n = 20_000
        edges = {f"s{i}": [f"s{(i - 1) % n}"] for i in range(n)}
        cycle = find_cycle(edges)
        assert cycle is not None and len(cycle) == n + 1 and cycle[0] == cycle[-1]

    def test_a_typo_shared_by_many_stages_stays_fast(self) -> None:
        """Thousands of stages naming one missing input validate in well under a second."""
        stages = [sd("load_audio")] + [sd(f"s{i}", "load_audo") for i in range(5_000)]
        t0 = time.perf_counter()
        found = PipelineDefinition("p", stages).validate_pipeline()
        assert time.perf_counter() - t0 < 1.0
        assert len(found) == 5_000
        assert all(p.endswith("(did you mean 'load_audio'?)") for p in found)
