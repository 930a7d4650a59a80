"""Fixtures of the reliability suite, and its figures at the end of the session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.pipelines import TALLY, Zygote

#: When set, the figures are also written to this JSON file (for docs/reliability.md).
REPORT_ENV = "TWINKLR_RELIABILITY_REPORT"


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """One pre-imported worker process that forks a child per job."""
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.counts:
        return
    terminalreporter.section("reliability figures")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(
            json.dumps({"counts": TALLY.counts, "wrong_outputs": TALLY.wrong_outputs}, indent=2)
        )
