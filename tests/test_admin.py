"""Tests for the library functions behind ``pipe``: cache admin, graph, JSON views, doctor."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from twinklr_pipe import (
    ExecutionPattern,
    PipelineDefinition,
    PipelineExecutor,
    StageDefinition,
    stage,
)
from twinklr_pipe._admin import (
    accept_stage,
    clear_entries,
    doctor,
    entry_to_dict,
    find_entry,
    format_bytes,
    format_entries,
    gc_entries,
    graph_text,
    jsonable,
    list_entries,
    open_store,
    parse_duration,
    parse_size,
    preview_entry,
    result_to_dict,
)
from twinklr_pipe._journal import InputSpec
from twinklr_pipe._loader import load_pipeline
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import MemoryStore
from twinklr_pipe.errors import CacheError, DefinitionError, SpecError, StoreError

NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _restore_import_state(tmp_path):
    """Spec files add folders to sys.path and modules to sys.modules; undo it after each test."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "")):
            del sys.modules[name]


def put(store, key, *, stage="s", pipeline="p", size=10, created=NOW, used=None, **extra):
    meta = EntryMeta(
        key=key,
        stage_id=stage,
        pipeline=pipeline,
        created_at=created,
        last_used_at=used if used is not None else created,
        codec="json/1",
        **extra,
    )
    store.put(meta, b"1" * size)
    return store.get_meta(meta.entry_id)


@pytest.fixture
def store():
    s = MemoryStore()
    put(s, "aa11", stage="load", size=100, created=NOW - 300, used=NOW - 300)
    put(s, "aa22", stage="load", size=200, created=NOW - 200, used=NOW - 10)
    put(s, "bb33", stage="plan", pipeline="other", size=50, created=NOW - 100, used=NOW - 100)
    return s


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [("123", 123), ("10B", 10), ("2KB", 2048), ("1.5MB", 1572864), ("2GB", 2 * 1024**3)],
    )
    def test_sizes(self, text, expected):
        """Sizes take B, KB, MB, GB (binary units)."""
        assert parse_size(text) == expected

    @pytest.mark.parametrize(
        ("text", "expected"), [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800)]
    )
    def test_durations(self, text, expected):
        """Durations take s, m, h, d, w."""
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("text", ["", "GB", "-1MB", "2XB"])
    def test_bad_size(self, text):
        """A bad size names the accepted units."""
        with pytest.raises(ValueError, match="use a number and B, KB, MB, GB"):
            parse_size(text)

    def test_bad_duration(self):
        """A duration without unit is refused with an example."""
        with pytest.raises(ValueError, match=r"invalid duration '7'.*\(7d"):
            parse_duration("7")

    def test_format_bytes(self):
        """Sizes print in binary units."""
        assert [format_bytes(n) for n in (0, 1023, 1024, 1536 * 1024)] == [
            "0 B",
            "1023 B",
            "1.0 KB",
            "1.5 MB",
        ]


