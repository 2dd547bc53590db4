"""The committed gRPC stubs are what the generator makes, every .proto element is documented, and the Push codec
agrees with protobuf byte for byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from dvd_serve.proto import generate
from dvd_serve.proto.v1 import embeddings_pb2 as pb
from dvd_serve.proto.wire import ChunkView, decode_push_message, encode_chunk, encode_header

# Field numbers inside descriptor.proto, used to address elements in SourceCodeInfo location paths.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _MESSAGE_ONEOFS = 2, 3, 4, 8
_ENUM_VALUES, _SERVICE_METHODS = 2, 2


def _committed_and_regenerated(tmp_path: Path) -> list[tuple[Path, Path]]:
    written = generate.generate(tmp_path)
    assert written, "the generator wrote nothing"
    return [(generate.PROTO_ROOT / path.relative_to(tmp_path), path) for path in written]


def test_committed_stubs_are_reproducible(tmp_path: Path) -> None:
    pairs = _committed_and_regenerated(tmp_path)
    expected_names = {name for proto in generate.proto_files() for name in generate.generated_names(proto)}
    assert {committed.relative_to(generate.PROTO_ROOT) for committed, _ in pairs} == expected_names
    for committed, regenerated in pairs:
        assert committed.exists(), f"{committed} is not committed; run python -m dvd_serve.proto.generate"
        assert committed.read_bytes() == regenerated.read_bytes(), f"{committed} is stale; regenerate the stubs"


def test_stubs_import_under_the_package_name() -> None:
    grpc_stub_source = (generate.PROTO_ROOT / "v1" / "embeddings_pb2_grpc.py").read_text()
    assert "from dvd_serve.proto.v1 import embeddings_pb2" in grpc_stub_source
    assert pb.DESCRIPTOR.package == "dvd_serve.v1"
    assert pb.DESCRIPTOR.name == "dvd_serve/proto/v1/embeddings.proto"


def _documented_paths(tmp_path: Path) -> tuple[descriptor_pb2.FileDescriptorProto, dict[tuple[int, ...], str]]:
    descriptor_set = tmp_path / "embeddings.desc"
    generate.run_protoc(
        [
            f"-I{generate.IMPORT_PREFIX}={generate.PROTO_ROOT}",
            f"--descriptor_set_out={descriptor_set}",
            "--include_source_info",
            f"{generate.IMPORT_PREFIX}/v1/embeddings.proto",
        ]
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    assert len(files) == 1
    comments = {
        tuple(location.path): (location.leading_comments + location.trailing_comments).strip()
        for location in files[0].source_code_info.location
    }
    return files[0], comments


def _element_paths(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Path -> readable name of every message, field, oneof, enum, enum value, service and method."""
    paths: dict[tuple[int, ...], str] = {}

    def add_enum(prefix: tuple[int, ...], enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        paths[prefix] = f"{scope}{enum.name}"
        for index, value in enumerate(enum.value):
            paths[prefix + (_ENUM_VALUES, index)] = f"{scope}{enum.name}.{value.name}"

    def add_message(prefix: tuple[int, ...], message: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = f"{scope}{message.name}"
        paths[prefix] = name
        for index, field in enumerate(message.field):
            paths[prefix + (_MESSAGE_FIELDS, index)] = f"{name}.{field.name}"
        for index, oneof in enumerate(message.oneof_decl):
            paths[prefix + (_MESSAGE_ONEOFS, index)] = f"{name}.{oneof.name}"
        for index, nested in enumerate(message.nested_type):
            add_message(prefix + (_MESSAGE_NESTED, index), nested, f"{name}.")
        for index, enum in enumerate(message.enum_type):
            add_enum(prefix + (_MESSAGE_ENUMS, index), enum, f"{name}.")

    for index, message in enumerate(file.message_type):
        add_message((_FILE_MESSAGES, index), message, "")
    for index, enum in enumerate(file.enum_type):
        add_enum((_FILE_ENUMS, index), enum, "")
    for index, service in enumerate(file.service):
        paths[(_FILE_SERVICES, index)] = service.name
        for method_index, method in enumerate(service.method):
            paths[(_FILE_SERVICES, index, _SERVICE_METHODS, method_index)] = f"{service.name}.{method.name}"
    return paths


def test_every_proto_element_has_a_comment(tmp_path: Path) -> None:
    file, comments = _documented_paths(tmp_path)
    elements = _element_paths(file)
    assert len(elements) > 60  # the walk really covered the file
    undocumented = sorted(name for path, name in elements.items() if not comments.get(path))
    assert undocumented == []


def test_enums_reserve_zero_for_unspecified() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.name


@pytest.mark.parametrize("sequence", [0, 1, 127, 128, 300, 2**21, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_384, 2**20 + 3])
@pytest.mark.parametrize("checksum", [0, 1, 0xDEADBEEF])
def test_chunk_codec_matches_protobuf(sequence: int, size: int, checksum: int) -> None:
    data = random.Random(sequence * 7 + size).randbytes(size)
    encoded = encode_chunk(sequence, checksum, memoryview(data))
    chunk = pb.TensorChunk(sequence=sequence, checksum=checksum, data=data)
    assert encoded == pb.PushMessage(chunk=chunk).SerializeToString()
    decoded = decode_push_message(encoded)
    assert isinstance(decoded, ChunkView)
    assert (decoded.sequence, decoded.checksum, bytes(decoded.data)) == (sequence, checksum, data)


def test_decoder_falls_back_to_protobuf_for_other_layouts() -> None:
    data = b"\x01\x02\x03"
    # Data first, a repeated sequence (the last wins) and an unknown field 15: valid protobuf the fast path skips.
    inner = b"\x1a\x03" + data + b"\x08\x05" + b"\x15\x07\x00\x00\x00" + b"\x78\x01" + b"\x08\x06"
    reordered = b"\x12" + bytes([len(inner)]) + inner
    expected = pb.PushMessage.FromString(reordered).chunk
    decoded = decode_push_message(reordered)
    assert isinstance(decoded, ChunkView)
    actual = (decoded.sequence, decoded.checksum, bytes(decoded.data))
    assert actual == (expected.sequence, expected.checksum, expected.data) == (6, 7, data)


def test_decoder_returns_headers_and_refuses_garbage() -> None:
    header = pb.TensorHeader(request_id="r", shape=[256, 8], tokens_per_tile=[256], chunk_bytes=1024)
    decoded = decode_push_message(encode_header(header))
    assert decoded == header
    assert decode_push_message(b"") is None  # neither header nor chunk
    assert decode_push_message(b"\x12\x05\x08") is None  # truncated
    assert decode_push_message(b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01") is None  # overlong varint
