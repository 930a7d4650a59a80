"""Remote stage bodies on a real Dask ``LocalCluster`` (2 worker processes on 127.0.0.1).

One cluster serves the whole module; the test that kills a worker runs last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("distributed")

from distributed import Client, LocalCluster
from typer.testing import CliRunner

from twinklr_pipe import (
    ExecutionPattern,
    PipelineContext,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    stage,
)
from twinklr_pipe._cli import app
from twinklr_pipe._dask import DaskRunner, RemoteSendError
from twinklr_pipe.cache import MemoryStore

FAN_OUT = ExecutionPattern.FAN_OUT
CONDITIONAL = ExecutionPattern.CONDITIONAL


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        host="127.0.0.1",
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
    ) as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    """A synchronous client, to look at the cluster from the test."""
    with Client(cluster, set_as_default=False) as sync_client:
        yield sync_client


# -- stages (module level: workers import them by reference) ----------------------------------


@stage(version="1")
def numbers(count: int, context: PipelineContext) -> list[int]:
    return list(range(count))


@stage(version="1")
def crunch(n: int, context: PipelineContext) -> int:
    """Pure-Python CPU work, a few milliseconds per item."""
    total = 0
    for i in range(20_000):
        total = (total * 31 + i * n) % 1_000_003
    return total


@stage(version="1")
def analyse(song: str, context: PipelineContext) -> dict[str, Any]:
    """Reads state set upstream, writes state and metrics for downstream stages."""
    scale = context.state["scale"]
    context.state["tempo"] = 120 * scale
    context.set_state("key", "A minor")
    del context.state["scratch"]
    context.increment_metric("tokens", 5)
    context.increment_metric("tokens", 7)
    context.add_metric("model", "tiny")
    return {"song": song, "pid": os.getpid()}


@stage(version="1")
def prepare(song: str, context: PipelineContext) -> str:
    context.state["scale"] = 2
    context.state["scratch"] = "temporary"
    return song


@stage(version="1")
def fast_section(analysis: dict[str, Any], context: PipelineContext) -> str:
    return f"fast at {context.state['tempo']} in {context.state['key']}"


@stage
def make_lock(value: Any, context: PipelineContext) -> Any:
    return threading.Lock()


@stage
def two_seconds(value: Any, context: PipelineContext) -> float:
    return 2.0


@stage
def sleepy(seconds: float, context: PipelineContext) -> float:
    time.sleep(seconds)
    return seconds


@stage(version="1")
def slow_square(n: int, context: PipelineContext) -> int:
    """Marks its start with a file named after the worker's pid, then works for a while."""
    marker = Path(context.state["marker_dir"]) / f"{os.getpid()}-{n}"
    marker.touch()
    time.sleep(0.4)
    return n * n


def _definition(remote: bool, *, pools: tuple[str, ...] = ()) -> PipelineDefinition:
    return PipelineDefinition(
        "crunch",
        [
            StageDefinition("numbers", numbers),
            StageDefinition(
                "crunch",
                crunch,
                pattern=FAN_OUT,
                inputs=["numbers"],
                remote=remote,
                max_concurrent_fan_out=8,
                pools=pools,
            ),
        ],
    )


# -- tests ---------------------------------------------------------------------------------------


