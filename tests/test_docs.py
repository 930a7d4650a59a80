"""Every fenced code block in the docs runs, so the docs cannot rot.

The documents are ``README.md``, ``MIGRATION.md`` and ``docs/*.md``. Each document is
one test: its blocks run in order, in a fresh temporary working directory that holds
a copy of ``.cache-example/`` (as a fresh clone does), and a block may use what an
earlier block of the same document made (names, files, the cache in
``./.twinklr-cache``). What a block does depends on its info string:

``python``
    Executed in a namespace shared by the document's Python blocks. The namespace is
    a real module (registered in ``sys.modules`` while the document runs), so classes
    defined in a block can be stored by the cache and restored by name.
``python file=NAME``
    Written to ``NAME`` in the working directory (for ``pipe`` commands to load),
    compiled to check its syntax, not executed.
``python no-run`` (and ``bash no-run``, ``sh no-run``)
    Skipped. Only for code that needs an external service (a Dask scheduler); keep
    these rare (``MAX_NOT_RUN``).
``bash``, ``sh``, ``console``
    Commands, run as real subprocesses with this environment's ``pipe``. In ``bash``
    blocks every line is a command; in ``console`` blocks lines starting with ``$ ``
    are commands and the lines after one are its documented output. A command must
    exit with 0, or with ``N`` when the line ends in ``# exit N``. Every documented
    output line must appear in the real output (stdout and stderr), with numbers,
    durations, dates, hex keys and runs of spaces allowed to differ; a line ``...``
    elides output, and ``...`` within a line stands for any text. Run ids
    (``r-20250101T120000-1a2b3c``) in documented output are bound to the real run ids
    they matched, and replaced by them in later commands.
    Only ``pipe`` commands are supported (optionally with ``NAME=value``
    environment prefixes): no pipes, redirections or ``&&``. Not run: the README's two
    set-up commands (recognised by ``python3 -m venv``: they create virtual
    environments, and CI already runs the test command verbatim), and templates, shell
    blocks with a placeholder such as ``<host>`` that the reader fills in (they name a
    service that is not there, like a Dask scheduler; they count as not run).
``text``, ``json``, ``mermaid``, ``dot``
    Pure output or diagrams: not executed.

Any other info string (or none) fails, so no block escapes the test by accident.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(
    p
    for p in [REPO / "README.md", REPO / "MIGRATION.md", *(REPO / "docs").glob("*.md")]
    if p.exists()
)
SETUP_MARKER = "python3 -m venv"
EXEMPT = {"text", "json", "mermaid", "dot"}
COMMAND_KINDS = {"bash", "sh", "console"}
MAX_NOT_RUN = 4
COMMAND_TIMEOUT_S = 120

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
RUN_ID = re.compile(r"r-\d{8}T\d{6}-[0-9a-f]{6}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_HEX = re.compile(r"[0-9a-f]{6,}")
_EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
#: A placeholder for the reader to fill in: ``<host>``, ``<run-id>``.
_PLACEHOLDER = re.compile(r"<[a-z][a-z_-]*>")


@dataclasses.dataclass
class Block:
    doc: Path
    line: int  #: line number of the opening fence (1-based)
    info: str
    text: str

    @property
    def kind(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    def option(self, name: str) -> str | None:
        for word in self.info.split()[1:]:
            key, _, value = word.partition("=")
            if key == name:
                return value
        return None


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown document, in order."""
    found: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, start = m.group("fence"), i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close.group("fence").startswith(fence) and not close.group("info"):
                break
            body.append(lines[i][len(m.group("indent")) :])
            i += 1
        else:
            raise AssertionError(f"{doc.name}:{start + 1}: unclosed code fence")
        found.append(Block(doc, start + 1, m.group("info").strip(), "\n".join(body) + "\n"))
        i += 1
    return found


# -- commands --------------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    line: str
    exit_code: int = 0
    output: list[str] = dataclasses.field(default_factory=list)


