"""The safe codec for stored outputs: values to ``(codec_id, payload)`` bytes and back.

Every value that :func:`~twinklr_pipe.cache._fingerprint.fingerprint` supports comes
back equal, of the same type, and with the same fingerprint. Codec ids:

``json/1``
    A type-tagged JSON tree (UTF-8, ASCII-escaped). Plain JSON values (dicts with str
    keys, lists, str, int, finite float, bool, None) are stored as-is. Anything else
    becomes a tagged node, a JSON object with the reserved key ``"$tp"``::

        {"$tp": "tuple", "v": [1, 2]}
        {"$tp": "float", "v": "nan"}
        {"$tp": "model", "c": "shop.models:Order", "v": {"id": 3, "lines": [...]}}

    A user dict that is not plain JSON (non-str keys, or a ``"$tp"`` key of its own) is
    stored as a ``{"$tp": "dict", "v": [[key, value], ...]}`` node, so a JSON object with a
    ``"$tp"`` key is always a tagged node.
``bytes/1``
    A top-level ``bytes`` value; the payload is the bytes themselves.
``numpy/1``
    A top-level numpy array (not of object dtype): an ``.npy`` file (header + raw C-order
    buffer, no base64). Decoded arrays are writable and C-ordered.
``pickle/1``
    Pickle protocol 5, for values the safe codecs cannot store. Only with
    ``allow_pickle=True``, on both ``encode`` and ``decode``.

Classes are restored by ``module:qualname``: the module is imported, the qualname
walked with ``getattr``, and the object must be the expected kind (an ``Enum``
subclass, a pydantic ``BaseModel`` subclass, a dataclass type, a pathlib class). Nothing
else named in a payload is ever called. Classes defined inside functions cannot be
stored. Notes on what is restored:

* Pydantic models store their field values (and extra fields) tagged, and are rebuilt
  with ``model_validate`` (by field name), so a ``tuple`` in an ``Any`` field stays a
  tuple. A model with fields of types the tree cannot hold (``HttpUrl``...) is stored as
  ``model_dump(mode="json")`` instead, but only if that validates back to an equal model.
  Private attributes are not stored. A ``ValidationError`` on decode (the model changed
  since the entry was written) is a ``CodecError``.
* Dataclasses store every field, are rebuilt by calling the class with the ``init=True``
  fields, and get the ``init=False`` fields set afterwards.
* Aware datetimes keep their UTC offset; a ``zoneinfo.ZoneInfo`` zone is restored by key.
* Numpy arrays and numpy scalars nested in a value are stored as base64 ``.npy`` bytes
  in ``ndarray`` / ``npscalar`` nodes.

Errors: every failure is a :class:`~twinklr_pipe.errors.CodecError`. Messages start
lowercase (``cannot store output of type ...``) so the executor can prefix the stage:
``f"Stage '{stage}': {exc}"``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import importlib
import io
import json
import pathlib
import pickle
import sys
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import pydantic
from pydantic import BaseModel

from twinklr_pipe.cache._fingerprint import FileInput, _short
from twinklr_pipe.errors import CodecError

__all__ = [
    "BYTES",
    "JSON",
    "NUMPY",
    "PICKLE",
    "decode",
    "decode_json_tree",
    "encode",
    "encode_json_tree",
]

JSON: Final = "json/1"
BYTES: Final = "bytes/1"
NUMPY: Final = "numpy/1"
PICKLE: Final = "pickle/1"

#: The reserved key of tagged nodes in a ``json/1`` tree.
TAG: Final = "$tp"
_TAG_MARK: Final = b'"$tp"'  # how TAG appears in a payload (TAG has nothing to escape)
#: Ints longer than this are stored as hex strings: Python limits int <-> decimal str
#: conversion (``sys.set_int_max_str_digits``, at least 640 digits).
_MAX_PLAIN_INT_BITS: Final = 2000
_PLAIN_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_PLAIN_TYPES: Final = _PLAIN_SCALARS | {list, dict}
_STR_ONLY: Final = frozenset({str})
_PATH_CLASSES: Final[dict[str, type[pathlib.PurePath]]] = {
    cls.__name__: cls
    for cls in (
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    )
}
_MV_FORMATS: Final = frozenset("bBhHiIlLqQnNfd?cexP")


class _Unstorable(Exception):
    """Internal: a value the safe codec cannot store; ``segs`` is its path, innermost first."""

    def __init__(self, value_type: type, reason: str = "") -> None:
        super().__init__(value_type)
        self.value_type = value_type
        self.reason = reason
        self.segs: list[str] = []

    def message(self) -> str:
        where = "value" + "".join(reversed(self.segs))
        name = f"{self.value_type.__module__}.{self.value_type.__qualname__}"
        text = f"cannot store output of type {name} with the safe codec"
        if where != "value":
            text += f" (at {where})"
        if self.reason:
            text += f": {self.reason}"
        return text


def _pickle_hint(exc: _Unstorable) -> CodecError:
    return CodecError(
        f"{exc.message()}. Return a supported value (a pydantic model, dataclass, "
        "JSON-like value, bytes, numpy array...), or opt into pickle for such outputs "
        "with PipelineExecutor(allow_pickle=True)."
    )


# ---------------------------------------------------------------------------
# Plain JSON: checked without building anything.


def _plain(v: Any, active: set[int]) -> bool:
    """True if ``v`` is plain JSON that decodes to an equal value of the same types.

    Non-finite floats, huge ints and cycles pass this check; ``json.dumps`` rejects them.
    """
    t = type(v)
    if t is dict:
        if not set(map(type, v)) <= _STR_ONLY or TAG in v:
            return False
        values: Any = v.values()
    elif t is list:
        values = v
    else:
        return t in _PLAIN_SCALARS
    types = set(map(type, values))
    if types <= _PLAIN_SCALARS:
        return True
    if not types <= _PLAIN_TYPES:
        return False
    oid = id(v)
    if oid in active:
        return False  # a cycle: the tagged path reports it
    active.add(oid)
    for x in values:
        if not _plain(x, active):
            return False
    active.discard(oid)
    return True


# ---------------------------------------------------------------------------
# Values -> tagged JSON trees.

_Converter: TypeAlias = Callable[[Any, set[int]], Any]


def _tree(v: Any, active: set[int]) -> Any:
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    conv = _CONV.get(t)
    if conv is None:
        conv = _DYN.get(t) or _classify(t)
    return conv(v, active)


def _enter(v: Any, active: set[int]) -> int:
    oid = id(v)
    if oid in active:
        raise _Unstorable(type(v), "the value contains itself (a reference cycle)")
    active.add(oid)
    return oid


def _conv_int(v: int, active: set[int]) -> Any:
    if v.bit_length() <= _MAX_PLAIN_INT_BITS:
        return v
    return {TAG: "int", "v": format(v, "x")}


def _conv_float(v: float, active: set[int]) -> Any:
    if v - v == 0.0:  # finite
        return v
    return {TAG: "float", "v": "nan" if v != v else ("inf" if v > 0 else "-inf")}


def _conv_items(v: Any, active: set[int]) -> list[Any]:
    oid = _enter(v, active)
    out = []
    i = 0
    try:
        for i, x in enumerate(v):  # noqa: B007 - i names the failing item
            out.append(_tree(x, active))
    except _Unstorable as exc:
        exc.segs.append(f"[{i}]")
        raise
    active.discard(oid)
    return out


def _conv_list(v: list[Any], active: set[int]) -> Any:
    return _conv_items(v, active)


def _conv_tuple(v: tuple[Any, ...], active: set[int]) -> Any:
    return {TAG: "tuple", "v": _conv_items(v, active)}


def _conv_set(v: set[Any] | frozenset[Any], active: set[int]) -> Any:
    oid = _enter(v, active)
    out = []
    for x in v:
        try:
            out.append(_tree(x, active))
        except _Unstorable as exc:
            exc.segs.append(f"{{{_short(x)}}}")
            raise
    active.discard(oid)
    return {TAG: "set" if type(v) is set else "frozenset", "v": out}


def _conv_dict(v: dict[Any, Any], active: set[int]) -> Any:
    oid = _enter(v, active)
    out: Any
    k: Any = None
    try:
        if set(map(type, v)) <= _STR_ONLY and TAG not in v:
            out = {}
            for k, x in v.items():
                out[k] = _tree(x, active)
        else:
            pairs = []
            for k, x in v.items():
                try:
                    key = _tree(k, active)
                except _Unstorable as exc:
                    exc.segs.append(f"<key {_short(k)}>")
                    raise
                pairs.append([key, _tree(x, active)])
            out = {TAG: "dict", "v": pairs}
    except _Unstorable as exc:
        if not exc.segs or not exc.segs[-1].startswith("<key "):
            exc.segs.append(f"[{_short(k)}]")
        raise
    active.discard(oid)
    return out


def _b64(data: Any) -> str:
    return base64.b64encode(data).decode("ascii")


def _conv_bytes(v: bytes | bytearray, active: set[int]) -> Any:
    return {TAG: "bytes" if type(v) is bytes else "bytearray", "v": _b64(v)}


def _conv_memoryview(v: memoryview, active: set[int]) -> Any:
    fmt = v.format
    if fmt not in _MV_FORMATS:
        raise _Unstorable(memoryview, f"memoryview format {fmt!r} cannot be restored")
    return {TAG: "memoryview", "v": _b64(v.tobytes()), "f": fmt, "s": list(v.shape or ())}


def _conv_date(v: datetime.date, active: set[int]) -> Any:
    return {TAG: "date", "v": v.isoformat()}


def _conv_datetime(v: datetime.datetime, active: set[int]) -> Any:
    node: dict[str, Any] = {TAG: "datetime", "v": v.isoformat()}
    if isinstance(v.tzinfo, zoneinfo.ZoneInfo) and v.tzinfo.key:
        node["z"] = v.tzinfo.key
    if v.fold:
        node["fold"] = 1
    return node


def _conv_time(v: datetime.time, active: set[int]) -> Any:
    node: dict[str, Any] = {TAG: "time", "v": v.isoformat()}
    if v.fold:
        node["fold"] = 1
    return node


def _conv_timedelta(v: datetime.timedelta, active: set[int]) -> Any:
    return {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]}


def _conv_uuid(v: uuid.UUID, active: set[int]) -> Any:
    return {TAG: "uuid", "v": str(v)}


def _conv_decimal(v: decimal.Decimal, active: set[int]) -> Any:
    return {TAG: "decimal", "v": str(v)}


def _conv_path(v: pathlib.PurePath, active: set[int]) -> Any:
    return {TAG: "path", "c": type(v).__name__, "v": str(v)}


def _conv_file(v: FileInput, active: set[int]) -> Any:
    return {TAG: "file", "v": str(v.path)}


def _conv_ndarray(v: Any, active: set[int]) -> Any:
    if v.dtype.hasobject:
        raise _Unstorable(type(v), "numpy arrays of dtype object need pickle")
    return {TAG: "ndarray", "v": _b64(_npy_bytes(v))}


def _conv_npscalar(v: Any, active: set[int]) -> Any:
    return {TAG: "npscalar", "v": _b64(_npy_bytes(_numpy().asarray(v)))}


_CONV: dict[type, _Converter] = {
    int: _conv_int,
    float: _conv_float,
    list: _conv_list,
    tuple: _conv_tuple,
    dict: _conv_dict,
    set: _conv_set,
    frozenset: _conv_set,
    bytes: _conv_bytes,
    bytearray: _conv_bytes,
    memoryview: _conv_memoryview,
    datetime.date: _conv_date,
    datetime.datetime: _conv_datetime,
    datetime.time: _conv_time,
    datetime.timedelta: _conv_timedelta,
    uuid.UUID: _conv_uuid,
    decimal.Decimal: _conv_decimal,
    FileInput: _conv_file,
}
_DYN: dict[type, _Converter] = {}
_DYN_MAX: Final = 4096


def _class_spec(cls: type) -> str:
    """``module:qualname`` of a class that decoding can import back, or raise."""
    spec = f"{cls.__module__}:{cls.__qualname__}"
    try:
        found = _resolve(spec)
    except CodecError:
        found = None
    if found is not cls:
        raise _Unstorable(
            cls,
            f"the class cannot be imported back as {spec} "
            "(define it at the top level of an importable module)",
        )
    return spec


def _make_enum_converter(cls: type[enum.Enum]) -> _Converter:
    def conv(v: enum.Enum, active: set[int]) -> Any:
        spec = _class_spec(cls)
        try:
            value = _tree(v._value_, active)
        except _Unstorable as exc:
            exc.segs.append(".value")
            raise
        return {TAG: "enum", "c": spec, "v": value}

    return conv


def _fields_tree(v: Any, names: list[str], extra: dict[str, Any] | None, active: set[int]) -> Any:
    data = {name: getattr(v, name) for name in names}
    if extra:
        data.update(extra)
    if TAG in data:
        return _conv_dict(data, active)  # an extra field named like our tag: tag the dict
    out = {}
    name = ""
    try:
        for name, x in data.items():
            out[name] = _tree(x, active)
    except _Unstorable as exc:
        exc.segs.append(f".{name}")
        raise
    return out


def _make_model_converter(cls: type[BaseModel]) -> _Converter:
    def conv(v: BaseModel, active: set[int]) -> Any:
        spec = _class_spec(cls)
        oid = _enter(v, active)
        try:
            fields = _fields_tree(v, list(cls.model_fields), v.__pydantic_extra__, active)
        except _Unstorable as exc:
            if "reference cycle" in exc.reason:
                raise
            dumped = _model_json_fallback(cls, v)
            if dumped is None:
                raise
            active.discard(oid)
            return {TAG: "model_json", "c": spec, "v": _tree(dumped, active)}
        active.discard(oid)
        return {TAG: "model", "c": spec, "v": fields}

    return conv


def _model_json_fallback(cls: type[BaseModel], v: BaseModel) -> Any:
    """``model_dump(mode="json")`` if it validates back to an equal model, else None."""
    try:
        dumped = v.model_dump(mode="json")
        restored = _validate(cls, dumped)
    except Exception:  # unserialisable or not valid again: not storable this way
        return None
    return dumped if restored == v else None


def _make_dataclass_converter(cls: type) -> _Converter:
    names = [f.name for f in dataclasses.fields(cls)]

    def conv(v: Any, active: set[int]) -> Any:
        spec = _class_spec(cls)
        oid = _enter(v, active)
        fields = _fields_tree(v, names, None, active)
        active.discard(oid)
        return {TAG: "dataclass", "c": spec, "v": fields}

    return conv


def _classify(t: type) -> _Converter:
    conv: _Converter
    if issubclass(t, FileInput):
        raise _Unstorable(t, "subclasses of FileInput cannot be restored")
    if issubclass(t, enum.Enum):
        conv = _make_enum_converter(t)
    elif issubclass(t, pathlib.PurePath):
        if _PATH_CLASSES.get(t.__name__) is not t:
            raise _Unstorable(t, "only pathlib's own path classes can be restored")
        conv = _conv_path
    elif issubclass(t, BaseModel):
        conv = _make_model_converter(t)
    elif dataclasses.is_dataclass(t):
        conv = _make_dataclass_converter(t)
    else:
        np: Any = sys.modules.get("numpy")
        if np is not None and t is np.ndarray:
            conv = _conv_ndarray
        elif np is not None and issubclass(t, np.generic):
            conv = _conv_npscalar
        else:
            raise _Unstorable(t)
    if len(_DYN) >= _DYN_MAX:
        _DYN.clear()
    _DYN[t] = conv
    return conv


# ---------------------------------------------------------------------------
# Tagged JSON trees -> values.


def _resolve(spec: Any) -> Any:
    """Import ``module:qualname`` and return the object; never calls it."""
    if type(spec) is not str or spec.count(":") != 1:
        raise CodecError(f"invalid class reference {_short(spec)} in payload")
    module, qualname = spec.split(":")
    if not module or not qualname or "<locals>" in qualname:
        raise CodecError(f"invalid class reference {spec!r} in payload")
    # Only modules the program has already imported: importing one named by a payload
    # would run its top-level code on behalf of whoever wrote the cache entry.
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise CodecError(
            f"module {module!r} is not imported, so {spec} is not restored from the cache "
            "(import it before the run, e.g. in the module that defines the stage)"
        )
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise CodecError(f"cannot find {spec}: {exc}") from exc
    return obj


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    module = getattr(obj, "__module__", None)
    kind = type(obj).__qualname__
    if isinstance(name, str):
        return f"{kind} {module}.{name}" if isinstance(module, str) else f"{kind} {name}"
    return kind


def _import_class(spec: Any, check: Callable[[Any], bool], expected: str) -> Any:
    obj = _resolve(spec)
    if not (isinstance(obj, type) and check(obj)):
        raise CodecError(f"refusing to restore {spec}: expected {expected}, found {_describe(obj)}")
    return obj


def _is_model(obj: type) -> bool:
    return issubclass(obj, BaseModel)


def _is_enum(obj: type) -> bool:
    return issubclass(obj, enum.Enum)


def _is_dataclass(obj: type) -> bool:
    return dataclasses.is_dataclass(obj)


_BY_NAME: Final = tuple(int(p) for p in pydantic.VERSION.split(".")[:2]) >= (2, 11)


def _validate(cls: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """``model_validate`` keyed by field names, whatever the fields' aliases."""
    if _BY_NAME:
        return cls.model_validate(data, by_alias=False, by_name=True)
    fields = cls.model_fields  # pragma: no cover - pydantic < 2.11
    keyed = {(fields[k].alias or k) if k in fields else k: x for k, x in data.items()}
    return cls.model_validate(keyed)  # pragma: no cover


