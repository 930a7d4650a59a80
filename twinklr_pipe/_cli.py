"""``pipe``: the command line of twinklr_pipe (typer wiring only).

Each command parses its options, loads the pipeline, calls one library function
(the executor, ``plan_run``, ``_admin``, ``_journal``) and renders the answer.
Exit codes: 0 success, 1 the pipeline failed (or ``doctor`` found errors), 2 usage,
spec and bad-input errors (one ``error: ...`` line on stderr), 130 Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from . import __version__
from ._admin import (
    DEFAULT_CACHE_DIR,
    accept_stage,
    delete_entries,
    doctor,
    entries_text,
    entry_to_dict,
    find_entry,
    format_bytes,
    format_entries,
    gc_entries,
    graph_text,
    list_entries,
    open_store,
    parse_duration,
    parse_size,
    preview_entry,
    result_to_dict,
    select_entries,
)
from .cache._layout import CACHE_DIR_ENV
from .errors import DefinitionError, PipeError

if TYPE_CHECKING:
    from ._definition import PipelineDefinition
    from ._journal import InputSpec, RunRecord

# Start-up time matters here: ``pipe`` is a short-lived process, and shell completion
# runs it at every TAB. So this module imports only typer and the light ``_admin``; the
# loader (pipeline models), the journal (anyio, pydantic), the executor and the live
# view are imported by the commands that use them (``pipe cache ls`` over 100,000
# entries: scripts/bench_cli_cache_ls.py).

__all__ = ["app", "main"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="pipe",
    help=(
        "Run twinklr_pipe pipelines, see what the cache will skip and why, and manage "
        "the cache.\n\n"
        "A pipeline is named by a spec: module.path:attr or path/to/file.py:attr, where attr "
        "is a PipelineDefinition or a function returning one (or a (pipeline, context) pair).\n\n"
        "The cache lives in --cache-dir, else $TWINKLR_PIPE_CACHE_DIR, else "
        f"{DEFAULT_CACHE_DIR} in the current directory."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # our bugs keep a plain, complete traceback
    context_settings={"help_option_names": ["-h", "--help"]},
)
cache_app = typer.Typer(
    help="Inspect and manage cache entries: ls, show, clear, gc, accept.",
    no_args_is_help=True,
)
runs_app = typer.Typer(help="The journal of runs: ls, show.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(runs_app, name="runs")

# -- shared options --------------------------------------------------------------------------

CacheDir = Annotated[
    Path,
    typer.Option(
        "--cache-dir",
        envvar=CACHE_DIR_ENV,
        help=f"Cache directory (else $TWINKLR_PIPE_CACHE_DIR, else ./{DEFAULT_CACHE_DIR}).",
        show_default=False,
    ),
]
Spec = Annotated[str, typer.Argument(help="module.path:attr or path/to/file.py:attr")]
InputValue = Annotated[
    str | None,
    typer.Option(
        "--input",
        "-i",
        help="Initial input: parsed as JSON when it is valid JSON, else the raw string.",
    ),
]
InputFile = Annotated[
    Path | None, typer.Option("--input-file", help="Initial input: the JSON in this file.")
]
InputPath = Annotated[
    Path | None,
    typer.Option(
        "--input-path",
        help="Initial input: FileInput(PATH), keyed by the file's content, not its name.",
    ),
]
Force = Annotated[
    list[str] | None,
    typer.Option("--force", "-f", help="Re-run this stage even if cached (repeatable)."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Let the cache store and load outputs with pickle."),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log stage tracebacks and retries.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pipe (twinklr_pipe) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run twinklr_pipe pipelines and manage their cache."""


# -- errors, logging, input ------------------------------------------------------------------


