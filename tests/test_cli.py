"""Tests for the ``pipe`` command line, driven through typer's ``CliRunner``."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinklr_pipe._cli import app
from twinklr_pipe._journal import list_runs

PIPELINE_FILE = """
import pathlib

from pydantic import BaseModel

from twinklr_pipe import ExecutionPattern, PipelineDefinition, StageDefinition, stage
from twinklr_pipe import success_result

HERE = pathlib.Path(__file__).parent


def mark(name):
    with open(HERE / "calls.txt", "a") as f:
        f.write(name + "\\n")


@stage(version="1")
def load(x, ctx):
    mark("load")
    return list(range(x)) if isinstance(x, int) else [x]


class Describe(BaseModel):
    prompt: str
    name: str = "describe"

    async def execute(self, items, ctx):
        mark("describe")
        return success_result([f"{self.prompt} {i}" for i in items], stage_name=self.name)


@stage(version="1")
def shout(item, ctx):
    mark("shout")
    return item.upper()


@stage(version="1")
def count(items, ctx):
    mark("count")
    if (HERE / "fail-count").exists():
        raise ValueError("count refused")
    return len(items)


@stage(version="1")
def read_file(x, ctx):
    mark("read_file")
    return x.path.read_text()


def build():
    return PipelineDefinition(
        "cli",
        [
            StageDefinition("load", load),
            StageDefinition("describe", Describe(prompt="PROMPT"), inputs=["load"]),
            StageDefinition(
                "shout", shout, pattern=ExecutionPattern.FAN_OUT, inputs=["describe"]
            ),
            StageDefinition("count", count, inputs=["shout"]),
        ],
    )


FILES = PipelineDefinition("files", [StageDefinition("read_file", read_file)])
"""


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """Each test runs in its own directory; import state and logging are restored after."""
    path, modules = list(sys.path), set(sys.modules)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TWINKLR_PIPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "")):
            del sys.modules[name]
    logger = logging.getLogger("twinklr_pipe")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def spec(tmp_path) -> str:
    (tmp_path / "clipipe.py").write_text(PIPELINE_FILE)
    return "clipipe.py:build"


def pipe(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.txt"
    return path.read_text().split() if path.exists() else []


def one_error_line(result) -> str:
    """The single 'error: ...' line a usage error prints, with no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


class TestBasics:
    def test_version(self):
        """--version prints the version."""
        result = pipe("--version")
        assert result.exit_code == 0
        assert re.fullmatch(r"pipe \(twinklr_pipe\) \d+\.\d+\.\d+\S*\n", result.stdout)

    @pytest.mark.parametrize(
        "command",
        [
            ["run"],
            ["plan"],
            ["graph"],
            ["doctor"],
            ["resume"],
            ["cache", "ls"],
            ["cache", "show"],
            ["cache", "clear"],
            ["cache", "gc"],
            ["cache", "accept"],
            ["runs", "ls"],
            ["runs", "show"],
        ],
    )
    def test_every_command_has_help_with_examples(self, command):
        """Every command has --help with examples and the --cache-dir option where relevant."""
        result = pipe(*command, "--help")
        assert result.exit_code == 0, result.output
        assert "Examples" in result.stdout
        assert "--cache-dir" in result.stdout

    def test_root_help_documents_the_cache_location(self):
        """The top-level help names the cache-dir precedence."""
        result = pipe("--help")
        assert result.exit_code == 0
        assert "TWINKLR_PIPE_CACHE_DIR" in result.stdout
        assert ".twinklr-cache" in result.stdout


