"""A vision replica's content-addressed cache of encoded images, bounded in bytes, least recently used out first.

What is cached is an image's `TileEmbeddings`: every tile's projections and, for `auto` images on Flash, the
router's p0. The 256/64 choice of `auto` tiles is not: its quantile spans all `auto` tiles of a request, so the
same image routes differently next to other images; `VisionEncoder.assemble` decides it per request from the
cached p0 and then only selects cached rows.

The key (`image_cache_key`) is a digest of the image's bytes as received (not the decoded pixels: the pixels are
a pure function of the bytes, and hashing bytes lets a hit skip decoding and tiling as well as the ViT), the
settings that shape the tiles (the effective tile cap, the encoded detail), and the encoder's identity (checkpoint
files, dtype, router thresholds). Changed bytes behind one URL therefore miss, and the same bytes behind two URLs
hit. A client's `uuid` names bytes seen before and their settings (`remember_uuid`), so a later part with only the
`uuid` finds the same embeddings; it never replaces the content digest, so a reused `uuid` with new bytes cannot
hit stale embeddings.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from dvd_serve.common.chat import Detail
from dvd_serve.vision_worker.encoder import TileEmbeddings

# Bumped whenever what a cached entry holds, or how it is computed, changes meaning.
CACHE_FORMAT = b"dvd-embedding-cache/1"
DIGEST_BYTES = 32
# Client uuids remembered per cached entry (a uuid names bytes; many uuids may name the same bytes).
UUIDS_PER_ENTRY = 4


def content_digest(data: bytes) -> bytes:
    """The digest of an image's bytes (BLAKE2b-256)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def encoder_identity(checkpoint: str | Path, dtype: str, thresholds: tuple[float, float] | None) -> bytes:
    """What makes two vision replicas' embeddings of the same tiles equal: the checkpoint's config and weight files
    (names, sizes, modification times), the compute dtype and the router thresholds."""
    hasher = hashlib.blake2b(CACHE_FORMAT, digest_size=DIGEST_BYTES)
    folder = Path(checkpoint)
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin", ".py")):
            stat = path.stat()
            hasher.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    config = folder / "config.json"
    if config.is_file():
        hasher.update(config.read_bytes())
    hasher.update(f"dtype={dtype};thresholds={thresholds}".encode())
    return hasher.digest()


def image_cache_key(digest: bytes, detail: Detail, max_tiles: int, identity: bytes) -> bytes:
    """The cache key of one image encoded with the given settings by the encoder `identity`."""
    hasher = hashlib.blake2b(digest, digest_size=DIGEST_BYTES)
    hasher.update(f"detail={detail.value};max_tiles={max_tiles};".encode())
    hasher.update(identity)
    return hasher.digest()


@dataclass(frozen=True, slots=True)
class UuidRecord:
    """What a client's `uuid` was last sent with: a part naming only the uuid gets exactly that image."""

    digest: bytes
    detail: Detail
    tile_cap: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since the replica started, and what the cache holds now."""

    hits: int
    misses: int
    evictions: int
    bytes_held: int
    entries: int
    budget_bytes: int


class EmbeddingCache:
    """LRU of `TileEmbeddings` by key within `budget_bytes`; a budget of 0 keeps nothing.

    An entry larger than the whole budget is not kept. Single-threaded: used from the replica's event loop.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, TileEmbeddings] = OrderedDict()
        self._uuids: OrderedDict[str, UuidRecord] = OrderedDict()
        self._bytes_held = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, key: bytes) -> TileEmbeddings | None:
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry

    def put(self, key: bytes, entry: TileEmbeddings) -> int:
        """Keeps `entry` under `key`; returns how many entries were evicted to make room."""
        size = entry.nbytes
        if size > self.budget_bytes:
            return 0
        previous = self._entries.pop(key, None)
        if previous is not None:
            self._bytes_held -= previous.nbytes
        evicted = 0
        while self._bytes_held + size > self.budget_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes_held -= oldest.nbytes
            evicted += 1
        self._entries[key] = entry
        self._bytes_held += size
        self._evictions += evicted
        return evicted

    def remember_uuid(self, uuid: str, sent: UuidRecord) -> None:
        """Records what the client's `uuid` names: the latest bytes sent with it, and the settings they had."""
        if self.budget_bytes == 0:
            return
        self._uuids.pop(uuid, None)
        self._uuids[uuid] = sent
        while len(self._uuids) > UUIDS_PER_ENTRY * max(len(self._entries), 1):
            self._uuids.popitem(last=False)

    def recall_uuid(self, uuid: str) -> UuidRecord | None:
        sent = self._uuids.get(uuid)
        if sent is not None:
            self._uuids.move_to_end(uuid)
        return sent

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits, misses=self._misses, evictions=self._evictions, bytes_held=self._bytes_held,
            entries=len(self._entries), budget_bytes=self.budget_bytes,
        )


def embedding_identity(key: bytes, tokens_per_tile: tuple[int, ...]) -> bytes:
    """Names one image's final embeddings: its cache key and the 256/64 choice of each tile. Sent with them to the
    language replica, which gives it to vLLM as the image's `multi_modal_uuids` entry (its prefix-cache key)."""
    hasher = hashlib.blake2b(key, digest_size=DIGEST_BYTES)
    hasher.update(bytes(1 if tokens == 64 else 0 for tokens in tokens_per_tile))
    return hasher.digest()
