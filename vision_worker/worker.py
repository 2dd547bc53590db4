"""VisionWorker: all the vision work of a request, from image references to embeddings at a language replica.

Per request: fetch every image concurrently and look its bytes up in the replica's embedding cache; decode, tile
and normalise the images it lacks (thread pool) and encode them together with other requests' images (dynamic
batching); route the request's tiles (ViR, per request, from cached or fresh p0); then push each image's embeddings
to the language replica chosen for the request over the gRPC hop, under an identity that lets vLLM's prefix cache
recognise them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from dvd_serve.common.chat import Detail, ImagePart
from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import InvalidRequestError, ServingError
from dvd_serve.vision_worker.batcher import BatchingConfig, VisionBatcher
from dvd_serve.vision_worker.embedding_cache import (
    EmbeddingCache,
    UuidRecord,
    content_digest,
    embedding_identity,
    encoder_identity,
    image_cache_key,
)
from dvd_serve.vision_worker.embedding_sender import EmbeddingSender, EmbeddingSenderConfig
from dvd_serve.vision_worker.encoder import (
    EncodedImage,
    EncodeRequest,
    TileEmbeddings,
    VisionEncoder,
    VisionEncoderConfig,
)
from dvd_serve.vision_worker.image_decode import DecodeLimits, decode_image
from dvd_serve.vision_worker.image_source import load_image_bytes
from dvd_serve.vision_worker.preprocess import ImagePreprocessor
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig


class VisionWorkerConfig(FrozenConfig):
    """One vision replica."""

    encoder: VisionEncoderConfig = Field(description="Checkpoint, dtype and device of the vision model.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching across requests.")
    decode: DecodeLimits = Field(default_factory=DecodeLimits, description="Accepted formats and size limits.")
    fetch: UrlFetchConfig = Field(default_factory=UrlFetchConfig, description="SSRF guard and caps for http(s) URLs.")
    preprocess_threads: int = Field(default=2, ge=1, description="Threads tiling and normalising images.")
    max_tiles_per_image: int | None = Field(
        default=None,
        ge=1,
        description="Most grid tiles (thumbnail excluded) any image is cut into, also when the request names no "
        "`max_tiles`; None = the checkpoint's own maximum (max_dynamic_patch).",
    )
    push_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one embedding push.")
    cache_mib: float = Field(
        default=1024.0, ge=0.0,
        description="Host memory (MiB) for this replica's cache of encoded images, keyed by their bytes and "
        "settings; repeated images skip decoding, tiling and the ViT. 0 turns it off.",
    )
    grpc_auth_token: str | None = Field(default=None, description="Token presented to language replicas' sinks.")


@dataclass(slots=True)
class VisionOutcome:
    """What the vision side did for one request."""

    tokens_per_image: list[int] = field(default_factory=list)
    tokens_per_tile: list[tuple[int, ...]] = field(default_factory=list)
    fetch_decode_s: float = 0.0
    preprocess_s: float = 0.0
    queue_wait_s: float = 0.0
    encode_s: float = 0.0
    batch_tiles: int = 0
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    cache_hits: int = 0  # images found in the replica's embedding cache
    cache_misses: int = 0  # images not in the cache (encoded; a repeat within the request is encoded once)
    cache_in_flight: int = 0  # images another request was encoding at that moment (this one waited for it)
    cache_evictions: int = 0  # entries this request's images pushed out
    cache_bytes_held: int = 0  # what the replica's cache held when the request was done


@dataclass(frozen=True, slots=True)
class _Source:
    """An image's bytes (None: a `uuid` alone named them), their content digest and the settings they are encoded
    with."""

    data: bytes | None
    digest: bytes
    detail: Detail
    tile_cap: int


class VisionWorker:
    def __init__(self, config: VisionWorkerConfig, encoder: VisionEncoder) -> None:
        self.config = config
        self.encoder = encoder
        self.spec = encoder.spec
        self._preprocessor = ImagePreprocessor.from_spec(self.spec, num_threads=config.preprocess_threads)
        self._batcher = VisionBatcher(encoder.encode_tiles, config.batching)
        self.cache = EmbeddingCache(int(config.cache_mib * 2**20))
        self._identity = encoder_identity(config.encoder.model, str(encoder.dtype), encoder.router_thresholds)
        self._senders: dict[str, EmbeddingSender] = {}
        self._in_flight: dict[bytes, asyncio.Future] = {}  # cache key -> the encoding of it now running

    @classmethod
    def load(cls, config: VisionWorkerConfig) -> "VisionWorker":
        return cls(config, VisionEncoder.from_config(config.encoder))

    async def encode(self, images: Sequence[ImagePart], outcome: VisionOutcome | None = None) -> list[EncodedImage]:
        """Image references -> embeddings, without sending them anywhere (used by the coupled topology)."""
        return [image for image, _ in await self.encode_named(images, outcome)]

    async def process(self, request_id: str, images: Sequence[ImagePart], lm_address: str) -> VisionOutcome:
        """Encode `images` and push them to the language replica at `lm_address` under `request_id`."""
        outcome = VisionOutcome()
        encoded = await self.encode_named(images, outcome)
        sender = self._sender(lm_address)
        started = time.monotonic()
        await asyncio.gather(*(
            sender.push(request_id, index, image.embeddings, image.tokens_per_tile, timeout=self.config.push_timeout_s,
                        content_hash=identity)
            for index, (image, identity) in enumerate(encoded)
        ))
        outcome.transfer_s = time.monotonic() - started
        outcome.transfer_bytes = sum(image.embeddings.numel() * image.embeddings.element_size() for image, _ in encoded)
        return outcome

    async def encode_named(
        self, images: Sequence[ImagePart], outcome: VisionOutcome | None
    ) -> list[tuple[EncodedImage, bytes]]:
        """Each image's embeddings and their identity (`embedding_identity`), from the cache where it has them."""
        outcome = outcome if outcome is not None else VisionOutcome()
        started = time.monotonic()
        sources = await asyncio.gather(*(self._source(part) for part in images))
        keys = [image_cache_key(source.digest, source.detail, source.tile_cap, self._identity) for source in sources]
        found = await self._tile_embeddings(images, sources, keys, outcome, started)
        encoded = self.encoder.assemble([found[key] for key in keys], [source.detail for source in sources])
        outcome.tokens_per_tile = [image.tokens_per_tile for image in encoded]
        outcome.tokens_per_image = [int(image.embeddings.shape[0]) for image in encoded]
        outcome.cache_bytes_held = self.cache.stats().bytes_held
        return [
            (image, embedding_identity(key, image.tokens_per_tile))
            for image, key in zip(encoded, keys, strict=True)
        ]

    async def _tile_embeddings(self, images: Sequence[ImagePart], sources: Sequence[_Source], keys: list[bytes],
                               outcome: VisionOutcome, started: float) -> dict[bytes, TileEmbeddings]:
        """The tile embeddings of every distinct key: from the cache, from another request that is encoding the same
        image right now, or encoded here (once per key, however often the request repeats it)."""
        found: dict[bytes, TileEmbeddings] = {}
        shared: dict[bytes, asyncio.Future] = {}  # key -> another request's encoding of it, still running
        wanted: dict[bytes, int] = {}  # key -> first image that needs encoding here
        for index, key in enumerate(keys):
            if key in found or key in shared or key in wanted:
                continue
            entry = self.cache.get(key)
            if entry is not None:
                found[key] = entry
            elif key in self._in_flight:
                shared[key] = self._in_flight[key]
            elif sources[index].data is None:
                raise _not_cached(images[index])
            else:
                wanted[key] = index
        outcome.cache_hits = sum(key in found for key in keys)
        outcome.cache_in_flight = sum(key in shared for key in keys)
        outcome.cache_misses = len(keys) - outcome.cache_hits - outcome.cache_in_flight
        if not wanted:
            outcome.fetch_decode_s = time.monotonic() - started
        found.update(await self._encode_and_share(images, sources, wanted, outcome, started))
        retry: dict[bytes, int] = {}
        for key, future in shared.items():
            entry = await _shared_result(future)
            if entry is not None:
                found[key] = entry
                continue
            # The other request failed or was cancelled: encode it here (its error need not be this request's).
            retry[key] = keys.index(key)
            if sources[retry[key]].data is None:
                raise _not_cached(images[retry[key]])
        found.update(await self._encode_and_share(images, sources, retry, outcome, started))
        return found

    async def _encode_and_share(self, images: Sequence[ImagePart], sources: Sequence[_Source],
                                wanted: dict[bytes, int], outcome: VisionOutcome,
                                started: float) -> dict[bytes, TileEmbeddings]:
        """Encodes the images `wanted` names, caches them, and lets concurrent requests for the same keys wait on
        this encoding instead of repeating it (the keys are claimed before this coroutine first yields)."""
        if not wanted:
            return {}
        loop = asyncio.get_running_loop()
        mine = {key: loop.create_future() for key in wanted if key not in self._in_flight}
        self._in_flight.update(mine)
        try:
            fresh = await self._encode_missing([images[i] for i in wanted.values()],
                                               [sources[i] for i in wanted.values()], outcome, started)
            result = dict(zip(wanted, fresh, strict=True))
            for key, entry in result.items():
                outcome.cache_evictions += self.cache.put(key, entry)
                if key in mine:
                    mine[key].set_result(entry)
            return result
        finally:
            for key, future in mine.items():
                if self._in_flight.get(key) is future:
                    del self._in_flight[key]
                future.cancel()  # no-op where a result was set; otherwise tells the waiters to encode themselves

    async def _encode_missing(self, parts: list[ImagePart], sources: list[_Source], outcome: VisionOutcome,
                              started: float) -> list[TileEmbeddings]:
        decoded = await asyncio.gather(*(self._decode(part, source) for part, source in zip(parts, sources)))
        outcome.fetch_decode_s = time.monotonic() - started
        started = time.monotonic()
        tiles = await asyncio.to_thread(self._preprocessor.preprocess, decoded, [s.tile_cap for s in sources])
        outcome.preprocess_s = time.monotonic() - started
        result = await self._batcher.submit(EncodeRequest(images=tiles, details=[s.detail for s in sources]))
        outcome.queue_wait_s, outcome.encode_s, outcome.batch_tiles = (
            result.queue_wait_s, result.encode_s, result.batch_tiles
        )
        return result.images

    async def close(self) -> None:
        await self._batcher.stop()
        self._preprocessor.close()
        for sender in self._senders.values():
            await sender.close()
        self._senders.clear()

    async def _source(self, part: ImagePart) -> _Source:
        """Fetches the bytes of `part` and digests them; a bare `uuid` gets what it was last sent with."""
        if not part.url:
            sent = self.cache.recall_uuid(part.uuid) if part.uuid else None
            if sent is None:
                raise _not_cached(part)
            return _Source(None, sent.digest, sent.detail, sent.tile_cap)
        try:
            data = await load_image_bytes(part.url, self.config.fetch)
        except ServingError as error:
            raise error.with_param(part.param) if part.param else error
        digest = await asyncio.to_thread(content_digest, data)
        source = _Source(data, digest, self.encoder.encoded_detail(part.detail), self._tile_cap(part))
        if part.uuid:
            self.cache.remember_uuid(part.uuid, UuidRecord(digest, source.detail, source.tile_cap))
        return source

    async def _decode(self, part: ImagePart, source: _Source):
        try:
            return await asyncio.to_thread(decode_image, source.data, self.config.decode)
        except ServingError as error:
            raise error.with_param(part.param) if part.param else error

    def _tile_cap(self, part: ImagePart) -> int:
        """The tile cap the image is cut with (part of its cache key)."""
        cap = self._max_tiles(part)
        return self.spec.max_tiles if cap is None else cap

    def _max_tiles(self, part: ImagePart) -> int | None:
        if part.detail is Detail.LOW and not self.spec.flash:
            return 1  # one 448x448 tile of the whole image
        cap = self.config.max_tiles_per_image
        if cap is None:
            return part.max_tiles
        return min(part.max_tiles if part.max_tiles is not None else self.spec.max_tiles, cap)

    def _sender(self, address: str) -> EmbeddingSender:
        sender = self._senders.get(address)
        if sender is None:
            sender = EmbeddingSender(EmbeddingSenderConfig(target=address, auth_token=self.config.grpc_auth_token))
            self._senders[address] = sender
        return sender


async def _shared_result(future: asyncio.Future) -> TileEmbeddings | None:
    """What another request's encoding gave, or None where it did not finish (cancelling this waiter leaves that
    encoding running)."""
    await asyncio.wait([future])
    return None if future.cancelled() else future.result()


def _not_cached(part: ImagePart) -> InvalidRequestError:
    return InvalidRequestError(
        f"The image with uuid '{part.uuid}' is not cached on this server (it was never sent with its data, was "
        "evicted, or was sent with other detail or tile settings); send it again with its 'image_url'.",
        code="image_not_cached", param=part.param or None,
    )
