"""Managing caches and runs from Python: what the ``pipe`` command calls.

Every ``pipe`` command is a thin layer over a function here, so the same
operations are available to scripts and tests without a terminal::

    from twinklr_pipe.admin import clear_entries, list_entries, open_store

    store = open_store(".twinklr-cache")
    for row in list_entries(store, stage="macro"):
        print(row.key[:8], row.size_bytes)
"""

from __future__ import annotations

from ._admin import DEFAULT_CACHE_DIR as DEFAULT_CACHE_DIR
from ._admin import DoctorReport as DoctorReport
from ._admin import EntryRow as EntryRow
from ._admin import Finding as Finding
from ._admin import GcReport as GcReport
from ._admin import accept_stage as accept_stage
from ._admin import clear_entries as clear_entries
from ._admin import doctor as doctor
from ._admin import find_entry as find_entry
from ._admin import gc_entries as gc_entries
from ._admin import graph_text as graph_text
from ._admin import list_entries as list_entries
from ._admin import open_store as open_store
from ._admin import parse_duration as parse_duration
from ._admin import parse_size as parse_size
from ._admin import result_to_dict as result_to_dict
from ._journal import InputSpec as InputSpec
from ._journal import RunRecord as RunRecord
from ._journal import list_runs as list_runs
from ._journal import load_run as load_run
from ._journal import run_journalled as run_journalled
from ._loader import load_pipeline as load_pipeline

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DoctorReport",
    "EntryRow",
    "Finding",
    "GcReport",
    "InputSpec",
    "RunRecord",
    "accept_stage",
    "clear_entries",
    "doctor",
    "find_entry",
    "gc_entries",
    "graph_text",
    "list_entries",
    "list_runs",
    "load_pipeline",
    "load_run",
    "open_store",
    "parse_duration",
    "parse_size",
    "result_to_dict",
    "run_journalled",
]
