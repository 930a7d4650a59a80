"""Tests of ``twinklr_pipe.cache._codec``."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import os
import pathlib
import pickle
import sys
import zoneinfo
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr

from twinklr_pipe.cache._codec import decode, decode_json_tree, encode, encode_json_tree
from twinklr_pipe.cache._fingerprint import FileInput, fingerprint
from twinklr_pipe.errors import CodecError

# A planted pickle must never run this.
CALLS: list[str] = []


def record_call(what: str) -> None:
    CALLS.append(what)


class Planted:
    """Unpickling an instance calls ``record_call``, as an ``os.system`` payload would."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (record_call, ("unpickled",))


class Color(enum.Enum):
    RED = "red"
    BLUE = (0, 0, 255)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Line(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sku: str
    qty: int


class Order(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: int
    lines: tuple[Line, ...] = ()
    note: Any = None


class Aliased(BaseModel):
    model_config = ConfigDict(extra="allow")
    first_name: str = Field(alias="firstName")


class WithUrl(BaseModel):
    home: HttpUrl
    tags: list[str] = []


class WithSecret(BaseModel):
    token: SecretStr


@dataclasses.dataclass
class Pair:
    left: Any
    right: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Derived:
    base: int
    double: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "double", self.base * 2)


class Unknown:
    """Not a supported type."""


def has_nan(value: Any) -> bool:
    """True if a NaN hides anywhere in ``value`` (NaN != NaN breaks ==)."""
    if isinstance(value, dict):
        return any(has_nan(k) or has_nan(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(has_nan(x) for x in value)
    if isinstance(value, BaseModel):
        return any(has_nan(x) for x in value.__dict__.values())
    if dataclasses.is_dataclass(value):
        return any(has_nan(getattr(value, f.name)) for f in dataclasses.fields(value))
    try:
        return bool(value != value)
    except Exception:  # e.g. an array: its == is elementwise
        return False


def assert_round_trip(value: Any, **kwargs: Any) -> Any:
    """Encode and decode ``value``; the result is equal, same type, same fingerprint."""
    codec, payload = encode(value, **kwargs)
    assert isinstance(payload, bytes)
    back = decode(codec, payload, **kwargs)
    assert type(back) is type(value)
    assert fingerprint(back) == fingerprint(value)
    if not has_nan(value):
        assert back == value
    return back


hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**700, max_value=10**800)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.decimals(allow_nan=False)
    | st.dates()
    | st.uuids()
    | st.sampled_from([Color.RED, Color.BLUE, Level.LOW])
    | st.builds(pathlib.PurePosixPath, st.text("ab/", max_size=4))
)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
leaves = (
    hashable_leaves
    | st.floats()
    | st.builds(bytearray, st.binary(max_size=5))
    | st.datetimes(timezones=st.none() | st.timezones() | st.just(datetime.UTC))
    | st.times()
    | st.timedeltas()
    | st.sampled_from(["$tp", "plain"])
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.just("$tp"), inner, max_size=3)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=3)
        | st.builds(Order, id=st.integers(), note=inner)
        | st.builds(Pair, left=inner, right=st.integers())
    ),
    max_leaves=12,
)