class TestListing:
    def test_filters_and_sorts(self, store):
        """Entries filter by stage and pipeline and sort ascending by created/used/size."""
        assert [m.key for m in list_entries(store)] == ["aa11", "aa22", "bb33"]
        assert [m.key for m in list_entries(store, sort="used")] == ["aa11", "bb33", "aa22"]
        assert [m.key for m in list_entries(store, sort="size")] == ["bb33", "aa11", "aa22"]
        assert [m.key for m in list_entries(store, stage="load")] == ["aa11", "aa22"]
        assert [m.key for m in list_entries(store, pipeline="other")] == ["bb33"]
        with pytest.raises(ValueError, match="invalid sort"):
            list_entries(store, sort="age")

    def test_table_footer_adds_up(self, store):
        """The footer counts the entries and sums their sizes."""
        text = format_entries(list_entries(store))
        assert text.splitlines()[0].split()[:3] == ["KEY", "PIPELINE", "STAGE"]
        assert text.splitlines()[-1] == "3 entries, 350 B (350 bytes)"

    def test_json_view_has_the_documented_fields(self, store):
        """Each entry's JSON has key, pipeline, stage, version, size_bytes, times and run_id."""
        data = entry_to_dict(list_entries(store)[0])
        for name in ("key", "pipeline", "stage", "version", "size_bytes", "run_id"):
            assert name in data
        assert data["created_at"].endswith("Z")
        json.dumps(data)

    def test_fast_disk_listing_matches_the_store(self, tmp_path):
        """The summary listing gives the same rows as iter_metadata, big records too."""
        from twinklr_pipe._admin import EntryRow, entry_rows
        from twinklr_pipe.cache._store import DiskCacheStore

        with DiskCacheStore(tmp_path / "c") as disk:
            put(disk, "k1", stage="a")
            put(disk, "k2", stage="fan", item_index=3, variant="v9")
            put(disk, "k3", stage="big", state_writes={"blob": {"value": "x" * 100_000}})
            put(disk, "k4", stage='we"ird', pipeline="naïve", version="src:" + "a" * 32)
            disk.touch(["k2.v9"], NOW + 5)
            expected = sorted(EntryRow.of(m) for m in disk.iter_metadata())
            assert sorted(entry_rows(disk)) == expected
            assert len(expected) == 4

    def test_a_store_without_iter_summaries_lists_from_metadata(self, store):
        """A user store implementing only the CacheStore protocol still lists, clears, gcs."""

        class Plain:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                if name == "iter_summaries":
                    raise AttributeError(name)
                return getattr(self.inner, name)

        plain = Plain(store)
        assert list_entries(plain) == list_entries(store)
        assert [m.key for m in gc_entries(plain, max_size=250, dry_run=True).evicted] == ["aa11"]
        assert clear_entries(plain, stage="load") == (2, 300)

    def test_table_layout(self, monkeypatch):
        """The table pins its layout: variant and item suffixes, hash versions cut to 12,
        sizes right-aligned, never-set times as "-", and ties sorted by key."""
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        try:
            s = MemoryStore()
            put(s, "a" * 32, stage="load", version="1", created=NOW, used=NOW + 120)
            put(
                s,
                "b" * 32,
                variant="9f8e7d6c",
                pipeline="sequencer",
                stage="groups",
                item_index=12,
                version="src:" + "e" * 32,
                version_is_source_hash=True,
                created=NOW + 60,
            )
            put(
                s,
                "c" * 32,
                stage="render",
                version="2",
                size=1536,
                created=NOW + 60,
                used=NOW + 3600,
            )
            put(s, "d" * 32, stage="x", size=3 * 1024 * 1024, created=0.0)
            text = format_entries(list_entries(s, sort="used"))
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
        # Each row in two halves, to keep the lines short.
        assert text.splitlines() == [
            "KEY                PIPELINE   STAGE       VERSION         SIZE  "
            "CREATED           LAST USED",
            "dddddddddddd       p          x                         3.0 MB  -                 -",
            "bbbbbbbbbbbb.9f8e  sequencer  groups[12]  src:eeeeeeee    10 B  "
            "2023-11-14 22:14  2023-11-14 22:14",
            "aaaaaaaaaaaa       p          load        1               10 B  "
            "2023-11-14 22:13  2023-11-14 22:15",
            "cccccccccccc       p          render      2             1.5 KB  "
            "2023-11-14 22:14  2023-11-14 23:13",
            "4 entries, 3.0 MB (3147284 bytes)",
        ]

    @pytest.mark.parametrize("kind", ["memory", "disk"])
    def test_the_command_table_is_format_entries_of_list_entries(self, tmp_path, kind):
        """``entries_text`` (what ``pipe cache ls`` prints, built from columns) equals
        ``format_entries(list_entries(...))`` for every sort and filter, ties included,
        and ``list_entries`` sorts by the field, then key, then variant."""
        from twinklr_pipe._admin import entries_text
        from twinklr_pipe.cache._store import DiskCacheStore

        s = MemoryStore() if kind == "memory" else DiskCacheStore(tmp_path / "c")
        for i, key in enumerate(["k3", "k1", "k2", "k1", "k0", "k9"]):
            put(
                s,
                key,
                variant=["0", "0", "0", "v2", "0", "0"][i],
                stage=["load", "fan", "load", "fan", "load", "fan"][i],
                pipeline=["p", "p", "q", "p", "q", "p"][i],
                item_index=[None, 3, None, 4, None, None][i],
                size=[10, 2048, 10, 10, 5000, 10][i],
                created=[NOW, NOW, NOW - 5, NOW, NOW + 9, 0.0][i],  # ties on created
                used=[NOW + 1, NOW + 1, NOW, NOW + 2, NOW + 9, 0.0][i],  # and on used
            )
        s.touch(["k2.0", "k0.0"], NOW + 50)
        fields = {"created": "created_at", "used": "last_used_at", "size": "size_bytes"}
        for sort, field in fields.items():
            for stage_id in (None, "load", "fan", "none"):
                for pipeline in (None, "p", "q"):
                    rows = list_entries(s, stage=stage_id, pipeline=pipeline, sort=sort)
                    assert rows == sorted(rows, key=lambda r: (getattr(r, field), r.key, r.variant))
                    assert entries_text(s, stage=stage_id, pipeline=pipeline, sort=sort) == (
                        format_entries(rows)
                    )
        assert len(list_entries(s)) == 6
        assert (
            entries_text(None)
            == format_entries([])
            == "\n".join(
                [
                    "KEY  PIPELINE  STAGE  VERSION  SIZE  CREATED  LAST USED",
                    "0 entries, 0 B (0 bytes)",
                ]
            )
        )
        with pytest.raises(ValueError, match="invalid sort"):
            entries_text(s, sort="age")
        s.close()

    def test_missing_cache_dir_is_an_empty_cache(self, tmp_path):
        """Read-only commands do not create a cache directory."""
        assert open_store(tmp_path / "nope", create=False) is None
        assert not (tmp_path / "nope").exists()
        assert list_entries(None) == []

    def test_cache_dir_that_is_a_file(self, tmp_path):
        """A cache directory that is a file is a one-line StoreError naming it."""
        path = tmp_path / "cache"
        path.write_text("x")
        with pytest.raises(StoreError, match=r"cache is a file, not a directory"):
            open_store(path)


