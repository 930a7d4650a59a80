"""Content fingerprints: canonical, type-tagged ``xxh3_128`` hashes of values.

A fingerprint names a value, not an object: equal values of the same kind get the
same fingerprint in every process, on every machine, whatever ``PYTHONHASHSEED`` is.
Nothing here uses ``hash()``, ``id()`` (except for cycle detection), ``repr`` of
sets, or dict iteration order.

The encoding is a byte stream of type-tagged, self-delimiting records, fed to
``xxhash.xxh3_128``. Rules worth knowing (the golden tests pin them):

* ``1``, ``1.0``, ``"1"``, ``True`` and ``b"1"`` all differ; ``bool`` is not ``int``.
* ``0.0`` and ``-0.0`` differ, ``inf`` and ``-inf`` differ, and every NaN is the same.
* ``[1]`` and ``(1,)`` differ. A list or tuple is hashed over the 16-byte digests of its
  items (see :func:`sequence_digest`), so a FAN_OUT output can be hashed from its items.
* ``dict`` key order never matters; keys may be any supported type.
* ``set`` and ``frozenset`` with the same members have the same fingerprint, as they
  compare equal in Python.
* ``bytes``, ``bytearray`` and ``memoryview`` with the same content have the same
  fingerprint (a memoryview is hashed as its bytes, whatever its format or shape).
* ``Decimal`` is hashed by ``str()``: ``Decimal("1.0")`` and ``Decimal("1.00")`` differ.
* Datetimes are hashed by ``isoformat()``: naive and aware differ, and so do two aware
  datetimes with the same instant but different UTC offsets.
* Enum members are hashed as their class (``module:qualname``) plus their value.
* Pure paths are hashed as their path string plus their flavour (POSIX or Windows),
  never the file's content. :class:`FileInput` is hashed by its file's content only.
* Pydantic models and dataclasses are hashed as ``module:qualname`` plus every field
  (and a pydantic model's extra fields), by field name, so field order does not matter.
  Private attributes are not part of the value.
* Numpy arrays (only when numpy is already imported) are hashed as dtype, shape and
  C-order bytes; object arrays and ndarray subclasses are unsupported. Numpy scalars
  (``np.float64(1.0)``) are hashed as dtype and bytes: they differ from Python's
  ``1.0`` and from 0-d arrays.
* Only exact built-in types are supported. Subclasses of ``str``, ``int``, ``dict``,
  ``list``, ``datetime``... raise ``FingerprintError`` (they may carry state or meaning
  that hashing as the base type would drop), except enum members, pathlib classes,
  pydantic models and dataclasses, which are recognised by their base class.
* Anything else, and a container that contains itself, raises ``FingerprintError``
  naming where in the value the problem is (``value['groups'][3].client``).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import errno
import os
import pathlib
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Final, TypeAlias

import xxhash
from pydantic import BaseModel

from twinklr_pipe.errors import FingerprintError

__all__ = ["FileInput", "digest", "fingerprint", "sequence_digest"]

# One-byte type tags. Every record starts with one, so no two kinds can collide.
_T_NONE: Final = b"\x00"
_T_FALSE: Final = b"\x01"
_T_TRUE: Final = b"\x02"
_T_INT: Final = b"i"  # 8-byte signed
_T_BIGINT: Final = b"I"  # length + minimal two's complement bytes
_T_FLOAT: Final = b"f"
_T_STR: Final = b"s"
_T_BYTES: Final = b"b"
_T_LIST_REF: Final = b"l"  # a list inside another record: its 16-byte digest
_T_TUPLE_REF: Final = b"t"
_T_LIST: Final = b"L"  # only ever the first byte of a sequence digest's input
_T_TUPLE: Final = b"T"
_T_DICT: Final = b"d"
_T_SET: Final = b"S"
_T_KEY_REF: Final = b"k"  # a non-str dict key or set member: its 16-byte digest
_T_ENUM: Final = b"e"
_T_DATE: Final = b"D"
_T_DATETIME: Final = b"W"
_T_TIME: Final = b"H"
_T_TIMEDELTA: Final = b"R"
_T_UUID: Final = b"U"
_T_DECIMAL: Final = b"M"
_T_PATH: Final = b"p"
_T_FILE: Final = b"F"
_T_FILE_CONTENT: Final = b"C"
_T_MODEL: Final = b"m"
_T_DATACLASS: Final = b"c"
_T_NDARRAY: Final = b"a"
_T_NPSCALAR: Final = b"g"

_hdr = struct.Struct("<cQ").pack  # tag + unsigned 64-bit length
_hdr_int = struct.Struct("<cq").pack
_hdr_float = struct.Struct("<cd").pack
_pack_q = struct.Struct("<q").pack
_pack_Q = struct.Struct("<Q").pack
_pack_3q = struct.Struct("<qqq").pack
_h128 = xxhash.xxh3_128_digest
_first = itemgetter(0)
_STR_ONLY: Final = frozenset({str})
#: Records of str dict keys seen recently (keys repeat across the dicts of a list).
_STR_KEYS: dict[str, bytes] = {}
_STR_KEYS_MAX: Final = 8192

_NAN_RECORD: Final = _hdr_float(_T_FLOAT, float("nan"))
_I64: Final = 1 << 63
#: Bytes-like values at least this long are streamed into the hasher, never copied.
_STREAM_MIN: Final = 1 << 16
#: Chunk size for reading FileInput content.
_FILE_CHUNK: Final = 1 << 20
#: Git's racy-timestamp window: a stat this close to the file's mtime is not trusted.
_RACY_NS: Final = 2_000_000_000
#: Classification cache size limit (dynamically created classes would otherwise pile up).
_DYN_MAX: Final = 4096


class _Ctx(set[int]):
    """State of one top-level fingerprint: ids of the containers being encoded
    (cycle detection) and, per open buffer, the hasher large data was streamed into."""

    __slots__ = ("streams",)

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[int, xxhash.xxh3_128] = {}


_Encoder: TypeAlias = Callable[[Any, bytearray, _Ctx], None]


class _Fail(Exception):
    """Internal: an unsupported value; ``segs`` is its path, innermost segment first."""

    def __init__(self, value_type: type, note: str | None = None) -> None:
        super().__init__(value_type)
        self.value_type = value_type
        self.note = note
        self.segs: list[str] = []

    def to_error(self) -> FingerprintError:
        err = FingerprintError(self.value_type, "value" + "".join(reversed(self.segs)))
        if self.note:
            err.add_note(self.note)
        return err


def _short(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(obj).__qualname__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _cycle(obj: object) -> _Fail:
    return _Fail(type(obj), "The value contains itself (a reference cycle) at this point.")


# ---------------------------------------------------------------------------
# Finishing a buffer: one-shot hash, or the streaming hasher large data went into.


def _stream(buf: bytearray, data: Any, ctx: _Ctx) -> None:
    h = ctx.streams.get(id(buf))
    if h is None:
        h = ctx.streams[id(buf)] = xxhash.xxh3_128()
    h.update(buf)
    del buf[:]
    h.update(data)


def _finish(buf: bytearray, ctx: _Ctx) -> bytes:
    if ctx.streams:
        h = ctx.streams.pop(id(buf), None)
        if h is not None:
            h.update(buf)
            return h.digest()
    return _h128(buf)


def _lookup(t: type) -> _Encoder:
    enc = _ENC.get(t)
    if enc is None:
        enc = _DYN.get(t)
        if enc is None:
            enc = _classify(t)
    return enc


def _digest_of(v: Any, ctx: _Ctx) -> bytes:
    t = type(v)
    if t is list:
        return _seq_digest(v, _T_LIST, ctx)
    if t is tuple:
        return _seq_digest(v, _T_TUPLE, ctx)
    buf = bytearray()
    _lookup(t)(v, buf, ctx)
    return _finish(buf, ctx)


def _key_record(k: Any, ctx: _Ctx) -> bytes:
    """The record of a dict key or set member: inline for str, else its digest."""
    if type(k) is str:
        return _str_key_record(k)
    return _T_KEY_REF + _digest_of(k, ctx)


# ---------------------------------------------------------------------------
# Encoders: each appends the record of one value to ``buf``.


def _enc_none(v: None, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_NONE


def _enc_bool(v: bool, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_TRUE if v else _T_FALSE


def _enc_int(v: int, buf: bytearray, ctx: _Ctx) -> None:
    if -_I64 <= v < _I64:
        buf += _hdr_int(_T_INT, v)
    else:
        n = (v.bit_length() + 8) // 8
        buf += _hdr(_T_BIGINT, n)
        buf += v.to_bytes(n, "little", signed=True)


def _enc_float(v: float, buf: bytearray, ctx: _Ctx) -> None:
    buf += _NAN_RECORD if v != v else _hdr_float(_T_FLOAT, v)


def _enc_str(v: str, buf: bytearray, ctx: _Ctx) -> None:
    try:
        b = v.encode()
    except UnicodeEncodeError:  # lone surrogates are valid str values
        b = v.encode("utf-8", "surrogatepass")
    buf += _hdr(_T_STR, len(b))
    buf += b


def _enc_bytes(v: bytes | bytearray, buf: bytearray, ctx: _Ctx) -> None:
    n = len(v)
    buf += _hdr(_T_BYTES, n)
    if n < _STREAM_MIN:
        buf += v
    else:
        _stream(buf, v, ctx)


def _enc_memoryview(v: memoryview, buf: bytearray, ctx: _Ctx) -> None:
    data: Any
    if v.c_contiguous:
        try:
            data = v if v.ndim == 1 and v.format == "B" else v.cast("B")
        except (TypeError, ValueError):
            data = v.tobytes()
    else:
        data = v.tobytes()
    _enc_bytes(data, buf, ctx)


def _seq_digest(v: list[Any] | tuple[Any, ...], tag: bytes, ctx: _Ctx) -> bytes:
    oid = id(v)
    if oid in ctx:
        raise _cycle(v)
    ctx.add(oid)
    acc = bytearray(_hdr(tag, len(v)))
    i = 0
    try:
        for i, x in enumerate(v):  # noqa: B007 - i names the failing item
            t = type(x)
            if t is list:
                acc += _seq_digest(x, _T_LIST, ctx)
            elif t is tuple:
                acc += _seq_digest(x, _T_TUPLE, ctx)
            else:
                b = bytearray()
                enc = _ENC.get(t)
                (enc or _lookup(t))(x, b, ctx)
                acc += _finish(b, ctx) if ctx.streams else _h128(b)
    except _Fail as exc:
        exc.segs.append(f"[{i}]")
        raise
    ctx.discard(oid)
    return _h128(acc)


def _enc_list(v: list[Any], buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_LIST_REF
    buf += _seq_digest(v, _T_LIST, ctx)


def _enc_tuple(v: tuple[Any, ...], buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_TUPLE_REF
    buf += _seq_digest(v, _T_TUPLE, ctx)


def _str_key_record(k: str) -> bytes:
    rec = _STR_KEYS.get(k)
    if rec is None:
        try:
            b = k.encode()
        except UnicodeEncodeError:
            b = k.encode("utf-8", "surrogatepass")
        rec = _hdr(_T_STR, len(b)) + b
        if len(b) <= 256:
            if len(_STR_KEYS) >= _STR_KEYS_MAX:
                _STR_KEYS.clear()
            _STR_KEYS[k] = rec
    return rec


def _enc_dict(v: dict[Any, Any], buf: bytearray, ctx: _Ctx) -> None:
    buf += _hdr(_T_DICT, len(v))
    if not set(map(type, v)) <= _STR_ONLY:
        oid = id(v)
        if oid in ctx:
            raise _cycle(v)
        ctx.add(oid)
        _enc_mixed_pairs(v, buf, ctx)
        ctx.discard(oid)
        return
    # The common case: str keys, ordered by the keys themselves. The dict joins the
    # cycle-detection set only when it has a value to recurse into (a dict of scalars
    # cannot be part of a cycle), which saves time on lists of small records.
    oid = 0
    cycle = False
    k = None
    try:
        for k in sorted(v):
            buf += _STR_KEYS.get(k) or _str_key_record(k)
            x = v[k]
            t = type(x)
            if t is str:
                try:
                    b = x.encode()
                except UnicodeEncodeError:
                    b = x.encode("utf-8", "surrogatepass")
                buf += _hdr(_T_STR, len(b))
                buf += b
            elif t is int and -_I64 <= x < _I64:
                buf += _hdr_int(_T_INT, x)
            elif t is float and x == x:
                buf += _hdr_float(_T_FLOAT, x)
            else:
                if not oid:
                    oid = id(v)
                    if oid in ctx:
                        cycle = True
                        break
                    ctx.add(oid)
                enc = _ENC.get(t)
                (enc or _lookup(t))(x, buf, ctx)
    except _Fail as exc:
        exc.segs.append(f"[{_short(k)}]")
        raise
    if cycle:
        raise _cycle(v)
    if oid:
        ctx.discard(oid)


def _enc_mixed_pairs(v: dict[Any, Any], buf: bytearray, ctx: _Ctx) -> None:
    """Pairs of a dict with some non-str keys, ordered by their key records."""
    items: list[tuple[bytes, Any, Any]] = []
    for k, x in v.items():
        try:
            items.append((_key_record(k, ctx), k, x))
        except _Fail as exc:
            exc.segs.append(f"<key {_short(k)}>")
            raise
    items.sort(key=_first)
    if len({it[0] for it in items}) < len(items):
        # Distinct keys with equal records (e.g. two NaN objects): order those pairs by
        # their value's digest too, so the order depends on content, not insertion.
        items.sort(key=lambda it: (it[0], _digest_of(it[2], ctx)))
    k = None
    try:
        for kb, k, x in items:  # noqa: B007 - k names the failing pair
            buf += kb
            _lookup(type(x))(x, buf, ctx)
    except _Fail as exc:
        exc.segs.append(f"[{_short(k)}]")
        raise


def _enc_set(v: set[Any] | frozenset[Any], buf: bytearray, ctx: _Ctx) -> None:
    records = []
    for m in v:
        try:
            records.append(_key_record(m, ctx))
        except _Fail as exc:
            exc.segs.append(f"{{{_short(m)}}}")
            raise
    records.sort()
    buf += _hdr(_T_SET, len(records))
    buf += b"".join(records)


def _enc_date(v: datetime.date, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_DATE
    _enc_str(v.isoformat(), buf, ctx)


def _enc_datetime(v: datetime.datetime, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_DATETIME
    _enc_str(v.isoformat(), buf, ctx)  # includes the UTC offset when aware


def _enc_time(v: datetime.time, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_TIME
    _enc_str(v.isoformat(), buf, ctx)


def _enc_timedelta(v: datetime.timedelta, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_TIMEDELTA
    buf += _pack_3q(v.days, v.seconds, v.microseconds)


def _enc_uuid(v: uuid.UUID, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_UUID
    buf += v.bytes


def _enc_decimal(v: decimal.Decimal, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_DECIMAL
    _enc_str(str(v), buf, ctx)


def _enc_path(v: pathlib.PurePath, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_PATH
    buf += b"w" if isinstance(v, pathlib.PureWindowsPath) else b"x"
    _enc_str(str(v), buf, ctx)


def _enc_file(v: FileInput, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_FILE
    buf += _file_content_digest(v.path)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _make_enum_encoder(cls: type[enum.Enum]) -> _Encoder:
    prefix = _T_ENUM + _key_record(_class_name(cls), _Ctx())

    def enc(v: enum.Enum, buf: bytearray, ctx: _Ctx) -> None:
        buf += prefix
        x = v._value_
        try:
            _lookup(type(x))(x, buf, ctx)
        except _Fail as exc:
            exc.segs.append(".value")
            raise

    return enc


def _make_fields_encoder(
    cls: type, tag: bytes, names: list[str], *, pydantic_model: bool
) -> _Encoder:
    names = sorted(names)
    prefix = tag + _key_record(_class_name(cls), _Ctx()) + _pack_Q(len(names))
    keyed = [(name, _key_record(name, _Ctx())) for name in names]

    def enc(v: Any, buf: bytearray, ctx: _Ctx) -> None:
        oid = id(v)
        if oid in ctx:
            raise _cycle(v)
        ctx.add(oid)
        buf += prefix
        name = ""
        try:
            for name, record in keyed:
                buf += record
                try:
                    x = getattr(v, name)
                except AttributeError:
                    raise _Fail(type(v), f"Field {name!r} has no value.") from None
                _lookup(type(x))(x, buf, ctx)
            if pydantic_model:
                extra = v.__pydantic_extra__
                if extra:
                    name = ""
                    buf += b"\x01"
                    _enc_dict(extra, buf, ctx)
                else:
                    buf += b"\x00"
        except _Fail as exc:
            if name:
                exc.segs.append(f".{name}")
            raise
        ctx.discard(oid)

    return enc


def _enc_ndarray(v: Any, buf: bytearray, ctx: _Ctx) -> None:
    np: Any = sys.modules["numpy"]
    dtype = v.dtype
    if dtype.hasobject:
        raise _Fail(type(v), "Numpy arrays of dtype object cannot be fingerprinted.")
    buf += _T_NDARRAY
    _enc_str(_dtype_key(dtype), buf, ctx)
    buf += _pack_Q(v.ndim)
    for n in v.shape:
        buf += _pack_q(n)
    arr = v if v.flags.c_contiguous else np.ascontiguousarray(v)  # one copy at most
    data = memoryview(arr.reshape(-1).view(np.uint8))
    buf += _pack_Q(data.nbytes)
    if data.nbytes < _STREAM_MIN:
        buf += data
    else:
        _stream(buf, data, ctx)


def _enc_npscalar(v: Any, buf: bytearray, ctx: _Ctx) -> None:
    buf += _T_NPSCALAR
    _enc_str(_dtype_key(v.dtype), buf, ctx)
    _enc_bytes(v.tobytes(), buf, ctx)


def _dtype_key(dtype: Any) -> str:
    """``dtype.str``, or the full description of a structured dtype (whose ``str`` is ``|V8``)."""
    if dtype.fields is None and dtype.subdtype is None:
        return str(dtype.str)
    np: Any = sys.modules["numpy"]
    return repr(np.lib.format.dtype_to_descr(dtype))


_ENC: dict[type, _Encoder] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    bytearray: _enc_bytes,
    memoryview: _enc_memoryview,
    list: _enc_list,
    tuple: _enc_tuple,
    dict: _enc_dict,
    set: _enc_set,
    frozenset: _enc_set,
    datetime.date: _enc_date,
    datetime.datetime: _enc_datetime,
    datetime.time: _enc_time,
    datetime.timedelta: _enc_timedelta,
    uuid.UUID: _enc_uuid,
    decimal.Decimal: _enc_decimal,
}
_DYN: dict[type, _Encoder] = {}


def _classify(t: type) -> _Encoder:
    """Find the encoder of a type that is not an exact built-in, or raise ``_Fail``."""
    enc: _Encoder
    if issubclass(t, FileInput):
        enc = _enc_file
    elif issubclass(t, enum.Enum):
        enc = _make_enum_encoder(t)
    elif issubclass(t, pathlib.PurePath):
        enc = _enc_path
    elif issubclass(t, BaseModel):
        enc = _make_fields_encoder(t, _T_MODEL, list(t.model_fields), pydantic_model=True)
    elif dataclasses.is_dataclass(t):
        names = [f.name for f in dataclasses.fields(t)]
        enc = _make_fields_encoder(t, _T_DATACLASS, names, pydantic_model=False)
    else:
        np: Any = sys.modules.get("numpy")  # if numpy was never imported, no value is an array
        if np is not None and t is np.ndarray:
            enc = _enc_ndarray
        elif np is not None and issubclass(t, np.generic):
            enc = _enc_npscalar
        else:
            raise _Fail(t)
    if len(_DYN) >= _DYN_MAX:
        _DYN.clear()
    _DYN[t] = enc
    return enc


# ---------------------------------------------------------------------------
# FileInput


@dataclasses.dataclass(frozen=True, init=False)
class FileInput:
    """A file whose fingerprint is its content, never its path.

    Use it as a stage input (or a field of one) when the stage reads a file: the cache
    key then changes when the file's bytes change, and two paths holding the same bytes
    share cache entries. Equality and ``hash()`` are by path, as given.

    Example::

        report = FileInput("data/report.csv")
        fingerprint(report)  # hash of the file's bytes

    Attributes:
        path: The path, as given (relative paths are resolved against the current
            directory when the file is hashed).
    """

    path: pathlib.Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", pathlib.Path(path))


_ENC[FileInput] = _enc_file

_FileSig: TypeAlias = tuple[int, int, int, int, int]
_FILE_MEMO: dict[str, tuple[_FileSig, bytes]] = {}
_FILE_MEMO_LOCK = threading.Lock()
_now_ns = time.time_ns  # the clock of the racy-timestamp rule (tests replace it)


def _file_sig(st: os.stat_result) -> _FileSig:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _read_file_digest(path: str) -> tuple[bytes, _FileSig]:
    """Hash a file's content in chunks; also return its stat signature after reading."""
    h = xxhash.xxh3_128(_T_FILE_CONTENT)
    chunk = bytearray(_FILE_CHUNK)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            h.update(view[:n])
        after = os.fstat(f.fileno())
    return h.digest(), _file_sig(after)


