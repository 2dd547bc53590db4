"""What the soak reads from the gateway's `/metrics`: chat requests by status, stream aborts by reason, and the
gauges that must be back to 0 once the load has drained: requests in the gateway, jobs in each pool and, where
the gateway has admission control, jobs holding an admission place; and what the vision replicas' embedding caches
hold and found (names as defined in server/metrics.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from dvd_serve.loadtests.soak_accounting import CHAT_ENDPOINT, Check
from dvd_serve.loadtests.stage_metrics import fetch_exposition

REQUESTS = "dvd_http_requests"
STREAM_ABORTS = "dvd_stream_aborts"
GATEWAY_IN_FLIGHT = "dvd_gateway_in_flight_requests"
VISION_CACHE_BYTES = "dvd_vision_cache_bytes"
VISION_CACHE_LOOKUPS = "dvd_vision_cache_lookups"
POOL_GAUGES = {"dvd_pool_in_flight_jobs": "in flight", "dvd_pool_admitted_jobs": "admitted"}
# The scrape is itself an HTTP request the gateway is serving while it renders the gauge.
SCRAPE_ITSELF = 1.0


@dataclass(frozen=True, slots=True)
class GatewayScrape:
    chat_statuses: dict[str, float] = field(default_factory=dict)  # status code -> requests answered
    stream_aborts: dict[str, float] = field(default_factory=dict)  # reason -> streams ended early
    gateway_in_flight: float = 0.0  # other HTTP requests being served (the scrape itself taken off)
    pool_gauges: dict[str, float] = field(default_factory=dict)  # e.g. "vision in flight" -> jobs in the pool
    vision_cache_bytes: dict[str, float] = field(default_factory=dict)  # vision replica -> bytes its cache holds
    vision_cache_lookups: dict[str, float] = field(default_factory=dict)  # hit / miss / in_flight -> images


def parse_scrape(exposition: str) -> GatewayScrape:
    chat_statuses: dict[str, float] = {}
    aborts: dict[str, float] = {}
    pools: dict[str, float] = {}
    cache_bytes: dict[str, float] = {}
    lookups: dict[str, float] = {}
    in_flight = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == REQUESTS + "_total" and sample.labels.get("endpoint") == CHAT_ENDPOINT:
                status = sample.labels["status_code"]
                chat_statuses[status] = chat_statuses.get(status, 0.0) + sample.value
            elif sample.name == STREAM_ABORTS + "_total":
                aborts[sample.labels["reason"]] = sample.value
            elif sample.name == GATEWAY_IN_FLIGHT:
                in_flight = sample.value - SCRAPE_ITSELF
            elif sample.name in POOL_GAUGES:
                pools[f"{sample.labels['pool']} {POOL_GAUGES[sample.name]}"] = sample.value
            elif sample.name == VISION_CACHE_BYTES:
                cache_bytes[sample.labels["replica"]] = sample.value
            elif sample.name == VISION_CACHE_LOOKUPS + "_total":
                lookups[sample.labels["result"]] = sample.value
    return GatewayScrape(chat_statuses, aborts, in_flight, pools, cache_bytes, lookups)


def scrape_gateway(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> GatewayScrape:
    return parse_scrape(fetch_exposition(base_url, api_key, timeout_s))


def counter_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Per-label increase between two scrapes; labels that did not move are left out."""
    delta = {label: value - before.get(label, 0.0) for label, value in after.items()}
    return {label: value for label, value in delta.items() if value}


def in_flight_check(scrape: GatewayScrape) -> Check:
    gauges = {"gateway in flight": scrape.gateway_in_flight, **dict(sorted(scrape.pool_gauges.items()))}
    detail = ", ".join(f"{name} {value:g}" for name, value in gauges.items())
    return Check("in-flight gauges back to 0", all(value == 0 for value in gauges.values()), detail)
