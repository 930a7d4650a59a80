"""Library functions behind the ``pipe`` commands: cache admin, doctor, graph, JSON views.

Every ``pipe`` command parses its arguments, calls one function from here (or the
executor, the planner, the journal), and renders the answer; these functions are
tested without a terminal. None of them imports typer or rich.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Protocol

from ._listing import (
    SORTS,
    TABLE_FIELDS,
    columns_of,
    entry_columns,
    entry_rows,
    format_bytes,
    format_columns,
    listing_order,
    rows_of,
    table_text,
    take,
)
from .cache._layout import DEFAULT_CACHE_DIR as DEFAULT_CACHE_DIR
from .cache._summary import EntrySummary
from .errors import CacheError, FingerprintError, SpecError, StoreError

if TYPE_CHECKING:
    from ._definition import PipelineDefinition
    from ._journal import InputSpec
    from ._results import PipelineResult
    from .cache._entry import CacheStore, EntryMeta

# Every ``pipe`` command imports this module: what only some functions need (pydantic,
# the pipeline models, the journal) is imported in those functions, so that ``pipe
# cache ls`` and ``pipe --help`` start fast.

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DoctorReport",
    "EntryRow",
    "Finding",
    "GcReport",
    "accept_stage",
    "clear_entries",
    "delete_entries",
    "doctor",
    "entries_text",
    "entry_rows",
    "entry_to_dict",
    "find_entry",
    "format_bytes",
    "format_entries",
    "gc_entries",
    "graph_text",
    "jsonable",
    "list_entries",
    "open_store",
    "parse_duration",
    "parse_size",
    "preview_entry",
    "probe_pipeline",
    "result_to_dict",
    "select_entries",
]


# -- the store -----------------------------------------------------------------------------


def open_store(cache_dir: str | os.PathLike[str], *, create: bool = True) -> CacheStore | None:
    """Open the on-disk store in ``cache_dir``.

    Args:
        cache_dir: The cache directory.
        create: Create it when missing. When False, a missing directory gives None
            (read-only commands show an empty cache without creating one).

    Raises:
        StoreError: the path is a file, or the store cannot be opened.
        CacheFormatError: the directory was written by a newer store format.
    """
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise StoreError(
            f"Cache directory {path} is a file, not a directory; pass --cache-dir DIR "
            "(or set TWINKLR_PIPE_CACHE_DIR) to a directory"
        )
    if not create and not path.is_dir():
        return None
    from .cache._store import DiskCacheStore

    return DiskCacheStore(path)


# -- sizes, durations, times -------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``2GB``, ``500MB``, ``10KB``, ``123`` or ``123B``.

    Units are binary (1 KB = 1024 bytes); ``KiB``/``MiB``/``GiB`` are accepted too.

    Raises:
        ValueError: not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size '{text}'; use a number and B, KB, MB, GB or TB (2GB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30s``, ``15m``, ``12h``, ``7d`` or ``2w``.

    Raises:
        ValueError: not a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"invalid duration '{text}'; use a number and s, m, h, d or w (7d, 12h, 30m)"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- listing -------------------------------------------------------------------------------


#: The fields of an entry that ``pipe cache ls``, ``cache clear`` and ``cache gc`` use (a
#: light ``EntryMeta``): the stores' ``EntrySummary``, under the name ``admin`` exports.
EntryRow = EntrySummary


class _EntryLike(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def entry_id(self) -> str: ...
    @property
    def pipeline(self) -> str: ...
    @property
    def stage_id(self) -> str: ...
    @property
    def stage_identity(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def version_is_source_hash(self) -> bool: ...
    @property
    def item_index(self) -> int | None: ...
    @property
    def codec(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def last_used_at(self) -> float: ...
    @property
    def compute_duration_ms(self) -> float: ...
    @property
    def run_id(self) -> str: ...


def select_entries(
    store: CacheStore | None,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    older_than: float | None = None,
    now: float | None = None,
) -> list[EntryRow]:
    """Entries matching every filter given (all entries without filters).

    Args:
        store: The store (None: an empty cache).
        stage: Stage id the entry was stored under.
        pipeline: Pipeline name the entry was stored under.
        older_than: Seconds: only entries not used for at least this long.
        now: The current time (for tests).
    """
    if store is None:
        return []
    cutoff = None if older_than is None else (now if now is not None else time.time()) - older_than
    return [
        m
        for m in entry_rows(store)
        if (stage is None or m.stage_id == stage)
        and (pipeline is None or m.pipeline == pipeline)
        and (cutoff is None or m.last_used_at < cutoff)
    ]


def list_entries(
    store: CacheStore | None,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    sort: str = "created",
) -> list[EntryRow]:
    """Entries for ``pipe cache ls``, sorted ascending by ``created``, ``used`` or ``size``.

    Ascending, so the newest, most recently used or largest entries are listed last,
    next to the footer. Ties are ordered by key, then variant.

    Raises:
        ValueError: unknown sort.
    """
    if sort not in SORTS:
        raise ValueError(f"invalid sort '{sort}'; use created, used or size")
    columns = entry_columns(store)
    order = listing_order(columns, stage=stage, pipeline=pipeline, sort=sort)
    return rows_of(take(columns, order))


def format_entries(entries: Sequence[_EntryLike]) -> str:
    """The text table of ``pipe cache ls``: one row per entry and a footer.

    Plain text, columns padded with spaces; the footer gives the entry count and the
    total size (human and exact bytes). Built column by column (``_listing``): 100,000
    rows take a fraction of a second.
    """
    rows = [e if isinstance(e, EntrySummary) else EntrySummary.of(e) for e in entries]  # type: ignore[arg-type]
    columns = columns_of(rows)
    return format_columns([columns[field] for field in TABLE_FIELDS])


def entries_text(
    store: CacheStore | None,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    sort: str = "created",
) -> str:
    """What ``pipe cache ls`` prints: ``format_entries(list_entries(store, ...))``.

    The same table, built straight from the store's columns (``_listing``), without one
    object per entry (``scripts/bench_cli_cache_ls.py`` measures it on 100,000 entries).

    Raises:
        ValueError: unknown sort.
    """
    if sort not in SORTS:
        raise ValueError(f"invalid sort '{sort}'; use created, used or size")
    return table_text(entry_columns(store), stage=stage, pipeline=pipeline, sort=sort)


def entry_to_dict(meta: _EntryLike) -> dict[str, Any]:
    """One entry as ``pipe cache ls --json`` prints it."""
    return {
        "key": meta.key,
        "entry_id": meta.entry_id,
        "variant": meta.variant,
        "pipeline": meta.pipeline,
        "stage": meta.stage_id,
        "stage_identity": meta.stage_identity,
        "version": meta.version,
        "version_is_source_hash": meta.version_is_source_hash,
        "item_index": meta.item_index,
        "codec": meta.codec,
        "size_bytes": meta.size_bytes,
        "created_at": _iso(meta.created_at),
        "last_used_at": _iso(meta.last_used_at),
        "compute_duration_ms": meta.compute_duration_ms,
        "run_id": meta.run_id,
    }


def find_entry(store: CacheStore | None, prefix: str) -> EntryMeta:
    """The entry whose entry id (``key.variant``) starts with ``prefix``.

    Raises:
        CacheError: no entry matches, or several do (the message lists a few).
    """
    prefix = prefix.strip().lower()
    if not prefix:
        raise CacheError("Give a key prefix (pipe cache ls lists the keys)")
    if store is not None:
        exact = store.get_meta(prefix) if "." in prefix else None
        if exact is not None:
            return exact
        matches = [m for m in entry_rows(store) if m.entry_id.startswith(prefix)]
    else:
        matches = []
    if len(matches) == 1:
        assert store is not None
        found = store.get_meta(matches[0].entry_id)
        if found is not None:
            return found
        raise CacheError(
            f"The cache entry {matches[0].entry_id[:16]} matching '{prefix}' is gone or unreadable"
        )
    if not matches:
        raise CacheError(f"No cache entry with a key starting with '{prefix}'")
    shown = ", ".join(f"{m.entry_id[:16]} ({m.stage_id})" for m in matches[:5])
    more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
    raise CacheError(
        f"Key prefix '{prefix}' is ambiguous: {len(matches)} entries match ({shown}{more}); "
        "give more characters"
    )


def preview_entry(store: CacheStore, meta: EntryMeta, limit: int = 400) -> str:
    """A short preview of an entry's stored output, without executing stored content.

    ``json/1`` payloads are shown as their JSON text (classes named in it are not
    imported); pickle payloads are never loaded.
    """
    got = store.get(meta.entry_id)
    if got is None:
        return "<payload missing or damaged>"
    _, payload = got
    if meta.codec.startswith("pickle"):
        return f"<pickle payload, {format_bytes(len(payload))}; not loaded>"
    if meta.codec.startswith("json"):
        text = payload.decode("utf-8", errors="replace")
    elif meta.codec.startswith("bytes"):
        text = repr(payload[:limit])
    else:
        text = f"<{meta.codec} payload, {format_bytes(len(payload))}>"
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def delete_entries(store: CacheStore, entries: Iterable[EntryRow | EntryMeta]) -> tuple[int, int]:
    """Delete entries; return how many existed and their total size in bytes."""
    count = size = 0
    for meta in entries:
        if store.delete(meta.entry_id):
            count += 1
            size += meta.size_bytes
    return count, size


def clear_entries(
    store: CacheStore | None,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    older_than: float | None = None,
) -> tuple[int, int]:
    """Delete the entries matching the filters (all without filters): (count, bytes)."""
    if store is None:
        return 0, 0
    return delete_entries(
        store, select_entries(store, stage=stage, pipeline=pipeline, older_than=older_than)
    )


@dataclasses.dataclass(frozen=True)
class GcReport:
    """What ``gc_entries`` evicted (or would evict, in a dry run)."""

    evicted: list[EntryRow]
    freed_bytes: int
    #: Total size of the entries left.
    remaining_bytes: int
    remaining_entries: int
    #: Entries kept because a recent run used them.
    protected: int
    dry_run: bool
    #: True when ``max_size`` could not be reached without evicting protected entries.
    over_budget: bool = False


def gc_entries(
    store: CacheStore | None,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    protect: Iterable[str] = (),
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Evict least-recently-used entries: first those unused for ``older_than`` seconds,
    then more, oldest use first, until the total size is at most ``max_size`` bytes.

    Entries whose id is in ``protect`` (those the last runs used) are never evicted.
    """
    metas = entry_rows(store)
    protected = set(protect)
    metas.sort(key=lambda m: (m.last_used_at, m.created_at, m.entry_id))
    now = time.time() if now is None else now
    evict: list[EntryRow] = []
    keep: list[EntryRow] = []
    kept_protected = 0
    for meta in metas:
        if meta.entry_id in protected:
            kept_protected += 1
            keep.append(meta)
        elif older_than is not None and meta.last_used_at < now - older_than:
            evict.append(meta)
        else:
            keep.append(meta)
    total = sum(m.size_bytes for m in keep)
    over = False
    if max_size is not None and total > max_size:
        survivors: list[EntryRow] = []
        for meta in keep:  # least recently used first
            if total > max_size and meta.entry_id not in protected:
                evict.append(meta)
                total -= meta.size_bytes
            else:
                survivors.append(meta)
        keep = survivors
        over = total > max_size
    if not dry_run and store is not None:
        for meta in evict:
            store.delete(meta.entry_id)
    return GcReport(
        evicted=evict,
        freed_bytes=sum(m.size_bytes for m in evict),
        remaining_bytes=total,
        remaining_entries=len(keep),
        protected=kept_protected,
        dry_run=dry_run,
        over_budget=over,
    )


