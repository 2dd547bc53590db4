"""The vision -> language embedding hop over a real grpc.aio server and client on 127.0.0.1, in-process.

Well-formed traffic goes through the product's `EmbeddingSender`. Malformed streams come from
`HandBuiltStreamDouble`, a test double that writes hand-made `PushMessage`s through the generated stub, so the
product code stays strict. After every refusal the store must be empty and the server must still answer.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
import torch

from dvd_serve.common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
    ServingError,
    UnavailableError,
)
from dvd_serve.lm_worker.embedding_receiver import ModelIdentity, start_embedding_server
from dvd_serve.lm_worker.embedding_store import EmbeddingStore
from dvd_serve.lm_worker.embedding_validation import EmbeddingLimits, all_finite
from dvd_serve.proto.channel_options import TransportTuning, client_channel_options
from dvd_serve.proto.framing import ChunkLayout, checksum, tensor_bytes
from dvd_serve.proto.status import ERROR_CODE_METADATA_KEY
from dvd_serve.proto.v1 import embeddings_pb2 as pb
from dvd_serve.proto.v1 import embeddings_pb2_grpc as pb_grpc
from dvd_serve.vision_worker.embedding_sender import EmbeddingSender, EmbeddingSenderConfig
from tests.dvd_fixtures import free_port

HIDDEN = 64
SMALL_CHUNK = 4096
SMALL_LIMITS = EmbeddingLimits(
    llm_hidden_size=HIDDEN,
    accepted_dtypes=("bfloat16", "float16", "float32"),
    min_chunk_bytes=1024,
    max_chunk_bytes=64 * 1024,
)
TOKEN = "s3cret-token"


class ManualClock:
    """Test clock for TTL tests: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sink:
    store: EmbeddingStore
    port: int
    limits: EmbeddingLimits

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sender(self, **overrides: object) -> EmbeddingSender:
        settings: dict[str, object] = {"target": self.target, "chunk_bytes": SMALL_CHUNK, **overrides}
        return EmbeddingSender(EmbeddingSenderConfig(**settings))

    def assert_empty(self) -> None:
        stats = self.store.stats()
        assert (stats.held_bytes, stats.pending_pushes, stats.complete_images) == (0, 0, 0)


@asynccontextmanager
async def running_sink(
    limits: EmbeddingLimits = SMALL_LIMITS,
    *,
    budget_bytes: int = 256 << 20,
    ttl_s: float = 30.0,
    clock: Callable[[], float] | None = None,
    port: int = 0,
    auth_token: str | None = None,
    health: Callable[[], object] = lambda: True,
    max_push_s: float = 30.0,
    tuning: TransportTuning | None = None,
) -> AsyncIterator[Sink]:
    store = EmbeddingStore(budget_bytes, ttl_s, **({"clock": clock} if clock else {}))
    server, bound_port = await start_embedding_server(
        store,
        limits,
        lambda: ModelIdentity("test/tiny-internvl", "rev-1"),
        health,
        port=port,
        auth_token=auth_token,
        max_push_s=max_push_s,
        tuning=tuning,
    )
    try:
        yield Sink(store, bound_port, limits)
    finally:
        await server.stop(None)


def embeddings_for(tokens_per_tile: Sequence[int], dtype: torch.dtype, hidden: int = HIDDEN, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(tokens_per_tile), hidden, generator=generator) * 3).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tiles", [1, 13])
async def test_round_trip_is_bit_exact(dtype: torch.dtype, tiles: int) -> None:
    tokens_per_tile = [256] * tiles
    sent = embeddings_for(tokens_per_tile, dtype)
    # Values a lossy path would change: -0.0, the smallest subnormal, the largest finite value.
    sent[0, :3] = torch.tensor([-0.0, torch.finfo(dtype).smallest_normal / 4, torch.finfo(dtype).max], dtype=dtype)
    async with running_sink() as sink, sink.sender() as sender:
        result = await sender.push("req-1", 0, sent, tokens_per_tile, timeout=10)
        (image,) = await sink.store.take("req-1", 1, timeout=5)
    assert (result.accepted_bytes, result.duplicate, result.attempts) == (sent.numel() * sent.element_size(), False, 1)
    assert image.embeddings.dtype == dtype and image.embeddings.shape == (256 * tiles, HIDDEN)
    assert torch.equal(bits(image.embeddings), bits(sent))
    assert image.tokens_per_tile == tuple(tokens_per_tile)
    sink.assert_empty()