class TestRemoteFanOut:
    async def test_forty_items_give_the_same_outputs_as_a_local_run(
        self, cluster: LocalCluster
    ) -> None:
        """A FAN_OUT of 40 CPU-bound items on 2 worker processes equals the in-process run."""
        local = await PipelineExecutor().execute(_definition(remote=False), 40)
        runner = DaskRunner(cluster.scheduler_address)
        remote = await PipelineExecutor(runner=runner, pools={"cpu": 4}).execute(
            _definition(remote=True, pools=("cpu",)), 40
        )

        assert remote.success, remote.stage_results["crunch"].error
        assert remote.outputs == local.outputs
        assert runner.submitted == 40
        assert "pool_wait_ms" in remote.stage_results["crunch"].metadata

    async def test_a_cached_rerun_submits_nothing(self, client: Client) -> None:
        """The executor looks keys up before submitting: a second run reaches no worker."""
        runner = DaskRunner(client)  # a synchronous client: the runner opens its own
        executor = PipelineExecutor(cache=MemoryStore(), runner=runner)

        first = await executor.execute(_definition(remote=True), 12)
        assert first.success and runner.submitted == 12
        second = await executor.execute(_definition(remote=True), 12)

        assert second.success
        assert runner.submitted == 12
        assert second.cached == ["numbers", "crunch"]
        assert second.outputs == first.outputs


class TestRemoteContext:
    async def test_state_writes_and_metrics_come_back_and_replay_from_the_cache(
        self, cluster: LocalCluster
    ) -> None:
        """Remote writes reach a local CONDITIONAL stage, and replay on a cache hit."""
        runner = DaskRunner(cluster.scheduler_address)
        executor = PipelineExecutor(cache=MemoryStore(), runner=runner)
        definition = PipelineDefinition(
            "song",
            [
                StageDefinition("prepare", prepare),
                StageDefinition("analyse", analyse, inputs=["prepare"], remote=True),
                StageDefinition(
                    "fast",
                    fast_section,
                    pattern=CONDITIONAL,
                    inputs=["analyse"],
                    condition=lambda context: context.state.get("tempo", 0) > 200,
                ),
            ],
        )
        outcomes = []
        for _ in range(2):
            context = PipelineContext()
            result = await executor.execute(definition, "song.wav", context)
            assert result.success, result.failed_stages
            outcomes.append((result, context))

        (first, ctx1), (second, ctx2) = outcomes
        assert first.outputs["analyse"]["pid"] != os.getpid()  # it really ran elsewhere
        assert first.outputs["fast"] == "fast at 240 in A minor"
        assert ctx1.state == {"scale": 2, "tempo": 240, "key": "A minor"}
        assert ctx1.metrics == {"tokens": 12, "model": "tiny"}
        assert second.cached == ["prepare", "analyse", "fast"]
        assert ctx2.state == ctx1.state
        assert runner.submitted == 1

    async def test_a_changed_remote_state_read_is_a_miss(self, cluster: LocalCluster) -> None:
        """The remote body's state reads are recorded: a different value re-runs it."""
        runner = DaskRunner(cluster.scheduler_address)
        executor = PipelineExecutor(cache=MemoryStore(), runner=runner)
        definition = PipelineDefinition("read", [StageDefinition("analyse", analyse, remote=True)])
        for scale in (1, 1, 3):
            context = PipelineContext(state={"scale": scale, "scratch": 0})
            result = await executor.execute(definition, "a.wav", context)
            assert result.success
            assert context.state["tempo"] == 120 * scale
        assert runner.submitted == 2

    async def test_services_stay_behind(self, cluster: LocalCluster) -> None:
        """A remote body sees no services and unpicklable state is not sent."""

        runner = DaskRunner(cluster.scheduler_address)
        context = PipelineContext(provider=object(), state={"lock": threading.Lock(), "n": 4})
        result = await PipelineExecutor(runner=runner).execute(
            PipelineDefinition("svc", [StageDefinition("look", _look, remote=True)]),
            None,
            context,
        )

        assert result.success, result.stage_results["look"].error
        assert result.outputs["look"] == {"state": ["n"], "provider": "no service 'provider'"}


@stage
def _look(value: Any, context: PipelineContext) -> dict[str, Any]:
    try:
        context.provider  # noqa: B018
    except AttributeError as exc:
        missing = "no service 'provider'" if "no service 'provider'" in str(exc) else str(exc)
    return {"state": sorted(context.state), "provider": missing}