class TestRun:
    def test_run_then_rerun_is_all_cached(self, spec, tmp_path):
        """A second run executes nothing; plain output has no control codes."""
        first = pipe("run", spec, "--input", "2")
        assert first.exit_code == 0, first.output
        assert "\x1b[" not in first.stdout
        assert re.search(r"\] done\s+describe", first.stdout)
        assert re.search(r"progress\s+shout\s+2/2 items", first.stdout)
        assert "STAGE" in first.stdout and "SAVED" in first.stdout
        assert calls(tmp_path) == ["load", "describe", "shout", "shout", "count"]
        second = pipe("run", spec, "--input", "2")
        assert second.exit_code == 0
        assert calls(tmp_path) == ["load", "describe", "shout", "shout", "count"]
        assert re.search(r"succeeded in .*: 4 cached; cache hits saved", second.stdout)
        assert (tmp_path / ".twinklr-cache").is_dir()

    def test_json_output(self, spec):
        """--json prints the PipelineResult as JSON."""
        result = pipe("run", spec, "-i", "2", "--json")
        assert result.exit_code == 0
        data = json.loads(result.stdout)
        assert data["success"] is True
        assert data["outputs"]["count"] == 2
        assert data["outputs"]["shout"] == ["PROMPT 0", "PROMPT 1"]
        assert data["executed"] == ["load", "describe", "shout", "count"]
        assert data["stages"]["describe"]["status"] == "succeeded"
        assert data["stages"]["describe"]["cache"] == "miss"
        again = json.loads(pipe("run", spec, "-i", "2", "--json").stdout)
        assert again["cached"] == ["load", "describe", "shout", "count"]
        assert again["run_id"] != data["run_id"]

    def test_failed_pipeline_exits_1(self, spec, tmp_path):
        """A failed stage makes exit code 1 and the summary names its error."""
        (tmp_path / "fail-count").write_text("")
        result = pipe("run", spec, "-i", "1")
        assert result.exit_code == 1
        assert "failed: count: ValueError: count refused" in result.stdout
        assert "warning: Stage 'count' raised ValueError" in result.stderr
        assert "Traceback" not in result.stderr

    def test_verbose_logs_tracebacks(self, spec, tmp_path):
        """--verbose keeps the stage's traceback in the log."""
        (tmp_path / "fail-count").write_text("")
        result = pipe("run", spec, "-i", "1", "--verbose")
        assert result.exit_code == 1
        assert "Traceback" in result.stderr

    def test_force_reruns_a_stage(self, spec, tmp_path):
        """--force re-runs the stage; identical output keeps downstream cached."""
        pipe("run", spec, "-i", "1")
        result = pipe("run", spec, "-i", "1", "--force", "describe", "--json")
        assert json.loads(result.stdout)["executed"] == ["describe"]
        assert calls(tmp_path).count("describe") == 2

    def test_no_cache_stores_nothing(self, spec, tmp_path):
        """--no-cache runs everything and creates no cache directory or journal."""
        assert pipe("run", spec, "-i", "1", "--no-cache").exit_code == 0
        assert pipe("run", spec, "-i", "1", "--no-cache").exit_code == 0
        assert calls(tmp_path).count("load") == 2
        assert not (tmp_path / ".twinklr-cache").exists()

    def test_cache_dir_option_and_environment(self, spec, tmp_path, monkeypatch):
        """--cache-dir wins over TWINKLR_PIPE_CACHE_DIR, which wins over the default."""
        monkeypatch.setenv("TWINKLR_PIPE_CACHE_DIR", str(tmp_path / "from-env"))
        assert pipe("run", spec, "-i", "1").exit_code == 0
        assert (tmp_path / "from-env" / "runs").is_dir()
        assert pipe("run", spec, "-i", "1", "--cache-dir", "explicit").exit_code == 0
        assert (tmp_path / "explicit" / "runs").is_dir()
        assert not (tmp_path / ".twinklr-cache").exists()

    def test_input_path_is_keyed_by_content(self, spec, tmp_path):
        """--input-path passes a FileInput: editing the file is a miss, touching it is not."""
        data = tmp_path / "song.txt"
        data.write_text("la la")
        args = ("run", "clipipe.py:FILES", "--input-path", str(data), "--json")
        assert json.loads(pipe(*args).stdout)["outputs"]["read_file"] == "la la"
        data.write_text("la la la")
        assert json.loads(pipe(*args).stdout)["executed"] == ["read_file"]

    def test_input_that_names_a_file_gets_a_note(self, spec, tmp_path):
        """A raw --input string that is an existing file's name suggests --input-path."""
        (tmp_path / "song.wav").write_text("x")
        result = pipe("run", spec, "--input", "song.wav")
        assert result.exit_code == 0
        assert "use --input-path" in result.stderr