def _file_content_digest(path: pathlib.Path) -> bytes:
    abspath = os.path.abspath(path)
    try:
        st = os.stat(abspath)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            errno.ENOENT, "FileInput names a file that does not exist", abspath
        ) from exc
    sig = _file_sig(st)
    # Racy-timestamp rule (as git's): a file modified within 2 s of this stat may change
    # again without its size or mtime changing, so the memo is neither used nor written.
    racy = _now_ns() - st.st_mtime_ns < _RACY_NS
    if not racy:
        with _FILE_MEMO_LOCK:
            hit = _FILE_MEMO.get(abspath)
        if hit is not None and hit[0] == sig:
            return hit[1]
    content, sig_after = _read_file_digest(abspath)
    if not racy and sig_after == sig:  # unchanged while we read it
        with _FILE_MEMO_LOCK:
            _FILE_MEMO[abspath] = (sig, content)
    return content


def _clear_file_memo() -> None:
    with _FILE_MEMO_LOCK:
        _FILE_MEMO.clear()


# ---------------------------------------------------------------------------
# Public API


def digest(value: Any) -> bytes:
    """Return the 16-byte fingerprint of ``value``.

    Args:
        value: Any supported value (see the module docstring).

    Returns:
        The ``xxh3_128`` digest of the value's canonical encoding;
        ``digest(v).hex() == fingerprint(v)``.

    Raises:
        FingerprintError: ``value`` is, or contains, an unsupported value or a cycle.
        FileNotFoundError: a :class:`FileInput` in ``value`` names a missing file.
    """
    try:
        return _digest_of(value, _Ctx())
    except _Fail as exc:
        raise exc.to_error() from None
    except RecursionError:
        err = FingerprintError(type(value))
        err.add_note("The value is nested too deeply to fingerprint.")
        raise err from None


