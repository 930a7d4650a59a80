"""The listing of ``pipe cache ls``: entries filtered, sorted and formatted column by column.

``pipe cache ls`` over 100,000 entries should answer in under a second, interpreter start
included (``scripts/bench_cli_cache_ls.py`` measures it). One Python object per entry, or one
``str.format`` per row, costs too much, so the listing works on columns: the store hands
over every entry's summary as one sequence per ``EntrySummary`` field
(``DiskCacheStore._summary_columns``, or ``cache._quick`` without opening the store, read
them from the ``Summaries`` table with one query), the filters and the sort
give an order of row indices, and the table is built a column at a time in C loops
(``map``, ``str.join``), the text of each distinct size and minute computed once.
``list_entries`` and ``format_entries`` (in ``_admin``) are built on the same functions,
so the command and the library cannot drift apart.

Imports nothing heavy (no pydantic): every ``pipe`` command imports this module.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any

from .cache._summary import EntrySummary

if TYPE_CHECKING:
    from .cache._entry import CacheStore

__all__ = [
    "SORTS",
    "Columns",
    "columns_of",
    "entry_columns",
    "entry_rows",
    "format_bytes",
    "format_columns",
    "gc_paused",
    "listing_order",
    "rows_of",
    "table_text",
    "take",
]

#: Every entry's summary, column-wise: ``EntrySummary``'s fields in order, one sequence of
#: values per field, all of one length.
Columns = Sequence[Sequence[Any]]

_FIELD = {name: index for index, name in enumerate(EntrySummary._fields)}
_KEY = _FIELD["key"]
_VARIANT = _FIELD["variant"]

#: ``--sort`` value -> the field sorted on (ascending; ties by key, then variant).
SORTS = {
    "created": _FIELD["created_at"],
    "used": _FIELD["last_used_at"],
    "size": _FIELD["size_bytes"],
}

#: The fields the text table shows, in the order ``format_columns`` takes them.
TABLE_FIELDS = tuple(
    _FIELD[name]
    for name in (
        "key",
        "variant",
        "pipeline",
        "stage_id",
        "version",
        "version_is_source_hash",
        "item_index",
        "size_bytes",
        "created_at",
        "last_used_at",
    )
)

_HEADER = ("KEY", "PIPELINE", "STAGE", "VERSION", "SIZE", "CREATED", "LAST USED")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building 100,000s of acyclic objects.

    Allocating that many strings and tuples triggers collections that find nothing
    (about a fifth of the listing time).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def format_bytes(size: float) -> str:
    """``1.5 MB`` style (binary units), ``812 B`` below one KB."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


# -- reading ----------------------------------------------------------------------------


def entry_rows(store: CacheStore | None) -> list[EntrySummary]:
    """Every entry of ``store`` as an ``EntrySummary`` row.

    From the store's ``iter_summaries()`` when it has one (both built-in stores do: on
    a ``DiskCacheStore`` that is one query, no metadata decoded), else derived from
    ``iter_metadata()``, so a store implementing only the ``CacheStore`` protocol works.
    """
    if store is None:
        return []
    summaries: Callable[[], Iterable[EntrySummary]] | None = getattr(store, "iter_summaries", None)
    with gc_paused():
        if summaries is not None:
            return list(summaries())
        return [EntrySummary.of(meta) for meta in store.iter_metadata()]


def entry_columns(store: CacheStore | None) -> Columns:
    """Every entry of ``store``, column-wise (``Columns``): the same entries as ``entry_rows``.

    A ``DiskCacheStore`` parses its summaries into columns directly; other stores' rows
    are transposed.
    """
    read: Callable[[], Columns] | None = getattr(store, "_summary_columns", None)
    if read is not None:
        return read()
    rows = entry_rows(store)
    with gc_paused():
        return columns_of(rows)


def columns_of(rows: Sequence[EntrySummary]) -> Columns:
    """``rows`` column-wise."""
    if not rows:
        return [() for _ in EntrySummary._fields]
    return list(zip(*rows, strict=True))


def rows_of(columns: Columns) -> list[EntrySummary]:
    """``EntrySummary`` rows of ``columns`` (the inverse of ``columns_of``)."""
    with gc_paused():
        return list(map(tuple.__new__, repeat(EntrySummary), zip(*columns, strict=True)))


# -- filtering and sorting ------------------------------------------------------------


def listing_order(
    columns: Columns,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    sort: str = "created",
) -> list[int]:
    """Indices of the rows matching the filters, in ``pipe cache ls`` order.

    Ascending by the ``sort`` field (``SORTS``), ties by key, then variant: the order of
    ``sorted(rows, key=lambda r: (r.<field>, r.key, r.variant))``. When the values sorted
    on are all distinct, as creation times are, ties cannot occur and the sort compares
    bare floats (several times faster than tuples).

    Raises:
        ValueError: unknown sort.
    """
    if sort not in SORTS:
        raise ValueError(f"invalid sort '{sort}'; use created, used or size")
    primary = columns[SORTS[sort]]
    order: list[int] = list(range(len(primary)))
    if stage is not None or pipeline is not None:
        masks = [
            map(operator.eq, columns[_FIELD[field]], repeat(wanted))
            for field, wanted in (("stage_id", stage), ("pipeline", pipeline))
            if wanted is not None
        ]
        mask = masks[0] if len(masks) == 1 else map(operator.and_, *masks)
        order = list(itertools.compress(order, mask))
    values = primary if len(order) == len(primary) else take([primary], order)[0]
    if len(set(values)) == len(values):
        order.sort(key=primary.__getitem__)
    else:
        keys, variants = columns[_KEY], columns[_VARIANT]
        order.sort(key=lambda i: (primary[i], keys[i], variants[i]))
    return order


