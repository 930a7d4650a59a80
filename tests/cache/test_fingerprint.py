"""Tests of ``twinklr_pipe.cache._fingerprint``."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

import twinklr_pipe.cache._fingerprint as fp_module
from twinklr_pipe.cache._fingerprint import FileInput, digest, fingerprint, sequence_digest
from twinklr_pipe.errors import CacheError, FingerprintError


class Golden(BaseModel):
    """A model with a fixed module name, so its golden fingerprint ignores test layout."""

    __module__ = "golden.models"
    model_config = ConfigDict(frozen=True)

    name: str
    count: int
    tags: tuple[str, ...] = ()


class Client(BaseModel):
    name: str
    handle: Any = None


class Group(BaseModel):
    clients: list[Client]


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Shade(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class PointModel(BaseModel):
    x: int
    y: int


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int


class ReadCounter:
    """Wraps ``_read_file_digest`` and counts the files it reads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = fp_module._read_file_digest
        monkeypatch.setattr(fp_module, "_read_file_digest", self)

    def __call__(self, path: str) -> Any:
        self.calls += 1
        return self._real(path)


# Scalars of distinct kinds whose text forms look alike.
LOOKALIKES: list[Any] = [
    None,
    0,
    1,
    -1,
    0.0,
    -0.0,
    1.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    "1",
    "",
    True,
    False,
    b"1",
    b"",
    "None",
    (),
    [],
    {},
    frozenset(),
    (1,),
    [1],
    {1},
    {"1": 1},
    decimal.Decimal("1"),
    decimal.Decimal("1.0"),
    pathlib.PurePosixPath("1"),
    pathlib.PureWindowsPath("1"),
    Color.RED,
    Shade.RED,
    Level.LOW,
    datetime.date(2024, 1, 1),
    datetime.datetime(2024, 1, 1),
    datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    datetime.time(1),
    datetime.timedelta(1),
    uuid.UUID(int=1),
    Point(1, 2),
    PointModel(x=1, y=2),
]

json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary() | st.floats(),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=8,
)


class TestGolden:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (None, "a6cd5e9392000f6ac44bdff4074eecdb"),
            (1, "5c0fabed007821c11267cbb5dcaed171"),
            ("1", "3400a47faadb8b004fd345b3f48de741"),
            (1.0, "dfb9c18a60c46aba610be337e70fece0"),
            (True, "e3ab152fcb1762bfc9f42e6c9e93dfff"),
            (b"1", "194c2238ea2feee9ce34e278135fbd07"),
            ([1, 2], "67aba783f18c68c399adfb835901746b"),
            ((1, 2), "e2b32584c79d2a6d9b5489db646328d0"),
            ({"a": 1}, "c03bae7fcefbffb0e820f2b3d107136f"),
            (frozenset({1, 2}), "c67c907e8d1322261f2e8d0c71b91dbd"),
            (Golden(name="x", count=2, tags=("a",)), "d1a8ec36c42bb590e3b0ecfff0a7f0a9"),
        ],
    )
    def test_fingerprint_is_pinned(self, value: Any, expected: str) -> None:
        """Pinned fingerprints change only with a deliberate, cache-breaking change."""
        assert fingerprint(value) == expected

    def test_fingerprint_is_digest_hex(self) -> None:
        """``fingerprint`` is 32 lowercase hex characters: the hex of ``digest``."""
        value = {"a": [1, (2, 3)], "b": {4.5}}
        assert len(digest(value)) == 16
        assert fingerprint(value) == digest(value).hex()
        assert fingerprint(value) == fingerprint(value).lower()


