"""Incremental runs: what re-runs after an edit, counted by the stage bodies themselves.

Like redun's ``test_scheduler_incremental``: stages log their tag when their body runs;
run, edit one thing, run again, and compare the log with what the key rules predict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from helpers import Log, Pick, Step, run
from pydantic import BaseModel, ConfigDict, Field

from twinklr_pipe import (
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    StageResult,
    success_result,
)
from twinklr_pipe._plan import plan_run
from twinklr_pipe.cache import MemoryStore


def song_pipeline(log: Log, **edits: dict[str, Any]) -> PipelineDefinition:
    """load → analyze → plan → render;  analyze → summary (picks "tag") → report;  load → other.

    ``edits`` maps a stage tag to ``Step``/``Pick`` keyword overrides (version, salt, param).
    """

    def step(tag: str) -> Step:
        return Step(tag, log, **edits.get(tag, {}))

    return PipelineDefinition(
        "song",
        [
            StageDefinition("load", step("load")),
            StageDefinition("analyze", step("analyze"), inputs=["load"]),
            StageDefinition("plan", step("plan"), inputs=["analyze"]),
            StageDefinition("render", step("render"), inputs=["plan"]),
            StageDefinition(
                "summary",
                Pick("summary", "tag", log, **edits.get("summary", {})),
                inputs=["analyze"],
            ),
            StageDefinition("report", step("report"), inputs=["summary"]),
            StageDefinition("other", step("other"), inputs=["load"]),
        ],
    )


ALL = {"load", "analyze", "plan", "render", "summary", "report", "other"}


class TestIncrementalRuns:
    async def test_second_run_executes_nothing(self) -> None:
        """A repeated run serves every stage from the cache and runs no body."""
        log, store = Log(), MemoryStore()
        first = await run(song_pipeline(log), "song.wav", store=store)
        assert first.success
        assert sorted(log.take()) == sorted(ALL)
        assert sorted(first.executed) == sorted(ALL) and first.cached == []
        assert {r.metadata["cache"] for r in first.stage_results.values()} == {"miss"}

        second = await run(song_pipeline(log), "song.wav", store=store)
        assert log.take() == []
        assert second.executed == []
        assert sorted(second.cached) == sorted(ALL)
        assert second.outputs == first.outputs
        for sid, result in second.stage_results.items():
            assert result.metadata["cache"] == "hit", sid
            assert result.metadata["status"] == "cached"
            assert result.metadata["key"] == first.stage_results[sid].metadata["key"]
            assert len(result.metadata["key"]) == 32

    async def test_version_bump_reruns_the_stage_and_only_changed_dependants(self) -> None:
        """A bumped stage re-runs; dependants re-run only while their input hash changes."""
        log, store = Log(), MemoryStore()
        await run(song_pipeline(log), "song.wav", store=store)
        log.take()

        bumped = song_pipeline(log, analyze={"version": "2", "salt": 1})
        result = await run(bumped, "song.wav", store=store)
        # summary picks the unchanged "tag" field: its output is the same, so report hits.
        assert log.take_set() == {"analyze", "plan", "render", "summary"}
        assert sorted(result.executed) == ["analyze", "plan", "render", "summary"]
        assert sorted(result.cached) == ["load", "other", "report"]
        assert result.stage_results["summary"].metadata["cache"] == "miss"
        assert result.stage_results["report"].metadata["cache"] == "hit"

        # Reverting the edit finds the old entries: nothing runs.
        reverted = await run(song_pipeline(log), "song.wav", store=store)
        assert log.take() == [] and reverted.executed == []

    async def test_identical_output_after_rerun_is_an_early_cutoff(self) -> None:
        """A version bump that returns the same output re-runs only that stage."""
        log, store = Log(), MemoryStore()
        first = await run(song_pipeline(log), "song.wav", store=store)
        log.take()
        result = await run(song_pipeline(log, analyze={"version": "2"}), "song.wav", store=store)
        assert log.take() == ["analyze"]
        assert result.executed == ["analyze"]
        assert result.outputs == first.outputs
        assert result.stage_results["plan"].metadata["cache"] == "hit"

    async def test_config_change_reruns_that_stage(self) -> None:
        """A changed configuration field (``param``) is a new key for that stage only."""
        log, store = Log(), MemoryStore()
        await run(song_pipeline(log), "song.wav", store=store)
        log.take()
        await run(song_pipeline(log, other={"param": 7}), "song.wav", store=store)
        assert log.take() == ["other"]

    async def test_initial_input_change_reruns_everything_that_sees_it(self) -> None:
        """A new initial input is a miss for every stage whose inputs then change."""
        log, store = Log(), MemoryStore()
        await run(song_pipeline(log), "a.wav", store=store)
        log.take()
        await run(song_pipeline(log), "b.wav", store=store)
        # summary's output ("analyze") does not depend on the song: report hits.
        assert log.take_set() == ALL - {"report"}
        await run(song_pipeline(log), "a.wav", store=store)
        assert log.take() == []

    async def test_stage_id_and_pipeline_name_are_not_in_the_key(self) -> None:
        """Renaming a stage id, or the same stage in another pipeline, reuses the entry."""
        log, store = Log(), MemoryStore()
        await run([StageDefinition("first", Step("s", log))], 1, store=store)
        assert log.take() == ["s"]
        renamed = PipelineDefinition("elsewhere", [StageDefinition("renamed", Step("s", log))])
        result = await run(renamed, 1, store=store)
        assert log.take() == []
        assert result.cached == ["renamed"]

    async def test_execution_options_are_not_in_the_key(self) -> None:
        """Retries, timeouts and fan-out limits can be tuned without busting the cache."""
        log, store = Log(), MemoryStore()
        await run([StageDefinition("s", Step("s", log))], 1, store=store)
        log.take()
        from twinklr_pipe import RetryConfig

        tuned = StageDefinition(
            "s", Step("s", log), retry_config=RetryConfig(max_attempts=3), timeout_ms=5000
        )
        result = await run([tuned], 1, store=store)
        assert log.take() == [] and result.cached == ["s"]


class Planner(BaseModel):
    """An LLM-planner-like pydantic stage: its fields are its configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str = "planner"
    version: str = "1"
    prompt: str = "Plan a light show for {song}."
    model: str = "offline-1"
    temperature: float = 0.2
    #: Not configuration: a client (here, the call log) is excluded from the key.
    calls: Log = Field(default_factory=Log, exclude=True)

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        self.calls.add(self.name)
        context.increment_metric("tokens", 120)
        # The temperature does not change this offline model's answer.
        return success_result(self.prompt.format(song=input), stage_name=self.name)