class TestBadInput:
    def test_spec_that_does_not_import(self):
        """A spec whose module does not exist: exit 2, one line."""
        result = pipe("run", "no_such_module_abc:build")
        assert result.exit_code == 2
        assert one_error_line(result) == (
            "error: Spec 'no_such_module_abc:build': no module named 'no_such_module_abc' "
            f"(looked in {Path.cwd()} and the installed packages)"
        )

    def test_spec_naming_a_missing_attribute(self, spec):
        """A missing attribute is named with a suggestion."""
        result = pipe("plan", "clipipe.py:buid")
        assert result.exit_code == 2
        assert "has no 'buid' (did you mean 'build'?)" in one_error_line(result)

    def test_cache_dir_that_is_a_file(self, spec, tmp_path):
        """A cache directory that is a file: exit 2, one line, for run and for cache ls."""
        (tmp_path / "cachefile").write_text("")
        for args in (("run", spec, "-i", "1"), ("cache", "ls")):
            result = pipe(*args, "--cache-dir", "cachefile")
            assert result.exit_code == 2
            assert "is a file, not a directory" in one_error_line(result)

    def test_cache_dir_from_a_newer_format(self, spec, tmp_path):
        """A cache directory written by a newer store format is refused, naming both versions."""
        (tmp_path / "newer").mkdir()
        (tmp_path / "newer" / "FORMAT").write_text('{"format": 99, "library": "twinklr_pipe"}')
        for args in (("run", spec, "-i", "1"), ("cache", "ls"), ("plan", spec)):
            result = pipe(*args, "--cache-dir", "newer")
            assert result.exit_code == 2
            line = one_error_line(result)
            assert "uses store format 99" in line and "reads format 1 or older" in line

    def test_unknown_forced_stage(self, spec):
        """--force of an unknown stage lists the stages."""
        result = pipe("run", spec, "--force", "nope")
        assert result.exit_code == 2
        assert one_error_line(result) == (
            "error: --force nope: no such stage in pipeline 'cli' "
            "(stages: load, describe, shout, count)"
        )

    def test_two_inputs(self, spec, tmp_path):
        """Only one input option at a time."""
        (tmp_path / "in.json").write_text("1")
        result = pipe("run", spec, "--input", "1", "--input-file", "in.json")
        assert result.exit_code == 2
        assert "give one of --input, --input-file and --input-path" in one_error_line(result)

    def test_input_file_with_bad_json(self, spec, tmp_path):
        """--input-file must hold JSON."""
        (tmp_path / "in.json").write_text("{nope")
        result = pipe("run", spec, "--input-file", "in.json")
        assert result.exit_code == 2
        assert "--input-file in.json is not valid JSON" in one_error_line(result)

    def test_invalid_pipeline_definition(self, tmp_path):
        """An invalid definition lists its problems on one line, exit 2."""
        (tmp_path / "badpipe.py").write_text(
            "from twinklr_pipe import PipelineDefinition, StageDefinition, stage\n"
            "@stage\ndef a(x, ctx):\n    return x\n"
            "P = PipelineDefinition('bad', [StageDefinition('a', a, inputs=['zz'])])\n"
        )
        result = pipe("run", "badpipe.py:P")
        assert result.exit_code == 2
        assert "depends on unknown stage 'zz'" in one_error_line(result)