class TestScalars:
    def test_lookalike_values_never_collide(self) -> None:
        """``1``, ``1.0``, ``"1"``, ``True``, ``b"1"`` and friends all differ."""
        prints = [fingerprint(v) for v in LOOKALIKES]
        assert len(set(prints)) == len(LOOKALIKES)

    @given(st.integers(), st.floats(), st.text(), st.binary(), st.booleans())
    def test_distinct_types_never_collide(
        self, i: int, f: float, s: str, b: bytes, flag: bool
    ) -> None:
        """An int, float, str, bytes and bool never share a fingerprint."""
        prints = {fingerprint(i), fingerprint(f), fingerprint(s), fingerprint(b)}
        prints.add(fingerprint(flag))
        assert len(prints) == 5

    def test_every_nan_is_the_same(self) -> None:
        """NaNs with different payloads and signs get one fingerprint."""
        other_nan = -math.copysign(math.nan, 1.0)
        assert fingerprint(math.nan) == fingerprint(float("nan")) == fingerprint(other_nan)

    def test_big_ints_are_exact(self) -> None:
        """Arbitrarily large ints hash by exact value, sign included."""
        big = 10**5000
        assert fingerprint(big) == fingerprint(10**5000)
        assert len({fingerprint(big), fingerprint(big + 1), fingerprint(-big)}) == 3
        assert fingerprint(2**63) != fingerprint(2**63 - 1)

    def test_lone_surrogates_are_supported(self) -> None:
        """A str with a lone surrogate hashes, and differs from its neighbours."""
        assert fingerprint("\ud800") != fingerprint("\ud801")


class TestContainers:
    @settings(max_examples=50)
    @given(st.dictionaries(hashables, json_values, max_size=6), st.randoms())
    def test_dict_order_never_changes_a_fingerprint(self, value: dict[Any, Any], rnd: Any) -> None:
        """A dict's fingerprint is the same whatever order its keys were inserted in."""
        items = list(value.items())
        rnd.shuffle(items)
        assert fingerprint(dict(items)) == fingerprint(value)

    @settings(max_examples=50)
    @given(st.lists(json_values, max_size=6))
    def test_sequence_digest_matches_list_and_tuple_digest(self, items: list[Any]) -> None:
        """``sequence_digest`` over item digests equals the digest of the list or tuple."""
        digests = [digest(x) for x in items]
        assert sequence_digest(digests) == digest(items)
        assert sequence_digest(digests, tuple_=True) == digest(tuple(items))

    def test_sequence_digest_rejects_wrong_lengths(self) -> None:
        """An item digest that is not 16 bytes is a ValueError."""
        with pytest.raises(ValueError, match="16 bytes"):
            sequence_digest([b"\x00" * 15, b"\x00" * 17])

    def test_list_and_tuple_differ(self) -> None:
        """``[1]`` and ``(1,)`` differ, also nested."""
        assert fingerprint([1]) != fingerprint((1,))
        assert fingerprint({"a": [1]}) != fingerprint({"a": (1,)})

    def test_order_matters_in_sequences(self) -> None:
        """Lists are ordered."""
        assert fingerprint([1, 2]) != fingerprint([2, 1])

    def test_set_and_frozenset_are_equal(self) -> None:
        """A set and a frozenset with the same members share a fingerprint, as they are ==."""
        assert fingerprint({1, "a", (2, 3)}) == fingerprint(frozenset({(2, 3), "a", 1}))

    def test_bytes_likes_are_equal(self) -> None:
        """bytes, bytearray and memoryview with the same content share a fingerprint."""
        data = bytes(range(256)) * 300  # large enough to be streamed
        expected = fingerprint(data)
        assert fingerprint(bytearray(data)) == expected
        assert fingerprint(memoryview(data)) == expected
        assert fingerprint(memoryview(data)[::-1]) == fingerprint(data[::-1])
        assert fingerprint(memoryview(data).cast("H")) == expected

    def test_mixed_keys_with_equal_records_are_order_free(self) -> None:
        """Distinct NaN keys do not make a dict's fingerprint depend on insertion order."""
        n1, n2 = float("nan"), float("nan")
        assert fingerprint({n1: 1, n2: 2, "a": 3}) == fingerprint({n2: 2, "a": 3, n1: 1})

    def test_large_values_stream_like_small_ones(self) -> None:
        """A streamed bytes value nested in a dict hashes the same bytes as a small one would."""
        big = b"x" * (1 << 17)
        assert fingerprint({"a": big, "b": 1}) == fingerprint({"b": 1, "a": bytes(big)})
        assert fingerprint({"a": big}) != fingerprint({"a": big[:-1]})