class TestFind:
    def test_unique_prefix(self, store):
        """A unique prefix finds its entry."""
        assert find_entry(store, "bb").key == "bb33"

    def test_exact_entry_id(self, store):
        """A full entry id (key.variant) is found directly."""
        assert find_entry(store, "aa11.0").key == "aa11"

    def test_ambiguous_prefix(self, store):
        """An ambiguous prefix lists the matches."""
        with pytest.raises(CacheError, match=r"'aa' is ambiguous: 2 entries match \(aa11\.0"):
            find_entry(store, "aa")

    def test_unknown_prefix(self, store):
        """An unknown prefix says so."""
        with pytest.raises(CacheError, match="No cache entry with a key starting with 'zz'"):
            find_entry(store, "zz")

    def test_preview_does_not_load_pickles(self):
        """A pickle payload is described, never unpickled."""
        s = MemoryStore()
        meta = EntryMeta(key="k", codec="pickle/1")
        s.put(meta, b"\x80\x05not really a pickle")
        assert "not loaded" in preview_entry(s, s.get_meta("k.0"))


class TestClearAndGc:
    def test_clear_by_stage_removes_exactly_that_stage(self, store):
        """clear --stage deletes that stage's entries and reports count and bytes."""
        assert clear_entries(store, stage="load") == (2, 300)
        assert [m.stage_id for m in store.iter_metadata()] == ["plan"]

    def test_clear_older_than_uses_last_use(self, store, monkeypatch):
        """--older-than selects entries not used for that long."""
        monkeypatch.setattr("time.time", lambda: NOW)
        assert clear_entries(store, older_than=150) == (1, 100)

    def test_gc_evicts_least_recently_used_first(self, store):
        """gc evicts by last use until the store fits."""
        report = gc_entries(store, max_size=250, now=NOW)
        assert [m.key for m in report.evicted] == ["aa11"]
        assert report.remaining_bytes == 250
        assert {m.key for m in store.iter_metadata()} == {"aa22", "bb33"}

    def test_gc_never_evicts_protected_entries(self, store):
        """Entries used by recent runs stay, even over budget."""
        report = gc_entries(store, max_size=0, protect={"aa11.0"}, now=NOW)
        assert {m.key for m in report.evicted} == {"aa22", "bb33"}
        assert report.protected == 1 and report.over_budget

    def test_gc_older_than_and_dry_run(self, store):
        """--older-than evicts idle entries; a dry run deletes nothing."""
        report = gc_entries(store, older_than=50, dry_run=True, now=NOW)
        assert [m.key for m in report.evicted] == ["aa11", "bb33"]
        assert len(list(store.iter_metadata())) == 3


PIPE_FILE = """
from pydantic import BaseModel
from twinklr_pipe import PipelineDefinition, StageDefinition, stage, success_result

@stage
def source(x, ctx):
    value = x * 2
    return value

class Tune(BaseModel):
    factor: int = 3
    name: str = "tune"

    async def execute(self, x, ctx):
        scaled = x * self.factor
        return success_result(scaled, stage_name=self.name)

@stage(version="1")
def after(x, ctx):
    return x + 1

PIPELINE = PipelineDefinition(
    "acc",
    [
        StageDefinition("source", source),
        StageDefinition("tune", Tune(factor=FACTOR), inputs=["source"]),
        StageDefinition("after", after, inputs=["tune"]),
    ],
)
"""


def write_pipe(path: Path, factor: int = 3, local: str = "value", scaled: str = "scaled") -> str:
    body = PIPE_FILE.replace("FACTOR", str(factor)).replace("value", local)
    path.write_text(body.replace("scaled", scaled))
    return f"{path}:PIPELINE"


