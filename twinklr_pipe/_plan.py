"""``plan_run``: what a run would re-run and why, without executing anything.

It walks the stages in dependency order, computes each key the way the executor
does (from stored output hashes of cached upstream stages), and looks it up. A
miss is explained against the closest stored entry of the same stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ._context import PipelineContext
from ._definition import ExecutionPattern, PipelineDefinition
from ._graph import topological_order
from .cache._codec import decode, decode_json_tree
from .cache._entry import CacheStore, EntryMeta
from .cache._fingerprint import digest, sequence_digest
from .cache._keys import StageParts, compute_key, stage_parts
from .cache._runtime import reads_match
from .errors import CacheError, DefinitionError, FingerprintError

__all__ = ["RunPlan", "StagePlan", "plan_run"]


class StagePlan(BaseModel):
    """The plan for one stage."""

    model_config = ConfigDict(frozen=True)

    stage_id: str
    #: "cached", "will run", "unknown" (depends on an upstream that must run first)
    status: str
    #: One line: why it will run (or "cached").
    reason: str
    key: str | None = None
    #: Details of a miss: one line per changed part (``version: 1 → 2``).
    changes: list[str] = Field(default_factory=list)
    #: For FAN_OUT: items in total and how many are cached.
    items: int | None = None
    items_cached: int | None = None
    #: Stored compute time that a hit saves.
    saved_ms: float = 0.0


class RunPlan(BaseModel):
    """The plan for a whole run, stages in dependency order."""

    model_config = ConfigDict(frozen=True)

    pipeline: str
    stages: list[StagePlan]

    def get(self, stage_id: str) -> StagePlan:
        """The plan of ``stage_id``; KeyError naming it when unknown."""
        for plan in self.stages:
            if plan.stage_id == stage_id:
                return plan
        raise KeyError(f"No stage '{stage_id}' in this plan")

    @property
    def will_run(self) -> list[str]:
        """Stages that will (or may) execute."""
        return [p.stage_id for p in self.stages if p.status != "cached"]


class _Known:
    """What the planner knows about a stage's output: its hash, and maybe its value."""

    def __init__(self, digest_: bytes | None, value: Any = None, has_value: bool = False) -> None:
        self.digest = digest_
        self.value = value
        self.has_value = has_value


def plan_run(
    pipeline: PipelineDefinition,
    initial_input: Any = None,
    *,
    cache: CacheStore,
    force: Iterable[str] = (),
    context: PipelineContext | None = None,
    allow_pickle: bool = False,
) -> RunPlan:
    """Say, for every stage, whether a run would serve it from ``cache`` or run it, and why.

    Nothing is executed. Conditions are not evaluated (they may depend on what
    upstream stages do); a CONDITIONAL stage is planned as if it runs.

    Raises:
        DefinitionError: the pipeline is invalid.
    """
    problems = pipeline.validate_pipeline()
    if problems:
        raise DefinitionError(problems)
    forced = set(force)
    state: dict[str, Any] = dict(dict.items(context.state)) if context is not None else {}
    edges = {s.id: list(s.inputs) for s in pipeline.stages}
    known: dict[str, _Known | None] = {}
    index: dict[str, list[EntryMeta]] | None = None
    initial: _Known | None = None
    plans: list[StagePlan] = []

    def explain(parts: StageParts, sid: str, key: str, hashes: list[str]) -> tuple[str, list[str]]:
        nonlocal index
        if index is None:
            index = {}
            for meta in cache.iter_metadata():
                index.setdefault(meta.stage_identity, []).append(meta)
        return _explain(parts, sid, pipeline.name, key, hashes, index.get(parts.identity, []))

    for sid in topological_order(edges):
        sdef = pipeline.get_stage(sid)
        unknown = [dep for dep in sdef.inputs if known.get(dep) is None]
        if not sdef.cache:
            plans.append(StagePlan(stage_id=sid, status="will run", reason="cache=False"))
            known[sid] = None
            continue
        if unknown:
            plans.append(
                StagePlan(
                    stage_id=sid,
                    status="unknown",
                    reason=f"unknown until {unknown[0]} runs",
                )
            )
            known[sid] = None
            continue
        try:
            parts = stage_parts(sdef.stage, sid)
            if initial is None and not sdef.inputs:
                initial = _Known(digest(initial_input), initial_input, True)
        except (FingerprintError, CacheError) as exc:
            plans.append(StagePlan(stage_id=sid, status="will run", reason=f"error: {exc}"))
            known[sid] = None
            continue
        names = list(sdef.inputs)
        upstream: list[_Known] = [k for k in (known[d] for d in names) if k is not None]
        if not names:
            assert initial is not None
            upstream = [initial]

        if sdef.pattern is ExecutionPattern.FAN_OUT:
            plan, out = _plan_fan_out(
                sdef.id,
                sdef.fan_out_over,
                names,
                upstream,
                parts,
                cache,
                state,
                sid in forced,
                allow_pickle,
            )
            plans.append(plan)
            known[sid] = out
            continue

        hashes = [k.digest.hex() for k in upstream if k.digest is not None]
        key = compute_key(parts, tuple(names) if len(names) > 1 else None, hashes)
        if sid in forced:
            plans.append(StagePlan(stage_id=sid, status="will run", reason="forced", key=key))
            known[sid] = None
            continue
        meta = _find(cache, key, state)
        if meta is not None:
            _replay(meta, state)
            known[sid] = _Known(bytes.fromhex(meta.output_hash))
            plans.append(
                StagePlan(
                    stage_id=sid,
                    status="cached",
                    reason="cached",
                    key=key,
                    saved_ms=meta.compute_duration_ms,
                )
            )
            continue
        reason, changes = explain(parts, sid, key, hashes)
        plans.append(
            StagePlan(stage_id=sid, status="will run", reason=reason, key=key, changes=changes)
        )
        known[sid] = None
    return RunPlan(pipeline=pipeline.name, stages=plans)