async def test_mixed_tokens_per_tile_and_images_come_back_in_index_order() -> None:
    layouts = {0: [256, 64, 64, 256, 64], 1: [64], 2: [256, 256]}
    sent = {index: embeddings_for(tiles, torch.float32, seed=index) for index, tiles in layouts.items()}
    async with running_sink() as sink, sink.sender() as sender:
        for index in (2, 0, 1):
            await sender.push("req-mixed", index, sent[index], layouts[index], timeout=10)
        images = await sink.store.take("req-mixed", 3, timeout=5)
    assert [image.image_index for image in images] == [0, 1, 2]
    for image in images:
        assert image.tokens_per_tile == tuple(layouts[image.image_index])
        assert image.embeddings.shape[0] == sum(layouts[image.image_index])
        assert torch.equal(image.embeddings, sent[image.image_index])


async def test_worst_case_33_mib_image_fits_by_chunking() -> None:
    limits = EmbeddingLimits(llm_hidden_size=5120)  # production limits: bf16, 1-4 MiB chunks
    sent = embeddings_for([256] * 13, torch.bfloat16, hidden=5120)
    total_bytes = 13 * 256 * 5120 * 2
    assert sent.numel() * sent.element_size() == total_bytes > TransportTuning().max_message_bytes
    async with running_sink(limits) as sink:
        async with sink.sender(chunk_bytes=2 << 20) as sender:
            result = await sender.push("req-big", 0, sent, [256] * 13, timeout=30)
        (image,) = await sink.store.take("req-big", 1, timeout=5)
    assert result.accepted_bytes == total_bytes
    assert torch.equal(bits(image.embeddings), bits(sent))


async def test_sink_reports_info_and_health() -> None:
    serving = {"now": True}
    async with running_sink(health=lambda: serving["now"]) as sink, sink.sender() as sender:
        info = await sender.info(timeout=5)
        assert (info.model_id, info.model_revision, info.llm_hidden_size) == ("test/tiny-internvl", "rev-1", HIDDEN)
        assert info.accepted_dtypes == (torch.bfloat16, torch.float16, torch.float32)
        assert (info.max_tokens_per_image, info.min_chunk_bytes, info.max_chunk_bytes) == (3328, 1024, 65536)
        assert info.proto_version == "dvd_serve.v1"
        assert await sender.health(timeout=5) is True
        serving["now"] = False
        assert await sender.health(timeout=5) is False


# ---------------------------------------------------------------------------------------------------------------
# Malformed streams (robustness C.24-26)


