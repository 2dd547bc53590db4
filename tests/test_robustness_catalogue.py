"""Issue #8: the robustness catalogue (../shared/reference/robustness.md, sections A, B, C and E) end to end.

Every case runs against the real gateway (`create_app`) in front of a real `RayPipeline` over the tiny Flash
checkpoint, started once for the module on an embedded Ray through the product's own `connect_ray`: one language
replica (vLLM CPU) and two vision replicas, each behind its own pipeline:
- `pipeline`: the default image-fetch policy (loopback and private networks refused). The `sentinel` canary HTTP
  server on 127.0.0.1 is exactly what it must never reach: every URL case counts the sentinel's connections.
- `trusted`: the same language replica, and a vision replica allowed to fetch from private networks but only on the
  `origin` canary's port (and one closed port), with short fetch deadlines, so the URL cases that need a reachable
  origin (redirects, slow or endless bodies, error statuses) run against a local server.
A third way in is a real uvicorn socket started through `dvd-serve serve`'s own HTTP setup (`serve._serve_http`),
with an API key, for what only a socket shows (header floods, slowloris, raw path tricks).

A case asserts its status code, the one OpenAI error shape `{"error": {"message", "type", "param", "code"}}`
without traceback, exception text, memory address, file path or internal address (`Stack.assert_error`), and
"unharmed" (`Stack.assert_unharmed`): `/health` and `/ready` answer 200, no replica process was replaced, and a
canary chat with an image succeeds. Items whose behaviour is pinned at unit level name those tests; section C's
transport contract lives in tests/test_transport.py, and only the gateway-level half is added here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import io
import ipaddress
import json
import math
import pickle
import pkgutil
import re
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
import pytest_asyncio
import torch
from PIL import Image

from dvd_serve.server.api import create_app, image_refs
from dvd_serve.server.api.job_builder import RESERVED_MARKERS
from dvd_serve.server.gateway_config import GatewayConfig
from dvd_serve.server.serve_config import PoolConfig, ServeConfig
from dvd_serve.vision_worker import url_fetch
from dvd_serve.vision_worker.image_decode import BOMB_MESSAGE, UNREADABLE_MESSAGE, DecodeLimits, decode_image
from dvd_serve.vision_worker.tiling import plan_tiles
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig
from tests.dvd_fixtures import data_url, free_port, png_bytes, synthetic_image
from tests.test_gateway_api import AsgiCall
from tests.test_image_decode import FORBIDDEN_PAYLOADS, _corrupt_payloads, _encode, _png_declaring, _tiny
from tests.test_transport import Frames, HandBuiltStreamDouble
from tests.test_url_fetch import CanaryServer, endless, fixed, redirect, slow_drip

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

API_KEY = "sk-catalogue-0123456789"
GRPC_TOKEN = "catalogue-grpc-token"
MAX_TOKENS = 4
MAX_MODEL_LEN = 4096
MAX_BODY_BYTES = 4 * 1024 * 1024
TILE_TOKENS = 256  # a tile at detail "high"
LOW_TILE_TOKENS = 64  # a tile the Flash router compresses (detail "low")
REQUEST_BOUND_S = 120.0  # no single request of this file may take longer
FAST_REFUSAL_S = 5.0  # refusals that need no fetch, decode or generation come back within this
FETCH_TIMEOUT_S = 3.0  # the trusted vision replica's whole-fetch deadline
FETCH_MAX_BYTES = 2 * 1024 * 1024
LOGPROB_TOLERANCE = 1e-3  # different images move the tiny model's logprobs by 1e-2 and more
MEMORY_SLACK_BYTES = 96 * 1024 * 1024  # "memory flat": growth of a replica's RSS over one group of cases
HEADER_DEADLINE_S = 10.0  # a client must finish its request head within this (slowloris)


# Text that must never reach a client: tracebacks, exception reprs, addresses, paths, internal IPs.
LEAK_PATTERNS = (
    re.compile(r"Traceback|File \"|, line \d+"),
    re.compile(r"0x[0-9a-fA-F]{6,}|object at "),
    re.compile(r"\b\w+(?:Error|Exception)\("),
    re.compile(r"(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]*"),
    re.compile(r"site-packages|dvd_serve\.\w"),
    re.compile(
        r"\b(?:10|127|169\.254|192\.168|172\.(?:1[6-9]|2\d|3[01])|100\.(?:6[4-9]|[7-9]\d|1[01]\d|12[0-7]))"
        r"(?:\.\d{1,3}){1,3}\b"
    ),
)


# ---------------------------------------------------------------------------------------------------------------
# The stack


def chat_body(content: object, **fields: object) -> dict:
    return {
        "model": "tiny-flash",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        **fields,
    }


def image_part(url: str, **image_fields: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **image_fields}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def bytes_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def image_question(*urls: str, detail: str = "high", **fields: object) -> dict:
    parts = [image_part(url, detail=detail) for url in urls]
    return chat_body([*parts, text_part("What is in the image?")], **fields)


def answer_signature(response: httpx.Response) -> tuple[tuple[str, float], ...]:
    """Greedy tokens with their logprobs: equal only when the model saw the same input."""
    assert response.status_code == 200, response.text
    return tuple((entry["token"], entry["logprob"]) for entry in response.json()["choices"][0]["logprobs"]["content"])


def same_answer(first: tuple[tuple[str, float], ...], second: tuple[tuple[str, float], ...]) -> bool:
    """Same tokens, logprobs equal up to float noise (a prefix-cache hit or another batch changes the last bits)."""
    return [token for token, _ in first] == [token for token, _ in second] and all(
        math.isclose(one, other, abs_tol=LOGPROB_TOLERANCE) for (_, one), (_, other) in zip(first, second)
    )


def signature_request(url: str) -> dict:
    return image_question(url, logprobs=True, ignore_eos=True)


def visual_tokens(response: httpx.Response) -> int:
    return int(response.headers["x-dvd-visual-tokens"])


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def raw_http(port: int, request: bytes, timeout: float = FAST_REFUSAL_S) -> tuple[int | None, bytes]:
    """Sends raw bytes on a new connection; (status or None if the server closed without answering, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionError:
        return None, b""
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return None, answer
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


async def _slowloris_answer(port: int, bound_s: float) -> bytes | None:
    """Drips one header line every 0.5 s; what the server sent before it closed the connection, or None if it
    still held on after `bound_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    received = b""
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
        while time.monotonic() - started < bound_s:
            with contextlib.suppress(TimeoutError):
                received = await asyncio.wait_for(reader.read(65536), 0.5)
                break  # an answer or EOF: the server gave up on the connection
            writer.write(b"X-Drip: 1\r\n")
            await writer.drain()
        else:
            return None
        if received:
            received += await asyncio.wait_for(reader.read(), FAST_REFUSAL_S)
        return received
    except ConnectionError:
        return received
    finally:
        writer.close()


CANARY_IMAGE_URL = data_url(synthetic_image(448, 448, seed=808))


@dataclass
class Stack:
    pipeline: object  # RayPipeline, default fetch policy
    trusted: object  # RayPipeline sharing the language replica, fetching from `origin`
    app: object
    client: httpx.AsyncClient
    trusted_client: httpx.AsyncClient
    origin: CanaryServer
    sentinel: CanaryServer
    closed_port: int
    live_port: int
    secrets: tuple[str, ...]
    baseline_pids: dict[str, int] = field(default_factory=dict)

    @property
    def lm_replica(self):
        return self.pipeline.pools["language"].replicas[0]

    def vision_pid(self, trusted: bool = False) -> int:
        return (self.trusted if trusted else self.pipeline).pools["vision"].replicas[0].info.pid

    def replica_pids(self) -> dict[str, int]:
        return {
            f"{label}:{replica.name}": replica.info.pid
            for label, pipeline in (("default", self.pipeline), ("trusted", self.trusted))
            for pool in pipeline.pools.values()
            for replica in pool.replicas
        }

    async def chat(self, body: dict, *, trusted: bool = False) -> httpx.Response:
        client = self.trusted_client if trusted else self.client
        return await asyncio.wait_for(client.post("/v1/chat/completions", json=body), REQUEST_BOUND_S)

    def assert_no_leak(self, text: str) -> None:
        for pattern in LEAK_PATTERNS:
            assert not pattern.search(text), f"{pattern.pattern!r} in {text!r}"
        for secret in self.secrets:
            assert secret not in text, f"internal value {secret!r} in {text!r}"

    def assert_error(
        self,
        response: httpx.Response,
        status: int,
        *,
        code: str | Collection[str] | None = None,
        param: str | None = None,
        message: str | None = None,
    ) -> dict:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"}
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and isinstance(error["code"], str)
        if code is not None:
            assert error["code"] in ({code} if isinstance(code, str) else set(code)), error
        if param is not None:
            assert error["param"] == param, error
        if message is not None:
            assert error["message"] == message, error
        self.assert_no_leak(response.text)
        return error

    async def assert_unharmed(self, *, trusted: bool = False) -> None:
        """/health and /ready are 200, no replica was replaced, and a canary image chat is answered in full."""
        health = await self.client.get("/health")
        assert health.status_code == 200
        ready = await self.client.get("/ready")
        assert ready.status_code == 200, ready.text
        await self.trusted.readiness()  # refreshes the trusted vision replica's info too
        assert self.replica_pids() == self.baseline_pids
        for use_trusted in (False, True) if trusted else (False,):
            response = await self.chat(image_question(CANARY_IMAGE_URL, ignore_eos=True), trusted=use_trusted)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
            assert visual_tokens(response) == TILE_TOKENS


@pytest.fixture(scope="module")
def module_patch():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_flash_checkpoint, module_patch):
    from transformers import AutoTokenizer

    from dvd_serve.server import serve
    from dvd_serve.server.metrics import ServingMetrics
    from dvd_serve.server.ray_actors import ReplicaPool, VisionActor
    from dvd_serve.server.ray_pipeline import RayPipeline, connect_ray, shutdown_ray

    async with contextlib.AsyncExitStack() as cleanup:
        origin, sentinel = CanaryServer(), CanaryServer()
        for canary in (origin, sentinel):
            await canary.start()
            cleanup.push_async_callback(canary.stop)
        closed_port, live_port = free_port(), free_port()
        config = ServeConfig(
            model=str(tiny_flash_checkpoint),
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            vision_pool=PoolConfig(num_cpus=0),
            language_pool=PoolConfig(num_cpus=0),
            grpc_auth_token=GRPC_TOKEN,
            embeddings_wait_s=30.0,
            gateway=GatewayConfig(
                host="127.0.0.1", port=live_port, api_keys=(API_KEY,), max_body_bytes=MAX_BODY_BYTES
            ),
        )
        trusted_config = config.model_copy(update={"image_fetch": UrlFetchConfig(
            allow_private_networks=True,
            allowed_ports=(origin.port, closed_port),
            connect_timeout_s=FETCH_TIMEOUT_S,
            read_timeout_s=FETCH_TIMEOUT_S,
            total_timeout_s=FETCH_TIMEOUT_S,
            max_bytes=FETCH_MAX_BYTES,
        )})
        progress: list[str] = []
        assert connect_ray(config, progress.append)  # the product's embedded Ray (item E.41 inspects it)
        cleanup.callback(shutdown_ray)
        trusted_vision = ReplicaPool.launch("vision", VisionActor, config.vision_pool, trusted_config, False)
        cleanup.push_async_callback(trusted_vision.stop)
        pipeline, _ = await asyncio.gather(
            RayPipeline.start(config, progress.append, metrics=ServingMetrics()),
            trusted_vision.wait_ready(progress.append),
        )
        cleanup.push_async_callback(pipeline.shutdown)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, config.model, trust_remote_code=True)
        trusted = RayPipeline(
            trusted_config, {"language": pipeline.pools["language"], "vision": trusted_vision}, tokenizer, False,
            ServingMetrics(),
        )
        gateway_config = config.gateway.model_copy(update={"api_keys": ()})
        app = create_app(pipeline, gateway_config)
        clients = []
        for asgi_app in (app, create_app(trusted, gateway_config)):
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url="http://gateway.test")
            clients.append(await cleanup.enter_async_context(client))

        servers: list = []

        class RecordingServer(serve.DrainingServer):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                servers.append(self)

        module_patch.setattr(serve, "DrainingServer", RecordingServer)
        live = asyncio.create_task(serve._serve_http(pipeline, config, ServingMetrics(), "warning"))

        async def stop_live_server() -> None:
            for server in servers:
                server.should_exit = True
            await asyncio.wait_for(live, 30)

        cleanup.push_async_callback(stop_live_server)
        while not (servers and servers[0].started):
            assert not live.done(), live
            await asyncio.sleep(0.05)

        lm_address = pipeline.pools["language"].replicas[0].info.grpc_address
        result = Stack(
            pipeline=pipeline,
            trusted=trusted,
            app=app,
            client=clients[0],
            trusted_client=clients[1],
            origin=origin,
            sentinel=sentinel,
            closed_port=closed_port,
            live_port=live_port,
            secrets=(str(tiny_flash_checkpoint), lm_address, lm_address.rpartition(":")[0], GRPC_TOKEN),
        )
        result.baseline_pids = result.replica_pids()
        yield result


# ---------------------------------------------------------------------------------------------------------------
# A. Requests and media


async def test_a01_bad_base64_and_empty_data_urls_are_400_naming_the_part(stack):
    cases = {
        "data:image/png;base64,!!!!": "invalid_base64",
        "data:image/png;base64,iVBORw0KGgo": "invalid_base64",  # unpadded
        "data:image/png;base64,": "invalid_data_url",
        "data:image/png,rawbytes": "invalid_data_url",
        "data:;base64,AAAA": "invalid_data_url",
        "data:image/png;base64,AAAA": "invalid_image",  # valid base64, not an image: refused by the vision side
        # Spellings the vision side would not read as data URLs are refused at the gateway already.
        "DATA:image/png;base64,AAAA": "unsupported_image_url_scheme",
        "data:image/png;BASE64,AAAA": "invalid_data_url",
    }
    for url, code in cases.items():
        body = chat_body([text_part("Look:"), image_part(url)])
        stack.assert_error(await stack.chat(body), 400, code=code, param="messages[0].content[1].image_url")
    await stack.assert_unharmed()


async def test_a02_mime_never_matters_and_formats_outside_the_allowlist_are_refused_by_sniffing(stack):
    """The bytes decide the format: PNG labelled JPEG is served; EPS (which would run Ghostscript), JPEG2000,
    PSD, FITS and PDF labelled PNG are refused with the allowlist message, which proves no plugin outside the
    allowlist parsed them (tests/test_image_decode.py checks that their plugins never run at all)."""
    png = png_bytes(synthetic_image(448, 448, seed=21))
    assert (await stack.chat(image_question(bytes_url(png, "image/jpeg")))).status_code == 200
    payloads = {name: build() for name, build in FORBIDDEN_PAYLOADS.items()}
    payloads["PDF"] = _encode(Image.new("RGB", (4, 4)), "PDF")
    for name, payload in payloads.items():
        error = stack.assert_error(
            await stack.chat(image_question(bytes_url(payload))), 400, code="invalid_image",
            param="messages[0].content[0].image_url",
        )
        assert error["message"].startswith("The image format is not supported"), (name, error)
    await stack.assert_unharmed()


def _gif_declaring(width: int, height: int) -> bytes:
    """A ~30-byte GIF whose screen and frame claim `width x height` pixels."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + frame + b"\x02\x02\x44\x01\x00;"


async def test_a03_decompression_bombs_are_refused_from_the_header_with_flat_memory(stack):
    vision = stack.vision_pid()
    before = rss(vision)
    for payload in (_png_declaring(40_000, 40_000), _gif_declaring(40_000, 40_000), _png_declaring(12_000, 12_000)):
        started = time.monotonic()
        stack.assert_error(await stack.chat(image_question(bytes_url(payload))), 413, code="image_too_large")
        assert time.monotonic() - started < FAST_REFUSAL_S
    assert rss(vision) - before < MEMORY_SLACK_BYTES
    await stack.assert_unharmed()


async def test_a04_side_limit_boundary_and_extreme_aspect_ratios_are_deterministic_with_capped_tokens(stack):
    widest = data_url(Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1, 64))[:, :, None].repeat(3, 2)))
    assert Image.open(io.BytesIO(base64.b64decode(widest.partition(",")[2]))).size == (16_384, 1)
    first, again = [await stack.chat(image_question(widest, logprobs=True, ignore_eos=True)) for _ in range(2)]
    assert visual_tokens(first) == visual_tokens(again) == 13 * TILE_TOKENS  # 12 tiles + thumbnail, the cap
    assert same_answer(answer_signature(first), answer_signature(again))
    capped = await stack.chat(chat_body([image_part(widest, detail="high", max_tiles=2), text_part("What?")]))
    assert capped.status_code == 200 and visual_tokens(capped) == 3 * TILE_TOKENS
    stack.assert_error(
        await stack.chat(chat_body([image_part(widest, max_tiles=13), text_part("What?")])), 400,
        param="messages[0].content[0].image_url.max_tiles",
    )
    one_over = data_url(Image.new("RGB", (16_385, 1), (10, 20, 30)))
    for url in (one_over, bytes_url(_png_declaring(1, 200_000))):
        stack.assert_error(await stack.chat(image_question(url)), 413, code="image_too_large")