class TestRichTypes:
    def test_enum_members_hash_by_class_and_value(self) -> None:
        """Members of different enums with equal values differ; IntEnum is not int."""
        assert fingerprint(Color.RED) != fingerprint(Shade.RED)
        assert fingerprint(Color.RED) != fingerprint(Color.GREEN)
        assert fingerprint(Level.LOW) != fingerprint(1)

    def test_naive_and_aware_datetimes_differ(self) -> None:
        """Naive, UTC and other-offset datetimes of the same wall time all differ."""
        naive = datetime.datetime(2024, 5, 1, 12)
        utc = naive.replace(tzinfo=datetime.UTC)
        same_instant = utc.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
        assert len({fingerprint(naive), fingerprint(utc), fingerprint(same_instant)}) == 3

    def test_decimal_keeps_its_exponent(self) -> None:
        """``Decimal("1.0")`` and ``Decimal("1.00")`` differ (hashed by ``str()``)."""
        assert fingerprint(decimal.Decimal("1.0")) != fingerprint(decimal.Decimal("1.00"))

    def test_paths_hash_as_paths_not_content(self, tmp_path: pathlib.Path) -> None:
        """A path hashes as its string, tagged: not as the str, and not by its file."""
        file = tmp_path / "a.txt"
        file.write_text("one")
        before = fingerprint(file)
        file.write_text("two")
        assert fingerprint(file) == before
        assert fingerprint(file) == fingerprint(pathlib.PurePosixPath(file))
        assert fingerprint(file) != fingerprint(str(file))

    def test_models_hash_by_class_and_fields(self) -> None:
        """Equal models share a fingerprint; another class with the same fields differs."""
        assert fingerprint(PointModel(x=1, y=2)) == fingerprint(PointModel(y=2, x=1))
        assert fingerprint(PointModel(x=1, y=2)) != fingerprint(PointModel(x=1, y=3))
        assert fingerprint(PointModel(x=1, y=2)) != fingerprint(Point(1, 2))

    def test_model_extra_fields_count(self) -> None:
        """Extra fields of an ``extra="allow"`` model are part of its value."""
        assert fingerprint(Loose(a=1)) != fingerprint(Loose(a=1, b=2))
        assert fingerprint(Loose(a=1, b=2)) == fingerprint(Loose(a=1, b=2))

    def test_models_hash_fields_not_dumps(self) -> None:
        """A model field holding a tuple differs from one holding a list."""
        assert fingerprint(Client(name="a", handle=(1,))) != fingerprint(
            Client(name="a", handle=[1])
        )


class TestUnsupported:
    def test_error_names_the_path_into_the_value(self) -> None:
        """The error says where the unsupported value is, from the top."""
        clients = [Client(name=str(i)) for i in range(3)] + [Client(name="x", handle=object())]
        value = {"groups": [Group(clients=[]), Group(clients=clients)]}
        with pytest.raises(FingerprintError) as info:
            fingerprint({"groups": [None, None, None, value["groups"][1].clients[3]]})
        assert info.value.where == "value['groups'][3].handle"
        assert info.value.value_type is object
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, CacheError)
        with pytest.raises(FingerprintError, match=r"value\['groups'\]\[1\]\.clients\[3\]"):
            fingerprint(value)

    def test_unsupported_key_and_member_are_located(self) -> None:
        """Bad dict keys and set members are named in the path."""
        with pytest.raises(FingerprintError, match=r"value\[1\]<key \(1, <object"):
            fingerprint([0, {(1, object()): 1}])
        with pytest.raises(FingerprintError, match=r"value\{\(2, <object"):
            fingerprint({(2, object())})

    @pytest.mark.parametrize(
        "value",
        [
            type("MyStr", (str,), {})("x"),
            type("MyDict", (dict,), {})(),
            type("MyInt", (int,), {})(1),
            object(),
            1j,
            print,
            iter([]),
        ],
        ids=["str-subclass", "dict-subclass", "int-subclass", "object", "complex", "func", "iter"],
    )
    def test_unsupported_types_raise(self, value: Any) -> None:
        """Subclasses of built-ins and arbitrary objects are refused, never guessed."""
        with pytest.raises(FingerprintError, match="Cannot fingerprint value of type"):
            fingerprint(value)

    def test_cycles_raise_fingerprint_error(self) -> None:
        """A container that contains itself is a FingerprintError, not a RecursionError."""
        loop: list[Any] = [1]
        loop.append({"again": loop})
        with pytest.raises(FingerprintError) as info:
            fingerprint(loop)
        assert info.value.where == "value[1]['again']"
        assert "reference cycle" in "".join(info.value.__notes__)

    def test_shared_substructure_is_not_a_cycle(self) -> None:
        """The same list twice in a value is fine."""
        shared = [1, 2]
        assert fingerprint([shared, shared]) == fingerprint([[1, 2], [1, 2]])


