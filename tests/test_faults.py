"""Process faults and admission limits with real processes (section D of the robustness bar).

One local Ray serves the tiny Flash checkpoint (2 vision replicas with room for 1 request each, 1 language
replica) behind the real gateway on a real port; requests go over HTTP. Images come from a local origin whose
`/held/` paths answer only when the test says so, which keeps a request inside its vision work for as long as
needed: long enough to kill a worker, disconnect, or fill the vision pool. Tests that kill processes run last.
SIGTERM draining of the whole `dvd-serve serve` process is tested in test_serve_e2e.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import psutil
import pytest
import pytest_asyncio

from dvd_serve.common.errors import OverloadedError, UnavailableError
from dvd_serve.server.gateway_config import GatewayConfig
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig
from tests.dvd_fixtures import (  # noqa: F401 (local_ray is a fixture)
    ImageOrigin,
    data_url,
    free_port,
    local_ray,
    png_bytes,
    ray_test_config,
    synthetic_image,
)
from tests.fault_helpers import Served, completion_tokens, eventually, image_chat, served_gateway

MAX_TOKENS = 4
LONG_STREAM_TOKENS = 3700  # with a one-tile image this nearly fills the 4096-token context
RETRY_AFTER_S = 3
TILE_CAP = 4
FAULT_BOUND_S = 30.0  # a request hit by a fault must end within this
ABORT_BOUND_S = 5.0  # work for a gone client must stop within this
RESTART_BOUND_S = 180.0  # a killed replica must be serving again within this


# --- units: admission without Ray --------------------------------------------------------------------------------


def _pool(alive: list[bool], bound: int | None, replica_wait_s: float = 0.0):
    from dvd_serve.server.ray_actors import Replica, ReplicaPool

    replicas = [Replica(name=f"vision[{i}]", index=i, handle=None, alive=up) for i, up in enumerate(alive)]
    return ReplicaPool(
        "vision", replicas, probe_timeout_s=1.0, max_outstanding_per_replica=bound, replica_wait_s=replica_wait_s
    )


def test_admission_bound_scales_with_live_replicas_and_places_come_back():
    pool = _pool([True, True], bound=2)
    released: list[int] = []
    places = [pool.admit(on_release=lambda: released.append(1)) for _ in range(4)]
    with pytest.raises(OverloadedError) as refused:
        pool.admit()
    assert (refused.value.http_status, refused.value.code) == (429, "overloaded")
    places[0].release()
    places[0].release()  # a second release gives nothing back
    assert (pool.admitted, len(released)) == (3, 1)
    pool.replicas[1].alive = False  # one live replica: room for 2
    with pytest.raises(OverloadedError):
        pool.admit()
    for place in places[1:]:
        place.release()
    assert pool.admitted == 0
    pool.admit()


def test_admission_without_a_live_replica_is_503_and_without_a_bound_never_429():
    with pytest.raises(UnavailableError):
        _pool([False, False], bound=5).admit()
    unbounded = _pool([True], bound=None)
    for _ in range(1000):
        unbounded.admit()
    assert unbounded.admitted == 1000


@pytest.mark.asyncio
async def test_admission_waits_for_a_restarting_replica_within_the_wait_and_the_bound():
    pool = _pool([False], bound=1, replica_wait_s=0.3)
    with pytest.raises(UnavailableError):
        await pool.admit_waiting()  # nothing is restarting: nothing to wait for
    restarting = pool.replicas[0].reviving = asyncio.ensure_future(asyncio.sleep(60))
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as refused:
            await pool.admit_waiting()
        assert 0.3 <= time.monotonic() - started < 2.0 and refused.value.http_status == 503
        waiter = asyncio.ensure_future(pool.admit_waiting())
        await asyncio.sleep(0.05)
        assert pool.waiting == 1
        with pytest.raises(UnavailableError):
            await pool.admit_waiting()  # as many may wait as one live replica could hold: 1
        pool.mark_live(pool.replicas[0], None)
        place = await asyncio.wait_for(waiter, 1.0)
        assert (pool.admitted, pool.waiting) == (1, 0)
        place.release()
    finally:
        restarting.cancel()


# --- a gateway over a local Ray ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin():
    with ImageOrigin({"/square.png": png_bytes(synthetic_image(448, 448, seed=21))}) as images:
        yield images


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(local_ray, tiny_flash_checkpoint, origin):
    gateway = GatewayConfig(
        host="127.0.0.1", port=free_port(), max_tiles_per_image=TILE_CAP, retry_after_s=RETRY_AFTER_S
    )
    config = ray_test_config(
        tiny_flash_checkpoint, vision_pool={"max_outstanding_per_replica": 1},
        image_fetch=UrlFetchConfig(allow_private_networks=True), gateway=gateway,
        replica_wait_s=0,  # a pool without a live replica refuses at once (waiting: test_language_retry)
    )
    async with served_gateway(config, origin) as served:
        yield served


def _chat(image_urls: list[str], max_tokens: int = MAX_TOKENS, stream: bool = False) -> dict:
    return image_chat(image_urls, max_tokens, stream)


def _held(served: Served) -> str:
    return served.origin.base_url + "/held/square.png"


async def _fetches_reach(served: Served, count: int) -> None:
    async def reached() -> bool:
        return served.origin.held_fetches >= count

    assert await eventually(reached, FAULT_BOUND_S), f"only {served.origin.held_fetches} fetches arrived"


async def _all_work_done(served: Served) -> None:
    async def idle() -> bool:
        return not any((await served.gauges()).values()) and not any((await served.actor_work()).values())

    if not await eventually(idle, FAULT_BOUND_S):
        pytest.fail(f"work left behind: {await served.gauges()} {await served.actor_work()}")
    assert (served.vision.admitted, served.language.admitted, served.pipeline.in_flight) == (0, 0, 0)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_images_are_cut_into_at_most_the_configured_tiles(served):
    big = data_url(synthetic_image(1792, 1344, seed=22))  # 12 tiles + thumbnail without the cap
    response = await served.client.post("/v1/chat/completions", json=_chat([big]))
    assert completion_tokens(response) == MAX_TOKENS
    assert 256 < int(response.headers["x-dvd-visual-tokens"]) <= 256 * (TILE_CAP + 1)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_an_overload_burst_gets_429_before_any_image_is_fetched_or_decoded(served):
    decoded_before = await served.metric("dvd_image_fetch_decode_seconds_count")
    fetches_before = served.origin.held_fetches
    served.origin.hold()
    admitted = [
        asyncio.create_task(served.client.post("/v1/chat/completions", json=_chat([_held(served)])))
        for _ in range(2)  # one per vision replica: the pool is full
    ]
    await _fetches_reach(served, fetches_before + 2)

    burst = await asyncio.gather(*(
        served.client.post("/v1/chat/completions", json=_chat([data_url(synthetic_image(448, 448, seed=seed))]))
        for seed in range(10)
    ))
    assert [response.status_code for response in burst] == [429] * 10
    for response in burst:
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        assert response.json()["error"]["code"] == "overloaded"
    assert await served.metric("dvd_admission_refusals_total", pool="vision") == 10
    assert await served.metric("dvd_image_fetch_decode_seconds_count") == decoded_before
    assert served.origin.held_fetches == fetches_before + 2

    served.origin.release()
    for response in await asyncio.gather(*admitted):
        assert completion_tokens(response) == MAX_TOKENS
    assert await served.metric("dvd_image_fetch_decode_seconds_count") == decoded_before + 2
    await _all_work_done(served)
    follow_up = await served.client.post("/v1/chat/completions", json=_chat([data_url(synthetic_image(448, 448, 1))]))
    assert completion_tokens(follow_up) == MAX_TOKENS


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_gone_during_vision_work_aborts_the_image_fetch(served):
    abandoned_before, fetches_before = served.origin.abandoned, served.origin.held_fetches
    served.origin.hold()
    request = asyncio.create_task(served.client.post("/v1/chat/completions", json=_chat([_held(served)])))
    await _fetches_reach(served, fetches_before + 1)
    request.cancel()  # the client closes its connection before any answer

    async def fetch_abandoned() -> bool:
        return served.origin.abandoned > abandoned_before

    assert await eventually(fetch_abandoned, ABORT_BOUND_S), "the vision worker kept fetching for a gone client"
    await _all_work_done(served)
    served.origin.release()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_client_gone_mid_stream_aborts_the_engine_request(served):
    disconnects_before = await served.metric("dvd_stream_aborts_total", reason="client_disconnected")
    body = _chat([data_url(synthetic_image(448, 448, seed=23))], max_tokens=LONG_STREAM_TOKENS, stream=True)
    async with served.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        contents = 0
        async for line in response.aiter_lines():
            contents += line.startswith("data: ") and '"content"' in line
            if contents >= 3:
                break
    closed_at = time.monotonic()

    await _all_work_done(served)
    assert time.monotonic() - closed_at < ABORT_BOUND_S  # far sooner than the rest of the answer would take
    assert await served.metric("dvd_stream_aborts_total", reason="client_disconnected") == disconnects_before + 1


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_vision_worker_killed_mid_request_is_retried_elsewhere_and_restarts(served):
    fetches_before = served.origin.held_fetches
    served.origin.hold()
    request = asyncio.create_task(served.client.post("/v1/chat/completions", json=_chat([_held(served)])))
    await _fetches_reach(served, fetches_before + 1)
    (victim,) = [replica for replica in served.vision.replicas if replica.outstanding]
    killed_pid = victim.info.pid
    os.kill(killed_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    served.origin.release()

    response = await asyncio.wait_for(request, FAULT_BOUND_S)
    assert completion_tokens(response) == MAX_TOKENS  # answered by the other replica
    assert time.monotonic() - killed_at < FAULT_BOUND_S
    assert served.origin.held_fetches == fetches_before + 2  # fetched again by the replica that took over

    async def restarted() -> bool:
        return victim.alive and victim.info.pid != killed_pid

    assert await eventually(restarted, RESTART_BOUND_S, interval_s=0.5), "the killed vision replica never came back"

    # Two requests at once fill both replicas (one place each): the restarted one takes work again.
    served.origin.hold()
    both = [
        asyncio.create_task(served.client.post("/v1/chat/completions", json=_chat([_held(served)])))
        for _ in range(2)
    ]
    await _fetches_reach(served, fetches_before + 4)
    assert [replica.outstanding for replica in served.vision.replicas] == [1, 1]
    served.origin.release()
    for response in await asyncio.gather(*both):
        assert completion_tokens(response) == MAX_TOKENS
    await _all_work_done(served)


def _engine_core(language_pid: int) -> psutil.Process:
    children = psutil.Process(language_pid).children(recursive=True)
    cores = [child for child in children if "EngineCore" in " ".join([child.name(), *child.cmdline()])]
    assert cores, f"no engine core process among {[child.name() for child in children]}"
    return cores[0]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_dead_language_engine_ends_streams_with_an_error_and_its_replica_is_replaced(served):
    (replica,) = served.language.replicas
    old_pid = replica.info.pid
    body = _chat([data_url(synthetic_image(448, 448, seed=24))], max_tokens=LONG_STREAM_TOKENS, stream=True)
    async with served.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        while '"content"' not in await anext(lines):
            pass
        core = _engine_core(old_pid)
        core.kill()
        killed_at = time.monotonic()
        events = [line.removeprefix("data: ") async for line in lines if line.startswith("data: ")]
    assert time.monotonic() - killed_at < FAULT_BOUND_S
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("engine_dead", "service_unavailable_error")

    not_ready = await served.client.get("/ready")
    assert not_ready.status_code == 503 and not_ready.json()["pools"]["language"] is False
    refused = await served.client.post("/v1/chat/completions", json=_chat([]))
    assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S)
    assert refused.json()["error"]["code"] == "no_replica_available"  # not sent to the dying replica

    async def ready_again() -> bool:
        return (await served.client.get("/ready")).status_code == 200

    assert await eventually(ready_again, RESTART_BOUND_S, interval_s=1.0), "the language replica never came back"
    assert replica.info.pid != old_pid
    assert not psutil.pid_exists(old_pid) and not psutil.pid_exists(core.pid)  # nothing of the old replica is left
    response = await served.client.post("/v1/chat/completions", json=_chat([data_url(synthetic_image(448, 448, 2))]))
    assert completion_tokens(response) == MAX_TOKENS
    await _all_work_done(served)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_language_worker_killed_while_idle_is_found_at_its_new_address(served):
    """SIGKILL the language actor between requests: no call is in flight to report it, and Ray restarts it with its
    embedding sink on a new port. The first image request pushes to the old address and fails cleanly; after that
    the replica must be re-probed, so image requests succeed again once it has loaded."""
    (replica,) = served.language.replicas
    old_pid, old_address = replica.info.pid, replica.info.grpc_address
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    statuses: list[int] = []

    async def image_request_succeeds() -> bool:
        body = _chat([data_url(synthetic_image(448, 448, seed=25 + len(statuses)))])
        response = await served.client.post("/v1/chat/completions", json=body)
        statuses.append(response.status_code)
        if response.status_code != 200:
            assert response.status_code == 503, response.text
            return False
        assert completion_tokens(response) == MAX_TOKENS
        return True

    assert await eventually(image_request_succeeds, RESTART_BOUND_S, interval_s=1.0), statuses
    assert time.monotonic() - killed_at < RESTART_BOUND_S
    assert replica.info.pid != old_pid and replica.info.grpc_address != old_address
    await _all_work_done(served)
