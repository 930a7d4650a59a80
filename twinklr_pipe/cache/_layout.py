"""The layout of a ``DiskCacheStore``'s rows in diskcache's ``Cache`` table (see ``_store``)."""

from __future__ import annotations

from typing import Final

__all__: list[str] = []

META: Final = "m/"
PAYLOAD: Final = "p/"
#: ``w/<xxh3 of a pipeline name>``: the entry ids its last run used (``remember_run``).
WARM: Final = "w/"
#: Entry ids a warm set holds at most, and payload bytes ``warm_up`` keeps in memory.
WARM_MAX: Final = 20_000
WARM_BYTES: Final = 32 << 20
#: Upper bounds of the two key ranges: "0" is the character after "/".
META_END: Final = "m0"
PAYLOAD_END: Final = "p0"

MODE_RAW: Final = 1  # diskcache.core.MODE_RAW: bytes inline in the ``value`` column
MODE_BINARY: Final = 2  # diskcache.core.MODE_BINARY: bytes in a file named by ``filename``

#: Inline payloads up to this size are read along with ``variants``.
PREFETCH_BYTES: Final = 8192