class TestAccept:
    def test_cosmetic_edit_is_accepted_and_downstream_stays_cached(self, tmp_path):
        """After a rename of a local, accept re-keys the stage and nothing re-runs."""
        store = MemoryStore()
        spec = write_pipe(tmp_path / "accmod.py")
        pipeline, _ = load_pipeline(spec)
        assert PipelineExecutor(cache=store).run(pipeline, 5).success
        write_pipe(tmp_path / "accmod.py", local="doubled")
        pipeline, _ = load_pipeline(spec)
        assert accept_stage(store, pipeline, "source") == 1
        result = PipelineExecutor(cache=store).run(pipeline, 5)
        assert result.executed == []
        assert result.outputs["after"] == 31

    def test_changed_configuration_is_not_accepted(self, tmp_path):
        """Entries whose configuration differs from the current one are left alone."""
        store = MemoryStore()
        spec = write_pipe(tmp_path / "accmod2.py")
        pipeline, _ = load_pipeline(spec)
        PipelineExecutor(cache=store).run(pipeline, 5)
        write_pipe(tmp_path / "accmod2.py", factor=4, scaled="bigger")
        pipeline, _ = load_pipeline(spec)
        assert accept_stage(store, pipeline, "tune") == 0

    def test_explicit_version_and_unknown_stage(self, tmp_path):
        """A versioned stage has nothing to accept; an unknown stage id is named."""
        pipeline, _ = load_pipeline(write_pipe(tmp_path / "accmod3.py"))
        with pytest.raises(CacheError, match="explicit version '1'"):
            accept_stage(MemoryStore(), pipeline, "after")
        with pytest.raises(SpecError, match="No stage 'nope' in pipeline 'acc'"):
            accept_stage(MemoryStore(), pipeline, "nope")


@stage
def _noop(x, ctx):
    return x


GRAPH = PipelineDefinition(
    "g",
    [
        StageDefinition("audio", _noop),
        StageDefinition("groups", _noop, pattern=ExecutionPattern.FAN_OUT, inputs=["audio"]),
        StageDefinition(
            "lyrics",
            _noop,
            pattern=ExecutionPattern.CONDITIONAL,
            inputs=["audio"],
            condition=lambda ctx: True,
        ),
        StageDefinition("render", _noop, inputs=["groups", "lyrics"]),
    ],
)


class TestGraph:
    def test_text_marks_fan_out_and_conditional(self):
        """Text lists stages in order with their inputs and marks."""
        text = graph_text(GRAPH, "text")
        assert "  groups <- audio  [fan-out over audio]" in text
        assert "  lyrics <- audio  [conditional]" in text
        assert "  render <- groups, lyrics" in text

    def test_mermaid_shapes(self):
        """Mermaid draws fan-out as a subroutine box and conditionals as a rhombus."""
        text = graph_text(GRAPH, "mermaid")
        assert text.startswith("flowchart TD")
        assert '[["groups<br/>(fan-out over audio)"]]' in text
        assert '{"lyrics<br/>(conditional)"}' in text
        assert text.count("-->") == 4

    def test_dot(self):
        """DOT marks fan-out with a double border and conditionals with a diamond."""
        text = graph_text(GRAPH, "dot")
        assert '"groups" [label="groups\n(fan-out over audio)", peripheries=2];' in text
        assert "shape=diamond" in text
        assert '"audio" -> "groups";' in text

    def test_invalid_pipeline_and_format(self):
        """An invalid pipeline raises DefinitionError; a bad format ValueError."""
        bad = PipelineDefinition("b", [StageDefinition("a", _noop, inputs=["x"])])
        with pytest.raises(DefinitionError):
            graph_text(bad)
        with pytest.raises(ValueError, match="use text, mermaid or dot"):
            graph_text(GRAPH, "svg")


class Color(enum.Enum):
    RED = "red"


class Model(BaseModel):
    when: datetime.date
    color: Color


@dataclasses.dataclass
class Point:
    x: int


