"""The metadata of one cache entry and the ``CacheStore`` protocol."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from ._layout import CACHE_FORMAT_VERSION as CACHE_FORMAT_VERSION
from ._summary import EntrySummary as EntrySummary

__all__ = ["CacheStore", "EntryMeta", "EntrySummary", "entry_id"]


def entry_id(key: str, variant: str) -> str:
    """The id an entry is stored under: its key plus the variant of its state reads."""
    return f"{key}.{variant}"


class EntryMeta(BaseModel):
    """Everything recorded about one stored stage output (or one FAN_OUT item).

    The key's parts are stored so a later miss can be explained part by part.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: str
    #: Fingerprint of the recorded state reads ("0" when the stage read no state).
    variant: str = "0"
    pipeline: str = ""
    stage_id: str = ""
    stage_identity: str = ""
    version: str = ""
    #: True when ``version`` is a source hash rather than an explicit version.
    version_is_source_hash: bool = False
    config_fingerprint: str = ""
    config_fields: dict[str, str] = Field(default_factory=dict)
    input_names: list[str] = Field(default_factory=list)
    input_hashes: list[str] = Field(default_factory=list)
    #: For a FAN_OUT item: fingerprint of the item, and its index in the run that stored it.
    item_fingerprint: str | None = None
    item_index: int | None = None
    output_hash: str = ""
    codec: str = ""
    payload_checksum: str = ""
    size_bytes: int = 0
    created_at: float = 0.0
    last_used_at: float = 0.0
    compute_duration_ms: float = 0.0
    #: What the stage added to ``context.metrics`` while it ran (tokens, calls…).
    metrics: dict[str, Any] = Field(default_factory=dict)
    run_id: str = ""
    #: state key -> fingerprint of the value read (``state_missing_fp`` when absent).
    state_reads: dict[str, str] = Field(default_factory=dict)
    #: state key -> codec-encoded value (tagged JSON) written by the stage; None means deleted.
    state_writes: dict[str, Any] = Field(default_factory=dict)

    @property
    def entry_id(self) -> str:
        return entry_id(self.key, self.variant)


@runtime_checkable
class CacheStore(Protocol):
    """Where cache entries live. ``DiskCacheStore`` is the default implementation.

    Every method is synchronous and thread-safe; the executor calls the slow ones
    from worker threads. An entry is a metadata record plus opaque payload bytes,
    written together atomically: readers see the whole entry or none of it.

    Optional methods, used when a store has them (both built-in stores do):

    * ``iter_summaries() -> Iterator[EntrySummary]``: every entry's summary, in no
      particular order, agreeing with ``iter_metadata()`` field by field. Listing,
      ``cache clear`` and ``cache gc`` use it; without it they derive summaries
      from ``iter_metadata()`` (correct, slower on large stores).
    * ``lock(key) -> AbstractContextManager[None]``: an exclusive lock on ``key``, so
      that identical work in several processes runs once.
    """

    def get(self, entry_id: str) -> tuple[EntryMeta, bytes] | None:
        """Return an entry's metadata and payload, or None when absent or unreadable."""
        ...

    def get_meta(self, entry_id: str) -> EntryMeta | None:
        """Return an entry's metadata without reading its payload."""
        ...

    def variants(self, key: str) -> list[EntryMeta]:
        """Metadata of every stored variant of ``key``, most recently used first."""
        ...

    def put(self, meta: EntryMeta, payload: bytes) -> None:
        """Store an entry atomically, replacing one with the same entry id."""
        ...

    def delete(self, entry_id: str) -> bool:
        """Remove an entry; return whether it existed."""
        ...

    def touch(self, entry_ids: Iterable[str], when: float) -> None:
        """Set ``last_used_at`` of the given entries (missing ones are ignored)."""
        ...

    def iter_metadata(self) -> Iterator[EntryMeta]:
        """Every entry's metadata, in no particular order."""
        ...

    def size(self) -> int:
        """Total size in bytes of the stored payloads."""
        ...

    def close(self) -> None:
        """Release files and connections."""
        ...
