"""`dvd-serve serve`: start the vision and language pools on Ray and the OpenAI-compatible gateway in front.

Without `--model` it serves the embedded default, a tiny random Flash checkpoint made once in the user cache.
Without `--address` it starts an embedded Ray whose custom resources are exactly what the pools ask for.

Shutdown (SIGTERM or SIGINT): `/ready` fails at once and new requests get 503, requests already running finish
(for at most `--drain-timeout` seconds), then the HTTP server stops, the replicas release their models and an
embedded Ray shuts down; the exit status is 0. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

import uvicorn
from pydantic import ValidationError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
API_KEYS_ENV = "DVD_SERVE_API_KEY"
T = TypeVar("T")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint behind an OpenAI-compatible API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random Flash checkpoint, made once)")
    parser.add_argument("--host", default="127.0.0.1", help="interface the HTTP server binds (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--topology", choices=("dvd", "coupled"), default="dvd",
                        help="dvd: separate vision and language pools; coupled: both in one replica (baseline)")
    parser.add_argument("--max-model-len", type=int,
                        help="context length (default: the checkpoint's, lowered to what the KV cache holds)")
    parser.add_argument("--max-images-per-request", type=int, default=16, help="images per request (default: 16)")
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                        help="language engines' scheduling: fcfs, or priority (honours each request's `priority`)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="requests a language replica decodes together")
    parser.add_argument("--tool-call-parser", metavar="NAME", help="vLLM tool-call parser (e.g. hermes), or none; "
                        "default: auto, chosen from the checkpoint (hermes for the Qwen-based members)")
    parser.add_argument("--reasoning-parser", metavar="NAME", help="vLLM reasoning parser (e.g. qwen3, deepseek_r1), "
                        "or none; default: auto (qwen3 when the chat template has an enable_thinking switch)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help=f"accepted bearer key (repeatable; ${API_KEYS_ENV}, comma-separated, keeps keys out of "
                        "the process list); none turns authentication off")
    parser.add_argument("--address", help="Ray cluster to join, e.g. head:6379 (export RAY_AUTH_MODE=token if it "
                        "uses token authentication); default: start an embedded Ray")
    parser.add_argument("--num-cpus", type=int, help="CPUs the embedded Ray declares (default: this machine's)")
    for pool, name in (("vision", "vision"), ("lm", "language")):
        parser.add_argument(f"--{pool}-replicas", type=int, default=1, help=f"{name} replicas (default: 1)")
        parser.add_argument(f"--{pool}-gpus-per-replica", type=float,
                            help=f"GPUs per {name} replica (default: 1 if the cluster has GPUs, else 0)")
        parser.add_argument(f"--{pool}-cpus-per-replica", type=float, default=1.0,
                            help=f"CPUs per {name} replica (default: 1)")
        parser.add_argument(f"--{pool}-resources", type=json.loads, default={}, metavar="JSON",
                            help=f"custom Ray resources per {name} replica, e.g. '{{\"{pool}_gpu\": 1}}'")
        parser.add_argument(f"--{pool}-max-outstanding", type=int, metavar="N",
                            help=f"admission bound: requests the {name} pool may hold per live replica (running or "
                            "queued) before new ones get 429 + Retry-After; 0 = no bound (default: 128)")
    _add_limit_arguments(parser)
    parser.add_argument("--allow-private-image-urls", action="store_true",
                        help="let image URLs point at loopback/private addresses (tests, trusted networks only)")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to load every replica")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds running requests may take to finish on shutdown (default: 30)")
    _add_fault_arguments(parser)
    _add_cache_arguments(parser)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.set_defaults(run=run)
    return parser


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    """Waiting out restarting replicas, and memory diagnosis; defaults from their config fields."""
    from dvd_serve.server.serve_config import MemoryReportConfig, ServeConfig

    wait_s = ServeConfig.model_fields["replica_wait_s"].default
    interval_s = MemoryReportConfig.model_fields["interval_s"].default
    parser.add_argument("--replica-wait", type=float, metavar="SECONDS",
                        help="how long a request waits for a pool whose replicas are all restarting, or for another "
                        "language replica when its own died before the first token, before 503 + Retry-After; "
                        f"0 = refuse at once (default: {wait_s:g})")
    parser.add_argument("--memory-report", metavar="DIR",
                        help="every replica appends samples of its own memory (RSS, malloc, Python objects) to "
                        f"DIR/memory-<role>-<pid>.csv every {interval_s:g} s, to diagnose growth (default: off)")


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Caches of repeated work; defaults from their config fields."""
    from dvd_serve.server.serve_config import ServeConfig

    parser.add_argument("--vision-cache-mib", type=float, metavar="MIB",
                        help="host memory per vision replica for its cache of encoded images, so a repeated image "
                        "skips decoding, tiling and the ViT; 0 turns it off (default: "
                        f"{ServeConfig.model_fields['vision_cache_mib'].default:g})")


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Request limits; each defaults to its config field's default (see docs/limits.md)."""
    from dvd_serve.server.gateway_config import GatewayConfig
    from dvd_serve.vision_worker.image_decode import DecodeLimits

    gateway, decode = GatewayConfig.model_fields, DecodeLimits.model_fields
    parser.add_argument("--max-tiles-per-image", type=int, metavar="N",
                        help="most tiles (thumbnail excluded) an image is cut into, whatever the request asks "
                        f"(default: {gateway['max_tiles_per_image'].default})")
    parser.add_argument("--max-image-pixels", type=int, metavar="N",
                        help="largest width x height accepted, read from the image header before decoding "
                        f"(default: {decode['max_pixels'].default})")
    parser.add_argument("--request-timeout", type=float, metavar="SECONDS",
                        help=f"total time a chat request may take before 504 (default: "
                        f"{gateway['request_timeout_s'].default:g})")
    parser.add_argument("--retry-after", type=int, metavar="SECONDS",
                        help=f"Retry-After value sent with 429 and 503 (default: {gateway['retry_after_s'].default})")


