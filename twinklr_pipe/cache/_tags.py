"""Entry summaries in the ``tag`` column of metadata rows: writing and reading them.

``DiskCacheStore.put`` stores an ``EntrySummary`` of each entry with its metadata, so
that listing 100,000 entries decodes no metadata record. Format 2 is text (the fields
joined by a separator, read by one split); format 1, a JSON array, is still read.
"""

from __future__ import annotations

import json
import operator
from array import array
from collections.abc import Callable, Collection, Sequence
from functools import partial
from itertools import chain, compress, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final

from twinklr_pipe.cache._layout import META as _META
from twinklr_pipe.cache._layout import SUMMARIES as _SUMMARIES
from twinklr_pipe.cache._layout import SUMMARIES_COMPLETE_SQL as _SUMMARIES_COMPLETE_SQL
from twinklr_pipe.cache._layout import SUMMARIES_FOUND_SQL as _SUMMARIES_FOUND_SQL
from twinklr_pipe.cache._layout import SUMMARIES_OBJECTS as _SUMMARIES_OBJECTS
from twinklr_pipe.cache._layout import SUMMARY_FIELDS as _SUMMARY_FIELDS
from twinklr_pipe.cache._layout import TAGS_SQL as _TAGS_SQL
from twinklr_pipe.cache._summary import EntrySummary

if TYPE_CHECKING:
    import sqlite3

    from twinklr_pipe.cache._entry import EntryMeta

__all__: list[str] = []

#: First field of a summary tag: its layout (see ``_summary_tag``). Format 2 is text, the
#: fields joined by ``_SUMMARY_SEPARATOR``; format 1, a JSON array, is still read (stores
#: written before format 2 hold it) and written when a field contains the separator.
_SUMMARY_FORMAT: Final = 2
_JSON_SUMMARY_FORMAT: Final = 1
#: ASCII "unit separator": never in the names, versions and ids a summary holds.
_SUMMARY_SEPARATOR: Final = "\x1f"
_TEXT_FORMAT: Final = str(_SUMMARY_FORMAT)
_TEXT_SUMMARY_START: Final = f"{_SUMMARY_FORMAT}{_SUMMARY_SEPARATOR}".encode()
#: ``version_is_source_hash`` in a format 2 tag.
_SUMMARY_FLAGS: Final = {"0": False, "1": True}
#: Python types of a decoded format 1 tag's elements (item_index may be null).
_SUMMARY_TYPES: Final = frozenset(
    (int, str, str, str, str, str, str, bool, index, str, int, float, float, float, str)
    for index in (type(None), int)
)
#: The same, per element (``_parse_json_columns`` checks a column at a time).
_SUMMARY_COLUMN_TYPES: Final = tuple(
    frozenset(types) for types in zip(*_SUMMARY_TYPES, strict=True)
)
#: Index of ``version_is_source_hash`` in the summary columns.
_HASH_FLAG: Final = EntrySummary._fields.index("version_is_source_hash")
#: Fields of a summary tag (both formats): the format, then ``EntrySummary``'s fields.
_SUMMARY_LENGTH: Final = 15
#: Index of ``last_used_at`` in a summary tag.
_SUMMARY_USED: Final = 12


def _summary_tag(meta: EntryMeta) -> str:
    """The summary stored in the ``tag`` column of an entry's metadata row (``_tag_of``)."""
    return _tag_of(_summary_values(meta))


def _json_summary_tag(meta: EntryMeta) -> str:
    """A format 1 summary tag of an entry (``_json_tag_of``)."""
    return _json_tag_of(_summary_values(meta))


def _summary_values(meta: EntryMeta) -> tuple[Any, ...]:
    """An entry's metadata row key, then its ``EntrySummary`` fields in order.

    Its ``Summaries`` row (``SUMMARY_VALUES``), as ``_read_summaries`` reads it back, and
    what its summary tag encodes (``_tag_of``). "Last used" is the metadata's: ``put``
    writes it to ``access_time`` too.
    """
    return (
        f"{_META}{meta.key}.{meta.variant}",
        meta.key,
        meta.variant,
        meta.pipeline,
        meta.stage_id,
        meta.stage_identity,
        meta.version,
        meta.version_is_source_hash,
        meta.item_index,
        meta.codec,
        meta.size_bytes,
        float(meta.created_at),
        float(meta.last_used_at),
        float(meta.compute_duration_ms),
        meta.run_id,
    )


