"""What the fault tests share: a real gateway over a `RayPipeline` on a real port, and ways to wait and ask."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.dvd_fixtures import ImageOrigin


@dataclass
class Served:
    pipeline: object
    client: httpx.AsyncClient
    origin: ImageOrigin

    @property
    def vision(self):
        return self.pipeline.pools["vision"]

    @property
    def language(self):
        return self.pipeline.pools["language"]

    async def metric(self, name: str, **labels: str) -> float:
        response = await self.client.get("/metrics")
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    async def gauges(self) -> dict[str, float]:
        return {
            f"{gauge}[{pool}]": await self.metric(f"dvd_pool_{gauge}_jobs", pool=pool)
            for gauge in ("in_flight", "admitted") for pool in ("vision", "language")
        }

    async def actor_work(self) -> dict[str, int]:
        """What every replica reports it is working on, and the language engines' own request counts."""
        replicas = [*self.vision.replicas, *self.language.replicas]
        counts = await asyncio.gather(*(replica.handle.outstanding.remote() for replica in replicas))
        work = {replica.name: count for replica, count in zip(replicas, counts, strict=True)}
        for replica in self.language.replicas:
            work[f"engine of {replica.name}"] = await replica.handle.engine_requests.remote()
        return work


@contextlib.asynccontextmanager
async def served_gateway(config, origin: ImageOrigin) -> AsyncIterator[Served]:
    """`config`'s pipeline started on the current Ray, behind the real app on `config.gateway`'s port."""
    import uvicorn

    from dvd_serve.server.api.app import create_app
    from dvd_serve.server.metrics import ServingMetrics
    from dvd_serve.server.ray_pipeline import RayPipeline

    gateway = config.gateway
    metrics = ServingMetrics()
    pipeline = await RayPipeline.start(config, lambda line: None, metrics=metrics)
    server = uvicorn.Server(uvicorn.Config(
        create_app(pipeline, gateway, metrics), host=gateway.host, port=gateway.port, lifespan="off",
        log_level="warning",
    ))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    client = httpx.AsyncClient(base_url=f"http://{gateway.host}:{gateway.port}", timeout=120)
    try:
        yield Served(pipeline, client, origin)
    finally:
        origin.release()
        await client.aclose()
        server.should_exit = True
        await serving
        await pipeline.shutdown()


def image_chat(image_urls: list[str], max_tokens: int, stream: bool = False) -> dict:
    """A greedy request for exactly `max_tokens` tokens about the given images (high detail)."""
    content = [{"type": "image_url", "image_url": {"url": url, "detail": "high"}} for url in image_urls]
    return {
        "model": "tiny-flash",
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "Describe it."}]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


def completion_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]
