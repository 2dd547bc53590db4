"""RayPipeline on a local Ray: both topologies, error mapping, cancellation, replica failure, draining.

The Ray tests share one local Ray and two pipelines over the tiny Flash checkpoint (module scope): a decoupled
one (2 vision replicas, 1 language replica) and a coupled one (1 replica). Tests that break a pipeline run last.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest
import pytest_asyncio

from dvd_serve.common.chat import ChatJob, ChatMessage, Detail, ImagePart, SamplingConfig, TextPart
from dvd_serve.common.errors import InvalidRequestError, PayloadTooLargeError, ServingError, UnavailableError
from dvd_serve.server.replica_choice import affinity_key, content_affine, least_outstanding
from dvd_serve.server.serve_config import PoolConfig, ServeConfig
from tests.dvd_fixtures import data_url, local_ray, ray_test_config, synthetic_image  # noqa: F401 (fixture)

MAX_TOKENS = 6
TILES_HIGH = (3, 1)  # tiles of the two test images (896x448 -> 2 + thumbnail, 448x448 -> 1)


def _job(request_id: str, parts: tuple, max_tokens: int = MAX_TOKENS) -> ChatJob:
    return ChatJob(
        request_id=request_id,
        messages=(ChatMessage("user", parts),),
        sampling=SamplingConfig(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def _image_job(request_id: str, detail: Detail = Detail.HIGH, max_tokens: int = MAX_TOKENS) -> ChatJob:
    images = (synthetic_image(896, 448, seed=1), synthetic_image(448, 448, seed=2))
    parts = tuple(
        ImagePart(url=data_url(image), detail=detail, param=f"messages[0].content[{index}].image_url")
        for index, image in enumerate(images)
    )
    return _job(request_id, parts + (TextPart("Describe both images."),), max_tokens)


async def _run(pipeline, job: ChatJob):
    deltas = [delta async for delta in pipeline.generate(job)]
    return [token for delta in deltas for token in delta.token_ids], deltas


# --- units: no Ray ---------------------------------------------------------------------------------------------


def test_least_outstanding_picks_the_least_loaded_live_replica():
    assert least_outstanding([3, 1, 2]) == 1
    assert least_outstanding([None, 5, 2, None]) == 2
    assert least_outstanding([0, 0, 0], cursor=1) == 1  # ties rotate from the cursor
    assert least_outstanding([0, 0, 0], cursor=5) == 2
    assert least_outstanding([1, None, 1], cursor=1) == 2
    assert least_outstanding([None, None]) is None
    assert least_outstanding([]) is None


def test_pool_sends_work_to_the_least_loaded_live_replica():
    from dvd_serve.server.ray_actors import Replica, ReplicaPool

    replicas = [Replica(name=f"vision[{i}]", index=i, handle=None, alive=True, outstanding=load)
                for i, load in enumerate([2, 0, 1])]
    pool = ReplicaPool("vision", replicas, probe_timeout_s=1.0)
    assert pool.choose() is replicas[1]
    replicas[1].alive = False
    assert pool.choose() is replicas[2]
    assert pool.choose(exclude=frozenset({2})) is replicas[0]
    with pytest.raises(UnavailableError):
        pool.choose(exclude=frozenset({0, 2}))


def test_serve_config_derives_placement_and_worker_configs(tiny_flash_checkpoint):
    config = ServeConfig(
        model=str(tiny_flash_checkpoint),
        vision_pool=PoolConfig(replicas=3, resources={"vision_gpu": 1}),
        language_pool=PoolConfig(replicas=2, num_gpus=2, num_cpus=4, resources={"lm_gpu": 0.5}),
        actor_env={"HF_HUB_OFFLINE": "0"},
        grpc_auth_token="secret",
        max_model_len=2048,
    )
    assert list(config.pools) == ["language", "vision"]
    assert config.embedded_ray_resources() == {"vision_gpu": 3.0, "lm_gpu": 1.0}
    assert config.embedded_ray_cpus(machine_cpus=2) == 11  # 3 x 1 + 2 x 4 reserved
    vision_options = config.vision_pool.actor_options(cluster_has_gpus=True, env_vars={})
    assert (vision_options["num_gpus"], vision_options["num_cpus"], vision_options["resources"]) == (
        1.0, 1.0, {"vision_gpu": 1}
    )
    assert config.vision_pool.actor_options(cluster_has_gpus=False, env_vars={})["num_gpus"] == 0.0
    assert config.language_pool.actor_options(cluster_has_gpus=False, env_vars={})["num_gpus"] == 2
    env = config.actor_env_vars(cluster_has_gpus=False, environ={"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "3", "HF_HUB_OFFLINE": "0"}
    assert config.actor_env_vars(cluster_has_gpus=True, environ={}) == {"HF_HUB_OFFLINE": "0"}
    worker = config.language_worker_config("10.0.0.7")
    assert (worker.grpc_host, worker.grpc_auth_token, worker.engine.max_model_len) == ("10.0.0.7", "secret", 2048)
    assert config.vision_worker_config().grpc_auth_token == "secret"
    coupled = config.model_copy(update={"topology": "coupled"})
    assert list(coupled.pools) == ["coupled"]
    assert coupled.embedded_ray_resources() == {"lm_gpu": 1.0}


@pytest.mark.parametrize("error_type", [InvalidRequestError, PayloadTooLargeError, UnavailableError])
def test_serving_errors_survive_the_trip_through_ray(error_type):
    from dvd_serve.server.ray_actors import RemoteServingError, to_serving_error

    original = error_type("The image is bad.", code="bad_image", param="messages[0].content[1].image_url")
    carried = pickle.loads(pickle.dumps(RemoteServingError.wrap(original)))
    restored = to_serving_error(carried, "vision")
    assert type(restored) is error_type
    assert (restored.message, restored.code, restored.param) == (original.message, original.code, original.param)


def test_unexpected_replica_failures_hide_their_details():
    from dvd_serve.server.ray_actors import to_serving_error

    unexpected = to_serving_error(RuntimeError("/secret/path exploded"), "vision")
    assert type(unexpected) is ServingError and unexpected.http_status == 500
    assert "/secret" not in unexpected.message


def test_language_side_gets_jobs_without_image_bytes():
    from dvd_serve.server.ray_pipeline import without_image_data

    job = _image_job("strip")
    stripped = without_image_data(job)
    assert [part.url for part in stripped.images] == ["", ""]
    assert [part.param for part in stripped.images] == [part.param for part in job.images]
    assert stripped.messages[0].parts[-1] == job.messages[0].parts[-1]


# --- a local Ray ------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipelines(local_ray, tiny_flash_checkpoint):
    from dvd_serve.server.metrics import ServingMetrics
    from dvd_serve.server.ray_pipeline import RayPipeline

    progress: list[str] = []
    metrics = ServingMetrics()
    dvd, coupled = await asyncio.gather(
        RayPipeline.start(ray_test_config(tiny_flash_checkpoint, "dvd", 2), progress.append, metrics=metrics),
        RayPipeline.start(ray_test_config(tiny_flash_checkpoint, "coupled", 1), progress.append),
    )
    assert sum("ready on node" in line for line in progress) == 4  # 2 vision + 1 language + 1 coupled
    yield {"dvd": dvd, "coupled": coupled, "metrics": metrics}
    await asyncio.gather(dvd.shutdown(), coupled.shutdown())


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_both_topologies_are_ready(pipelines):
    assert await pipelines["dvd"].readiness() == {"language": True, "vision": True}
    assert await pipelines["coupled"].readiness() == {"coupled": True}
    assert pipelines["dvd"].model_id == pipelines["coupled"].model_id == "tiny-flash"


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("detail", [Detail.HIGH, Detail.AUTO])
async def test_dvd_and_coupled_give_the_same_greedy_tokens(pipelines, detail):
    decoupled, dvd_deltas = await _run(pipelines["dvd"], _image_job(f"dvd-{detail.value}", detail))
    coupled, coupled_deltas = await _run(pipelines["coupled"], _image_job(f"coupled-{detail.value}", detail))

    assert len(decoupled) == MAX_TOKENS
    assert decoupled == coupled
    assert dvd_deltas[0].prompt_token_count == coupled_deltas[0].prompt_token_count
    first, last = dvd_deltas[0].timings, dvd_deltas[-1].timings
    assert first is not None and last is not None
    assert first.vision_s > 0 and last.vision_s == first.vision_s
    assert last.inference_s > 0
    assert last.visual_tokens == coupled_deltas[-1].timings.visual_tokens
    full_tokens = 256 * sum(TILES_HIGH)
    if detail is Detail.HIGH:
        assert last.visual_tokens == full_tokens
        assert last.embedding_bytes == full_tokens * 128 * 4  # tiny LLM hidden 128, float32
    else:
        assert last.visual_tokens < full_tokens  # the router compressed some tiles


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_text_only_requests_skip_the_vision_pool(pipelines):
    encodes = pipelines["metrics"].encode_seconds
    encodes_before = _sample_count(encodes)
    job = _job("text-only", (TextPart("Say something."),))
    decoupled, deltas = await _run(pipelines["dvd"], job)
    coupled, _ = await _run(pipelines["coupled"], _job("text-only-coupled", (TextPart("Say something."),)))

    assert decoupled == coupled and len(decoupled) == MAX_TOKENS
    assert deltas[-1].timings.visual_tokens == 0 and deltas[-1].timings.vision_s == 0
    assert _sample_count(encodes) == encodes_before


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("topology", ["dvd", "coupled"])
async def test_a_repeated_image_is_answered_from_the_caches_with_the_same_tokens(pipelines, topology):
    lookups = pipelines["metrics"].vision_cache_lookups
    images = (synthetic_image(896, 448, seed=41), synthetic_image(448, 448, seed=42))
    parts = tuple(ImagePart(url=data_url(image), detail=Detail.AUTO) for image in images)

    def job(request_id: str) -> ChatJob:
        return _job(request_id, parts + (TextPart("Describe both images."),))

    hits_before = lookups.labels("hit")._value.get()
    first, first_deltas = await _run(pipelines[topology], job(f"repeat-1-{topology}"))
    second, second_deltas = await _run(pipelines[topology], job(f"repeat-2-{topology}"))
    assert second == first and len(first) == MAX_TOKENS
    prompt_tokens = first_deltas[0].prompt_token_count
    assert second_deltas[0].prompt_token_count == prompt_tokens
    # vLLM's prefix cache recognised the same embeddings (named by their identity): all but the last block.
    assert second_deltas[0].cached_prompt_tokens >= prompt_tokens - 64 > 0
    if topology == "dvd":  # both images found in the cache of the replica they hash to
        assert lookups.labels("hit")._value.get() == hits_before + 2
        assert second_deltas[-1].timings.vision_s < first_deltas[-1].timings.vision_s


def _sample_count(histogram) -> float:
    return next(sample.value for metric in histogram.collect() for sample in metric.samples
                if sample.name.endswith("_count"))


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vision_failures_reach_the_caller_as_serving_errors(pipelines):
    bad = ImagePart(url="data:image/png;base64,!!!!", param="messages[0].content[0].image_url")
    for topology in ("dvd", "coupled"):
        with pytest.raises(InvalidRequestError) as caught:
            await _run(pipelines[topology], _job(f"bad-image-{topology}", (bad, TextPart("What is this?"))))
        assert caught.value.code == "invalid_base64"
        assert caught.value.param == "messages[0].content[0].image_url"
    # The language replica dropped the request that never got its image: the next one is served normally.
    tokens, _ = await _run(pipelines["dvd"], _job("after-bad-image", (TextPart("Hello."),)))
    assert len(tokens) == MAX_TOKENS


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("topology", ["dvd", "coupled"])
async def test_closing_the_stream_aborts_the_work(pipelines, topology):
    pipeline = pipelines[topology]
    stream = pipeline.generate(_image_job(f"abandoned-{topology}", max_tokens=3000))
    first = await anext(stream)
    assert len(first.token_ids) >= 1
    await stream.aclose()  # what the gateway does when the client disconnects

    assert pipeline.in_flight == 0
    replicas = [replica for pool in pipeline.pools.values() for replica in pool.replicas]
    assert all(replica.outstanding == 0 for replica in replicas)
    # Each actor reports the request finished only after its engine aborted it.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        busy = await asyncio.gather(*(replica.handle.outstanding.remote() for replica in replicas))
        if not any(busy):
            break
        await asyncio.sleep(0.1)
    assert not any(busy)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_dead_vision_replica_is_replaced_by_a_live_one(pipelines):
    import ray

    dvd = pipelines["dvd"]
    expected, _ = await _run(pipelines["coupled"], _image_job("reference"))
    pool = dvd.pools["vision"]
    job = _image_job("after-kill")
    # The replica the job's images hash to (content affinity): the job goes there first.
    victim = pool.replicas[content_affine([0] * len(pool.replicas), [affinity_key(p.url, None) for p in job.images])]
    ray.kill(victim.handle, no_restart=True)

    tokens, _ = await _run(dvd, job)
    assert tokens == expected
    assert not victim.alive
    assert await dvd.readiness() == {"language": True, "vision": True}


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_crashed_vision_replica_is_restarted_and_used_again(pipelines):
    import ray

    dvd = pipelines["dvd"]
    (replica,) = [r for r in dvd.pools["vision"].replicas if r.alive]  # the other is gone for good (test above)
    crashed_pid = replica.info.pid
    ray.kill(replica.handle, no_restart=False)  # like a crash: Ray restarts it (max_restarts=-1)
    try:
        await _run(dvd, _image_job("during-restart"))
    except UnavailableError:
        pass  # no live vision replica while it restarts: 503
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (replica.alive and replica.info.pid != crashed_pid):
        await dvd.readiness()
        await asyncio.sleep(0.2)
    assert replica.alive and replica.info.pid != crashed_pid
    tokens, _ = await _run(dvd, _image_job("after-restart"))
    assert len(tokens) == MAX_TOKENS


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_draining_fails_readiness_and_refuses_new_jobs(pipelines):
    coupled = pipelines["coupled"]
    running = coupled.generate(_job("in-flight", (TextPart("Hello."),)))
    first = await anext(running)
    coupled.begin_drain()

    assert await coupled.readiness() == {"coupled": False}
    with pytest.raises(UnavailableError) as caught:
        await _run(coupled, _job("too-late", (TextPart("Hello."),)))
    assert caught.value.code == "shutting_down"
    rest = [delta async for delta in running]  # the job already running finishes
    assert len(first.token_ids) + sum(len(delta.token_ids) for delta in rest) == MAX_TOKENS
    assert await coupled.wait_idle(timeout_s=5)
