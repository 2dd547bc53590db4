"""Nothing lost when a language replica dies before the first token (real processes, one local Ray).

Two language replicas and one vision replica serve the tiny Flash checkpoint behind the real gateway. A request
whose image is held at the local origin has its language replica chosen and its stream open, but no embeddings
pushed yet; killing that replica then and releasing the image must end in a normal answer from the other replica.
With every language replica restarting, new requests wait for one to come back instead of failing.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

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
from tests.fault_helpers import completion_tokens, eventually, image_chat, served_gateway

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
MAX_TOKENS = 4
RESTART_BOUND_S = 180.0
REPLICA_WAIT_S = 150.0  # longer than a language replica's reload here


@pytest.fixture(scope="module")
def origin():
    with ImageOrigin({"/square.png": png_bytes(synthetic_image(448, 448, seed=31))}) as images:
        yield images


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(local_ray, tiny_flash_checkpoint, origin, tmp_path_factory):
    config = ray_test_config(
        tiny_flash_checkpoint, vision_replicas=1, language_pool={"replicas": 2},
        image_fetch=UrlFetchConfig(allow_private_networks=True),
        gateway=GatewayConfig(host="127.0.0.1", port=free_port(), request_timeout_s=REPLICA_WAIT_S + 60),
        replica_wait_s=REPLICA_WAIT_S,
        memory_report={"folder": str(tmp_path_factory.mktemp("memory")), "interval_s": 1.0},
    )
    async with served_gateway(config, origin) as served:
        yield served


async def _all_back(served) -> None:
    async def back() -> bool:
        return all(replica.alive for replica in served.language.replicas)

    assert await eventually(back, RESTART_BOUND_S, interval_s=0.5), "a language replica never came back"


async def test_a_language_replica_killed_before_the_first_token_is_retried_on_the_other(served):
    reference = completion_tokens(
        response := await served.client.post("/v1/chat/completions", json=image_chat(
            [served.origin.base_url + "/square.png"], MAX_TOKENS))
    )
    expected_text = response.json()["choices"][0]["message"]["content"]
    for stream in (False, True):
        fetches = served.origin.held_fetches
        served.origin.hold()
        body = image_chat([served.origin.base_url + "/held/square.png"], MAX_TOKENS, stream=stream)
        request = asyncio.create_task(served.client.post("/v1/chat/completions", json=body))

        async def fetched() -> bool:
            return served.origin.held_fetches > fetches

        assert await eventually(fetched, 30.0)
        (victim,) = [replica for replica in served.language.replicas if replica.outstanding]
        os.kill(victim.info.pid, signal.SIGKILL)
        await asyncio.sleep(0.5)  # the stream to the dead replica breaks before the embeddings are pushed
        served.origin.release()
        response = await asyncio.wait_for(request, 60.0)
        assert response.status_code == 200, response.text
        if stream:
            assert '"error"' not in response.text and response.text.rstrip().endswith("data: [DONE]")
        else:
            assert completion_tokens(response) == reference
            assert response.json()["choices"][0]["message"]["content"] == expected_text  # same greedy answer
        assert served.origin.held_fetches == fetches + 2  # the image was encoded and pushed again
        await _all_back(served)
    retries = sum([
        await served.metric("dvd_replica_retries_total", pool="language", reason=reason)
        for reason in ("replica_unavailable", "embedding_sink_unavailable", "engine_dead")
    ])
    assert retries == 2


async def test_requests_arriving_while_every_language_replica_restarts_wait_and_are_answered(served):
    await _all_back(served)
    for replica in served.language.replicas:
        os.kill(replica.info.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    for replica in served.language.replicas:  # as the first failed request to each would (see the test above)
        served.language.mark_dead(replica)
    assert (await served.client.get("/ready")).status_code == 503
    requests = [
        asyncio.create_task(served.client.post("/v1/chat/completions", json=image_chat(
            [data_url(synthetic_image(448, 448, seed))], MAX_TOKENS)))
        for seed in (41, 42)
    ]

    async def both_wait() -> bool:
        return served.language.waiting == 2

    assert await eventually(both_wait, 10.0)
    answers = await asyncio.gather(*requests)
    assert [completion_tokens(answer) for answer in answers] == [MAX_TOKENS, MAX_TOKENS]
    assert time.monotonic() - killed_at < REPLICA_WAIT_S
    assert (served.language.admitted, served.language.waiting, served.pipeline.in_flight) == (0, 0, 0)


async def test_replicas_sample_their_own_memory(served):
    folder = Path(served.pipeline.config.memory_report.folder)
    files = {path.name.split("-")[1] for path in folder.glob("memory-*.csv")}
    assert {"vision", "language"} <= files
    with next(folder.glob("memory-language-*.csv")).open() as rows:
        sample = next(csv.DictReader(rows))
    assert float(sample["rss_mib"]) > 100 and int(sample["pymalloc_blocks"]) > 0
    assert float(sample["children_rss_mib"]) >= 0  # the engine core runs in the actor's process in tests
