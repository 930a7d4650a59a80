"""What a stage *is*, for its cache key: identity, code version and configuration.

A key includes three facts about the stage object (inputs are added elsewhere):

* ``stage_identity`` -- ``module:qualname`` of the function (``@stage``) or class.
* ``stage_version`` -- an explicit non-empty ``version`` string if the stage has one
  (instance or class attribute; ``@stage(version="2")``), else ``"src:" + source_hash``.
  An explicit version replaces source hashing entirely: bump it for every change that
  matters. A ``version`` that is not a string raises ``TypeError``.
* ``stage_config`` -- field name -> fingerprint of each configuration value.

Source hashing
--------------
``source_hash(obj)`` hashes the normalized syntax tree of a function or class
(``inspect.getsource`` -> ``ast.parse`` -> docstrings stripped -> ``ast.dump`` without
positions), so comments, docstrings, formatting and line numbers do not matter and every
real code change does. Indented source (a method, a nested function) is parsed as the
body of an ``if`` block instead of being dedented, which would also change the text of
multi-line string literals. Decorators that come from ``twinklr_pipe`` itself
(``@stage(...)``) are dropped: a stage's name or options are not its code. A decorator's
wrapper (``functools.wraps``) is hashed as its own code plus what it wraps.

References are followed transitively. Each global or closure name the code reads
(``helper``, ``mod.helper``, ``pkg.mod.CONST``) is resolved in the running process:

* a function or class defined in a *user module* is hashed the same way, recursively,
  under its qualified name (renaming a helper is a change);
* a module-level value in a user module (constants, lists, dicts, enums, compiled
  regular expressions, pydantic models... anything ``fingerprint`` accepts) is included
  by its value at hash time -- so a mutable global mutated later in the same process is
  not seen until the stage's hash is recomputed;
* closure cells and default argument values count by value too, as does the object a
  method is bound to (``lookup = TEMPLATES.get``), and a plain instance attribute read
  from an object that cannot be hashed whole (``settings.model``);
* stdlib, builtins and installed packages (files under ``site-packages`` or
  ``dist-packages``) are recorded by name only, never followed: upgrading a package does
  not change the hash, version your stage if that matters;
* a global the code assigns itself (``global _client``) is state, recorded by name only;
* anything else (a client instance, a name missing from globals) is listed in
  ``SourceReport.unresolved`` and contributes a stable marker (its name and type). A
  name only used in annotations (imported under ``TYPE_CHECKING``) is not reported.

A *user module* is any module that is not stdlib, builtin or installed -- except that
the top-level package of the hashed object's own module is always user code, and
``twinklr_pipe`` itself (but not ``twinklr_pipe.examples``) never is.

When in doubt, the hash misses rather than hits:

* pydantic model classes keep their class docstring, because pydantic puts it into the
  JSON schema (often sent to a model); other docstrings are ignored;
* a class defined inside a function also hashes its class attributes by value (they may
  come from the function's locals);
* the source read from disk is checked against the code that is actually loaded
  (constants, names and arguments of every code object, and literal class attributes).
  If the file was edited after import, the loaded bytecode is hashed too and the
  report says ``<source differs from loaded code: hashed bytecode>``;
* without any source (a REPL, ``exec``, ``python -c``), the code object is hashed
  (``co_code``, constants, names, variable names) and the report says
  ``<no source: hashed bytecode>``. Bytecode differs between Python versions, so such
  hashes change when Python is upgraded.

Results are memoized per object. A memoized hash is reused only while every global
name, module attribute, closure cell and function ``__code__`` it was computed from is
still bound to the same object, so ``importlib.reload`` and notebook autoreload are
noticed. ``clear_source_cache()`` forgets everything.

Configuration and how to exclude a field
----------------------------------------
``stage_config`` fingerprints, in this order of precedence:

1. whatever a callable ``cache_params()`` returns (a ``Mapping[str, Any]``) -- exactly
   those items, nothing else;
2. a ``@stage`` function: nothing (its code is its identity);
3. a pydantic model: every field except ``Field(exclude=True)`` fields, plus extras;
4. a dataclass: every field except ``field(metadata={"cache": False})`` fields;
5. any other object: every instance attribute (``vars()`` and ``__slots__``) except
   ``__dunder__`` names.

In cases 3-5, ``name`` and ``version`` are never configuration, and neither is any name
listed in a ``cache_exclude`` class attribute, e.g. ``cache_exclude = ("client",)``
(on a pydantic model: ``cache_exclude: ClassVar[tuple[str, ...]] = ("client",)``).
A value that cannot be fingerprinted raises ``FingerprintError`` naming the field.
"""

from __future__ import annotations
import __future__

import ast
import builtins
import dataclasses
import enum
import functools
import inspect
import json
import logging
import os
import re
import symtable
import sys
import sysconfig
import threading
import typing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import (
    BuiltinFunctionType,
    CellType,
    ClassMethodDescriptorType,
    CodeType,
    FunctionType,
    GenericAlias,
    MethodDescriptorType,
    MethodType,
    MethodWrapperType,
    ModuleType,
    UnionType,
    WrapperDescriptorType,
)
from typing import Any, Final

import xxhash
from pydantic import BaseModel

from ..errors import FingerprintError
from ._fingerprint import fingerprint

__all__ = [
    "SourceReport",
    "clear_source_cache",
    "config_fingerprint",
    "source_hash",
    "source_report",
    "stage_config",
    "stage_identity",
    "stage_version",
]

