"""In the gateway: one return stream per language (or coupled) replica, fanned out to the requests it serves.

The gateway opens `deltas(subscriber)` on a replica once and keeps reading batches from it; each entry goes to the
inbox of the request it names. A request registers its inbox before it submits, so no delta can arrive for it
unseen. When the stream fails (the replica died, or Ray lost it) every request registered on it gets that error,
and the next request on the replica, once it is back, opens a new stream to its new incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ray

# Called per batch with (when it left the replica, when it arrived here, its entries), both time.time().
BatchObserver = Callable[[float, float, list], None]


class StreamEnded(Exception):
    """A replica's return stream stopped without an error (it should run as long as the replica lives)."""


class ReplicaReturnStream:
    """The batches of one replica incarnation, read by one task, delivered into per-request queues."""

    def __init__(self, handle: Any, subscriber: str, observe: BatchObserver | None = None) -> None:
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._observe = observe
        self.failure: BaseException | None = None
        self._stream = handle.deltas.remote(subscriber)
        self._reader = asyncio.create_task(self._read())

    @property
    def broken(self) -> bool:
        return self.failure is not None

    @contextlib.contextmanager
    def inbox(self, request_id: str) -> Iterator[asyncio.Queue]:
        """The queue `request_id`'s deltas (or the error that ends it) arrive in, while the block runs."""
        queue: asyncio.Queue = asyncio.Queue()
        if self.failure is not None:
            queue.put_nowait(self.failure)
        self._inboxes[request_id] = queue
        try:
            yield queue
        finally:
            if self._inboxes.get(request_id) is queue:
                del self._inboxes[request_id]

    async def _read(self) -> None:
        try:
            async for batch_ref in self._stream:
                sent_at, batch = await batch_ref
                if self._observe is not None:
                    self._observe(sent_at, time.time(), batch)
                inboxes = self._inboxes
                for request_id, item in batch:
                    queue = inboxes.get(request_id)
                    if queue is not None:  # None: the request was abandoned; its late deltas are dropped
                        queue.put_nowait(item)
            failure: BaseException = StreamEnded()
        except asyncio.CancelledError:
            failure = StreamEnded()
            raise
        except Exception as error:  # RayActorError and friends: the replica is gone
            failure = error
        finally:
            self.failure = failure
            for queue in self._inboxes.values():
                queue.put_nowait(failure)

    def close(self) -> None:
        self._reader.cancel()
        if ray.is_initialized():  # else there is nothing to cancel (and `ray.cancel` would start a local Ray)
            with contextlib.suppress(Exception):
                ray.cancel(self._stream)


class ReturnStreams:
    """This gateway's return streams, one per replica (re-opened after the replica restarts)."""

    def __init__(self, observe: BatchObserver | None = None) -> None:
        self.subscriber = f"gateway-{uuid.uuid4().hex[:12]}"
        self._observe = observe
        self._streams: dict[str, ReplicaReturnStream] = {}

    def of(self, replica_name: str, handle: Any) -> ReplicaReturnStream:
        """The open stream of `replica_name`, or a new one if there is none or it broke."""
        stream = self._streams.get(replica_name)
        if stream is None or stream.broken:
            stream = self._streams[replica_name] = ReplicaReturnStream(handle, self.subscriber, self._observe)
        return stream

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
