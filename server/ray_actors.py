"""The Ray actors of both topologies, and the pool that places, probes and revives them.

- `VisionActor` wraps a `VisionWorker`: images in, embeddings pushed to the language replica named per request.
- `LanguageActor` wraps a `LanguageWorker`: its gRPC sink receives the embeddings, `submit` starts a request.
- `CoupledActor` is the paper's baseline: vision then language in one process, no gRPC hop, through the same
  `VisionWorker.encode` and `LanguageEngine.generate` code.

Tokens go back the way vLLM's engine returns them to its API server: not one Ray object per token, but one stream
per gateway process (`deltas`) that carries, once per engine step, the new deltas of every request that gateway
submitted (`replica_outbox`).

Every actor loads its model on first use (`ready()` triggers it), so a replica Ray restarts after a crash loads
again by itself. Expected failures leave an actor as `RemoteServingError` (a `ServingError` does not survive
pickling) and become `ServingError`s again in the gateway through `to_serving_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from ray.util import get_node_ip_address

from dvd_serve.common.chat import ChatJob, GenerationDelta, ImagePart
from dvd_serve.common.errors import OverloadedError, ServingError, UnavailableError
from dvd_serve.common.process_memory import ask_engine_processes_to_record, record_memory_periodically
from dvd_serve.lm_worker.engine import ENGINE_DEAD_CODE, engine_dead_error
from dvd_serve.server.local_generation import generate_with_embeddings, vision_seconds
from dvd_serve.server.replica_outbox import DeltaOutbox, ReplicaRequests
from dvd_serve.server.replica_choice import content_affine
from dvd_serve.server.serve_config import PoolConfig, ServeConfig

logger = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 1.0
REVIVE_INTERVAL_S = 1.0
REPLICA_STOP_TIMEOUT_S = 30.0


class RemoteServingError(Exception):
    """A `ServingError` in a form that crosses Ray: only positional, picklable arguments."""

    def __init__(self, kind: str, message: str, code: str, param: str | None) -> None:
        super().__init__(kind, message, code, param)

    @classmethod
    def wrap(cls, error: ServingError) -> "RemoteServingError":
        return cls(type(error).__name__, error.message, error.code, error.param)

    def unwrap(self) -> ServingError:
        kind, message, code, param = self.args
        return _serving_error_type(kind)(message, code=code, param=param)


def _serving_error_type(name: str) -> type[ServingError]:
    pending: list[type[ServingError]] = [ServingError]
    while pending:
        error_type = pending.pop()
        if error_type.__name__ == name:
            return error_type
        pending.extend(error_type.__subclasses__())
    return ServingError


@contextlib.contextmanager
def _portable_errors() -> Iterator[None]:
    try:
        yield
    except ServingError as error:
        raise RemoteServingError.wrap(error) from None


def remote_serving_error(error: BaseException) -> ServingError | None:
    """The `ServingError` a replica raised, if that is what failed the actor call."""
    cause = error.cause if isinstance(error, RayTaskError) else error
    return cause.unwrap() if isinstance(cause, RemoteServingError) else None


def to_serving_error(error: BaseException, pool: str) -> ServingError:
    """What a failed actor call means for the client, with a fixed message."""
    remote = remote_serving_error(error)
    if remote is not None:
        return remote
    if isinstance(error, RayActorError):
        return UnavailableError(f"A {pool} replica stopped while serving the request.", code="replica_unavailable")
    logger.error("unexpected failure in the %s pool: %r", pool, error)
    return ServingError("Internal error in a model replica.", code="replica_internal_error")


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """Where a replica runs, reported once it has loaded its model."""

    node_id: str
    pid: int
    grpc_address: str | None = None  # language replicas: host:port of the embedding sink
    max_model_len: int | None = None  # language and coupled replicas: the context length their engine runs with


def _replica_info(grpc_address: str | None = None, max_model_len: int | None = None) -> ReplicaInfo:
    return ReplicaInfo(node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid(), grpc_address=grpc_address,
                       max_model_len=max_model_len)


class _Replica:
    """What every actor shares: lazy model loading, the outstanding-work count and request tracking."""

    def __init__(self, config: ServeConfig) -> None:
        self._config = config
        self._loading: asyncio.Future | None = None
        self._outstanding = 0
        self._memory_report: asyncio.Task | None = None
        self._requests = ReplicaRequests()

    async def _load(self) -> Any:
        raise NotImplementedError

    async def _loaded(self) -> Any:
        if self._loading is None:
            report = self._config.memory_report
            if report is not None:
                ask_engine_processes_to_record(Path(report.folder), report.interval_s)
                role = type(self).__name__.removesuffix("Actor").lower()
                self._memory_report = asyncio.create_task(
                    record_memory_periodically(Path(report.folder), role, report.interval_s)
                )
            self._loading = asyncio.ensure_future(self._load())
        return await asyncio.shield(self._loading)

    async def _release(self, loaded: Any) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Releases what `_load` loaded (engine processes, gRPC server, threads), if it finished loading."""
        loading = self._loading
        if loading is None or not loading.done() or loading.cancelled() or loading.exception() is not None:
            return
        await self._release(loading.result())

    async def outstanding(self) -> int:
        """Requests this replica is working on now."""
        return self._outstanding

    @ray.method(num_returns="streaming")
    async def deltas(self, subscriber: str) -> AsyncIterator[tuple[float, list]]:
        """`subscriber`'s return stream, for as long as this replica lives: (time.time() it left, batch) pairs, a
        batch being (request id, delta or `RemoteServingError`) entries: what every request it submitted produced
        since the previous batch."""
        outbox = self._requests.outbox(subscriber)
        while True:
            batch = await outbox.next_batch()
            yield time.time(), batch

    def _start(
        self, subscriber: str, request_id: str, stream: AsyncIterator[GenerationDelta],
        abort: Callable[[str], Awaitable[Any]],
    ) -> None:
        """Runs `stream` as the request's task, its deltas and its error going to `subscriber`'s outbox."""

        async def run(outbox: DeltaOutbox) -> None:
            try:
                async for delta in self._tracked(stream, request_id, abort):
                    outbox.put(request_id, delta)
            except RemoteServingError as error:
                outbox.put(request_id, error)
            except Exception:
                logger.exception("request %s failed in the replica", request_id)
                outbox.put(request_id, RemoteServingError.wrap(
                    ServingError("Internal error in a model replica.", code="replica_internal_error")
                ))

        self._requests.start(subscriber, request_id, run)

    async def _tracked(
        self, stream: AsyncIterator[GenerationDelta], request_id: str, abort: Callable[[str], Awaitable[Any]]
    ) -> AsyncIterator[GenerationDelta]:
        """Passes `stream` on; aborts the request's work if the stream ends before its final delta."""
        self._outstanding += 1
        finished = False
        try:
            with _portable_errors():
                async for delta in stream:
                    finished = delta.ends_stream
                    yield delta
        finally:
            try:
                await stream.aclose()
                if not finished:
                    await abort(request_id)
            finally:
                self._outstanding -= 1