def _tag_of(values: tuple[Any, ...]) -> str:
    """The summary tag of an entry's ``_summary_values``.

    Format 2: ``2``, then the ``EntrySummary`` fields in order, joined by
    ``_SUMMARY_SEPARATOR``: strings as they are, ``version_is_source_hash`` as ``1`` or
    ``0``, ``item_index`` empty when None, numbers as ``str``/``repr`` (floats read back
    exactly). Splitting 100,000 of them joined is several times cheaper than parsing
    JSON. An entry whose strings contain the separator gets a format 1 tag (JSON). It is
    written with the metadata, in the same row.
    """
    (_, key, variant, pipeline, stage, identity, version, flag, index, codec, size) = values[:11]
    created, used, compute, run_id = values[11:]
    strings = (key, variant, pipeline, stage, identity, version, codec, run_id)
    if _SUMMARY_SEPARATOR in "".join(strings):
        return _json_tag_of(values)
    flag_text = "1" if flag else "0"
    index_text = "" if index is None else str(index)
    numbers = (str(size), repr(created), repr(used), repr(compute))
    return _SUMMARY_SEPARATOR.join(
        (_TEXT_FORMAT, *strings[:6], flag_text, index_text, codec, *numbers, run_id)
    )


def _json_tag_of(values: tuple[Any, ...]) -> str:
    """A format 1 summary tag: a JSON array, ``_JSON_SUMMARY_FORMAT`` then the fields."""
    return json.dumps(
        [_JSON_SUMMARY_FORMAT, *values[1:]], ensure_ascii=False, separators=(",", ":")
    )


def _parse_summary(row_key: str, tag: bytes | None, used: Any) -> EntrySummary | None:
    """The summary in the tag of metadata row ``row_key``, or None if it is unusable."""
    if tag is None:
        return None
    if tag.startswith(_TEXT_SUMMARY_START):
        columns = _parse_text_columns([row_key], [tag], [used])
        return None if columns is None else EntrySummary._make(column[0] for column in columns)
    try:
        fields = json.loads(tag)
    except ValueError:
        return None
    if type(fields) is not list or tuple(map(type, fields)) not in _SUMMARY_TYPES:
        return None
    if fields[0] != _JSON_SUMMARY_FORMAT or row_key != f"{_META}{fields[1]}.{fields[2]}":
        return None
    if type(used) is float and used > fields[_SUMMARY_USED]:
        fields[_SUMMARY_USED] = used
    return EntrySummary._make(fields[1:])


def _read_summaries(
    con: sqlite3.Connection,
) -> tuple[list[Sequence[Any]], list[str], bool]:
    """Every entry's summary in the database of ``con``: the columns and odd keys that
    ``_parse_summaries`` returns, and whether they came from the ``Summaries`` table.

    The one place that reads summaries (``DiskCacheStore._summary_columns``; ``_quick``
    reads only the table): from the ``Summaries`` table when it can be trusted (see
    ``_layout``), else from the tags of the metadata rows. The check and the read see one
    snapshot.

    Raises:
        sqlite3.Error: a query failed.
    """
    began = not con.in_transaction
    if began:
        con.execute("BEGIN")
    try:
        columns = _read_typed_summaries(con)
        if columns is not None:
            return columns, [], True
        rows = con.execute(_TAGS_SQL).fetchall()
    finally:
        if began:
            con.rollback()  # a read: nothing to keep
    keys = list(map(itemgetter(0), rows))
    tags = list(map(itemgetter(1), rows))
    used = list(map(itemgetter(2), rows))
    del rows
    return (*_parse_summaries(keys, tags, used), False)


def _read_typed_summaries(
    con: sqlite3.Connection, fields: Collection[int] | None = None
) -> list[Sequence[Any]] | None:
    """The summary columns in the ``Summaries`` table, or None when it is not complete.

    ``fields``: the indices of the ``EntrySummary`` fields to read (the others' columns
    are None); all by default. Each column read is checked to hold values of its type
    (a few milliseconds): what this library did not write makes it None, and the caller
    reads the tags.

    Raises:
        sqlite3.Error: a query failed.
    """
    if not _summaries_complete(con):
        return None
    wanted = sorted(range(len(_SUMMARY_FIELDS)) if fields is None else set(fields))
    names = ", ".join(_SUMMARY_FIELDS[i] for i in wanted)
    rows = con.execute(f"SELECT {names} FROM {_SUMMARIES}").fetchall()
    columns: list[Any] = [None] * len(_SUMMARY_FIELDS)
    for position, field in enumerate(wanted):
        columns[field] = list(map(itemgetter(position), rows))
    del rows
    try:
        for field in wanted:
            _TYPED_CHECKS[field](columns[field])
        if _HASH_FLAG in wanted:
            columns[_HASH_FLAG] = list(map(_SQL_FLAGS.__getitem__, columns[_HASH_FLAG]))
    except (TypeError, ValueError, KeyError, OverflowError):
        return None  # not as this library writes them: read the tags
    return columns