def accept_stage(store: CacheStore, pipeline: PipelineDefinition, stage_id: str) -> int:
    """Re-key a stage's entries from an old code hash to the current one; return the count.

    For a cosmetic edit (a renamed local, a reworded log line): each entry of the
    stage (same identity) whose version is another source hash, but whose
    configuration fingerprint equals the current one, is copied to the key the
    current code gives for the same inputs, and the old entry is deleted. Outputs
    are unchanged, so downstream stages stay cached.

    Raises:
        SpecError: the pipeline has no stage ``stage_id``.
        CacheError: the stage has an explicit version, or its configuration cannot
            be fingerprinted.
    """
    from .cache._keys import compute_key, stage_parts

    try:
        sdef = pipeline.get_stage(stage_id)
    except KeyError as exc:
        raise SpecError(str(exc.args[0])) from None
    parts = stage_parts(sdef.stage, stage_id)
    if not parts.version_is_source_hash:
        raise CacheError(
            f"Stage '{stage_id}' has an explicit version '{parts.version}': its keys change "
            "only when the version does, so there is nothing to accept"
        )
    candidates = [
        m
        for m in store.iter_metadata()
        if m.stage_identity == parts.identity
        and m.version != parts.version
        and m.version_is_source_hash
        and m.config_fingerprint == parts.config_fingerprint
    ]
    candidates.sort(key=lambda m: m.last_used_at, reverse=True)  # newest wins a clash
    moved = 0
    for old in candidates:
        names = old.input_names if len(old.input_names) > 1 else None
        new_key = compute_key(parts, names, old.input_hashes)
        got = store.get(old.entry_id)
        if got is None:
            continue
        meta, payload = got
        new = meta.model_copy(update={"key": new_key, "version": parts.version})
        if store.get_meta(new.entry_id) is None:
            store.put(new, payload)
            moved += 1
        store.delete(old.entry_id)
    return moved


