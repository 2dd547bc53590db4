"""LanguageWorker: the language engine, the embedding sink it reads from, and the watchdog that ends the process.

A request arrives twice: its images as gRPC pushes from vision replicas (into the `EmbeddingStore`), and its chat
via `generate`. `generate` waits for all of the request's images, renders the prompt, then streams tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

from pydantic import Field

from dvd_serve.common.chat import ChatJob, GenerationDelta, StageTimings
from dvd_serve.common.config import FrozenConfig
from dvd_serve.lm_worker.embedding_receiver import ModelIdentity, start_embedding_server
from dvd_serve.lm_worker.embedding_store import EmbeddingStore
from dvd_serve.lm_worker.embedding_validation import EmbeddingLimits
from dvd_serve.lm_worker.engine import LanguageEngine, LanguageEngineConfig

logger = logging.getLogger(__name__)


class LanguageWorkerConfig(FrozenConfig):
    """One language replica: its engine and its embedding sink."""

    engine: LanguageEngineConfig = Field(description="The vLLM engine settings.")
    grpc_host: str = Field(default="127.0.0.1", description="Address the embedding sink binds (cluster network only).")
    grpc_port: int = Field(default=0, ge=0, le=65535, description="Embedding sink port; 0 picks a free one.")
    grpc_auth_token: str | None = Field(default=None, description="Shared token vision replicas must present.")
    store_budget_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Bytes of received embeddings held at once before pushes are refused."
    )
    store_ttl_s: float = Field(default=60.0, gt=0, description="Embeddings no request claimed are dropped after this.")
    embeddings_wait_s: float = Field(
        default=60.0, gt=0, description="How long a request waits for its images to arrive before it fails."
    )
    watchdog_interval_s: float = Field(default=1.0, gt=0, description="How often engine liveness is checked.")


class LanguageWorker:
    def __init__(self, config: LanguageWorkerConfig, engine: LanguageEngine, store: EmbeddingStore) -> None:
        self.config = config
        self.engine = engine
        self.store = store
        self._server = None
        self.grpc_port: int | None = None
        self._watchdog: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    @classmethod
    async def start(
        cls, config: LanguageWorkerConfig, on_engine_death: Callable[[], None] | None = None
    ) -> "LanguageWorker":
        engine = LanguageEngine.start(config.engine)
        store = EmbeddingStore(config.store_budget_bytes, config.store_ttl_s)
        worker = cls(config, engine, store)
        limits = EmbeddingLimits(
            llm_hidden_size=engine.spec.llm_hidden,
            accepted_dtypes=(str(engine.dtype).removeprefix("torch."),),
            max_images_per_request=config.engine.max_images_per_request,
        )
        worker._server, worker.grpc_port = await start_embedding_server(
            store,
            limits,
            info_provider=lambda: ModelIdentity(model_id=engine.spec.model_id, revision=""),
            health_provider=lambda: not engine.is_dead,
            host=config.grpc_host,
            port=config.grpc_port,
            auth_token=config.grpc_auth_token,
        )
        worker._watchdog = asyncio.create_task(worker._watch_engine(on_engine_death or _exit_process))
        worker._sweeper = asyncio.create_task(store.run_sweeper(config.store_ttl_s / 4))
        return worker

    @property
    def grpc_address(self) -> str:
        return f"{self.config.grpc_host}:{self.grpc_port}"

    async def generate(self, job: ChatJob, expected_images: int) -> AsyncIterator[GenerationDelta]:
        """Stream the answer to `job` once its `expected_images` embeddings have arrived."""
        started = time.monotonic()
        try:
            received = (
                await self.store.take(job.request_id, expected_images, timeout=self.config.embeddings_wait_s)
                if expected_images
                else []
            )
            prompt, plan = self.engine.prepare(job)
            images = [item.embeddings for item in received]
            image_ids = [item.content_hash.hex() or None for item in received]
        except BaseException:
            self.store.cancel(job.request_id)
            raise
        waited = time.monotonic() - started
        first_token_at: float | None = None
        async for delta in self.engine.generate(job.request_id, prompt, images, plan, job.priority, image_ids):
            now = time.monotonic()
            if first_token_at is None:
                first_token_at = now
                delta.timings = StageTimings(
                    queue_s=now - started - waited,
                    visual_tokens=sum(image.shape[0] for image in images),
                    embedding_bytes=sum(image.numel() * image.element_size() for image in images),
                )
            if delta.ends_stream:
                timings = delta.timings or StageTimings()
                # One delta can carry every token (vLLM coalesces outputs under load): then count from submission.
                timings.inference_s = now - (first_token_at if now > first_token_at else started + waited)
                delta.timings = timings
            yield delta

    async def cancel(self, request_id: str) -> None:
        self.store.cancel(request_id)
        await self.engine.abort(request_id)

    async def stop(self) -> None:
        for task in (self._watchdog, self._sweeper):
            if task is not None:
                task.cancel()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        self.engine.shutdown()

    async def _watch_engine(self, on_death: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(self.config.watchdog_interval_s)
            if self.engine.is_dead:
                logger.error("language engine died; exiting so the orchestrator replaces this replica")
                on_death()
                return


def _exit_process() -> None:
    os._exit(1)
