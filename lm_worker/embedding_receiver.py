"""The language worker's gRPC edge: the EmbeddingSink server that validates pushes and fills the EmbeddingStore.

Everything a peer declares is checked before it is stored, and the header before a byte is allocated. Failures
end the call with a status and a fixed message (see `dvd_serve.proto.status`); the partial buffer is released
on every way out: a bad chunk, a truncated stream, a client that cancels or runs past its deadline, a push that
takes longer than `max_push_s`, a `Cancel` of its request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc

from dvd_serve.common.errors import DeadlineExceededError, InvalidRequestError, ServingError
from dvd_serve.lm_worker.embedding_store import EmbeddingStore
from dvd_serve.lm_worker.embedding_validation import (
    EmbeddingLimits,
    validate_chunk_payload,
    validate_chunk_position,
    validate_header,
    validate_request_id,
    validate_stream_complete,
)
from dvd_serve.proto.channel_options import TransportTuning, server_options
from dvd_serve.proto.framing import PROTO_VERSION, DeclaredTensor, ReassemblyBuffer, declared_tensor, wire_dtype
from dvd_serve.proto.status import ERROR_CODE_METADATA_KEY, status_for_error
from dvd_serve.proto.v1 import embeddings_pb2 as pb
from dvd_serve.proto.wire import SERVICE_NAME, ChunkView, decode_push_message

_LOGGER = logging.getLogger(__name__)
AUTHORIZATION_METADATA_KEY = "authorization"
PushMessage = pb.TensorHeader | ChunkView | None


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """Which model the language worker serves, for `Info`."""

    model_id: str
    revision: str


InfoProvider = Callable[[], ModelIdentity]
HealthProvider = Callable[[], Awaitable[bool]]


def _invalid(message: str, code: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=code)


class _PushTimer:
    """Nanosecond split of one push into validation and everything else."""

    def __init__(self) -> None:
        self.started_ns = time.perf_counter_ns()
        self.validate_ns = 0

    def timings(self, stream_ended_ns: int) -> pb.PushTimings:
        return pb.PushTimings(
            receive_ns=stream_ended_ns - self.started_ns,
            validate_ns=self.validate_ns,
            total_ns=time.perf_counter_ns() - self.started_ns,
        )


class EmbeddingSinkServicer:
    """Handlers of the EmbeddingSink service; register with `embedding_sink_handler`."""

    def __init__(
        self,
        store: EmbeddingStore,
        limits: EmbeddingLimits,
        info_provider: InfoProvider,
        health_provider: HealthProvider,
        *,
        auth_token: str | None,
        tuning: TransportTuning,
        max_push_s: float,
    ) -> None:
        self._store = store
        self._limits = limits
        self._info_provider = info_provider
        self._health_provider = health_provider
        self._expected_authorization = None if auth_token is None else f"Bearer {auth_token}".encode()
        self._tuning = tuning
        self._max_push_s = max_push_s

    async def push(self, messages: AsyncIterator[PushMessage], context: grpc.aio.ServicerContext) -> pb.PushReply:
        try:
            self._authorize(context)
            async with asyncio.timeout(self._max_push_s):
                return await self._receive(aiter(messages))
        except TimeoutError:
            error: ServingError = DeadlineExceededError("embedding push took too long", code="embedding_push_too_slow")
        except ServingError as serving_error:
            error = serving_error
        except Exception:
            _LOGGER.exception("embedding push failed unexpectedly")
            error = ServingError("embedding push failed", code="embedding_push_failed")
        await self._abort(context, error)

    async def _receive(self, messages: AsyncIterator[PushMessage]) -> pb.PushReply:
        timer = _PushTimer()
        header = await anext(messages, None)
        if not isinstance(header, pb.TensorHeader):
            raise _invalid("embedding stream must start with a header", "embedding_header_missing")
        declared = declared_tensor(header)
        layout = validate_header(declared, self._limits)
        timer.validate_ns += time.perf_counter_ns() - timer.started_ns
        if self._is_duplicate(declared):
            return pb.PushReply(accepted_bytes=0, duplicate=True, timings=timer.timings(time.perf_counter_ns()))
        reservation = self._store.reserve(
            declared.request_id, declared.image_index, declared.total_bytes, declared.content_hash
        )
        try:
            buffer = ReassemblyBuffer(declared.total_bytes)
            received = 0
            async for message in messages:
                self._store.check_current(reservation)
                if not isinstance(message, ChunkView):
                    raise _invalid("embedding stream carries an unexpected message", "embedding_message_unexpected")
                checked_ns = time.perf_counter_ns()
                validate_chunk_position(layout, received, message.sequence, len(message.data))
                validate_chunk_payload(message.data, declared.chunk_checksums[received], declared.dtype)
                timer.validate_ns += time.perf_counter_ns() - checked_ns
                buffer.write(layout.span(received)[0], message.data)
                received += 1
            stream_ended_ns = time.perf_counter_ns()
            validate_stream_complete(layout, received)
            embeddings = buffer.to_tensor(declared.dtype, declared.shape)
            self._store.complete(reservation, embeddings, declared.tokens_per_tile)
        finally:
            self._store.release(reservation)
        return pb.PushReply(
            accepted_bytes=declared.total_bytes, duplicate=False, timings=timer.timings(stream_ended_ns)
        )

    def _is_duplicate(self, declared: DeclaredTensor) -> bool:
        delivered_hash = self._store.delivered_content_hash(declared.request_id, declared.image_index)
        if delivered_hash is None:
            return False
        if delivered_hash and declared.content_hash and delivered_hash != declared.content_hash:
            raise _invalid("image was already pushed with different content", "embedding_duplicate_conflict")
        return True

    async def info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        await self._authorize_or_abort(context)
        identity = self._info_provider()
        limits = self._limits
        return pb.InfoReply(
            model_id=identity.model_id,
            model_revision=identity.revision,
            llm_hidden_size=limits.llm_hidden_size,
            accepted_dtypes=[wire_dtype(dtype) for dtype in limits.accepted_torch_dtypes()],
            limits=pb.EmbeddingLimitsInfo(
                max_tokens_per_image=limits.max_tokens_per_image,
                max_images_per_request=limits.max_images_per_request,
                max_message_bytes=self._tuning.max_message_bytes,
                max_tensor_bytes=limits.max_tensor_bytes,
                min_chunk_bytes=limits.min_chunk_bytes,
                max_chunk_bytes=limits.max_chunk_bytes,
                max_tiles_per_image=limits.max_tiles_per_image,
                allowed_tokens_per_tile=list(limits.allowed_tokens_per_tile),
            ),
            proto_version=PROTO_VERSION,
        )

    async def health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        await self._authorize_or_abort(context)
        self._store.evict_expired()
        serving = await self._health_provider()
        status = pb.SERVING_STATUS_SERVING if serving else pb.SERVING_STATUS_NOT_SERVING
        return pb.HealthReply(status=status)

    async def cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelReply:
        await self._authorize_or_abort(context)
        try:
            validate_request_id(request.request_id)
        except ServingError as error:
            await self._abort(context, error)
        outcome = self._store.cancel(request.request_id)
        return pb.CancelReply(images_dropped=outcome.images_dropped, bytes_freed=outcome.bytes_freed)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected_authorization is None:
            return
        presented = b""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(presented, self._expected_authorization):
            raise ServingError("missing or invalid credentials", code="embedding_sink_unauthenticated")

    async def _authorize_or_abort(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self._authorize(context)
        except ServingError as error:
            await self._abort(context, error)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, error: ServingError) -> NoReturn:
        await context.abort(
            status_for_error(error), error.message, trailing_metadata=((ERROR_CODE_METADATA_KEY, error.code),)
        )


def embedding_sink_handler(servicer: EmbeddingSinkServicer) -> grpc.GenericRpcHandler:
    """The service's method table. Push uses the chunk codec from `dvd_serve.proto.wire` instead of protobuf's."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Push": grpc.stream_unary_rpc_method_handler(
                servicer.push,
                request_deserializer=decode_push_message,
                response_serializer=pb.PushReply.SerializeToString,
            ),
            "Info": grpc.unary_unary_rpc_method_handler(
                servicer.info,
                request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.InfoReply.SerializeToString,
            ),
            "Health": grpc.unary_unary_rpc_method_handler(
                servicer.health,
                request_deserializer=pb.HealthRequest.FromString,
                response_serializer=pb.HealthReply.SerializeToString,
            ),
            "Cancel": grpc.unary_unary_rpc_method_handler(
                servicer.cancel,
                request_deserializer=pb.CancelRequest.FromString,
                response_serializer=pb.CancelReply.SerializeToString,
            ),
        },
    )