class TestRoundTrip:
    @settings(max_examples=150, deadline=None)
    @given(values)
    def test_supported_values_round_trip(self, value: Any) -> None:
        """Every supported value decodes equal, of the same type, with the same fingerprint."""
        assert_round_trip(value)

    @settings(max_examples=60, deadline=None)
    @given(values)
    def test_json_trees_round_trip(self, value: Any) -> None:
        """``encode_json_tree`` gives JSON-able trees that decode back to the value."""
        tree = encode_json_tree(value)
        back = decode_json_tree(json.loads(json.dumps(tree, allow_nan=False)))
        assert type(back) is type(value)
        assert fingerprint(back) == fingerprint(value)

    @pytest.mark.parametrize(
        "value",
        [
            -0.0,
            float("inf"),
            float("-inf"),
            float("nan"),
            10**1000,
            -(10**1000),
            "\ud800",
            {"$tp": "tuple", "v": [1]},
            [{"$tp": 1}, {"x": {"$tp": None}}],
            {1: "a", "1": "b", None: 2.5},
            {(1, 2): {3, 4}, frozenset({5}): frozenset()},
            memoryview(b"abc"),
            memoryview(bytes(range(12))).cast("i", [3]),
            datetime.datetime(2021, 11, 7, 1, 30, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
            datetime.datetime(2021, 11, 7, 1, 30, fold=1),
            datetime.time(12, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-3))),
            decimal.Decimal("1.00"),
            decimal.Decimal("-0"),
            pathlib.Path("/a/b"),
            pathlib.PureWindowsPath(r"C:\a\b"),
            Order(id=1, lines=(Line(sku="a", qty=2),), note=(1, [2.5, b"x"])),
            Aliased(firstName="Ann", extra_field={1, 2}),
            Derived(4),
            Level.HIGH,
        ],
    )
    def test_edge_values_round_trip(self, value: Any) -> None:
        """Awkward values (tags in user data, surrogates, zones, aliases...) round trip."""
        assert_round_trip(value)

    def test_zoneinfo_is_restored_by_key(self) -> None:
        """An aware datetime in a ZoneInfo zone comes back in that zone, fold included."""
        zone = zoneinfo.ZoneInfo("America/New_York")
        value = datetime.datetime(2021, 11, 7, 1, 30, tzinfo=zone, fold=1)
        back = assert_round_trip(value)
        assert back.tzinfo is zone
        assert back.fold == 1
        assert back.utcoffset() == value.utcoffset()

    def test_dataclass_init_false_fields_are_restored(self) -> None:
        """A frozen, slotted dataclass with an ``init=False`` field comes back whole."""
        back = assert_round_trip(Derived(21))
        assert back.double == 42

    def test_file_input_round_trips_by_path(self, tmp_path: pathlib.Path) -> None:
        """A FileInput is stored as its path, and hashes its content again when decoded."""
        path = tmp_path / "f.txt"
        path.write_text("hello")
        back = assert_round_trip(FileInput(path))
        assert back.path == path


class TestCodecs:
    def test_plain_json_is_stored_as_is(self) -> None:
        """A plain JSON value is stored as compact JSON, with no tags."""
        value = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
        codec, payload = encode(value)
        assert codec == "json/1"
        assert json.loads(payload) == value
        assert b"$tp" not in payload

    def test_top_level_bytes_are_stored_raw(self) -> None:
        """Top-level bytes use ``bytes/1`` with the bytes themselves as payload."""
        data = os.urandom(1000)
        assert encode(data) == ("bytes/1", data)
        assert decode("bytes/1", data) == data

    def test_numpy_arrays_round_trip(self) -> None:
        """Arrays use ``numpy/1`` at top level and tagged nodes inside values."""
        np = pytest.importorskip("numpy")
        arrays = [
            np.arange(12, dtype="<f8").reshape(3, 4).T,
            np.array(["2020-01-01"], dtype="M8[D]"),
            np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
            np.array(7),
            np.zeros((0, 3), dtype=">i2"),
        ]
        for arr in arrays:
            codec, payload = encode(arr)
            assert codec == "numpy/1"
            assert len(payload) < arr.nbytes + 200  # raw, not base64
            back = decode(codec, payload)
            assert back.dtype == arr.dtype and back.shape == arr.shape
            assert np.array_equal(back, arr)
            assert back.flags.writeable
            assert fingerprint(back) == fingerprint(arr)
            nested = decode(*encode({"k": [arr]}))
            assert fingerprint(nested) == fingerprint({"k": [arr]})

    def test_numpy_scalars_round_trip(self) -> None:
        """Numpy scalars come back as the same numpy type and value."""
        np = pytest.importorskip("numpy")
        scalars = [
            np.float64(1.5),
            np.float32("nan"),
            np.int8(-3),
            np.bool_(True),
            np.str_("hé"),
            np.datetime64("2024-01-02", "D"),
        ]
        for value in scalars:
            assert_round_trip({"s": [value]})
            back = decode(*encode(value))
            assert type(back) is type(value)
            assert back.dtype == value.dtype

    def test_object_arrays_need_pickle(self) -> None:
        """Object arrays are refused by the safe codec, and pickled with opt-in."""
        np = pytest.importorskip("numpy")
        arr = np.array([1, None], dtype=object)
        with pytest.raises(CodecError, match="allow_pickle=True"):
            encode(arr)
        codec, payload = encode(arr, allow_pickle=True)
        assert codec == "pickle/1"
        assert list(decode(codec, payload, allow_pickle=True)) == [1, None]