#: Domain tag of the source-hash payload; bump it when the recipe changes meaning.
_DOMAIN: Final = "twinklr_pipe.source/1"
NO_SOURCE: Final = "<no source: hashed bytecode>"
SOURCE_DIFFERS: Final = "<source differs from loaded code: hashed bytecode>"
_NEVER_CONFIG: Final = frozenset({"name", "version"})
_MEMO_MAX: Final = 4096
_memo_lock = threading.Lock()


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


@dataclasses.dataclass(frozen=True)
class SourceReport:
    """What ``source_hash`` hashed.

    Attributes:
        hash: The source hash (32 hex characters).
        followed: ``module:qualname`` of every function and class hashed, root first.
        unresolved: ``referrer: name`` for each reference that could not be resolved or
            hashed (it contributes a stable marker instead), and ``referrer: <no source:
            hashed bytecode>`` style notes.
    """

    hash: str
    followed: list[str]
    unresolved: list[str]


# --------------------------------------------------------------------------- identity


def _class_attribute(cls: type, name: str) -> object:
    """``name`` from the first class of the MRO that defines it (no metaclass hooks)."""
    for klass in cls.__mro__:
        attrs = vars(klass)
        if name in attrs:
            return attrs[name]
    return _MISSING


_marked_types: dict[type, bool] = {}


def _is_function_stage(obj: object) -> bool:
    """Duck-typed ``FunctionStage`` check: the marker set by ``@stage``, and ``fn``.

    The marker is looked up in the class dicts, then in the instance ``__dict__``,
    never through ``__getattr__`` (slow on pydantic models and their metaclass).
    """
    cls = type(obj)
    marked = _marked_types.get(cls)
    if marked is None:
        marked = _class_attribute(cls, "__twinklr_function_stage__") is True
        if len(_marked_types) >= _MEMO_MAX:
            _marked_types.clear()
        _marked_types[cls] = marked
    if not marked:
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict) or attrs.get("__twinklr_function_stage__") is not True:
            return False
    try:
        return callable(getattr(obj, "fn", None))
    except Exception:  # a hostile property is not a function stage
        return False


