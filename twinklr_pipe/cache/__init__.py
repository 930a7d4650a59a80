"""The content-addressed stage cache.

Every stage output is hashed (``fingerprint``) and stored under a key made of the
stage's identity, version, configuration and the hashes of its inputs. See
``docs/caching.md`` for exactly what goes into a key.
"""

from __future__ import annotations

from ._entry import CacheStore as CacheStore
from ._entry import EntryMeta as EntryMeta
from ._fingerprint import FileInput as FileInput
from ._fingerprint import fingerprint as fingerprint
from ._store import DiskCacheStore as DiskCacheStore
from ._store import MemoryStore as MemoryStore

__all__ = [
    "CacheStore",
    "DiskCacheStore",
    "EntryMeta",
    "FileInput",
    "MemoryStore",
    "fingerprint",
]
