"""Load a pipeline named by a spec: ``module.path:attr`` or ``path/to/file.py:attr``.

``attr`` is a ``PipelineDefinition``, or a zero-argument callable returning one,
or returning a ``(PipelineDefinition, PipelineContext)`` pair when the pipeline
needs services. Every way a spec can be wrong is one ``SpecError`` line that
names what was not found, or what was found instead.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from ._context import PipelineContext
from ._definition import PipelineDefinition
from .errors import SpecError

__all__ = ["absolute_spec", "load_pipeline", "split_spec"]

_FORM = "'module.path:attr' or 'path/to/file.py:attr'"


def split_spec(spec: str) -> tuple[str, str]:
    """Split ``spec`` into its module part (a module path or a file) and its attribute.

    Raises:
        SpecError: the spec has no ``:attr`` part or an empty side.
    """
    target, sep, attr = spec.rpartition(":")
    # "C:\\x.py" alone has a drive colon, not an attribute separator.
    if not sep or not target or not attr or "/" in attr or "\\" in attr:
        raise SpecError(f"Spec '{spec}' must have the form {_FORM}")
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def absolute_spec(spec: str, cwd: str | os.PathLike[str] | None = None) -> str:
    """``spec`` with a file path made absolute (module specs are returned unchanged).

    The run journal records this, with the working directory, so ``pipe resume``
    finds the same pipeline from anywhere.
    """
    target, attr = split_spec(spec)
    if not _is_file_target(target):
        return spec
    base = Path(cwd) if cwd is not None else Path.cwd()
    return f"{(base / target).resolve()}:{attr}"


def load_pipeline(spec: str) -> tuple[PipelineDefinition, PipelineContext | None]:
    """Import the pipeline named by ``spec``.

    Example::

        pipeline, context = load_pipeline("examples/song.py:build")

    Module specs are imported with the current directory on ``sys.path`` (as
    ``python -m`` does). A file is imported under its file name as module name,
    with its directory on ``sys.path``, so its classes can be imported again by
    name (the cache restores pydantic outputs that way) and its stage identities
    are the same in every run.

    Returns:
        The pipeline, and the context the spec returned (None when it returned
        only a pipeline).

    Raises:
        SpecError: the spec is malformed, does not import, has no such attribute,
            or names something that is not (and does not return) a pipeline.
    """
    target, attr = split_spec(spec)
    module = _import_file(target, spec) if _is_file_target(target) else _import(target, spec)
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(attr, names, n=1)
        suffix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise SpecError(f"Spec '{spec}': module '{module.__name__}' has no '{attr}'{suffix}")
    return _resolve(getattr(module, attr), spec)


def _resolve(obj: Any, spec: str) -> tuple[PipelineDefinition, PipelineContext | None]:
    if isinstance(obj, PipelineDefinition):
        return obj, None
    if not callable(obj) or isinstance(obj, type):
        raise SpecError(f"'{spec}' is {_a(obj)}, not a PipelineDefinition")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise SpecError(
            f"'{spec}' is a function that needs arguments; it must take none and return "
            "a PipelineDefinition (or a (PipelineDefinition, PipelineContext) pair)"
        ) from None
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        value = obj()
    except Exception as exc:
        raise SpecError(f"Calling '{spec}' raised {_describe(exc)}") from None
    if isinstance(value, PipelineDefinition):
        return value, None
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], PipelineDefinition)
        and isinstance(value[1], PipelineContext)
    ):
        return value[0], value[1]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], PipelineDefinition):
        raise SpecError(
            f"'{spec}' is a function that returned a pair whose second item is "
            f"{_a(value[1])}, not a PipelineContext"
        )
    raise SpecError(f"'{spec}' is a function that returned {_a(value)}, not a PipelineDefinition")


def _a(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _import(module_name: str, spec: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # The `pipe` script does not put the current directory on sys.path; python -m does.
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise SpecError(
                f"Spec '{spec}': no module named '{exc.name}' (looked in {cwd} and the "
                "installed packages)"
            ) from None
        raise SpecError(
            f"Spec '{spec}': importing '{module_name}' raised {_describe(exc)}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"Spec '{spec}': importing '{module_name}' raised {_describe(exc)}"
        ) from None


def _import_file(target: str, spec: str) -> ModuleType:
    path = Path(target).resolve()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise SpecError(f"Spec '{spec}': file {target} {what}")
    name = _module_name(path)
    import_spec = importlib.util.spec_from_file_location(name, path)
    if import_spec is None or import_spec.loader is None:
        raise SpecError(f"Spec '{spec}': {target} cannot be imported as a Python module")
    # Executed afresh on every load, so an edited file is seen (tests, notebooks).
    module = importlib.util.module_from_spec(import_spec)
    module.__dict__[_MARK] = str(path)
    folder = str(path.parent)
    if folder not in sys.path:
        # Siblings of the file import as they would with `python file.py`.
        sys.path.insert(0, folder)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        import_spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        if isinstance(exc, Exception):
            raise SpecError(f"Spec '{spec}': importing {target} raised {_describe(exc)}") from None
        raise
    return module


#: Set on modules this loader imported from a file (their value: the file's path).
_MARK = "__twinklr_pipe_spec_file__"


def _module_name(path: Path) -> str:
    """The module name a file is imported under: its stem, unless another module has it.

    A module this loader imported earlier under that name (from any file) is replaced,
    so the name, and the stage identities built from it, depend only on the file name.
    """
    stem = path.stem
    if stem.isidentifier():
        existing = sys.modules.get(stem)
        if existing is not None:
            if _MARK in existing.__dict__ or _same_file(existing, path):
                return stem
        else:
            try:
                found = importlib.util.find_spec(stem)
            except (ImportError, ValueError):
                found = None
            if found is None or (found.origin is not None and Path(found.origin) == path):
                return stem
    # A clash (a file called json.py): a stable private name derived from the path.
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() else "_" for c in stem)
    return f"_pipe_{safe}_{tag}"


def _same_file(module: ModuleType, path: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve() == path


def _describe(exc: BaseException) -> str:
    """``Type: message`` plus where in the user's code it happened, on one line."""
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError: {exc.msg} ({Path(exc.filename).name}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    if frames:
        last = frames[-1]
        return f"{text} ({Path(last.filename).name}, line {last.lineno})"
    return text