class HandBuiltStreamDouble:
    """Test double of a vision worker: sends hand-made PushMessage streams through the generated stub."""

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=client_channel_options(TransportTuning()))
        self._stub = pb_grpc.EmbeddingSinkStub(self._channel)
        self._metadata = tuple(metadata)

    async def __aenter__(self) -> "HandBuiltStreamDouble":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close()

    async def call(self, messages, timeout: float | None = 10) -> pb.PushReply:
        return await self._stub.Push(messages, timeout=timeout, metadata=self._metadata)

    async def refusal(self, messages: Sequence[pb.PushMessage]) -> tuple[grpc.StatusCode, str | None]:
        """Sends `messages`; returns the status and error code of the refusal (fails if the push succeeds)."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.call(iter(messages))
        codes = [value for key, value in caught.value.trailing_metadata() or () if key == ERROR_CODE_METADATA_KEY]
        return caught.value.code(), (codes[0] if codes else None)


@dataclass
class Frames:
    """A well-formed push as editable pieces: header fields, chunk payloads, checksums."""

    header: pb.TensorHeader
    chunks: list[bytes]
    checksums: list[int]

    @classmethod
    def of(cls, tensor: torch.Tensor, tokens_per_tile: Sequence[int], chunk_bytes: int = SMALL_CHUNK) -> "Frames":
        payload = bytes(tensor_bytes(tensor))
        layout = ChunkLayout(len(payload), chunk_bytes)
        chunks = [payload[slice(*layout.span(sequence))] for sequence in range(layout.count)]
        header = pb.TensorHeader(
            request_id="req-bad",
            image_index=0,
            dtype={torch.bfloat16: pb.DTYPE_BF16, torch.float16: pb.DTYPE_FP16, torch.float32: pb.DTYPE_FP32}[
                tensor.dtype
            ],
            shape=list(tensor.shape),
            llm_hidden_size=tensor.shape[1],
            tokens_per_tile=list(tokens_per_tile),
            total_bytes=len(payload),
            checksum_algorithm=pb.CHECKSUM_ALGORITHM_CRC32,
            chunk_bytes=chunk_bytes,
        )
        return cls(header, chunks, [zlib.crc32(chunk) for chunk in chunks])

    def messages(self, order: Sequence[int] | None = None) -> list[pb.PushMessage]:
        sequence_order = range(len(self.chunks)) if order is None else order
        chunk_messages = [
            pb.PushMessage(
                chunk=pb.TensorChunk(sequence=sequence, checksum=self.checksums[sequence], data=self.chunks[sequence])
            )
            for sequence in sequence_order
        ]
        return [pb.PushMessage(header=self.header), *chunk_messages]


def valid_frames(dtype: torch.dtype = torch.float32) -> Frames:
    frames = Frames.of(embeddings_for([256, 64], dtype), [256, 64])
    assert len(frames.chunks) >= 4
    return frames


def with_header(**changes: object) -> list[pb.PushMessage]:
    frames = valid_frames()
    for name, value in changes.items():
        field = getattr(frames.header, name)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(frames.header, name, value)
    return frames.messages()


def with_payload_value(value: float, dtype: torch.dtype) -> list[pb.PushMessage]:
    tensor = embeddings_for([256, 64], dtype)
    tensor[300, 7] = value
    return Frames.of(tensor, [256, 64]).messages()


def with_chunk_order(order: Sequence[int]) -> list[pb.PushMessage]:
    return valid_frames().messages(order)


def with_corrupted_chunk() -> list[pb.PushMessage]:
    frames = valid_frames()
    corrupted = bytearray(frames.chunks[2])
    corrupted[100] ^= 0x01  # one flipped bit; the checksum is left as declared
    frames.chunks[2] = bytes(corrupted)
    return frames.messages()


def with_extra_chunk() -> list[pb.PushMessage]:
    frames = valid_frames()
    frames.chunks.append(frames.chunks[-1])
    frames.checksums.append(frames.checksums[-1])
    return frames.messages()


MULTI_TIB_TOKENS = 1 << 28
MALFORMED_STREAMS: dict[str, tuple[Callable[[], list[pb.PushMessage]], str]] = {
    "dtype unspecified": (lambda: with_header(dtype=pb.DTYPE_UNSPECIFIED), "embedding_dtype_invalid"),
    "dtype unknown to this build": (lambda: with_header(dtype=42), "embedding_dtype_invalid"),
    "rank 3": (lambda: with_header(shape=[1, 320, HIDDEN]), "embedding_shape_invalid"),
    "rank 1": (lambda: with_header(shape=[320 * HIDDEN]), "embedding_shape_invalid"),
    "hidden size of another model": (
        lambda: with_header(shape=[320, 2 * HIDDEN], llm_hidden_size=2 * HIDDEN, total_bytes=320 * 2 * HIDDEN * 4),
        "embedding_hidden_size_mismatch",
    ),
    "declared hidden disagrees with shape": (
        lambda: with_header(llm_hidden_size=HIDDEN + 1),
        "embedding_hidden_size_mismatch",
    ),
    "bytes != prod(shape) x itemsize": (lambda: with_header(total_bytes=320 * HIDDEN * 2), "embedding_size_mismatch"),
    "NaN": (lambda: with_payload_value(math.nan, torch.bfloat16), "embedding_not_finite"),
    "+Inf": (lambda: with_payload_value(math.inf, torch.float16), "embedding_not_finite"),
    "-Inf": (lambda: with_payload_value(-math.inf, torch.float32), "embedding_not_finite"),
    "token counts do not add up to rows": (
        lambda: with_header(tokens_per_tile=[256, 256]),
        "embedding_token_count_mismatch",
    ),
    "tile token count not allowed": (
        lambda: with_header(tokens_per_tile=[256, 32, 32]),
        "embedding_tile_tokens_invalid",
    ),
    "multi-TiB header": (
        lambda: with_header(
            shape=[MULTI_TIB_TOKENS, HIDDEN], tokens_per_tile=[256] * 13, total_bytes=MULTI_TIB_TOKENS * HIDDEN * 4
        ),
        "embedding_too_large",
    ),
    "multi-TiB shape behind a small total": (
        lambda: with_header(shape=[MULTI_TIB_TOKENS, HIDDEN], tokens_per_tile=[256] * 13),
        "embedding_too_many_tokens",
    ),
    "missing chunk": (lambda: with_chunk_order([0, 2, 3]), "embedding_chunk_out_of_order"),
    "duplicated chunk": (lambda: with_chunk_order([0, 1, 1, 2]), "embedding_chunk_out_of_order"),
    "reordered chunks": (lambda: with_chunk_order([1, 0, 2, 3]), "embedding_chunk_out_of_order"),
    "truncated stream": (lambda: with_chunk_order([0, 1]), "embedding_stream_truncated"),
    "header only": (lambda: with_chunk_order([]), "embedding_stream_truncated"),
    "bad checksum": (with_corrupted_chunk, "embedding_checksum_mismatch"),
    "more bytes than the declared total": (with_extra_chunk, "embedding_stream_too_long"),
    "chunk size below the limit": (lambda: with_header(chunk_bytes=512), "embedding_chunk_size_invalid"),
    "no checksum algorithm": (
        lambda: with_header(checksum_algorithm=pb.CHECKSUM_ALGORITHM_UNSPECIFIED),
        "embedding_checksum_algorithm_invalid",
    ),
    "chunk before the header": (lambda: valid_frames().messages()[1:], "embedding_header_missing"),
    "second header": (lambda: with_chunk_order([0])[:2] + with_chunk_order([])[:1], "embedding_message_unexpected"),
    "empty message": (lambda: [with_chunk_order([])[0], pb.PushMessage()], "embedding_message_unexpected"),
    "request id with a newline": (lambda: with_header(request_id="req\nbad"), "embedding_request_id_invalid"),
    "image index out of range": (lambda: with_header(image_index=64), "embedding_image_index_invalid"),
}


async def test_sink_accepts_chunks_checksummed_by_zlib() -> None:
    """The wire's CRC-32 is zlib's, whatever computes it: a peer using `zlib.crc32` interoperates."""
    for size in (0, 1, 3, 4096, (1 << 20) + 7):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert checksum(data) == zlib.crc32(data)
    frames = valid_frames(torch.float16)  # Frames.of checksums with zlib
    async with running_sink() as sink, HandBuiltStreamDouble(sink.target) as double:
        reply = await double.call(iter(frames.messages()))
        (image,) = await sink.store.take("req-bad", 1, timeout=5)
    assert (reply.accepted_bytes, reply.duplicate) == (frames.header.total_bytes, False)
    assert bytes(tensor_bytes(image.embeddings)) == b"".join(frames.chunks)


@pytest.mark.parametrize("case", sorted(MALFORMED_STREAMS))
async def test_malformed_stream_is_refused_cleanly(case: str) -> None:
    build_messages, expected_code = MALFORMED_STREAMS[case]
    messages = build_messages()
    async with running_sink() as sink, HandBuiltStreamDouble(sink.target) as double:
        status, code = await double.refusal(messages)
        assert (status, code) == (grpc.StatusCode.INVALID_ARGUMENT, expected_code)
        sink.assert_empty()
        # Unharmed: the same image, well-formed, still goes through.
        async with sink.sender() as sender:
            assert await sender.health(timeout=5)
            await sender.push("req-bad", 0, embeddings_for([256, 64], torch.float32), [256, 64], timeout=10)
        assert sink.store.stats().complete_images == 1


async def test_refusal_reaches_the_sender_as_invalid_request() -> None:
    async with running_sink() as sink, sink.sender() as sender:
        with pytest.raises(InvalidRequestError) as caught:
            await sender.push("req-1", 0, embeddings_for([256], torch.float32, hidden=HIDDEN * 2), [256], timeout=10)
        assert caught.value.code == "invalid_embeddings"
        assert caught.value.message == "language worker rejected the image embeddings"
        sink.assert_empty()


async def test_message_over_the_transport_limit_is_resource_exhausted() -> None:
    frames = Frames.of(embeddings_for([256] * 13, torch.bfloat16, hidden=2048), [256] * 13, chunk_bytes=6 << 20)
    limits = EmbeddingLimits(llm_hidden_size=2048)
    async with running_sink(limits) as sink, HandBuiltStreamDouble(sink.target) as double:
        status, _ = await double.refusal(frames.messages())
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
        sink.assert_empty()
    with pytest.raises(ValueError):
        EmbeddingSender(EmbeddingSenderConfig(target="127.0.0.1:1", chunk_bytes=6 << 20))


def test_all_finite_agrees_with_torch_isfinite() -> None:
    specials = [math.nan, -math.nan, math.inf, -math.inf]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        finfo = torch.finfo(dtype)
        clean = torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 8, -1.5], dtype=dtype)
        assert all_finite(tensor_bytes(clean), dtype) is True
        for special in specials:
            for position in (0, 3, 6):
                dirty = clean.clone()
                dirty[position] = special
                assert bool(torch.isfinite(dirty).all()) is False
                assert all_finite(tensor_bytes(dirty), dtype) is False, (dtype, special, position)


def test_all_finite_agrees_with_torch_isfinite_on_every_16_bit_pattern() -> None:
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    # fp32 patterns around both infinities and zero, each sign.
    edges = [0x7F800000 + offset for offset in (-2, -1, 0, 1, 0x7FFFFF)] + [0, 1, 0x7FFFFFFF]
    fp32_patterns = torch.tensor(edges + [edge | -(1 << 31) for edge in edges], dtype=torch.int64).to(torch.int32)
    for dtype, bit_patterns in ((torch.bfloat16, patterns), (torch.float16, patterns), (torch.float32, fp32_patterns)):
        values = bit_patterns.view(dtype)
        expected = torch.isfinite(values.float()).tolist()
        judged = [all_finite(tensor_bytes(values[index : index + 1]), dtype) for index in range(len(values))]
        assert judged == expected, dtype
        assert all_finite(tensor_bytes(values[values.float().isfinite()]), dtype) is True


# ---------------------------------------------------------------------------------------------------------------
# Idempotency, budget, lifetime of held buffers


async def test_duplicate_push_is_answered_as_duplicate_and_stored_once() -> None:
    sent = embeddings_for([256], torch.float32)
    async with running_sink() as sink, sink.sender() as sender:
        first = await sender.push("req-dup", 0, sent, [256], timeout=10, content_hash=b"h1")
        held = sink.store.held_bytes
        second = await sender.push("req-dup", 0, sent, [256], timeout=10, content_hash=b"h1")
        assert (first.duplicate, second.duplicate, second.accepted_bytes) == (False, True, 0)
        assert (sink.store.held_bytes, sink.store.stats().complete_images) == (held, 1)
        with pytest.raises(InvalidRequestError):
            await sender.push("req-dup", 0, sent, [256], timeout=10, content_hash=b"other image")
        (image,) = await sink.store.take("req-dup", 1, timeout=5)
        # A retry whose reply was lost may arrive after the engine took the image: still a duplicate.
        late = await sender.push("req-dup", 0, sent, [256], timeout=10, content_hash=b"h1")
        assert late.duplicate
        sink.assert_empty()
    assert torch.equal(image.embeddings, sent)


async def test_push_over_budget_is_resource_exhausted() -> None:
    sent = embeddings_for([256], torch.float32)
    image_bytes = sent.numel() * 4
    async with running_sink(budget_bytes=image_bytes * 2) as sink, sink.sender() as sender:
        await sender.push("req-budget", 0, sent, [256], timeout=10)
        await sender.push("req-budget", 1, sent, [256], timeout=10)
        with pytest.raises(OverloadedError) as caught:
            await sender.push("req-budget", 2, sent, [256], timeout=10)
        assert caught.value.code == "embedding_store_full"
        assert sink.store.held_bytes == image_bytes * 2
        assert sink.store.stats().refused_over_budget_total == 1
        await sink.store.take("req-budget", 2, timeout=5)
        sink.assert_empty()
        await sender.push("req-budget-next", 0, sent, [256], timeout=10)  # room again once taken


async def test_take_timeout_is_deadline_exceeded_and_frees_buffers() -> None:
    async with running_sink() as sink, sink.sender() as sender:
        await sender.push("req-slow", 0, embeddings_for([256], torch.float32), [256], timeout=10)
        assert sink.store.held_bytes > 0
        with pytest.raises(DeadlineExceededError):
            await sink.store.take("req-slow", 2, timeout=0.2)
        sink.assert_empty()
        with pytest.raises(InvalidRequestError) as caught:  # the request is closed: no orphan from a late image
            await sender.push("req-slow", 1, embeddings_for([256], torch.float32), [256], timeout=10)
        assert caught.value.code == "embedding_request_closed"
        sink.assert_empty()


async def test_cancel_frees_held_images_and_wakes_the_waiter() -> None:
    async with running_sink() as sink, sink.sender() as sender:
        for index in range(2):
            await sender.push("req-cancel", index, embeddings_for([64], torch.float32), [64], timeout=10)
        waiter = asyncio.create_task(sink.store.take("req-cancel", 3, timeout=10))
        await asyncio.sleep(0.05)
        assert await sender.cancel("req-cancel", timeout=5) == 2
        sink.assert_empty()
        with pytest.raises(InvalidRequestError):
            await waiter
        assert await sender.cancel("req-cancel", timeout=5) == 0
        with pytest.raises(InvalidRequestError):
            await sender.cancel("no spaces allowed", timeout=5)


async def test_ttl_evicts_orphaned_images() -> None:
    clock = ManualClock()
    async with running_sink(ttl_s=10.0, clock=clock) as sink, sink.sender() as sender:
        await sender.push("req-orphan", 0, embeddings_for([64], torch.float32), [64], timeout=10)
        clock.now += 9.0
        assert sink.store.evict_expired() == 0
        clock.now += 2.0
        assert await sender.health(timeout=5)  # any call sweeps
        sink.assert_empty()
        assert sink.store.stats().evicted_images_total == 1
        clock.now += 11.0  # the closed mark expires with the TTL too
        await sender.push("req-orphan", 0, embeddings_for([64], torch.float32), [64], timeout=10)
        assert sink.store.stats().complete_images == 1


# ---------------------------------------------------------------------------------------------------------------
# Authentication, deadlines, cancellation, retries (robustness C.25, C.27, C.28)


async def test_auth_token_is_enforced() -> None:
    sent = embeddings_for([64], torch.float32)
    async with running_sink(auth_token=TOKEN) as sink:
        for token in (None, "wrong-token"):
            async with sink.sender(auth_token=token) as sender:
                with pytest.raises(ServingError) as caught:
                    await sender.info(timeout=5)
                assert caught.value.code == "embedding_sink_auth"
                with pytest.raises(ServingError):
                    await sender.push("req-auth", 0, sent, [64], timeout=5)
        async with HandBuiltStreamDouble(sink.target) as double:
            status, _ = await double.refusal(Frames.of(sent, [64]).messages())
            assert status == grpc.StatusCode.UNAUTHENTICATED
        sink.assert_empty()
        async with sink.sender(auth_token=TOKEN) as sender:
            assert (await sender.info(timeout=5)).llm_hidden_size == HIDDEN
            assert not (await sender.push("req-auth", 0, sent, [64], timeout=5)).duplicate


async def test_client_deadline_shorter_than_the_server_needs() -> None:
    async def slow_health() -> bool:
        await asyncio.sleep(2)
        return True

    async with running_sink(health=slow_health) as sink, sink.sender() as sender:
        with pytest.raises(DeadlineExceededError):
            await sender.health(timeout=0.2)
        big = embeddings_for([256] * 13, torch.float32)
        with pytest.raises(DeadlineExceededError):
            await sender.push("req-late", 0, big, [256] * 13, timeout=0.005)  # 851 KiB cannot move in 5 ms here
        await wait_until(lambda: sink.store.stats().pending_pushes == 0)
        sink.assert_empty()


async def stalled_stream(frames: Frames, sent_first_chunk: asyncio.Event) -> AsyncIterator[pb.PushMessage]:
    """Header and first chunk, then nothing: a vision worker that hangs mid-image."""
    yield pb.PushMessage(header=frames.header)
    yield pb.PushMessage(chunk=pb.TensorChunk(sequence=0, checksum=frames.checksums[0], data=frames.chunks[0]))
    sent_first_chunk.set()
    await asyncio.sleep(3600)
    yield pb.PushMessage()  # never reached


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_deadline_mid_stream_frees_the_partial_buffer() -> None:
    async with running_sink() as sink, HandBuiltStreamDouble(sink.target) as double:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await double.call(stalled_stream(valid_frames(), asyncio.Event()), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: sink.store.stats().pending_pushes == 0)
        sink.assert_empty()


async def test_server_bounds_a_push_without_client_deadline() -> None:
    async with running_sink(max_push_s=0.3) as sink, HandBuiltStreamDouble(sink.target) as double:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await double.call(stalled_stream(valid_frames(), asyncio.Event()), timeout=None)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sink.assert_empty()


async def test_cancelled_client_task_frees_the_partial_buffer() -> None:
    async with running_sink() as sink, HandBuiltStreamDouble(sink.target) as double:
        sent_first_chunk = asyncio.Event()
        push = asyncio.create_task(double.call(stalled_stream(valid_frames(), sent_first_chunk)))
        await sent_first_chunk.wait()
        await wait_until(lambda: sink.store.stats().pending_pushes == 1)
        assert sink.store.held_bytes > 0
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        await wait_until(lambda: sink.store.stats().pending_pushes == 0)
        sink.assert_empty()


async def test_cancelling_the_sender_task_cancels_the_push() -> None:
    sent = embeddings_for([256] * 13, torch.bfloat16, hidden=5120)
    async with running_sink(EmbeddingLimits(llm_hidden_size=5120)) as sink, sink.sender(chunk_bytes=1 << 20) as sender:
        push = asyncio.create_task(sender.push("req-gone", 0, sent, [256] * 13, timeout=30))
        await wait_until(lambda: sink.store.stats().pending_pushes == 1)
        push.cancel()
        with pytest.raises(asyncio.CancelledError):
            await push
        await wait_until(lambda: sink.store.stats().pending_pushes == 0)
        sink.assert_empty()


async def test_sender_retries_unavailable_until_the_server_is_up() -> None:
    port = free_port()
    sent = embeddings_for([256, 64], torch.float32)
    sender = EmbeddingSender(
        EmbeddingSenderConfig(
            target=f"127.0.0.1:{port}",
            chunk_bytes=SMALL_CHUNK,
            max_attempts=40,
            retry_initial_backoff_s=0.05,
            retry_max_backoff_s=0.1,
            tuning=TransportTuning(reconnect_initial_backoff_s=0.05, reconnect_max_backoff_s=0.1),
        )
    )
    async with sender:
        push = asyncio.create_task(sender.push("req-retry", 0, sent, [256, 64], timeout=20))
        await asyncio.sleep(0.4)
        assert not push.done()
        async with running_sink(port=port) as sink:
            result = await push
            assert result.attempts > 1 and not result.duplicate
            stats = sink.store.stats()
            assert (stats.complete_images, stats.pending_pushes, stats.held_bytes) == (1, 0, sent.numel() * 4)


async def test_sink_restart_mid_stream_is_retried_and_stored_once() -> None:
    limits = EmbeddingLimits(llm_hidden_size=5120)
    sent = embeddings_for([256] * 13, torch.bfloat16, hidden=5120)
    port = free_port()
    config = EmbeddingSenderConfig(
        target=f"127.0.0.1:{port}",
        chunk_bytes=1 << 20,
        max_attempts=40,
        retry_max_backoff_s=0.1,
        tuning=TransportTuning(reconnect_initial_backoff_s=0.05, reconnect_max_backoff_s=0.1),
    )
    async with EmbeddingSender(config) as sender:
        async with running_sink(limits, port=port) as first:
            push = asyncio.create_task(sender.push("req-reset", 0, sent, [256] * 13, timeout=30))
            await wait_until(lambda: first.store.stats().pending_pushes == 1)
        await wait_until(lambda: first.store.stats().pending_pushes == 0)  # stopping cancels the handler
        first.assert_empty()  # which freed the partial image
        async with running_sink(limits, port=port) as second:
            result = await push
            (image,) = await second.store.take("req-reset", 1, timeout=5)
    assert result.attempts >= 2 and not result.duplicate
    assert torch.equal(bits(image.embeddings), bits(sent))


async def test_sender_gives_up_on_unavailable_after_bounded_attempts() -> None:
    sender = EmbeddingSender(
        EmbeddingSenderConfig(
            target=f"127.0.0.1:{free_port()}", chunk_bytes=SMALL_CHUNK, max_attempts=3, retry_max_backoff_s=0.05
        )
    )
    async with sender:
        with pytest.raises(ServingError) as caught:
            await sender.push("req-down", 0, embeddings_for([64], torch.float32), [64], timeout=10)
    assert caught.value.code == "embedding_sink_unavailable"


class BlackHoleProxyDouble:
    """Test double of the network between the two workers: a TCP relay to the sink that, once it has forwarded a
    given number of bytes towards the sink, swallows everything in both directions and answers nothing, on open
    and new connections alike (a hung peer, or a partition that drops packets)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._bytes_before_hole: int | None = None
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def target(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def swallowing(self) -> bool:
        return self._bytes_before_hole == 0

    def black_hole_after(self, forwarded_bytes: int) -> None:
        """Forward `forwarded_bytes` more towards the sink, then nothing any more."""
        self._bytes_before_hole = forwarded_bytes

    async def __aenter__(self) -> "BlackHoleProxyDouble":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.append(client_writer)
        if self.swallowing:
            await self._relay(client_reader, None, towards_sink=True)
            return
        sink_reader, sink_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers.append(sink_writer)
        await asyncio.gather(
            self._relay(client_reader, sink_writer, towards_sink=True),
            self._relay(sink_reader, client_writer, towards_sink=False),
            return_exceptions=True,
        )

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, *, towards_sink: bool
    ) -> None:
        while data := await reader.read(1 << 16):
            if towards_sink and self._bytes_before_hole is not None:
                data = data[: self._bytes_before_hole]
                self._bytes_before_hole -= len(data)
            if writer is not None and data and not (self.swallowing and not towards_sink):
                writer.write(data)
                await writer.drain()


