"""Shared helpers for end-to-end tests: deterministic test images, a local image origin, a local Ray with the
serve config the Ray tests use, and a monolithic vLLM reference run."""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import select
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from dvd_serve.loadtests.systems import free_port  # noqa: F401 (re-exported for the tests)

# (width, height) chosen so the default tiling (max 12 + thumbnail) gives 1, 3, 5, 7, 10 and 13 tiles.
SIZES_BY_TILES = {1: (448, 448), 3: (896, 448), 5: (896, 896), 7: (1344, 896), 10: (1344, 1344), 13: (1792, 1344)}


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over a gradient: every tile differs, so routing and tokens depend on the image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-60, 60, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def monolithic_vllm_greedy(
    model: str, prompts: Sequence[tuple[str, Sequence[Image.Image]]], *, trust_remote_code: bool, max_tokens: int,
    max_model_len: int = 8192, hf_overrides: dict | None = None,
) -> list[list[int]]:
    """Greedy token ids from vLLM run monolithically on pixels (its own preprocessing and vision tower)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, trust_remote_code=trust_remote_code, dtype="float32", max_model_len=max_model_len,
        enforce_eager=True, distributed_executor_backend="uni", limit_mm_per_prompt={"image": 4},
        hf_overrides=hf_overrides or {}, seed=0,
    )
    try:
        outputs = llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"image": list(images)}} for prompt, images in prompts],
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            use_tqdm=False,
        )
        return [list(output.outputs[0].token_ids) for output in outputs]
    finally:
        del llm
        gc.collect()


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Polls `condition` until it holds or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


class ImageOrigin:
    """A local http server for test images (a test double of a remote image host).

    `images` maps paths to PNG bytes. While `hold()` is in force, paths under `/held/` answer only after
    `release()`: a fetch of one is then in progress for as long as the test wants. `held_fetches` counts fetches
    that reached a held path; `abandoned` counts those whose client hung up before the answer.
    """

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.held_fetches = 0
        self.abandoned = 0
        self._released = threading.Event()
        self._released.set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "ImageOrigin":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = origin.images.get(self.path.removeprefix("/held"))
                if body is None:
                    self.send_error(404)
                    return
                if self.path.startswith("/held/"):
                    origin.held_fetches += 1
                    while not origin._released.wait(0.02):
                        if _peer_closed(self.connection):
                            origin.abandoned += 1
                            return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the fetching worker died meanwhile

            def log_message(self, *args) -> None:
                pass

        return Handler


def _peer_closed(connection: socket.socket) -> bool:
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray whose custom resources stand in for vision and language GPUs (2 of each)."""
    import ray

    ray.init(
        num_cpus=2, resources={"vision_gpu": 2, "lm_gpu": 2}, include_dashboard=False,
        object_store_memory=200 * 1024**2,
    )
    yield
    ray.shutdown()


def ray_test_config(model, topology: str = "dvd", vision_replicas: int = 2, **settings):
    """The `ServeConfig` the Ray tests run: float32, replicas placed on `local_ray`'s stand-in resources."""
    from dvd_serve.server.serve_config import PoolConfig, ServeConfig

    vision_pool = settings.pop("vision_pool", {})
    language_pool = settings.pop("language_pool", {})
    return ServeConfig(
        model=str(model),
        topology=topology,
        dtype="float32",
        vision_pool=PoolConfig(replicas=vision_replicas, num_cpus=0, resources={"vision_gpu": 1}, **vision_pool),
        language_pool=PoolConfig(num_cpus=0, resources={"lm_gpu": 1}, **language_pool),
        grpc_auth_token="pipeline-test-token",
        **settings,
    )


@contextlib.contextmanager
def running(*servers: "ServerProcess", timeout_s: float = 600) -> Iterator[tuple["ServerProcess", ...]]:
    """Waits until every server answers its readiness path (else fails with their logs), yields them, and stops
    them all on the way out."""
    try:
        deadline = time.monotonic() + timeout_s
        pending = list(servers)
        while pending and time.monotonic() < deadline:
            pending = [server for server in pending if not server.is_ready()]
            time.sleep(1)
        if pending:
            pytest.fail("not ready in time: " + "; ".join(f"{s.name}:\n{s.log_tail()}" for s in pending))
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


class ServerProcess:
    """A server started as a subprocess (dvd-serve or vLLM's own), its output in `log`."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log: Path) -> None:
        self.name, self.port, self.ready_path, self.log = name, port, ready_path, log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
