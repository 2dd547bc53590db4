"""Byte-level codec for `PushMessage`, the one message type that carries bulk data.

The Push RPC is registered with these functions as its (de)serializers instead of the generated protobuf ones.
Encoding a chunk writes the protobuf wire format directly around a memoryview of the tensor, so the tensor is
copied once (into the message) instead of three times (into a field, into the message, into bytes). Decoding
recognises the exact layout `encode_chunk` produces and returns a view into the received bytes; every other
input, including valid protobuf with unknown fields or another field order, goes through the protobuf parser.
The result is the same either way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from dvd_serve.proto.v1 import embeddings_pb2 as pb

# Protobuf tag bytes: (field_number << 3) | wire_type; wire type 0 = varint, 2 = length-delimited, 5 = fixed32.
_TAG_PUSH_CHUNK = 0x12  # PushMessage.chunk = 2, length-delimited
_TAG_CHUNK_SEQUENCE = 0x08  # TensorChunk.sequence = 1, varint
_TAG_CHUNK_CHECKSUM = 0x15  # TensorChunk.checksum = 2, fixed32
_TAG_CHUNK_DATA = 0x1A  # TensorChunk.data = 3, length-delimited
_FIXED32 = struct.Struct("<I")
_UINT32_LIMIT = 1 << 32
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A decoded `TensorChunk` whose data is a view into the received message."""

    sequence: int
    checksum: int
    data: memoryview


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_varint(raw: bytes, position: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the varint runs past the end or past 10 bytes."""
    value = 0
    for shift_index in range(_MAX_VARINT_BYTES):
        if position >= len(raw):
            return None
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << (7 * shift_index)
        if not byte & 0x80:
            return value, position
    return None


def encode_header(header: pb.TensorHeader) -> bytes:
    """The first message of a Push stream."""
    return pb.PushMessage(header=header).SerializeToString()


def encode_chunk(sequence: int, checksum: int, data: memoryview) -> bytes:
    """A `PushMessage{chunk{sequence, checksum, data}}`, byte-identical to protobuf's own serialisation."""
    inner_prefix = b""
    if sequence:
        inner_prefix += bytes((_TAG_CHUNK_SEQUENCE,)) + _encode_varint(sequence)
    if checksum:
        inner_prefix += bytes((_TAG_CHUNK_CHECKSUM,)) + _FIXED32.pack(checksum)
    if len(data):
        inner_prefix += bytes((_TAG_CHUNK_DATA,)) + _encode_varint(len(data))
    inner_length = len(inner_prefix) + len(data)
    outer_prefix = bytes((_TAG_PUSH_CHUNK,)) + _encode_varint(inner_length)
    return b"".join((outer_prefix, inner_prefix, data))


def _decode_chunk_fast(raw: bytes) -> ChunkView | None:
    """The chunk in `raw` if it has exactly `encode_chunk`'s layout, else None."""
    if not raw or raw[0] != _TAG_PUSH_CHUNK:
        return None
    parsed = _decode_varint(raw, 1)
    if parsed is None or parsed[0] + parsed[1] != len(raw):
        return None
    position = parsed[1]
    sequence = 0
    if position < len(raw) and raw[position] == _TAG_CHUNK_SEQUENCE:
        parsed = _decode_varint(raw, position + 1)
        if parsed is None or parsed[0] >= _UINT32_LIMIT:
            return None
        sequence, position = parsed
    checksum = 0
    if position < len(raw) and raw[position] == _TAG_CHUNK_CHECKSUM:
        if position + 1 + _FIXED32.size > len(raw):
            return None
        (checksum,) = _FIXED32.unpack_from(raw, position + 1)
        position += 1 + _FIXED32.size
    if position == len(raw):
        return ChunkView(sequence, checksum, memoryview(b""))
    if raw[position] != _TAG_CHUNK_DATA:
        return None
    parsed = _decode_varint(raw, position + 1)
    if parsed is None or parsed[0] + parsed[1] != len(raw):
        return None
    return ChunkView(sequence, checksum, memoryview(raw)[parsed[1] :])


def decode_push_message(raw: bytes) -> pb.TensorHeader | ChunkView | None:
    """A Push stream message as its header or chunk; None when it is not valid protobuf or sets neither."""
    fast = _decode_chunk_fast(raw)
    if fast is not None:
        return fast
    try:
        message = pb.PushMessage.FromString(raw)
    except DecodeError:
        return None
    body = message.WhichOneof("body")
    if body == "header":
        return message.header
    if body == "chunk":
        chunk = message.chunk
        return ChunkView(chunk.sequence, chunk.checksum, memoryview(chunk.data))
    return None


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingSink"].full_name


def method_path(method: str) -> str:
    """The HTTP/2 path of an EmbeddingSink method, e.g. `/dvd_serve.v1.EmbeddingSink/Push`."""
    return f"/{SERVICE_NAME}/{method}"