class TestNumpy:
    def test_arrays_hash_dtype_shape_and_data(self) -> None:
        """Contiguous or not, equal arrays match; dtype, shape and data all count."""
        np = pytest.importorskip("numpy")
        a = np.arange(12, dtype="<i8").reshape(3, 4)
        assert fingerprint(a) == fingerprint(np.array(a.T).T)  # Fortran-ordered copy
        assert fingerprint(a[:, ::2]) == fingerprint(np.ascontiguousarray(a[:, ::2]))
        others = [a.astype("<i4"), a.astype(">i8"), a.reshape(4, 3), a + 1, a.tolist()]
        assert fingerprint(a) not in {fingerprint(o) for o in others}

    def test_structured_dtypes_keep_field_layout(self) -> None:
        """Structured arrays with the same bytes but different fields differ."""
        np = pytest.importorskip("numpy")
        one = np.zeros(2, dtype=[("a", "<i4"), ("b", "<i4")])
        two = np.zeros(2, dtype=[("c", "<i4"), ("d", "<i4")])
        assert fingerprint(one) != fingerprint(two)

    def test_numpy_scalars_are_their_own_kind(self) -> None:
        """A numpy scalar differs from the Python number, from a 0-d array and by dtype."""
        np = pytest.importorskip("numpy")
        prints = {
            fingerprint(np.float64(1.0)),
            fingerprint(1.0),
            fingerprint(np.array(1.0)),
            fingerprint(np.float32(1.0)),
            fingerprint(np.int64(1)),
        }
        assert len(prints) == 5
        assert fingerprint(np.float64(1.0)) == fingerprint(np.float64(1))

    def test_object_arrays_are_refused(self) -> None:
        """An object array cannot be hashed from its bytes (they are pointers)."""
        np = pytest.importorskip("numpy")
        with pytest.raises(FingerprintError, match=r"numpy\.ndarray"):
            fingerprint({"a": np.array([1, None], dtype=object)})


_CHILD = textwrap.dedent(
    """
    import datetime, json, sys
    from twinklr_pipe.cache._fingerprint import fingerprint
    value = {
        "set": {f"s{i}" for i in range(50)},
        "frozen": frozenset({("t", i) for i in range(20)}),
        frozenset({"k1", "k2", "k3"}): {str(i): i for i in range(30)},
        (1, "x"): [{b"a", b"b", b"c"}, {1.5: "f", "g": None}],
        "when": datetime.date(2024, 1, 2),
    }
    print(json.dumps({"fp": fingerprint(value), "numpy": "numpy" in sys.modules}))
    """
)