async def test_black_holed_peer_is_detected_within_keepalive_and_timeout() -> None:
    """C.29: mid-push the network swallows everything. Pings go unanswered, so the sender's push fails with a clean
    UNAVAILABLE long before its deadline, and the sink frees the partial buffer; both within keepalive time +
    keepalive timeout, plus slack (grpc spaces pings at least a second apart; scheduling on a loaded machine)."""
    tuning = TransportTuning(keepalive_time_s=0.5, keepalive_timeout_s=0.5)
    detection_bound_s = tuning.keepalive_time_s + tuning.keepalive_timeout_s + 2.5
    limits = EmbeddingLimits(llm_hidden_size=5120)
    sent = embeddings_for([256] * 13, torch.bfloat16, hidden=5120)  # 33 MiB: more than windows and buffers hold
    loop = asyncio.get_running_loop()
    async with running_sink(limits, tuning=tuning) as sink, BlackHoleProxyDouble(sink.port) as proxy:
        config = EmbeddingSenderConfig(target=proxy.target, chunk_bytes=1 << 20, max_attempts=1, tuning=tuning)
        async with EmbeddingSender(config) as sender:
            assert await sender.health(timeout=5)  # the connection through the proxy is up
            proxy.black_hole_after(3 << 20)  # the header and two chunks reach the sink, nothing after
            started = loop.time()
            push = asyncio.create_task(sender.push("req-hole", 0, sent, [256] * 13, timeout=10))
            await wait_until(lambda: sink.store.stats().pending_pushes == 1)  # the hole opened mid-image
            with pytest.raises(UnavailableError) as caught:
                await push
            sender_detected_s = loop.time() - started
            assert caught.value.code == "embedding_sink_unavailable"
            assert caught.value.message == "language worker is unavailable"
            assert proxy.swallowing
            await wait_until(lambda: sink.store.stats().pending_pushes == 0, timeout=detection_bound_s)
            sink_detected_s = loop.time() - started
            sink.assert_empty()
            with pytest.raises(ServingError):  # new connections fall into the hole too: bounded by the deadline
                await sender.push("req-hole", 0, sent, [256] * 13, timeout=1.0)
            assert loop.time() - started < sink_detected_s + 1.0 + detection_bound_s
    assert sender_detected_s < detection_bound_s, sender_detected_s
    assert sink_detected_s < detection_bound_s, sink_detected_s


