"""Pure graph logic: validation, topological order, cycle paths, downstream sets.

Everything here is O(stages + edges) and touches no event loop or clock.
"""

from __future__ import annotations

import difflib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._definition import PipelineDefinition

__all__ = ["dependants", "downstream", "find_cycle", "topological_order", "validate"]

#: Unknown input names that get a "did you mean" hint; the rest are listed without one.
_MAX_HINTED_NAMES = 5


def validate(pipeline: PipelineDefinition) -> list[str]:
    """Every problem of a definition, grouped by kind in a fixed order.

    Duplicate ids, unknown inputs, cycles, no entry point, FAN_OUT problems,
    non-positive limits, then CONDITIONAL stages without a condition and stage
    objects without ``execute``.
    """
    from ._definition import ExecutionPattern

    problems: list[str] = []
    stages = pipeline.stages
    if not stages:
        return [f"Pipeline '{pipeline.name}' has no stages; add at least one StageDefinition"]

    seen: set[str] = set()
    duplicates: list[str] = []
    for s in stages:
        if s.id in seen and s.id not in duplicates:
            duplicates.append(s.id)
        seen.add(s.id)
    if duplicates:
        problems.append(f"Duplicate stage IDs: {', '.join(duplicates)}")

    # A "did you mean" hint costs O(stages) per name, so each unknown name gets one
    # look-up, and only the first few names do: a typo shared by thousands of stages
    # must not make validation quadratic.
    hints: dict[str, str] = {}
    known_sorted: list[str] | None = None
    for s in stages:
        for dep in s.inputs:
            if dep not in seen:
                if dep not in hints:
                    hints[dep] = ""
                    if len(hints) <= _MAX_HINTED_NAMES:
                        if known_sorted is None:
                            known_sorted = sorted(seen)
                        match = difflib.get_close_matches(dep, known_sorted, n=1)
                        hints[dep] = f" (did you mean '{match[0]}'?)" if match else ""
                problems.append(f"Stage '{s.id}' depends on unknown stage '{dep}'{hints[dep]}")

    edges = {s.id: [d for d in s.inputs if d in seen] for s in stages}
    cycle = find_cycle(edges)
    if cycle:
        problems.append(f"Circular dependency detected: {' -> '.join(cycle)}")

    if not any(not s.inputs for s in stages):
        problems.append(
            "No entry point: every stage has inputs, so nothing can start; "
            "give at least one stage inputs=[]"
        )

    for s in stages:
        if s.pattern is ExecutionPattern.FAN_OUT:
            if s.fan_out_over is not None and s.fan_out_over not in s.inputs:
                problems.append(
                    f"Stage '{s.id}' fans out over '{s.fan_out_over}', which is not one of its "
                    f"inputs {list(s.inputs)}"
                )
            elif s.fan_out_over is None and len(s.inputs) > 1:
                problems.append(
                    f"Stage '{s.id}' is FAN_OUT with several inputs {list(s.inputs)}; "
                    "set fan_out_over to the input to fan out over"
                )

    for s in stages:
        if s.timeout_ms is not None and not s.timeout_ms > 0:
            problems.append(f"Stage '{s.id}': timeout_ms must be positive, got {s.timeout_ms}")
        if s.max_concurrent_fan_out is not None and s.max_concurrent_fan_out < 1:
            problems.append(
                f"Stage '{s.id}': max_concurrent_fan_out must be at least 1 (or None for "
                f"unbounded), got {s.max_concurrent_fan_out}"
            )
        rc = s.retry_config
        if rc is not None:
            if rc.max_attempts < 1:
                problems.append(
                    f"Stage '{s.id}': retry_config.max_attempts must be at least 1, "
                    f"got {rc.max_attempts}"
                )
            if rc.initial_delay_ms < 0 or rc.max_delay_ms < 0 or rc.backoff_multiplier <= 0:
                problems.append(
                    f"Stage '{s.id}': retry delays must be non-negative and "
                    "backoff_multiplier positive"
                )
            if not 0 <= rc.jitter <= 1:
                problems.append(f"Stage '{s.id}': retry jitter must be between 0 and 1")

    # Kinds beyond the documented ones come last, so each kind stays one group.
    for s in stages:
        if s.pattern is ExecutionPattern.CONDITIONAL and s.condition is None:
            problems.append(
                f"Stage '{s.id}' is CONDITIONAL but has no condition; pass condition=..."
            )
        if s.condition is not None and not callable(s.condition):
            problems.append(f"Stage '{s.id}': condition must be callable")
        if not callable(getattr(s.stage, "execute", None)):
            problems.append(
                f"Stage '{s.id}': {type(s.stage).__qualname__} object has no execute() method; "
                "pass a PipelineStage (an object with name and execute) or use @stage"
            )
    return problems


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as a path ``[a, b, a]`` following input edges in order, or None.

    Iterative depth-first search (no recursion limit on long chains).
    """
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(edges, white)
    for root in edges:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = grey
        while stack:
            node, index = stack[-1]
            deps = edges[node]
            if index < len(deps):
                stack[-1] = (node, index + 1)
                nxt = deps[index]
                if color.get(nxt, black) == grey:
                    start = path.index(nxt)
                    # Report in data-flow order: producer -> consumer.
                    cycle = [*path[start:], nxt]
                    return list(reversed(cycle))
                if color.get(nxt) == white:
                    color[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return None


def dependants(edges: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Invert input edges: stage id -> ids of the stages that take it as input."""
    out: dict[str, list[str]] = {sid: [] for sid in edges}
    for sid, deps in edges.items():
        for dep in dict.fromkeys(deps):
            out[dep].append(sid)
    return out


def topological_order(edges: Mapping[str, Sequence[str]]) -> list[str]:
    """Stage ids so that every stage comes after its inputs (Kahn's algorithm, stable)."""
    remaining = {sid: len(set(deps)) for sid, deps in edges.items()}
    users = dependants(edges)
    ready = deque(sid for sid, n in remaining.items() if n == 0)
    order: list[str] = []
    while ready:
        sid = ready.popleft()
        order.append(sid)
        for user in users[sid]:
            remaining[user] -= 1
            if remaining[user] == 0:
                ready.append(user)
    return order


def downstream(edges: Mapping[str, Sequence[str]], roots: Iterable[str]) -> set[str]:
    """The roots and every stage that depends on them, directly or not."""
    users = dependants(edges)
    seen = set(roots)
    todo = list(seen)
    while todo:
        for user in users[todo.pop()]:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen
