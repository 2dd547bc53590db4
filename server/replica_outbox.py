"""Inside a language (or coupled) replica: the deltas of all its requests, leaving together in batches.

Each request runs as a task that puts its deltas (or its one error) into the outbox of the gateway that submitted
it; the gateway's single stream from this replica takes everything that accumulated in one go. vLLM's output
handler wakes every request of an engine step at once, so one batch carries one step's tokens for all of them:
one Ray object per step and gateway instead of one per token and request.

Plain asyncio, no Ray: the actor is the edge that turns batches into Ray objects.
"""

from __future__ import annotations

import asyncio
from typing import Any

# One entry of a batch: (request id, a `GenerationDelta`, or the picklable error that ended the request).
OutboxEntry = tuple[str, Any]


class DeltaOutbox:
    """What one subscriber (a gateway process) has not taken yet, in arrival order."""

    __slots__ = ("_pending", "_ready")

    def __init__(self) -> None:
        self._pending: list[OutboxEntry] = []
        self._ready = asyncio.Event()

    def put(self, request_id: str, item: Any) -> None:
        self._pending.append((request_id, item))
        self._ready.set()

    async def next_batch(self) -> list[OutboxEntry]:
        """Everything put since the last batch; waits for the first entry, then lets the requests woken in the
        same loop turn (the rest of the engine step) add theirs."""
        await self._ready.wait()
        await asyncio.sleep(0)
        batch, self._pending = self._pending, []
        self._ready.clear()
        return batch


class ReplicaRequests:
    """The requests a replica is running, each a task feeding its subscriber's outbox."""

    def __init__(self) -> None:
        self._outboxes: dict[str, DeltaOutbox] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def outbox(self, subscriber: str) -> DeltaOutbox:
        """The subscriber's outbox, created on first use (a request may arrive before its stream is opened)."""
        outbox = self._outboxes.get(subscriber)
        if outbox is None:
            outbox = self._outboxes[subscriber] = DeltaOutbox()
        return outbox

    def start(self, subscriber: str, request_id: str, run) -> None:
        """Runs `run(outbox)` (a coroutine function) as the request's task."""
        task = asyncio.create_task(run(self.outbox(subscriber)))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _done: self._forget(request_id, task))

    def cancel(self, request_id: str) -> bool:
        """Cancels the request's task; False if it already ended (or never started here)."""
        task = self._tasks.get(request_id)
        if task is None:
            return False
        task.cancel()
        return True

    def __len__(self) -> int:
        return len(self._tasks)

    def _forget(self, request_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