# -- graph ---------------------------------------------------------------------------------


def _marks(pipeline: PipelineDefinition, sid: str) -> list[str]:
    from ._definition import ExecutionPattern

    sdef = pipeline.get_stage(sid)
    marks = []
    if sdef.pattern is ExecutionPattern.FAN_OUT:
        over = sdef.fan_out_over or (sdef.inputs[0] if sdef.inputs else "the initial input")
        marks.append(f"fan-out over {over}")
    if sdef.condition is not None or sdef.pattern is ExecutionPattern.CONDITIONAL:
        marks.append("conditional")
    if not sdef.cache:
        marks.append("not cached")
    return marks


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def graph_text(pipeline: PipelineDefinition, fmt: str = "text") -> str:
    """The pipeline's DAG as ``text``, ``mermaid`` (flowchart) or ``dot`` (Graphviz).

    FAN_OUT stages are marked (a subroutine box in mermaid, a double box in dot),
    and so are conditional ones (a rhombus, a diamond).

    Raises:
        DefinitionError: the pipeline is invalid.
        ValueError: unknown format.
    """
    from ._definition import ExecutionPattern
    from ._graph import topological_order
    from .errors import DefinitionError

    problems = pipeline.validate_pipeline()
    if problems:
        raise DefinitionError(problems)
    order = topological_order({s.id: list(s.inputs) for s in pipeline.stages})
    if fmt == "text":
        lines = [f"pipeline {pipeline.name}"]
        for sid in order:
            sdef = pipeline.get_stage(sid)
            marks = _marks(pipeline, sid)
            tail = f"  [{'; '.join(marks)}]" if marks else ""
            source = ", ".join(sdef.inputs) if sdef.inputs else "(initial input)"
            lines.append(f"  {sid} <- {source}{tail}")
        return "\n".join(lines)
    if fmt == "mermaid":
        node = {sid: f"s{i}" for i, sid in enumerate(order)}
        lines = ["flowchart TD"]
        for sid in order:
            sdef = pipeline.get_stage(sid)
            label = "<br/>".join([sid, *(f"({m})" for m in _marks(pipeline, sid))])
            label = label.replace('"', "#quot;")
            if sdef.condition is not None or sdef.pattern is ExecutionPattern.CONDITIONAL:
                lines.append(f'    {node[sid]}{{"{label}"}}')
            elif sdef.pattern is ExecutionPattern.FAN_OUT:
                lines.append(f'    {node[sid]}[["{label}"]]')
            else:
                lines.append(f'    {node[sid]}["{label}"]')
        for sid in order:
            for dep in pipeline.get_stage(sid).inputs:
                lines.append(f"    {node[dep]} --> {node[sid]}")
        return "\n".join(lines)
    if fmt == "dot":
        lines = [f"digraph {_quoted(pipeline.name)} {{", "    rankdir=TB;", "    node [shape=box];"]
        for sid in order:
            sdef = pipeline.get_stage(sid)
            label = "\n".join([sid, *(f"({m})" for m in _marks(pipeline, sid))])
            attrs = [f"label={_quoted(label)}"]
            if sdef.condition is not None or sdef.pattern is ExecutionPattern.CONDITIONAL:
                attrs.append("shape=diamond")
            if sdef.pattern is ExecutionPattern.FAN_OUT:
                attrs.append("peripheries=2")
            lines.append(f"    {_quoted(sid)} [{', '.join(attrs)}];")
        for sid in order:
            for dep in pipeline.get_stage(sid).inputs:
                lines.append(f"    {_quoted(dep)} -> {_quoted(sid)};")
        lines.append("}")
        return "\n".join(lines)
    raise ValueError(f"invalid graph format '{fmt}'; use text, mermaid or dot")