async def start_embedding_server(
    store: EmbeddingStore,
    limits: EmbeddingLimits,
    info_provider: InfoProvider,
    health_provider: HealthProvider,
    host: str = "127.0.0.1",
    port: int = 0,
    auth_token: str | None = None,
    *,
    tuning: TransportTuning | None = None,
    max_push_s: float = 60.0,
) -> tuple[grpc.aio.Server, int]:
    """Starts the EmbeddingSink on `host:port` (port 0 picks a free one); returns the server and the bound port.

    Bind to the cluster-internal address only; with `auth_token` every call must carry `authorization: Bearer
    <token>` metadata. The caller stops the server (`await server.stop(grace)`).
    """
    tuning = tuning or TransportTuning()
    if limits.max_chunk_bytes > tuning.max_chunk_bytes:
        raise ValueError("limits.max_chunk_bytes exceeds the transport's max_chunk_bytes")
    servicer = EmbeddingSinkServicer(
        store,
        limits,
        info_provider,
        health_provider,
        auth_token=auth_token,
        tuning=tuning,
        max_push_s=max_push_s,
    )
    server = grpc.aio.server(options=server_options(tuning))
    server.add_generic_rpc_handlers((embedding_sink_handler(servicer),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound_port = server.add_insecure_port(address)
    await server.start()
    return server, bound_port