def _need(node: dict[str, Any], key: str, kind: type) -> Any:
    try:
        x = node[key]
    except KeyError:
        raise CodecError(f"malformed {node.get(TAG)!r} node: no {key!r}") from None
    if not isinstance(x, kind):
        raise CodecError(f"malformed {node.get(TAG)!r} node: {key!r} is {type(x).__name__}")
    return x


def _un_model(node: dict[str, Any]) -> Any:
    cls = _import_class(node.get("c"), _is_model, "a pydantic BaseModel subclass")
    data = _need(node, "v", dict)
    try:
        return _validate(cls, data)
    except pydantic.ValidationError as exc:
        raise CodecError(
            f"stored {node['c']} no longer validates (the model changed since it was stored): {exc}"
        ) from exc


def _un_dataclass(node: dict[str, Any]) -> Any:
    cls = _import_class(node.get("c"), _is_dataclass, "a dataclass type")
    data = _need(node, "v", dict)
    init: dict[str, Any] = {}
    late: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            (init if f.init else late)[f.name] = data[f.name]
    if len(init) + len(late) != len(data):
        unknown = sorted(set(data) - set(init) - set(late))
        raise CodecError(f"stored {node['c']} has fields the class lacks now: {unknown}")
    obj = cls(**init)
    for name, x in late.items():
        object.__setattr__(obj, name, x)  # works on frozen and slotted dataclasses too
    return obj