def _summaries_installed(con: sqlite3.Connection) -> bool:
    """Whether the ``Summaries`` table and its triggers all exist (a schema lookup).

    Raises:
        sqlite3.Error: a query failed.
    """
    found = con.execute(_SUMMARIES_FOUND_SQL, _SUMMARIES_OBJECTS).fetchone()[0]
    return bool(found == len(_SUMMARIES_OBJECTS))


def _summaries_complete(con: sqlite3.Connection) -> bool:
    """Whether the ``Summaries`` table and its triggers exist, with one row per entry.

    Counting costs ~20 ms per 100,000 entries (two index scans).

    Raises:
        sqlite3.Error: a query failed.
    """
    if not _summaries_installed(con):
        return False
    return bool(con.execute(_SUMMARIES_COMPLETE_SQL).fetchone()[0] == 1)


def _check_index(column: Sequence[Any]) -> None:
    if not set(map(type, column)) <= {int, type(None)}:
        raise TypeError("item_index holds something else than int and None")


#: Per summary field, a check of a column of its values read from SQLite (C loops: each
#: raises TypeError or ValueError on a value of another type).
_TYPED_CHECKS: Final[tuple[Callable[[Sequence[Any]], object], ...]] = tuple(
    "".join
    if types == {str}
    else partial(array, "q")
    if types in (frozenset({int}), frozenset({bool}))
    else partial(array, "d")
    if types == {float}
    else _check_index
    for types in _SUMMARY_COLUMN_TYPES[1:]
)
#: ``version_is_source_hash`` as SQLite returns it.
_SQL_FLAGS: Final = {0: False, 1: True}


def _parse_summaries(
    row_keys: Sequence[str], tags: Sequence[bytes | None], used: Sequence[Any]
) -> tuple[list[Sequence[Any]], list[str]]:
    """The summary columns of the metadata rows whose tag is usable, and the others' keys.

    The columns are ``EntrySummary``'s fields in order, one sequence of values each
    (``_summary_columns``). Tags of each format are parsed all at once (``_parse_text_columns``,
    ``_parse_json_columns``); if that fails, one row at a time, to find the unusable ones.
    """
    try:
        text = list(map(bytes.startswith, tags, repeat(_TEXT_SUMMARY_START)))  # type: ignore[arg-type]
    except TypeError:  # a row without a tag
        text = [type(tag) is bytes and tag.startswith(_TEXT_SUMMARY_START) for tag in tags]
    if all(text):
        groups = [(row_keys, tags, used, _parse_text_columns)]
    elif not any(text):
        groups = [(row_keys, tags, used, _parse_json_columns)]
    else:  # a store written before format 2, in part
        other = list(map(operator.not_, text))
        groups = [
            (
                list(compress(row_keys, mask)),
                list(compress(tags, mask)),
                list(compress(used, mask)),
                parse,
            )
            for mask, parse in ((text, _parse_text_columns), (other, _parse_json_columns))
        ]
    parts: list[list[Sequence[Any]]] = []
    odd: list[str] = []
    for keys, group_tags, group_used, parse in groups:
        columns = parse(keys, group_tags, group_used)
        if columns is None:  # one row at a time, to find the unusable ones
            rows = []
            for row_key, tag, at in zip(keys, group_tags, group_used, strict=True):
                found = _parse_summary(row_key, tag, at)
                if found is None:
                    odd.append(row_key)
                else:
                    rows.append(found)
            columns = _columns_of(rows)
        parts.append(columns)
    return _joined(parts), odd