async def test_a05_one_and_two_pixel_images_in_every_mode_are_served_and_the_engine_lives(stack):
    for size in ((1, 1), (1, 2), (2, 1)):
        urls = [bytes_url(_encode(_tiny(mode, size), "PNG")) for mode in ("RGB", "L", "LA", "P")]
        response = await stack.chat(image_question(*urls))
        assert response.status_code == 200, (size, response.text)
        tiles = plan_tiles(*size, 1, 12, 448, True).num_tiles  # 1x1: one tile; 1x2 and 2x1: two + thumbnail
        assert visual_tokens(response) == 4 * tiles * TILE_TOKENS
    await stack.assert_unharmed()


async def test_a06_truncated_and_corrupt_images_get_a_fixed_message(stack):
    for name, payload in _corrupt_payloads().items():
        error = stack.assert_error(
            await stack.chat(image_question(bytes_url(payload))), 400, code="invalid_image",
            param="messages[0].content[0].image_url",
        )
        assert error["message"] == UNREADABLE_MESSAGE, name
    await stack.assert_unharmed()


async def test_a07_odd_modes_decode_to_the_same_rgb_the_model_would_see(stack):
    """CMYK, 16-bit grey and palette+transparency are served; an RGBA image answers exactly like its alpha
    flattened onto white, and an EXIF-rotated image exactly like the upright one (controls: the same pixels
    without flattening or without the EXIF tag answer differently, so equality is not an accident)."""
    photo = synthetic_image(448, 448, seed=31)
    cmyk = bytes_url(_encode(photo.convert("CMYK"), "JPEG"), "image/jpeg")
    grey16 = bytes_url(_encode(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG"))
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    for url in (cmyk, grey16, bytes_url(_encode(palette, "PNG"))):
        response = await stack.chat(image_question(url))
        assert response.status_code == 200, response.text

    rgba = np.dstack([np.asarray(photo), np.linspace(0, 255, 448 * 448, dtype=np.uint8).reshape(448, 448)])
    rgba_image = Image.fromarray(rgba, "RGBA")
    flattened = Image.new("RGB", rgba_image.size, (255, 255, 255))
    flattened.paste(rgba_image, mask=rgba_image.getchannel("A"))
    signatures = {
        name: answer_signature(await stack.chat(signature_request(url)))
        for name, url in {
            "rgba": data_url(rgba_image),
            "flattened": data_url(flattened),
            "alpha dropped": data_url(rgba_image.convert("RGB")),
        }.items()
    }
    assert same_answer(signatures["rgba"], signatures["flattened"])
    assert not same_answer(signatures["rgba"], signatures["alpha dropped"])

    upright = synthetic_image(896, 448, seed=32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes: pixels on their side + a tag
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated = {
        "upright": data_url(upright),
        "exif": bytes_url(_encode(stored, "PNG", exif=exif.tobytes())),
        "no exif": data_url(stored),
    }
    signatures = {name: answer_signature(await stack.chat(signature_request(url))) for name, url in rotated.items()}
    assert same_answer(signatures["exif"], signatures["upright"])
    assert not same_answer(signatures["exif"], signatures["no exif"])


async def test_a08_thousands_of_animation_frames_cost_one_frame(stack):
    palette = [value for index in range(256) for value in ((index * 37) % 256, (index * 11) % 256, 90)]
    frames = []
    for index in range(2000):
        frame = Image.new("P", (64, 64), index % 200)
        frame.putpalette(palette)
        frames.append(frame)
    animation = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    assert Image.open(io.BytesIO(animation)).n_frames == 2000
    first_frame = data_url(decode_image(animation, DecodeLimits()))  # the reference decode: frame 0 only
    last_frame = data_url(frames[-1].convert("RGB"))

    vision = psutil.Process(stack.vision_pid())
    cpu_before = sum(vision.cpu_times()[:2])
    started = time.monotonic()
    animated = answer_signature(await stack.chat(signature_request(bytes_url(animation, "image/gif"))))
    assert time.monotonic() - started < 30
    assert sum(vision.cpu_times()[:2]) - cpu_before < 10
    assert same_answer(animated, answer_signature(await stack.chat(signature_request(first_frame))))
    assert not same_answer(animated, answer_signature(await stack.chat(signature_request(last_frame))))


async def test_a09_oversized_lying_and_compressed_bodies_are_refused_before_buffering(stack):
    # On a real socket: a declared 10 GiB body is refused at once, without sending any of it.
    started = time.monotonic()
    status, _ = await raw_http(stack.live_port, (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10 << 30}\r\nConnection: close\r\n\r\n"
    ).encode())
    assert status == 413 and time.monotonic() - started < FAST_REFUSAL_S

    chunk = b"x" * 65536
    chunks_at_limit = MAX_BODY_BYTES // len(chunk) + 1
    for headers in ([], [("content-length", "100")]):  # chunked upload; a Content-Length that lies
        call = AsgiCall("POST", "/v1/chat/completions", headers=headers, body_chunks=[chunk] * 200)
        await call.run(stack.app)
        assert call.status == 413
        assert call.chunks_delivered <= chunks_at_limit  # read no further than the limit
        stack.assert_no_leak(call.body.decode())
    gzip_body = await stack.client.post(
        "/v1/chat/completions", content=b"\x1f\x8b" + bytes(64), headers={"content-encoding": "gzip"}
    )
    stack.assert_error(gzip_body, 415)
    too_big = await stack.client.post("/v1/chat/completions", content=b"{" + b" " * MAX_BODY_BYTES + b"}")
    stack.assert_error(too_big, 413)
    await stack.assert_unharmed()


async def test_a10_too_many_images_are_refused_before_any_fetch(stack):
    typed_markup = await stack.chat(chat_body("<tool_response>\n42\n</tool_response> <think>"))
    assert typed_markup.status_code == 200, typed_markup.text
    image_url = stack.origin.url("/image.png")
    connections = stack.origin.connections
    for count in (17, 1000):
        body = chat_body([*(image_part(image_url) for _ in range(count)), text_part("Count them.")])
        stack.assert_error(await stack.chat(body, trusted=True), 400, code="too_many_images", param="messages")
    assert stack.origin.connections == connections
    tiny = data_url(Image.new("RGB", (448, 448), (40, 80, 120)))
    at_limit = await stack.chat(image_question(*[tiny] * 16, detail="low"))
    assert at_limit.status_code == 200 and visual_tokens(at_limit) == 16 * LOW_TILE_TOKENS


async def test_a11_max_tokens_outside_the_context_is_400_before_any_vision_work(stack):
    image_url = stack.origin.url("/image.png")
    connections = stack.origin.connections
    for value in (0, -1, 1e9, "x", True, None, MAX_MODEL_LEN, 10**9, 2**70):
        body = image_question(image_url, max_tokens=value)
        if value is None:
            body["max_completion_tokens"] = MAX_MODEL_LEN
            param = "max_completion_tokens"
        else:
            param = "max_tokens"
        stack.assert_error(await stack.chat(body, trusted=True), 400, param=param)
    assert stack.origin.connections == connections


async def test_a11_prompt_over_the_context_is_a_clean_error_and_harms_nothing(stack):
    """Visual tokens are only known after vision: 2 x 13 tiles (6656 tokens) cannot fit 4096."""
    large = data_url(Image.new("RGB", (1792, 1344), (120, 30, 200)))
    stack.assert_error(await stack.chat(image_question(large, large)), 400, code="context_length_exceeded")
    await stack.assert_unharmed()


async def test_a11_prompt_over_the_context_is_400(stack):
    large = data_url(Image.new("RGB", (1792, 1344), (120, 30, 201)))
    stack.assert_error(await stack.chat(image_question(large, large)), 400)


async def test_a11_visual_tokens_plus_max_tokens_over_the_context_is_400(stack):
    large = data_url(Image.new("RGB", (1792, 1344), (120, 30, 202)))  # 13 tiles: 3328 visual tokens
    stack.assert_error(
        await stack.chat(image_question(large, max_tokens=1000)), 400, code="context_length_exceeded",
        param="max_tokens",
    )


async def test_a12_image_markers_typed_as_text_are_refused_and_links_are_never_fetched(stack, tiny_flash_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_flash_checkpoint), trust_remote_code=True)
    # Every special token of the served model is reserved; Qwen3's tool and thinking markup is not special (as in
    # the InternVL3.5 tokenizers) and may be typed, as on vLLM's server.
    special = {added.content for added in tokenizer.added_tokens_decoder.values() if added.special}
    assert special <= set(RESERVED_MARKERS)
    assert set(tokenizer.get_added_vocab()) - special == {"<tool_call>", "</tool_call>", "<tool_response>",
                                                         "</tool_response>", "<think>", "</think>"}
    for marker in RESERVED_MARKERS:
        stack.assert_error(
            await stack.chat(chat_body(f"Describe {marker} please.")), 400, code="reserved_token_in_text",
            param="messages[0].content",
        )
    image_url = stack.origin.url("/image.png")
    connections = stack.origin.connections
    text = f"![cat]({image_url}) <img src=\"{image_url}\"> [link]({image_url}) {image_url}"
    response = await stack.chat(chat_body(text), trusted=True)
    assert response.status_code == 200, response.text
    assert stack.origin.connections == connections


async def test_a13_schema_fuzz_of_the_chat_endpoint_against_the_real_stack(stack):
    """schemathesis on the live socket: generated chat requests, valid and broken, never get a 5xx and every
    answer conforms to the document (every operation is fuzzed against a test double in
    tests/test_schema_fuzz.py); then hand-picked nasty bodies: NUL bytes, lone surrogates, NaN and Infinity,
    huge n, unknown fields and part types, wrong types, a 5000-digit number, 50,000 nested brackets, not UTF-8."""
    from tests.test_schema_fuzz import fuzz_operation

    await asyncio.to_thread(
        fuzz_operation, f"http://127.0.0.1:{stack.live_port}", "POST", "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"}, max_examples=30, model_id=stack.pipeline.model_id,
    )
    prefix = b'{"model":"tiny-flash","max_tokens":4,"messages":[{"role":"user","content":'
    nasty = {
        prefix + b'"a\\u0000b"}]}': 200,
        prefix + b'"\\ud800"}]}': 400,
        prefix + b'"hi"}],"temperature":NaN}': 400,
        prefix + b'"hi"}],"temperature":-Infinity}': 400,
        prefix + b'"hi"}],"n":1000000000000}': 400,
        prefix + b'"hi"}],"unknown":1}': 400,
        prefix + b'[{"type":"input_audio","input_audio":{}}]}]}': 400,
        prefix + b'5}]}': 400,
        prefix + b'"hi"}],"seed":' + b"9" * 5000 + b"}": 400,
        b'{"model":"tiny-flash","messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}": 400,
        b"\xff\xfe{}": 400,
    }
    for raw, status in nasty.items():
        response = await stack.client.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
        if status == 200:
            assert response.status_code == 200, response.text
        else:
            stack.assert_error(response, status)
    await stack.assert_unharmed()


