"""Which replica of a pool takes the next request.

`least_outstanding`: the live one with the least outstanding work. Ties rotate: among equally loaded replicas the
first one at or after `cursor` wins, so an idle pool spreads requests round-robin instead of sending every one to
replica 0.

`content_affine`: the replica most of a request's images hash to (rendezvous hashing of each image's affinity key
over the available replicas, so a replica that goes away moves only its own images), as long as it carries no more
than `load_factor` times its fair share of the outstanding work (consistent hashing with bounded loads) and is below
its per-replica capacity; past that bound a hot image spills to the least-loaded replica instead of piling up on
one.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence

# A preferred replica may carry up to this multiple of the mean outstanding work (plus the request itself).
AFFINITY_LOAD_FACTOR = 1.25


def least_outstanding(outstanding: Sequence[int | None], cursor: int = 0) -> int | None:
    """Index of the least-loaded replica; `None` entries are unavailable. None when no replica is available."""
    count = len(outstanding)
    best: int | None = None
    for step in range(count):
        index = (cursor + step) % count
        load = outstanding[index]
        if load is not None and (best is None or load < outstanding[best]):
            best = index
    return best


def content_affine(
    outstanding: Sequence[int | None],
    affinity: Sequence[bytes],
    cursor: int = 0,
    *,
    strict: bool = False,
    load_factor: float = AFFINITY_LOAD_FACTOR,
    capacity: int | None = None,
) -> int | None:
    """Index of the replica the request's images prefer (see the module text); `strict` ignores the load bound
    (for images named only by a client uuid, which just that replica can have). `capacity` is the work one replica
    is meant to hold (the pool's admission bound per replica): a preferred replica at it spills too. No keys:
    `least_outstanding`."""
    available = [index for index, load in enumerate(outstanding) if load is not None]
    if not available or not affinity:
        return least_outstanding(outstanding, cursor)
    votes = Counter(_rendezvous(key, available) for key in affinity)
    preferred = max(votes, key=votes.__getitem__)  # ties: the first image's replica
    total = sum(outstanding[index] for index in available)  # type: ignore[misc]
    bound = math.ceil(load_factor * (total + 1) / len(available))
    if capacity:
        bound = min(bound, capacity)
    if strict or outstanding[preferred] + 1 <= bound:  # type: ignore[operator]
        return preferred
    return least_outstanding(outstanding, cursor)


def affinity_key(url: str, uuid: str | None) -> bytes:
    """An image's affinity key: its client uuid, else a digest of its URL (a data URL holds the bytes themselves;
    an http(s) URL is only a hint, the replica keys its cache by the bytes it fetches)."""
    if uuid is not None:
        return b"uuid:" + uuid.encode()
    return hashlib.blake2b(url.encode(), digest_size=16).digest()


def _rendezvous(key: bytes, candidates: Sequence[int]) -> int:
    return max(candidates, key=lambda index: hashlib.blake2b(key + index.to_bytes(4, "little"), digest_size=8).digest())
