"""The committed ``.cache-example/`` still opens, lists and decodes with the current code.

It stands for the caches users already have on disk. When the store layout, the entry
metadata, the codec or the key recipe changes, these tests fail until
``scripts/make_cache_example.py`` is run again *and* ``CACHE_FORMAT_VERSION`` is bumped,
so a format change is always a deliberate, versioned one.

Every test works on a copy in a temporary directory: opening a diskcache database
rewrites its settings rows, and tests must never modify the committed files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from twinklr_pipe import PipelineContext, PipelineExecutor
from twinklr_pipe._plan import plan_run
from twinklr_pipe.cache import DiskCacheStore, fingerprint
from twinklr_pipe.cache._codec import decode
from twinklr_pipe.cache._entry import CACHE_FORMAT_VERSION
from twinklr_pipe.examples import sequencer

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / ".cache-example"
CACHED = ["audio", "profile", "lyrics", "macro", "tasks", "groups", "assemble"]
REGENERATE = (
    "regenerate it with `python scripts/make_cache_example.py` and bump CACHE_FORMAT_VERSION "
    "in twinklr_pipe/cache/_entry.py if the stored format or the keys changed"
)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A private copy of ``.cache-example``."""
    assert EXAMPLE.is_dir(), f"{EXAMPLE} is missing: {REGENERATE}"
    target = tmp_path / "cache-example"
    shutil.copytree(EXAMPLE, target)
    return target


@pytest.fixture
def store(copy: Path) -> Iterator[DiskCacheStore]:
    opened = DiskCacheStore(copy)
    try:
        yield opened
    finally:
        opened.close()


def test_it_is_small_and_holds_only_what_it_should() -> None:
    files = sorted(p.relative_to(EXAMPLE).as_posix() for p in EXAMPLE.rglob("*") if p.is_file())
    assert files == ["FORMAT", "store.lock", "store/cache.db"], (
        "no runs/ journals (they hold this machine's paths), no SQLite -wal/-shm files, "
        f"no value files: {files}; {REGENERATE}"
    )
    size = sum((EXAMPLE / f).stat().st_size for f in files)
    assert size < 1_000_000, size


def test_its_format_is_the_current_one(store: DiskCacheStore) -> None:
    assert store.format_version == CACHE_FORMAT_VERSION, REGENERATE


def test_every_entry_lists_and_decodes_to_its_stored_hash(store: DiskCacheStore) -> None:
    metas = list(store.iter_metadata())
    stages = sorted(m.stage_id for m in metas)
    assert stages == sorted([*CACHED, *["groups"] * 5]), stages
    assert sorted(m.item_index for m in metas if m.stage_id == "groups") == list(range(6))
    assert store.size() == sum(m.size_bytes for m in metas)
    for meta in metas:
        assert meta.pipeline == "sequencer"
        assert meta.run_id == "cache-example"
        assert meta.codec == "json/1", meta.codec
        got = store.get(meta.entry_id)
        assert got is not None, f"entry {meta.entry_id} of {meta.stage_id}: {REGENERATE}"
        value = decode(got[0].codec, got[1], allow_pickle=False)
        # The hash a hit is checked against: a changed model or codec shows up here.
        assert fingerprint(value) == meta.output_hash, (meta.stage_id, REGENERATE)
    audio = next(m for m in metas if m.stage_id == "audio")
    got = store.get(audio.entry_id)
    assert got is not None
    features = decode(got[0].codec, got[1], allow_pickle=False)
    assert type(features).__name__ == "AudioFeatures"
    assert features.source == "clip.wav"


def test_plan_says_everything_but_export_is_cached(store: DiskCacheStore) -> None:
    definition, context = sequencer.pipeline()
    plan = plan_run(definition, None, cache=store, context=context)
    assert {p.stage_id: p.status for p in plan.stages} == {
        **dict.fromkeys(CACHED, "cached"),
        "export": "will run",
    }, [(p.stage_id, p.reason, p.changes) for p in plan.stages]


def test_a_run_against_it_executes_only_export(store: DiskCacheStore, tmp_path: Path) -> None:
    definition = sequencer.build_pipeline(output_dir=tmp_path / "out")
    provider = sequencer.offline_provider(latency_s=(0.0, 0.0))
    result = PipelineExecutor(cache=store).run(
        definition, context=PipelineContext(provider=provider)
    )
    assert result.success
    assert result.executed == ["export"], REGENERATE
    assert sorted(result.cached) == sorted(CACHED)
    assert sum(provider.calls.values()) == 0
    assert (tmp_path / "out" / "clip.xsq").exists()


def test_pipe_cache_ls_lists_it(copy: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twinklr_pipe", "cache", "ls", "--cache-dir", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["KEY", "PIPELINE", "STAGE"]
    assert lines[-1].startswith("12 entries, ")
    assert sum("sequencer" in line for line in lines) == 12


def test_gitignore_does_not_exclude_it() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", ".cache-example/store/cache.db"],
        cwd=REPO,
        check=False,
    )
    assert ignored.returncode == 1, ".gitignore excludes .cache-example"
