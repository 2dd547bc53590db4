"""Dynamic batching of vision work across concurrent requests.

Requests queue up; one loop takes the first waiting request, then keeps adding requests until the batch holds
`max_tiles_per_batch` tiles or `max_wait_ms` has passed since the first was taken, and runs them as one
`encode_tiles` call in a dedicated thread (torch releases the GIL, so the event loop keeps serving).
Routing stays per request, so a request's tokens never depend on its batch neighbours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydantic import Field

from dvd_serve.common.config import FrozenConfig
from dvd_serve.vision_worker.encoder import EncodeRequest, TileEmbeddings


class BatchingConfig(FrozenConfig):
    """When the vision replica closes a batch."""

    max_tiles_per_batch: int = Field(default=64, ge=1, description="Close the batch once it holds this many tiles.")
    max_wait_ms: float = Field(
        default=5.0, ge=0.0, description="Longest a request waits for batch-mates after the batch's first request."
    )


@dataclass(slots=True)
class _Pending:
    request: EncodeRequest
    tiles: int
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class BatchResult:
    images: list[TileEmbeddings]
    queue_wait_s: float  # from enqueue to the start of its batch
    encode_s: float  # wall time of the batch it ran in
    batch_tiles: int


class VisionBatcher:
    def __init__(self, encode: Callable[[Sequence[EncodeRequest]], list[list[TileEmbeddings]]],
                 config: BatchingConfig) -> None:
        self._encode = encode
        self._config = config
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-encode")
        self._loop_task: asyncio.Task | None = None
        self._carry: _Pending | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, request: EncodeRequest) -> BatchResult:
        self.start()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, sum(image.shape[0] for image in request.images), future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [item for item in batch if not item.future.cancelled()]
            if not live:
                continue
            started = time.monotonic()
            try:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._encode, [item.request for item in live]
                )
            except Exception as error:  # a failed batch fails its own requests only
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            elapsed = time.monotonic() - started
            tiles = sum(item.tiles for item in live)
            for item, images in zip(live, outputs, strict=True):
                if not item.future.done():
                    item.future.set_result(BatchResult(images, started - item.enqueued_at, elapsed, tiles))

    async def _collect(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, tiles = [first], first.tiles
        deadline = time.monotonic() + self._config.max_wait_ms / 1000
        while tiles < self._config.max_tiles_per_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining
                )
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if tiles + item.tiles > self._config.max_tiles_per_batch:
                self._carry = item  # starts the next batch
                break
            batch.append(item)
            tiles += item.tiles
        return batch
