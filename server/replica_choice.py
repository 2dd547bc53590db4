"""Which replica of a pool takes the next request: the live one with the least outstanding work.

Ties rotate: among equally loaded replicas the first one at or after `cursor` wins, so an idle pool spreads
requests round-robin instead of sending every one to replica 0.
"""

from __future__ import annotations

from collections.abc import Sequence


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