def _un_enum(node: dict[str, Any]) -> Any:
    cls = _import_class(node.get("c"), _is_enum, "an Enum subclass")
    return cls(node["v"])  # EnumType.__call__ with one argument is a member lookup


def _un_float(node: dict[str, Any]) -> Any:
    text = _need(node, "v", str)
    if text not in ("nan", "inf", "-inf"):
        raise CodecError(f"malformed float node: {text!r}")
    return float(text)


def _un_int(node: dict[str, Any]) -> Any:
    return int(_need(node, "v", str), 16)


def _un_dict(node: dict[str, Any]) -> Any:
    return dict(_need(node, "v", list))


def _un_b64(node: dict[str, Any]) -> bytes:
    return base64.b64decode(_need(node, "v", str), validate=True)


def _un_memoryview(node: dict[str, Any]) -> Any:
    fmt = _need(node, "f", str)
    shape = _need(node, "s", list)
    view = memoryview(_un_b64(node))
    if fmt == "B" and len(shape) == 1:
        return view
    return view.cast(fmt, shape)


def _un_datetime(node: dict[str, Any]) -> Any:
    value = datetime.datetime.fromisoformat(_need(node, "v", str))
    key = node.get("z")
    if key is not None:
        zoned = value.replace(tzinfo=zoneinfo.ZoneInfo(key), fold=node.get("fold", 0))
        # Keep the stored offset if this machine's tz database disagrees with it.
        if zoned.utcoffset() == value.utcoffset():
            return zoned
    return value.replace(fold=node.get("fold", 0))