@pytest.mark.parametrize("case", ["huge header", "many headers"])
async def test_a14_header_floods_get_431_and_a_closed_connection(stack, case):
    """Against the socket `dvd-serve serve` opens (its uvicorn settings): a 1 MiB header or 50,000 headers get
    431 in the error shape, or the connection closes while the client is still sending."""
    if case == "huge header":
        extra = b"X-Big: " + b"a" * (1 << 20) + b"\r\n"
    else:
        extra = b"".join(b"X-%d: v\r\n" % index for index in range(50_000))
    status, body = await raw_http(
        stack.live_port, b"GET /health HTTP/1.1\r\nHost: gateway\r\n" + extra + b"Connection: close\r\n\r\n"
    )
    assert status in (None, 431)
    if status is not None:
        assert json.loads(body)["error"]["code"] == "request_header_too_large"


async def test_a14_a_head_just_under_the_limit_is_served(stack):
    extra = b"X-Fill: " + b"a" * (GatewayConfig().max_request_head_bytes - 1024) + b"\r\n"
    status, _ = await raw_http(
        stack.live_port, b"GET /health HTTP/1.1\r\nHost: gateway\r\n" + extra + b"Connection: close\r\n\r\n"
    )
    assert status == 200


async def test_a14_an_unparsable_head_is_400_in_the_error_shape(stack):
    status, body = await raw_http(stack.live_port, b"GET /health HTTP/1.1\r\nHost gateway\r\n\r\n")
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


