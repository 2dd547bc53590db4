"""`RayPipeline`: the `ChatPipeline` behind the gateway, over Ray actor pools started from a `ServeConfig`.

Per request (dvd topology): choose the language replica (least outstanding work; a request with images prefers the
replica its images hash to, within a load bound, where their prompt prefix is cached), start the vision work
(`VisionActor.process` on the vision replica chosen the same way, where their embeddings are cached; pushing the
embeddings to the language replica's gRPC sink) and the language stream
(`LanguageActor.generate`, which waits for the embeddings) at the same time, and pass the deltas on. Requests
without images skip the vision pool. In the coupled topology one `CoupledActor` call does both.

Admission comes first: every pool the job needs must have a free place (`PoolConfig.max_outstanding_per_replica`
per live replica), else the job is refused with 429 before any replica sees it, so no image is fetched or decoded.

When the consumer stops early (client gone, deadline) or anything fails, both sides are cancelled. A vision
replica that dies before the answer starts is replaced by another live one when the pool has one. A language
replica whose engine died is taken out of the choice at once; Ray restarts it after its watchdog ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import ray
from ray.exceptions import RayActorError, RayError

from dvd_serve.common.chat import ChatJob, ChatMessage, GenerationDelta, ImagePart, StageTimings
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.errors import OverloadedError, ServingError, UnavailableError
from dvd_serve.lm_worker.engine import ENGINE_DEAD_CODE
from dvd_serve.proto.status import SINK_UNAVAILABLE_CODE
from dvd_serve.server.local_generation import vision_seconds
from dvd_serve.server.metrics import ServingMetrics
from dvd_serve.server.replica_choice import affinity_key
from dvd_serve.server.ray_actors import (
    AdmissionPlace,
    CoupledActor,
    LanguageActor,
    Replica,
    ReplicaPool,
    VisionActor,
    to_serving_error,
)
from dvd_serve.server.return_streams import ReturnStreams, StreamEnded
from dvd_serve.server.serve_config import ServeConfig
from dvd_serve.vision_worker.worker import VisionOutcome

logger = logging.getLogger(__name__)

# Failures that mean the language replica is gone, even when no call reported its actor dead: its engine died
# (the watchdog is about to end the process), or its embedding sink cannot be reached (Ray may already have
# restarted it, with the sink on a new port that only `ready()` tells). Out of the choice until a probe answers.
_REPLICA_GONE_CODES = frozenset({ENGINE_DEAD_CODE, SINK_UNAVAILABLE_CODE})
# Times a request is sent to another language replica when its own dies before the first token.
LANGUAGE_RETRIES = 1

ACTOR_CLASSES = {"vision": VisionActor, "language": LanguageActor, "coupled": CoupledActor}
STARTUP_REPORT_INTERVAL_S = 15.0


def connect_ray(config: ServeConfig, report: Callable[[str], None]) -> bool:
    """Joins `config.ray_address`, or starts an embedded Ray; True if this call connected (and must shut down)."""
    if ray.is_initialized():
        return False
    report(f"joining the Ray cluster at {config.ray_address}" if config.ray_address else "starting an embedded Ray")
    if config.ray_address:
        ray.init(address=config.ray_address)
    else:
        ray.init(
            num_cpus=config.embedded_ray_cpus(os.cpu_count() or 1),
            resources=config.embedded_ray_resources(),
            include_dashboard=False,
            _system_config={"worker_niceness": config.embedded_worker_niceness},
        )
    return True


def context_length_report(configured: int | None, engine: int) -> str:
    """The start-up line about the context length, saying when it is below what was asked for."""
    if configured is None:
        return (f"context length: {engine} tokens (the checkpoint's own, or less when the KV cache cannot hold it: "
                "see vLLM's 'Auto-fit max_model_len' line above; set --max-model-len to choose)")
    return f"context length: {engine} tokens (--max-model-len)"


def shutdown_ray() -> None:
    ray.shutdown()


def without_image_data(job: ChatJob) -> ChatJob:
    """`job` with image URLs blanked: the language side needs only where the images go, not their bytes."""
    messages = tuple(
        dataclasses.replace(
            message,
            parts=tuple(
                dataclasses.replace(part, url="") if isinstance(part, ImagePart) else part for part in message.parts
            ),
        )
        for message in job.messages
    )
    return dataclasses.replace(job, messages=messages)


class RayPipeline:
    """Implements `dvd_serve.server.pipeline.ChatPipeline`."""

    def __init__(
        self, config: ServeConfig, pools: dict[str, ReplicaPool], tokenizer, owns_ray: bool,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.config = config
        self.pools = pools
        self._tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}
        self._owns_ray = owns_ray
        self._metrics = metrics
        spec = CheckpointSpec.from_dir(config.model)
        self._model_id = spec.model_id
        self._full_tile_tokens = spec.tokens_per_tile
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._returns = ReturnStreams(metrics.observe_return_batch if metrics is not None else None)

    @classmethod
    async def start(
        cls, config: ServeConfig, report: Callable[[str], None], metrics: ServingMetrics | None = None,
    ) -> "RayPipeline":
        """Connects to Ray, starts every pool's replicas and returns once all have loaded the model."""
        owns_ray = connect_ray(config, report)
        pools: dict[str, ReplicaPool] = {}
        try:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            for name, pool_config in config.pools.items():
                pools[name] = ReplicaPool.launch(name, ACTOR_CLASSES[name], pool_config, config, has_gpus)
            total = sum(len(pool.replicas) for pool in pools.values())
            report(f"loading {config.model} on {total} replica(s) ({config.topology} topology)")
            tokenizer = await _load_tokenizer(config.model)
            await _wait_ready(pools, config.startup_timeout_s, report)
        except BaseException:
            await _stop_pools(pools)
            if owns_ray:
                ray.shutdown()
            raise
        report("all replicas ready")
        pipeline = cls(config, pools, tokenizer, owns_ray, metrics)
        report(context_length_report(config.max_model_len, pipeline.max_model_len))
        return pipeline

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_model_len(self) -> int:
        """The context length the language engines run with (the checkpoint's, or what their KV cache holds)."""
        lengths = [
            replica.info.max_model_len for pool in self.pools.values() for replica in pool.replicas
            if replica.info is not None and replica.info.max_model_len is not None
        ]
        return min(lengths) if lengths else (self.config.max_model_len or 0)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id])
        return text

    async def readiness(self) -> dict[str, bool]:
        if self._draining:
            return {name: False for name in self.pools}
        states = await asyncio.gather(*(pool.readiness() for pool in self.pools.values()))
        return dict(zip(self.pools, states, strict=True))

    def engines_alive(self) -> bool:
        """False when a pool of language engines has no live replica (every engine in it died)."""
        engine_pools = [pool for name, pool in self.pools.items() if name in ("language", "coupled")]
        return all(any(replica.alive for replica in pool.replicas) for pool in engine_pools)

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    async def tokenize_chat(self, job: ChatJob) -> list[int]:
        pool = self.pools["coupled" if self.config.topology == "coupled" else "language"]
        replica = pool.choose()
        try:
            return await replica.handle.prompt_tokens.remote(job)
        except RayError as error:
            raise to_serving_error(error, pool.name) from None

    def begin_drain(self) -> None:
        """From now on readiness fails and new jobs are refused; jobs already running go on."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no job is running (at most `timeout_s`); True if none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._in_flight == 0

    async def shutdown(self) -> None:
        """Stops every replica and, if the pipeline started or joined Ray itself, disconnects."""
        self._returns.close()
        await _stop_pools(self.pools)
        if self._owns_ray:
            ray.shutdown()

    async def generate(self, job: ChatJob) -> AsyncIterator[GenerationDelta]:
        if self._draining:
            raise UnavailableError("The server is shutting down.", code="shutting_down")
        places = await self._admit(job)
        self._in_flight += 1
        self._idle.clear()
        try:
            async with contextlib.aclosing(self._answer(job, places.get("vision"))) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            for place in places.values():
                place.release()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _admit(self, job: ChatJob) -> dict[str, AdmissionPlace]:
        """A place in every pool `job` needs, or the first refusal (then no place is kept)."""
        if self.config.topology == "coupled":
            names = ["coupled"]
        else:
            names = ["language", "vision"] if job.images else ["language"]
        places: dict[str, AdmissionPlace] = {}
        try:
            for name in names:
                places[name] = await self._admit_to(name)
        except BaseException:
            for place in places.values():
                place.release()
            raise
        return places

    async def _admit_to(self, name: str) -> AdmissionPlace:
        metrics = self._metrics
        if metrics is None:
            return await self.pools[name].admit_waiting()
        try:
            place = await self.pools[name].admit_waiting(on_release=metrics.pool_admitted.labels(name).dec)
        except OverloadedError:
            metrics.admission_refusals.labels(name).inc()
            raise
        metrics.pool_admitted.labels(name).inc()
        return place

    async def _answer(self, job: ChatJob, vision_place: AdmissionPlace | None) -> AsyncIterator[GenerationDelta]:
        """The job's deltas from one language replica; if that replica dies before the first delta (nothing has
        reached the client yet), once more from another live one (or the same one, restarted), its vision work
        and embedding push included."""
        pool = self.pools["coupled" if self.config.topology == "coupled" else "language"]
        coupled_uuid = pool.name == "coupled" and _has_bare_uuid(job)
        deadline = None if job.deadline_s is None else time.monotonic() + job.deadline_s
        # Hashed once per job, for this pool and the vision pool: a repeated image's prompt prefix is in the KV cache
        # of the replica that answered it before (and its embeddings in a vision or coupled replica's cache).
        affinity = _image_affinity(job, [pool, *([self.pools["vision"]] if "vision" in self.pools else [])])
        replica = pool.choose(affinity=affinity, strict_affinity=coupled_uuid)
        for attempt in range(1 + LANGUAGE_RETRIES):
            streamed = False
            try:
                async with contextlib.aclosing(self._answer_on(job, pool, replica, vision_place, affinity)) as deltas:
                    async for delta in deltas:
                        streamed = True
                        yield delta
                return
            except ServingError as error:
                if streamed or replica.alive or attempt == LANGUAGE_RETRIES:
                    raise
                reason = error.code
            wait_s = self.config.replica_wait_s
            if deadline is not None:
                wait_s = max(min(wait_s, deadline - time.monotonic()), 0.0)
            await pool.wait_for_live_replica(wait_s)
            failed, replica = replica, pool.choose()  # 503 when none came back in time
            vision_place = None  # its vision place was given back when its first vision work ended
            logger.warning("%s failed before the first token of %s (%s); retrying on %s", failed.name,
                           job.request_id, reason, replica.name)
            if self._metrics is not None:
                self._metrics.replica_retries.labels(pool.name, reason).inc()

    async def _answer_on(
        self, job: ChatJob, pool: ReplicaPool, replica: Replica, vision_place: AdmissionPlace | None,
        affinity: list[bytes],
    ) -> AsyncIterator[GenerationDelta]:
        coupled = pool.name == "coupled"
        vision_task = None
        finished = False
        returns = self._returns.of(replica.name, replica.handle)
        with self._tracked(pool, replica), returns.inbox(job.request_id) as inbox:
            try:
                subscriber = self._returns.subscriber
                if coupled:
                    submission = replica.handle.submit.remote(subscriber, job)
                else:
                    if job.images:
                        vision_task = asyncio.ensure_future(
                            self._encode_and_push(job, replica.info.grpc_address, vision_place, affinity)
                        )
                    submission = replica.handle.submit.remote(subscriber, without_image_data(job), len(job.images))
                try:
                    await submission
                except RayError as error:
                    raise self._replica_failure(error, pool, replica) from None
                totals: StageTimings | None = None
                while not finished:
                    delta = await self._next_delta(inbox, vision_task, pool, replica)
                    first = totals is None
                    if first:
                        outcome = await vision_task if vision_task is not None else None
                        totals = _first_timings(delta.timings, outcome)
                    elif delta.timings is not None:
                        totals.inference_s = delta.timings.inference_s
                    finished = delta.ends_stream
                    if first or finished:
                        delta.timings = dataclasses.replace(totals)
                    yield delta
            finally:
                if not finished:
                    _abandon(job.request_id, replica, vision_task)

    async def _next_delta(self, inbox: asyncio.Queue, vision_task: asyncio.Future | None, pool: ReplicaPool,
                          replica: Replica) -> GenerationDelta:
        """The request's next delta from its replica's return stream; fails as soon as the vision side fails,
        instead of when the language replica gives up waiting for the embeddings."""
        if vision_task is not None and not vision_task.done() and inbox.empty():
            item = await self._next_or_vision_failure(inbox, vision_task, pool, replica)
        else:
            if vision_task is not None:
                self._raise_vision_failure(vision_task, pool, replica)
            item = await inbox.get()
        if isinstance(item, GenerationDelta):
            return item
        if isinstance(item, StreamEnded):
            pool.mark_dead(replica)
            raise UnavailableError(f"A {pool.name} replica ended the answer early.", code="stream_ended")
        raise self._replica_failure(item, pool, replica)  # a `RemoteServingError` or a Ray failure

    async def _next_or_vision_failure(self, inbox: asyncio.Queue, vision_task: asyncio.Future, pool: ReplicaPool,
                                      replica: Replica):
        next_item = asyncio.ensure_future(inbox.get())
        try:
            await asyncio.wait({next_item, vision_task}, return_when=asyncio.FIRST_COMPLETED)
            self._raise_vision_failure(vision_task, pool, replica)
            return await next_item
        finally:
            next_item.cancel()

    @staticmethod
    def _raise_vision_failure(vision_task: asyncio.Future, pool: ReplicaPool, replica: Replica) -> None:
        """Raises the vision side's failure, if it failed: it is the request's answer, not what the language
        replica says later about the embeddings that never came."""
        vision_failure = _failure(vision_task)
        if vision_failure is not None:
            if getattr(vision_failure, "code", None) in _REPLICA_GONE_CODES:
                pool.mark_dead(replica)
            raise vision_failure

    @staticmethod
    def _replica_failure(error: BaseException, pool: ReplicaPool, replica: Replica) -> ServingError:
        """What a failed call to (or stream from) `replica` means; takes the replica out of the choice if gone."""
        serving_error = to_serving_error(error, pool.name)
        if isinstance(error, RayActorError) or serving_error.code in _REPLICA_GONE_CODES:
            pool.mark_dead(replica)
        return serving_error

    async def _encode_and_push(self, job: ChatJob, lm_address: str, place: AdmissionPlace | None,
                               affinity: list[bytes]) -> VisionOutcome:
        """Runs the job's vision work on the vision replica its images' `affinity` keys pick (else the least
        loaded), on another one if that replica dies.

        The job's place in the vision pool is given back as soon as its vision work ends.
        """
        try:
            return await self._encode_with_retries(job, lm_address, affinity)
        finally:
            if place is not None:
                place.release()

    async def _encode_with_retries(self, job: ChatJob, lm_address: str, affinity: list[bytes]) -> VisionOutcome:
        pool = self.pools["vision"]
        tried: set[int] = set()
        while True:
            replica = pool.choose(frozenset(tried), affinity, strict_affinity=_has_bare_uuid(job))
            with self._tracked(pool, replica):
                call = replica.handle.process.remote(job.request_id, job.images, lm_address)
                try:
                    outcome = await call
                except asyncio.CancelledError:
                    ray.cancel(call)
                    raise
                except RayActorError as error:
                    pool.mark_dead(replica)
                    tried.add(replica.index)
                    if not pool.has_live_replica(frozenset(tried)):
                        raise to_serving_error(error, pool.name) from None
                    logger.warning("%s died during %s; retrying on another vision replica", replica.name,
                                   job.request_id)
                    if self._metrics is not None:
                        self._metrics.replica_retries.labels(pool.name, "replica_died").inc()
                    continue
                except RayError as error:
                    raise to_serving_error(error, pool.name) from None
            self._record_vision(outcome, replica.name)
            return outcome

    @contextlib.contextmanager
    def _tracked(self, pool: ReplicaPool, replica: Replica) -> Iterator[None]:
        replica.outstanding += 1
        gauge = self._metrics.pool_in_flight.labels(pool.name) if self._metrics is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            yield
        finally:
            replica.outstanding -= 1
            if gauge is not None:
                gauge.dec()

    def _record_vision(self, outcome: VisionOutcome, replica_name: str) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.vision_cache_lookups.labels("hit").inc(outcome.cache_hits)
        metrics.vision_cache_lookups.labels("miss").inc(outcome.cache_misses)
        metrics.vision_cache_lookups.labels("in_flight").inc(outcome.cache_in_flight)
        metrics.vision_cache_evictions.inc(outcome.cache_evictions)
        metrics.vision_cache_bytes.labels(replica_name).set(outcome.cache_bytes_held)
        metrics.fetch_decode_seconds.observe(outcome.fetch_decode_s)
        metrics.preprocess_seconds.observe(outcome.preprocess_s)
        metrics.vision_queue_seconds.observe(outcome.queue_wait_s)
        metrics.vision_batch_size.observe(outcome.batch_tiles)
        metrics.encode_seconds.observe(outcome.encode_s)
        metrics.transfer_bytes.observe(outcome.transfer_bytes)
        metrics.transfer_seconds.observe(outcome.transfer_s)
        for tokens, tiles in zip(outcome.tokens_per_image, outcome.tokens_per_tile, strict=True):
            metrics.visual_tokens_per_image.observe(tokens)
            if tiles:
                metrics.router_compression_ratio.observe(tokens / (self._full_tile_tokens * len(tiles)))


def _image_affinity(job: ChatJob, pools: list[ReplicaPool]) -> list[bytes]:
    """Affinity keys of the job's images (none when each of `pools` has one replica: there is nothing to choose,
    and no URL is hashed)."""
    if not any(len(pool.replicas) > 1 for pool in pools):
        return []
    return [affinity_key(part.url, part.uuid) for part in job.images]


def _has_bare_uuid(job: ChatJob) -> bool:
    """Whether an image is named by its uuid alone (only the replica that saw its bytes can have it)."""
    return any(not part.url for part in job.images)


def _first_timings(reported: StageTimings | None, outcome: VisionOutcome | None) -> StageTimings:
    totals = dataclasses.replace(reported) if reported is not None else StageTimings()
    if outcome is not None:
        totals.vision_s = vision_seconds(outcome)
    return totals


def _failure(task: asyncio.Future) -> BaseException | None:
    if not task.done() or task.cancelled():
        return None
    return task.exception()


def _abandon(request_id: str, replica: Replica, vision_task: asyncio.Future | None) -> None:
    """Cancels whatever is still running for `request_id` on both sides, without waiting."""
    if vision_task is not None:
        vision_task.cancel()
        vision_task.add_done_callback(_failure)  # a failure nobody waits for any more is not an error
    if replica.alive:
        # Also when the submission itself was interrupted: it may have started the request already.
        replica.handle.cancel.remote(request_id)


async def _load_tokenizer(model: str):
    # Imported on the event loop's thread: transformers' lazy imports are not safe to race from worker threads.
    from transformers import AutoTokenizer

    spec = CheckpointSpec.from_dir(model)
    return await asyncio.to_thread(AutoTokenizer.from_pretrained, model, trust_remote_code=spec.fmt == "chat")


async def _wait_ready(pools: dict[str, ReplicaPool], timeout_s: float, report: Callable[[str], None]) -> None:
    started = time.monotonic()

    async def remind() -> None:
        while True:
            await asyncio.sleep(STARTUP_REPORT_INTERVAL_S)
            waiting = [replica.name for pool in pools.values() for replica in pool.replicas if not replica.alive]
            report(f"still loading after {time.monotonic() - started:.0f} s: {', '.join(waiting)}")

    reminder = asyncio.create_task(remind())
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(pool.wait_ready(report) for pool in pools.values()))
    except TimeoutError:
        raise RuntimeError(
            f"replicas did not become ready within {timeout_s:.0f} s (not enough resources to place them?)"
        ) from None
    finally:
        reminder.cancel()


async def _stop_pools(pools: dict[str, ReplicaPool]) -> None:
    await asyncio.gather(*(pool.stop() for pool in pools.values()), return_exceptions=True)