class TestAcrossProcesses:
    def test_fingerprints_ignore_hash_seed(self) -> None:
        """Two interpreters with different PYTHONHASHSEED agree on a set-heavy value."""
        results = []
        for seed in ("1", "2"):
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run(
                [sys.executable, "-c", _CHILD],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            results.append(json.loads(out.stdout))
        assert results[0]["fp"] == results[1]["fp"]
        assert results[0]["numpy"] is False  # numpy is never imported by us


class TestFileInput:
    @pytest.fixture(autouse=True)
    def _fresh_memo(self) -> None:
        fp_module._clear_file_memo()

    def test_fingerprint_follows_content(self, tmp_path: pathlib.Path) -> None:
        """Changing a file's bytes changes its fingerprint."""
        path = tmp_path / "in.txt"
        path.write_bytes(b"one")
        before = fingerprint(FileInput(path))
        path.write_bytes(b"two!")
        assert fingerprint(FileInput(path)) != before

    def test_same_content_at_another_path_matches(self, tmp_path: pathlib.Path) -> None:
        """Two paths holding the same bytes share a fingerprint; the path is not hashed."""
        (tmp_path / "a.bin").write_bytes(b"x" * 3_000_000)
        (tmp_path / "b.bin").write_bytes(b"x" * 3_000_000)
        assert fingerprint(FileInput(tmp_path / "a.bin")) == fingerprint(
            FileInput(str(tmp_path / "b.bin"))
        )
        assert fingerprint(FileInput(tmp_path / "a.bin")) != fingerprint(b"x" * 3_000_000)

    def test_file_input_is_frozen_and_equal_by_path(self, tmp_path: pathlib.Path) -> None:
        """FileInput keeps the path as given, compares by it, and cannot be changed."""
        item = FileInput("rel/data.csv")
        assert item.path == pathlib.Path("rel/data.csv")
        assert item == FileInput(pathlib.Path("rel/data.csv"))
        assert hash(item) == hash(FileInput("rel/data.csv"))
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.path = pathlib.Path("x")  # type: ignore[misc]

    def test_missing_file_names_its_path(self, tmp_path: pathlib.Path) -> None:
        """Hashing a FileInput whose file is missing raises FileNotFoundError naming it."""
        missing = tmp_path / "nope.txt"
        with pytest.raises(FileNotFoundError, match=r"nope\.txt") as info:
            fingerprint({"a": FileInput(missing)})
        assert info.value.filename == str(missing)

    def test_racy_rewrite_with_restored_mtime_is_reread(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A same-size rewrite with the old mtime put back is still seen, while mtime is recent."""
        reads = ReadCounter(monkeypatch)
        path = tmp_path / "in.txt"
        path.write_bytes(b"aaaa")
        st = path.stat()
        first = fingerprint(FileInput(path))
        path.write_bytes(b"bbbb")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns
        assert path.stat().st_size == st.st_size
        assert fingerprint(FileInput(path)) != first
        assert reads.calls == 2

    def test_memo_is_not_trusted_within_two_seconds_of_mtime(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A memo entry is ignored while the file's mtime is within 2 s of now."""
        reads = ReadCounter(monkeypatch)
        path = tmp_path / "in.txt"
        path.write_bytes(b"data")
        mtime = path.stat().st_mtime_ns
        monkeypatch.setattr(fp_module, "_now_ns", lambda: mtime + 10_000_000_000)
        expected = fingerprint(FileInput(path))  # memoized: mtime looks old
        assert fingerprint(FileInput(path)) == expected
        assert reads.calls == 1
        monkeypatch.setattr(fp_module, "_now_ns", lambda: mtime + 1_000_000_000)
        assert fingerprint(FileInput(path)) == expected
        assert reads.calls == 2  # racy: read again despite the matching memo entry

    def test_memo_avoids_rereading_an_old_file(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unchanged file last modified long ago is read once."""
        reads = ReadCounter(monkeypatch)
        path = tmp_path / "in.txt"
        path.write_bytes(b"data")
        old = path.stat().st_mtime_ns - 60_000_000_000
        os.utime(path, ns=(old, old))
        expected = fingerprint(FileInput(path))
        assert fingerprint(FileInput(path)) == expected
        monkeypatch.chdir(tmp_path)
        assert fingerprint(FileInput("in.txt")) == expected  # same file, by a relative path
        assert reads.calls == 1
        path.write_bytes(b"more data")  # new size, new mtime: read again
        assert fingerprint(FileInput(path)) != expected
        assert reads.calls == 2

    def test_file_input_inside_a_model(self, tmp_path: pathlib.Path) -> None:
        """A FileInput field hashes its file's content inside a model."""

        class Job(BaseModel):
            source: FileInput

        (tmp_path / "a").write_bytes(b"1")
        (tmp_path / "b").write_bytes(b"1")
        assert fingerprint(Job(source=FileInput(tmp_path / "a"))) == fingerprint(
            Job(source=FileInput(tmp_path / "b"))
        )