class TestPlanAndGraph:
    def test_plan_names_the_changed_prompt(self, spec, tmp_path):
        """After a prompt edit, plan says describe's config changed: prompt."""
        assert pipe("run", spec, "-i", "2").exit_code == 0
        assert "0 of 4 stages will run" in pipe("plan", spec, "-i", "2").stdout
        source = tmp_path / "clipipe.py"
        source.write_text(source.read_text().replace('prompt="PROMPT"', 'prompt="Describe"'))
        result = pipe("plan", spec, "-i", "2")
        assert result.exit_code == 0
        assert re.search(r"load\s+cached", result.stdout)
        assert re.search(r"describe\s+will run\s+config changed: prompt", result.stdout)
        assert re.search(r"shout\s+unknown\s+unknown until describe runs", result.stdout)
        assert calls(tmp_path).count("describe") == 1  # plan executed nothing

    def test_plan_json_and_input_change(self, spec):
        """plan --json gives each stage's status; a new input explains the miss."""
        pipe("run", spec, "-i", "2")
        data = json.loads(pipe("plan", spec, "-i", "3", "--json").stdout)
        load = data["stages"][0]
        assert load["stage_id"] == "load" and load["status"] == "will run"
        assert load["reason"] == "input changed: <initial input>"

    def test_plan_without_a_cache(self, spec, tmp_path):
        """plan on an empty cache says no entry, and creates no directory."""
        result = pipe("plan", spec, "-i", "1")
        assert re.search(r"load\s+will run\s+no entry", result.stdout)
        assert not (tmp_path / ".twinklr-cache").exists()

    @pytest.mark.parametrize(
        ("fmt", "needle"),
        [
            ("text", "shout <- describe  [fan-out over describe]"),
            ("mermaid", '[["shout<br/>(fan-out over describe)"]]'),
            ("dot", "peripheries=2"),
        ],
    )
    def test_graph(self, spec, fmt, needle):
        """graph prints each format with fan-out marked."""
        result = pipe("graph", spec, "--format", fmt)
        assert result.exit_code == 0
        assert needle in result.stdout

    def test_graph_bad_format(self, spec):
        """An unknown format is a usage error."""
        result = pipe("graph", spec, "--format", "svg")
        assert result.exit_code == 2
        assert "use text, mermaid or dot" in one_error_line(result)


