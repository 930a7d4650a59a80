"""Tests for ``load_pipeline``: specs that load, and every way a spec is wrong."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from twinklr_pipe import PipelineContext, PipelineDefinition
from twinklr_pipe._loader import absolute_spec, load_pipeline, split_spec
from twinklr_pipe.errors import SpecError

HEADER = """
from twinklr_pipe import PipelineContext, PipelineDefinition, StageDefinition, stage

@stage
def one(x, ctx):
    return x

PIPELINE = PipelineDefinition("loaded", [StageDefinition("one", one)])
"""


@pytest.fixture(autouse=True)
def _restore_import_state(tmp_path):
    """Specs add folders to sys.path and modules to sys.modules; undo it after each test."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "")):
            del sys.modules[name]


def write(tmp_path: Path, body: str, name: str = "specmod") -> Path:
    file = tmp_path / f"{name}.py"
    file.write_text(textwrap.dedent(HEADER) + textwrap.dedent(body))
    return file


class TestSpecs:
    def test_file_spec_with_a_definition(self, tmp_path):
        """A file spec naming a PipelineDefinition loads it, without a context."""
        file = write(tmp_path, "")
        pipeline, context = load_pipeline(f"{file}:PIPELINE")
        assert pipeline.name == "loaded"
        assert context is None

    def test_module_spec_from_the_current_directory(self, tmp_path, monkeypatch):
        """A module spec is imported with the current directory on sys.path."""
        pkg = tmp_path / "mypkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        write(pkg, "", name="pipes")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
        pipeline, _ = load_pipeline("mypkg.pipes:PIPELINE")
        assert pipeline.name == "loaded"

    def test_factory_returning_a_pipeline_and_context(self, tmp_path):
        """A zero-argument callable may return a (pipeline, context) pair."""
        file = write(
            tmp_path,
            """
            def build():
                return PIPELINE, PipelineContext(provider="p")
            """,
        )
        pipeline, context = load_pipeline(f"{file}:build")
        assert isinstance(pipeline, PipelineDefinition)
        assert isinstance(context, PipelineContext)
        assert context.provider == "p"

    def test_file_is_imported_under_its_stem(self, tmp_path):
        """Classes in a spec file are importable by name (the cache restores them that way)."""
        file = write(tmp_path, "class Out:\n    pass\n", name="namedmod")
        load_pipeline(f"{file}:PIPELINE")
        assert sys.modules["namedmod"].Out.__module__ == "namedmod"

    def test_edited_file_is_loaded_again(self, tmp_path):
        """A file edited between two loads in one process is executed afresh."""
        file = write(tmp_path, "NAME = 'a'\n")
        load_pipeline(f"{file}:PIPELINE")
        file.write_text(file.read_text().replace('"loaded"', '"edited"'))
        pipeline, _ = load_pipeline(f"{file}:PIPELINE")
        assert pipeline.name == "edited"

    def test_absolute_spec_resolves_files_only(self, tmp_path):
        """The journal records file specs as absolute paths and module specs as given."""
        assert absolute_spec("pkg.mod:p", tmp_path) == "pkg.mod:p"
        assert absolute_spec("sub/f.py:p", tmp_path) == f"{tmp_path / 'sub' / 'f.py'}:p"


class TestBadSpecs:
    @pytest.mark.parametrize("spec", ["nocolon", ":attr", "mod:", "a.py"])
    def test_malformed(self, spec):
        """A spec without 'target:attr' says what form it must have."""
        with pytest.raises(SpecError, match=r"must have the form 'module\.path:attr'"):
            split_spec(spec)

    def test_missing_file(self, tmp_path):
        """A file that does not exist is named."""
        with pytest.raises(SpecError, match=r"file .*nope\.py does not exist"):
            load_pipeline(f"{tmp_path}/nope.py:p")

    def test_missing_module(self):
        """A module that does not import is named."""
        with pytest.raises(SpecError, match="no module named 'no_such_mod_xyz'"):
            load_pipeline("no_such_mod_xyz.sub:p")

    def test_module_whose_import_fails_on_a_dependency(self, tmp_path):
        """A missing dependency inside the module is reported as an import failure with a line."""
        file = write(tmp_path, "import not_installed_dep_xyz\n")
        with pytest.raises(SpecError) as info:
            load_pipeline(f"{file}:PIPELINE")
        message = str(info.value)
        assert "ModuleNotFoundError: No module named 'not_installed_dep_xyz'" in message
        assert "specmod.py, line" in message

    def test_syntax_error(self, tmp_path):
        """A syntax error names the file and line."""
        file = tmp_path / "broken.py"
        file.write_text("def f(:\n")
        with pytest.raises(SpecError, match=r"SyntaxError: .*\(broken\.py, line 1\)"):
            load_pipeline(f"{file}:p")

    def test_missing_attribute_with_suggestion(self, tmp_path):
        """A missing attribute is named, with the closest name."""
        file = write(tmp_path, "")
        with pytest.raises(SpecError, match="has no 'PIPELIN' \\(did you mean 'PIPELINE'\\?\\)"):
            load_pipeline(f"{file}:PIPELIN")

    def test_wrong_type(self, tmp_path):
        """An attribute of the wrong type says what it is."""
        file = write(tmp_path, "NUMBER = 3\n")
        with pytest.raises(SpecError, match=r"is an int, not a PipelineDefinition"):
            load_pipeline(f"{file}:NUMBER")

    def test_function_returning_the_wrong_type(self, tmp_path):
        """A factory returning something else says what it returned."""
        file = write(tmp_path, "def build():\n    return 42\n")
        with pytest.raises(SpecError, match="is a function that returned an int, not a Pipeline"):
            load_pipeline(f"{file}:build")

    def test_function_needing_arguments(self, tmp_path):
        """A factory that needs arguments is refused before it is called."""
        file = write(tmp_path, "def build(n):\n    return PIPELINE\n")
        with pytest.raises(SpecError, match="needs arguments"):
            load_pipeline(f"{file}:build")

    def test_function_that_raises(self, tmp_path):
        """A factory that raises is one line naming the exception."""
        file = write(tmp_path, "def build():\n    raise RuntimeError('no config')\n")
        with pytest.raises(SpecError, match="raised RuntimeError: no config"):
            load_pipeline(f"{file}:build")

    def test_pair_with_a_wrong_context(self, tmp_path):
        """A pair whose second item is not a context names its type."""
        file = write(tmp_path, "def build():\n    return PIPELINE, {}\n")
        with pytest.raises(SpecError, match="second item is a dict, not a PipelineContext"):
            load_pipeline(f"{file}:build")