class TestJson:
    def test_jsonable_never_raises(self):
        """Every value becomes JSON data: models, dataclasses, NaN, bytes, cycles, objects."""
        cycle: list = []
        cycle.append(cycle)
        value = {
            "model": Model(when=datetime.date(2024, 1, 2), color=Color.RED),
            "point": Point(1),
            "nan": float("nan"),
            "tuple": (1, 2),
            "set": {3},
            "bytes": b"abc",
            "path": Path("/x"),
            "cycle": cycle,
            1: object(),
        }
        data = jsonable(value)
        text = json.dumps(data, allow_nan=False)
        assert data["model"] == {"when": "2024-01-02", "color": "red"}
        assert data["point"] == {"x": 1}
        assert data["nan"] == "nan"
        assert data["tuple"] == [1, 2]
        assert data["bytes"] == "<3 bytes>"
        assert data["cycle"] == ["<cycle>"]
        assert data["1"].startswith("<object object")
        assert json.loads(text)["path"] == "/x"

    def test_result_to_dict(self):
        """The run JSON has the summary lists and each stage's status and error."""

        @stage
        def boom(x, ctx):
            raise ValueError("nope")

        pipeline = PipelineDefinition(
            "r", [StageDefinition("ok", _noop), StageDefinition("boom", boom, inputs=["ok"])]
        )
        result = PipelineExecutor().run(pipeline, object())
        data = result_to_dict(result)
        json.dumps(data, allow_nan=False)
        assert data["success"] is False
        assert data["failed_stages"] == ["boom"]
        assert data["stages"]["boom"]["status"] == "failed"
        assert data["stages"]["boom"]["error"] == "ValueError: nope"
        assert data["outputs"]["ok"].startswith("<object object")
        for name in ("executed", "cached", "skipped", "cancelled", "run_id"):
            assert name in data


DOCTOR_FILE = """
import dataclasses
from twinklr_pipe import PipelineDefinition, StageDefinition, stage, success_result

@stage(version="1")
def steady(x, ctx):
    return x

@stage
def unversioned(x, ctx):
    return helper_obj.run(x)

class Salted:
    name = "salted"
    version = "1"

    def cache_params(self):
        return {"salt": hash("twinklr")}  # differs with PYTHONHASHSEED

    async def execute(self, x, ctx):
        return success_result(x, stage_name=self.name)

@dataclasses.dataclass
class Holder:
    client: object
    name: str = "holder"
    version = "1"

    async def execute(self, x, ctx):
        return success_result(x, stage_name=self.name)

class _Helper:
    def run(self, x):
        return x

helper_obj = _Helper()

PIPELINE = PipelineDefinition(
    "doc",
    [
        StageDefinition("steady", steady),
        StageDefinition("unversioned", unversioned, inputs=["steady"]),
        StageDefinition("salted", Salted(), inputs=["steady"]),
        StageDefinition("holder", Holder(object()), inputs=["steady"]),
    ],
)
"""


class TestDoctor:
    def test_finds_every_kind_of_hazard(self, tmp_path):
        """Unstable keys, unfingerprintable fields, no version, unresolved names, state reads."""
        file = tmp_path / "docmod.py"
        file.write_text(DOCTOR_FILE)
        spec = f"{file}:PIPELINE"
        pipeline, _ = load_pipeline(spec)
        from twinklr_pipe.cache._identity import stage_identity

        store = MemoryStore()
        put(
            store,
            "cc",
            stage="steady",
            pipeline="doc",
            stage_identity=stage_identity(pipeline.get_stage("steady").stage),
            state_reads={"mode": "f" * 32},
        )
        report = doctor(
            pipeline,
            spec=spec,
            input=InputSpec(kind="json", value=1),
            store=store,
            cwd=str(tmp_path),
        )
        kinds = {(f.stage, f.kind, f.level) for f in report.findings}
        assert ("salted", "unstable-key", "error") in kinds
        assert ("holder", "unfingerprintable", "error") in kinds
        assert ("unversioned", "no-version", "warning") in kinds
        assert ("unversioned", "unresolved", "warning") in kinds
        assert ("steady", "state-reads", "warning") in kinds
        assert ("steady", "no-version", "warning") not in kinds
        salted = next(f for f in report.findings if f.stage == "salted")
        assert "configuration field 'salt'" in salted.message
        holder = next(f for f in report.findings if f.stage == "holder")
        assert "'client'" in holder.message
        assert not report.ok
        assert report.findings[0].level == "error"

    def test_clean_pipeline_is_ok(self, tmp_path):
        """A versioned, fingerprintable pipeline has no findings."""
        file = tmp_path / "cleanmod.py"
        file.write_text(
            textwrap.dedent(
                """
                from twinklr_pipe import PipelineDefinition, StageDefinition, stage

                @stage(version="1")
                def steady(x, ctx):
                    return x

                PIPELINE = PipelineDefinition("clean", [StageDefinition("steady", steady)])
                """
            )
        )
        spec = f"{file}:PIPELINE"
        pipeline, _ = load_pipeline(spec)
        report = doctor(
            pipeline, spec=spec, input=InputSpec(kind="string", value="x"), cwd=str(tmp_path)
        )
        assert report.findings == []
        assert report.ok