# -- JSON views ----------------------------------------------------------------------------


def jsonable(value: Any, _active: set[int] | None = None) -> Any:
    """``value`` as plain JSON data, never raising.

    Pydantic models become ``model_dump(mode="json")``, dataclasses dicts, tuples
    and sets lists, enums their value, dates ISO strings, non-finite floats strings
    (``"nan"``), bytes a short description, and anything else its ``repr``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    active = _active if _active is not None else set()
    marker = id(value)
    if marker in active:
        return "<cycle>"
    active.add(marker)
    try:
        return _jsonable_container(value, active)
    except Exception:
        return _repr(value)
    finally:
        active.discard(marker)


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= 1000 else text[:1000] + "…"


def _jsonable_container(value: Any, active: set[int]) -> Any:
    from pydantic import BaseModel

    if isinstance(value, dict):
        return {
            (k if isinstance(k, str) else str(jsonable(k, active))): jsonable(v, active)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [jsonable(v, active) for v in items]
    if isinstance(value, BaseModel):
        try:
            return value.model_dump(mode="json")
        except Exception:
            return {k: jsonable(v, active) for k, v in dict(value).items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name, None), active)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return jsonable(value.value, active)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | decimal.Decimal | PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    path = getattr(value, "path", None)
    if type(value).__name__ == "FileInput" and path is not None:
        return str(path)
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        if tuple(shape) == () and hasattr(value, "item"):  # a numpy scalar
            return jsonable(value.item(), active)
        return f"<array shape={tuple(shape)} dtype={value.dtype}>"
    return _repr(value)


def result_to_dict(result: PipelineResult) -> dict[str, Any]:
    """A ``PipelineResult`` as ``pipe run --json`` prints it (JSON-safe)."""
    stages: dict[str, Any] = {}
    for sid, res in result.stage_results.items():
        meta = res.metadata
        entry: dict[str, Any] = {
            "status": meta.get("status"),
            "error": res.error,
            "duration_ms": jsonable(meta.get("duration_ms")),
            "cache": meta.get("cache"),
            "key": meta.get("key"),
            "saved_ms": jsonable(meta.get("saved_ms", 0.0)),
            "pool_wait_ms": jsonable(meta.get("pool_wait_ms", 0.0)),
        }
        if meta.get("reason") is not None:
            entry["reason"] = meta.get("reason")
        if meta.get("items") is not None:
            entry["items"] = meta.get("items")
            entry["items_cached"] = meta.get("items_cached")
        stages[sid] = entry
    data: dict[str, Any] = {
        "success": result.success,
        "run_id": result.run_id,
        "outputs": jsonable(result.outputs),
        "executed": list(result.executed),
        "cached": list(result.cached),
        "skipped": list(result.skipped),
        "failed_stages": list(result.failed_stages),
        "cancelled": list(result.cancelled),
        "total_duration_ms": jsonable(result.total_duration_ms),
        "stages": stages,
    }
    if result.metadata.get("errors"):
        data["errors"] = jsonable(result.metadata["errors"])
    return data


# -- doctor --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Finding:
    """One cache hazard ``pipe doctor`` found."""

    #: "error" (keys are wrong or cannot be made) or "warning" (worth knowing).
    level: str
    #: unstable-key, unfingerprintable, no-version, unresolved, state-reads, probe
    kind: str
    stage: str | None
    message: str


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    """Everything ``doctor`` found, errors first."""

    pipeline: str
    stages: int
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not any(f.level == "error" for f in self.findings)


def probe_pipeline(pipeline: PipelineDefinition, initial_input: Any) -> dict[str, Any]:
    """Every cache key part ``doctor`` compares across interpreters, as JSON data."""
    from .cache._fingerprint import fingerprint
    from .cache._keys import stage_parts

    stages: dict[str, Any] = {}
    for sdef in pipeline.stages:
        if not sdef.cache:
            continue
        try:
            parts = stage_parts(sdef.stage, sdef.id)
        except (FingerprintError, TypeError, CacheError) as exc:
            stages[sdef.id] = {"error": str(exc)}
            continue
        stages[sdef.id] = {
            "identity": parts.identity,
            "version": parts.version,
            "version_is_source_hash": parts.version_is_source_hash,
            "config": dict(parts.config_fields),
        }
    probe: dict[str, Any] = {"stages": stages}
    if any(not s.inputs for s in pipeline.stages):
        try:
            probe["input"] = fingerprint(initial_input)
        except (FingerprintError, TypeError) as exc:
            probe["input_error"] = str(exc)
    return probe


def _probe_main() -> None:
    """Entry point of the fresh interpreter ``doctor`` starts (spec and input on stdin)."""
    from ._journal import InputSpec
    from ._loader import load_pipeline

    request = json.loads(sys.stdin.read())
    pipeline, _ = load_pipeline(request["spec"])
    probe = probe_pipeline(pipeline, InputSpec.model_validate(request["input"]).build())
    sys.stdout.write(json.dumps(probe))


def _fresh_probe(spec: str, input_spec: InputSpec, cwd: str) -> dict[str, Any]:
    seed = os.environ.get("PYTHONHASHSEED", "")
    child_seed = str(int(seed) + 1) if seed.isdigit() else "4242"
    env = {**os.environ, "PYTHONHASHSEED": child_seed}
    code = "from twinklr_pipe._admin import _probe_main; _probe_main()"
    request = json.dumps({"spec": spec, "input": input_spec.model_dump()})
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=request,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def doctor(
    pipeline: PipelineDefinition,
    *,
    spec: str,
    input: InputSpec,
    store: CacheStore | None = None,
    cwd: str | None = None,
) -> DoctorReport:
    """Check a pipeline for cache hazards, without running it.

    * unstable keys: every stage's identity, version and configuration fields, and the
      input, are fingerprinted here and in a fresh interpreter with another
      ``PYTHONHASHSEED``; any difference is an error;
    * configuration fields (or an input) that cannot be fingerprinted: errors;
    * stages without an explicit ``version`` (their source hash stands in): warnings;
    * names the source hash could not resolve (they count by name only): warnings;
    * stages whose cached entries (in ``store``) recorded reads of context state: warnings.

    Args:
        pipeline: The loaded pipeline.
        spec: The spec it was loaded from (the fresh interpreter loads it again).
        input: The initial input, as the journal records it.
        store: The cache to look for state reads in (None: skip that check).
        cwd: Where the fresh interpreter runs (default: the current directory).
    """
    from .cache._identity import source_report

    findings: list[Finding] = []
    here = probe_pipeline(pipeline, input.build())
    try:
        there: dict[str, Any] | None = _fresh_probe(spec, input, cwd or os.getcwd())
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
        there = None
        findings.append(
            Finding(
                "error", "probe", None, f"could not load the pipeline in a fresh interpreter: {exc}"
            )
        )
    if "input_error" in here:
        findings.append(
            Finding("error", "unfingerprintable", None, f"input: {here['input_error']}")
        )
    elif there is not None and here.get("input") != there.get("input"):
        findings.append(
            Finding(
                "error",
                "unstable-key",
                None,
                "the input's fingerprint differs between interpreters "
                f"({str(here.get('input'))[:8]} vs {str(there.get('input'))[:8]})",
            )
        )
    for sdef in pipeline.stages:
        sid = sdef.id
        mine = here["stages"].get(sid)
        if mine is None:
            continue
        if "error" in mine:
            findings.append(Finding("error", "unfingerprintable", sid, mine["error"]))
            continue
        theirs = (there or {}).get("stages", {}).get(sid)
        if there is not None:
            findings.extend(_compare(sid, mine, theirs))
        if mine["version_is_source_hash"]:
            findings.append(
                Finding(
                    "warning",
                    "no-version",
                    sid,
                    "no explicit version: a hash of its source code stands in "
                    '(set version = "1" to control when its entries go stale)',
                )
            )
            target = getattr(sdef.stage, "fn", None) or type(sdef.stage)
            try:
                report = source_report(target)
            except Exception as exc:  # hashing user code: report, never crash the doctor
                findings.append(Finding("warning", "unresolved", sid, f"source walk failed: {exc}"))
            else:
                findings.extend(
                    Finding(
                        "warning",
                        "unresolved",
                        sid,
                        f"{name}: not followed by the source hash (edits to it do not "
                        "invalidate the stage)",
                    )
                    for name in report.unresolved
                )
    if store is not None:
        findings.extend(_state_read_findings(pipeline, store))
    findings.sort(key=lambda f: (f.level != "error", f.stage or ""))
    return DoctorReport(pipeline.name, len(pipeline.stages), findings)


def _compare(sid: str, mine: dict[str, Any], theirs: dict[str, Any] | None) -> list[Finding]:
    if theirs is None or "error" in theirs:
        why = theirs.get("error") if theirs else "missing"
        return [
            Finding("error", "unstable-key", sid, f"the fresh interpreter could not key it: {why}")
        ]
    diffs = []
    if mine["identity"] != theirs["identity"]:
        diffs.append(f"identity {mine['identity']} vs {theirs['identity']}")
    if mine["version"] != theirs["version"]:
        diffs.append(f"version {mine['version'][:12]} vs {theirs['version'][:12]}")
    fields = sorted(set(mine["config"]) | set(theirs["config"]))
    changed = [f for f in fields if mine["config"].get(f) != theirs["config"].get(f)]
    if changed:
        diffs.append("configuration field " + ", ".join(f"'{f}'" for f in changed))
    if not diffs:
        return []
    return [
        Finding(
            "error",
            "unstable-key",
            sid,
            "key differs in a fresh interpreter with another PYTHONHASHSEED: "
            + "; ".join(diffs)
            + " (it would miss the cache in every new process)",
        )
    ]


def _state_read_findings(pipeline: PipelineDefinition, store: CacheStore) -> list[Finding]:
    from .cache._identity import stage_identity

    by_identity: dict[str, list[str]] = {}
    for sdef in pipeline.stages:
        try:
            by_identity.setdefault(stage_identity(sdef.stage), []).append(sdef.id)
        except Exception:  # a hostile stage object: nothing to match
            continue
    reads: dict[str, set[str]] = {}
    try:
        metas = list(store.iter_metadata())
    except StoreError:
        return []
    for meta in metas:
        if not meta.state_reads:
            continue
        for sid in by_identity.get(meta.stage_identity, []):
            reads.setdefault(sid, set()).update(meta.state_reads)
    return [
        Finding(
            "warning",
            "state-reads",
            sid,
            "its cached entries recorded reads of context state "
            + ", ".join(sorted(f"'{k}'" for k in keys))
            + "; a changed value is a miss (pass it as an input to make it explicit)",
        )
        for sid, keys in sorted(reads.items())
    ]