def fingerprint(value: Any) -> str:
    """Return the fingerprint of ``value``: 32 lowercase hex characters.

    Equal values of the same kind get the same fingerprint in every process.

    Example::

        >>> fingerprint({"b": 2, "a": 1}) == fingerprint({"a": 1, "b": 2})
        True

    Args:
        value: Any supported value (see the module docstring).

    Returns:
        ``digest(value).hex()``.

    Raises:
        FingerprintError: ``value`` is, or contains, an unsupported value or a cycle.
        FileNotFoundError: a :class:`FileInput` in ``value`` names a missing file.
    """
    return digest(value).hex()


def sequence_digest(item_digests: Sequence[bytes], *, tuple_: bool = False) -> bytes:
    """Return the digest of a list (or tuple) from the digests of its items.

    ``sequence_digest([digest(x) for x in items]) == digest(list(items))``, and with
    ``tuple_=True`` the same holds for ``tuple(items)``. The executor uses it to hash a
    FAN_OUT output from its items' hashes without encoding the list again.

    Args:
        item_digests: The 16-byte digests of the items, in order.
        tuple_: Give the digest of a tuple rather than a list.

    Returns:
        The 16-byte digest of the sequence.

    Raises:
        ValueError: An item digest is not 16 bytes long.
    """
    if any(len(d) != 16 for d in item_digests):
        raise ValueError("every item digest must be 16 bytes long (from digest())")
    tag = _T_TUPLE if tuple_ else _T_LIST
    return _h128(_hdr(tag, len(item_digests)) + b"".join(item_digests))