class TestSafety:
    def test_pickle_is_refused_without_opt_in(self) -> None:
        """A planted pickle is refused before anything is unpickled."""
        CALLS.clear()
        payload = pickle.dumps(Planted(), protocol=5)
        with pytest.raises(CodecError, match=r"refusing to load a pickle entry.*allow_pickle=True"):
            decode("pickle/1", payload)
        assert CALLS == []
        decode("pickle/1", payload, allow_pickle=True)  # proof the payload was live
        assert CALLS == ["unpickled"]

    def test_unsupported_output_message_names_type_and_opt_in(self) -> None:
        """The error names the type, where it is, and ``PipelineExecutor(allow_pickle=True)``."""
        with pytest.raises(CodecError) as info:
            encode({"rows": [1, Unknown()]})
        message = str(info.value)
        assert message.startswith("cannot store output of type test_codec.Unknown")
        assert "value['rows'][1]" in message
        assert "PipelineExecutor(allow_pickle=True)" in message

    def test_allow_pickle_stores_unsupported_values(self) -> None:
        """With opt-in, unsupported values use ``pickle/1`` and come back."""
        codec, payload = encode({"u": Unknown, "z": 1j}, allow_pickle=True)
        assert codec == "pickle/1"
        assert decode(codec, payload, allow_pickle=True) == {"u": Unknown, "z": 1j}
        assert encode({"z": 1}, allow_pickle=True)[0] == "json/1"  # safe codec first

    def test_json_tree_never_pickles(self) -> None:
        """``encode_json_tree`` raises CodecError for unsupported values."""
        with pytest.raises(CodecError, match=r"test_codec\.Unknown"):
            encode_json_tree({"state": Unknown()})

    @pytest.mark.parametrize(
        ("kind", "spec", "found"),
        [
            ("model", "os:system", "system"),
            ("dataclass", "subprocess:Popen", "subprocess.Popen"),
            ("enum", "builtins:eval", "builtins.eval"),
            ("model", "test_codec:Pair", "test_codec.Pair"),
        ],
    )
    def test_payload_naming_other_callables_is_refused(
        self, kind: str, spec: str, found: str, tmp_path: pathlib.Path
    ) -> None:
        """A payload naming something other than the expected kind of class is refused."""
        planted = tmp_path / "planted"
        command = f"touch {planted}"
        payload = json.dumps({"$tp": kind, "c": spec, "v": {"command": command, "args": command}})
        with pytest.raises(CodecError, match=rf"refusing to restore {spec}: expected .*{found}"):
            decode("json/1", payload.encode())
        assert not planted.exists()

    def test_pydantic_schema_drift_is_a_codec_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A stored model that no longer validates (a new required field) is a CodecError."""
        codec, payload = encode(Order(id=1))

        class Order2(BaseModel):
            id: int
            customer: str

        monkeypatch.setattr(sys.modules[__name__], "Order", Order2)
        with pytest.raises(CodecError, match="no longer validates"):
            decode(codec, payload)

    def test_classes_that_cannot_be_imported_back_are_refused(self) -> None:
        """A model defined inside a function cannot be stored safely."""

        class Local(BaseModel):
            x: int

        with pytest.raises(CodecError, match="cannot be imported back"):
            encode(Local(x=1))

    def test_cycles_are_refused(self) -> None:
        """A value that contains itself is a CodecError, not a RecursionError."""
        loop: list[Any] = [1]
        loop.append(loop)
        with pytest.raises(CodecError, match="reference cycle"):
            encode(loop)
        with pytest.raises(CodecError, match="reference cycle"):
            encode_json_tree({"a": loop})


class TestPydanticFallback:
    def test_models_with_pydantic_types_use_their_json_dump(self) -> None:
        """A model with an HttpUrl field is stored as its JSON dump and validates back."""
        value = WithUrl(home="https://example.com/x", tags=["a"])
        codec, payload = encode(value)
        assert b'"model_json"' in payload
        assert decode(codec, payload) == value

    def test_lossy_json_dumps_are_refused(self) -> None:
        """A model whose JSON dump does not validate back equal (SecretStr) is refused."""
        with pytest.raises(CodecError, match=r"pydantic\.types\.SecretStr"):
            encode(WithSecret(token="s3cret"))


class TestCorruptPayloads:
    @pytest.mark.parametrize(
        ("codec", "payload"),
        [
            ("json/1", b"{not json"),
            ("json/1", b"\xff\xfe"),
            ("json/1", b'{"$tp": "nope", "v": 1}'),
            ("json/1", b'{"$tp": "bytes", "v": "***"}'),
            ("json/1", b'{"$tp": "tuple"}'),
            ("json/1", b'{"$tp": "float", "v": "1.5"}'),
            ("json/1", b'{"$tp": "dict", "v": [[[1], 2]]}'),
            ("json/1", b'{"$tp": "model", "c": "no_such_module_xyz:M", "v": {}}'),
            ("json/1", b'{"$tp": "model", "c": "test_codec:Missing", "v": {}}'),
            ("json/1", b'{"$tp": "model", "c": "bad", "v": {}}'),
            ("json/1", b'{"$tp": "enum", "c": "test_codec:Color", "v": "green"}'),
            ("json/1", b'{"$tp": "path", "c": "os", "v": "x"}'),
            ("json/1", b'{"$tp": "dataclass", "c": "test_codec:Pair", "v": {"zzz": 1}}'),
            ("json/1", b'{"$tp": "ndarray", "v": "AAAA"}'),
            ("json/1", b'{"$tp": "datetime", "v": "yesterday"}'),
            ("numpy/1", b"\x93NUMPY garbage"),
            ("pickle/1", b"not a pickle"),
            ("zstd/9", b"anything"),
        ],
    )
    def test_corrupt_payloads_raise_codec_error(self, codec: str, payload: bytes) -> None:
        """Undecodable payloads and unknown codecs only ever raise CodecError."""
        with pytest.raises(CodecError):
            decode(codec, payload, allow_pickle=True)

    def test_truncated_numpy_payload_is_a_codec_error(self) -> None:
        """A numpy payload cut short, or with bytes appended, is refused."""
        np = pytest.importorskip("numpy")
        codec, payload = encode(np.arange(10))
        with pytest.raises(CodecError):
            decode(codec, payload[:-3])
        with pytest.raises(CodecError, match="trailing"):
            decode(codec, payload + b"\x00")

    @pytest.mark.parametrize("tree", [{"$tp": "set", "v": 3}, [1, object()], {"$tp": 5}])
    def test_malformed_trees_raise_codec_error(self, tree: Any) -> None:
        """``decode_json_tree`` raises CodecError for malformed trees."""
        with pytest.raises(CodecError):
            decode_json_tree(tree)


class TestPlantedModules:
    def test_a_payload_never_imports_a_module_the_program_has_not_imported(
        self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Decoding refuses a class from an unimported module without running its code."""
        marker = tmp_path / "imported"
        (tmp_path / "planted_mod.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n"
            "from pydantic import BaseModel\n"
            "class Evil(BaseModel):\n    x: int = 1\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        _, payload = encode(Line(sku="a", qty=1))
        planted = payload.replace(
            f"{Line.__module__}:{Line.__qualname__}".encode(), b"planted_mod:Evil"
        )
        assert planted != payload
        with pytest.raises(CodecError, match="'planted_mod' is not imported"):
            decode("json/1", planted)
        assert not marker.exists()
        assert "planted_mod" not in sys.modules
