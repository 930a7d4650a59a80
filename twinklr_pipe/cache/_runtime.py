"""The cache as one run of the executor sees it: lookup, single-flight, save, replay.

The executor calls into ``CacheRuntime`` from ``_Run._invoke`` only; this is the
one place that reads and writes entries during a run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import xxhash

from .._context import _MISSING as _ABSENT_READ
from .._context import DELETED
from ..errors import CodecError, FingerprintError, StoreError
from ._codec import _TAG_MARK, BYTES, JSON, decode, decode_json_tree, encode, encode_json_tree
from ._entry import CacheStore, EntryMeta
from ._fingerprint import digest, fingerprint
from ._keys import StageParts, compute_key, stage_parts
from ._store import DiskCacheStore, EntryHead

if TYPE_CHECKING:
    from .._context import PipelineContext, StateRecorder
    from .._definition import StageDefinition

__all__ = ["CacheRuntime", "Hit", "KeyInfo", "reads_match"]

logger = logging.getLogger("twinklr_pipe")

#: Payloads larger than this are read in a worker thread, not on the event loop.
_INLINE_READ_BYTES = 1 << 20

#: ``known_keys`` is read at the start of a run when the store holds fewer entries.
_KNOWN_KEYS_LIMIT = 50_000

#: Worker threads that may wait at once for cross-process key locks (``dedupe``).
_LOCK_WAITERS = 16

#: A hit records its use only when the entry's last use is older than this (seconds):
#: re-runs a few seconds apart do not rewrite every entry's access time.
TOUCH_RESOLUTION_S = 60.0

#: Fingerprint recorded for a state key that was absent when read.
MISSING_STATE = xxhash.xxh3_128_hexdigest(b"\x00twinklr_pipe:missing-state-key")
_ABSENT: Any = object()


class KeyInfo:
    """A computed key and the input hashes that went into it (stored for explanations)."""

    __slots__ = ("input_hashes", "input_names", "item_fingerprint", "key")

    def __init__(
        self,
        key: str,
        input_names: list[str],
        input_hashes: list[str],
        item_fingerprint: str | None,
    ) -> None:
        self.key = key
        self.input_names = input_names
        self.input_hashes = input_hashes
        self.item_fingerprint = item_fingerprint


class Hit:
    """A usable entry: its metadata, the decoded value and the value's 16-byte digest."""

    __slots__ = ("digest", "meta", "value")

    def __init__(self, meta: EntryMeta | EntryHead, value: Any, value_digest: bytes) -> None:
        self.meta = meta
        self.value = value
        self.digest = value_digest


def state_fingerprint(state: dict[str, Any], key: str) -> str:
    """What a recorded read of ``key`` is compared against (``"*"``: the whole state)."""
    if key == "*":
        return fingerprint(dict(dict.items(state)))
    value = dict.get(state, key, _ABSENT)
    return MISSING_STATE if value is _ABSENT else fingerprint(value)


def reads_match(reads: dict[str, str], state: dict[str, Any]) -> bool:
    """Whether every recorded state read still sees the same value."""
    for key, expected in reads.items():
        try:
            if state_fingerprint(state, key) != expected:
                return False
        except FingerprintError:
            return False
    return True