def test_over_limit_status_without_store_code_is_payload_too_large() -> None:
    from dvd_serve.proto.status import error_for_status

    assert isinstance(error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, None), PayloadTooLargeError)
    assert type(error_for_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "embedding_store_full")) is OverloadedError


# ---------------------------------------------------------------------------------------------------------------
# Store and validation units


def test_newer_push_supersedes_an_in_flight_one() -> None:
    store = EmbeddingStore(budget_bytes=1000, ttl_s=10)
    first = store.reserve("req", 0, 300)
    second = store.reserve("req", 0, 300)
    assert store.held_bytes == 600  # the superseded push still holds its buffer until it ends
    with pytest.raises(ServingError) as caught:
        store.complete(first, torch.zeros(4, 2), (4,))
    assert caught.value.code == "embedding_push_superseded"
    store.release(first)
    store.release(first)  # idempotent
    assert store.held_bytes == 300
    store.complete(second, torch.zeros(4, 2), (4,))
    store.release(second)  # after complete: no-op
    assert (store.held_bytes, store.stats().complete_images) == (300, 1)


async def test_sweeper_evicts_without_traffic() -> None:
    clock = ManualClock()
    store = EmbeddingStore(budget_bytes=1000, ttl_s=5, clock=clock)
    store.complete(store.reserve("req", 0, 100), torch.zeros(4, 2), (4,))
    sweeper = asyncio.create_task(store.run_sweeper(0.01))
    clock.now += 6
    await wait_until(lambda: store.held_bytes == 0)
    sweeper.cancel()
    assert store.stats().evicted_images_total == 1


def test_validate_embeddings_before_the_engine() -> None:
    from dvd_serve.lm_worker.embedding_validation import validate_embeddings

    good = embeddings_for([256, 64], torch.float32)
    validate_embeddings(good, (256, 64), SMALL_LIMITS)
    bad_cases = {
        "embedding_not_finite": (good.clone().index_fill_(0, torch.tensor([5]), math.nan), (256, 64)),
        "embedding_hidden_size_mismatch": (embeddings_for([64], torch.float32, hidden=HIDDEN + 8), (64,)),
        "embedding_token_count_mismatch": (good, (256, 256)),
        "embedding_dtype_invalid": (good.double(), (256, 64)),
    }
    for expected_code, (tensor, tokens_per_tile) in bad_cases.items():
        with pytest.raises(InvalidRequestError) as caught:
            validate_embeddings(tensor, tokens_per_tile, SMALL_LIMITS)
        assert caught.value.code == expected_code