class TestPromptEdits:
    def pipeline(self, log: Log, **fields: Any) -> PipelineDefinition:
        return PipelineDefinition(
            "show",
            [
                StageDefinition("planner", Planner(calls=log, **fields)),
                StageDefinition("export", Step("export", log), inputs=["planner"]),
            ],
        )

    async def test_prompt_change_reruns_the_planner_and_its_changed_dependant(self) -> None:
        """Editing the prompt re-runs the planner; its new output re-runs the export."""
        log, store = Log(), MemoryStore()
        await run(self.pipeline(log), "song", store=store)
        assert log.take() == ["planner", "export"]
        await run(self.pipeline(log, prompt="Plan a calm show for {song}."), "song", store=store)
        assert log.take() == ["planner", "export"]
        await run(self.pipeline(log), "song", store=store)
        assert log.take() == []

    async def test_setting_that_keeps_the_output_is_an_early_cutoff(self) -> None:
        """A new temperature re-runs the planner only: the same plan hits downstream."""
        log, store = Log(), MemoryStore()
        await run(self.pipeline(log), "song", store=store)
        log.take()
        result = await run(self.pipeline(log, temperature=0.9), "song", store=store)
        assert log.take() == ["planner"]
        assert result.cached == ["export"]

    async def test_excluded_field_is_not_configuration(self) -> None:
        """A ``Field(exclude=True)`` field (the client) never changes the key."""
        log, store = Log(), MemoryStore()
        await run(self.pipeline(log), "song", store=store)
        log.take()
        other_log = Log()
        result = await run(self.pipeline(other_log), "song", store=store)
        assert other_log.take() == [] and log.take() == []
        assert sorted(result.cached) == ["export", "planner"]