async def test_a14_slowloris_is_cut_off_with_408(stack):
    """A client dripping one header line every 0.5 s is answered 408 and closed once the head deadline passes."""
    started = time.monotonic()
    answer = await _slowloris_answer(stack.live_port, HEADER_DEADLINE_S + 2)
    assert answer is not None, "the server let a dripping client hold its connection"
    assert HEADER_DEADLINE_S - 1 <= time.monotonic() - started <= HEADER_DEADLINE_S + 2
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_head_timeout"


async def test_a14_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(stack):
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.live_port)
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(reader.read(), HEADER_DEADLINE_S + 2)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started >= HEADER_DEADLINE_S - 1


async def test_a14_the_socket_is_unharmed_after_header_abuse(stack):
    status, body = await raw_http(
        stack.live_port,
        f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
        .encode(),
    )
    assert status == 200 and b"tiny-flash" in body
    await stack.assert_unharmed()


async def test_a14_idle_keep_alive_connections_are_closed(stack):
    """What uvicorn does bound today: a kept-alive connection idle after its answer closes after
    `timeout_keep_alive` (5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.live_port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        while await asyncio.wait_for(reader.read(4096), 10):
            pass  # the rest of the answer, then EOF
        assert time.monotonic() - started < 8
    finally:
        writer.close()


async def test_a15_very_long_text_is_refused_without_stalling_other_requests(stack):
    over_cap = chat_body("a" * (GatewayConfig().max_text_chars + 1))
    started = time.monotonic()
    stack.assert_error(await stack.chat(over_cap), 400, code="text_too_long", param="messages")
    assert time.monotonic() - started < FAST_REFUSAL_S

    async def health_latencies() -> list[float]:
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            assert (await stack.client.get("/health")).status_code == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
        return latencies

    long_text, latencies, short = await asyncio.gather(
        stack.chat(chat_body("word " * 78_000)), health_latencies(), stack.chat(chat_body("Hello."))
    )
    stack.assert_error(long_text, 400, code="context_length_exceeded", param="messages")
    assert max(latencies) < 1.0
    assert short.status_code == 200
    # vLLM's chat-template options: honoured as vLLM honours them, except a request-supplied template.
    for honoured in ({"chat_template_kwargs": {"enable_thinking": True}}, {"add_generation_prompt": True}):
        assert (await stack.chat(chat_body("Hello.", **honoured))).status_code == 200
    stack.assert_error(
        await stack.chat(chat_body("Hello.", chat_template="{{ messages }}")),
        400, code="unsupported_parameter", param="chat_template",
    )
    stack.assert_error(
        await stack.chat(chat_body("Hello.", continue_final_message=True)),
        400, code="invalid_value", param="continue_final_message",
    )
    await stack.assert_unharmed()


# ---------------------------------------------------------------------------------------------------------------
# B. Image URLs


async def test_b16_internal_targets_in_every_spelling_are_refused_without_a_connection(stack):
    port = stack.sentinel.port
    hosts = [
        f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"[::ffff:127.0.0.1]:{port}",
        f"[::ffff:7f00:1]:{port}", f"[::127.0.0.1]:{port}", f"[64:ff9b::7f00:1]:{port}", f"[2002:7f00:1::]:{port}",
        f"0.0.0.0:{port}", f"2130706433:{port}", f"0177.0.0.1:{port}", f"0x7f.0.0.1:{port}", f"127.1:{port}",
        "169.254.169.254", "10.0.0.1", "172.16.0.1", "192.168.0.1", "100.64.0.1", "[fc00::1]", "[fe80::1]",
    ]
    for host in hosts:
        started = time.monotonic()
        response = await stack.chat(image_question(f"http://{host}/latest/meta-data"))
        stack.assert_error(
            response, 400, code=("image_url_blocked", "invalid_image_url"), param="messages[0].content[0].image_url"
        )
        assert time.monotonic() - started < FAST_REFUSAL_S, host  # refused, not tried
    assert stack.sentinel.connections == 0
    await stack.assert_unharmed()


async def test_b17_redirects_are_checked_at_every_hop(stack):
    origin, sentinel = stack.origin, stack.sentinel
    origin.routes.update({
        "/photo.png": fixed(200, png_bytes(synthetic_image(448, 448, seed=51))),
        "/to-sentinel": redirect(f"http://127.0.0.1:{sentinel.port}/photo.png"),
        "/to-unspecified": redirect("http://0.0.0.0:{port}/photo.png"),
        "/to-userinfo": redirect("http://x@127.0.0.1:{port}/photo.png"),
        "/to-file": redirect("file:///etc/passwd"),
        "/short-1": redirect("/short-2"),
        "/short-2": redirect("/photo.png"),
        **{f"/hop-{index}": redirect(f"/hop-{index + 1}") for index in range(11)},
        "/hop-11": fixed(200, png_bytes(synthetic_image(448, 448, seed=52))),
    })
    refusals = {
        "/to-sentinel": "image_url_not_allowed",
        "/to-unspecified": "image_url_blocked",
        "/to-userinfo": "invalid_image_url",
        "/to-file": "unsupported_image_url_scheme",
        "/hop-0": "image_url_too_many_redirects",
    }
    for path, code in refusals.items():
        stack.assert_error(await stack.chat(image_question(origin.url(path)), trusted=True), 400, code=code)
    chain = [path for path, _headers in origin.requests if path.startswith("/hop-")]
    assert chain == [f"/hop-{index}" for index in range(UrlFetchConfig().max_redirects + 1)]
    assert sum(path == "/photo.png" for path, _headers in origin.requests) == 0  # no refused hop was followed
    assert sentinel.connections == 0
    followed = await stack.chat(image_question(origin.url("/short-1")), trusted=True)
    assert followed.status_code == 200, followed.text


async def test_b18_only_the_fetcher_resolves_names_so_the_checked_address_is_the_one_used(stack):
    """The gateway never resolves an image host; the vision side resolves once per hop, checks every answer and
    connects to the checked address itself (pinning against a second, rebinding answer is exercised in
    tests/test_url_fetch.py::test_connection_is_pinned_to_the_checked_address)."""
    lookups: list[str] = []
    loop = asyncio.get_running_loop()
    real_loop_lookup, real_lookup = loop.getaddrinfo, socket.getaddrinfo

    async def recording_loop_lookup(host, *args, **kwargs):
        lookups.append(host)
        return await real_loop_lookup(host, *args, **kwargs)

    def recording_lookup(host, *args, **kwargs):
        lookups.append(host)
        return real_lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "getaddrinfo", recording_loop_lookup)
        patch.setattr(socket, "getaddrinfo", recording_lookup)
        response = await stack.chat(image_question(f"http://localhost:{stack.sentinel.port}/photo.png"))
    stack.assert_error(response, 400, code="image_url_blocked")  # resolved (to loopback) on the vision side
    assert lookups == []
    assert stack.sentinel.connections == 0


async def test_b19_urls_two_parsers_could_read_differently_are_refused_at_the_gateway(stack):
    assert image_refs.parse_image_url is url_fetch.parse_image_url  # one parser for gateway and fetcher
    port, connections = stack.origin.port, stack.origin.connections
    ambiguous = [
        f"http://127.0.0.1:{port}\\@evil.example/image.png",
        f"http://evil.example@127.0.0.1:{port}/image.png",
        f"http://evil.example:{port}#@127.0.0.1:{port}/image.png",
        f"http://127.0.0.1:{port}#@evil.example/image.png",
        f"http://localhost.:{port}/image.png",
        f"http://127.0.0.1.:{port}/image.png",
        f"http://\uff4cocalhost:{port}/image.png",
        f"http://local\u200bhost:{port}/image.png",
        f"http://127.0.0.1:{port}/image.png\t",
        f"http://127.0.0.1:+{port}/image.png",
    ]
    for url in ambiguous:
        started = time.monotonic()
        stack.assert_error(
            await stack.chat(image_question(url), trusted=True), 400, code="invalid_image_url",
            param="messages[0].content[0].image_url",
        )
        assert time.monotonic() - started < FAST_REFUSAL_S
    assert stack.origin.connections == connections


async def test_b20_file_ftp_dot_dot_and_bare_paths_are_refused_at_the_public_gateway(stack):
    port, connections = stack.origin.port, stack.origin.connections
    refused = [
        "file:///etc/passwd", "file://localhost/etc/passwd", f"ftp://127.0.0.1:{port}/image.png",
        f"gopher://127.0.0.1:{port}/", "/etc/passwd", "image.png", "../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd",
        f"http://%2e%2e:{port}/", f"//127.0.0.1:{port}/image.png", "javascript:alert(1)",
        "data:text/html;base64,PGgxPg==",
    ]
    for url in refused:
        stack.assert_error(
            await stack.chat(image_question(url), trusted=True), 400,
            code=("unsupported_image_url_scheme", "invalid_image_url", "invalid_data_url"),
            param="messages[0].content[0].image_url",
        )
    assert stack.origin.connections == connections


async def test_b21_slow_endless_huge_and_html_origins_hit_the_caps_with_flat_memory(stack):
    origin = stack.origin
    origin.routes.update({
        "/slow.png": slow_drip,
        "/endless.png": endless,
        "/huge.png": fixed(200, b"", **{"Content-Length": str(10 << 30)}),
        "/page.html": fixed(200, b"<html><body>hi</body></html>", "text/html"),
        "/page-as.png": fixed(200, b"<html><body>hi</body></html>"),
        "/drawing.svg": fixed(200, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    })
    vision = stack.vision_pid(trusted=True)
    before = rss(vision)
    cases = {
        "/slow.png": (504, "image_url_timeout"),
        "/endless.png": (413, "image_too_large"),
        "/huge.png": (413, "image_too_large"),
        "/page.html": (400, "image_url_not_an_image"),
        "/page-as.png": (400, "image_url_not_an_image"),
        "/drawing.svg": (400, "image_url_not_an_image"),
    }
    for path, (status, code) in cases.items():
        started = time.monotonic()
        stack.assert_error(await stack.chat(image_question(origin.url(path)), trusted=True), status, code=code)
        assert time.monotonic() - started < FETCH_TIMEOUT_S + 3, path
    assert origin.bytes_sent < 16 * FETCH_MAX_BYTES  # the endless body was cut (socket buffers hold the rest)
    assert rss(vision) - before < MEMORY_SLACK_BYTES
    await stack.assert_unharmed(trusted=True)


async def test_b22_origin_failures_map_to_4xx_or_502_without_internals(stack):
    origin = stack.origin
    origin.routes.update({
        "/forbidden.png": fixed(403, b"no", "text/plain"),
        "/broken.png": fixed(500, b"boom", "text/plain"),
    })
    cases = {
        origin.url("/missing.png"): (400, {"image_url_not_found"}),
        origin.url("/forbidden.png"): (400, {"image_url_forbidden"}),
        origin.url("/broken.png"): (502, {"image_url_server_error"}),
        f"https://127.0.0.1:{origin.port}/image.png": (502, {"image_url_tls_error"}),
        f"http://127.0.0.1:{stack.closed_port}/image.png": (502, {"image_url_unreachable"}),
    }
    for url, (status, codes) in cases.items():
        stack.assert_error(await stack.chat(image_question(url), trusted=True), status, code=codes)
    # NXDOMAIN is the client's fault (400); a resolver that cannot answer is upstream's (502, or 504 if it hangs).
    nxdomain = await stack.chat(image_question(f"http://dvd-serve-missing.invalid:{origin.port}/a.png"), trusted=True)
    expected = {400: "image_url_unresolvable", 502: "image_url_dns_failure", 504: "image_url_timeout"}
    assert nxdomain.status_code in expected, nxdomain.text
    stack.assert_error(nxdomain, nxdomain.status_code, code=expected[nxdomain.status_code])
    assert stack.sentinel.connections == 0
    await stack.assert_unharmed(trusted=True)


# ---------------------------------------------------------------------------------------------------------------
# C. Vision -> language hop (gateway level; the transport contract is tests/test_transport.py)


async def test_c23_the_largest_admitted_request_crosses_the_hop_and_overflow_stays_clean(stack):
    """16 images of 13 tiles each (the most the gateway admits): embeddings for 53,248 visual tokens cross the
    hop, and the prompt that cannot fit the context is refused cleanly (the 33 MiB worst case at hidden 5120 is
    tests/test_transport.py::test_worst_case_33_mib_image_fits_by_chunking)."""
    urls = [data_url(Image.new("RGB", (1792, 1344), (index * 15, 90, 200 - index * 10))) for index in range(16)]
    stack.assert_error(await stack.chat(image_question(*urls)), 400, code="context_length_exceeded")
    await stack.assert_unharmed()


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


async def test_c24_c25_c26_malformed_pushes_never_reach_the_engine_and_pickle_is_never_loaded(stack, tmp_path):
    """Pushes to the live language replica's embedding sink, as a rogue vision peer would send them: wrong dtype,
    hidden size and rank, NaN, a multi-TiB header, a bad checksum, missing chunks, no credentials, pickle and
    torch.save payloads. Each is refused with a gRPC status; nothing is unpickled; the engine holds no request
    and the replica (same process) keeps answering."""
    from dvd_serve.common.checkpoint.spec import CheckpointSpec
    from dvd_serve.proto.v1 import embeddings_pb2 as pb
    from dvd_serve.proto.wire import method_path

    target = stack.lm_replica.info.grpc_address
    sink_binds = {
        connection.laddr.ip for connection in psutil.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == int(target.rpartition(":")[2])
    }
    assert sink_binds and not sink_binds & {"0.0.0.0", "::"}  # the cluster network only, never every interface
    hidden = CheckpointSpec.from_dir(stack.pipeline.config.model).llm_hidden
    auth = (("authorization", f"Bearer {GRPC_TOKEN}"),)

    def frames(tensor: torch.Tensor, tokens_per_tile=(TILE_TOKENS,)) -> Frames:
        return Frames.of(tensor, list(tokens_per_tile), chunk_bytes=1 << 20)

    def declaring(shape: list[int], total_bytes: int | None = None) -> Frames:
        edited = frames(good)
        edited.header.shape[:] = shape
        if total_bytes is not None:
            edited.header.total_bytes = total_bytes
        return edited

    good = torch.randn(TILE_TOKENS, hidden)
    with_nan = good.clone()
    with_nan[3, 5] = math.nan
    corrupted = frames(good)
    corrupted.chunks[0] = bytes([corrupted.chunks[0][0] ^ 1]) + corrupted.chunks[0][1:]
    malformed = {
        "NaN": frames(with_nan),
        "another model's hidden size": frames(torch.randn(TILE_TOKENS, hidden // 2)),
        "dtype the engine does not run": frames(good.to(torch.bfloat16)),
        "rank 3": declaring([1, TILE_TOKENS, hidden]),
        "token counts that do not add up": frames(good, (TILE_TOKENS, LOW_TILE_TOKENS)),
        "multi-TiB header": declaring([1 << 32, hidden], (1 << 32) * hidden * 4),
        "bad checksum": corrupted,
    }
    streams = {name: edited.messages() for name, edited in malformed.items()}
    streams["header only"] = frames(good).messages(order=[])
    async with HandBuiltStreamDouble(target, auth) as peer:
        for name, messages in streams.items():
            status, code = await peer.refusal(messages)
            assert status == grpc.StatusCode.INVALID_ARGUMENT and (code or "").startswith("embedding_"), name
    async with HandBuiltStreamDouble(target) as anonymous:
        status, _ = await anonymous.refusal(frames(good).messages())
        assert status == grpc.StatusCode.UNAUTHENTICATED

    marker = tmp_path / "unpickled"
    saved = io.BytesIO()
    torch.save({"payload": _CreatesFileWhenUnpickled(str(marker))}, saved)
    async with grpc.aio.insecure_channel(target) as channel:
        push = channel.stream_unary(method_path("Push"), request_serializer=None,
                                    response_deserializer=pb.PushReply.FromString)
        for payload in (pickle.dumps(_CreatesFileWhenUnpickled(str(marker))), saved.getvalue()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await push(iter([payload]), metadata=auth, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not marker.exists()
    assert await stack.lm_replica.handle.engine_requests.remote() == 0
    await stack.assert_unharmed()


async def test_c27_vision_past_the_deadline_is_504_and_both_sides_let_go(stack):
    origin = stack.origin
    origin.routes["/deadline.png"] = slow_drip
    short_deadline = create_app(stack.trusted, GatewayConfig(request_timeout_s=1.5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=short_deadline), base_url="http://gw") as client:
        response = await client.post("/v1/chat/completions", json=image_question(origin.url("/deadline.png")))
    stack.assert_error(response, 504, code="request_timeout")  # the gateway's deadline, not the fetch's (3 s)
    replicas = [stack.trusted.pools["vision"].replicas[0], stack.lm_replica]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        busy = await asyncio.gather(*(replica.handle.outstanding.remote() for replica in replicas))
        engine = await stack.lm_replica.handle.engine_requests.remote()
        if not any(busy) and engine == 0:
            break
        await asyncio.sleep(0.2)
    assert not any(busy) and engine == 0
    assert stack.trusted.in_flight == 0
    await stack.assert_unharmed(trusted=True)


async def test_c28_c29_retries_and_keepalive_are_bounded_on_both_ends(stack):
    """Bounded retries with jitter and the duplicate-safe sink are exercised in tests/test_transport.py
    (test_sender_retries_unavailable_until_the_server_is_up, test_sink_restart_mid_stream_is_retried_and_stored_once,
    test_sender_gives_up_on_unavailable_after_bounded_attempts); this pins the deployed settings that bound
    them: gRPC's own retries off, finite attempts and push deadline, and keepalive agreed by both ends so a
    black-holed peer is detected within keepalive time + timeout."""
    from dvd_serve.proto.channel_options import TransportTuning, client_channel_options, server_options
    from dvd_serve.vision_worker.embedding_sender import EmbeddingSenderConfig

    tuning = TransportTuning()
    client, server = dict(client_channel_options(tuning)), dict(server_options(tuning))
    assert client["grpc.enable_retries"] == 0
    assert client["grpc.keepalive_time_ms"] == server["grpc.keepalive_time_ms"] == 1000 * tuning.keepalive_time_s
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert tuning.keepalive_time_s + tuning.keepalive_timeout_s <= 60
    assert 1 <= EmbeddingSenderConfig(target="x:1").max_attempts <= 10
    assert math.isfinite(stack.pipeline.config.push_timeout_s)


# ---------------------------------------------------------------------------------------------------------------
# E. Configuration


PROTECTED_PATHS = [
    "/v1/models", "//v1/models", "/v1//models", "/v1/./models", "/v1/../v1/models", "/v1/%2E/models",
    "/v1%2Fmodels", "/v1/models/", "/V1/models", "/v1/models/tiny-flash", "/metrics", "/openapi.json", "/docs",
    "/health/", "//health", "/./health", "/%68ealth", "/health%2F..%2Fv1%2Fmodels", "/health/../v1/models",
    "/ready/", "/nonexistent",
]


async def test_e40_every_path_but_the_public_ones_needs_the_key_on_the_real_socket(stack):
    async def get(path: str, authorization: str | None = None) -> tuple[int | None, bytes]:
        header = f"Authorization: {authorization}\r\n" if authorization else ""
        request = f"GET {path} HTTP/1.1\r\nHost: gateway\r\n{header}Connection: close\r\n\r\n"
        return await raw_http(stack.live_port, request.encode())

    for path in PROTECTED_PATHS:
        status, body = await get(path)
        assert status == 401, (path, status, body)
        stack.assert_no_leak(body.decode())
    for authorization in ("Bearer wrong-key", f"Basic {API_KEY}", "Bearer", f"bearer  {API_KEY}x"):
        assert (await get("/v1/models", authorization))[0] == 401, authorization
    post = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    assert (await raw_http(stack.live_port, post.encode()))[0] == 401
    assert (await get("/v1/models", f"Bearer {API_KEY}"))[0] == 200
    for public in ("/health", "/ready"):
        assert (await get(public))[0] == 200, public


async def test_e41_embedded_ray_serves_nothing_unauthenticated_beyond_loopback(stack):
    """The embedded Ray `connect_ray` starts: no Ray client server, its dashboard (if any) on loopback only, and
    every port it opens on other interfaces (GCS, raylet, workers) behind Ray's token authentication. The
    embedding sink that shares the node IP checks its own token (item C.25, test_c24_c25_c26_...)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    commands = {child.pid: " ".join(child.cmdline()) for child in psutil.Process().children(recursive=True)}
    assert any("gcs_server" in command for command in commands.values())  # the tree holds this module's Ray
    assert not any("client.server" in command or "ray_client_server" in command for command in commands.values())
    listeners = [
        (connection.laddr.ip, commands[connection.pid])
        for connection in psutil.net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN and connection.pid in commands
    ]
    assert all(_is_loopback(address) for address, command in listeners if "dashboard/dashboard.py" in command)
    exposed = [command.split()[0] for address, command in listeners if not _is_loopback(address)]
    assert not exposed or is_token_auth_enabled(), exposed


