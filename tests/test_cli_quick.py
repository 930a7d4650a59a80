"""``pipe cache ls`` answered without typer or the store (``_main``), and only when that is safe.

Each case is run twice: through ``_main.main`` (the console script) and through the typer
command; the outputs must be the same, and the test knows which path answered.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from typer.testing import CliRunner

from twinklr_pipe import _cli, _main
from twinklr_pipe.cache import _layout
from twinklr_pipe.cache._entry import EntryMeta
from twinklr_pipe.cache._store import DiskCacheStore, _connection


def entry(number: int, **fields: object) -> tuple[EntryMeta, bytes]:
    payload = b"x" * (number * 97 % 3000)
    values: dict[str, object] = {
        "key": xxhash.xxh3_128_hexdigest(number.to_bytes(4, "little")),
        "pipeline": "song",
        "stage_id": "parse",
        "version": "2",
        "codec": "json/1",
        "payload_checksum": xxhash.xxh3_128_hexdigest(payload),
        "size_bytes": len(payload),
        "created_at": 1_700_000_000.0 + number * 61.5,
        "last_used_at": 1_700_500_000.0 - number * 7.25,
        "run_id": "r-1",
    }
    values.update(fields)
    return EntryMeta.model_validate(values), payload


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A store with two pipelines, fan-out items, variants and source-hash versions."""
    directory = tmp_path / "cache"
    with DiskCacheStore(directory) as store:
        for number in range(40):
            fields: dict[str, object] = {}
            if number % 4 == 1:
                fields = {"stage_id": "groups", "item_index": number}
            elif number % 4 == 2:
                fields = {"version": f"src:{number:032x}", "version_is_source_hash": True}
            elif number % 4 == 3:
                fields = {"pipeline": "lyrics", "stage_id": "align", "variant": f"{number:08x}"}
            store.put(*entry(number, **fields))
    return directory


class Typer(Exception):
    """The typer command was called: the quick path declined."""