@ray.remote
class VisionActor(_Replica):
    async def _load(self):
        from dvd_serve.vision_worker.worker import VisionWorker

        return await asyncio.to_thread(VisionWorker.load, self._config.vision_worker_config())

    async def ready(self) -> ReplicaInfo:
        await self._loaded()
        return _replica_info()

    async def process(self, request_id: str, images: tuple[ImagePart, ...], lm_address: str):
        """Encode `images` and push them to the language replica at `lm_address`; returns the `VisionOutcome`."""
        worker = await self._loaded()
        self._outstanding += 1
        try:
            with _portable_errors():
                return await worker.process(request_id, images, lm_address)
        finally:
            self._outstanding -= 1

    async def _release(self, worker) -> None:
        await worker.close()


@ray.remote
class LanguageActor(_Replica):
    async def _load(self):
        from dvd_serve.lm_worker.worker import LanguageWorker

        grpc_host = self._config.grpc_host or get_node_ip_address()
        return await LanguageWorker.start(self._config.language_worker_config(grpc_host))

    async def ready(self) -> ReplicaInfo:
        """Where this replica runs; raises while its engine is dead (the watchdog is about to end the process)."""
        worker = await self._loaded()
        _require_live_engine(worker.engine)
        return _replica_info(worker.grpc_address, worker.engine.max_model_len)

    async def prompt_tokens(self, job: ChatJob) -> list[int]:
        """`/tokenize`: the prompt token ids of `job`'s text-only chat, rendered as `generate` renders it."""
        return await (await self._loaded()).engine.prompt_tokens(job)

    async def engine_requests(self) -> int:
        """Requests the language engine holds now (running or waiting); aborted ones are gone from it."""
        return (await self._loaded()).engine.unfinished_requests

    @ray.method(max_task_retries=-1)  # a pure query: after a restart, ask the new incarnation
    async def grpc_address(self) -> str:
        return (await self._loaded()).grpc_address

    async def submit(self, subscriber: str, job: ChatJob, expected_images: int) -> None:
        """Starts answering `job` once `expected_images` embeddings have arrived; its deltas go to `subscriber`."""
        worker = await self._loaded()
        if expected_images:
            stream = worker.generate(job, expected_images)
        else:
            stream = generate_with_embeddings(worker.engine, job, [])
        self._start(subscriber, job.request_id, stream, worker.cancel)

    async def cancel(self, request_id: str) -> None:
        self._requests.cancel(request_id)
        await (await self._loaded()).cancel(request_id)

    async def _release(self, worker) -> None:
        await worker.stop()


