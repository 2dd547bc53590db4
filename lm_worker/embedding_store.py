"""Holds received image embeddings until the language side takes all images of a request.

Life of one image: the receiver `reserve`s its bytes against the budget once the header is valid, fills a buffer,
then `complete`s the reservation (or `release`s it on any failure). `take` waits for images 0..n-1 of a request,
hands them over in image order and forgets the request. A request is also forgotten on `cancel`, on a `take`
timeout, and when its complete images sit untaken for longer than the TTL; a forgotten request id stays closed
for one TTL, so late pushes for it are refused instead of turning into orphans.

The store is used from one asyncio event loop (the receiver's); it is not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from dvd_serve.common.errors import DeadlineExceededError, InvalidRequestError, OverloadedError, UnavailableError


@dataclass(frozen=True, slots=True)
class ReceivedImage:
    """One image's embeddings, as the engine gets them."""

    image_index: int
    embeddings: torch.Tensor  # [tokens, llm_hidden]
    tokens_per_tile: tuple[int, ...]
    content_hash: bytes = b""  # the sender's name for these embeddings (empty: none given)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Gauges and counters for metrics."""

    held_bytes: int
    requests: int
    pending_pushes: int
    complete_images: int
    evicted_images_total: int
    refused_over_budget_total: int


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """What `cancel` dropped at once (in-flight pushes free their buffers when they end)."""

    images_dropped: int
    bytes_freed: int


class _State(Enum):
    PENDING = "pending"
    COMPLETE = "complete"
    RELEASED = "released"


class _Staleness(Enum):
    CURRENT = "current"
    SUPERSEDED = "superseded"  # a newer push for the same image took over
    CLOSED = "closed"  # the request was taken, cancelled, timed out or evicted


@dataclass(slots=True, eq=False)
class Reservation:
    """Budget held for one in-flight push; passed back to `complete` or `release`."""

    request_id: str
    image_index: int
    nbytes: int
    content_hash: bytes
    state: _State = _State.PENDING
    staleness: _Staleness = _Staleness.CURRENT


@dataclass(frozen=True, slots=True)
class _ClosedRequest:
    until: float
    delivered_hashes: dict[int, bytes]  # image index -> content hash, for images handed to the engine


@dataclass(slots=True)
class _Request:
    last_activity: float
    images: dict[int, ReceivedImage] = field(default_factory=dict)
    image_reservations: dict[int, Reservation] = field(default_factory=dict)
    pending: dict[int, Reservation] = field(default_factory=dict)
    arrival: asyncio.Event | None = None
    closed: bool = False


def _closed_error() -> InvalidRequestError:
    return InvalidRequestError("request no longer accepts image embeddings", code="embedding_request_closed")