def _parse_text_columns(
    row_keys: Sequence[str], tags: Sequence[bytes | None], used: Sequence[Any]
) -> list[Sequence[Any]] | None:
    """Format 2 tags, all at once, as summary columns, or None if any is unusable.

    Each tag must hold exactly ``_SUMMARY_LENGTH`` fields (counted per tag), so the tags
    joined by the separator split into fields in step; then a column is every
    ``_SUMMARY_LENGTH``-th field, and the checks and conversions run in C loops.
    """
    count = len(row_keys)
    if not count:
        return _columns_of([])
    separator = _SUMMARY_SEPARATOR.encode()
    try:
        if list(map(bytes.count, tags, repeat(separator))).count(_SUMMARY_LENGTH - 1) != count:  # type: ignore[arg-type]
            return None
        fields = separator.join(tags).decode("utf-8").split(_SUMMARY_SEPARATOR)  # type: ignore[arg-type]
    except (TypeError, UnicodeDecodeError):
        return None
    columns: list[Any] = [fields[i::_SUMMARY_LENGTH] for i in range(_SUMMARY_LENGTH)]
    del fields
    if columns[0].count(str(_SUMMARY_FORMAT)) != count:
        return None
    if list(map(f"{_META}{{}}.{{}}".format, columns[1], columns[2])) != list(row_keys):
        return None
    if not all(map(float.__instancecheck__, used)):
        return None
    try:
        columns[7] = list(map(_SUMMARY_FLAGS.__getitem__, columns[7]))
        indices = {text: int(text) if text else None for text in set(columns[8])}
        columns[8] = list(map(indices.__getitem__, columns[8]))
        columns[10] = list(map(int, columns[10]))
        for i in (11, 12, 13):
            columns[i] = list(map(float, columns[i]))
    except (KeyError, ValueError):
        return None
    columns[_SUMMARY_USED] = list(map(max, columns[_SUMMARY_USED], used))
    return columns[1:]


def _parse_json_columns(
    row_keys: Sequence[str], tags: Sequence[bytes | None], used: Sequence[Any]
) -> list[Sequence[Any]] | None:
    """Format 1 tags, all at once, as summary columns, or None if any is unusable.

    The tags are parsed as one JSON array, ``[`` + tags joined by ``,\\n`` + ``]``, and
    the checks run in C loops. Each tag is proven to be exactly one element: a string
    cannot span a separator (``json`` rejects raw newlines in strings), every tag starts
    with ``[``, every element must be a flat array of the summary's types (so each ``[``
    outside strings opens one), and there must be exactly one element per row.
    """
    try:
        if not all(map(bytes.startswith, tags, repeat(b"["))):  # type: ignore[arg-type]
            return None
        values = json.loads(b"[" + b",\n".join(tags) + b"]")  # type: ignore[arg-type]
    except (TypeError, ValueError):  # TypeError: a row without a tag
        return None
    if len(values) != len(row_keys):
        return None
    if not values:
        return _columns_of([])
    if set(map(type, values)) != {list} or set(map(len, values)) != {_SUMMARY_LENGTH}:
        return None
    columns: list[Sequence[Any]] = list(zip(*values, strict=True))  # one tuple per field
    for column, allowed in zip(columns, _SUMMARY_COLUMN_TYPES, strict=True):
        if not set(map(type, column)) <= allowed:
            return None
    if columns[0].count(_JSON_SUMMARY_FORMAT) != len(values):
        return None
    if list(map(f"{_META}{{}}.{{}}".format, columns[1], columns[2])) != list(row_keys):
        return None
    if not all(map(float.__instancecheck__, used)):
        return None
    columns[_SUMMARY_USED] = tuple(map(max, columns[_SUMMARY_USED], used))
    return columns[1:]


def _summary_rows(columns: Sequence[Sequence[Any]]) -> list[EntrySummary]:
    """The ``EntrySummary`` rows of summary columns (``_summary_columns``)."""
    return list(map(tuple.__new__, repeat(EntrySummary), zip(*columns, strict=True)))


def _columns_of(rows: Sequence[EntrySummary]) -> list[Sequence[Any]]:
    """Summary columns of ``EntrySummary`` rows (the inverse of ``_summary_rows``)."""
    if not rows:
        return [() for _ in EntrySummary._fields]
    return list(zip(*rows, strict=True))


def _joined(parts: Sequence[Sequence[Sequence[Any]]]) -> list[Sequence[Any]]:
    """Summary columns holding the rows of each of ``parts`` in turn."""
    if len(parts) == 1:
        return list(parts[0])
    return [list(chain.from_iterable(columns)) for columns in zip(*parts, strict=True)]