def commands(block: Block) -> list[Command]:
    """The commands of a bash/console block, with their documented output."""
    found: list[Command] = []
    pending = ""
    for raw in block.text.splitlines():
        if block.kind == "console" and not raw.startswith("$ ") and not pending:
            if found:
                found[-1].output.append(raw)
            elif raw.strip():
                raise AssertionError(f"{block.where}: output before the first '$ ' command")
            continue
        line = raw[2:] if block.kind == "console" and raw.startswith("$ ") else raw
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        code = 0
        m = _EXIT.search(line)
        if m:
            code = int(m.group(1))
            line = line[: m.start()]
        found.append(Command(line.strip(), code))
    return found


def _pipe() -> list[str]:
    script = Path(sys.executable).with_name("pipe")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "twinklr_pipe"]


def _argv(command: str, where: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and _ENV.fullmatch(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words or words[0] != "pipe":
        raise AssertionError(f"{where}: only `pipe ...` commands are supported: {command!r}")
    bad = [w for w in words if w in {"|", "||", "&&", ";", ">", ">>", "<", "&"}]
    if bad:
        raise AssertionError(f"{where}: no shell operators ({bad}) in doc commands: {command!r}")
    return env, [*_pipe(), *words[1:]]


def _loose(text: str) -> str:
    """A regex for ``text`` in which numbers, hashes and runs of spaces may differ.

    Cache keys and source hashes are deterministic, but they change with the key
    recipe or the Python version (source hashes hash syntax trees); the words around
    them are what a reader relies on.
    """
    out = []
    for token in re.split(r"(\s+|\b[0-9a-f]{6,}\b|\d+(?:\.\d+)?)", text):
        if not token:
            continue
        if token.isspace():
            out.append(r"\s+")
        elif _HEX.fullmatch(token) and any(c.isdigit() for c in token):
            out.append(r"[0-9a-f]+")
        elif _NUMBER.fullmatch(token):
            out.append(r"\d+(?:\.\d+)?")
        else:
            out.append(re.escape(token))
    return "".join(out)


def _pattern(line: str, run_ids: dict[str, str]) -> tuple[re.Pattern[str], list[str]]:
    """A regex for a documented output line, and the unbound run ids it captures.

    ``...`` inside a line stands for any text (a path of the machine, a long value).
    """
    segments: list[str] = []
    captured: list[str] = []
    for segment in line.split("..."):
        parts: list[str] = []
        pos = 0
        for m in RUN_ID.finditer(segment):
            parts.append(_loose(segment[pos : m.start()]))
            doc_id = m.group()
            if doc_id in run_ids:
                parts.append(re.escape(run_ids[doc_id]))
            else:
                parts.append(f"({RUN_ID.pattern})")
                captured.append(doc_id)
            pos = m.end()
        parts.append(_loose(segment[pos:]))
        segments.append("".join(parts))
    return re.compile(".*".join(segments)), captured


def check_output(
    expected: list[str], actual: str, run_ids: dict[str, str], where: str, command: str
) -> None:
    """Every documented line appears in ``actual``; bind the run ids it shows."""
    real = [line.strip() for line in actual.splitlines()]
    for line in expected:
        line = line.strip()
        if not line or line == "...":
            continue
        pattern, captured = _pattern(line, run_ids)
        for candidate in real:
            m = pattern.fullmatch(candidate)
            if m:
                run_ids.update(zip(captured, m.groups(), strict=True))
                break
        else:
            raise AssertionError(
                f"{where}: `{command}` did not print a line like\n    {line}\nIt printed:\n{actual}"
            )


def run_command(cmd: Command, cwd: Path, run_ids: dict[str, str], where: str) -> None:
    line = RUN_ID.sub(lambda m: run_ids.get(m.group(), m.group()), cmd.line)
    extra_env, argv = _argv(line, where)
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120", **extra_env}
    if "TWINKLR_PIPE_CACHE_DIR" not in extra_env:
        env.pop("TWINKLR_PIPE_CACHE_DIR", None)
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == cmd.exit_code, (
        f"{where}: `{line}` exited with {done.returncode}, expected {cmd.exit_code}:\n{output}"
    )
    check_output(cmd.output, output, run_ids, where, line)


def not_run(block: Block) -> bool:
    """A block skipped on purpose: marked ``no-run``, or a shell template."""
    if "no-run" in block.info.split()[1:]:
        return True
    return block.kind in COMMAND_KINDS and _PLACEHOLDER.search(block.text) is not None


# -- the tests -------------------------------------------------------------------------------


@pytest.fixture
def doc_module(request: pytest.FixtureRequest) -> Iterator[types.ModuleType]:
    name = "docs_" + re.sub(r"\W", "_", request.node.callspec.id)
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_block_runs(
    doc: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    doc_module: types.ModuleType,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TWINKLR_PIPE_CACHE_DIR", raising=False)
    # As on a fresh clone; a copy, because opening a cache rewrites its settings rows.
    shutil.copytree(REPO / ".cache-example", tmp_path / ".cache-example")
    run_ids: dict[str, str] = {}
    for block in blocks(doc):
        kind = block.kind
        if kind in EXEMPT:
            continue
        if not_run(block):
            continue
        if kind == "python":
            code = compile(block.text, block.where, "exec")
            target = block.option("file")
            if target is not None:
                (tmp_path / target).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / target).write_text(block.text, encoding="utf-8")
                continue
            exec(code, doc_module.__dict__)
            continue
        if kind in COMMAND_KINDS:
            if SETUP_MARKER in block.text:
                assert doc.name == "README.md", f"{block.where}: only README has set-up commands"
                continue
            for cmd in commands(block):
                run_command(cmd, tmp_path, run_ids, block.where)
            continue
        raise AssertionError(
            f"{block.where}: code block with info string {block.info!r} is not run by the doc "
            f"test; use python, console, bash, or (for output only) {sorted(EXEMPT)}"
        )


def test_blocks_not_run_are_rare() -> None:
    skipped = [b.where for d in DOCS for b in blocks(d) if not_run(b)]
    assert len(skipped) <= MAX_NOT_RUN, skipped


def test_readme_setup_commands() -> None:
    """Two set-up commands: the first runs the example, the second is CI's test command."""
    setup = [b for b in blocks(REPO / "README.md") if SETUP_MARKER in b.text]
    assert [b.kind for b in setup] == ["bash", "bash"]
    run_cmd, test_cmd = (b.text.strip() for b in setup)
    assert run_cmd.endswith("pipe run twinklr_pipe.examples.sequencer:pipeline"), run_cmd
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_cmd in ci, "the README's test command must be the one .ci/run runs verbatim"


def test_output_matching_is_strict_about_words() -> None:
    """Numbers and spacing may differ; words and statuses may not."""
    ids: dict[str, str] = {}
    check_output(
        ["audio     cached    cached (saves 1.14s)"],
        "  audio   cached   cached (saves 0.93s)\n",
        ids,
        "here",
        "pipe plan",
    )
    with pytest.raises(AssertionError, match="did not print"):
        check_output(
            ["audio     cached    cached (saves 1.14s)"],
            "audio will run no entry\n",
            ids,
            "here",
            "pipe plan",
        )
    check_output(
        ["run r-20250101T120000-1a2b3c succeeded in 1.35s: 8 succeeded"],
        "run r-20261127T221016-423ed0 succeeded in 2.01s: 8 succeeded\n",
        ids,
        "here",
        "pipe run",
    )
    assert ids == {"r-20250101T120000-1a2b3c": "r-20261127T221016-423ed0"}
    check_output(["cwd   .../work"], "cwd /tmp/pytest-7/work\n", ids, "here", "pipe runs show")


def test_pipe_is_available() -> None:
    argv = _pipe()
    assert shutil.which(argv[0]) or Path(argv[0]).exists()