@pytest.fixture
def typer_called(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse() -> None:
        raise Typer

    monkeypatch.setattr(_cli, "main", refuse)
    yield


def quick(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """What ``pipe <args>`` prints through ``_main.main``, which must not call typer."""
    monkeypatch.setattr(sys, "argv", ["pipe", *args])
    _main.main()
    return capsys.readouterr().out


def declines(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> bool:
    """Whether ``_main.main`` hands ``pipe <args>`` to typer, having printed nothing."""
    monkeypatch.setattr(sys, "argv", ["pipe", *args])
    try:
        _main.main()
    except Typer:
        assert capsys.readouterr().out == ""
        return True
    assert capsys.readouterr().out.startswith("KEY ")
    return False


def typer_output(args: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(_cli.app, args, env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its content.

    Not SQLite's ``-shm`` index, which any reader of a WAL database may create, nor an
    empty ``-wal``: what a reader leaves changes no data.
    """
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and not path.name.endswith("-shm")
        and not (path.name.endswith("-wal") and path.stat().st_size == 0)
    }


@pytest.mark.usefixtures("typer_called")
class TestSameTable:
    @pytest.mark.parametrize(
        "options",
        [
            [],
            ["--stage", "groups"],
            ["--pipeline=lyrics"],
            ["--sort", "used"],
            ["--sort=size", "--stage", "parse"],
            ["--pipeline", "song", "--sort", "created", "--stage", "groups"],
            ["--stage", "nothing-has-this-stage"],
        ],
    )
    def test_options(
        self,
        cache_dir: Path,
        options: list[str],
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        args = ["cache", "ls", "--cache-dir", str(cache_dir), *options]
        before = snapshot(cache_dir)
        printed = quick(args, monkeypatch, capsys)
        assert snapshot(cache_dir) == before  # read only: not even diskcache's settings
        assert printed == typer_output(args)
        assert printed.splitlines()[0].startswith("KEY ")

    def test_cache_dir_from_the_environment_and_the_default(
        self,
        cache_dir: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        expected = quick(["cache", "ls", "--cache-dir", str(cache_dir)], monkeypatch, capsys)
        assert expected.count("\n") == 42
        monkeypatch.setenv(_layout.CACHE_DIR_ENV, str(cache_dir))
        assert quick(["cache", "ls"], monkeypatch, capsys) == expected
        monkeypatch.delenv(_layout.CACHE_DIR_ENV)
        os.rename(cache_dir, tmp_path / _layout.DEFAULT_CACHE_DIR)
        monkeypatch.chdir(tmp_path)
        assert quick(["cache", "ls"], monkeypatch, capsys) == expected


@pytest.mark.usefixtures("typer_called")
class TestDeclines:
    @pytest.mark.parametrize(
        "options",
        [
            ["--json"],
            ["--help"],
            ["-h"],
            ["--sort", "newest"],
            ["--stage", "a", "--stage", "b"],
            ["--stage"],
            ["--stage="],
            ["--stage", "--json"],
            ["--verbose"],
            ["extra"],
        ],
    )
    def test_anything_but_plain_options(
        self,
        cache_dir: Path,
        options: list[str],
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        args = ["cache", "ls", "--cache-dir", str(cache_dir), *options]
        assert declines(args, monkeypatch, capsys)

    def test_a_store_it_cannot_vouch_for(
        self,
        cache_dir: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Missing, damaged, pending entries, another format, no complete table."""
        args = ["cache", "ls", "--cache-dir", str(cache_dir)]
        assert not declines(args, monkeypatch, capsys)
        assert declines(["cache", "ls", "--cache-dir", str(tmp_path / "none")], monkeypatch, capsys)
        (cache_dir / "DAMAGED").write_text("found damaged")
        assert declines(args, monkeypatch, capsys)
        (cache_dir / "DAMAGED").unlink()
        (cache_dir / "pending").mkdir(exist_ok=True)
        (cache_dir / "pending" / "1-a.log").write_bytes(b"")  # entries on their way in
        assert declines(args, monkeypatch, capsys)
        (cache_dir / "pending" / "1-a.log").unlink()
        marker = (cache_dir / "FORMAT").read_bytes()
        (cache_dir / "FORMAT").write_bytes(marker.replace(b'"format": 1', b'"format": 2'))
        assert declines(args, monkeypatch, capsys)
        (cache_dir / "FORMAT").write_bytes(marker)
        assert not declines(args, monkeypatch, capsys)
        with DiskCacheStore(cache_dir) as store:
            con = _store_connection(store)
            for statement in _layout.SUMMARIES_DROP_SQL:
                con.execute(statement)
        assert declines(args, monkeypatch, capsys)
        monkeypatch.setenv(_layout.CACHE_DIR_ENV, "")
        assert declines(["cache", "ls"], monkeypatch, capsys)

    def test_a_table_with_rows_missing(
        self, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with DiskCacheStore(cache_dir) as store:
            _store_connection(store).execute("DELETE FROM Summaries WHERE rowid = 3")
        assert declines(["cache", "ls", "--cache-dir", str(cache_dir)], monkeypatch, capsys)


def _store_connection(store: DiskCacheStore) -> sqlite3.Connection:
    assert store._cache is not None
    return _connection(store._cache)


def test_interrupt_exits_130(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from twinklr_pipe.cache import _quick

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_quick, "summary_columns", interrupted)
    monkeypatch.setattr(sys, "argv", ["pipe", "cache", "ls", "--cache-dir", str(cache_dir)])
    with pytest.raises(SystemExit) as exited:
        _main.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "Interrupted.\n"


def test_a_real_process_imports_neither_typer_nor_pydantic(cache_dir: Path) -> None:
    """The point of the quick path: start-up without typer, pydantic or diskcache."""
    code = (
        "import sys; from twinklr_pipe._main import main; main(); "
        "print(sorted(m for m in ('typer', 'pydantic', 'diskcache') if m in sys.modules), "
        "file=sys.stderr)"
    )
    args = ["cache", "ls", "--cache-dir", str(cache_dir)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    assert done.stderr.strip() == "[]"
    assert done.stdout == typer_output(args)
    module = subprocess.run(
        [sys.executable, "-m", "twinklr_pipe", *args], capture_output=True, text=True, check=True
    )
    assert module.stdout == done.stdout