@ray.remote
class CoupledActor(_Replica):
    def __init__(self, config: ServeConfig) -> None:
        super().__init__(config)
        self._watchdog: asyncio.Task | None = None

    async def _load(self):
        from dvd_serve.lm_worker.engine import LanguageEngine
        from dvd_serve.vision_worker.worker import VisionWorker

        vision = await asyncio.to_thread(VisionWorker.load, self._config.vision_worker_config())
        engine = LanguageEngine.start(self._config.language_engine_config())
        self._watchdog = asyncio.create_task(_exit_when_dead(engine))
        return vision, engine

    async def prompt_tokens(self, job: ChatJob) -> list[int]:
        """`/tokenize`: the prompt token ids of `job`'s text-only chat, rendered as `generate` renders it."""
        _vision, engine = await self._loaded()
        return await engine.prompt_tokens(job)

    async def ready(self) -> ReplicaInfo:
        _vision, engine = await self._loaded()
        _require_live_engine(engine)
        return _replica_info(max_model_len=engine.max_model_len)

    async def submit(self, subscriber: str, job: ChatJob) -> None:
        """Starts encoding the job's images here, then answering it; its deltas go to `subscriber`."""
        from dvd_serve.vision_worker.worker import VisionOutcome

        vision, engine = await self._loaded()

        async def answer() -> AsyncIterator[GenerationDelta]:
            outcome = VisionOutcome()
            encoded = await vision.encode_named(job.images, outcome) if job.images else []
            images = [image.embeddings for image, _ in encoded]
            image_ids = [identity.hex() for _, identity in encoded]
            async for delta in generate_with_embeddings(engine, job, images, vision_seconds(outcome), image_ids):
                yield delta

        self._start(subscriber, job.request_id, answer(), engine.abort)

    async def cancel(self, request_id: str) -> None:
        self._requests.cancel(request_id)
        _vision, engine = await self._loaded()
        await engine.abort(request_id)

    async def _release(self, parts) -> None:
        vision, engine = parts
        if self._watchdog is not None:
            self._watchdog.cancel()
        await vision.close()
        engine.shutdown()


def _is_engine_death(error: BaseException) -> bool:
    remote = remote_serving_error(error)
    return remote is not None and remote.code == ENGINE_DEAD_CODE


def _require_live_engine(engine) -> None:
    if engine.is_dead:
        with _portable_errors():
            raise engine_dead_error()


