"""The hot path of a hit: the fields of an entry's metadata it needs, read by SQLite.

``DiskCacheStore._hit_candidates`` and ``warm_up`` run the statements here; ``_heads``
validates their rows (see ``EntryHead``).
"""

from __future__ import annotations

import functools
from typing import Any, Final, NamedTuple

import xxhash
from pydantic import TypeAdapter, ValidationError

from twinklr_pipe.cache._layout import META as _META
from twinklr_pipe.cache._layout import MODE_RAW as _MODE_RAW
from twinklr_pipe.cache._layout import PAYLOAD as _PAYLOAD
from twinklr_pipe.cache._layout import PREFETCH_BYTES as _PREFETCH_BYTES

__all__ = ["EntryHead"]


class EntryHead(NamedTuple):
    """The fields of an entry's metadata that serving a hit needs.

    Extracted from the metadata JSON by SQLite (``json_extract``) and validated as one
    array, several times faster than decoding the whole ``EntryMeta``: the executor's
    hot path (``_hit_candidates``, ``warm_up``) uses it. Everything else reads full
    ``EntryMeta``. A record missing one of these fields fails validation, and its key
    takes the full path.
    """

    key: str
    variant: str
    output_hash: str
    codec: str
    payload_checksum: str
    size_bytes: int
    created_at: float
    last_used_at: float
    compute_duration_ms: float
    metrics: dict[str, Any]
    state_reads: dict[str, str]
    state_writes: dict[str, Any]

    @property
    def entry_id(self) -> str:
        return f"{self.key}.{self.variant}"


#: SQL: the ``EntryHead`` fields of the metadata row ``m`` as a JSON array.
_HEAD_JSON: Final = (
    "json_extract(CAST(m.value AS TEXT), "
    + ", ".join(f"'$.{name}'" for name in EntryHead._fields)
    + ")"
)


@functools.cache
def _head_adapters() -> tuple[TypeAdapter[EntryHead], TypeAdapter[list[EntryHead]]]:
    """Validators of one head and of a list of heads, built on first use (not at import:
    ``pipe cache ls`` never needs them)."""
    return TypeAdapter(EntryHead), TypeAdapter(list[EntryHead])


# ``_hit_candidates``: a key's metadata rows, each with its head, its last use and its
# payload (small inline values only; NULL otherwise, or without a payload row).
_CANDIDATES_SQL: Final = (
    f"SELECT m.key, m.mode, {_HEAD_JSON}, m.access_time,"
    f" CASE WHEN p.mode = {_MODE_RAW} AND length(p.value) <= {_PREFETCH_BYTES}"
    " THEN p.value END"
    f" FROM Cache AS m LEFT JOIN Cache AS p ON p.key = '{_PAYLOAD}' || substr(m.key, 3)"
    " AND p.raw = 1 WHERE m.key >= ?1 AND m.key < ?2 AND m.raw = 1"
)
# ``warm_up``: the same for a JSON array of entry ids, one index lookup per id and row.
_WARM_SQL: Final = (
    f"SELECT m.key, m.mode, {_HEAD_JSON}, m.access_time,"
    f" CASE WHEN p.mode = {_MODE_RAW} AND length(p.value) <= {_PREFETCH_BYTES}"
    " THEN p.value END"
    f" FROM json_each(?1) AS j JOIN Cache AS m ON m.key = '{_META}' || j.value AND m.raw = 1"
    f" JOIN Cache AS p ON p.key = '{_PAYLOAD}' || j.value AND p.raw = 1"
)


def _heads(
    rows: list[Any], key: str | None, *, skip: bool = False
) -> list[tuple[EntryHead, bytes]] | None:
    """Validate ``_CANDIDATES_SQL``/``_WARM_SQL`` rows into ``(head, payload)`` pairs.

    Rows of another key than ``key`` (when given) are left out: "k.a.b" is variant "a.b"
    of "k", or variant "b" of "k.a". Any unusual row (not inline, a head that does not
    validate or belongs to another entry, a payload missing, large or failing its
    checksum) makes the answer None, or with ``skip``, is left out.
    """
    if not rows:
        return []
    heads: list[EntryHead | None]
    one, many = _head_adapters()
    try:
        heads = list(many.validate_json("[" + ",".join(r[2] or "null" for r in rows) + "]"))
    except ValidationError:
        if not skip:
            return None
        heads = []
        for row in rows:
            try:
                heads.append(one.validate_json(row[2] or "null"))
            except ValidationError:
                heads.append(None)
    found: list[tuple[EntryHead, bytes]] = []
    for row, head in zip(rows, heads, strict=True):
        if head is not None and key is not None and head.key != key:
            continue
        payload = row[4]
        if (
            head is None
            or row[1] != _MODE_RAW
            or row[0][2:] != head.entry_id
            or type(payload) is not bytes
            or xxhash.xxh3_128_hexdigest(payload) != head.payload_checksum
        ):
            if skip:
                continue
            return None
        used = row[3]
        if type(used) is float and used > head.last_used_at:
            head = head._replace(last_used_at=used)
        found.append((head, payload))
    return found
