"""The content-addressed stage cache.

Every stage output is hashed (``fingerprint``) and stored under a key made of the
stage's identity, version, configuration and the hashes of its inputs. See
``docs/caching.md`` for exactly what goes into a key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._entry import CacheStore as CacheStore
    from ._entry import EntryMeta as EntryMeta
    from ._fingerprint import FileInput as FileInput
    from ._fingerprint import fingerprint as fingerprint
    from ._store import DiskCacheStore as DiskCacheStore
    from ._store import MemoryStore as MemoryStore

# Imported on first use (PEP 562): importing one module of the package, as ``pipe cache
# ls`` imports ``_store``, does not import the fingerprinting (numpy probes, xxhash
# walkers) too. The imports above are what type checkers read.
_LAZY = {
    "CacheStore": "._entry",
    "DiskCacheStore": "._store",
    "EntryMeta": "._entry",
    "FileInput": "._fingerprint",
    "MemoryStore": "._store",
    "fingerprint": "._fingerprint",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'twinklr_pipe.cache' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheStore",
    "DiskCacheStore",
    "EntryMeta",
    "FileInput",
    "MemoryStore",
    "fingerprint",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