def _fail(message: str, code: int = 2) -> NoReturn:
    line = " ".join(message.split())
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _handles_errors(fn: F) -> F:
    """Turn our own errors into one ``error:`` line and exit code 2; others keep tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipeError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _Formatter(logging.Formatter):
    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(levelname)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if not self.tracebacks and record.exc_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        record.levelname = record.levelname.lower()
        return super().format(record)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is now (the live view redirects it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


_handler = _StderrHandler()


def _setup_logging(verbose: bool) -> None:
    """Warnings (and with --verbose, info and tracebacks) of twinklr_pipe go to stderr."""
    logger = logging.getLogger("twinklr_pipe")
    _handler.setFormatter(_Formatter(tracebacks=verbose))
    _handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    if verbose:
        logger.setLevel(logging.INFO)


def _input_spec(value: str | None, file: Path | None, path: Path | None) -> InputSpec:
    from ._journal import InputSpec

    given = [
        name
        for name, v in (("--input", value), ("--input-file", file), ("--input-path", path))
        if v is not None
    ]
    if len(given) > 1:
        _fail(f"give one of --input, --input-file and --input-path, not {' and '.join(given)}")
    if value is not None:
        try:
            return InputSpec(kind="json", value=json.loads(value))
        except ValueError:
            if os.path.isfile(value):
                typer.echo(
                    f"note: --input '{value}' is passed as a string, so the cache keys it by "
                    "name; use --input-path to key it by the file's content",
                    err=True,
                )
            return InputSpec(kind="string", value=value)
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            _fail(f"--input-file {file}: {exc.strerror or exc}")
        try:
            return InputSpec(kind="json", value=json.loads(text))
        except ValueError as exc:
            _fail(f"--input-file {file} is not valid JSON: {exc}")
    if path is not None:
        if not path.is_file():
            _fail(f"--input-path {path}: no such file")
        return InputSpec(kind="path", value=str(path.resolve()))
    return InputSpec()


def _check(pipeline: PipelineDefinition, force: list[str]) -> None:
    problems = pipeline.validate_pipeline()
    if problems:
        raise DefinitionError(problems)
    known = [s.id for s in pipeline.stages]
    for sid in force:
        if sid not in known:
            stages = ", ".join(known)
            _fail(f"--force {sid}: no such stage in pipeline '{pipeline.name}' (stages: {stages})")


def _parse(parser: Callable[[str], Any], value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return parser(value)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


# -- run and resume --------------------------------------------------------------------------


def _dask_runner(target: str) -> Any:
    """``--dask``: a ``DaskRunner`` (distributed is imported only now, if at all)."""
    from ._dask import DaskRunner

    try:
        return DaskRunner(target)
    except ValueError as exc:
        _fail(f"--dask: {exc}")


def _execute(
    pipeline: PipelineDefinition,
    context: Any,
    *,
    spec: str,
    cwd: str,
    input: InputSpec,
    force: list[str],
    cache_dir: Path,
    no_cache: bool,
    json_out: bool,
    allow_pickle: bool,
    resumed_from: str | None = None,
    dask: str | None = None,
) -> NoReturn:
    from ._executor import PipelineExecutor
    from ._graph import topological_order
    from ._journal import JournalledRun, run_journalled
    from ._live import LiveView

    runner = _dask_runner(dask) if dask is not None else None
    store = None if no_cache else open_store(cache_dir)
    executor = PipelineExecutor(cache=store, allow_pickle=allow_pickle, runner=runner)
    order = topological_order({s.id: list(s.inputs) for s in pipeline.stages})
    view = None if json_out else LiveView(order)
    try:
        if view is not None:
            view.__enter__()
        outcome: JournalledRun = run_journalled(
            executor,
            pipeline,
            cache_dir=None if no_cache else cache_dir,
            spec=spec,
            cwd=cwd,
            input=input,
            context=context,
            force=force,
            on_event=view.on_event if view is not None else None,
            resumed_from=resumed_from,
        )
    finally:
        if view is not None:
            view.__exit__(None, None, None)
        if executor.store is not None:
            executor.store.close()
        if runner is not None:
            runner.close()  # stops a local:N cluster
    result = outcome.result
    if result is not None:
        if json_out:
            _out(json.dumps(result_to_dict(result), indent=2))
        elif view is not None:
            view.print_summary(result)
    if outcome.interrupted:
        if no_cache:
            typer.echo("Interrupted (--no-cache: nothing was cached).", err=True)
        else:
            typer.echo(
                "Interrupted: completed stages are cached. "
                f"Resume with: pipe resume {outcome.run_id}",
                err=True,
            )
        raise typer.Exit(130)
    raise typer.Exit(0 if result is not None and result.success else 1)


@app.command(no_args_is_help=True)
@_handles_errors
def run(
    spec: Spec,
    input: InputValue = None,
    input_file: InputFile = None,
    input_path: InputPath = None,
    force: Force = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run without the cache.")] = False,
    json_out: JsonOut = False,
    allow_pickle: AllowPickle = False,
    verbose: Verbose = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
    dask: Annotated[
        str | None,
        typer.Option(
            "--dask",
            metavar="ADDRESS",
            help=(
                "Run remote=True stages on Dask: a scheduler address (tcp://host:8786), or "
                "local:N to start a LocalCluster of N worker processes for this run. "
                "Needs: pip install 'twinklr_pipe[dask]'."
            ),
        ),
    ] = None,
) -> None:
    """Run a pipeline, serving unchanged stages from the cache.

    On a terminal a live view shows each stage's state, elapsed time and
    FAN_OUT progress; in a pipe it prints plain lines. A summary table
    follows. Exit code 0 on success, 1 when the pipeline failed, 2 for a bad
    spec, input or option, 130 after Ctrl-C (completed stages stay cached;
    the hint says how to resume).

    Examples:

      pipe run pipelines/song.py:pipeline --input-path song.wav

      pipe run myproject.pipes:build --input '{"bpm": 120}' --force macro

      pipe run pipelines/song.py:pipeline --input-file input.json --json

      pipe run pipelines/song.py:pipeline --input-path song.wav --dask local:2
    """
    from ._loader import absolute_spec, load_pipeline

    _setup_logging(verbose)
    pipeline, context = load_pipeline(spec)
    forced = list(force or [])
    _check(pipeline, forced)
    input_spec = _input_spec(input, input_file, input_path)
    cwd = os.getcwd()
    _execute(
        pipeline,
        context,
        spec=absolute_spec(spec, cwd),
        cwd=cwd,
        input=input_spec,
        force=forced,
        cache_dir=cache_dir.absolute(),
        no_cache=no_cache,
        json_out=json_out,
        allow_pickle=allow_pickle,
        dask=dask,
    )


@app.command(no_args_is_help=True)
@_handles_errors
def resume(
    run_id: Annotated[
        str, typer.Argument(help="A run id from 'pipe runs ls' (or a unique prefix).")
    ],
    json_out: JsonOut = False,
    allow_pickle: AllowPickle = False,
    verbose: Verbose = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Run a journalled run again: same spec, working directory and input.

    Every stage that finished before the run stopped (a crash, kill -9,
    Ctrl-C) is a cache hit, so only unfinished stages execute. The resumed
    run is journalled as a new run.

    Examples:

      pipe resume r-20250101T120000-1a2b3c

      pipe runs ls && pipe resume r-2025
    """
    from ._journal import load_run
    from ._loader import load_pipeline

    _setup_logging(verbose)
    cache_dir = cache_dir.absolute()
    record = load_run(cache_dir, run_id)
    try:
        os.chdir(record.cwd)
    except OSError as exc:
        _fail(f"run {record.run_id} ran in {record.cwd}, which is gone: {exc.strerror or exc}")
    if record.status == "running":
        typer.echo(f"note: run {record.run_id} looks still running (pid {record.pid})", err=True)
    pipeline, context = load_pipeline(record.spec)
    # Stages the run was forced to re-run are forced again only if they did not finish.
    known = {s.id for s in pipeline.stages}
    finished = {"succeeded", "cached"}
    force = [s for s in record.force if s in known and record.stages.get(s) not in finished]
    _check(pipeline, force)
    _execute(
        pipeline,
        context,
        spec=record.spec,
        cwd=record.cwd,
        input=record.input,
        force=force,
        cache_dir=cache_dir,
        no_cache=False,
        json_out=json_out,
        allow_pickle=allow_pickle,
        resumed_from=record.run_id,
    )


