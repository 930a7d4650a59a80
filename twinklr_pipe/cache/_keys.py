"""The one place that computes cache keys.

A stage's key is xxh3-128 over the length-prefixed parts::

    ("twinklr_pipe.key", CACHE_FORMAT_VERSION, identity, version, config fingerprint,
     input names (multi-input stages only), input content hashes in input order)

Not in the key: pipeline name, stage id, run id, time, context services, retries,
timeouts and concurrency limits. A FAN_OUT item's key is the same recipe with the
fanned input's hash replaced by the item's fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import xxhash

from ..errors import CacheError, FingerprintError
from ._entry import CACHE_FORMAT_VERSION
from ._identity import (
    config_fingerprint,
    source_hash,
    stage_config,
    stage_identity,
    stage_version,
)

__all__ = ["StageParts", "compute_key", "stage_parts"]


class StageParts(NamedTuple):
    """Everything about a stage that goes into its key, apart from its inputs.

    A NamedTuple rather than a frozen dataclass: one is built per stage and per run, and
    a frozen dataclass's ``__init__`` costs several times more.
    """

    identity: str
    version: str
    version_is_source_hash: bool
    config_fields: dict[str, str]
    config_fingerprint: str


def stage_parts(stage: Any, stage_id: str) -> StageParts:
    """The key parts of a stage object; ``FingerprintError`` names the stage and field.

    Not memoized here: a stage's configuration may be edited between runs in one
    process (a notebook), so the executor computes it once per run.
    """
    try:
        config = stage_config(stage)
        version, is_source = stage_version(stage)
    except FingerprintError as exc:
        raise exc.for_stage(stage_id) from None
    except Exception as exc:
        # A non-str version, a cache_params() that raises or returns a non-mapping...:
        # the stage's own mistake, reported as one error that names it.
        raise CacheError(
            f"Stage '{stage_id}': cannot compute its cache key: {type(exc).__name__}: "
            f"{str(exc).rstrip('.')}. Fix the stage's version, cache_params() or "
            "cache_exclude, or set cache=False on its StageDefinition."
        ) from exc
    identity = stage_identity(stage)
    if "<" in identity:
        # A lambda or a function/class defined inside another function: its qualified
        # name does not tell it apart from its siblings (``<lambda>``, a factory's
        # ``make.<locals>.inner`` with another closure). An explicit version cannot
        # either, so its code and closure values always join its identity.
        target = (
            getattr(stage, "fn", None)
            if getattr(stage, "__twinklr_function_stage__", False)
            else type(stage)
        )
        identity = f"{identity}#{source_hash(target)}"
    return StageParts(
        identity=identity,
        version=version,
        version_is_source_hash=is_source,
        config_fields=config,
        config_fingerprint=config_fingerprint(config),
    )


def compute_key(
    parts: StageParts, input_names: Sequence[str] | None, input_hashes: Sequence[str]
) -> str:
    """The cache key of a stage (or FAN_OUT item) from its parts and input hashes.

    Every part is a string, so the key is xxh3-128 over the parts' length-prefixed
    UTF-8 (no separator can be forged inside a part), with a marker that tells
    "no input names" from an empty list. This runs once per stage and per FAN_OUT
    item on every run, so it avoids the general ``fingerprint`` machinery.
    """
    fields = [
        "twinklr_pipe.key",
        str(CACHE_FORMAT_VERSION),
        parts.identity,
        parts.version,
        parts.config_fingerprint,
        f"names:{len(input_names)}" if input_names is not None else "no-names",
        *(input_names or ()),
        f"hashes:{len(input_hashes)}",
        *input_hashes,
    ]
    data = b"".join(b"%d:%s;" % (len(f.encode()), f.encode()) for f in fields)
    return xxhash.xxh3_128_hexdigest(data)
