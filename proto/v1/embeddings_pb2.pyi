from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_BF16: _ClassVar[Dtype]
    DTYPE_FP16: _ClassVar[Dtype]
    DTYPE_FP32: _ClassVar[Dtype]

class ChecksumAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_ALGORITHM_UNSPECIFIED: _ClassVar[ChecksumAlgorithm]
    CHECKSUM_ALGORITHM_CRC32: _ClassVar[ChecksumAlgorithm]

class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATUS_UNSPECIFIED: _ClassVar[ServingStatus]
    SERVING_STATUS_SERVING: _ClassVar[ServingStatus]
    SERVING_STATUS_NOT_SERVING: _ClassVar[ServingStatus]
DTYPE_UNSPECIFIED: Dtype
DTYPE_BF16: Dtype
DTYPE_FP16: Dtype
DTYPE_FP32: Dtype
CHECKSUM_ALGORITHM_UNSPECIFIED: ChecksumAlgorithm
CHECKSUM_ALGORITHM_CRC32: ChecksumAlgorithm
SERVING_STATUS_UNSPECIFIED: ServingStatus
SERVING_STATUS_SERVING: ServingStatus
SERVING_STATUS_NOT_SERVING: ServingStatus

class PushMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: TensorHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("request_id", "image_index", "dtype", "shape", "llm_hidden_size", "tokens_per_tile", "content_hash", "total_bytes", "checksum_algorithm", "chunk_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LLM_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image_index: int
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    llm_hidden_size: int
    tokens_per_tile: _containers.RepeatedScalarFieldContainer[int]
    content_hash: bytes
    total_bytes: int
    checksum_algorithm: ChecksumAlgorithm
    chunk_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., image_index: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., llm_hidden_size: _Optional[int] = ..., tokens_per_tile: _Optional[_Iterable[int]] = ..., content_hash: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., checksum_algorithm: _Optional[_Union[ChecksumAlgorithm, str]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sequence", "checksum", "data")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    checksum: int
    data: bytes
    def __init__(self, sequence: _Optional[int] = ..., checksum: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted_bytes", "duplicate", "timings")
    ACCEPTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    accepted_bytes: int
    duplicate: bool
    timings: PushTimings
    def __init__(self, accepted_bytes: _Optional[int] = ..., duplicate: _Optional[bool] = ..., timings: _Optional[_Union[PushTimings, _Mapping]] = ...) -> None: ...

class PushTimings(_message.Message):
    __slots__ = ("receive_ns", "validate_ns", "total_ns")
    RECEIVE_NS_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    receive_ns: int
    validate_ns: int
    total_ns: int
    def __init__(self, receive_ns: _Optional[int] = ..., validate_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_id", "model_revision", "llm_hidden_size", "accepted_dtypes", "limits", "proto_version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    LLM_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PROTO_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_revision: str
    llm_hidden_size: int
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    limits: EmbeddingLimitsInfo
    proto_version: str
    def __init__(self, model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., llm_hidden_size: _Optional[int] = ..., accepted_dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., limits: _Optional[_Union[EmbeddingLimitsInfo, _Mapping]] = ..., proto_version: _Optional[str] = ...) -> None: ...

class EmbeddingLimitsInfo(_message.Message):
    __slots__ = ("max_tokens_per_image", "max_images_per_request", "max_message_bytes", "max_tensor_bytes", "min_chunk_bytes", "max_chunk_bytes", "max_tiles_per_image", "allowed_tokens_per_tile")
    MAX_TOKENS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TILES_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    max_tokens_per_image: int
    max_images_per_request: int
    max_message_bytes: int
    max_tensor_bytes: int
    min_chunk_bytes: int
    max_chunk_bytes: int
    max_tiles_per_image: int
    allowed_tokens_per_tile: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_tokens_per_image: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., min_chunk_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_tiles_per_image: _Optional[int] = ..., allowed_tokens_per_tile: _Optional[_Iterable[int]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ServingStatus
    def __init__(self, status: _Optional[_Union[ServingStatus, str]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("images_dropped", "bytes_freed")
    IMAGES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    images_dropped: int
    bytes_freed: int
    def __init__(self, images_dropped: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...