# -- plan, graph, doctor ---------------------------------------------------------------------


@app.command(no_args_is_help=True)
@_handles_errors
def plan(
    spec: Spec,
    input: InputValue = None,
    input_file: InputFile = None,
    input_path: InputPath = None,
    force: Force = None,
    json_out: JsonOut = False,
    allow_pickle: AllowPickle = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Say which stages a run would serve from the cache and why the others would run.

    Executes nothing: it reads the cache's metadata. Reasons: no entry for
    this key, version or code changed (old → new), config changed (which
    fields), input changed (which input), forced, or unknown until an
    upstream stage runs.

    Examples:

      pipe plan pipelines/song.py:pipeline --input-path song.wav

      pipe plan myproject.pipes:build --input '{"bpm": 120}' --json
    """
    from ._loader import load_pipeline
    from ._plan import plan_run
    from .cache._store import MemoryStore

    _setup_logging(False)
    pipeline, context = load_pipeline(spec)
    forced = list(force or [])
    _check(pipeline, forced)
    input_spec = _input_spec(input, input_file, input_path)
    store = open_store(cache_dir, create=False)
    try:
        the_plan = plan_run(
            pipeline,
            input_spec.build(),
            cache=store if store is not None else MemoryStore(),
            force=forced,
            context=context,
            allow_pickle=allow_pickle,
        )
    finally:
        if store is not None:
            store.close()
    if json_out:
        _out(json.dumps(the_plan.model_dump(mode="json"), indent=2))
        return
    runs = len(the_plan.will_run)
    lines = [f"pipeline {the_plan.pipeline}: {runs} of {len(the_plan.stages)} stages will run"]
    width = max((len(p.stage_id) for p in the_plan.stages), default=5)
    for p in the_plan.stages:
        detail = p.reason
        if p.items is not None:
            detail += f" ({p.items_cached}/{p.items} items cached)"
        if p.status == "cached" and p.saved_ms:
            detail += f" (saves {p.saved_ms / 1000:.2f}s)"
        lines.append(f"  {p.stage_id.ljust(width)}  {p.status:<8}  {detail}")
        lines.extend(f"  {'':{width}}  {'':8}  {extra}" for extra in p.changes[1:])
    _out("\n".join(lines))


@app.command(no_args_is_help=True)
@_handles_errors
def graph(
    spec: Spec,
    fmt: Annotated[
        str, typer.Option("--format", help="text, mermaid or dot.", show_default=True)
    ] = "text",
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Print the pipeline's DAG; FAN_OUT and conditional stages are marked.

    The cache is not read (--cache-dir is accepted, as on every command).

    Examples:

      pipe graph pipelines/song.py:pipeline

      pipe graph pipelines/song.py:pipeline --format mermaid

      pipe graph pipelines/song.py:pipeline --format dot | dot -Tsvg > graph.svg
    """
    from ._loader import load_pipeline

    pipeline, _ = load_pipeline(spec)
    _out(_parse(lambda f: graph_text(pipeline, f), fmt, "--format"))


@app.command("doctor", no_args_is_help=True)
@_handles_errors
def doctor_cmd(
    spec: Spec,
    input: InputValue = None,
    input_file: InputFile = None,
    input_path: InputPath = None,
    json_out: JsonOut = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Check a pipeline for cache hazards without running it.

    Errors (exit code 1): keys that differ in a fresh interpreter with
    another PYTHONHASHSEED, configuration fields or an input that cannot be
    fingerprinted. Warnings (exit code 0): stages without an explicit
    version, names the source hash could not follow, stages whose cached
    entries read context state.

    Examples:

      pipe doctor pipelines/song.py:pipeline

      pipe doctor myproject.pipes:build --input '{"bpm": 120}'
    """
    from ._loader import load_pipeline

    _setup_logging(False)
    pipeline, _ = load_pipeline(spec)
    _check(pipeline, [])
    input_spec = _input_spec(input, input_file, input_path)
    store = open_store(cache_dir, create=False)
    try:
        report = doctor(pipeline, spec=spec, input=input_spec, store=store)
    finally:
        if store is not None:
            store.close()
    if json_out:
        findings = [
            {"level": f.level, "kind": f.kind, "stage": f.stage, "message": f.message}
            for f in report.findings
        ]
        _out(
            json.dumps(
                {"pipeline": report.pipeline, "ok": report.ok, "findings": findings}, indent=2
            )
        )
    else:
        for f in report.findings:
            where = f"stage '{f.stage}'" if f.stage else "pipeline"
            _out(f"{f.level}: {where}: {f.message}")
        errors = sum(1 for f in report.findings if f.level == "error")
        warnings = len(report.findings) - errors
        if report.findings:
            _out(f"{report.stages} stages checked: {errors} errors, {warnings} warnings")
        else:
            _out(f"{report.stages} stages checked: no cache hazards found")
    raise typer.Exit(0 if report.ok else 1)


# -- cache -----------------------------------------------------------------------------------


@cache_app.command("ls")
@_handles_errors
def cache_ls(
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage id.")] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only this pipeline name.")
    ] = None,
    sort: Annotated[
        str, typer.Option("--sort", help="created, used or size (ascending).")
    ] = "created",
    json_out: JsonOut = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """List cache entries: key prefix, pipeline, stage, version, size, created, last used.

    A footer gives the number of entries and their total size.

    Examples:

      pipe cache ls --stage macro --sort size

      pipe cache ls --json | jq '.[] | select(.stage == "macro") | .size_bytes'
    """
    store = open_store(cache_dir, create=False)
    try:
        if json_out:
            entries = _parse(
                lambda s: list_entries(store, stage=stage, pipeline=pipeline, sort=s),
                sort,
                "--sort",
            )
        else:  # the same table as format_entries(list_entries(...)), built column-wise
            text = _parse(
                lambda s: entries_text(store, stage=stage, pipeline=pipeline, sort=s),
                sort,
                "--sort",
            )
    finally:
        if store is not None:
            store.close()
    if json_out:
        _out(json.dumps([entry_to_dict(m) for m in entries]))
    else:
        _out(text)


@cache_app.command("show", no_args_is_help=True)
@_handles_errors
def cache_show(
    key: Annotated[str, typer.Argument(help="An entry's key, or any unique prefix of it.")],
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Show an entry's metadata and a short preview of its stored output.

    Nothing stored is executed: pickled outputs are not loaded, and classes
    named in a JSON payload are not imported.

    Examples:

      pipe cache show 3f9a1c2e
    """
    store = open_store(cache_dir, create=False)
    try:
        meta = find_entry(store, key)
        assert store is not None
        preview = preview_entry(store, meta)
    finally:
        if store is not None:
            store.close()
    fields = meta.model_dump()
    fields["created_at"] = _when(meta.created_at)
    fields["last_used_at"] = _when(meta.last_used_at)
    width = max(len(k) for k in fields)
    lines = []
    for name, value in fields.items():
        if isinstance(value, dict | list):
            if not value:
                continue
            value = json.dumps(value, default=str)
        lines.append(f"{name.ljust(width)}  {value}")
    lines.append("")
    lines.append("output preview:")
    lines.append(preview)
    _out("\n".join(lines))


@cache_app.command("clear")
@_handles_errors
def cache_clear(
    stage: Annotated[str | None, typer.Option("--stage", help="Only this stage id.")] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only this pipeline name.")
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Only entries not used for this long: 30m, 12h, 7d, 2w."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Delete the matching cache entries (every entry without filters).

    Asks for confirmation unless --yes is given, then prints how many
    entries and bytes went.

    Examples:

      pipe cache clear --stage macro

      pipe cache clear --older-than 7d --yes
    """
    age = _parse(parse_duration, older_than, "--older-than")
    store = open_store(cache_dir, create=False)
    if store is None:
        _out("No matching cache entries.")
        return
    try:
        doomed = select_entries(store, stage=stage, pipeline=pipeline, older_than=age)
        if not doomed:
            _out("No matching cache entries.")
            return
        size = sum(m.size_bytes for m in doomed)
        noun = "entry" if len(doomed) == 1 else "entries"
        if not yes and not typer.confirm(
            f"Delete {len(doomed)} cache {noun} ({format_bytes(size)})?", default=False
        ):
            typer.echo("Nothing deleted.", err=True)
            raise typer.Exit(1)
        count, freed = delete_entries(store, doomed)
    finally:
        store.close()
    noun = "entry" if count == 1 else "entries"
    _out(f"Deleted {count} cache {noun} ({format_bytes(freed)}, {freed} bytes).")


@cache_app.command("gc")
@_handles_errors
def cache_gc(
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size", help="Evict least recently used entries down to this size: 500MB, 2GB."
        ),
    ] = None,
    older_than: Annotated[
        str | None, typer.Option("--older-than", help="Evict entries not used for this long: 30d.")
    ] = None,
    keep_runs: Annotated[
        int,
        typer.Option(
            "--keep-runs", help="Never evict entries used by the last N journalled runs.", min=0
        ),
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would go; delete nothing.")
    ] = False,
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Evict least-recently-used entries until the cache fits.

    Entries used by the last --keep-runs runs (default 1) are never evicted.
    Sizes take B, KB, MB, GB (1 KB = 1024 bytes).

    Examples:

      pipe cache gc --max-size 2GB

      pipe cache gc --older-than 30d --keep-runs 3 --dry-run
    """
    from ._journal import entries_used_by_recent_runs

    limit = _parse(parse_size, max_size, "--max-size")
    age = _parse(parse_duration, older_than, "--older-than")
    if limit is None and age is None:
        _fail("give --max-size and/or --older-than")
    store = open_store(cache_dir, create=False)
    protect = entries_used_by_recent_runs(cache_dir, keep_runs) if store is not None else set()
    try:
        report = gc_entries(store, max_size=limit, older_than=age, protect=protect, dry_run=dry_run)
    finally:
        if store is not None:
            store.close()
    count = len(report.evicted)
    if dry_run:
        if report.evicted:
            _out(format_entries(report.evicted))
        _out(f"Would evict {count} entries ({format_bytes(report.freed_bytes)}).")
    else:
        _out(f"Evicted {count} entries ({format_bytes(report.freed_bytes)}).")
    _out(
        f"{report.remaining_entries} entries ({format_bytes(report.remaining_bytes)}) "
        f"{'would remain' if dry_run else 'remain'}; {report.protected} kept for the last "
        f"{keep_runs} runs."
    )
    if report.over_budget:
        _out("Still above --max-size: the rest is used by recent runs (lower --keep-runs).")


@cache_app.command("accept", no_args_is_help=True)
@_handles_errors
def cache_accept(
    spec: Spec,
    stage: Annotated[str, typer.Argument(help="The stage id whose edit was cosmetic.")],
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Keep a stage's entries after a cosmetic code edit, without recomputing.

    Re-keys the stage's entries from its old code hash to the current one,
    when its configuration is unchanged, so it and the stages downstream
    stay cached.

    Examples:

      pipe cache accept pipelines/song.py:pipeline macro
    """
    from ._loader import load_pipeline

    pipeline, _ = load_pipeline(spec)
    store = open_store(cache_dir, create=False)
    if store is None:
        _out(f"No cache in {cache_dir}: nothing to re-key.")
        return
    try:
        count = accept_stage(store, pipeline, stage)
    finally:
        store.close()
    if count:
        noun = "entry" if count == 1 else "entries"
        _out(f"Re-keyed {count} {noun} of stage '{stage}' to its current code.")
    else:
        _out(
            f"Nothing to re-key for stage '{stage}': no entries with an older code hash and "
            "the current configuration."
        )


# -- runs ------------------------------------------------------------------------------------


def _run_dict(r: RunRecord) -> dict[str, Any]:
    data = r.model_dump(mode="json", exclude={"entry_ids", "path"})
    data["entries_used"] = len(r.entry_ids)
    return data


@runs_app.command("ls")
@_handles_errors
def runs_ls(json_out: JsonOut = False, cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR)) -> None:
    """List journalled runs, oldest first: id, status, pipeline, start, duration, input, spec.

    Examples:

      pipe runs ls

      pipe runs ls --json
    """
    from ._journal import list_runs

    runs = list_runs(cache_dir)
    if json_out:
        _out(json.dumps([_run_dict(r) for r in runs], indent=2))
        return
    if not runs:
        _out("No runs in the journal.")
        return
    header = ("RUN ID", "STATUS", "PIPELINE", "STARTED", "DURATION", "INPUT", "SPEC")
    rows = [
        (
            r.run_id,
            r.status,
            r.pipeline,
            _when(r.started_at),
            f"{r.duration_s:.1f}s" if r.duration_s is not None else "-",
            (r.input_fingerprint or "-")[:8],
            r.spec,
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@runs_app.command("show", no_args_is_help=True)
@_handles_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="A run id (or a unique prefix).")],
    cache_dir: CacheDir = Path(DEFAULT_CACHE_DIR),
) -> None:
    """Show one run: spec, input, times, status and each stage's status.

    Examples:

      pipe runs show r-20250101T120000-1a2b3c
    """
    from ._journal import load_run

    r = load_run(cache_dir, run_id)
    value = json.dumps(r.input.value) if r.input.kind != "none" else ""
    lines = [
        f"run         {r.run_id}",
        f"status      {r.status}",
        f"pipeline    {r.pipeline}",
        f"spec        {r.spec}",
        f"cwd         {r.cwd}",
        f"input       {r.input.kind} {value}".rstrip(),
        f"input fp    {r.input_fingerprint or '-'}",
        f"started     {_when(r.started_at)}",
        f"ended       {_when(r.ended_at)}",
    ]
    if r.resumed_from:
        lines.append(f"resumes     {r.resumed_from}")
    if r.force:
        lines.append(f"forced      {', '.join(r.force)}")
    lines.append("stages:")
    width = max((len(s) for s in r.stages), default=5)
    lines.extend(f"  {sid.ljust(width)}  {status}" for sid, status in r.stages.items())
    _out("\n".join(lines))


def main() -> None:
    """Entry point of the ``pipe`` console script."""
    app()