async def _exit_when_dead(engine) -> None:
    # Same policy as the language worker's watchdog: a dead engine ends the process, Ray restarts the replica.
    while not engine.is_dead:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    logger.error("language engine died; exiting so Ray restarts this replica")
    os._exit(1)


@dataclass(eq=False, slots=True)
class Replica:
    """The gateway's view of one actor."""

    name: str  # e.g. "vision[1]"
    index: int
    handle: Any  # ray.actor.ActorHandle
    info: ReplicaInfo | None = None
    outstanding: int = 0  # requests this gateway has handed to it and not yet finished
    alive: bool = False
    reviving: asyncio.Task | None = None


class AdmissionPlace:
    """A job's place in a pool, from admission until `release()` (idempotent: the first call gives it back)."""

    __slots__ = ("_pool", "_on_release")

    def __init__(self, pool: "ReplicaPool", on_release: Callable[[], None] | None) -> None:
        self._pool: ReplicaPool | None = pool
        self._on_release = on_release

    def release(self) -> None:
        if self._pool is None:
            return
        self._pool.admitted -= 1
        self._pool = None
        if self._on_release is not None:
            self._on_release()


class ReplicaPool:
    """The replicas of one pool: start-up, admission, least-outstanding choice, liveness."""

    def __init__(
        self, name: str, replicas: list[Replica], probe_timeout_s: float,
        max_outstanding_per_replica: int | None = None, replica_wait_s: float = 0.0,
    ) -> None:
        self.name = name
        self.replicas = replicas
        self._probe_timeout_s = probe_timeout_s
        self._max_outstanding_per_replica = max_outstanding_per_replica
        self._replica_wait_s = replica_wait_s
        self._cursor = 0
        self.admitted = 0  # jobs admitted to this pool and not finished yet
        self.waiting = 0  # jobs waiting for a replica of this pool to come back
        self._replica_back = asyncio.Event()  # set (and replaced) each time a replica comes back

    @classmethod
    def launch(
        cls, name: str, actor_class: Any, pool: PoolConfig, config: ServeConfig, cluster_has_gpus: bool
    ) -> "ReplicaPool":
        """Creates the pool's actors (they load their models once `wait_ready` asks)."""
        options = pool.actor_options(cluster_has_gpus, config.actor_env_vars(cluster_has_gpus))
        replicas = [
            Replica(name=f"{name}[{index}]", index=index, handle=actor_class.options(**options).remote(config))
            for index in range(pool.replicas)
        ]
        return cls(
            name, replicas, config.replica_probe_timeout_s, pool.max_outstanding_per_replica, config.replica_wait_s
        )

    async def wait_ready(self, report: Callable[[str], None]) -> None:
        """Returns once every replica has loaded its model; raises if one fails to."""
        started = time.monotonic()

        async def one(replica: Replica) -> None:
            replica.info = await replica.handle.ready.remote()
            replica.alive = True
            report(f"{replica.name} ready on node {replica.info.node_id[:12]} ({time.monotonic() - started:.1f} s)")

        await asyncio.gather(*(one(replica) for replica in self.replicas))

    def admit(self, on_release: Callable[[], None] | None = None) -> "AdmissionPlace":
        """One of the pool's places for a job, or a refusal at once: `OverloadedError` (429) when the live replicas
        hold `max_outstanding_per_replica` jobs each, `UnavailableError` (503) when none is live.

        Checks and counts without awaiting, so concurrent jobs cannot overshoot the bound together.
        """
        live = sum(replica.alive for replica in self.replicas)
        if not live:
            raise self._no_replica()
        bound = self._max_outstanding_per_replica
        if bound is not None and self.admitted >= bound * live:
            raise OverloadedError(f"The {self.name} replicas are at capacity; retry later.", code="overloaded")
        self.admitted += 1
        return AdmissionPlace(self, on_release)

    async def admit_waiting(self, on_release: Callable[[], None] | None = None) -> "AdmissionPlace":
        """`admit`, except that while every replica is restarting the job waits (at most `replica_wait_s`) for one
        to come back. As many jobs may wait as the live pool could hold; past that, or past the wait, 503."""
        if not self.has_live_replica() and self._replica_wait_s > 0 and self._may_come_back():
            bound = self._max_outstanding_per_replica
            if bound is not None and self.waiting >= bound * len(self.replicas):
                raise self._no_replica()
            self.waiting += 1
            try:
                await self.wait_for_live_replica(self._replica_wait_s)
            finally:
                self.waiting -= 1
        return self.admit(on_release)

    async def wait_for_live_replica(self, timeout_s: float) -> bool:
        """Waits until a replica is live (True), none can come back or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while not self.has_live_replica():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._may_come_back():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replica_back.wait(), remaining)
        return True

    def _may_come_back(self) -> bool:
        return any(replica.reviving is not None and not replica.reviving.done() for replica in self.replicas)

    def choose(self, exclude: frozenset[int] = frozenset(), affinity: Sequence[bytes] = (),
               strict_affinity: bool = False) -> Replica:
        """The live replica with the least outstanding work (ties rotate), or with `affinity` keys the one those
        keys prefer within a load bound (`content_affine`); UnavailableError if none is live."""
        loads = [
            replica.outstanding if replica.alive and replica.index not in exclude else None
            for replica in self.replicas
        ]
        index = content_affine(loads, affinity, self._cursor, strict=strict_affinity,
                               capacity=self._max_outstanding_per_replica)
        if index is None:
            raise self._no_replica()
        self._cursor = index + 1
        return self.replicas[index]

    def _no_replica(self) -> UnavailableError:
        return UnavailableError(f"No {self.name} replica is available.", code="no_replica_available")

    def has_live_replica(self, exclude: frozenset[int] = frozenset()) -> bool:
        return any(replica.alive and replica.index not in exclude for replica in self.replicas)

    def mark_dead(self, replica: Replica) -> None:
        """Stops choosing `replica` until it answers `ready()` again (Ray restarts it per `max_restarts`)."""
        replica.alive = False
        if replica.reviving is None or replica.reviving.done():
            replica.reviving = asyncio.create_task(self._revive(replica))

    async def _revive(self, replica: Replica) -> None:
        while True:
            try:
                info = await asyncio.wait_for(replica.handle.ready.remote(), self._probe_timeout_s)
            except ActorDiedError:
                logger.error("%s is gone for good (no restarts left)", replica.name)
                return
            except (RayActorError, TimeoutError):
                await asyncio.sleep(REVIVE_INTERVAL_S)
                continue
            except Exception as error:
                if not _is_engine_death(error):
                    logger.exception("%s failed to load after a restart", replica.name)
                    return
                await asyncio.sleep(REVIVE_INTERVAL_S)  # its process is about to exit; Ray restarts it then
                continue
            self.mark_live(replica, info)
            logger.info("%s is back", replica.name)
            return

    def mark_live(self, replica: Replica, info: ReplicaInfo | None) -> None:
        """`replica` answered `ready()` again: choose it, and wake the jobs waiting for a replica."""
        replica.info, replica.alive = info, True
        back, self._replica_back = self._replica_back, asyncio.Event()
        back.set()

    async def readiness(self) -> bool:
        """Whether at least one replica answers `ready()` within the probe timeout."""

        async def probe(replica: Replica) -> bool:
            if not replica.alive:
                return False
            try:
                replica.info = await asyncio.wait_for(replica.handle.ready.remote(), self._probe_timeout_s)
            except RayActorError:
                self.mark_dead(replica)
                return False
            except Exception:
                return False
            return True

        return any(await asyncio.gather(*(probe(replica) for replica in self.replicas)))

    async def stop(self, timeout_s: float = REPLICA_STOP_TIMEOUT_S) -> None:
        """Lets every replica release its model (bounded), then ends the actors."""
        for replica in self.replicas:
            if replica.reviving is not None:
                replica.reviving.cancel()
        stops = [replica.handle.stop.remote() for replica in self.replicas]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), timeout_s)
        for replica in self.replicas:
            replica.alive = False
            ray.kill(replica.handle, no_restart=True)