def _find(cache: CacheStore, key: str, state: dict[str, Any]) -> EntryMeta | None:
    for meta in cache.variants(key):
        if not meta.state_reads or reads_match(meta.state_reads, state):
            return meta
    return None


def _replay(meta: EntryMeta, state: dict[str, Any]) -> None:
    for name, tree in meta.state_writes.items():
        if tree == {"deleted": True}:
            state.pop(name, None)
        else:
            state[name] = decode_json_tree(tree["value"])


def _plan_fan_out(
    sid: str,
    fan_out_over: str | None,
    names: list[str],
    upstream: list[_Known],
    parts: StageParts,
    cache: CacheStore,
    state: dict[str, Any],
    forced: bool,
    allow_pickle: bool,
) -> tuple[StagePlan, _Known | None]:
    fanned = fan_out_over or (names[0] if names else None)
    position = names.index(fanned) if fanned in names else 0
    source = upstream[position]
    items, error = _value_of(source, cache, allow_pickle)
    if error is not None or not isinstance(items, list | tuple):
        reason = error or "input is not a list"
        return StagePlan(stage_id=sid, status="will run", reason=reason), None
    hashes = [k.digest.hex() if k.digest is not None else "" for k in upstream]
    item_outputs: list[bytes] = []
    cached = 0
    saved_ms = 0.0
    first_key: str | None = None
    for item in items:
        try:
            item_hex = digest(item).hex()
        except FingerprintError as exc:
            return StagePlan(stage_id=sid, status="will run", reason=f"error: {exc}"), None
        item_hashes = list(hashes)
        item_hashes[position] = item_hex
        key = compute_key(parts, tuple(names) if len(names) > 1 else None, item_hashes)
        first_key = first_key or key
        meta = None if forced else _find(cache, key, state)
        if meta is not None:
            cached += 1
            saved_ms += meta.compute_duration_ms
            item_outputs.append(bytes.fromhex(meta.output_hash))
    total = len(items)
    if forced:
        plan = StagePlan(
            stage_id=sid, status="will run", reason="forced", items=total, items_cached=0
        )
        return plan, None
    if cached == total:
        plan = StagePlan(
            stage_id=sid,
            status="cached",
            reason="cached",
            key=first_key,
            items=total,
            items_cached=cached,
            saved_ms=saved_ms,
        )
        return plan, _Known(sequence_digest(item_outputs))
    reason = (
        f"{total - cached} of {total} items have no entry (new or changed items)"
        if cached
        else f"no entry for its {total} items"
    )
    return (
        StagePlan(
            stage_id=sid,
            status="will run",
            reason=reason,
            key=first_key,
            items=total,
            items_cached=cached,
        ),
        None,
    )


def _value_of(known: _Known, cache: CacheStore, allow_pickle: bool) -> tuple[Any, str | None]:
    """The value behind a known hash: needed to enumerate FAN_OUT items."""
    if known.has_value:
        return known.value, None
    if known.digest is None:
        return None, "input unknown"
    target = known.digest.hex()
    for meta in cache.iter_metadata():
        if meta.output_hash == target and meta.item_index is None:
            got = cache.get(meta.entry_id)
            if got is None:
                continue
            try:
                return decode(got[0].codec, got[1], allow_pickle=allow_pickle), None
            except CacheError:
                continue
    return None, "its input list is not readable from the cache"


def _explain(
    parts: StageParts,
    sid: str,
    pipeline: str,
    key: str,
    hashes: list[str],
    candidates: list[EntryMeta],
) -> tuple[str, list[str]]:
    """Why ``key`` misses, compared with the newest entry of the same stage."""
    if not candidates:
        return "no entry for this key (never run)", []
    same_place = [m for m in candidates if m.stage_id == sid and m.pipeline == pipeline]
    pool = [m for m in (same_place or candidates) if m.item_index is None] or (
        same_place or candidates
    )
    best = max(pool, key=lambda m: m.last_used_at)
    changes: list[str] = []
    if best.version != parts.version:
        old = best.version[:12] if best.version_is_source_hash else best.version
        new = parts.version[:12] if parts.version_is_source_hash else parts.version
        what = "code changed" if parts.version_is_source_hash else "version changed"
        changes.append(f"{what}: {old} → {new}")
    fields = sorted(
        set(best.config_fields) | set(parts.config_fields),
    )
    changed_fields = [f for f in fields if best.config_fields.get(f) != parts.config_fields.get(f)]
    if changed_fields:
        changes.append(f"config changed: {', '.join(changed_fields)}")
    changed_inputs = [
        name
        for name, old, new in zip(best.input_names, best.input_hashes, hashes, strict=False)
        if old != new
    ]
    if len(best.input_hashes) != len(hashes):
        changed_inputs = list(best.input_names) or ["inputs"]
    if changed_inputs:
        changes.append(f"input changed: {', '.join(changed_inputs)}")
    if not changes and best.key == key:
        changes.append("state read changed: " + ", ".join(sorted(best.state_reads)))
    if not changes:
        changes.append("no entry for this key")
    return changes[0], changes
