"""The batched return path without Ray: a replica's outbox and the gateway's fan-out of one replica's stream."""

from __future__ import annotations

import asyncio
import time

import pytest

from dvd_serve.common.chat import GenerationDelta
from dvd_serve.server.replica_outbox import ReplicaRequests
from dvd_serve.server.return_streams import ReplicaReturnStream, StreamEnded


def _delta(token: int, finish: str | None = None) -> GenerationDelta:
    return GenerationDelta(token_ids=[token], text=str(token), finish_reason=finish)


async def _steps(requests: ReplicaRequests, request_ids: list[str], steps: int, step_s: float = 0.005) -> None:
    """A stand-in for vLLM's output handler: every `step_s`, one token for each request, woken together."""
    queues = {request_id: asyncio.Queue() for request_id in request_ids}

    def run_for(request_id: str):
        async def run(outbox) -> None:
            while True:
                delta = await queues[request_id].get()
                outbox.put(request_id, delta)
                if delta.finish_reason is not None:
                    return

        return run

    for request_id in request_ids:
        requests.start("gateway-a", request_id, run_for(request_id))
    for step in range(steps):
        await asyncio.sleep(step_s)
        for request_id in request_ids:
            queues[request_id].put_nowait(_delta(step, "length" if step == steps - 1 else None))


def test_one_batch_per_engine_step_carries_every_request():
    async def scenario() -> list[list]:
        requests = ReplicaRequests()
        outbox = requests.outbox("gateway-a")
        producer = asyncio.create_task(_steps(requests, ["r1", "r2", "r3"], steps=4))
        batches = [await outbox.next_batch() for _ in range(4)]
        await producer
        return batches

    batches = asyncio.run(scenario())
    for step, batch in enumerate(batches):
        assert sorted(request_id for request_id, _ in batch) == ["r1", "r2", "r3"]
        assert {delta.token_ids[0] for _, delta in batch} == {step}


def test_cancel_ends_the_request_task():
    async def scenario() -> tuple[bool, bool, int]:
        requests = ReplicaRequests()
        cancelled = asyncio.Event()

        async def run(outbox) -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        requests.start("gateway-a", "r1", run)
        await asyncio.sleep(0)
        first = requests.cancel("r1")
        await asyncio.wait_for(cancelled.wait(), 1)
        await asyncio.sleep(0)
        return first, requests.cancel("r1"), len(requests)

    assert asyncio.run(scenario()) == (True, False, 0)


class _ReplicaHandleDouble:
    """Test double of a language actor handle: `deltas.remote` yields ready 'refs' from a queue of batches."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue = asyncio.Queue()
        self.deltas = self
        self.subscribers: list[str] = []

    def remote(self, subscriber: str):
        self.subscribers.append(subscriber)
        return self._stream()

    async def _stream(self):
        while True:
            batch = await self.batches.get()
            if isinstance(batch, BaseException):
                raise batch
            if batch is None:
                return
            ready = asyncio.get_running_loop().create_future()
            ready.set_result((time.time(), batch))  # as the actor sends it: (when it left, entries)
            yield ready


def test_fan_out_routes_each_entry_and_drops_abandoned_requests():
    async def scenario():
        handle = _ReplicaHandleDouble()
        stream = ReplicaReturnStream(handle, "gateway-a")
        with stream.inbox("r1") as one, stream.inbox("r2") as two:
            handle.batches.put_nowait([("r1", _delta(1)), ("gone", _delta(9)), ("r2", _delta(2)), ("r1", _delta(3))])
            got_one = [await one.get(), await one.get()]
            got_two = await two.get()
        stream.close()
        return got_one, got_two, handle.subscribers

    got_one, got_two, subscribers = asyncio.run(scenario())
    assert [delta.token_ids for delta in got_one] == [[1], [3]]
    assert got_two.token_ids == [2]
    assert subscribers == ["gateway-a"]


@pytest.mark.parametrize("end", [RuntimeError("replica died"), None])
def test_a_broken_stream_fails_every_request_on_it_and_later_ones(end):
    async def scenario():
        handle = _ReplicaHandleDouble()
        stream = ReplicaReturnStream(handle, "gateway-a")
        with stream.inbox("r1") as one:
            handle.batches.put_nowait(end)
            failure = await asyncio.wait_for(one.get(), 1)
        with stream.inbox("late") as late:
            late_failure = late.get_nowait()
        return failure, late_failure, stream.broken

    failure, late_failure, broken = asyncio.run(scenario())
    expected = RuntimeError if end is not None else StreamEnded
    assert isinstance(failure, expected) and late_failure is failure and broken


def test_each_batch_is_observed_with_when_it_left_and_arrived():
    seen = []

    async def scenario():
        handle = _ReplicaHandleDouble()
        stream = ReplicaReturnStream(handle, "gateway-a", observe=lambda sent, received, batch: seen.append(
            (sent, received, [request_id for request_id, _ in batch])))
        with stream.inbox("r1") as one:
            handle.batches.put_nowait([("r1", _delta(1)), ("r1", _delta(2))])
            await one.get()
        stream.close()

    before = time.time()
    asyncio.run(scenario())
    ((sent, received, ids),) = seen
    assert before <= sent <= received <= time.time() and ids == ["r1", "r1"]


def test_token_path_hops_are_recorded_per_delta():
    from prometheus_client import CollectorRegistry

    from dvd_serve.server.metrics import ServingMetrics

    metrics = ServingMetrics(CollectorRegistry())
    now = time.time()
    made = _delta(1)
    made.made_at = now - 0.030
    metrics.observe_return_batch(now - 0.010, now, [("r1", made), ("r1", _delta(2)), ("r2", RuntimeError("x"))])
    metrics.observe_response_chunk(now - 0.050)
    metrics.observe_response_chunk(0.0)  # unknown: not counted

    def hop(name: str) -> tuple[float, float]:
        samples = {s.name: s.value for s in metrics.token_path.labels(name).collect()[0].samples
                   if s.name.endswith(("_sum", "_count"))}
        return samples["dvd_token_path_seconds_count"], samples["dvd_token_path_seconds_sum"]

    assert hop("replica")[0] == 1 and abs(hop("replica")[1] - 0.020) < 0.002
    assert hop("transport")[0] == 1 and abs(hop("transport")[1] - 0.010) < 0.002
    count, total = hop("response")
    assert count == 1 and 0.050 <= total < 1.0
