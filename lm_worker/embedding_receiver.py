"""The language worker's gRPC edge: the EmbeddingSink server that validates pushes and fills the EmbeddingStore.

Everything a peer declares is checked before it is stored, and the header before a byte is allocated. Failures
end the call with a status and a fixed message (see `dvd_serve.proto.status`); the partial buffer is released
on every way out: a bad chunk, a truncated stream, a client that cancels or runs past its deadline, a push that
takes longer than `max_push_s`, a `Cancel` of its request.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn

import grpc
import torch
from google.protobuf.message_factory import GetMessageClass

from dvd_serve.common.errors import DeadlineExceededError, InvalidRequestError, ServingError
from dvd_serve.lm_worker.embedding_store import EmbeddingStore, Reservation
from dvd_serve.lm_worker.embedding_validation import (
    EmbeddingLimits,
    validate_chunk_payload,
    validate_chunk_position,
    validate_header,
    validate_request_id,
    validate_stream_complete,
)
from dvd_serve.proto.channel_options import TransportTuning, server_options
from dvd_serve.proto.framing import (
    PROTO_VERSION,
    ChunkLayout,
    DeclaredTensor,
    ReassemblyBuffer,
    declared_tensor,
    wire_dtype,
)
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
# Sync or async: whether the engine behind the sink can take work now.
HealthProvider = Callable[[], bool | Awaitable[bool]]


def _invalid(message: str, code: str) -> InvalidRequestError:
    return InvalidRequestError(message, code=code)


def _reply(
    accepted_bytes: int, duplicate: bool, *, started_ns: int, stream_ended_ns: int, validate_ns: int
) -> pb.PushReply:
    timings = pb.PushTimings(
        receive_ns=stream_ended_ns - started_ns,
        validate_ns=validate_ns,
        total_ns=time.perf_counter_ns() - started_ns,
    )
    return pb.PushReply(accepted_bytes=accepted_bytes, duplicate=duplicate, timings=timings)


def _fill_and_check(buffer: ReassemblyBuffer, offset: int, chunk: ChunkView, dtype: torch.dtype) -> int:
    """Worker-thread job: copy one chunk into place and check it there; returns nanoseconds spent checking."""
    region = buffer.fill(offset, chunk.data)
    started_ns = time.perf_counter_ns()
    validate_chunk_payload(region, chunk.checksum, dtype)
    return time.perf_counter_ns() - started_ns


def _retrieve_result(job: asyncio.Future[int]) -> None:
    """Marks a chunk job's failure as seen once another failure already ended the push."""
    if not job.cancelled():
        job.exception()


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
        chunk_workers: int,
    ) -> None:
        self._store = store
        self._limits = limits
        self._info_provider = info_provider
        self._health_provider = health_provider
        self._expected_authorization = None if auth_token is None else f"Bearer {auth_token}".encode()
        self._tuning = tuning
        self._max_push_s = max_push_s
        self._chunk_workers = ThreadPoolExecutor(max_workers=chunk_workers, thread_name_prefix="embedding-chunks")

    async def push(self, messages: AsyncIterator[PushMessage], context: grpc.aio.ServicerContext) -> pb.PushReply:
        """Receives one image. A refused push is still read to its end (into nothing) before the error goes back.

        A client-streaming call that ends while the client is still writing reaches the client as a write
        failure that grpc.aio reports as INTERNAL, hiding the real status. Draining first makes the sender see
        the status and fixed message it should act on (e.g. RESOURCE_EXHAUSTED -> 429); `max_push_s` bounds it.
        """
        try:
            self._authorize(context)  # unauthenticated streams are not read at all
        except ServingError as error:
            await self._abort(context, error)
        stream = aiter(messages)
        try:
            async with asyncio.timeout(self._max_push_s):
                try:
                    return await self._receive(stream)
                except ServingError as serving_error:
                    # Dropping the traceback drops the failed frame's receive buffer before the drain.
                    error: ServingError = serving_error.with_traceback(None)
                    async for _ in stream:
                        pass
        except TimeoutError:
            error = DeadlineExceededError("embedding push took too long", code="embedding_push_too_slow")
        except Exception:
            _LOGGER.exception("embedding push failed unexpectedly")
            error = ServingError("embedding push failed", code="embedding_push_failed")
        await self._abort(context, error)

    async def _receive(self, messages: AsyncIterator[PushMessage]) -> pb.PushReply:
        started_ns = time.perf_counter_ns()
        header = await anext(messages, None)
        if not isinstance(header, pb.TensorHeader):
            raise _invalid("embedding stream must start with a header", "embedding_header_missing")
        header_checked_ns = time.perf_counter_ns()
        declared = declared_tensor(header)
        layout = validate_header(declared, self._limits)
        validate_ns = time.perf_counter_ns() - header_checked_ns
        if self._is_duplicate(declared):
            async for _ in messages:
                pass  # see `push`: the reply waits for the end of the stream
            stream_ended_ns = time.perf_counter_ns()
            return _reply(0, True, started_ns=started_ns, stream_ended_ns=stream_ended_ns, validate_ns=validate_ns)
        reservation = self._store.reserve(
            declared.request_id, declared.image_index, declared.total_bytes, declared.content_hash
        )
        try:
            embeddings, chunks_validate_ns = await self._receive_payload(messages, declared, layout, reservation)
            stream_ended_ns = time.perf_counter_ns()
            self._store.complete(reservation, embeddings, declared.tokens_per_tile)
        finally:
            self._store.release(reservation)
        validate_ns += chunks_validate_ns
        return _reply(
            declared.total_bytes, False, started_ns=started_ns, stream_ended_ns=stream_ended_ns, validate_ns=validate_ns
        )

    async def _receive_payload(
        self,
        messages: AsyncIterator[PushMessage],
        declared: DeclaredTensor,
        layout: ChunkLayout,
        reservation: Reservation,
    ) -> tuple[torch.Tensor, int]:
        """Reads the chunks into a new buffer; returns the tensor and the time spent checking chunks.

        Copying a chunk into place and checking its checksum and finiteness run on worker threads, so the
        event loop goes straight back to reading the next chunk.
        """
        assert declared.dtype is not None  # validate_header passed
        loop = asyncio.get_running_loop()
        buffer = ReassemblyBuffer(declared.total_bytes)
        chunk_jobs: list[asyncio.Future[int]] = []
        try:
            async for message in messages:
                self._store.check_current(reservation)
                if not isinstance(message, ChunkView):
                    raise _invalid("embedding stream carries an unexpected message", "embedding_message_unexpected")
                sequence = len(chunk_jobs)
                validate_chunk_position(layout, sequence, message.sequence, len(message.data))
                offset = layout.span(sequence)[0]
                chunk_jobs.append(
                    loop.run_in_executor(self._chunk_workers, _fill_and_check, buffer, offset, message, declared.dtype)
                )
            validate_stream_complete(layout, len(chunk_jobs))
            check_ns = sum([await job for job in chunk_jobs])
        finally:
            for job in chunk_jobs:
                job.add_done_callback(_retrieve_result)
        self._store.check_current(reservation)
        return buffer.to_tensor(declared.dtype, declared.shape), check_ns

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
        serving = self._health_provider()
        if inspect.isawaitable(serving):
            serving = await serving
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
    """The service's method table, read from the descriptor: each method goes to the servicer method of the same
    name in snake case. Push decodes with `dvd_serve.proto.wire` instead of protobuf (see there)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["EmbeddingSink"].methods:
        behaviour = getattr(servicer, method.name.lower())
        serialize_reply = GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                behaviour, request_deserializer=decode_push_message, response_serializer=serialize_reply
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=GetMessageClass(method.input_type).FromString,
                response_serializer=serialize_reply,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


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
    chunk_workers: int = 2,
) -> tuple[grpc.aio.Server, int]:
    """Starts the EmbeddingSink on `host:port` (port 0 picks a free one); returns the server and the bound port.

    Bind to the cluster-internal address only; with `auth_token` every call must carry `authorization: Bearer
    <token>` metadata. `max_push_s` bounds one push even when the client set no deadline; `chunk_workers` threads
    copy and check chunks. The caller stops the server (`await server.stop(grace)`) and keeps a reference to it
    meanwhile: a grpc.aio server that is garbage-collected stops serving.
    """
    if chunk_workers < 1:
        raise ValueError("chunk_workers must be at least 1")
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
        chunk_workers=chunk_workers,
    )
    server = grpc.aio.server(options=server_options(tuning))
    server.add_generic_rpc_handlers((embedding_sink_handler(servicer),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound_port = server.add_insecure_port(address)
    await server.start()
    return server, bound_port
