"""The vision worker's gRPC edge: pushes one image's embeddings to a language worker's EmbeddingSink.

Every call has a deadline. A push that fails with UNAVAILABLE (connection refused or reset, or a stream cut while
it was being written) is retried within the same deadline, with capped exponential backoff and full jitter;
retrying is safe because the sink answers a push for an image it already has as a duplicate. Each chunk is
checksummed and framed on the event loop while the one before it is on the wire. Cancelling the task that
awaits `push` cancels the RPC, and the sink frees the partial buffer. Failures surface as
`dvd_serve.common.errors` values with fixed messages.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from pydantic import Field, SecretStr

from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import DeadlineExceededError
from dvd_serve.proto.channel_options import TransportTuning, client_channel_options
from dvd_serve.proto.framing import ChunkLayout, build_header, checksum, iter_chunks, tensor_bytes, torch_dtype
from dvd_serve.proto.status import ERROR_CODE_METADATA_KEY, error_for_status
from dvd_serve.proto.v1 import embeddings_pb2 as pb
from dvd_serve.proto.v1 import embeddings_pb2_grpc as pb_grpc
from dvd_serve.proto.wire import encode_chunk, encode_header, method_path

ReplyT = TypeVar("ReplyT")


class EmbeddingSenderConfig(FrozenConfig):
    """Where and how a vision worker pushes embeddings."""

    target: str = Field(description="host:port of the language worker's EmbeddingSink (cluster-internal).")
    chunk_bytes: int = Field(
        default=2 << 20, gt=0, description="Bytes per chunk message; must lie within the sink's chunk limits."
    )
    max_attempts: int = Field(default=4, ge=1, description="Tries per call when the sink is UNAVAILABLE.")
    retry_initial_backoff_s: float = Field(default=0.05, gt=0, description="Backoff cap before the second try.")
    retry_max_backoff_s: float = Field(default=1.0, gt=0, description="Largest backoff cap between tries.")
    auth_token: SecretStr | None = Field(default=None, description="Shared token sent as `authorization: Bearer`.")
    tuning: TransportTuning = Field(default_factory=TransportTuning, description="Options shared with the sink.")


@dataclass(frozen=True, slots=True)
class PushResult:
    """Outcome of a delivered push."""

    accepted_bytes: int
    duplicate: bool
    attempts: int
    server_receive_ns: int
    server_validate_ns: int
    server_total_ns: int


@dataclass(frozen=True, slots=True)
class SinkInfo:
    """What a sink reports about itself (`Info`)."""

    model_id: str
    model_revision: str
    llm_hidden_size: int
    accepted_dtypes: tuple[torch.dtype, ...]
    max_tokens_per_image: int
    max_images_per_request: int
    max_message_bytes: int
    max_tensor_bytes: int
    min_chunk_bytes: int
    max_chunk_bytes: int
    proto_version: str


class _StreamInterrupted(Exception):
    """A push stream ended while chunks were still being written; the cause is unknown (see `_push_once`)."""


async def _write_stream(
    call: grpc.aio.StreamUnaryCall, encoded_header: bytes, payload: memoryview, layout: ChunkLayout
) -> None:
    """Writes the header, then every chunk in order, one write in flight at a time.

    Chunk n+1 is checksummed and framed (one copy of its bytes) on the event loop while chunk n is being written:
    grpc's own threads move the bytes, so the loop is otherwise idle then, and no worker-thread hop is added.
    """
    writing = asyncio.ensure_future(call.write(encoded_header))
    try:
        for sequence, chunk in iter_chunks(payload, layout):
            await asyncio.sleep(0)  # the pending write hands its message to grpc before the loop gets busy
            message = encode_chunk(sequence, checksum(chunk), chunk)
            await writing
            writing = asyncio.ensure_future(call.write(message))
        await writing
    finally:
        if not writing.done():
            writing.cancel()
        elif not writing.cancelled():
            writing.exception()  # marks a failed write as seen when another error is already on its way out


def _trailing_error_code(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_CODE_METADATA_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class EmbeddingSender:
    """One channel to one EmbeddingSink. Create inside the event loop that uses it; `close` when done."""

    def __init__(self, config: EmbeddingSenderConfig, *, rng: random.Random | None = None) -> None:
        if config.chunk_bytes > config.tuning.max_chunk_bytes:
            raise ValueError("chunk_bytes exceeds the transport's max_chunk_bytes")
        self._config = config
        self._rng = rng or random.Random()
        self._channel = grpc.aio.insecure_channel(config.target, options=client_channel_options(config.tuning))
        self._stub = pb_grpc.EmbeddingSinkStub(self._channel)
        # Push bypasses protobuf (de)serialisation of chunks: the writer hands over pre-encoded messages.
        self._push_call = self._channel.stream_unary(
            method_path("Push"), request_serializer=None, response_deserializer=pb.PushReply.FromString
        )
        token = config.auth_token
        self._metadata = () if token is None else (("authorization", f"Bearer {token.get_secret_value()}"),)

    async def __aenter__(self) -> "EmbeddingSender":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def push(
        self,
        request_id: str,
        image_index: int,
        embeddings: torch.Tensor,
        tokens_per_tile: Sequence[int],
        *,
        timeout: float,
        content_hash: bytes = b"",
    ) -> PushResult:
        """Delivers `embeddings` [tokens, llm_hidden] for one image, retrying UNAVAILABLE within `timeout` seconds."""
        deadline = self._deadline(timeout)
        if embeddings.device.type != "cpu":
            embeddings = await asyncio.to_thread(embeddings.cpu)
        payload = tensor_bytes(embeddings)
        layout = ChunkLayout(len(payload), self._config.chunk_bytes)
        header = build_header(
            request_id=request_id,
            image_index=image_index,
            embeddings=embeddings,
            tokens_per_tile=tokens_per_tile,
            chunk_bytes=layout.chunk_bytes,
            content_hash=content_hash,
        )
        encoded_header = encode_header(header)

        async def attempt(remaining_s: float) -> pb.PushReply:
            return await self._push_once(encoded_header, payload, layout, remaining_s)

        reply, attempts = await self._with_retries(attempt, deadline)
        return PushResult(
            accepted_bytes=reply.accepted_bytes,
            duplicate=reply.duplicate,
            attempts=attempts,
            server_receive_ns=reply.timings.receive_ns,
            server_validate_ns=reply.timings.validate_ns,
            server_total_ns=reply.timings.total_ns,
        )

    async def cancel(self, request_id: str, *, timeout: float) -> int:
        """Asks the sink to drop everything for `request_id`; returns the complete images it dropped."""

        async def attempt(remaining_s: float) -> pb.CancelReply:
            request = pb.CancelRequest(request_id=request_id)
            return await self._stub.Cancel(request, timeout=remaining_s, metadata=self._metadata)

        reply, _ = await self._with_retries(attempt, self._deadline(timeout))
        return reply.images_dropped

    async def info(self, *, timeout: float) -> SinkInfo:
        async def attempt(remaining_s: float) -> pb.InfoReply:
            return await self._stub.Info(pb.InfoRequest(), timeout=remaining_s, metadata=self._metadata)

        reply, _ = await self._with_retries(attempt, self._deadline(timeout))
        known_dtypes = (torch_dtype(value) for value in reply.accepted_dtypes)
        return SinkInfo(
            model_id=reply.model_id,
            model_revision=reply.model_revision,
            llm_hidden_size=reply.llm_hidden_size,
            accepted_dtypes=tuple(dtype for dtype in known_dtypes if dtype is not None),
            max_tokens_per_image=reply.limits.max_tokens_per_image,
            max_images_per_request=reply.limits.max_images_per_request,
            max_message_bytes=reply.limits.max_message_bytes,
            max_tensor_bytes=reply.limits.max_tensor_bytes,
            min_chunk_bytes=reply.limits.min_chunk_bytes,
            max_chunk_bytes=reply.limits.max_chunk_bytes,
            proto_version=reply.proto_version,
        )

    async def health(self, *, timeout: float) -> bool:
        """True when the sink reports SERVING."""

        async def attempt(remaining_s: float) -> pb.HealthReply:
            return await self._stub.Health(pb.HealthRequest(), timeout=remaining_s, metadata=self._metadata)

        reply, _ = await self._with_retries(attempt, self._deadline(timeout))
        return reply.status == pb.SERVING_STATUS_SERVING

    async def _push_once(
        self, encoded_header: bytes, payload: memoryview, layout: ChunkLayout, timeout_s: float
    ) -> pb.PushReply:
        call = self._push_call(timeout=timeout_s, metadata=self._metadata)
        try:
            await _write_stream(call, encoded_header, payload, layout)
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the sink answered before reading everything (it only does so for unauthenticated calls)
        except grpc.aio.AioRpcError as write_error:
            if write_error.code() != grpc.StatusCode.INTERNAL:
                raise
            # grpc.aio reports a write that fails because the call just ended (deadline, reset, the sink
            # going away) as INTERNAL and drops the real status.
            raise _StreamInterrupted from write_error
        except asyncio.CancelledError:
            call.cancel()
            raise
        return await call

    @staticmethod
    def _deadline(timeout_s: float) -> float:
        return asyncio.get_running_loop().time() + timeout_s

    async def _with_retries(self, attempt: Callable[[float], Awaitable[ReplyT]], deadline: float) -> tuple[ReplyT, int]:
        """Runs `attempt(remaining_s)` until it succeeds, fails for good, or the loop-time `deadline` passes.

        Returns (reply, attempts used). UNAVAILABLE and interrupted push streams are retried; an interrupted
        stream past the deadline counts as DEADLINE_EXCEEDED.
        """
        loop = asyncio.get_running_loop()
        for attempt_number in range(1, self._config.max_attempts + 1):
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                break
            try:
                return await attempt(remaining_s), attempt_number
            except _StreamInterrupted as interrupted:
                if loop.time() >= deadline:
                    break
                error, retryable, cause = error_for_status(grpc.StatusCode.UNAVAILABLE, None), True, interrupted
            except grpc.aio.AioRpcError as rpc_error:
                error = error_for_status(rpc_error.code(), _trailing_error_code(rpc_error))
                retryable, cause = rpc_error.code() == grpc.StatusCode.UNAVAILABLE, rpc_error
            backoff_s = self._backoff_s(attempt_number)
            if not retryable or attempt_number == self._config.max_attempts or loop.time() + backoff_s >= deadline:
                raise error from cause
            await asyncio.sleep(backoff_s)
        raise DeadlineExceededError(
            "image embeddings were not delivered before the deadline", code="embedding_deadline_exceeded"
        )

    def _backoff_s(self, failed_attempts: int) -> float:
        cap = self._config.retry_initial_backoff_s * 2 ** (failed_attempts - 1)
        return self._rng.uniform(0, min(cap, self._config.retry_max_backoff_s))
