"""The vision replicas' embedding cache: keys, LRU budget, uuids, content affinity, and cached == uncached.

Units need neither Ray nor vLLM; the worker tests run a real `VisionWorker` on the tiny Flash checkpoint and compare
a cached worker with one whose cache is off (budget 0), image by image and token by token.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dvd_serve.common.chat import Detail, ImagePart
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.server.replica_choice import affinity_key, content_affine
from dvd_serve.vision_worker.embedding_cache import (
    EmbeddingCache,
    UuidRecord,
    content_digest,
    embedding_identity,
    encoder_identity,
    image_cache_key,
)
from dvd_serve.vision_worker.encoder import TileEmbeddings, VisionEncoderConfig
from dvd_serve.vision_worker.worker import VisionOutcome, VisionWorker, VisionWorkerConfig
from tests.dvd_fixtures import SIZES_BY_TILES, data_url, synthetic_image

RELATIVE, ABSOLUTE = 0.33, 0.0  # thresholds under which the random-weight router compresses some tiles


def _entry(tiles: int, hidden: int = 8) -> TileEmbeddings:
    return TileEmbeddings(full=torch.zeros(tiles, 256, hidden), small=None, p0=None)


# --- keys and the LRU ------------------------------------------------------------------------------------------


def test_keys_change_with_the_bytes_and_every_setting_and_nothing_else():
    identity = b"i" * 32
    digest = content_digest(b"image bytes")
    key = image_cache_key(digest, Detail.AUTO, 12, identity)
    assert key == image_cache_key(content_digest(b"image bytes"), Detail.AUTO, 12, identity)
    others = [
        image_cache_key(content_digest(b"image bytez"), Detail.AUTO, 12, identity),
        image_cache_key(digest, Detail.HIGH, 12, identity),
        image_cache_key(digest, Detail.AUTO, 6, identity),
        image_cache_key(digest, Detail.AUTO, 12, b"j" * 32),
    ]
    assert key not in others and len(set(others)) == len(others)
    assert embedding_identity(key, (256, 64)) != embedding_identity(key, (64, 256))


def test_encoder_identity_covers_the_checkpoint_dtype_and_thresholds(tiny_flash_checkpoint, tiny_chat_checkpoint):
    base = encoder_identity(tiny_flash_checkpoint, "torch.float32", (0.33, 0.0))
    assert base == encoder_identity(tiny_flash_checkpoint, "torch.float32", (0.33, 0.0))
    assert base != encoder_identity(tiny_flash_checkpoint, "torch.bfloat16", (0.33, 0.0))
    assert base != encoder_identity(tiny_flash_checkpoint, "torch.float32", (0.5, 0.0))
    assert base != encoder_identity(tiny_chat_checkpoint, "torch.float32", (0.33, 0.0))


def test_the_cache_evicts_least_recently_used_entries_to_stay_within_its_budget():
    one = _entry(1).nbytes
    cache = EmbeddingCache(budget_bytes=3 * one)
    for name in (b"a", b"b", b"c"):
        assert cache.put(name, _entry(1)) == 0
    assert cache.get(b"a") is not None  # a is now the most recent
    assert cache.put(b"d", _entry(1)) == 1  # b goes
    assert cache.get(b"b") is None and cache.get(b"c") is not None
    assert cache.put(b"big", _entry(4)) == 0  # larger than the whole budget: not kept, nothing evicted
    stats = cache.stats()
    assert (stats.entries, stats.bytes_held, stats.evictions) == (3, 3 * one, 1)
    assert (stats.hits, stats.misses) == (2, 1)
    assert stats.bytes_held <= stats.budget_bytes


def test_a_zero_budget_keeps_nothing():
    cache = EmbeddingCache(budget_bytes=0)
    cache.put(b"a", _entry(1))
    cache.remember_uuid("u", UuidRecord(b"d", Detail.AUTO, 12))
    assert cache.get(b"a") is None and cache.recall_uuid("u") is None


# --- content affinity ------------------------------------------------------------------------------------------


def test_affinity_sends_an_image_to_the_same_replica_until_it_is_overloaded():
    keys = [affinity_key(f"data:image/png;base64,{index}", None) for index in range(40)]
    chosen = [content_affine([0, 0, 0], [key]) for key in keys]
    assert set(chosen) == {0, 1, 2}  # images spread over the pool
    assert chosen == [content_affine([0, 0, 0], [key]) for key in keys]  # and always land on the same replica
    key, preferred = keys[0], chosen[0]
    busy = [1, 1, 1]
    busy[preferred] = 6  # far past its fair share: the image spills to the least-loaded replica
    assert content_affine(busy, [key]) != preferred
    assert content_affine(busy, [key], strict=True) == preferred  # a bare uuid can only be served there
    at_capacity = [1, 1, 1]
    at_capacity[preferred] = 2  # within the load bound, but at the replica's own capacity of 2
    assert content_affine(at_capacity, [key]) == preferred
    assert content_affine(at_capacity, [key], capacity=2) != preferred
    gone = [0, 0, 0]
    gone[preferred] = None  # type: ignore[call-overload]
    assert content_affine(gone, [key]) != preferred
    for other, was in zip(keys, chosen):  # only the gone replica's images move
        if was != preferred:
            assert content_affine(gone, [other]) == was


def test_a_request_goes_where_most_of_its_images_are():
    keys = [affinity_key(f"https://example.com/{index}.png", None) for index in range(30)]
    by_replica: dict[int, list[bytes]] = {}
    for key in keys:
        by_replica.setdefault(content_affine([0, 0], [key]), []).append(key)
    (a, b) = by_replica[0][:2], by_replica[1][:1]
    assert content_affine([0, 0], [*b, *a]) == 0
    assert affinity_key("x", "sku-1") == affinity_key("y", "sku-1")  # a uuid names the image whatever the URL


# --- a real vision worker --------------------------------------------------------------------------------------


def _worker(model, cache_mib: float = 64.0) -> VisionWorker:
    return VisionWorker.load(VisionWorkerConfig(
        encoder=VisionEncoderConfig(model=str(model), dtype="float32", router_relative_threshold=RELATIVE,
                                    router_absolute_threshold=ABSOLUTE),
        cache_mib=cache_mib,
    ))


def _image(tiles: int, seed: int) -> str:
    return data_url(synthetic_image(*SIZES_BY_TILES[tiles], seed=seed))


def _same(ours, theirs) -> None:
    assert [image.tokens_per_tile for image in ours] == [image.tokens_per_tile for image in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.embeddings, b.embeddings)


def test_cached_embeddings_equal_uncached_ones_also_when_the_router_spans_new_images(tiny_flash_checkpoint):
    first, second, third = _image(5, 1), _image(3, 2), _image(7, 3)
    requests = [
        [ImagePart(first)],
        [ImagePart(first), ImagePart(second)],  # first cached: the quantile now spans both images' tiles
        [ImagePart(second), ImagePart(third), ImagePart(first)],
        [ImagePart(first, detail=Detail.HIGH), ImagePart(first, detail=Detail.LOW)],  # other settings: misses
        [ImagePart(second), ImagePart(second)],  # the same image twice in one request
    ]

    async def run(worker: VisionWorker):
        try:
            results = []
            for parts in requests:
                outcome = VisionOutcome()
                results.append((await worker.encode(parts, outcome), outcome))
            return results
        finally:
            await worker.close()

    cached = asyncio.run(run(_worker(tiny_flash_checkpoint)))
    uncached = asyncio.run(run(_worker(tiny_flash_checkpoint, cache_mib=0)))
    for (ours, _), (theirs, _) in zip(cached, uncached, strict=True):
        _same(ours, theirs)
    assert [(o.cache_hits, o.cache_misses) for _, o in cached] == [(0, 1), (1, 1), (2, 1), (0, 2), (2, 0)]
    assert all(o.cache_hits == 0 for _, o in uncached)
    assert any(64 in image.tokens_per_tile for image in cached[2][0])  # the router did compress tiles
    assert cached[4][1].encode_s == 0.0  # all hits: no encoder batch ran


def test_changed_bytes_never_hit_and_a_uuid_names_the_latest_bytes(tiny_flash_checkpoint):
    old, new = _image(3, 10), _image(3, 11)

    async def run():
        worker = _worker(tiny_flash_checkpoint)
        try:
            sent = await worker.encode([ImagePart(old, uuid="sku-1")])
            by_uuid = await worker.encode([ImagePart("", uuid="sku-1")])
            reused = await worker.encode([ImagePart(new, uuid="sku-1")])  # the client reused its uuid
            by_uuid_again = await worker.encode([ImagePart("", uuid="sku-1")])
            with pytest.raises(InvalidRequestError) as missing:
                await worker.encode([ImagePart("", uuid="never-sent", param="messages[0].content[0].uuid")])
            # A bare uuid carries no settings of its own (the gateway fills in the defaults): it gets the image as
            # it was sent, here at `low`.
            low = await worker.encode([ImagePart(old, uuid="sku-2", detail=Detail.LOW)])
            low_by_uuid = await worker.encode([ImagePart("", uuid="sku-2", detail=Detail.AUTO)])
            _same(low_by_uuid, low)
            return sent, by_uuid, reused, by_uuid_again, missing.value
        finally:
            await worker.close()

    sent, by_uuid, reused, by_uuid_again, missing = asyncio.run(run())
    _same(by_uuid, sent)
    _same(by_uuid_again, reused)
    assert not torch.equal(reused[0].embeddings, sent[0].embeddings)
    assert (missing.code, missing.param, missing.http_status) == (
        "image_not_cached", "messages[0].content[0].uuid", 400
    )


def test_the_cache_stays_within_its_budget_under_many_new_images(tiny_flash_checkpoint):
    async def run():
        worker = _worker(tiny_flash_checkpoint, cache_mib=1.0)
        try:
            for seed in range(12):
                await worker.encode([ImagePart(_image(3, 100 + seed))])
                await worker.encode([ImagePart(_image(3, 100 + seed // 2))])  # repeats mixed in
                stats = worker.cache.stats()
                assert stats.bytes_held <= stats.budget_bytes
            return worker.cache.stats()
        finally:
            await worker.close()

    stats = asyncio.run(run())
    assert stats.evictions > 0 and stats.hits > 0 and stats.entries >= 1


def test_concurrent_requests_for_one_new_image_encode_it_once(tiny_flash_checkpoint):
    image = _image(5, 20)

    async def run():
        worker = _worker(tiny_flash_checkpoint)
        try:
            outcomes = [VisionOutcome() for _ in range(3)]
            results = await asyncio.gather(*(worker.encode([ImagePart(image)], outcome) for outcome in outcomes))
            return results, outcomes, worker._in_flight
        finally:
            await worker.close()

    results, outcomes, in_flight = asyncio.run(run())
    for other in results[1:]:
        _same(other, results[0])
    assert sorted((o.cache_misses, o.cache_in_flight) for o in outcomes) == [(0, 1), (0, 1), (1, 0)]
    assert [o.encode_s > 0 for o in outcomes].count(True) == 1  # one encoder batch for the three requests
    assert not in_flight


class GatedVisionWorker(VisionWorker):
    """Test double: a real worker whose encodings wait for `gate`, so a test can act while one is in flight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def _encode_missing(self, *args, **kwargs):
        await self.gate.wait()
        return await super()._encode_missing(*args, **kwargs)


def test_a_request_waiting_on_a_cancelled_encoding_encodes_the_image_itself(tiny_flash_checkpoint):
    image = _image(3, 21)

    async def run():
        plain = _worker(tiny_flash_checkpoint, cache_mib=0)
        worker = GatedVisionWorker(plain.config, plain.encoder)
        try:
            owner = asyncio.create_task(worker.encode([ImagePart(image)]))
            waiting = VisionOutcome()
            waiter = asyncio.create_task(worker.encode([ImagePart(image)], waiting))
            while waiting.cache_in_flight == 0:  # the waiter found the owner's encoding in flight
                await asyncio.sleep(0.005)
            owner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await owner
            worker.gate.set()
            return await asyncio.wait_for(waiter, 120), await plain.encode([ImagePart(image)]), worker._in_flight
        finally:
            await worker.close()
            await plain.close()

    got, expected, in_flight = asyncio.run(run())
    _same(got, expected)
    assert not in_flight