def _un_time(node: dict[str, Any]) -> Any:
    return datetime.time.fromisoformat(_need(node, "v", str)).replace(fold=node.get("fold", 0))


def _un_timedelta(node: dict[str, Any]) -> Any:
    days, seconds, micros = _need(node, "v", list)
    return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)


def _un_path(node: dict[str, Any]) -> Any:
    name = node.get("c")
    cls = _PATH_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"refusing to restore path class {_short(name)}: not a pathlib class")
    return cls(_need(node, "v", str))


_UNTAG: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tuple": lambda n: tuple(_need(n, "v", list)),
    "set": lambda n: set(_need(n, "v", list)),
    "frozenset": lambda n: frozenset(_need(n, "v", list)),
    "dict": _un_dict,
    "float": _un_float,
    "int": _un_int,
    "bytes": _un_b64,
    "bytearray": lambda n: bytearray(_un_b64(n)),
    "memoryview": _un_memoryview,
    "date": lambda n: datetime.date.fromisoformat(_need(n, "v", str)),
    "datetime": _un_datetime,
    "time": _un_time,
    "timedelta": _un_timedelta,
    "uuid": lambda n: uuid.UUID(_need(n, "v", str)),
    "decimal": lambda n: decimal.Decimal(_need(n, "v", str)),
    "path": _un_path,
    "file": lambda n: FileInput(_need(n, "v", str)),
    "enum": _un_enum,
    "model": _un_model,
    "model_json": _un_model,  # the dump validates like the fields do
    "dataclass": _un_dataclass,
    "ndarray": lambda n: _npy_load(_un_b64(n)),
    "npscalar": lambda n: _npy_load(_un_b64(n))[()],
}