@dataclasses.dataclass(eq=False)
class Unhashable:
    """A dataclass stage whose configuration holds a value that cannot be fingerprinted."""

    client: Any
    name: str = "unhashable"
    version: str = "1"

    async def execute(self, input: Any, context: PipelineContext) -> StageResult[Any]:
        return success_result(input, stage_name=self.name)


class TestPlan:
    """``plan_run`` says what a run would do, and why, without running anything."""

    async def populated(self) -> tuple[Log, MemoryStore]:
        log, store = Log(), MemoryStore()
        await run(song_pipeline(log), "song.wav", store=store)
        log.take()
        return log, store

    async def test_everything_cached(self) -> None:
        """After a run, every stage is planned as cached with the key the run used."""
        log, store = await self.populated()
        plan = plan_run(song_pipeline(log), "song.wav", cache=store)
        assert plan.will_run == []
        assert {p.status for p in plan.stages} == {"cached"}
        assert log.take() == []

    async def test_reasons_for_each_kind_of_change(self) -> None:
        """Version, config field, input, force and unknown-until-upstream are each named."""
        log, store = await self.populated()
        edited = song_pipeline(log, analyze={"version": "2"}, other={"param": 3})
        plan = plan_run(edited, "song.wav", cache=store, force=["load"])
        assert log.take() == []
        assert plan.get("load").status == "will run"
        assert plan.get("load").reason == "forced"
        # load is forced: what depends on it is unknown until it runs.
        assert plan.get("analyze").status == "unknown"
        assert plan.get("analyze").reason == "unknown until load runs"

        plan = plan_run(edited, "song.wav", cache=store)
        assert plan.get("load").status == "cached"
        assert plan.get("analyze").reason == "version changed: 1 → 2"
        assert plan.get("other").reason == "config changed: param"
        assert plan.get("plan").reason == "unknown until analyze runs"
        assert plan.get("summary").status == "unknown"
        assert plan.get("report").reason == "unknown until summary runs"
        assert sorted(plan.will_run) == ["analyze", "other", "plan", "render", "report", "summary"]

        plan = plan_run(song_pipeline(log), "other.wav", cache=store)
        assert plan.get("load").reason == "input changed: <initial input>"
        assert plan.get("load").status == "will run"

    async def test_plan_agrees_with_the_run(self) -> None:
        """Stages planned as cached are exactly the stages the run then serves from cache."""
        log, store = await self.populated()
        edited = song_pipeline(log, other={"param": 3}, report={"version": "9"})
        plan = plan_run(edited, "song.wav", cache=store)
        result = await run(edited, "song.wav", store=store)
        assert sorted(plan.will_run) == sorted(result.executed) == ["other", "report"]
        assert plan.get("report").reason == "version changed: 1 → 9"

    async def test_unfingerprintable_configuration_is_planned_as_an_error(self) -> None:
        """A stage whose configuration cannot be hashed will run, and the reason says why."""
        store = MemoryStore()
        p = PipelineDefinition("p", [StageDefinition("u", Unhashable(client=object()))])
        plan = plan_run(p, 1, cache=store)
        assert plan.get("u").status == "will run"
        assert "configuration field 'client'" in plan.get("u").reason


@pytest.mark.parametrize("use_force", [False, True])
async def test_executor_without_store_hashes_nothing(use_force: bool) -> None:
    """``PipelineExecutor()`` caches nothing: an unhashable input is fine, cache is "off"."""
    log = Log()
    p = PipelineDefinition("p", [StageDefinition("s", Step("s", log))])
    force = ["s"] if use_force else []
    for _ in range(2):
        result = await PipelineExecutor().execute(p, object(), force=force)
        assert result.success and result.executed == ["s"]
        assert result.stage_results["s"].metadata["cache"] == "off"
        assert "cache" not in result.metadata
    assert log.take() == ["s", "s"]
