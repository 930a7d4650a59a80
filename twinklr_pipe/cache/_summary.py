"""``EntrySummary``: the light view of an entry's metadata that listing needs.

Kept apart from ``_entry`` (pydantic's ``EntryMeta``) so that code working only with
summaries, such as the text table of ``pipe cache ls``, imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ._entry import EntryMeta

__all__ = ["EntrySummary"]


class EntrySummary(NamedTuple):
    """The fields of an entry that listing, ``cache clear`` and ``cache gc`` need.

    A light ``EntryMeta`` (no input hashes, configuration, metrics or state), so that
    ``pipe cache ls`` can list 100,000 entries without decoding them. Stores that
    have it return these from ``iter_summaries()``; ``EntrySummary.of(meta)`` makes
    one from full metadata.
    """

    key: str
    variant: str
    pipeline: str
    stage_id: str
    stage_identity: str
    version: str
    version_is_source_hash: bool
    item_index: int | None
    codec: str
    size_bytes: int
    created_at: float
    last_used_at: float
    compute_duration_ms: float
    run_id: str

    @property
    def entry_id(self) -> str:
        """``key.variant``, the id the entry is stored under."""
        return f"{self.key}.{self.variant}"

    @classmethod
    def of(cls, meta: EntryMeta) -> EntrySummary:
        """The summary of a full metadata record."""
        return cls(*(getattr(meta, name) for name in cls._fields))