def _hook(node: dict[str, Any]) -> Any:
    """Turn one JSON object into a value; its children are already values."""
    if TAG not in node:
        return node
    kind = node[TAG]
    handler = _UNTAG.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise CodecError(f"unknown tagged node {_short(kind)}")
    return handler(node)


def _untree(tree: Any) -> Any:
    t = type(tree)
    if t is list:
        return [_untree(x) for x in tree]
    if t is dict:
        return _hook({k: _untree(x) for k, x in tree.items()})
    if t in _PLAIN_SCALARS:
        return tree
    raise CodecError(f"a json/1 tree cannot hold {t.__qualname__}")


# ---------------------------------------------------------------------------
# numpy


def _numpy() -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        try:
            np = importlib.import_module("numpy")
        except ImportError as exc:
            raise CodecError("numpy is needed to decode this entry but is not installed") from exc
    return np


def _npy_bytes(arr: Any) -> bytes:
    """An ``.npy`` file of ``arr``: header, then the C-order buffer (one copy)."""
    np = _numpy()
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # not ascontiguousarray: it turns 0-d arrays into 1-d
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(arr))
    return b"".join([header.getvalue(), memoryview(arr.reshape(-1).view(np.uint8))])


def _npy_load(payload: bytes) -> Any:
    np = _numpy()
    stream = io.BytesIO(payload)
    arr = np.lib.format.read_array(stream, allow_pickle=False)
    if stream.tell() != len(payload):
        raise CodecError("numpy payload has trailing bytes")
    return arr