class TestCacheCommands:
    def test_ls_json_sizes_add_up_to_the_footer(self, spec):
        """cache ls --json parses, and its sizes sum to the text footer's total."""
        pipe("run", spec, "-i", "3")
        entries = json.loads(pipe("cache", "ls", "--json").stdout)
        assert {e["stage"] for e in entries} == {"load", "describe", "shout", "count"}
        assert sum(1 for e in entries if e["stage"] == "shout") == 3
        for entry in entries:
            for name in ("key", "pipeline", "version", "size_bytes", "created_at"):
                assert name in entry
            assert entry["run_id"].startswith("r-")
        footer = pipe("cache", "ls").stdout.strip().splitlines()[-1]
        total = sum(e["size_bytes"] for e in entries)
        assert footer.endswith(f"({total} bytes)")
        assert footer.startswith(f"{len(entries)} entries, ")

    def test_ls_filters(self, spec):
        """--stage and --pipeline filter the listing."""
        pipe("run", spec, "-i", "2")
        rows = pipe("cache", "ls", "--stage", "shout", "--sort", "size").stdout.splitlines()
        assert len(rows) == 4 and rows[-1].startswith("2 entries")
        assert "shout[1]" in "\n".join(rows)
        assert (
            pipe("cache", "ls", "--pipeline", "other")
            .stdout.strip()
            .endswith("0 entries, 0 B (0 bytes)")
        )

    def test_clear_stage_removes_exactly_that_stage(self, spec):
        """cache clear --stage deletes only that stage's entries, after confirmation."""
        pipe("run", spec, "-i", "2")
        before = json.loads(pipe("cache", "ls", "--json").stdout)
        declined = pipe("cache", "clear", "--stage", "shout", input="n\n")
        assert declined.exit_code == 1
        assert len(json.loads(pipe("cache", "ls", "--json").stdout)) == len(before)
        result = pipe("cache", "clear", "--stage", "shout", input="y\n")
        assert result.exit_code == 0
        shout = [e for e in before if e["stage"] == "shout"]
        freed = sum(e["size_bytes"] for e in shout)
        assert f"Deleted 2 cache entries ({freed} B, {freed} bytes)." in result.stdout
        after = json.loads(pipe("cache", "ls", "--json").stdout)
        assert sorted(e["key"] for e in after) == sorted(
            e["key"] for e in before if e["stage"] != "shout"
        )

    def test_clear_all_with_yes(self, spec):
        """Without filters and with --yes, every entry goes without a prompt."""
        pipe("run", spec, "-i", "1")
        result = pipe("cache", "clear", "--yes")
        assert result.exit_code == 0 and "Deleted 4 cache entries" in result.stdout
        assert pipe("cache", "clear", "--yes").stdout.strip() == "No matching cache entries."

    def test_show_by_prefix(self, spec):
        """cache show prints metadata and a preview; ambiguous and unknown prefixes exit 2."""
        pipe("run", spec, "-i", "2")
        entries = json.loads(pipe("cache", "ls", "--json").stdout)
        count = next(e for e in entries if e["stage"] == "count")
        result = pipe("cache", "show", count["key"][:10])
        assert result.exit_code == 0
        assert re.search(r"stage_id\s+count", result.stdout)
        assert result.stdout.rstrip().endswith("output preview:\n2")
        unknown = pipe("cache", "show", "zzzz")
        assert unknown.exit_code == 2
        assert "No cache entry with a key starting with 'zzzz'" in one_error_line(unknown)
        ambiguous = pipe("cache", "show", "")
        assert ambiguous.exit_code == 2

    def test_gc_keeps_the_last_runs_entries(self, spec):
        """gc --max-size 0 --keep-runs 1 evicts everything the last run did not use."""
        pipe("run", spec, "-i", "1")
        pipe("run", spec, "-i", "2")
        last = list_runs(".twinklr-cache")[-1]
        dry = pipe("cache", "gc", "--max-size", "0", "--dry-run")
        assert dry.exit_code == 0 and "Would evict" in dry.stdout
        result = pipe("cache", "gc", "--max-size", "0B", "--keep-runs", "1")
        assert result.exit_code == 0, result.output
        left = {e["entry_id"] for e in json.loads(pipe("cache", "ls", "--json").stdout)}
        assert left == set(last.entry_ids)
        assert "kept for the last 1 runs" in result.stdout

    def test_gc_needs_a_limit_and_valid_sizes(self):
        """gc without --max-size/--older-than, or with a bad size, is a usage error."""
        assert "give --max-size" in one_error_line(pipe("cache", "gc"))
        bad = pipe("cache", "gc", "--max-size", "lots")
        assert bad.exit_code == 2
        assert one_error_line(bad).startswith("error: --max-size: invalid size 'lots'")

    def test_accept_after_a_cosmetic_edit(self, tmp_path):
        """cache accept re-keys an unversioned stage so the next run executes nothing."""
        source = tmp_path / "accpipe.py"
        source.write_text(
            "from twinklr_pipe import PipelineDefinition, StageDefinition, stage\n"
            "@stage\ndef grow(x, ctx):\n    value = x + 1\n    return value\n"
            "@stage(version='1')\ndef twice(x, ctx):\n    return x * 2\n"
            "P = PipelineDefinition('acc', [StageDefinition('grow', grow), "
            "StageDefinition('twice', twice, inputs=['grow'])])\n"
        )
        pipe("run", "accpipe.py:P", "-i", "1")
        source.write_text(source.read_text().replace("value", "bigger"))
        planned = pipe("plan", "accpipe.py:P", "-i", "1").stdout
        assert re.search(r"grow\s+will run\s+code changed: src:\w{8} → src:\w{8}", planned)
        result = pipe("cache", "accept", "accpipe.py:P", "grow")
        assert result.exit_code == 0
        assert result.stdout.strip() == "Re-keyed 1 entry of stage 'grow' to its current code."
        rerun = json.loads(pipe("run", "accpipe.py:P", "-i", "1", "--json").stdout)
        assert rerun["executed"] == []
        unknown = pipe("cache", "accept", "accpipe.py:P", "nope")
        assert unknown.exit_code == 2