def _is_loopback(text: str) -> bool:
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


async def test_e42_pillows_pixel_guard_survives_every_model_import(stack):
    """In the vision replica (which has imported its model code): a PNG declaring 196 megapixels, over twice
    Pillow's MAX_IMAGE_PIXELS but under the side limit, is stopped by Pillow's guard (its own message); with the
    guard disabled it would reach our header check and get a different message. Here: importing every
    vision-side module leaves the guard at Pillow's default."""
    stack.assert_error(
        await stack.chat(image_question(bytes_url(_png_declaring(14_000, 14_000)))), 413, code="image_too_large",
        message=BOMB_MESSAGE,
    )
    pillow_default = int(1024 * 1024 * 1024 // 4 // 3)
    for package in ("common", "vision_worker", "router"):
        root = importlib.import_module(f"dvd_serve.{package}")
        for module in pkgutil.walk_packages(root.__path__, f"{root.__name__}."):
            importlib.import_module(module.name)
    importlib.import_module("transformers.models.internvl.modeling_internvl")
    assert Image.MAX_IMAGE_PIXELS == pillow_default


KNOWN_CACHES = {
    "common/checkpoint/tokenizer.py:_tokenizer_json",  # no arguments (the generated tiny tokenizer)
    "vision_worker/tiling.py:candidate_grids",  # keyed by tile counts and grid order only
    "vision_worker/url_fetch.py:_tls_context",  # no arguments
}


def _memoised_functions() -> set[str]:
    import ast

    found = set()
    for package in ("common", "vision_worker", "lm_worker", "router", "server", "proto"):
        root = Path(importlib.import_module(f"dvd_serve.{package}").__path__[0])
        for source in root.rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                    "cache" in ast.unparse(decorator) for decorator in node.decorator_list
                ):
                    found.add(f"{package}/{source.relative_to(root).as_posix()}:{node.name}")
    return found