def config_from_args(args: argparse.Namespace):
    """The deployment the command line describes (generates the default model and a gRPC token when needed)."""
    from dvd_serve.server.default_model import ensure_default_model
    from dvd_serve.server.serve_config import ServeConfig

    model = args.model or str(ensure_default_model())
    document: dict[str, Any] = {
        "model": model,
        "topology": args.topology,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_images_per_request": args.max_images_per_request,
        "max_num_seqs": args.max_num_seqs,
        "scheduling_policy": args.scheduling_policy,
        **_given({"tool_call_parser": args.tool_call_parser, "reasoning_parser": args.reasoning_parser,
                  "vision_cache_mib": args.vision_cache_mib}),
        "vision_pool": _pool(args, "vision"),
        "language_pool": _pool(args, "lm"),
        "image_fetch": {"allow_private_networks": args.allow_private_image_urls},
        "image_decode": _given({"max_pixels": args.max_image_pixels}),
        "grpc_auth_token": secrets.token_urlsafe(32),
        "gateway": {
            "host": args.host,
            "port": args.port,
            "api_keys": list(dict.fromkeys([*args.api_key, *_keys_from_environment()])),
            "max_images_per_request": args.max_images_per_request,
            **_given({
                "max_tiles_per_image": args.max_tiles_per_image,
                "request_timeout_s": args.request_timeout,
                "retry_after_s": args.retry_after,
            }),
        },
        "ray_address": args.address,
        "embedded_num_cpus": args.num_cpus,
        "startup_timeout_s": args.startup_timeout,
        "drain_timeout_s": args.drain_timeout,
        **_given({"replica_wait_s": args.replica_wait}),
        **({"memory_report": {"folder": args.memory_report}} if args.memory_report else {}),
    }
    return ServeConfig.model_validate(document)


