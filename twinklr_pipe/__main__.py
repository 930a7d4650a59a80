"""``python -m twinklr_pipe``: the ``pipe`` command line."""

from __future__ import annotations

from ._main import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