class TestClientsAndErrors:
    async def test_an_asynchronous_client_is_used_and_left_open(
        self, cluster: LocalCluster
    ) -> None:
        """A caller's asynchronous client on this loop is used as is; a large input travels."""
        async with Client(
            cluster.scheduler_address, asynchronous=True, set_as_default=False
        ) as own:
            runner = DaskRunner(own)
            blob = bytes(range(256)) * 8192  # 2 MB: scattered, not embedded in the task
            result = await PipelineExecutor(runner=runner).execute(
                PipelineDefinition("big", [StageDefinition("size", measure, remote=True)]),
                blob,
            )
            assert result.success, result.stage_results["size"].error
            assert result.outputs["size"] == len(blob)
            assert result.stage_results["size"].metadata["worker"].startswith("tcp://127.0.0.1")
            assert own.status == "running"

    async def test_a_raising_body_fails_as_it_would_locally(self, cluster: LocalCluster) -> None:
        """The worker's exception becomes the usual "Type: message" failure."""
        runner = DaskRunner(cluster.scheduler_address)
        result = await PipelineExecutor(runner=runner).execute(
            PipelineDefinition("boom", [StageDefinition("explode", explode, remote=True)]), 7
        )
        assert result.stage_results["explode"].error == "ValueError: cannot render group 7"
        assert runner.submitted == 1


@stage
def measure(data: bytes, context: PipelineContext) -> int:
    return len(data)


@stage
def explode(group: int, context: PipelineContext) -> None:
    raise ValueError(f"cannot render group {group}")


class TestSendErrors:
    async def test_an_unpicklable_input_fails_clearly_before_submitting(
        self, cluster: LocalCluster
    ) -> None:
        """The error names the stage and the value's type; the cluster sees nothing."""
        runner = DaskRunner(cluster.scheduler_address)
        definition = PipelineDefinition(
            "bad",
            [
                StageDefinition("make_lock", make_lock),
                StageDefinition("use", crunch, inputs=["make_lock"], remote=True),
            ],
        )
        result = await PipelineExecutor(runner=runner).execute(definition)

        assert not result.success
        error = result.stage_results["use"].error or ""
        assert error.startswith(
            "RemoteSendError: Stage 'use' cannot run remotely: its input of type _thread.lock "
            "cannot be pickled for the Dask cluster"
        )
        assert runner.submitted == 0

    def test_the_error_points_into_containers(self) -> None:
        """Inside a dict or list, the message names the path to the offending item."""
        from twinklr_pipe._dask import _dumps

        value = {"groups": [1, 2, (x for x in [3])]}
        with pytest.raises(RemoteSendError) as caught:
            _dumps(value, "render", "input")
        assert caught.value.where == "input['groups'][2]"
        assert caught.value.value_type.__name__ == "generator"
        assert "Stage 'render' cannot run remotely" in str(caught.value)


class TestCancellation:
    async def test_a_timed_out_remote_task_is_cancelled_on_the_cluster(
        self, cluster: LocalCluster, client: Client
    ) -> None:
        """``timeout_ms`` fails the stage at once and the scheduler forgets the task."""
        runner = DaskRunner(cluster.scheduler_address)
        definition = PipelineDefinition(
            "slow",
            [
                StageDefinition("warm", two_seconds, remote=True),  # connects the client
                StageDefinition("sleepy", sleepy, inputs=["warm"], remote=True, timeout_ms=300),
            ],
        )
        result = await PipelineExecutor(runner=runner).execute(definition)

        assert not result.success
        sleepy_result = result.stage_results["sleepy"]
        assert sleepy_result.error == "Stage 'sleepy' timed out after 300 ms"
        assert sleepy_result.metadata["duration_ms"] < 1500  # the body sleeps for 2 s
        assert runner.submitted == 2
        assert runner._fallback is None  # the executor gave the run a session
        with anyio.fail_after(5):
            while _scheduler_keys(client, "sleepy-"):
                await anyio.sleep(0.05)