def _keys_from_environment() -> list[str]:
    return [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` without the flags left out of the command line (their config defaults apply)."""
    return {key: value for key, value in settings.items() if value is not None}


def _pool(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    values = vars(args)
    max_outstanding = values[f"{prefix}_max_outstanding"]
    return {
        "replicas": values[f"{prefix}_replicas"],
        "num_gpus": values[f"{prefix}_gpus_per_replica"],
        "num_cpus": values[f"{prefix}_cpus_per_replica"],
        "resources": values[f"{prefix}_resources"],
        **({} if max_outstanding is None else {"max_outstanding_per_replica": max_outstanding or None}),
    }


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError) as error:
        print(f"serve: invalid settings: {error}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.log_level))


async def serve(config, log_level: str = "info") -> int:
    """Runs `config` (a `ServeConfig`) until SIGTERM/SIGINT; returns the exit status."""
    from dvd_serve.server.metrics import ServingMetrics
    from dvd_serve.server.ray_pipeline import RayPipeline, connect_ray, shutdown_ray

    owns_ray = False
    try:
        owns_ray = connect_ray(config, _report)  # first: ray.init installs its own SIGTERM handler
        metrics = ServingMetrics()
        pipeline = await _unless_stopped(RayPipeline.start(config, _report, metrics=metrics))
        if pipeline is None:
            _report("stopped during start-up")
            return 0
        try:
            await _serve_http(pipeline, config, metrics, log_level)
        finally:
            _report("stopping replicas")
            await pipeline.shutdown()
    except Exception as error:
        _report(f"failed: {error}")
        return 1
    finally:
        if owns_ray:
            shutdown_ray()
    _report("stopped")
    return 0


async def _unless_stopped(start: Awaitable[T]) -> T | None:
    """The result of `start`, or None if SIGTERM/SIGINT came first (then `start` is cancelled)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for stop_signal in _STOP_SIGNALS:
        loop.add_signal_handler(stop_signal, stop_requested.set)
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        for stop_signal in _STOP_SIGNALS:
            loop.remove_signal_handler(stop_signal)
    if starting.done():
        return starting.result()
    starting.cancel()
    with contextlib.suppress(BaseException):
        await starting
    return None


async def _serve_http(pipeline, config, metrics, log_level: str) -> None:
    from dvd_serve.server.api.app import create_app
    from dvd_serve.server.http_protocol import bounded_head_protocol

    gateway = config.gateway
    app = create_app(pipeline, gateway, metrics)
    uvicorn_config = uvicorn.Config(
        app, host=gateway.host, port=gateway.port, lifespan="off", log_level=log_level, timeout_graceful_shutdown=5,
        http=bounded_head_protocol(gateway.request_head_timeout_s, gateway.max_request_head_bytes),
        h11_max_incomplete_event_size=gateway.max_request_head_bytes,
    )
    await DrainingServer(uvicorn_config, pipeline, config.drain_timeout_s).serve()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first stop signal drains the pipeline before the server stops."""

    def __init__(self, config: uvicorn.Config, pipeline, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._pipeline = pipeline
        self._drain_timeout_s = drain_timeout_s
        self._loop = asyncio.get_running_loop()
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: it interrupts the event loop's thread anywhere, so it only flips flags and schedules.
        if self._draining:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._pipeline.begin_drain()
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._stop_when_drained(sig)))

    async def _stop_when_drained(self, sig: int) -> None:
        _report(f"{signal.Signals(sig).name}: draining {self._pipeline.in_flight} running request(s)")
        if not await self._pipeline.wait_idle(self._drain_timeout_s):
            _report(f"{self._pipeline.in_flight} request(s) still running after {self._drain_timeout_s:.0f} s")
        self.should_exit = True


def _report(message: str) -> None:
    print(f"dvd-serve: {message}", file=sys.stderr, flush=True)