# ---------------------------------------------------------------------------
# Public API


def encode_json_tree(value: Any) -> Any:
    """Return ``value`` as a tagged ``json/1`` tree (JSON-able, never pickled).

    The executor stores small context-state writes in entry metadata this way. The tree
    is freshly built: mutating ``value`` later does not change it.

    Args:
        value: Any value that :func:`fingerprint` supports.

    Returns:
        A tree of dicts, lists, str, int, finite float, bool and None.

    Raises:
        CodecError: ``value`` is, or contains, a value the safe codec cannot store.
    """
    try:
        return _tree(value, set())
    except _Unstorable as exc:
        raise CodecError(exc.message()) from None
    except RecursionError:
        raise CodecError(f"cannot store output of type {_name(value)}: nested too deeply") from None


def decode_json_tree(tree: Any) -> Any:
    """Return the value a tree from :func:`encode_json_tree` stands for.

    Args:
        tree: A tagged ``json/1`` tree.

    Returns:
        A value equal to, and of the same type as, the one encoded.

    Raises:
        CodecError: The tree is malformed, or names a class that cannot be restored.
    """
    try:
        return _untree(tree)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"cannot decode a json/1 tree: {type(exc).__name__}: {exc}") from exc


def _name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _dumps(tree: Any) -> bytes:
    return json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("ascii")