def _scheduler_keys(client: Client, prefix: str) -> list[str]:
    def keys(dask_scheduler: Any) -> list[str]:
        return [str(k) for k in dask_scheduler.tasks]

    return [k for k in client.run_on_scheduler(keys) if k.startswith(prefix)]


# -- the command line -------------------------------------------------------------------------

cli_pipeline = _definition(remote=True)


class TestCommandLine:
    def test_dask_address_runs_remote_stages_on_the_cluster(
        self, cluster: LocalCluster, client: Client
    ) -> None:
        """``pipe run SPEC --dask tcp://...`` sends the remote stage's items to the cluster."""
        before = _task_count(client)
        args = ["run", "test_dask:cli_pipeline", "--input", "6", "--no-cache", "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1  # without --dask the remote stage has no runner
        result = CliRunner().invoke(app, [*args, "--dask", cluster.scheduler_address])

        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["outputs"]["crunch"] == [crunch.fn(n, PipelineContext()) for n in range(6)]
        assert _task_count(client) >= before + 6

    def test_a_bad_local_count_is_a_usage_error(self) -> None:
        """``--dask local:N`` needs a positive number of workers."""
        result = CliRunner().invoke(
            app, ["run", "test_dask:cli_pipeline", "--no-cache", "--dask", "local:two"]
        )
        assert result.exit_code == 2
        assert "error: --dask: Dask target 'local:two': write local:N" in result.stderr

    def test_without_distributed_the_error_says_what_to_install(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The core install has no distributed: ``--dask`` says ``pip install ...[dask]``."""
        monkeypatch.setitem(sys.modules, "distributed", None)
        result = CliRunner().invoke(
            app, ["run", "test_dask:cli_pipeline", "--no-cache", "--dask", "local:2"]
        )
        assert result.exit_code == 2
        assert "pip install 'twinklr_pipe[dask]'" in result.stderr
        with pytest.raises(ImportError, match=r"twinklr_pipe\[dask\]"):
            DaskRunner("local:2")

    def test_the_core_does_not_import_distributed(self) -> None:
        """Importing the package, the CLI and the runner module leaves distributed unloaded."""
        code = (
            "import sys, twinklr_pipe, twinklr_pipe._cli, twinklr_pipe._dask; "
            "print('distributed' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "False"


def _task_count(client: Client) -> int:
    """Tasks the scheduler has ever run in this cluster (its task-prefix counters)."""

    def count(dask_scheduler: Any) -> int:
        prefix = dask_scheduler.task_prefixes.get("crunch")
        return 0 if prefix is None else sum(prefix.state_counts.values())

    return int(client.run_on_scheduler(count))


class TestWorkerDeath:
    async def test_killing_a_worker_mid_run_still_completes(
        self, cluster: LocalCluster, client: Client, tmp_path: Path
    ) -> None:
        """SIGKILL a worker while it runs an item: Dask reschedules it and the run completes."""
        client.wait_for_workers(2, timeout=30)
        worker_pids = set(client.run(os.getpid).values())
        runner = DaskRunner(cluster.scheduler_address)
        definition = PipelineDefinition(
            "kill",
            [
                StageDefinition(
                    "square",
                    slow_square,
                    pattern=FAN_OUT,
                    remote=True,
                )
            ],
        )
        context = PipelineContext(state={"marker_dir": str(tmp_path)})
        killed: list[int] = []

        async def kill_one() -> None:
            while not killed:
                for marker in tmp_path.iterdir():
                    pid = int(marker.name.split("-")[0])
                    if pid in worker_pids:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
                await anyio.sleep(0.02)

        with anyio.fail_after(45):
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_one)
                result = await PipelineExecutor(runner=runner).execute(
                    definition, [1, 2, 3, 4], context
                )

        assert killed
        assert result.success, result.stage_results["square"].error
        assert result.outputs["square"] == [1, 4, 9, 16]
        assert runner.submitted == 4  # the scheduler rescheduled the lost item by itself
