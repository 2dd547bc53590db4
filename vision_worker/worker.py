"""VisionWorker: all the vision work of a request, from image references to embeddings at a language replica.

Per request: fetch/decode every image concurrently, tile and normalise them (thread pool), encode together with
other requests' images (dynamic batching, routing per request), then push each image's embeddings to the
language replica chosen for the request over the gRPC hop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from dvd_serve.common.chat import Detail, ImagePart
from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import ServingError
from dvd_serve.vision_worker.batcher import BatchingConfig, VisionBatcher
from dvd_serve.vision_worker.embedding_sender import EmbeddingSender, EmbeddingSenderConfig
from dvd_serve.vision_worker.encoder import EncodedImage, EncodeRequest, VisionEncoder, VisionEncoderConfig
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


class VisionWorker:
    def __init__(self, config: VisionWorkerConfig, encoder: VisionEncoder) -> None:
        self.config = config
        self.encoder = encoder
        self.spec = encoder.spec
        self._preprocessor = ImagePreprocessor.from_spec(self.spec, num_threads=config.preprocess_threads)
        self._batcher = VisionBatcher(encoder.encode_requests, config.batching)
        self._senders: dict[str, EmbeddingSender] = {}

    @classmethod
    def load(cls, config: VisionWorkerConfig) -> "VisionWorker":
        return cls(config, VisionEncoder.from_config(config.encoder))

    async def encode(self, images: Sequence[ImagePart], outcome: VisionOutcome | None = None) -> list[EncodedImage]:
        """Image references -> embeddings, without sending them anywhere (used by the coupled topology)."""
        outcome = outcome if outcome is not None else VisionOutcome()
        started = time.monotonic()
        decoded = await asyncio.gather(*(self._load(part) for part in images))
        outcome.fetch_decode_s = time.monotonic() - started
        started = time.monotonic()
        tiles = await asyncio.to_thread(
            self._preprocessor.preprocess, decoded, [self._max_tiles(part) for part in images]
        )
        outcome.preprocess_s = time.monotonic() - started
        details = [self._effective_detail(part) for part in images]
        result = await self._batcher.submit(EncodeRequest(images=tiles, details=details))
        outcome.queue_wait_s, outcome.encode_s, outcome.batch_tiles = (
            result.queue_wait_s, result.encode_s, result.batch_tiles
        )
        outcome.tokens_per_tile = [image.tokens_per_tile for image in result.images]
        outcome.tokens_per_image = [int(image.embeddings.shape[0]) for image in result.images]
        return result.images

    async def process(self, request_id: str, images: Sequence[ImagePart], lm_address: str) -> VisionOutcome:
        """Encode `images` and push them to the language replica at `lm_address` under `request_id`."""
        outcome = VisionOutcome()
        encoded = await self.encode(images, outcome)
        sender = self._sender(lm_address)
        started = time.monotonic()
        await asyncio.gather(*(
            sender.push(request_id, index, image.embeddings, image.tokens_per_tile, timeout=self.config.push_timeout_s)
            for index, image in enumerate(encoded)
        ))
        outcome.transfer_s = time.monotonic() - started
        outcome.transfer_bytes = sum(image.embeddings.numel() * image.embeddings.element_size() for image in encoded)
        return outcome

    async def close(self) -> None:
        await self._batcher.stop()
        self._preprocessor.close()
        for sender in self._senders.values():
            await sender.close()
        self._senders.clear()

    def _effective_detail(self, part: ImagePart) -> Detail:
        # Non-Flash checkpoints implement `low` at tiling time (one thumbnail tile); the encoder sees `high`.
        if not self.spec.flash and part.detail is not Detail.HIGH:
            return Detail.HIGH
        return part.detail

    async def _load(self, part: ImagePart):
        try:
            data = await load_image_bytes(part.url, self.config.fetch)
            return await asyncio.to_thread(decode_image, data, self.config.decode)
        except ServingError as error:
            raise error.with_param(part.param) if part.param else error

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