async def test_e43_images_with_the_same_token_layout_never_share_cached_state(stack):
    """dvd-serve keeps no image or embedding cache of its own (its memoised functions are pinned in
    KNOWN_CACHES, none keyed by image data); the one cache that sees image content is vLLM's prefix cache (on by
    default). The same bytes laid out as 896x448 and as 448x896 give the same placeholder tokens (3 tiles each):
    if the cache key ignored the embeddings, the second would reuse the first's KV and answer identically. The
    control shows that equal input answers alike."""
    assert _memoised_functions() == KNOWN_CACHES
    wide = synthetic_image(896, 448, seed=61)
    tall = Image.frombytes("RGB", (448, 896), wide.tobytes())
    first = await stack.chat(signature_request(data_url(wide)))
    swapped = await stack.chat(signature_request(data_url(tall)))
    repeated = await stack.chat(signature_request(data_url(wide)))
    assert first.json()["usage"]["prompt_tokens"] == swapped.json()["usage"]["prompt_tokens"]
    assert same_answer(answer_signature(first), answer_signature(repeated))
    assert not same_answer(answer_signature(first), answer_signature(swapped))


async def test_e44_no_failure_anywhere_leaks_internals(stack):
    """One request per failing layer, every body checked (every other case in this file checks its own too):
    routing, methods, body framing, validation with hostile keys, vision decode, URL policy and fetch, engine
    refusal, and the streaming variants."""
    hostile_key = {"/etc/passwd": 1}
    answers = [
        await stack.client.get("/nonexistent/../../etc/passwd"),
        await stack.client.delete("/v1/chat/completions"),
        await stack.client.post("/v1/chat/completions", content=b"{not json"),
        await stack.client.post("/v1/chat/completions", json={**chat_body("hi"), **hostile_key}),
        await stack.chat(image_question(bytes_url(_corrupt_payloads()["truncated png"]))),
        await stack.chat(image_question(bytes_url(_png_declaring(40_000, 40_000)), stream=True)),
        await stack.chat(image_question("http://169.254.169.254/latest/meta-data", stream=True)),
        await stack.chat(image_question(stack.origin.url("/broken.png")), trusted=True),
        await stack.chat(chat_body("word " * 78_000, stream=True)),
    ]
    for response in answers:
        assert response.status_code >= 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        stack.assert_error(response, response.status_code)
    assert "?etc?passwd" in answers[3].json()["error"]["param"]  # client keys are echoed only made printable