class CacheRuntime:
    """Cache operations for one run of one pipeline."""

    def __init__(
        self,
        store: CacheStore,
        *,
        pipeline: str,
        run_id: str,
        allow_pickle: bool = False,
        dedupe: bool = False,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.run_id = run_id
        self.allow_pickle = allow_pickle
        self.dedupe = dedupe
        self._parts: dict[int, tuple[Any, StageParts]] = {}
        #: Keys being computed by a task of this run -> None, or an Event its waiters wait on.
        self._flights: dict[str, anyio.Event | None] = {}
        #: Keys whose inline lookup left a large entry for a worker thread to read.
        self._deferred: set[str] = set()
        self._touched: dict[str, None] = {}
        self._limiter = anyio.CapacityLimiter(4)
        # Threads blocked on another process's key lock (dedupe) must never take the
        # store's threads: the lock holders need those to save and release.
        self._lock_waits = anyio.CapacityLimiter(_LOCK_WAITERS)
        self._store_error_logged = False
        self._hit_candidates: Callable[[str], list[tuple[EntryHead, bytes]] | None] | None = (
            store._hit_candidates if isinstance(store, DiskCacheStore) else None
        )
        disk = store if isinstance(store, DiskCacheStore) else None
        self._try_put: Callable[[EntryMeta, bytes], bool] | None = (
            disk.try_put if disk is not None else None
        )
        self._put_pending: Callable[[EntryMeta, bytes], bool] | None = (
            disk.put_pending if disk is not None else None
        )
        self._pending = False
        #: ``warm_up``'s entries by key (consumed by lookups), and the ids it held.
        self._warm: dict[str, list[tuple[EntryHead, bytes]]] = {}
        self._warm_ids: list[str] = []
        #: Entry ids this run served or stored, in order (``remember_run``).
        self._used_ids: list[str] = []
        #: The keys the store held at the start (with few entries), plus those stored since.
        self._known: set[str] | None = None
        self.hits = 0
        self.stored = 0
        self.saved_ms = 0.0
        self.saved_metrics: dict[str, float] = {}
        self.store_errors = 0

    # -- keys -----------------------------------------------------------------------------

    def stage_parts(self, sdef: StageDefinition) -> StageParts:
        """Key parts of a stage, computed once per run."""
        found = self._parts.get(id(sdef.stage))
        if found is not None and found[0] is sdef.stage:
            return found[1]
        parts = stage_parts(sdef.stage, sdef.id)
        self._parts[id(sdef.stage)] = (sdef.stage, parts)
        return parts

    def key(
        self,
        parts: StageParts,
        names: Sequence[str],
        digests: Sequence[bytes],
        item_digest: bytes | None = None,
    ) -> KeyInfo:
        """Key of a stage whose inputs ``names`` (``[]``: the initial input) hash to ``digests``.

        Input names are part of the key only for multi-input stages, which receive
        a dict keyed by them.
        """
        hashes = [d.hex() for d in digests]
        key = compute_key(parts, tuple(names) if len(names) > 1 else None, hashes)
        return KeyInfo(
            key,
            list(names) or ["<initial input>"],
            hashes,
            item_digest.hex() if item_digest is not None else None,
        )

    # -- lookup -----------------------------------------------------------------------------

    def lookup(self, key: str, context: PipelineContext, stage_id: str) -> Hit | None:
        """Find a usable entry for ``key`` (on the event loop: small payloads only)."""
        return self._lookup(key, context, stage_id, inline=True)

    async def lookup_async(self, key: str, context: PipelineContext, stage_id: str) -> Hit | None:
        """Find a usable entry for ``key``, reading payloads in a worker thread."""
        return await anyio.to_thread.run_sync(
            self._lookup, key, context, stage_id, False, limiter=self._limiter
        )

    def _lookup(
        self, key: str, context: PipelineContext, stage_id: str, inline: bool
    ) -> Hit | None:
        state = context.state
        refused: set[str] = set()  # entries judged unusable: not judged (nor warned) twice
        warm = self._warm.pop(key, None) if self._warm else None
        if warm is None and inline and self._known is not None and key not in self._known:
            return None  # not in the store when the run started, nor stored by it since
        if warm is not None:
            # Read at the start of the run (the entries the last run used); nothing usable
            # among them: ask the database below.
            hit = self._first_usable(warm, state, stage_id, refused)
            if hit is not None:
                return hit
        if self._hit_candidates is not None:
            # The hot path: one statement, payloads included and checksummed. None means
            # something is unusual about the rows: the full path below deals with it.
            try:
                candidates = self._hit_candidates(key)
            except StoreError as exc:
                self._store_failed("read", exc)
                return None
            if candidates is not None:
                return self._first_usable(candidates, state, stage_id, refused)
        try:
            variants = self.store.variants(key)
        except StoreError as exc:
            self._store_failed("read", exc)
            return None
        for meta in variants:
            if meta.entry_id in refused:
                continue
            if meta.state_reads and not reads_match(meta.state_reads, state):
                continue
            if inline and meta.size_bytes > _INLINE_READ_BYTES:
                self._deferred.add(key)
                return None  # read it in a thread (lookup_async)
            hit = self._load(meta, stage_id)
            if hit is not None:
                return self._used(hit)
        return None

    def _first_usable(
        self,
        candidates: list[tuple[EntryHead, bytes]],
        state: dict[str, Any],
        stage_id: str,
        refused: set[str],
    ) -> Hit | None:
        for head, payload in candidates:
            if head.entry_id in refused:
                continue
            if head.state_reads and not reads_match(head.state_reads, state):
                continue
            hit = self._verified(head, payload, stage_id)
            if hit is not None:
                return self._used(hit)
            refused.add(head.entry_id)
        return None

    def _used(self, hit: Hit) -> Hit:
        """Count a hit: what it saved, and its use (recorded at the end of the run)."""
        meta = hit.meta
        self._used_ids.append(meta.entry_id)
        if time.time() - meta.last_used_at >= TOUCH_RESOLUTION_S:
            self._touched[meta.entry_id] = None
        self.hits += 1
        self.saved_ms += meta.compute_duration_ms
        for name, value in meta.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.saved_metrics[name] = self.saved_metrics.get(name, 0) + value
        return hit

    def _load(self, meta: EntryMeta, stage_id: str) -> Hit | None:
        try:
            got = self.store.get(meta.entry_id)
        except StoreError as exc:
            self._store_failed("read", exc)
            return None
        if got is None:
            return None
        return self._verified(got[0], got[1], stage_id)

    def _verified(self, meta: EntryMeta | EntryHead, payload: bytes, stage_id: str) -> Hit | None:
        """Decode a payload that passed its checksum; serve it only if it is what was stored."""
        try:
            value = decode(meta.codec, payload, allow_pickle=self.allow_pickle)
        except CodecError as exc:
            logger.warning(
                "Cached entry %s of stage '%s' cannot be used (%s); recomputing",
                meta.key[:8],
                stage_id,
                exc,
            )
            if not meta.codec.startswith("pickle"):
                self._evict(meta)
            return None
        if meta.codec.startswith("pickle"):
            # Pickled values may not be fingerprintable; the payload checksum (verified
            # by the store) and the hash recorded at save time stand for the content.
            return Hit(meta, value, bytes.fromhex(meta.output_hash))
        if (meta.codec == BYTES or (meta.codec == JSON and _TAG_MARK not in payload)) and (
            xxhash.xxh3_128_hexdigest(payload) == meta.payload_checksum
        ):
            # Bytes and untagged JSON decode to exactly the value that was encoded (the
            # codec refuses subclasses), and these are the very bytes encoded from the
            # output whose hash was recorded: re-hashing the value (a second for 100,000
            # dicts) would prove nothing more. Models and other tagged values are re-hashed.
            try:
                stored = bytes.fromhex(meta.output_hash)
            except ValueError:
                stored = b""  # a damaged output hash: the comparison below evicts the entry
            if len(stored) == 16:
                return Hit(meta, value, stored)
        try:
            value_digest = digest(value)
        except FingerprintError:
            value_digest = b""
        if value_digest.hex() != meta.output_hash:
            # Schema drift (a model gained a default field) or damage that still decodes:
            # the value is not what was stored, so it must not be served.
            logger.warning(
                "Cached entry %s of stage '%s' decodes to a different value than it stored "
                "(did its output class change?); recomputing",
                meta.key[:8],
                stage_id,
            )
            self._evict(meta)
            return None
        return Hit(meta, value, value_digest)

    def _evict(self, meta: EntryMeta | EntryHead) -> None:
        with contextlib.suppress(StoreError):
            self.store.delete(meta.entry_id)

    def replay(self, hit: Hit, context: PipelineContext) -> None:
        """Apply the state writes recorded with an entry, as if the stage had run."""
        state = context.state
        for name, tree in hit.meta.state_writes.items():
            if tree == {"deleted": True}:
                dict.pop(state, name, None)
            else:
                dict.__setitem__(state, name, decode_json_tree(tree["value"]))

    # -- single flight ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def single_flight(self, key: str) -> AsyncIterator[bool]:
        """Identical work in flight runs once: later arrivals wait, then find the entry.

        Enter it right after an inline ``lookup`` of ``key`` that missed, with no await in
        between. It yields whether the store must be consulted again (``lookup_async``):
        another task of this run held the key, the inline lookup left a large entry for a
        thread, or a cross-process lock was taken. Otherwise that lookup is still current:
        an entry stored by this run is stored before its task releases the key.
        """
        recheck = key in self._deferred
        self._deferred.discard(key)
        flights = self._flights
        while key in flights:  # another task of this run holds the key: wait for it
            recheck = True
            done = flights[key]
            if done is None:
                done = flights[key] = anyio.Event()
            await done.wait()
        flights[key] = None  # held; a waiter puts an Event here for the holder to set
        try:
            if not self.dedupe:
                yield recheck
                return
            file_lock = getattr(self.store, "lock", None)
            if file_lock is None:
                yield recheck
                return
            held = file_lock(key)
            await anyio.to_thread.run_sync(held.__enter__, limiter=self._lock_waits)
            try:
                yield True
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(held.__exit__, None, None, None)
        finally:
            done = flights.pop(key)
            if done is not None:
                done.set()

    # -- save -------------------------------------------------------------------------------

    async def save(
        self,
        info: KeyInfo,
        sdef: StageDefinition,
        output: Any,
        recorder: StateRecorder,
        *,
        item_index: int | None,
        duration_ms: float,
    ) -> tuple[bytes, str | None]:
        """Encode, hash and store a successful output; return its digest and entry id.

        Raises ``CodecError`` (output cannot be stored) or ``FingerprintError`` (output
        cannot be hashed). A failing store is logged once per run, not raised: the
        result is returned uncached.
        """
        try:
            codec, payload = encode(output, allow_pickle=self.allow_pickle)
        except CodecError as exc:
            raise CodecError(f"Stage '{sdef.id}': {exc}") from None
        if codec.startswith("pickle"):
            value_digest = xxhash.xxh3_128_digest(b"pickle\x00" + payload)
        else:
            try:
                value_digest = digest(output)
            except FingerprintError as exc:
                raise FingerprintError(exc.value_type, f"output ({exc.where})", sdef.id) from None
        entry = self._entry_meta(
            info, sdef, codec, payload, value_digest, recorder, item_index, duration_ms
        )
        if entry is None:
            return value_digest, None
        try:
            # Small entries go to the store's pending log (one write; the store moves them
            # into the database in batches) or, when it declines, into the database right
            # here if it is free: a write takes about as long as a round trip to a thread.
            # With ``dedupe``, another process waiting on the key lock must find the entry
            # in the database once the lock is released: no pending log.
            if (
                self._put_pending is not None
                and not self.dedupe
                and self._put_pending(entry, payload)
            ):
                self._pending = True
            elif self._try_put is None or not self._try_put(entry, payload):
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(
                        self.store.put, entry, payload, limiter=self._limiter
                    )
        except StoreError as exc:
            self._store_failed("write", exc)
            return value_digest, None
        self.stored += 1
        self._used_ids.append(entry.entry_id)
        if self._known is not None:
            self._known.add(entry.key)
        return value_digest, entry.entry_id

    def _entry_meta(
        self,
        info: KeyInfo,
        sdef: StageDefinition,
        codec: str,
        payload: bytes,
        value_digest: bytes,
        recorder: StateRecorder,
        item_index: int | None,
        duration_ms: float,
    ) -> EntryMeta | None:
        reads: dict[str, str] = {}
        try:
            for name, value in recorder.reads.items():
                if name == "*":
                    reads["*"] = fingerprint(value)
                else:
                    reads[str(name)] = (
                        MISSING_STATE if value is _ABSENT_READ else fingerprint(value)
                    )
        except FingerprintError as exc:
            logger.warning(
                "Stage '%s' read context state of type %s that cannot be fingerprinted; "
                "its result is not cached",
                sdef.id,
                exc.value_type.__qualname__,
            )
            return None
        writes: dict[str, Any] = {}
        try:
            for name, value in recorder.writes.items():
                writes[str(name)] = (
                    {"deleted": True} if value is DELETED else {"value": encode_json_tree(value)}
                )
        except CodecError as exc:
            logger.warning(
                "Stage '%s' wrote context state the cache cannot store (%s); "
                "its result is not cached",
                sdef.id,
                exc,
            )
            return None
        parts = self.stage_parts(sdef)
        now = time.time()
        metrics = {
            k: v
            for k, v in recorder.metrics.items()
            if isinstance(v, int | float | str | bool) or v is None
        }
        return EntryMeta(
            key=info.key,
            variant=fingerprint(reads) if reads else "0",
            pipeline=self.pipeline,
            stage_id=sdef.id,
            stage_identity=parts.identity,
            version=parts.version,
            version_is_source_hash=parts.version_is_source_hash,
            config_fingerprint=parts.config_fingerprint,
            config_fields=parts.config_fields,
            input_names=info.input_names,
            input_hashes=info.input_hashes,
            item_fingerprint=info.item_fingerprint,
            item_index=item_index,
            output_hash=value_digest.hex(),
            codec=codec,
            payload_checksum=xxhash.xxh3_128_hexdigest(payload),
            size_bytes=len(payload),
            created_at=now,
            last_used_at=now,
            compute_duration_ms=float(duration_ms),
            metrics=metrics,
            run_id=self.run_id,
            state_reads=reads,
            state_writes=writes,
        )

    def _store_failed(
        self,
        action: str,
        exc: StoreError,
        outcome: str = "results of this run are returned uncached",
    ) -> None:
        self.store_errors += 1
        if not self._store_error_logged:
            self._store_error_logged = True
            logger.warning(
                "Cache %s failed (%s); %s (further store errors in this run are not logged)",
                action,
                exc,
                outcome,
            )

    # -- end of run -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read what the last run of this pipeline used (``DiskCacheStore.warm_up``), and
        which keys the store holds when it holds few (``DiskCacheStore.known_keys``)."""
        store = self.store
        if isinstance(store, DiskCacheStore):
            self._warm, known = await anyio.to_thread.run_sync(self._start, store)
            self._warm_ids = [h.entry_id for found in self._warm.values() for h, _ in found]
            # With ``dedupe``, a key another process is computing must be waited for.
            self._known = None if self.dedupe else known

    def _start(
        self, store: DiskCacheStore
    ) -> tuple[dict[str, list[tuple[EntryHead, bytes]]], set[str] | None]:
        return store.warm_up(self.pipeline), store.known_keys(_KNOWN_KEYS_LIMIT)

    async def finish(self) -> None:
        """Store what waits in the pending log, record which entries this run used."""
        self._warm = {}
        pending, self._pending = self._pending, False
        touched = list(self._touched)
        self._touched.clear()
        used = self._used_ids
        remember = used if set(used) != set(self._warm_ids) else []
        if pending or touched or remember:
            await anyio.to_thread.run_sync(self._finish, pending, touched, remember)

    def _finish(self, pending: bool, touched: list[str], remember: list[str]) -> None:
        """``finish``'s writes, in one worker thread."""
        store = self.store
        if pending and isinstance(store, DiskCacheStore):
            try:
                store.flush()
            except StoreError as exc:
                self._store_failed(
                    "write",
                    exc,
                    "what the database refused waits in the cache's pending log, and is "
                    "stored when the cache is next opened",
                )
        try:
            if touched:
                store.touch(touched, time.time())
            if remember and isinstance(store, DiskCacheStore):
                store.remember_run(self.pipeline, remember)
        except StoreError as exc:
            self._store_failed("write", exc)

    def summary(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "stored": self.stored,
            "saved_ms": self.saved_ms,
            "saved_metrics": dict(self.saved_metrics),
            "store_errors": self.store_errors,
        }