def _encode_json(value: Any) -> bytes:
    try:
        if _plain(value, set()):
            try:
                return _dumps(value)
            except ValueError:
                pass  # NaN/inf, an int too long for str(), or a cycle: tag them below
        tree = _tree(value, set())
        return _dumps(tree)
    except RecursionError:
        raise CodecError(f"cannot store output of type {_name(value)}: nested too deeply") from None


def encode(value: Any, *, allow_pickle: bool = False) -> tuple[str, bytes]:
    """Encode an output for storage.

    Top-level ``bytes`` use ``bytes/1`` and numpy arrays ``numpy/1`` (raw buffers, no
    base64); everything else that :func:`fingerprint` supports uses ``json/1``.

    Example::

        codec, payload = encode({"total": 3, "when": datetime.date(2024, 1, 31)})
        assert decode(codec, payload) == {"total": 3, "when": datetime.date(2024, 1, 31)}

    Args:
        value: The output.
        allow_pickle: Store values the safe codecs cannot hold with ``pickle/1``.

    Returns:
        ``(codec_id, payload)``.

    Raises:
        CodecError: The value cannot be stored safely and ``allow_pickle`` is false (the
            message starts ``cannot store output of type mod.Cls with the safe codec``
            and names ``PipelineExecutor(allow_pickle=True)``), or pickling failed.
    """
    t = type(value)
    if t is bytes:
        return BYTES, value
    np: Any = sys.modules.get("numpy")
    if np is not None and t is np.ndarray and not value.dtype.hasobject:
        return NUMPY, _npy_bytes(value)
    try:
        return JSON, _encode_json(value)
    except _Unstorable as exc:
        if not allow_pickle:
            raise _pickle_hint(exc) from None
    try:
        return PICKLE, pickle.dumps(value, protocol=5)
    except Exception as exc:
        raise CodecError(f"cannot pickle output of type {_name(value)}: {exc}") from exc


#: ``json.loads`` of a str without its per-call argument handling (a hit's hot path).
_decode_plain = json.JSONDecoder().decode


def decode(codec_id: str, payload: bytes, *, allow_pickle: bool = False) -> Any:
    """Decode a stored output.

    Args:
        codec_id: The id :func:`encode` returned.
        payload: The bytes :func:`encode` returned.
        allow_pickle: Allow ``pickle/1`` payloads. Without it they are refused before
            anything is unpickled.

    Returns:
        A value equal to, and of the same type as, the one encoded.

    Raises:
        CodecError: Unknown codec id, a refused pickle, a corrupt payload, a class that
            cannot be imported or is not the expected kind, or a pydantic model that no
            longer validates.
    """
    try:
        if codec_id == JSON:
            if _TAG_MARK in payload:
                return json.loads(payload, object_hook=_hook)
            return _decode_plain(payload.decode())
        if codec_id == BYTES:
            return bytes(payload)
        if codec_id == NUMPY:
            return _npy_load(payload)
        if codec_id == PICKLE:
            if not allow_pickle:
                raise CodecError(
                    "refusing to load a pickle entry; PipelineExecutor(allow_pickle=True) opts in"
                )
            return pickle.loads(payload)
    except CodecError:
        raise
    except Exception as exc:  # the one choke point: corrupt payloads never escape as others
        raise CodecError(
            f"cannot decode payload with codec {codec_id!r}: {type(exc).__name__}: {exc}"
        ) from exc
    raise CodecError(f"unknown codec {codec_id!r}")