class TestRunsAndResume:
    def test_runs_ls_and_show(self, spec, tmp_path):
        """runs ls lists runs oldest first; runs show gives each stage's status."""
        pipe("run", spec, "-i", "1")
        (tmp_path / "fail-count").write_text("")
        pipe("run", spec, "-i", "2")
        listed = pipe("runs", "ls")
        assert listed.exit_code == 0
        rows = listed.stdout.strip().splitlines()
        assert rows[0].split()[:3] == ["RUN", "ID", "STATUS"]
        assert [row.split()[1] for row in rows[1:]] == ["succeeded", "failed"]
        data = json.loads(pipe("runs", "ls", "--json").stdout)
        assert data[0]["spec"] == f"{tmp_path / 'clipipe.py'}:build"
        assert data[1]["input"] == {"kind": "json", "value": 2}
        shown = pipe("runs", "show", data[1]["run_id"])
        assert re.search(r"count\s+failed", shown.stdout)
        assert re.search(r"describe\s+succeeded", shown.stdout)
        missing = pipe("runs", "show", "r-nope")
        assert missing.exit_code == 2
        assert "No run 'r-nope' in journal" in one_error_line(missing)

    def test_resume_runs_only_unfinished_stages(self, spec, tmp_path, monkeypatch):
        """A failed run resumed after the fix executes only the failed stage, from any cwd."""
        (tmp_path / "fail-count").write_text("")
        assert pipe("run", spec, "-i", "2").exit_code == 1
        run_id = list_runs(".twinklr-cache")[-1].run_id
        (tmp_path / "fail-count").unlink()
        before = calls(tmp_path)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        result = pipe("resume", run_id, "--cache-dir", str(tmp_path / ".twinklr-cache"), "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["executed"] == ["count"]
        assert calls(tmp_path)[len(before) :] == ["count"]
        runs = list_runs(tmp_path / ".twinklr-cache")
        assert runs[-1].resumed_from == run_id

    def test_resume_does_not_force_finished_stages_again(self, spec, tmp_path):
        """A stage forced in the original run is not forced again once it had finished."""
        (tmp_path / "fail-count").write_text("")
        assert pipe("run", spec, "-i", "3", "--force", "describe").exit_code == 1
        run_id = list_runs(".twinklr-cache")[-1].run_id
        assert list_runs(".twinklr-cache")[-1].force == ["describe"]
        (tmp_path / "fail-count").unlink()
        data = json.loads(pipe("resume", run_id, "--json").stdout)
        assert data["executed"] == ["count"]
        assert calls(tmp_path).count("describe") == 1

    def test_resume_unknown_run(self):
        """resume of an unknown id is one line naming the journal."""
        result = pipe("resume", "r-missing")
        assert result.exit_code == 2
        assert "No run 'r-missing' in journal" in one_error_line(result)


class TestDoctor:
    def test_doctor_reports_and_sets_exit_code(self, spec):
        """doctor lists warnings (exit 0) for a pipeline whose stages are all keyable."""
        result = pipe("doctor", spec, "-i", "1")
        assert result.exit_code == 0, result.output
        assert "warning: stage 'describe': no explicit version" in result.stdout
        assert "4 stages checked: 0 errors, 1 warnings" in result.stdout
        data = json.loads(pipe("doctor", spec, "-i", "1", "--json").stdout)
        assert data["ok"] is True


class TestLiveView:
    def _events(self):
        from twinklr_pipe import (
            FanOutProgress,
            RunStarted,
            StageFinished,
            StageStarted,
            StageStatus,
        )

        return [
            RunStarted("r-1", "p", ("load", "groups", "render")),
            StageStarted("r-1", "load"),
            StageFinished("r-1", "load", StageStatus.CACHED, 1.0, cache="hit", saved_ms=1500.0),
            StageStarted("r-1", "groups"),
            FanOutProgress("r-1", "groups", 3, 12, 1),
        ]

    def test_terminal_view_shows_states_and_fan_out_progress(self):
        """On a terminal each stage has a line; the FAN_OUT line has a bar and counts."""
        import io

        from rich.console import Console

        from twinklr_pipe._live import LiveView

        view = LiveView(["load", "groups", "render"], live=True, file=io.StringIO())
        for event in self._events():
            view.on_event(event)
        out = io.StringIO()
        Console(file=out, force_terminal=True, width=100, color_system=None).print(view)
        text = out.getvalue()
        assert re.search(r"◆ load\s+cached", text)
        assert re.search(r"▶ groups\s+running\s+[\d.]+s\s+━+.* 3/12 \(1 cached\)", text)
        assert re.search(r"· render\s+waiting", text)

    def test_plain_view_prints_lines_without_control_codes(self):
        """Off a terminal each state change is one plain line."""
        import io

        from twinklr_pipe._live import LiveView

        out = io.StringIO()
        view = LiveView(["load", "groups", "render"], live=False, file=out)
        with view:
            for event in self._events():
                view.on_event(event)
        lines = out.getvalue().splitlines()
        assert "\x1b" not in out.getvalue()
        assert re.search(r"cached\s+load\s+0\.00s\s+\(saved 1\.50s\)$", lines[1])
        assert re.search(r"progress\s+groups\s+3/12 items \(1 cached\)$", lines[3])