class EmbeddingStore:
    """Budgeted, TTL-bounded holding area between the gRPC receiver and the engine."""

    def __init__(self, budget_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if budget_bytes <= 0 or ttl_s <= 0:
            raise ValueError("budget_bytes and ttl_s must be positive")
        self._budget_bytes = budget_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._requests: dict[str, _Request] = {}
        self._closed: dict[str, _ClosedRequest] = {}
        self._held_bytes = 0
        self._evicted_images_total = 0
        self._refused_over_budget_total = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of complete images plus reserved bytes of pushes still in flight."""
        return self._held_bytes

    def stats(self) -> StoreStats:
        return StoreStats(
            held_bytes=self._held_bytes,
            requests=len(self._requests),
            pending_pushes=sum(len(request.pending) for request in self._requests.values()),
            complete_images=sum(len(request.images) for request in self._requests.values()),
            evicted_images_total=self._evicted_images_total,
            refused_over_budget_total=self._refused_over_budget_total,
        )

    def delivered_content_hash(self, request_id: str, image_index: int) -> bytes | None:
        """The content hash of an image that is complete or was already taken, or None for any other image.

        A push for such an image is a retry whose reply got lost: it is answered as a duplicate.
        """
        request = self._requests.get(request_id)
        if request is not None and image_index in request.images:
            return request.image_reservations[image_index].content_hash
        closed = self._closed.get(request_id)
        if closed is not None and closed.until > self._clock():
            return closed.delivered_hashes.get(image_index)
        return None

    def reserve(self, request_id: str, image_index: int, nbytes: int, content_hash: bytes = b"") -> Reservation:
        """Books `nbytes` for an incoming image. A push already in flight for the same image is superseded."""
        self.evict_expired()
        if self._is_closed(request_id):
            raise _closed_error()
        if self._held_bytes + nbytes > self._budget_bytes:
            self._refused_over_budget_total += 1
            raise OverloadedError("language worker has no room for more image embeddings", code="embedding_store_full")
        request = self._requests.setdefault(request_id, _Request(last_activity=self._clock()))
        if image_index in request.images:
            raise ValueError("image is already complete; answer the push as a duplicate instead")
        previous = request.pending.get(image_index)
        if previous is not None:
            previous.staleness = _Staleness.SUPERSEDED
        reservation = Reservation(request_id, image_index, nbytes, content_hash)
        request.pending[image_index] = reservation
        request.last_activity = self._clock()
        self._held_bytes += nbytes
        return reservation

    def check_current(self, reservation: Reservation) -> None:
        """Raises when the push behind `reservation` should stop: superseded, or its request was closed."""
        if reservation.staleness is _Staleness.CLOSED:
            raise _closed_error()
        if reservation.staleness is _Staleness.SUPERSEDED:
            raise UnavailableError("a newer push for this image took over", code="embedding_push_superseded")

    def complete(self, reservation: Reservation, embeddings: torch.Tensor, tokens_per_tile: tuple[int, ...]) -> None:
        """Stores the image; its reserved bytes now count as held by the image."""
        self.check_current(reservation)
        if reservation.state is not _State.PENDING:
            raise ValueError("reservation is not pending")
        request = self._requests[reservation.request_id]
        del request.pending[reservation.image_index]
        reservation.state = _State.COMPLETE
        request.images[reservation.image_index] = ReceivedImage(
            reservation.image_index, embeddings, tokens_per_tile, reservation.content_hash
        )
        request.image_reservations[reservation.image_index] = reservation
        request.last_activity = self._clock()
        if request.arrival is not None:
            request.arrival.set()

    def release(self, reservation: Reservation) -> None:
        """Gives back the bytes of a push that did not complete. Safe to call more than once, or after complete."""
        if reservation.state is not _State.PENDING:
            return
        reservation.state = _State.RELEASED
        self._held_bytes -= reservation.nbytes
        request = self._requests.get(reservation.request_id)
        if request is not None and request.pending.get(reservation.image_index) is reservation:
            del request.pending[reservation.image_index]
            self._forget_if_empty(reservation.request_id, request)

    async def take(self, request_id: str, expected_images: int, timeout: float) -> list[ReceivedImage]:
        """Waits until images 0..expected_images-1 are complete and returns them in order; the store forgets them.

        On timeout raises DeadlineExceededError, and on cancellation re-raises; either way the request's
        buffers are freed and the request is closed.
        """
        if expected_images <= 0:
            raise ValueError("expected_images must be positive")
        if self._is_closed(request_id):
            raise _closed_error()
        request = self._requests.setdefault(request_id, _Request(last_activity=self._clock()))
        if request.arrival is not None:
            raise RuntimeError("another take is already waiting for this request")
        request.arrival = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                while not request.closed and any(index not in request.images for index in range(expected_images)):
                    request.arrival.clear()
                    await request.arrival.wait()
        except TimeoutError:
            self._close(request_id)
            raise DeadlineExceededError(
                "image embeddings did not arrive before the deadline", code="embedding_wait_timeout"
            ) from None
        except asyncio.CancelledError:
            self._close(request_id)
            raise
        if request.closed:
            raise _closed_error()
        images = [request.images[index] for index in range(expected_images)]
        self._close(request_id, delivered=expected_images)
        return images

    def cancel(self, request_id: str) -> CancelOutcome:
        """Drops everything held for `request_id`; in-flight pushes for it stop at their next chunk."""
        return self._close(request_id)

    def evict_expired(self) -> int:
        """Drops requests whose complete images sat untaken longer than the TTL; returns images dropped."""
        now = self._clock()
        for request_id in [rid for rid, closed in self._closed.items() if closed.until <= now]:
            del self._closed[request_id]
        evicted = 0
        for request_id, request in list(self._requests.items()):
            idle = now - request.last_activity > self._ttl_s
            if idle and request.arrival is None and not request.pending and request.images:
                evicted += self._close(request_id).images_dropped
        self._evicted_images_total += evicted
        return evicted

    async def run_sweeper(self, interval_s: float) -> None:
        """Evicts expired requests every `interval_s` until cancelled (for processes with idle stretches)."""
        while True:
            await asyncio.sleep(interval_s)
            self.evict_expired()

    def _is_closed(self, request_id: str) -> bool:
        closed = self._closed.get(request_id)
        return closed is not None and closed.until > self._clock()

    def _close(self, request_id: str, delivered: int = 0) -> CancelOutcome:
        """Forgets the request and keeps it closed for one TTL; images 0..delivered-1 went to the engine."""
        request = self._requests.pop(request_id, None)
        delivered_hashes = {} if request is None else {
            index: request.image_reservations[index].content_hash for index in range(delivered)
        }
        self._closed[request_id] = _ClosedRequest(self._clock() + self._ttl_s, delivered_hashes)
        if request is None:
            return CancelOutcome(images_dropped=0, bytes_freed=0)
        request.closed = True
        for reservation in request.pending.values():
            reservation.staleness = _Staleness.CLOSED
        freed = sum(reservation.nbytes for reservation in request.image_reservations.values())
        self._held_bytes -= freed
        if request.arrival is not None:
            request.arrival.set()
        return CancelOutcome(images_dropped=len(request.images), bytes_freed=freed)

    def _forget_if_empty(self, request_id: str, request: _Request) -> None:
        if not request.images and not request.pending and request.arrival is None:
            del self._requests[request_id]
