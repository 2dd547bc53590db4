"""Every Prometheus metric of dvd-serve, defined once, on a registry the caller owns.

Who records what:
- gateway (`server/api`): `requests`, `ttft`, `tpot`, `e2e`, `gateway_in_flight`, `stream_aborts`, `prompt_tokens`,
  `completion_tokens`, `pool_ready`, and the per-request totals from `StageTimings` (`request_vision_seconds`,
  `lm_queue_seconds`, `request_inference_seconds`, `request_visual_tokens`, `request_embedding_bytes`).
- vision workers: `fetch_decode_seconds`, `preprocess_seconds`, `vision_queue_seconds`, `vision_batch_size`,
  `encode_seconds`, `visual_tokens_per_image`, `router_compression_ratio`.
- vision replicas' caches: `vision_cache_lookups` (hit/miss/in_flight per image), `vision_cache_evictions`,
  `vision_cache_bytes` (per replica); the language side's prefix cache as vLLM's `vllm:prefix_cache_queries` and
  `vllm:prefix_cache_hits` (tokens).
- embedding sender (vision -> LM hop): `transfer_bytes`, `transfer_seconds`.
- orchestration: `pool_in_flight` (jobs handed to each pool and not yet finished), `pool_admitted` (jobs holding a
  place in each pool, waiting ones included), `admission_refusals` (jobs refused with 429, by pool) and
  `replica_retries` (jobs sent to another replica after theirs died before the first token).
- `VllmRequestMetrics` (the gateway, for each finished request): the request-level series of vLLM's own server under
  vLLM's names, labels and buckets, so vLLM's Grafana dashboards and alerts work unchanged; see `docs/deploy.md`.

No metric touches prometheus_client's global default registry, so tests may build several apps in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from vllm.v1.metrics.buckets import build_1_2_5_buckets, histogram_buckets

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
# vLLM caps its token-count buckets at the context length; this cap covers every InternVL3.5 context.
VLLM_TOKEN_BUCKETS = tuple(build_1_2_5_buckets(1_000_000))
VLLM_MODEL_LABEL = "model_name"


@dataclass(frozen=True)
class FinishedRequest:
    """What the gateway knows of one finished request, for the vLLM-named series (seconds, token counts)."""

    e2e_s: float
    ttft_s: float | None  # None: no content was produced
    prompt_tokens: int
    generation_tokens: int  # summed over the choices
    per_choice_generation_tokens: tuple[int, ...]
    finish_reasons: tuple[str, ...]  # one per choice, OpenAI's words (stop, length, ...)
    inter_token_s: tuple[float, ...]  # gap between consecutive token deltas, per token
    n: int
    max_tokens: int | None  # None: not given (the rest of the context)
    queue_s: float | None
    inference_s: float | None
    cached_prompt_tokens: int | None = None  # prompt tokens the engine's prefix cache held; None: not reported


class VllmRequestMetrics:
    """vLLM's request-level series (`vllm:*`), measured where the client sees them: at the gateway.

    Names, meanings, label `model_name` and bucket bounds are vLLM 0.32's, taken from
    `vllm.v1.metrics.buckets`, so a dashboard written for vLLM's server reads these unchanged. vLLM also labels each
    series with `engine` (its engine index); dvd-serve's series cover the whole language pool and carry no such
    label. Engine-internal series (KV-cache usage, running/waiting counts, prefix-cache hits) are not here: they
    live in the language replicas' engines, which have no Prometheus endpoint of their own.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = (VLLM_MODEL_LABEL,)
        latency = histogram_buckets("request_latency")
        inter_token = histogram_buckets("inter_token_latency")

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(f"vllm:{name}", documentation, labels, buckets=buckets, registry=registry)

        def counter(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"vllm:{name}", documentation, labels + extra, registry=registry)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests, visual tokens included.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the language engines' prefix caches."
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix caches (cached).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated for finished requests, all choices.")
        self.request_success = counter(
            "request_success", "Finished requests, by the reason each choice ended.", ("finished_reason",)
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length of one request (tokens).", VLLM_TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens one choice generated.", VLLM_TOKEN_BUCKETS
        )
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Most tokens any choice of one request generated.",
            VLLM_TOKEN_BUCKETS,
        )
        self.request_params_n = histogram(
            "request_params_n", "Choices asked for (`n`).", histogram_buckets("request_params_n")
        )
        self.request_params_max_tokens = histogram(
            "request_params_max_tokens", "`max_tokens` as given (requests without it are left out).", VLLM_TOKEN_BUCKETS
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival at the gateway to the first content.",
            histogram_buckets("time_to_first_token"),
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Gap between two tokens of a choice, per token.", inter_token
        )
        self.request_time_per_output_token = histogram(
            "request_time_per_output_token_seconds", "(E2E - TTFT) / (tokens - 1) of one request.",
            inter_token,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival at the gateway to the last token.", latency
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Wait for a language replica and in its engine queue.", latency
        )
        self.request_inference_time = histogram(
            "request_inference_time_seconds", "First token to last token in the engine.", latency
        )

    def observe(self, model_name: str, request: FinishedRequest) -> None:
        self.prompt_tokens.labels(model_name).inc(request.prompt_tokens)
        if request.cached_prompt_tokens is not None:
            self.prefix_cache_queries.labels(model_name).inc(request.prompt_tokens)
            self.prefix_cache_hits.labels(model_name).inc(request.cached_prompt_tokens)
        self.generation_tokens.labels(model_name).inc(request.generation_tokens)
        for reason in request.finish_reasons:
            self.request_success.labels(model_name, reason).inc()
        self.request_prompt_tokens.labels(model_name).observe(request.prompt_tokens)
        for tokens in request.per_choice_generation_tokens:
            self.request_generation_tokens.labels(model_name).observe(tokens)
        self.request_max_num_generation_tokens.labels(model_name).observe(
            max(request.per_choice_generation_tokens, default=0)
        )
        self.request_params_n.labels(model_name).observe(request.n)
        if request.max_tokens is not None:
            self.request_params_max_tokens.labels(model_name).observe(request.max_tokens)
        self.e2e_request_latency.labels(model_name).observe(request.e2e_s)
        inter_token = self.inter_token_latency.labels(model_name)
        for gap in request.inter_token_s:
            inter_token.observe(gap)
        if request.ttft_s is not None:
            self.time_to_first_token.labels(model_name).observe(request.ttft_s)
            if request.generation_tokens > 1:
                self.request_time_per_output_token.labels(model_name).observe(
                    (request.e2e_s - request.ttft_s) / (request.generation_tokens - 1)
                )
        if request.queue_s is not None:
            self.request_queue_time.labels(model_name).observe(request.queue_s)
        if request.inference_s is not None:
            self.request_inference_time.labels(model_name).observe(request.inference_s)


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
        self.token_path = Histogram(
            f"{PREFIX}_token_path_seconds",
            "Where a streamed delta's time goes after the language engine produced it: hop=replica (until its "
            "batch leaves the replica), transport (Ray, replica to gateway), response (engine to the chunk handed "
            "to the HTTP server: the two hops plus the gateway's fan-out and chunk building). Wall clocks of two "
            "processes: across nodes the transport hop includes their clock offset.",
            ["hop"], buckets=PER_TOKEN_BUCKETS_S, registry=reg,
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

        # Vision replicas' embedding caches (counted per image).
        self.vision_cache_lookups = Counter(
            f"{PREFIX}_vision_cache_lookups", "Images looked up in a vision replica's embedding cache, by result "
            "(hit: decode, tiling and ViT skipped; miss: encoded; in_flight: another request was encoding the same image and "
            "this one waited for it).", ("result",), registry=reg,
        )
        self.vision_cache_evictions = Counter(
            f"{PREFIX}_vision_cache_evictions", "Entries the vision replicas' caches evicted to stay in budget.",
            registry=reg,
        )
        self.vision_cache_bytes = Gauge(
            f"{PREFIX}_vision_cache_bytes", "Bytes a vision replica's embedding cache held after its last request.",
            ("replica",), registry=reg,
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

        self.replica_retries = Counter(
            f"{PREFIX}_replica_retries",
            "Requests sent again to another replica after theirs died before the first token, by pool and reason "
            "(the error code the dead replica's request got).",
            ("pool", "reason"), registry=reg,
        )

        self.vllm = VllmRequestMetrics(reg)

    def observe_return_batch(self, sent_at: float, received_at: float, batch: list) -> None:
        """The replica and transport hops of every delta in one return-path batch (see `token_path`)."""
        replica, transport = self.token_path.labels("replica"), self.token_path.labels("transport")
        for _request_id, item in batch:
            made_at = getattr(item, "made_at", 0.0)  # errors in the batch carry none
            if made_at:
                replica.observe(max(sent_at - made_at, 0.0))
                transport.observe(max(received_at - sent_at, 0.0))

    def observe_response_chunk(self, made_at: float) -> None:
        """A streamed delta handed to the HTTP server, `made_at` being when the engine produced it."""
        if made_at:
            self.token_path.labels("response").observe(max(time.time() - made_at, 0.0))

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
