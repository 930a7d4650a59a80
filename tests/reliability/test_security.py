"""Security posture: nothing stored is ever executed.

Entries are planted under the valid key of a real stage (the way someone who can
write the cache directory would), then the pipeline runs on it: a pickle is refused
without being loaded, a JSON entry naming a callable instead of a model class is
refused without calling it, and ``pipe cache show`` imports and unpickles nothing.
Each planted payload would create a marker file if it ran; none may exist.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reliability.pipelines import TALLY
from twinklr_pipe import PipelineContext, PipelineDefinition, PipelineExecutor, StageDefinition
from twinklr_pipe import stage as stage_
from twinklr_pipe._cli import app
from twinklr_pipe.cache import DiskCacheStore, EntryMeta


@stage_(version="1")
def produce(input: Any, context: PipelineContext) -> dict[str, int]:
    return {"answer": 42}


PIPELINE = PipelineDefinition("secure", [StageDefinition("produce", produce)])
EXPECTED = {"answer": 42}


class Mkdir:
    """Unpickling this calls ``os.mkdir(path)``: the marker of executed content."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache holding the one real entry of ``produce``."""
    cache = tmp_path / "cache"
    assert PipelineExecutor(cache).run(PIPELINE).success
    return cache


def _only_entry(cache: Path) -> EntryMeta:
    with DiskCacheStore(cache) as store:
        (meta,) = store.iter_metadata()
        return meta


def _plant(cache: Path, codec: str, payload: bytes) -> EntryMeta:
    """Replace the entry's payload (and codec) under its own, valid key."""
    meta = _only_entry(cache)
    planted = meta.model_copy(update={"codec": codec, "payload_checksum": ""})
    with DiskCacheStore(cache) as store:
        store.put(planted, payload)
    return planted


def _run_and_check(cache: Path, caplog: pytest.LogCaptureFixture, **kwargs: Any) -> list[str]:
    caplog.clear()
    result = PipelineExecutor(cache, **kwargs).run(PIPELINE)
    assert result.success
    assert TALLY.check_outputs(result.outputs["produce"], EXPECTED)
    assert result.executed == ["produce"], "the planted entry was served"
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="twinklr_pipe")


class TestPickle:
    def test_planted_pickle_entry_is_refused_without_loading(
        self, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A pickle entry under a valid key is refused (allow_pickle is off) and never runs."""
        marker = tmp_path / "pwned"
        _plant(cache, "pickle/1", pickle.dumps(Mkdir(marker)))
        TALLY.add("security: malicious entries planted")
        warnings = _run_and_check(cache, caplog)
        assert not marker.exists(), "the planted pickle was executed"
        (warning,) = warnings
        assert "of stage 'produce' cannot be used (refusing to load a pickle entry" in warning
        assert "PipelineExecutor(allow_pickle=True) opts in); recomputing" in warning

    @pytest.mark.parametrize("row", ["payload", "metadata"])
    def test_diskcache_pickled_row_is_never_unpickled(
        self, row: str, cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A row stored in diskcache's own pickle mode is discarded, never unpickled."""
        marker = tmp_path / "pwned"
        meta = _only_entry(cache)
        key = ("p/" if row == "payload" else "m/") + meta.entry_id
        con = sqlite3.connect(cache / "store" / "cache.db")
        try:  # mode 4 is diskcache's MODE_PICKLE: its default Disk would unpickle it
            con.execute(
                "UPDATE Cache SET mode = 4, value = ? WHERE key = ?",
                (pickle.dumps(Mkdir(marker)), key),
            )
            con.commit()
        finally:
            con.close()
        TALLY.add("security: malicious entries planted")
        warnings = _run_and_check(cache, caplog)
        assert not marker.exists(), "diskcache unpickled the planted row"
        (warning,) = warnings
        assert "Discarded a corrupt cache entry of" in warning
        assert "not raw bytes" in warning


class TestClassReferences:
    @pytest.mark.parametrize(
        ("kind", "spec", "found"),
        [
            ("model", "os:system", "builtin_function_or_method posix.system"),
            ("model", "builtins:eval", "builtin_function_or_method builtins.eval"),
            ("model", "subprocess:Popen", "type subprocess.Popen"),
            ("dataclass", "subprocess:Popen", "type subprocess.Popen"),
            ("enum", "os:system", "builtin_function_or_method posix.system"),
            ("model", "os:path.join", "function posixpath.join"),
        ],
    )
    def test_entry_naming_another_callable_is_refused(
        self,
        kind: str,
        spec: str,
        found: str,
        cache: Path,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A JSON entry naming a callable where a model class belongs is refused, not called."""
        marker = tmp_path / "pwned"
        command = f"mkdir {marker}"
        value = {"command": command, "args": ["mkdir", str(marker)], "source": command}
        payload = json.dumps({"$tp": kind, "c": spec, "v": value}).encode()
        _plant(cache, "json/1", payload)
        TALLY.add("security: malicious entries planted")
        warnings = _run_and_check(cache, caplog)
        assert not marker.exists(), f"{spec} was called"
        (warning,) = warnings
        expected_kind = {
            "model": "a pydantic BaseModel subclass",
            "dataclass": "a dataclass type",
            "enum": "an Enum subclass",
        }[kind]
        assert f"refusing to restore {spec}: expected {expected_kind}, found {found}" in warning


class TestPermissions:
    def test_cache_directory_is_owner_only(self, tmp_path: Path) -> None:
        """A new cache directory is 0o700, even under a permissive umask."""
        old = os.umask(0)
        try:
            cache = tmp_path / "deep" / "cache"
            PipelineExecutor(cache, dedupe=True).run(PIPELINE)
        finally:
            os.umask(old)
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert stat.S_IMODE((cache / "locks").stat().st_mode) == 0o700
        for lock in [cache / "store.lock", *(cache / "locks").iterdir()]:
            assert stat.S_IMODE(lock.stat().st_mode) == 0o600, lock
        TALLY.add("security: permission checks")


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An importable module whose import creates a marker directory."""
    marker = tmp_path / "imported"
    name = "twinklr_rel_evil"
    (tmp_path / f"{name}.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\n\nclass Thing:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


class TestCacheShow:
    def test_cache_show_never_executes_stored_content(
        self, cache: Path, tmp_path: Path, evil_module: tuple[str, Path]
    ) -> None:
        """`pipe cache show` previews pickle and JSON entries without loading or importing."""
        name, imported = evil_module
        pickled = tmp_path / "unpickled"
        runner = CliRunner()
        meta = _plant(cache, "pickle/1", pickle.dumps(Mkdir(pickled)))
        shown = runner.invoke(app, ["cache", "show", meta.key[:12], "--cache-dir", str(cache)])
        assert shown.exit_code == 0, shown.output
        assert "<pickle payload," in shown.stdout and "; not loaded>" in shown.stdout
        assert not pickled.exists()

        payload = json.dumps({"$tp": "model", "c": f"{name}:Thing", "v": {}}).encode()
        meta = _plant(cache, "json/1", payload)
        shown = runner.invoke(app, ["cache", "show", meta.key[:12], "--cache-dir", str(cache)])
        assert shown.exit_code == 0, shown.output
        assert f"{name}:Thing" in shown.stdout  # shown as text
        assert not imported.exists() and name not in sys.modules
        TALLY.add("security: malicious entries planted", 2)
