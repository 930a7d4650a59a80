"""The ``pipe`` console script: ``pipe cache ls`` straight from the database, the rest via typer.

Parsing any command with typer imports typer and, through it, pydantic (~0.3 s of start-up
here), and opening a ``DiskCacheStore`` imports diskcache and pydantic too. ``pipe cache
ls`` over 100,000 entries should answer in under a second in all (``scripts/
bench_cli_cache_ls.py``), so ``main`` answers it without either when it can:

- its arguments are only ``--stage``, ``--pipeline``, ``--sort`` (created, used or size) and
  ``--cache-dir``, each at most once, with a value that is not empty and does not start
  with ``-`` or ``~``;
- the cache directory exists and ``cache._quick.summary_columns`` can read it (a healthy
  store, no pending log, a complete ``Summaries`` table).

It then prints what ``pipe cache ls`` prints (the same functions build the table: see
``_listing.table_text``). In every other case, ``--help``, ``--json``, a bad ``--sort``, a
missing or damaged store, it has written nothing and the typer command runs as usual.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

#: ``pipe cache ls`` options ``_quick_ls`` answers (as ``_cli`` declares them).
_LS_OPTIONS = ("--stage", "--pipeline", "--sort", "--cache-dir")


def main() -> None:
    """Entry point of the ``pipe`` console script."""
    args = sys.argv[1:]
    if args[:2] == ["cache", "ls"]:
        try:
            if _quick_ls(args[2:]):
                return
        except KeyboardInterrupt:
            sys.stderr.write("Interrupted.\n")
            raise SystemExit(130) from None
    from ._cli import main as typer_main

    typer_main()


def _ls_options(args: Sequence[str]) -> dict[str, str] | None:
    """``--option value`` pairs of ``pipe cache ls``, or None for anything else."""
    options: dict[str, str] = {}
    rest = list(args)
    while rest:
        name, given, value = rest.pop(0).partition("=")
        if not given:
            if not rest:
                return None
            value = rest.pop(0)
        if name not in _LS_OPTIONS or name in options or not value or value[0] in "-~":
            return None
        options[name] = value
    return options


def _quick_ls(args: Sequence[str]) -> bool:
    """Print the ``pipe cache ls`` table if it can be read without typer and the store.

    Returns False, having printed nothing, when it cannot (see the module docstring).
    """
    from ._listing import SORTS, TABLE_FIELDS, gc_paused, table_text
    from .cache._layout import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
    from .cache._quick import summary_columns

    options = _ls_options(args)
    if options is None or options.get("--sort", "created") not in SORTS:
        return False
    directory = options.get("--cache-dir")
    if directory is None:
        directory = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
        if not directory or directory[0] == "~":
            return False
    path = Path(directory).absolute()
    if not path.is_dir():
        return False
    with gc_paused():
        columns = summary_columns(path, TABLE_FIELDS)  # the fields the table needs
        if columns is None:
            return False
        text = table_text(
            columns,
            stage=options.get("--stage"),
            pipeline=options.get("--pipeline"),
            sort=options.get("--sort", "created"),
        )
    sys.stdout.write(text + "\n")
    return True
