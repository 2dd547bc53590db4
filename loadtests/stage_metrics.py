"""Per-stage means from a server's Prometheus `/metrics`, as the difference of two scrapes around a load run.

Means come from histogram `_sum` / `_count` pairs (exact; bucket boundaries play no part). Labelled series of one
metric are added up. Only the metrics named in `STAGES` are reported; the names are dvd-serve's (server/metrics.py)
and vLLM's own (`vllm:*`), so the same code reads both kinds of server.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Report label -> (histogram name without _sum/_count, scale to the reported unit).
STAGES: dict[str, tuple[str, float]] = {
    # dvd-serve gateway: per-request totals.
    "vision_ms": ("dvd_request_vision_seconds", 1000.0),
    "lm_queue_ms": ("dvd_lm_queue_seconds", 1000.0),
    "inference_ms": ("dvd_request_inference_seconds", 1000.0),
    "visual_tokens": ("dvd_request_visual_tokens", 1.0),
    "embedding_bytes": ("dvd_request_embedding_bytes", 1.0),
    # dvd-serve vision workers: per image or per batch.
    "fetch_decode_ms": ("dvd_image_fetch_decode_seconds", 1000.0),
    "preprocess_ms": ("dvd_image_preprocess_seconds", 1000.0),
    "vision_queue_ms": ("dvd_vision_queue_seconds", 1000.0),
    "encode_ms": ("dvd_vision_encode_seconds", 1000.0),
    "batch_tiles": ("dvd_vision_batch_tiles", 1.0),
    "transfer_ms": ("dvd_embedding_transfer_seconds", 1000.0),
    "kept_token_share": ("dvd_router_compression_ratio", 1.0),
    # vLLM's OpenAI server.
    "vllm_queue_ms": ("vllm:request_queue_time_seconds", 1000.0),
    "vllm_prefill_ms": ("vllm:request_prefill_time_seconds", 1000.0),
    "vllm_decode_ms": ("vllm:request_decode_time_seconds", 1000.0),
    "vllm_ttft_ms": ("vllm:time_to_first_token_seconds", 1000.0),
}


@dataclass(frozen=True, slots=True)
class Totals:
    """A histogram's running sum and count."""

    total: float
    count: float


def parse_totals(exposition: str) -> dict[str, Totals]:
    """Histogram (and summary) name -> sum and count, labelled series added up."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.type not in ("histogram", "summary"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                sums[family.name] = sums.get(family.name, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[family.name] = counts.get(family.name, 0.0) + sample.value
    return {name: Totals(sums[name], counts.get(name, 0.0)) for name in sums}


def fetch_exposition(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The text a server's `/metrics` answers (with `authorization: Bearer <api_key>` when given)."""
    request = urllib.request.Request(base_url.rstrip("/") + "/metrics")
    if api_key:
        request.add_header("authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read().decode("utf-8")


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, Totals]:
    return parse_totals(fetch_exposition(base_url, timeout_s=timeout_s))


def stage_means(before: Mapping[str, Totals], after: Mapping[str, Totals]) -> dict[str, float]:
    """Mean of each stage over the observations made between the two scrapes; stages without any are left out."""
    means: dict[str, float] = {}
    for label, (name, scale) in STAGES.items():
        if name not in after:
            continue
        earlier = before.get(name, Totals(0.0, 0.0))
        count = after[name].count - earlier.count
        if count > 0:
            means[label] = (after[name].total - earlier.total) / count * scale
    return means


def mean_or_nan(means: Mapping[str, float], label: str) -> float:
    return means.get(label, math.nan)