def take(columns: Iterable[Sequence[Any]], order: list[int]) -> list[Sequence[Any]]:
    """Each column's values at the indices ``order``, in that order."""
    if len(order) == 0:
        return [() for _ in columns]
    columns = list(columns)
    if len(order) == len(columns[0]) and order == list(range(len(order))):
        return columns  # already in order (listing by creation usually is)
    return [list(map(column.__getitem__, order)) for column in columns]


# -- the text table -------------------------------------------------------------------


def table_text(
    columns: Columns,
    *,
    stage: str | None = None,
    pipeline: str | None = None,
    sort: str = "created",
) -> str:
    """The text table of ``pipe cache ls``: the entries of ``columns`` (``entry_columns``)
    matching the filters, in ``listing_order``.

    Raises:
        ValueError: unknown sort.
    """
    order = listing_order(columns, stage=stage, pipeline=pipeline, sort=sort)
    return format_columns(take([columns[field] for field in TABLE_FIELDS], order))


def format_columns(columns: Columns) -> str:
    """The text table of ``pipe cache ls``: a header, one row per entry and a footer.

    ``columns`` are the ``TABLE_FIELDS`` of the entries in the order listed. Plain text,
    columns padded with spaces; the footer gives the entry count and the total size
    (human and exact bytes).
    """
    with gc_paused():
        return _format_columns(*columns)


def _format_columns(
    key: Sequence[str],
    variant: Sequence[str],
    pipeline: Sequence[str],
    stage: Sequence[str],
    version: Sequence[str],
    is_hash: Sequence[bool],
    index: Sequence[int | None],
    size: Sequence[int],
    created: Sequence[float],
    used: Sequence[float],
) -> str:
    count = len(key)
    # The usual cases (no variants, no fan-out items, no source hashes) skip a loop each.
    keys: Sequence[str] = [k[:12] for k in key]
    if variant.count("0") != count:
        keys = [k if v == "0" else f"{k}.{v[:4]}" for k, v in zip(keys, variant, strict=True)]
    stages: Sequence[str] = stage
    if index.count(None) != count:
        stages = [s if i is None else f"{s}[{i}]" for s, i in zip(stage, index, strict=True)]
    versions: Sequence[str] = version
    if any(is_hash):
        versions = [v[:12] if h else v for v, h in zip(version, is_hash, strict=True)]
    # Sizes and minutes repeat: each distinct one is formatted (and padded) once.
    size_text = {n: format_bytes(n) for n in set(size)}
    created_ids = list(map(operator.floordiv, created, repeat(60)))
    used_ids = list(map(operator.floordiv, used, repeat(60)))
    created_set = set(created_ids)
    minutes = _minutes_text(created_set, used_ids)
    strings = (keys, pipeline, stages, versions)
    w = [
        max(len(title), max(map(len, col), default=0))
        for title, col in zip(_HEADER[:4], strings, strict=True)
    ]
    w.append(max([len(_HEADER[4]), *map(len, size_text.values())]))
    w.append(max([len(_HEADER[5]), *(len(minutes[m]) for m in created_set)]))
    padded = [_padded(col, width) for col, width in zip(strings, w, strict=False)]
    sized = {n: text.rjust(w[4]) for n, text in size_text.items()}
    padded.append(list(map(sized.__getitem__, size)))
    created_text = {m: minutes[m].ljust(w[5]) for m in created_set}
    padded.append(list(map(created_text.__getitem__, created_ids)))
    padded.append(list(map(minutes.__getitem__, used_ids)))
    total = sum(size)
    noun = "entry" if count == 1 else "entries"
    footer = f"{count} {noun}, {format_bytes(total)} ({total} bytes)"
    title = "  ".join(
        [
            *(
                t.rjust(n) if i == 4 else t.ljust(n)
                for i, (t, n) in enumerate(zip(_HEADER[:6], w, strict=True))
            ),
            _HEADER[6],
        ]
    )
    body = map("  ".join, zip(*padded, strict=True))
    return "\n".join([title, *body, footer])


def _padded(column: Sequence[str], width: int) -> Sequence[str]:
    """``column``'s strings left-justified to ``width``; each distinct one padded once."""
    if min(map(len, column), default=width) == width:
        return column  # all of the width already
    distinct = set(column)
    if len(distinct) * 4 > len(column):
        return list(map(str.ljust, column, repeat(width)))
    text = {value: value.ljust(width) for value in distinct}
    return list(map(text.__getitem__, column))


def _minutes_text(*columns: Iterable[float]) -> dict[float, str]:
    """Local ``YYYY-MM-DD HH:MM`` of every minute (``timestamp // 60``) given (0: ``-``)."""
    found: set[float] = set()
    for column in columns:
        found.update(column)
    return {
        minute: time.strftime("%Y-%m-%d %H:%M", time.localtime(minute * 60)) if minute else "-"
        for minute in found
    }