def _qualname(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(name, str):
        name = f"<{type(obj).__qualname__}>"
    return f"{module}:{name}"


def _code_module(obj: object) -> object:
    """The module a function's *code* comes from (a wrapper's is its decorator's)."""
    if isinstance(obj, FunctionType):
        return obj.__globals__.get("__name__", obj.__module__)
    return getattr(obj, "__module__", None)


def _code_key(obj: object) -> str:
    """``module:qualname`` of a function's code (not of what a wrapper copied), or of obj."""
    if isinstance(obj, FunctionType):
        return f"{_code_module(obj)}:{obj.__code__.co_qualname}"
    return _qualname(obj)


def stage_identity(stage: object) -> str:
    """The stage's identity: ``module:qualname`` of its function or of its class.

    Args:
        stage: A ``@stage`` function stage or a class-based stage instance.

    Returns:
        ``f"{fn.__module__}:{fn.__qualname__}"`` for a function stage, else the same
        for ``type(stage)``.
    """
    if _is_function_stage(stage):
        return _qualname(stage.fn)  # type: ignore[attr-defined]
    cls = type(stage)
    return f"{cls.__module__}:{cls.__qualname__}"


def _version_attribute(stage: object) -> object:
    """``getattr(stage, "version", None)``, without a failing ``__getattr__`` when possible.

    Pydantic's ``__getattr__`` raises a formatted AttributeError for a missing name,
    which would cost more than the rest of ``stage_version`` on a memoized call.
    """
    attrs = getattr(stage, "__dict__", None)
    if isinstance(attrs, dict) and "version" in attrs:
        return attrs["version"]
    on_class = _class_attribute(type(stage), "version")
    if on_class is _MISSING and isinstance(stage, BaseModel):
        return None
    if on_class is _MISSING or hasattr(type(on_class), "__get__"):
        return getattr(stage, "version", None)  # a property, slot, method or __getattr__
    return on_class


def stage_version(stage: object) -> tuple[str, bool]:
    """The stage's code version and whether it is a source hash.

    Args:
        stage: A ``@stage`` function stage or a class-based stage instance.

    Returns:
        ``(version, False)`` for an explicit non-empty ``version`` string, else
        ``("src:" + source_hash(target), True)`` where ``target`` is the stage's
        function or class.

    Raises:
        TypeError: ``version`` is set to something other than a string (bumping an
            ignored ``version = 3`` would silently keep stale entries).
    """
    if _is_function_stage(stage):
        target: object = stage.fn  # type: ignore[attr-defined]
    else:
        target = type(stage)
    explicit = _version_attribute(stage)
    if isinstance(explicit, str):
        if explicit:
            return explicit, False
    elif explicit is not None:
        raise TypeError(
            f"Stage {stage_identity(stage)}: version must be a str such as "
            f'version = "2", not {type(explicit).__qualname__} ({explicit!r}).'
        )
    return "src:" + source_hash(target), True


# ------------------------------------------------------------------------ user modules

_STDLIB_DIRS: Final = tuple(
    sorted(
        {
            os.path.join(os.path.realpath(path), "")
            for key in ("stdlib", "platstdlib")
            if (path := sysconfig.get_paths().get(key))
        }
    )
)
_INSTALLED_DIRS: Final = frozenset({"site-packages", "dist-packages"})
_module_kinds: dict[str, str] = {}


def _module_kind(modname: str) -> str:
    """``"stdlib"``, ``"installed"`` or ``"user"``, cached per module name."""
    kind = _module_kinds.get(modname)
    if kind is not None:
        return kind
    top = modname.partition(".")[0]
    module = sys.modules.get(modname)
    file = getattr(module, "__file__", None) if module is not None else None
    if top in sys.builtin_module_names:
        kind = "stdlib"
    elif not isinstance(file, str):
        # A frozen stdlib module, or a module made in memory (``__main__`` of a REPL).
        kind = "stdlib" if top in sys.stdlib_module_names and module is not None else "user"
    else:
        real = os.path.realpath(file)
        parts = set(real.split(os.sep))
        if parts & _INSTALLED_DIRS:
            kind = "installed"
        elif top in sys.stdlib_module_names and real.startswith(_STDLIB_DIRS):
            kind = "stdlib"
        else:
            kind = "user"
    if module is not None:  # a module not imported yet may be imported from anywhere
        _module_kinds[modname] = kind
    return kind


def _is_user_module(modname: object, root_package: str) -> bool:
    if not isinstance(modname, str) or not modname:
        return True  # unknown origin: follow it (when in doubt, miss)
    top = modname.partition(".")[0]
    if top == "twinklr_pipe":
        return modname == "twinklr_pipe.examples" or modname.startswith("twinklr_pipe.examples.")
    if top == root_package:
        return True
    return _module_kind(modname) == "user"


# ---------------------------------------------------------------- canonical encodings


def _digest(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def _canon_const(value: object) -> str:
    """A deterministic text for a code constant (no ``hash()``-order dependence)."""
    if isinstance(value, CodeType):
        return "code:" + _code_digest(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_canon_const(v) for v in value) + ")"
    if isinstance(value, frozenset):
        return "frozenset{" + ",".join(sorted(_canon_const(v) for v in value)) + "}"
    return f"{type(value).__qualname__}:{value!r}"


def _code_digest(code: CodeType) -> str:
    """Hash of a code object; stable within one Python version only."""
    return _digest(
        json.dumps(
            [
                code.co_name,
                code.co_code.hex(),
                [_canon_const(c) for c in code.co_consts],
                list(code.co_names),
                list(code.co_varnames),
                list(code.co_freevars),
                list(code.co_cellvars),
                [code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount],
                code.co_flags,
            ]
        )
    )


def _code_shape(code: CodeType) -> tuple[Any, ...]:
    """The parts of a code object that do not depend on where it was compiled."""
    return (
        code.co_name,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_varnames,
        tuple(
            _code_shape(c) if isinstance(c, CodeType) else _canon_const(c) for c in code.co_consts
        ),
    )


def _code_names(code: CodeType, into: set[str] | None = None) -> set[str]:
    # Globals and free variables swap places when a closure is compiled on its own,
    # so only their union, over the whole tree, is compared.
    names = set() if into is None else into
    names.update(code.co_names, code.co_freevars)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _code_names(const, names)
    return names


def _iter_code(code: CodeType) -> Iterator[CodeType]:
    stack = [code]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(c for c in reversed(current.co_consts) if isinstance(c, CodeType))


def _same_code(a: CodeType, b: CodeType) -> bool:
    return _code_shape(a) == _code_shape(b) and _code_names(a) == _code_names(b)


_LITERAL_TYPES: Final = frozenset(
    {str, bytes, int, float, complex, bool, type(None), tuple, list, dict, set, frozenset}
)
#: The only ``__future__`` flag that changes the code compiled for a function body.
_FUTURE_FLAGS: Final[int] = __future__.annotations.compiler_flag


# --------------------------------------------------------------------- parsing source


@dataclasses.dataclass(slots=True)
class _Source:
    tree: ast.Module
    text: str  # the exact text ``tree`` was parsed from (for symtable and compile)


_raw_sources: dict[int, tuple[object, str | None]] = {}


def _raw_source(obj: object) -> str | None:
    """``inspect.getsource``, read once per class or code object.

    Reading a class's source parses its whole module, so it is worth keeping. The
    text read first is the one closest to what was imported; if the class is later
    changed in place, the consistency check against its methods still notices.
    """
    cached = _raw_sources.get(id(obj))
    if cached is not None and cached[0] is obj:
        return cached[1]
    try:
        raw: str | None = inspect.getsource(obj)  # type: ignore[arg-type]
    except Exception:  # OSError, TypeError, and IndexError on a file shorter than expected
        raw = None
    with _memo_lock:
        _raw_sources[id(obj)] = (obj, raw)
        while len(_raw_sources) > _MEMO_MAX:
            del _raw_sources[next(iter(_raw_sources))]
    return raw


def _parse_source(obj: object) -> _Source | None:
    """Parse the source of a class or code object (a function's ``__code__``: never
    ``inspect.unwrap``-ed, so a decorator's wrapper is parsed as itself)."""
    raw = _raw_source(obj)
    if raw is None:
        return None
    if not raw[:1].isspace():
        try:
            return _Source(ast.parse(raw), raw)
        except SyntaxError:
            return None
    # Indented (a method, a nested function): parse it as the body of an ``if`` block
    # rather than dedenting, which would also change multi-line string literals.
    text = "if 1:\n" + raw
    try:
        wrapped = ast.parse(text)
    except SyntaxError:
        return None
    block = wrapped.body[0]
    if not isinstance(block, ast.If):
        return None
    return _Source(ast.Module(body=block.body, type_ignores=[]), text)


def _strip_docstrings(tree: ast.AST, keep_class_doc: bool) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if keep_class_doc and isinstance(node, ast.ClassDef):
            continue
        body = node.body
        if (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:]


def _global_names(text: str) -> tuple[set[str], set[str]]:
    """Names read as globals anywhere in the source, and those that are state.

    *State* is a module global that the code itself assigns (``global _client``): a
    lazily created client or a memo, not configuration. Free variables of the
    outermost function look like globals here; they are looked up in its closure first.
    """
    try:
        top = symtable.symtable(text, "<source>", "exec")
    except SyntaxError:
        return set(), set()
    names: set[str] = set()
    state: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        for symbol in table.get_symbols():
            if symbol.is_referenced() and symbol.is_global():
                names.add(symbol.get_name())
            if symbol.is_declared_global() and symbol.is_assigned():
                state.add(symbol.get_name())
        tables.extend(table.get_children())
    return names, state


class _RefCollector(ast.NodeVisitor):
    """Global names and attribute chains (``pkg.mod.CONST``) read by the tree.

    ``chains`` maps each chain to True when it only appears in annotations (a name
    imported under ``TYPE_CHECKING`` is then not reported when missing).
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.chains: dict[tuple[str, ...], bool] = {}
        self._in_annotation = False

    def _add(self, chain: tuple[str, ...]) -> None:
        if self._in_annotation:
            self.chains.setdefault(chain, True)
        else:
            self.chains[chain] = False

    def _annotation(self, node: ast.expr | None) -> None:
        if node is None:
            return
        saved, self._in_annotation = self._in_annotation, True
        self.visit(node)
        self._in_annotation = saved

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name):
            if current.id in self.names:
                self._add((current.id, *reversed(parts)))
            return
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id in self.names:
            self._add((node.id,))

    def visit_arg(self, node: ast.arg) -> None:
        self._annotation(node.annotation)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)

    def _visit_def(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self.visit(node.args)
        self._annotation(node.returns)
        for statement in node.body:
            self.visit(statement)

    visit_FunctionDef = _visit_def
    visit_AsyncFunctionDef = _visit_def


def _chain_of(expr: ast.expr) -> tuple[str, ...] | None:
    if isinstance(expr, ast.Call):
        expr = expr.func
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return (expr.id, *reversed(parts))


def _lookup(chain: tuple[str, ...], namespace: Mapping[str, Any]) -> object:
    value = namespace.get(chain[0], _MISSING)
    if value is _MISSING:
        value = builtins.__dict__.get(chain[0], _MISSING)
    for attr in chain[1:]:
        if value is _MISSING:
            break
        value = getattr(value, attr, _MISSING)
    return value


def _is_pipe_internal(value: object) -> bool:
    module = getattr(value, "__module__", None)
    if not isinstance(module, str):
        return False
    return (module == "twinklr_pipe" or module.startswith("twinklr_pipe.")) and not (
        module == "twinklr_pipe.examples" or module.startswith("twinklr_pipe.examples.")
    )


def _drop_pipe_decorators(tree: ast.Module, namespace: Mapping[str, Any]) -> None:
    """Remove ``@stage(...)``-style decorators: names and options are not code."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            kept = []
            for decorator in node.decorator_list:
                chain = _chain_of(decorator)
                if chain is not None and _is_pipe_internal(_lookup(chain, namespace)):
                    continue
                kept.append(decorator)
            node.decorator_list = kept


def _compile_flags(obj: object) -> int:
    """The ``__future__`` flags the object's code was compiled with."""
    if isinstance(obj, FunctionType):
        return obj.__code__.co_flags & _FUTURE_FLAGS
    if isinstance(obj, type):
        for _, fn in _class_functions(obj):
            if _own_code(obj, fn):
                return fn.__code__.co_flags & _FUTURE_FLAGS
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    for value in vars(module).values() if module is not None else ():
        if value is __future__.annotations:  # ``from __future__ import annotations [as x]``
            return _FUTURE_FLAGS
    return 0


# ------------------------------------------------------------------------------- walk


def _class_functions(cls: type) -> list[tuple[str, FunctionType]]:
    """Functions defined in the class body (methods, static/class methods, properties)."""
    found: list[tuple[str, FunctionType]] = []
    for name, value in vars(cls).items():
        candidates: list[object] = [value]
        if isinstance(value, staticmethod | classmethod):
            candidates = [value.__func__]
        elif isinstance(value, property):
            candidates = [value.fget, value.fset, value.fdel]
        for index, fn in enumerate(candidates):
            if isinstance(fn, FunctionType):
                found.append((f"{name}#{index}" if index else name, fn))
    return found


def _own_code(cls: type, fn: FunctionType) -> bool:
    code = fn.__code__
    return code.co_qualname == f"{cls.__qualname__}.{code.co_name}"


def _cell_value(cell: CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:
        return _MISSING


class _Walker:
    """One source-hash computation: a breadth-first walk from the root object."""

    def __init__(self, root: object) -> None:
        module = getattr(root, "__module__", None)
        self.root_package = module.partition(".")[0] if isinstance(module, str) else ""
        self.records: list[dict[str, Any]] = []
        self.followed: list[str] = []
        self.unresolved: list[str] = []
        self._keys: dict[int, str] = {}
        self._keep: list[object] = []  # ids stay unique while the walk runs
        self._queue: deque[object] = deque()
        self.dict_guards: dict[tuple[int, str], tuple[dict[str, Any], str, object]] = {}
        self.code_guards: dict[int, tuple[FunctionType, CodeType]] = {}
        self.cell_guards: dict[int, tuple[CellType, object]] = {}
        self._root = root

    def run(self) -> str:
        self._enqueue(self._root)
        while self._queue:
            obj = self._queue.popleft()
            if isinstance(obj, type):
                self._visit_class(obj)
            elif isinstance(obj, FunctionType):
                self._visit_function(obj)
            else:
                key = self._keys[id(obj)]
                self.followed.append(key)
                self.unresolved.append(f"{key}: <not a function or class>")
                self.records.append({"id": key, "opaque": self._type_marker(obj)})
        payload = json.dumps([_DOMAIN, self.records], sort_keys=True, separators=(",", ":"))
        return _digest(payload)

    # -- bookkeeping

    def _enqueue(self, obj: object) -> str:
        key = self._keys.get(id(obj))
        if key is None:
            key = _code_key(obj)
            self._keys[id(obj)] = key
            self._keep.append(obj)
            self._queue.append(obj)
        return key

    def _guard_dict(self, namespace: dict[str, Any], name: str, value: object) -> None:
        self.dict_guards[(id(namespace), name)] = (namespace, name, value)

    def _is_user(self, modname: object) -> bool:
        return _is_user_module(modname, self.root_package)

    @staticmethod
    def _type_marker(value: object) -> str:
        cls = type(value)
        return f"{cls.__module__}:{cls.__qualname__}"

    # -- visiting code

    def _visit_function(self, fn: FunctionType) -> None:
        key = self._keys[id(fn)]
        self.followed.append(key)
        code = fn.__code__
        self.code_guards[id(fn)] = (fn, code)
        record: dict[str, Any] = {"id": key, "kind": "function"}
        closure = dict(zip(code.co_freevars, fn.__closure__ or (), strict=False))
        namespace = fn.__globals__
        refs: dict[str, str] = {}
        source = _parse_source(code)
        if source is not None:
            _strip_docstrings(source.tree, keep_class_doc=False)
            _drop_pipe_decorators(source.tree, namespace)
            record["ast"] = _digest(ast.dump(source.tree, annotate_fields=True))
            self._resolve_tree(key, source, namespace, closure, refs)
            if not self._function_matches(fn, source):
                record["bytecode"] = _code_digest(code)
                self.unresolved.append(f"{key}: {SOURCE_DIFFERS}")
        else:
            record["bytecode"] = _code_digest(code)
            self.unresolved.append(f"{key}: {NO_SOURCE}")
            names = sorted(_code_names(code))
            self._resolve_names(key, names, namespace, closure, refs)
        wrapped = vars(fn).get("__wrapped__", _MISSING)
        if wrapped is not _MISSING:
            refs["<wrapped>"] = self._classify(wrapped, key, "<wrapped>")
        for index, default in enumerate(fn.__defaults__ or ()):
            label = f"<default {index}>"
            refs[label] = self._classify(default, key, label)
        for name, default in sorted((fn.__kwdefaults__ or {}).items()):
            label = f"<default {name}>"
            refs[label] = self._classify(default, key, label)
        record["refs"] = sorted(refs.items())
        self.records.append(record)

    def _visit_class(self, cls: type) -> None:
        key = self._keys[id(cls)]
        self.followed.append(key)
        record: dict[str, Any] = {"id": key, "kind": "class"}
        module = sys.modules.get(cls.__module__)
        namespace: dict[str, Any] = vars(module) if module is not None else {}
        methods = [(name, fn) for name, fn in _class_functions(cls) if _own_code(cls, fn)]
        # Methods of a class defined in a function read its locals through their closures.
        closure: dict[str, CellType] = {}
        for _, fn in methods:
            self.code_guards[id(fn)] = (fn, fn.__code__)
            cells = zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False)
            closure.update((name, cell) for name, cell in cells if name != "__class__")
        refs: dict[str, str] = {}
        if "<locals>" in cls.__qualname__:
            # Its body may also copy locals into class attributes: hash those by value.
            record["runtime"] = self._class_runtime_digest(cls, [])
        source = _parse_source(cls)
        if source is not None:
            is_model = issubclass(cls, BaseModel)
            _strip_docstrings(source.tree, keep_class_doc=is_model)
            _drop_pipe_decorators(source.tree, namespace)
            record["ast"] = _digest(ast.dump(source.tree, annotate_fields=True))
            self._resolve_tree(key, source, namespace, closure, refs)
            if not self._class_matches(cls, methods, source):
                record["bytecode"] = self._class_runtime_digest(cls, methods)
                self.unresolved.append(f"{key}: {SOURCE_DIFFERS}")
        else:
            record["bytecode"] = self._class_runtime_digest(cls, methods)
            self.unresolved.append(f"{key}: {NO_SOURCE}")
            names: set[str] = set()
            for _, fn in methods:
                names |= _code_names(fn.__code__)
            self._resolve_names(key, sorted(names), namespace, closure, refs)
        for index, base in enumerate(cls.__bases__):
            refs[f"<base {index}>"] = self._code_ref(base)
        record["refs"] = sorted(refs.items())
        self.records.append(record)

    def _class_runtime_digest(self, cls: type, methods: list[tuple[str, FunctionType]]) -> str:
        parts = [[name, _code_digest(fn.__code__)] for name, fn in sorted(methods)]
        for name, value in sorted(vars(cls).items()):
            if name.startswith("__") and name.endswith("__"):
                continue
            try:
                parts.append([name, fingerprint(value)])
            except Exception:
                parts.append([name, self._type_marker(value)])
        return _digest(json.dumps(parts))

    # -- source against loaded code

    def _compile(self, obj: object, source: _Source) -> CodeType | None:
        try:
            compiled: CodeType = compile(
                source.text, "<source>", "exec", flags=_compile_flags(obj), dont_inherit=True
            )
        except (SyntaxError, ValueError):
            return None
        return compiled

    def _function_matches(self, fn: FunctionType, source: _Source) -> bool:
        compiled = self._compile(fn, source)
        if compiled is None:
            return False
        code = fn.__code__
        return any(c.co_name == code.co_name and _same_code(c, code) for c in _iter_code(compiled))

    def _class_matches(
        self, cls: type, methods: list[tuple[str, FunctionType]], source: _Source
    ) -> bool:
        compiled = self._compile(cls, source)
        if compiled is None:
            return False
        bodies = [c for c in _iter_code(compiled) if c.co_name == cls.__name__]
        for _, fn in methods:
            code = fn.__code__
            if not any(
                isinstance(c, CodeType) and c.co_name == code.co_name and _same_code(c, code)
                for body in bodies
                for c in body.co_consts
            ):
                return False
        return self._class_literals_match(cls, source)

    @staticmethod
    def _class_literals_match(cls: type, source: _Source) -> bool:
        fields: Mapping[str, Any] = getattr(cls, "model_fields", None) or {}
        for node in source.tree.body:
            if not isinstance(node, ast.ClassDef) or node.name != cls.__name__:
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                    target, value_node = stmt.targets[0], stmt.value
                elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                    target, value_node = stmt.target, stmt.value
                else:
                    continue
                if not isinstance(target, ast.Name) or target.id.startswith("__"):
                    continue
                try:
                    literal = ast.literal_eval(value_node)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                runtime = vars(cls).get(target.id, _MISSING)
                if runtime is _MISSING and target.id in fields:
                    runtime = getattr(fields[target.id], "default", _MISSING)
                if type(runtime) not in _LITERAL_TYPES:
                    continue  # absent, or replaced (slots, enum members, descriptors)
                if type(runtime) is not type(literal) or runtime != literal:
                    return False
        return True

    # -- resolving references

    def _resolve_tree(
        self,
        referrer: str,
        source: _Source,
        namespace: dict[str, Any],
        closure: dict[str, CellType],
        refs: dict[str, str],
    ) -> None:
        names, state = _global_names(source.text)
        collector = _RefCollector(names)
        collector.visit(source.tree)
        for chain, annotation_only in collector.chains.items():
            if chain[0] in state and chain[0] not in closure:
                refs.setdefault(chain[0], "state")
                continue
            name, marker = self._resolve(referrer, chain, namespace, closure, annotation_only)
            refs.setdefault(name, marker)

    def _resolve_names(
        self,
        referrer: str,
        names: list[str],
        namespace: dict[str, Any],
        closure: dict[str, CellType],
        refs: dict[str, str],
    ) -> None:
        # Without source, attribute names and global names are mixed in ``co_names``:
        # resolve those that exist, skip the rest, and try every name as an attribute
        # of each user module found.
        modules: list[str] = []
        for name in names:
            if name in closure or name in namespace or name in builtins.__dict__:
                resolved, marker = self._resolve(referrer, (name,), namespace, closure)
                refs.setdefault(resolved, marker)
                if marker.startswith("module:") and name in namespace:
                    modules.append(name)
        for module_name in modules:
            module = namespace[module_name]
            if not isinstance(module, ModuleType) or not self._is_user(module.__name__):
                continue
            for attr in names:
                if attr in vars(module):
                    resolved, marker = self._resolve(
                        referrer, (module_name, attr), namespace, closure
                    )
                    refs.setdefault(resolved, marker)

    def _resolve(
        self,
        referrer: str,
        chain: tuple[str, ...],
        namespace: dict[str, Any],
        closure: dict[str, CellType],
        quiet: bool = False,
    ) -> tuple[str, str]:
        """Resolve ``chain`` as the running code would; return its name and marker."""
        head = chain[0]
        value: object
        if head in closure:
            cell = closure[head]
            value = _cell_value(cell)
            self.cell_guards[id(cell)] = (cell, value)
            if value is _MISSING:
                self.unresolved.append(f"{referrer}: {head}")
                return head, "empty-cell"
        else:
            value = namespace.get(head, _MISSING)
            self._guard_dict(namespace, head, value)
            if value is _MISSING:
                if head in builtins.__dict__:
                    return head, "builtin"
                if not quiet:
                    self.unresolved.append(f"{referrer}: {head}")
                return head, "missing"
        dotted = head
        for attr in chain[1:]:
            if isinstance(value, ModuleType):
                if not self._is_user(value.__name__):
                    break
                members = vars(value)
                inner = members.get(attr, _MISSING)
                self._guard_dict(members, attr, inner)
                dotted = f"{dotted}.{attr}"
                if inner is _MISSING:
                    if not quiet:
                        self.unresolved.append(f"{referrer}: {dotted}")
                    return dotted, "missing"
                value = inner
            elif not isinstance(value, type | FunctionType) and _fingerprint_or_none(value) is None:
                # An object that cannot be hashed whole (a settings object): step into
                # a plain instance attribute when that one can (``settings.model``).
                attrs = getattr(value, "__dict__", None)
                if not isinstance(attrs, dict) or attr not in attrs:
                    break
                inner = attrs[attr]
                if _fingerprint_or_none(inner) is None:
                    break
                self._guard_dict(attrs, attr, inner)
                dotted = f"{dotted}.{attr}"
                value = inner
            else:
                break
        return dotted, self._classify(value, referrer, dotted)

    def _code_ref(self, obj: type | FunctionType) -> str:
        if self._is_user(_code_module(obj)):
            marker = "code:" + self._enqueue(obj)
        else:
            marker = "ext:" + _code_key(obj)
        wrapped = (
            vars(obj).get("__wrapped__", _MISSING) if isinstance(obj, FunctionType) else _MISSING
        )
        if wrapped is not _MISSING:
            # A decorator's wrapper (``functools.wraps``): its code, and what it wraps.
            marker += "|wrapped:" + self._classify(wrapped, _code_key(obj), "<wrapped>")
        return marker

    def _classify(self, value: object, referrer: str, name: str) -> str:
        """A stable marker for a resolved value; queues user code to be hashed."""
        if isinstance(value, ModuleType):
            return f"module:{value.__name__}"
        if isinstance(value, type | FunctionType):
            return self._code_ref(value)
        if _is_function_stage(value):
            return "stage:" + self._classify(value.fn, referrer, name)  # type: ignore[attr-defined]
        if isinstance(value, _BUILTIN_CALLABLES):
            owner = getattr(value, "__self__", None)
            if owner is None or isinstance(owner, ModuleType | type):
                return "ext:" + _qualname(value)
            # A bound method of a value (``lookup = TEMPLATES.get``): the value counts.
            owner_marker = self._classify(owner, referrer, f"{name}.__self__")
            return f"method:ext:{_qualname(value)}|{owner_marker}"
        if _is_external_name(value, self._is_user):
            return "ext:" + _qualname(value)
        if isinstance(value, MethodType):
            func = self._classify(value.__func__, referrer, name)
            owner = self._classify(value.__self__, referrer, f"{name}.__self__")
            return f"method:{func}|{owner}"
        if isinstance(value, functools.partial):
            parts = [self._classify(value.func, referrer, name)]
            parts += [self._classify(a, referrer, f"{name}(...)") for a in value.args]
            parts += [
                f"{k}={self._classify(v, referrer, f'{name}({k}=...)')}"
                for k, v in sorted(value.keywords.items())
            ]
            return "partial:" + "|".join(parts)
        if isinstance(value, enum.Enum):
            return f"enum:{self._code_ref(type(value))}.{value.name}"
        if isinstance(value, re.Pattern):
            return "re:" + _digest(_canon_const((value.pattern, value.flags)))
        if isinstance(value, logging.Logger):
            return f"logger:{value.name}"
        if type(value) is object:
            return "sentinel"
        if isinstance(value, GenericAlias | UnionType | typing.TypeVar) or type(
            value
        ).__module__ in ("typing", "typing_extensions"):
            return f"typing:{value!r}"
        type_ref = ""
        if self._is_user(type(value).__module__):
            type_ref = "|" + self._code_ref(type(value))
        fp = _fingerprint_or_none(value)
        if fp is not None:
            return f"const:{fp}{type_ref}"
        wrapped = getattr(value, "__wrapped__", _MISSING)
        if wrapped is not _MISSING and wrapped is not value:
            return f"wrapped:{self._type_marker(value)}|{self._classify(wrapped, referrer, name)}"
        self.unresolved.append(f"{referrer}: {name}")
        return f"opaque:{self._type_marker(value)}{type_ref}"


_BUILTIN_CALLABLES: Final = (
    BuiltinFunctionType,
    ClassMethodDescriptorType,
    MethodDescriptorType,
    MethodWrapperType,
    WrapperDescriptorType,
)


def _fingerprint_or_none(value: object) -> str | None:
    try:
        return fingerprint(value)
    except Exception:  # FingerprintError, or a value whose own code fails
        return None


def _is_external_name(value: object, is_user: Callable[[object], bool]) -> bool:
    """True for an object importable by name from a non-user module (``numpy.sqrt``)."""
    module = getattr(value, "__module__", None)
    name = getattr(value, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str) or is_user(module):
        return False
    return getattr(sys.modules.get(module), name, None) is value


# ------------------------------------------------------------------------------ memo


@dataclasses.dataclass(slots=True)
class _Memo:
    obj: object  # a strong reference keeps ``id(obj)`` from being reused
    report: SourceReport
    #: (namespace, name, value): every global, module attribute or instance
    #: attribute that was read, with what it was bound to (``_MISSING`` if unbound).
    bindings: tuple[tuple[dict[str, Any], str, object], ...]
    codes: tuple[tuple[FunctionType, CodeType], ...]
    cells: tuple[tuple[CellType, object], ...]

    def is_current(self) -> bool:
        """True while every binding the hash was computed from is unchanged."""
        missing = _MISSING
        for namespace, name, value in self.bindings:
            if namespace.get(name, missing) is not value:
                return False
        for fn, code in self.codes:
            if fn.__code__ is not code:
                return False
        for cell, content in self.cells:
            if _cell_value(cell) is not content:
                return False
        return True


_memo: dict[int, _Memo] = {}


def clear_source_cache() -> None:
    """Forget every memoized source hash (the next call recomputes)."""
    with _memo_lock:
        _memo.clear()
        _module_kinds.clear()
        _raw_sources.clear()


def _compute(obj: object) -> _Memo:
    walker = _Walker(obj)
    digest = walker.run()
    return _Memo(
        obj=obj,
        report=SourceReport(digest, walker.followed, walker.unresolved),
        bindings=tuple(walker.dict_guards.values()),
        codes=tuple(walker.code_guards.values()),
        cells=tuple(walker.cell_guards.values()),
    )


def _memoized(obj: object) -> SourceReport:
    if not isinstance(obj, FunctionType | type) and _is_function_stage(obj):
        obj = obj.fn  # type: ignore[attr-defined]
    memo = _memo.get(id(obj))
    if memo is not None and memo.obj is obj and memo.is_current():
        return memo.report
    memo = _compute(obj)
    with _memo_lock:
        _memo[id(obj)] = memo
        while len(_memo) > _MEMO_MAX:
            del _memo[next(iter(_memo))]
    return memo.report


def source_hash(obj: object) -> str:
    """The source hash of a function or class and everything it references.

    Args:
        obj: A function or class (a ``@stage`` function stage stands for its function).

    Returns:
        32 hex characters. Never raises for unresolvable references; see
        ``source_report`` for what was followed and what was not.
    """
    return _memoized(obj).hash


def source_report(obj: object) -> SourceReport:
    """Like ``source_hash``, with the qualified names followed and those left unresolved.

    Args:
        obj: A function or class (a ``@stage`` function stage stands for its function).

    Returns:
        A fresh ``SourceReport`` (its lists may be modified by the caller).
    """
    report = _memoized(obj)
    return SourceReport(report.hash, list(report.followed), list(report.unresolved))


# --------------------------------------------------------------------- configuration


def _cache_exclude(stage: object) -> frozenset[str]:
    raw = getattr(type(stage), "cache_exclude", None)
    if raw is None:
        return frozenset()
    if isinstance(raw, str) or not isinstance(raw, Iterable):
        raise TypeError(
            f"{type(stage).__qualname__}.cache_exclude must be a tuple of field names, "
            f'such as ("client",), not {raw!r}.'
        )
    names = tuple(raw)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{type(stage).__qualname__}.cache_exclude must contain field names (str), "
            f"not {names!r}."
        )
    return frozenset(names)


def _slot_names(cls: type) -> Iterator[tuple[str, str]]:
    """(field name, attribute name) for each ``__slots__`` entry, names mangled."""
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            attr = slot
            if slot.startswith("__") and not slot.endswith("__"):
                attr = f"_{klass.__name__.lstrip('_')}{slot}"
            yield slot, attr


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _config_values(stage: object) -> dict[str, Any]:
    cls = type(stage)
    params = getattr(stage, "cache_params", None)
    if callable(params):
        result = params()
        if not isinstance(result, Mapping):
            raise TypeError(
                f"{cls.__qualname__}.cache_params() must return a mapping of field name to "
                f"value, not {type(result).__qualname__}."
            )
        bad = [k for k in result if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"{cls.__qualname__}.cache_params() must return str keys, not {bad[0]!r}."
            )
        return dict(result)
    if _is_function_stage(stage):
        return {}
    skip = _NEVER_CONFIG | _cache_exclude(stage)
    values: dict[str, Any] = {}
    if isinstance(stage, BaseModel):
        for name, info in type(stage).model_fields.items():
            if name not in skip and info.exclude is not True:
                values[name] = getattr(stage, name)
        values.update((k, v) for k, v in (stage.model_extra or {}).items() if k not in skip)
        return values
    if dataclasses.is_dataclass(stage) and not isinstance(stage, type):
        for field in dataclasses.fields(stage):
            if field.name in skip or field.metadata.get("cache", True) is False:
                continue
            value = getattr(stage, field.name, _MISSING)
            if value is not _MISSING:
                values[field.name] = value
        return values
    attrs: dict[Any, Any] = getattr(stage, "__dict__", None) or {}
    values.update(
        (k, v)
        for k, v in attrs.items()
        if isinstance(k, str) and k not in skip and not _is_dunder(k)
    )
    for name, attr in _slot_names(cls):
        if name not in skip and name not in values and not _is_dunder(name):
            value = getattr(stage, attr, _MISSING)
            if value is not _MISSING:
                values[name] = value
    return values


def stage_config(stage: object) -> dict[str, str]:
    """Field name -> fingerprint of each configuration value, sorted by name.

    See the module docstring for which fields count and how to exclude one.

    Args:
        stage: A ``@stage`` function stage or a class-based stage instance.

    Returns:
        A dict sorted by field name.

    Raises:
        FingerprintError: A field's value cannot be fingerprinted; ``where`` names the
            field (the executor adds the stage).
        TypeError: ``cache_params()`` does not return a ``Mapping[str, Any]``, or
            ``cache_exclude`` is not a collection of names.
    """
    values = _config_values(stage)
    fields: dict[str, str] = {}
    for name in sorted(values):
        value = values[name]
        try:
            fields[name] = fingerprint(value)
        except FingerprintError as exc:
            where = f"configuration field '{name}'"
            if exc.where == "value":
                raise FingerprintError(type(value), where=where) from exc
            # Keep the path inside the field, and the type that actually failed.
            inner = (
                exc.where[len("value") :] if exc.where.startswith("value") else f" ({exc.where})"
            )
            error = FingerprintError(exc.value_type, where=where + inner)
            for note in getattr(exc, "__notes__", ()):
                error.add_note(note)
            raise error from exc
    return fields


def config_fingerprint(fields: dict[str, str]) -> str:
    """The fingerprint of a ``stage_config`` result.

    Args:
        fields: Field name -> value fingerprint.

    Returns:
        32 hex characters.
    """
    return fingerprint(fields)
