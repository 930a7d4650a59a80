"""The live view of ``pipe run``, and its final summary table.

On a terminal: a rich ``Live`` display with one line per stage (state, elapsed
time, and a progress bar with counts for FAN_OUT stages), refreshed from the run's
events. Off a terminal (CI logs, pipes): plain lines, one per state change, and a
plain summary, without any control codes. Only ``_cli`` imports this module, so
``import twinklr_pipe`` never imports rich.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ._events import (
    FanOutProgress,
    PipelineEvent,
    PoolWaited,
    RunStarted,
    StageFinished,
    StageStarted,
)
from ._results import PipelineResult

__all__ = ["LiveView", "render_summary"]

#: Display state of a stage, from its ``StageStatus`` value.
_FINAL = {
    "succeeded": "done",
    "cached": "cached",
    "failed": "failed",
    "skipped": "skipped",
    "cancelled": "cancelled",
}
_STYLE = {
    "waiting": "dim",
    "running": "bold cyan",
    "done": "green",
    "cached": "blue",
    "failed": "bold red",
    "skipped": "yellow",
    "cancelled": "magenta",
}
_ICON = {
    "waiting": "·",
    "running": "▶",
    "done": "✔",
    "cached": "◆",
    "failed": "✘",
    "skipped": "↷",
    "cancelled": "■",
}
#: Plain mode prints a FAN_OUT progress line at most this often per stage (seconds).
_PLAIN_PROGRESS_EVERY = 1.0


def _seconds(ms: float) -> str:
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


class _Row:
    __slots__ = (
        "cached",
        "done",
        "duration_ms",
        "error",
        "pool_wait_ms",
        "started",
        "state",
        "total",
    )

    def __init__(self) -> None:
        self.state = "waiting"
        self.started: float | None = None
        self.duration_ms: float | None = None
        self.done = 0
        self.total: int | None = None
        self.cached = 0
        self.error: str | None = None
        self.pool_wait_ms = 0.0

    def elapsed_ms(self, now: float) -> float | None:
        if self.duration_ms is not None:
            return self.duration_ms
        if self.started is not None:
            return (now - self.started) * 1000
        return None


class LiveView:
    """Shows a run's progress; pass ``on_event`` to the executor.

    Example::

        with LiveView(pipeline_stage_ids, live=sys.stdout.isatty()) as view:
            result = executor.run(pipeline, on_event=view.on_event)
        view.print_summary(result)

    Args:
        stage_ids: The pipeline's stage ids, in display order.
        live: Use the rich live display (a terminal); False prints plain lines.
        file: Where to write (default: stdout).
    """

    def __init__(
        self,
        stage_ids: list[str],
        *,
        live: bool | None = None,
        file: IO[str] | None = None,
    ) -> None:
        self.file = file if file is not None else sys.stdout
        self.live = self.file.isatty() if live is None else live
        self.rows = {sid: _Row() for sid in stage_ids}
        self.started = time.perf_counter()
        self._last_progress: dict[str, float] = {}
        self._width = max((len(s) for s in stage_ids), default=5)
        self.console = Console(
            file=self.file,
            force_terminal=self.live,
            no_color=not self.live,
            highlight=False,
            soft_wrap=not self.live,
        )
        self._live: Live | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> LiveView:
        if self.live:
            self._live = Live(
                self,
                console=self.console,
                refresh_per_second=8,
                transient=False,
                redirect_stderr=True,
                redirect_stdout=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.__exit__(None, None, None)

    # -- events --------------------------------------------------------------------------

    def on_event(self, event: PipelineEvent) -> None:
        """Update the view from one executor event."""
        now = time.perf_counter()
        if isinstance(event, RunStarted):
            self.started = now
            for sid in event.stage_ids:
                self.rows.setdefault(sid, _Row())
            return
        if isinstance(event, StageStarted):
            row = self._row(event.stage_id)
            row.state = "running"
            row.started = now
            self._plain(event.stage_id, "running")
        elif isinstance(event, FanOutProgress):
            row = self._row(event.stage_id)
            row.done, row.total, row.cached = event.done, event.total, event.cached
            last = self._last_progress.get(event.stage_id)
            if not self.live and (
                event.done == event.total or last is None or now - last >= _PLAIN_PROGRESS_EVERY
            ):
                self._last_progress[event.stage_id] = now
                self._plain(
                    event.stage_id,
                    "progress",
                    f"{event.done}/{event.total} items ({event.cached} cached)",
                )
        elif isinstance(event, PoolWaited):
            self._row(event.stage_id).pool_wait_ms += event.waited_ms
        elif isinstance(event, StageFinished):
            row = self._row(event.stage_id)
            row.state = _FINAL.get(str(event.status.value), str(event.status.value))
            row.duration_ms = event.duration_ms
            row.error = event.error
            detail = _seconds(event.duration_ms)
            if row.state == "cached" and event.saved_ms:
                detail += f"  (saved {_seconds(event.saved_ms)})"
            if row.total is not None:
                detail += f"  {row.done}/{row.total} items ({row.cached} cached)"
            if row.pool_wait_ms >= 1:
                detail += f"  (waited {_seconds(row.pool_wait_ms)} for pools)"
            if event.error and row.state in ("failed", "skipped"):
                detail += f"  {event.error}"
            self._plain(event.stage_id, row.state, detail)

    def _row(self, sid: str) -> _Row:
        row = self.rows.get(sid)
        if row is None:
            row = self.rows[sid] = _Row()
        return row

    def _plain(self, sid: str, state: str, detail: str = "") -> None:
        if self.live:
            return
        elapsed = time.perf_counter() - self.started
        line = f"[{elapsed:7.2f}s] {state:<9} {sid.ljust(self._width)}  {detail}".rstrip()
        self.file.write(line + "\n")
        self.file.flush()

    # -- the live display ------------------------------------------------------------------

    def __rich__(self) -> RenderableType:
        now = time.perf_counter()
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(justify="right", no_wrap=True)
        table.add_column(no_wrap=True)
        rows = list(self.rows.items())
        height = self.console.size.height - 3
        hidden = 0
        if len(rows) > height > 0:
            # Too many stages for the screen: running and failed ones first.
            rank = {"running": 0, "failed": 1, "cancelled": 2}
            keep = sorted(rows, key=lambda item: rank.get(item[1].state, 3))[: height - 1]
            kept = {sid for sid, _ in keep}
            hidden = len(rows) - len(kept)
            rows = [item for item in rows if item[0] in kept]
        for sid, row in rows:
            style = _STYLE.get(row.state, "")
            elapsed = row.elapsed_ms(now)
            progress: RenderableType = Text("")
            if row.total is not None:
                bar = ProgressBar(total=max(row.total, 1), completed=row.done, width=24)
                cached = f" ({row.cached} cached)" if row.cached else ""
                grid = Table.grid()
                grid.add_row(bar, Text(f" {row.done}/{row.total}{cached}"))
                progress = grid
            elif row.error and row.state == "failed":
                progress = Text(row.error.splitlines()[0][:80], style="red")
            elif row.pool_wait_ms >= 1:
                progress = Text(f"waited {_seconds(row.pool_wait_ms)} for pools", style="dim")
            table.add_row(
                Text(f"{_ICON.get(row.state, ' ')} {sid}", style=style),
                Text(row.state, style=style),
                Text(_seconds(elapsed) if elapsed is not None else ""),
                progress,
            )
        if hidden:
            states: dict[str, int] = {}
            for r in self.rows.values():
                states[r.state] = states.get(r.state, 0) + 1
            summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            return Group(table, Text(f"… {hidden} more stages ({summary})", style="dim"))
        return table

    # -- the end ---------------------------------------------------------------------------

    def print_summary(self, result: PipelineResult) -> None:
        """Print the summary table of a finished run."""
        summary = render_summary(result, fancy=self.live)
        if self.live:
            self.console.print(summary)
            return
        with self.console.capture() as captured:
            self.console.print(summary)
        lines = (line.rstrip() for line in captured.get().splitlines())
        self.file.write("\n".join(lines) + "\n")
        self.file.flush()


def render_summary(result: PipelineResult, *, fancy: bool = False) -> RenderableType:
    """The summary table: stage, status, duration, key prefix, time saved by cache hits.

    With ``fancy`` it has a box and colours (a terminal); otherwise plain columns.
    """
    table = Table(
        box=box.SIMPLE_HEAD if fancy else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if fancy else "",
    )
    table.add_column("STAGE", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("KEY", no_wrap=True)
    table.add_column("SAVED", justify="right", no_wrap=True)
    pooled = any(r.metadata.get("pool_wait_ms") for r in result.stage_results.values())
    if pooled:
        table.add_column("POOL WAIT", justify="right", no_wrap=True)
    saved_total = 0.0
    counts: dict[str, int] = {}
    for sid, res in result.stage_results.items():
        meta = res.metadata
        status = str(meta.get("status", "?"))
        counts[status] = counts.get(status, 0) + 1
        saved = float(meta.get("saved_ms") or 0.0)
        saved_total += saved
        items = meta.get("items")
        if items is not None:
            status_text = f"{status} ({meta.get('items_cached', 0)}/{items} cached)"
        else:
            status_text = status
        key = meta.get("key") or ""
        display = _FINAL.get(status, status)
        cells: list[RenderableType] = [
            sid,
            Text(status_text, style=_STYLE.get(display, "") if fancy else ""),
            _seconds(float(meta.get("duration_ms") or 0.0)),
            str(key)[:12],
            _seconds(saved) if saved else "",
        ]
        if pooled:
            waited = float(meta.get("pool_wait_ms") or 0.0)
            cells.append(_seconds(waited) if waited else "")
        table.add_row(*cells)
    parts = [f"{n} {status}" for status, n in counts.items()]
    verdict = "succeeded" if result.success else ("cancelled" if result.cancelled else "failed")
    footer = f"run {result.run_id} {verdict} in {_seconds(result.total_duration_ms)}: " + ", ".join(
        parts
    )
    if saved_total:
        footer += f"; cache hits saved {_seconds(saved_total)}"
    lines: list[RenderableType] = [table, Text(footer, style="bold" if fancy else "")]
    for sid in result.failed_stages:
        error = result.stage_results[sid].error or ""
        lines.append(Text(f"failed: {sid}: {error}", style="red" if fancy else ""))
    lines.extend(
        Text(f"error: {problem}", style="red" if fancy else "")
        for problem in result.metadata.get("errors") or []
    )
    return Group(*lines)
