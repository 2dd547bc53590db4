"""Tensor <-> wire framing for the EmbeddingSink contract: dtype enum, header, chunk layout, checksums, reassembly.

Sending never copies the tensor: chunks are memoryview slices over its bytes (the wire codec then copies each
into its message once). Receiving copies each chunk once, into a buffer allocated when the header has been
validated, and the finished buffer becomes the tensor in place.
Bytes are only ever reinterpreted as numbers of the declared dtype; nothing is unpickled or `torch.load`ed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from isal.isal_zlib import crc32 as _isal_crc32

from dvd_serve.proto.v1 import embeddings_pb2 as pb

PROTO_VERSION = "dvd_serve.v1"

_TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.bfloat16: pb.DTYPE_BF16,
    torch.float16: pb.DTYPE_FP16,
    torch.float32: pb.DTYPE_FP32,
}
_WIRE_TO_TORCH: dict[int, torch.dtype] = {wire: dtype for dtype, wire in _TORCH_TO_WIRE.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    """The `Dtype` enum value for a torch dtype; ValueError for dtypes the contract cannot carry."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {sorted(map(str, _TORCH_TO_WIRE))}") from None


def torch_dtype(wire: int) -> torch.dtype | None:
    """The torch dtype for a `Dtype` enum value, or None for UNSPECIFIED and values this build does not know."""
    return _WIRE_TO_TORCH.get(wire)


@dataclass(frozen=True, slots=True)
class ChunkLayout:
    """How `total_bytes` are cut into chunks: all of `chunk_bytes` except the last, which holds the remainder."""

    total_bytes: int
    chunk_bytes: int

    @property
    def count(self) -> int:
        return -(-self.total_bytes // self.chunk_bytes)

    def span(self, sequence: int) -> tuple[int, int]:
        """Byte range [start, stop) of chunk `sequence` within the tensor."""
        start = sequence * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.total_bytes)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order as a flat read-only view, without copying a contiguous CPU tensor.

    bf16 has no numpy dtype, so the tensor is reinterpreted as uint8 first; the view keeps the tensor alive.
    """
    flat = tensor.detach().contiguous().view(torch.uint8).reshape(-1)
    return memoryview(flat.numpy()).toreadonly()


def iter_chunks(payload: memoryview, layout: ChunkLayout) -> Iterator[tuple[int, memoryview]]:
    """(sequence, slice) for every chunk; the slices share memory with `payload`."""
    for sequence in range(layout.count):
        start, stop = layout.span(sequence)
        yield sequence, payload[start:stop]


def checksum(data: memoryview | bytes) -> int:
    """CHECKSUM_ALGORITHM_CRC32 of one chunk: zlib's CRC-32, computed by ISA-L with carry-less multiplication
    (the same values as `zlib.crc32`, about 11x faster here). It releases the GIL while it runs."""
    return _isal_crc32(data)


@dataclass(frozen=True, slots=True)
class DeclaredTensor:
    """What a Push header declares, in plain Python types, for validation away from protobuf."""

    request_id: str
    image_index: int
    dtype: torch.dtype | None  # None: UNSPECIFIED or a value this build does not know
    shape: tuple[int, ...]
    llm_hidden_size: int
    tokens_per_tile: tuple[int, ...]
    content_hash: bytes
    total_bytes: int
    checksum_is_crc32: bool
    chunk_bytes: int


def declared_tensor(header: pb.TensorHeader) -> DeclaredTensor:
    """The header's declarations; nothing is checked yet."""
    return DeclaredTensor(
        request_id=header.request_id,
        image_index=header.image_index,
        dtype=torch_dtype(header.dtype),
        shape=tuple(header.shape),
        llm_hidden_size=header.llm_hidden_size,
        tokens_per_tile=tuple(header.tokens_per_tile),
        content_hash=header.content_hash,
        total_bytes=header.total_bytes,
        checksum_is_crc32=header.checksum_algorithm == pb.CHECKSUM_ALGORITHM_CRC32,
        chunk_bytes=header.chunk_bytes,
    )


def build_header(
    *,
    request_id: str,
    image_index: int,
    embeddings: torch.Tensor,
    tokens_per_tile: Sequence[int],
    chunk_bytes: int,
    content_hash: bytes = b"",
) -> pb.TensorHeader:
    """The header for `embeddings` [tokens, llm_hidden]."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [tokens, llm_hidden], got shape {tuple(embeddings.shape)}")
    if sum(tokens_per_tile) != embeddings.shape[0]:
        raise ValueError(f"tokens_per_tile {list(tokens_per_tile)} do not add up to {embeddings.shape[0]} rows")
    return pb.TensorHeader(
        request_id=request_id,
        image_index=image_index,
        dtype=wire_dtype(embeddings.dtype),
        shape=list(embeddings.shape),
        llm_hidden_size=embeddings.shape[1],
        tokens_per_tile=list(tokens_per_tile),
        content_hash=content_hash,
        total_bytes=embeddings.numel() * embeddings.element_size(),
        checksum_algorithm=pb.CHECKSUM_ALGORITHM_CRC32,
        chunk_bytes=chunk_bytes,
    )


class ReassemblyBuffer:
    """Uninitialised memory for one incoming tensor; chunks are copied in at their offsets, then viewed as a tensor.

    Allocate only after the header has been validated: the size comes from the peer. `fill` copies through
    numpy, which releases the GIL, so chunks may be filled from worker threads (each into its own region).
    """

    def __init__(self, total_bytes: int) -> None:
        self._storage = torch.empty(total_bytes, dtype=torch.uint8)
        self._bytes = self._storage.numpy()

    def fill(self, offset: int, data: memoryview | bytes) -> memoryview:
        """Copies `data` in at `offset`; returns the written region (for checks that run after the copy)."""
        region = self._bytes[offset : offset + len(data)]
        region[:] = np.frombuffer(data, dtype=np.uint8)
        return memoryview(region)

    def writable_view(self) -> memoryview:
        """The whole buffer, for `socket.recv_into`-style filling."""
        return memoryview(self._bytes)

    def to_tensor(self, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The filled buffer as a tensor of `dtype` and `shape`, sharing its memory."""
        return self._storage.view(dtype).view(*shape)
