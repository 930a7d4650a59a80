"""Stage identity, code version (source hashing) and configuration fingerprints."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import linecache
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field

from twinklr_pipe._stage import FunctionStage, stage
from twinklr_pipe.cache._identity import (
    NO_SOURCE,
    SOURCE_DIFFERS,
    clear_source_cache,
    config_fingerprint,
    source_hash,
    source_report,
    stage_config,
    stage_identity,
    stage_version,
)
from twinklr_pipe.errors import FingerprintError

Loader = Callable[..., dict[str, ModuleType]]


@pytest.fixture
def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Loader]:
    """Write modules into a fresh directory and import them under their plain names.

    Each call uses a new directory, so the same module name can be loaded again with
    different source (a fresh module object, as in a new process).
    """
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    counter = itertools.count()
    names: set[str] = set()

    def _load(**files: str) -> dict[str, ModuleType]:
        directory = tmp_path / f"v{next(counter)}"
        directory.mkdir()
        for name, text in files.items():
            (directory / f"{name}.py").write_text(textwrap.dedent(text))
            sys.modules.pop(name, None)
        names.update(files)
        sys.path.insert(0, str(directory))
        importlib.invalidate_caches()
        try:
            return {name: importlib.import_module(name) for name in files}
        finally:
            sys.path.remove(str(directory))

    yield _load
    for name in names:
        sys.modules.pop(name, None)


def fn_hash(load: Loader, attr: str = "run", **files: str) -> str:
    """Load ``files`` and return the source hash of ``stagemod.<attr>``."""
    return source_hash(getattr(load(**files)["stagemod"], attr))


class TestSourceHash:
    def test_formatting_comments_and_docstrings_do_not_change_the_hash(self, load: Loader) -> None:
        """Only the syntax tree counts: layout, comments and docstrings are ignored."""
        before = fn_hash(
            load,
            stagemod='''
            def run(x, context):
                """Double it."""
                return helper(x) * 2

            def helper(x):
                return x + 1
            ''',
        )
        after = fn_hash(
            load,
            stagemod='''
            # a comment
            def run(x,
                    context):
                """Double it, differently described."""
                # explain
                return (helper(x)
                        * 2)


            def helper(x):
                """Now documented."""
                return x + 1  # trailing
            ''',
        )
        assert before == after

    def test_changed_constant_in_a_called_helper_changes_the_hash(self, load: Loader) -> None:
        """A module constant read by a helper the stage calls is part of the hash."""
        template = """
            LIMIT = {limit}

            def run(x, context):
                return clip(x)

            def clip(x):
                return min(x, LIMIT)
            """
        assert fn_hash(load, stagemod=template.format(limit=10)) != fn_hash(
            load, stagemod=template.format(limit=11)
        )

    def test_change_in_a_helper_of_a_helper_changes_the_hash(self, load: Loader) -> None:
        """Helpers are followed transitively."""
        template = """
            def run(x, context):
                return outer(x)

            def outer(x):
                return inner(x)

            def inner(x):
                return x {op} 1
            """
        first = fn_hash(load, stagemod=template.format(op="+"))
        assert first == fn_hash(load, stagemod=template.format(op="+"))
        assert first != fn_hash(load, stagemod=template.format(op="-"))
        report = source_report(load(stagemod=template.format(op="+"))["stagemod"].run)
        assert report.followed == ["stagemod:run", "stagemod:outer", "stagemod:inner"]
        assert report.unresolved == []

    def test_helper_in_another_user_module_is_followed_as_module_attribute(
        self, load: Loader
    ) -> None:
        """``helpers.normalize(x)`` follows ``normalize`` into the other user module."""
        stagemod = """
            import helpers

            def run(x, context):
                return helpers.normalize(x) + helpers.SUFFIX
            """
        first = fn_hash(
            load,
            stagemod=stagemod,
            helpers="SUFFIX = '!'\ndef normalize(s):\n    return s.lower()\n",
        )
        changed_fn = fn_hash(
            load,
            stagemod=stagemod,
            helpers="SUFFIX = '!'\ndef normalize(s):\n    return s.upper()\n",
        )
        changed_const = fn_hash(
            load,
            stagemod=stagemod,
            helpers="SUFFIX = '?'\ndef normalize(s):\n    return s.lower()\n",
        )
        assert len({first, changed_fn, changed_const}) == 3

    def test_renaming_a_helper_changes_the_hash(self, load: Loader) -> None:
        """A helper's qualified name is part of the hash, not only its body."""
        template = """
            def run(x, context):
                return {name}(x)

            def {name}(x):
                return x
            """
        assert fn_hash(load, stagemod=template.format(name="a")) != fn_hash(
            load, stagemod=template.format(name="b")
        )

    def test_closure_values_are_part_of_the_hash(self, load: Loader) -> None:
        """Two stages made by one factory with different captured values differ."""
        mod = load(
            stagemod="""
            def make(prompt):
                def run(x, context):
                    return prompt + x
                return run
            """
        )["stagemod"]
        assert source_hash(mod.make("a")) != source_hash(mod.make("b"))
        assert source_hash(mod.make("a")) == source_hash(mod.make("a"))

    def test_class_defined_in_a_factory_includes_the_captured_values(self, load: Loader) -> None:
        """Methods' closures and class attributes copied from locals are hashed by value."""
        mod = load(
            stagemod="""
            def make(prompt, model):
                class Stage:
                    model_name = model

                    def execute(self, x, context):
                        return prompt + x

                return Stage
            """
        )["stagemod"]
        first = source_hash(mod.make("a", "m"))
        assert first == source_hash(mod.make("a", "m"))
        assert first != source_hash(mod.make("b", "m"))
        assert first != source_hash(mod.make("a", "n"))

    def test_stdlib_and_installed_references_are_not_followed_or_unresolved(
        self, load: Loader
    ) -> None:
        """json, os.path, re and pydantic are recorded by name only."""
        mod = load(
            stagemod="""
            import json
            import logging
            import os.path
            import re
            from collections import OrderedDict
            from pydantic import BaseModel

            import xxhash

            log = logging.getLogger(__name__)
            WORD = re.compile(r"\\w+")

            def run(x, context):
                log.info("run")
                d = OrderedDict(a=os.path.join("a", "b"))
                return json.dumps(d), BaseModel, xxhash.xxh64, WORD.findall(x), len(x)
            """
        )["stagemod"]
        report = source_report(mod.run)
        assert report.followed == ["stagemod:run"]
        assert report.unresolved == []

    def test_compiled_regex_pattern_is_part_of_the_hash(self, load: Loader) -> None:
        """A compiled pattern global is hashed by pattern and flags."""
        template = (
            'import re\nWORD = re.compile(r"{p}")\ndef run(x, c):\n    return WORD.findall(x)\n'
        )
        assert fn_hash(load, stagemod=template.format(p="\\w+")) != fn_hash(
            load, stagemod=template.format(p="\\w*")
        )

    def test_bound_method_of_a_global_value_includes_the_value(self, load: Loader) -> None:
        """``lookup = TEMPLATES.get`` is hashed with the dict it is bound to."""
        template = """
            TEMPLATES = {{"a": "{text}"}}
            lookup = TEMPLATES.get

            def run(x, context):
                return lookup(x)
            """
        assert fn_hash(load, stagemod=template.format(text="one")) != fn_hash(
            load, stagemod=template.format(text="two")
        )

    def test_unresolvable_global_instance_is_reported(self, load: Loader) -> None:
        """A client instance and a missing name are listed, never raised."""
        mod = load(
            stagemod="""
            import threading

            class Client:
                def __init__(self):
                    self.lock = threading.Lock()

            client = Client()

            def run(x, context):
                return client, not_defined_anywhere
            """
        )["stagemod"]
        report = source_report(mod.run)
        assert report.unresolved == [
            "stagemod:run: client",
            "stagemod:run: not_defined_anywhere",
        ]
        assert "stagemod:Client" in report.followed
        assert report.hash == source_hash(mod.run)

    def test_plain_attribute_of_an_unhashable_object_is_hashed_by_value(self, load: Loader) -> None:
        """``settings.model`` is hashed by value even when ``settings`` cannot be."""
        template = """
            import threading

            class Settings:
                def __init__(self):
                    self.model = "{model}"
                    self.lock = threading.Lock()

            settings = Settings()

            def run(x, context):
                return settings.model
            """
        first = load(stagemod=template.format(model="a"))["stagemod"].run
        assert source_report(first).unresolved == []
        assert source_hash(first) != fn_hash(load, stagemod=template.format(model="b"))

    def test_names_only_in_annotations_are_not_reported_when_missing(self, load: Loader) -> None:
        """A type imported under TYPE_CHECKING is not an unresolved reference."""
        mod = load(
            stagemod="""
            from __future__ import annotations

            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from somewhere import Context

            def run(x: int, context: Context) -> int:
                return x
            """
        )["stagemod"]
        assert source_report(mod.run).unresolved == []

    def test_global_state_assigned_by_the_code_is_not_part_of_the_hash(self, load: Loader) -> None:
        """A lazily created client (``global _client``) does not change the hash."""
        mod = load(
            stagemod="""
            import threading

            _client = None

            def get_client():
                global _client
                if _client is None:
                    _client = threading.Lock()
                return _client

            def run(x, context):
                return get_client()
            """
        )["stagemod"]
        before = source_report(mod.run)
        mod.run(1, None)
        after = source_report(mod.run)
        assert before == after
        assert after.unresolved == []

    def test_pipe_decorator_options_do_not_change_the_hash(self, load: Loader) -> None:
        """``@stage(name=...)`` is not code: changing its options keeps the hash."""
        template = """
            from twinklr_pipe import stage

            @stage(name="{name}")
            def run(x, context):
                return x
            """
        first = load(stagemod=template.format(name="a"))["stagemod"].run
        assert isinstance(first, FunctionStage)
        assert source_hash(first) == source_hash(first.fn)
        assert source_hash(first) == fn_hash(load, stagemod=template.format(name="b"))

    def test_other_decorators_are_part_of_the_hash(self, load: Loader) -> None:
        """A decorator that is user code, or a change in its arguments, is a change."""
        template = """
            import functools

            @functools.lru_cache(maxsize={size})
            def helper(x):
                return x

            def run(x, context):
                return helper(x)
            """
        assert fn_hash(load, stagemod=template.format(size=1)) != fn_hash(
            load, stagemod=template.format(size=2)
        )

    def test_decorated_helpers_are_followed_through_their_wrappers(self, load: Loader) -> None:
        """The body of an ``lru_cache``- or ``functools.wraps``-decorated helper counts."""
        template = """
            import functools

            def logged(fn):
                @functools.wraps(fn)
                def wrapper(*args):
                    return fn(*args)
                return wrapper

            @functools.lru_cache
            def cached(x):
                return x {op} 1

            @logged
            def traced(x):
                return x {op} 2

            def run(x, context):
                return cached(x), traced(x)
            """
        plus = load(stagemod=template.format(op="+"))["stagemod"].run
        report = source_report(plus)
        assert report.unresolved == []
        assert {"stagemod:cached", "stagemod:traced", "stagemod:logged.<locals>.wrapper"} <= set(
            report.followed
        )
        assert report.hash != fn_hash(load, stagemod=template.format(op="-"))

    def test_class_source_follows_user_base_classes(self, load: Loader) -> None:
        """A class-based stage's hash covers its methods and its user base class."""
        template = """
            class Base:
                def prepare(self, x):
                    return x {op} 1

            class Summarize(Base):
                def execute(self, x, context):
                    return self.prepare(x)
            """
        first = fn_hash(load, "Summarize", stagemod=template.format(op="+"))
        assert first != fn_hash(load, "Summarize", stagemod=template.format(op="-"))
        report = source_report(load(stagemod=template.format(op="+"))["stagemod"].Summarize)
        assert report.followed == ["stagemod:Summarize", "stagemod:Base"]
        assert report.unresolved == []

    def test_pydantic_model_class_docstring_is_part_of_the_hash(self, load: Loader) -> None:
        """Pydantic puts a model's docstring in its JSON schema, so it is kept."""
        template = '''
            from pydantic import BaseModel

            class Answer(BaseModel):
                """{doc}"""
                text: str
            '''
        assert fn_hash(load, "Answer", stagemod=template.format(doc="A")) != fn_hash(
            load, "Answer", stagemod=template.format(doc="B")
        )

    def test_reloading_a_helper_module_invalidates_the_memoized_hash(
        self, load: Loader, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A memoized hash is recomputed once a name it resolved is rebound."""
        mods = load(
            stagemod="import helpers\ndef run(x, c):\n    return helpers.f(x)\n",
            helpers="def f(x):\n    return x\n",
        )
        run, helpers = mods["stagemod"].run, mods["helpers"]
        before = source_hash(run)
        path = Path(str(helpers.__file__))
        path.write_text("def f(x):\n    return x * 1000\n")
        linecache.clearcache()
        monkeypatch.syspath_prepend(str(path.parent))
        importlib.reload(helpers)
        assert source_hash(run) != before

    def test_source_edited_after_import_is_not_trusted(self, load: Loader) -> None:
        """When the file on disk no longer matches the loaded code, bytecode is hashed too."""
        old = "def run(x, c):\n    return x + 1\n"
        new = "def run(x, c):\n    return x + 2\n"
        run = load(stagemod=old)["stagemod"].run
        Path(run.__code__.co_filename).write_text(new)
        linecache.clearcache()
        report = source_report(run)
        assert report.unresolved == [f"stagemod:run: {SOURCE_DIFFERS}"]
        assert report.hash != fn_hash(load, stagemod=new)

    def test_function_without_source_hashes_its_bytecode(self, load: Loader) -> None:
        """``exec``-defined code is hashed by its code object and marked as such."""
        mod = load(stagemod="LIMIT = 3\n")["stagemod"]

        def define(body: str) -> Any:
            exec(f"def run(x, c):\n    return {body}\n", vars(mod))
            return mod.run

        first = define("min(x, LIMIT)")
        assert source_report(first).unresolved == [f"stagemod:run: {NO_SOURCE}"]
        assert source_hash(first) == source_hash(define("min(x, LIMIT)"))
        assert source_hash(first) != source_hash(define("max(x, LIMIT)"))
        before = source_hash(first)
        setattr(mod, "LIMIT", 4)  # noqa: B010 - a module attribute mypy does not know
        assert source_hash(first) != before

    def test_memoized_call_is_fast(self, load: Loader) -> None:
        """Repeated calls reuse the memoized result (10,000 calls well under a second)."""
        run = load(
            stagemod="""
            import helpers
            LIMIT = 3

            def run(x, context):
                return helpers.f(min(x, LIMIT))
            """,
            helpers="def f(x):\n    return g(x)\ndef g(x):\n    return x\n",
        )["stagemod"].run
        expected = source_hash(run)
        start = time.perf_counter()
        for _ in range(10_000):
            source_hash(run)
        assert time.perf_counter() - start < 1.0
        assert source_hash(run) == expected

    def test_clear_source_cache_recomputes_the_same_hash(self, load: Loader) -> None:
        """Clearing the memo changes nothing but the work done."""
        run = load(stagemod="def run(x, c):\n    return x\n")["stagemod"].run
        before = source_hash(run)
        clear_source_cache()
        assert source_hash(run) == before


class TestStageIdentity:
    def test_function_stage_is_identified_by_its_function(self) -> None:
        """A ``@stage`` function is ``module:qualname`` of the function."""

        @stage
        def summarize(x: Any, context: Any) -> Any:
            return x

        assert stage_identity(summarize) == (
            f"{__name__}:TestStageIdentity."
            "test_function_stage_is_identified_by_its_function.<locals>.summarize"
        )

    def test_class_stage_is_identified_by_its_class(self) -> None:
        """A class-based stage is ``module:qualname`` of its class."""
        assert stage_identity(PlainStage("p")) == f"{__name__}:PlainStage"


class PlainStage:
    """A class-based stage that is neither a model nor a dataclass."""

    def __init__(self, prompt: str, name: str = "plain") -> None:
        self.prompt = prompt
        self.name = name

    async def execute(self, input: Any, context: Any) -> Any:
        return input


class TestStageVersion:
    def test_explicit_version_on_a_function_stage_wins(self) -> None:
        """``@stage(version="2")`` is used as is, not a source hash."""

        @stage(version="2")
        def summarize(x: Any, context: Any) -> Any:
            return x

        assert stage_version(summarize) == ("2", False)

    def test_explicit_class_attribute_version_wins(self) -> None:
        """A ``version`` class attribute (pydantic: a ClassVar) is used as is."""

        class Versioned(BaseModel):
            version: ClassVar[str] = "7"
            prompt: str = "p"

        assert stage_version(Versioned()) == ("7", False)

    def test_without_version_the_source_hash_is_used(self) -> None:
        """No version (or ``None``): ``src:`` plus the source hash of the function."""

        @stage
        def summarize(x: Any, context: Any) -> Any:
            return x

        assert stage_version(summarize) == ("src:" + source_hash(summarize.fn), True)
        assert stage_version(PlainStage("p")) == ("src:" + source_hash(PlainStage), True)

    def test_non_str_version_is_rejected(self) -> None:
        """``version = 3`` raises rather than being silently ignored."""

        class Bad(PlainStage):
            version = 3

        with pytest.raises(TypeError, match='version must be a str such as version = "2"'):
            stage_version(Bad("p"))


class Client:
    """Something that cannot be fingerprinted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


class ModelStage(BaseModel):
    model_config = {"arbitrary_types_allowed": True}
    cache_exclude: ClassVar[tuple[str, ...]] = ("client",)

    name: str = "model-stage"
    prompt: str = "p"
    temperature: float = 0.0
    verbose: bool = Field(default=False, exclude=True)
    client: Client | None = None


@dataclasses.dataclass
class DataStage:
    prompt: str = "p"
    verbose: bool = dataclasses.field(default=False, metadata={"cache": False})
    name: str = "data-stage"


class TestStageConfig:
    def test_pydantic_field_change_changes_the_fingerprint(self) -> None:
        """Every included pydantic field is fingerprinted by name."""
        a, b = stage_config(ModelStage()), stage_config(ModelStage(prompt="q"))
        assert list(a) == ["prompt", "temperature"]
        assert config_fingerprint(a) != config_fingerprint(b)

    def test_excluded_pydantic_fields_do_not_change_the_fingerprint(self) -> None:
        """``Field(exclude=True)``, ``cache_exclude`` and ``name`` are left out."""
        base = stage_config(ModelStage())
        assert stage_config(ModelStage(verbose=True, client=Client(), name="other")) == base

    def test_dataclass_field_change_changes_the_fingerprint(self) -> None:
        """Dataclass fields count, except ``metadata={"cache": False}`` and ``name``."""
        base = stage_config(DataStage())
        assert list(base) == ["prompt"]
        assert stage_config(DataStage(verbose=True, name="x")) == base
        assert stage_config(DataStage(prompt="q")) != base

    def test_cache_params_wins(self) -> None:
        """Only what ``cache_params()`` returns is configuration."""

        class WithParams(ModelStage):
            def cache_params(self) -> Mapping[str, Any]:
                return {"model": "m1"}

        assert list(stage_config(WithParams(prompt="q"))) == ["model"]
        assert stage_config(WithParams(prompt="q")) == stage_config(WithParams(prompt="r"))

    def test_cache_params_must_return_a_mapping(self) -> None:
        """A non-mapping from ``cache_params()`` is a TypeError naming the class."""

        class BadParams(PlainStage):
            def cache_params(self) -> Any:
                return ["model"]

        with pytest.raises(TypeError, match=r"BadParams\.cache_params\(\) must return a mapping"):
            stage_config(BadParams("p"))

    def test_plain_class_attributes_are_included(self) -> None:
        """``self.prompt = ...`` on a plain class is in the key; ``name`` is not."""
        fields = stage_config(PlainStage("p"))
        assert list(fields) == ["prompt"]
        assert fields != stage_config(PlainStage("q"))
        assert fields == stage_config(PlainStage("p", name="renamed"))

    def test_function_stage_has_no_configuration(self) -> None:
        """A ``@stage`` function's code is its identity: no configuration fields."""

        @stage
        def summarize(x: Any, context: Any) -> Any:
            return x

        assert stage_config(summarize) == {}

    def test_unfingerprintable_field_error_names_the_field(self) -> None:
        """The error says which configuration field, and its type."""
        with pytest.raises(FingerprintError, match="configuration field 'client'") as info:
            stage_config(_with_client())
        assert info.value.value_type is Client
        assert info.value.where == "configuration field 'client'"

    def test_nested_unfingerprintable_value_error_names_the_path(self) -> None:
        """A client inside a field's dict is reported with its path in the field."""
        stage_obj = PlainStage("p")
        stage_obj.options = {"client": Client()}  # type: ignore[attr-defined]
        with pytest.raises(FingerprintError) as info:
            stage_config(stage_obj)
        assert info.value.value_type is Client
        assert info.value.where == "configuration field 'options'['client']"

    def test_cache_exclude_must_not_be_a_string(self) -> None:
        """``cache_exclude = ("client")`` (a str) is a TypeError, not per-letter exclusion."""

        class Typo(PlainStage):
            cache_exclude = "client"

        with pytest.raises(TypeError, match="cache_exclude must be a tuple of field names"):
            stage_config(Typo("p"))


def _with_client() -> PlainStage:
    stage_obj = PlainStage("p")
    stage_obj.client = Client()  # type: ignore[attr-defined]
    return stage_obj
