"""Every Prometheus metric of dvd-serve, defined once, on a registry the caller owns.

Who records what:
- gateway (`server/api`): `requests`, `ttft`, `tpot`, `e2e`, `gateway_in_flight`, `stream_aborts`, `prompt_tokens`,
  `completion_tokens`, `pool_ready`, and the per-request totals from `StageTimings` (`request_vision_seconds`,
  `lm_queue_seconds`, `request_inference_seconds`, `request_visual_tokens`, `request_embedding_bytes`).
- vision workers: `fetch_decode_seconds`, `preprocess_seconds`, `vision_queue_seconds`, `vision_batch_size`,
  `encode_seconds`, `visual_tokens_per_image`, `router_compression_ratio`.
- embedding sender (vision -> LM hop): `transfer_bytes`, `transfer_seconds`.
- orchestration: `pool_in_flight` (jobs handed to each pool and not yet finished), `pool_admitted` (jobs holding a
  place in each pool, waiting ones included) and `admission_refusals` (jobs refused with 429, by pool).

No metric touches prometheus_client's global default registry, so tests may build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dvd_serve.common.chat import StageTimings

PREFIX = "dvd"
EXPOSITION_CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = tuple(float(1024 * 4**power) for power in range(11))  # 1 KiB .. 1 GiB
TOKEN_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3328, 4096, 8192, 16384, 32768)
RATIO_BUCKETS = (0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServingMetrics:
    """The metric objects, registered on `registry` (a fresh one when not given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry

        # Gateway: requests as the client sees them.
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status_code"), registry=reg,
        )
        self.gateway_in_flight = Gauge(
            f"{PREFIX}_gateway_in_flight_requests", "HTTP requests the gateway is serving now.", registry=reg
        )
        self.stream_aborts = Counter(
            f"{PREFIX}_stream_aborts", "Streams ended early, by reason: an error code or client_disconnected.",
            ("reason",), registry=reg,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Request arrival to the first non-empty content.",
            buckets=LATENCY_BUCKETS_S, registry=reg,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "(E2E - TTFT) / (completion tokens - 1).",
            buckets=PER_TOKEN_BUCKETS_S, registry=reg,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Request arrival to the last token.",
            buckets=LATENCY_BUCKETS_S, registry=reg,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests, visual tokens included.", registry=reg
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Generated tokens of finished requests.", registry=reg
        )
        self.pool_ready = Gauge(
            f"{PREFIX}_pool_ready", "1 if the pool had a live replica at the last /ready probe.", ("pool",),
            registry=reg,
        )

        # Per-request stage totals, from the pipeline's StageTimings (recorded by the gateway).
        self.request_vision_seconds = Histogram(
            f"{PREFIX}_request_vision_seconds", "Fetch + decode + preprocess + encode + transfer of a request.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.lm_queue_seconds = Histogram(
            f"{PREFIX}_lm_queue_seconds", "Wait for a language replica and in its engine queue.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.request_inference_seconds = Histogram(
            f"{PREFIX}_request_inference_seconds", "First token to last token.",
            buckets=LATENCY_BUCKETS_S, registry=reg,
        )
        self.request_visual_tokens = Histogram(
            f"{PREFIX}_request_visual_tokens", "Visual tokens in one request's prompt.",
            buckets=TOKEN_BUCKETS, registry=reg,
        )
        self.request_embedding_bytes = Histogram(
            f"{PREFIX}_request_embedding_bytes", "Embedding bytes shipped for one request.",
            buckets=BYTES_BUCKETS, registry=reg,
        )

        # Vision workers.
        self.fetch_decode_seconds = Histogram(
            f"{PREFIX}_image_fetch_decode_seconds", "Fetching (URL) or base64-decoding plus decoding one image.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.preprocess_seconds = Histogram(
            f"{PREFIX}_image_preprocess_seconds", "Tiling and normalising one image.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.vision_queue_seconds = Histogram(
            f"{PREFIX}_vision_queue_seconds", "Wait of an image for a vision batch.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.vision_batch_size = Histogram(
            f"{PREFIX}_vision_batch_tiles", "Tiles in one vision encoder batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=reg,
        )
        self.encode_seconds = Histogram(
            f"{PREFIX}_vision_encode_seconds", "ViT + router + projector time of one batch.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )
        self.visual_tokens_per_image = Histogram(
            f"{PREFIX}_visual_tokens_per_image", "Visual tokens produced for one image.",
            buckets=TOKEN_BUCKETS, registry=reg,
        )
        self.router_compression_ratio = Histogram(
            f"{PREFIX}_router_compression_ratio",
            "Per image: visual tokens kept / tokens at 256 per tile (1.0 = nothing compressed, 0.25 = all).",
            buckets=RATIO_BUCKETS, registry=reg,
        )

        # Embedding sender.
        self.transfer_bytes = Histogram(
            f"{PREFIX}_embedding_transfer_bytes", "Bytes of one request's embeddings sent to a language replica.",
            buckets=BYTES_BUCKETS, registry=reg,
        )
        self.transfer_seconds = Histogram(
            f"{PREFIX}_embedding_transfer_seconds", "Time to send one request's embeddings.",
            buckets=STAGE_BUCKETS_S, registry=reg,
        )

        # Orchestration.
        self.pool_in_flight = Gauge(
            f"{PREFIX}_pool_in_flight_jobs", "Jobs handed to a pool and not finished, by pool.", ("pool",),
            registry=reg,
        )
        self.pool_admitted = Gauge(
            f"{PREFIX}_pool_admitted_jobs",
            "Jobs holding one of a pool's admission places (running, queued or not yet started), by pool.",
            ("pool",), registry=reg,
        )
        self.admission_refusals = Counter(
            f"{PREFIX}_admission_refusals", "Jobs refused with 429 because a pool was at capacity, by pool.",
            ("pool",), registry=reg,
        )

    def observe_stage_timings(self, timings: StageTimings) -> None:
        """Records the per-request totals the pipeline reported on a request's last delta."""
        self.request_vision_seconds.observe(timings.vision_s)
        self.lm_queue_seconds.observe(timings.queue_s)
        self.request_inference_seconds.observe(timings.inference_s)
        self.request_visual_tokens.observe(timings.visual_tokens)
        self.request_embedding_bytes.observe(timings.embedding_bytes)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
