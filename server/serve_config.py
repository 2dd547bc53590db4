"""`ServeConfig`: everything `dvd-serve serve` needs, from which the worker configs and Ray placement derive.

One object describes a deployment: the checkpoint, the topology (decoupled vision/language pools, or the coupled
baseline), each pool's size and Ray placement, the worker settings that matter to an operator, the gateway and
the Ray cluster to join. Worker configs (`VisionWorkerConfig`, `LanguageWorkerConfig`) and actor options are built
here and nowhere else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from dvd_serve.common.config import FrozenConfig
from dvd_serve.lm_worker.engine import LanguageEngineConfig
from dvd_serve.lm_worker.worker import LanguageWorkerConfig
from dvd_serve.server.gateway_config import GatewayConfig
from dvd_serve.vision_worker.batcher import BatchingConfig
from dvd_serve.vision_worker.encoder import VisionEncoderConfig
from dvd_serve.vision_worker.image_decode import DecodeLimits
from dvd_serve.vision_worker.url_fetch import UrlFetchConfig
from dvd_serve.vision_worker.worker import VisionWorkerConfig

Topology = Literal["dvd", "coupled"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]

# vLLM settings every actor gets on a cluster without GPUs, unless the config or the gateway's environment sets them.
CPU_ACTOR_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


class MemoryReportConfig(FrozenConfig):
    """Per-replica memory samples, to find which process and which kind of memory grows (see
    `common/process_memory.py`)."""

    folder: str = Field(description="Folder (on every node) where each replica appends memory-<role>-<pid>.csv.")
    interval_s: float = Field(default=10.0, gt=0, description="Seconds between two samples of one replica.")


class PoolConfig(FrozenConfig):
    """Size, Ray placement and restart policy of one pool of identical replicas."""

    replicas: int = Field(default=1, ge=1, description="Number of replicas (Ray actors) in the pool.")
    num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs reserved per replica; None = 1 when the Ray cluster has GPUs, else 0.",
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica for its whole lifetime.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. {'vision_gpu': 1} to pin the pool to nodes that "
        "declare that resource (on CPU machines these stand in for GPU pools).",
    )
    max_restarts: int = Field(
        default=-1, ge=-1, description="Times Ray restarts a dead replica (-1 = always, 0 = never)."
    )
    max_concurrency: int = Field(
        default=1000, ge=1, description="Calls one replica serves at once (requests, probes, cancels)."
    )
    max_outstanding_per_replica: int | None = Field(
        default=128,
        ge=1,
        description="Admission bound: requests the gateway lets the pool hold at once (running or queued), per "
        "live replica. Past it new requests get 429 with Retry-After before any image is fetched or decoded. "
        "None = no bound.",
    )

    def gpus_per_replica(self, cluster_has_gpus: bool) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if cluster_has_gpus else 0.0

    def actor_options(self, cluster_has_gpus: bool, env_vars: Mapping[str, str]) -> dict[str, Any]:
        """Ray `.options(...)` for one replica of this pool."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.gpus_per_replica(cluster_has_gpus),
            "resources": dict(self.resources),
            "max_restarts": self.max_restarts,
            "max_concurrency": self.max_concurrency,
            "runtime_env": {"env_vars": dict(env_vars)},
        }


class ServeConfig(FrozenConfig):
    """One deployment of dvd-serve: the model, its pools, and the gateway in front of them."""

    model: str = Field(description="Checkpoint folder (either format, Flash included) served by every replica.")
    topology: Topology = Field(
        default="dvd",
        description="'dvd': separate vision and language pools joined by the gRPC embedding hop; 'coupled': the "
        "baseline where one replica runs vision then language in one process.",
    )
    dtype: Dtype = Field(default="auto", description="Compute dtype of vision and language models; auto = bf16 on GPU.")
    max_model_len: int | None = Field(
        default=None, ge=256,
        description="Context length (visual + text + output tokens); None = the checkpoint's own, lowered by vLLM "
        "to what the KV cache holds (its auto-fit), as reported at start-up.",
    )
    max_images_per_request: int = Field(default=16, ge=1, description="Images one request may carry.")
    vision_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Vision replicas (dvd topology only; coupled replicas use the LM pool)."
    )
    language_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="Language replicas (in the coupled topology: the coupled replicas)."
    )
    vision_batching: BatchingConfig = Field(
        default_factory=BatchingConfig, description="Dynamic batching of vision work across requests."
    )
    image_decode: DecodeLimits = Field(default_factory=DecodeLimits, description="Accepted image formats and sizes.")
    image_fetch: UrlFetchConfig = Field(
        default_factory=UrlFetchConfig, description="SSRF guard and caps for http(s) image URLs."
    )
    preprocess_threads: int = Field(default=2, ge=1, description="Threads per vision replica tiling images.")
    vision_cache_mib: float = Field(
        default=VisionWorkerConfig.model_fields["cache_mib"].default, ge=0.0,
        description="Host memory (MiB) per vision replica for its cache of encoded images; 0 turns it off.",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Requests one language replica decodes together.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take (ignored on CPU)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV of shared prompt prefixes.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="Language engines' scheduling: first come first served, or by request `priority`."
    )
    tool_call_parser: str | None = Field(
        default=LanguageEngineConfig.model_fields["tool_call_parser"].default,
        description=LanguageEngineConfig.model_fields["tool_call_parser"].description,
    )
    reasoning_parser: str | None = Field(
        default=LanguageEngineConfig.model_fields["reasoning_parser"].default,
        description=LanguageEngineConfig.model_fields["reasoning_parser"].description,
    )
    embeddings_wait_s: float = Field(
        default=60.0, gt=0, description="How long a language replica waits for a request's images."
    )
    push_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one embedding push (vision -> LM).")
    grpc_host: str | None = Field(
        default=None,
        description="Address language replicas bind their embedding sink to; None = the node's IP as Ray sees it.",
    )
    grpc_auth_token: SecretStr | None = Field(
        default=None,
        description="Shared token between vision replicas and language sinks; `serve` generates one when unset.",
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="The public HTTP gateway.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (e.g. 'ray://head:10001' or 'auto'); None = embedded Ray."
    )
    embedded_num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs the embedded Ray declares; None = this machine's count (at least "
        "what the pools reserve)."
    )
    embedded_worker_niceness: int = Field(
        default=0, ge=0, le=19,
        description="Niceness of the embedded Ray's worker processes (the replicas). Ray's own default, 15, puts "
        "the engines behind every other process on the machine, the gateway included; 0 runs them at the "
        "gateway's priority. A joined cluster keeps its own setting (`RAY_worker_niceness` on its nodes).",
    )
    actor_env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables set in every replica (Ray runtime_env)."
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0, description="How long start-up may wait for every replica to load its model."
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM/SIGINT, how long in-flight requests may run before exit."
    )
    memory_report: MemoryReportConfig | None = Field(
        default=None, description="Replicas sample their own memory into CSV files (diagnosis); None = off."
    )
    replica_wait_s: float = Field(
        default=120.0, ge=0,
        description="How long a request waits for a pool whose replicas are all restarting before it gets 503 with "
        "Retry-After; also how long a request whose language replica died before its first token waits for "
        "another one. Size it to a replica's reload time (tiny model on 2 CPU cores: 13-21 s for one language "
        "replica, about 50 s for two at once). 0 = no waiting.",
    )
    replica_probe_timeout_s: float = Field(
        default=2.0, gt=0, description="How long a readiness probe waits for one replica's answer."
    )

    @model_validator(mode="after")
    def _gateway_fits_engine(self) -> "ServeConfig":
        if self.gateway.max_images_per_request > self.max_images_per_request:
            raise ValueError("gateway.max_images_per_request exceeds max_images_per_request of the engine")
        return self

    @property
    def pools(self) -> dict[str, PoolConfig]:
        """Pool name -> its config, in start-up order (language first: vision needs its addresses)."""
        if self.topology == "coupled":
            return {"coupled": self.language_pool}
        return {"language": self.language_pool, "vision": self.vision_pool}

    def _token(self) -> str | None:
        return self.grpc_auth_token.get_secret_value() if self.grpc_auth_token is not None else None

    def vision_worker_config(self) -> VisionWorkerConfig:
        return VisionWorkerConfig(
            encoder=VisionEncoderConfig(model=self.model, dtype=self.dtype),
            batching=self.vision_batching,
            decode=self.image_decode,
            fetch=self.image_fetch,
            preprocess_threads=self.preprocess_threads,
            max_tiles_per_image=self.gateway.max_tiles_per_image,
            push_timeout_s=self.push_timeout_s,
            grpc_auth_token=self._token(),
            cache_mib=self.vision_cache_mib,
        )

    def language_engine_config(self) -> LanguageEngineConfig:
        return LanguageEngineConfig(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_images_per_request=self.max_images_per_request,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            scheduling_policy=self.scheduling_policy,
            tool_call_parser=_unless_none(self.tool_call_parser),
            reasoning_parser=_unless_none(self.reasoning_parser),
        )

    def language_worker_config(self, grpc_host: str) -> LanguageWorkerConfig:
        return LanguageWorkerConfig(
            engine=self.language_engine_config(),
            grpc_host=grpc_host,
            grpc_auth_token=self._token(),
            embeddings_wait_s=self.embeddings_wait_s,
        )

    def actor_env_vars(self, cluster_has_gpus: bool, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        """`actor_env`, plus on CPU clusters the vLLM defaults (the gateway's own environment values win)."""
        env: dict[str, str] = {}
        if not cluster_has_gpus:
            env.update({key: environ.get(key, default) for key, default in CPU_ACTOR_ENV_DEFAULTS.items()})
        env.update(self.actor_env)
        return env

    def embedded_ray_resources(self) -> dict[str, float]:
        """Custom resources an embedded Ray must declare so every replica of every pool can be placed."""
        totals: dict[str, float] = {}
        for pool in self.pools.values():
            for name, amount in pool.resources.items():
                totals[name] = totals.get(name, 0.0) + amount * pool.replicas
        return totals

    def embedded_ray_cpus(self, machine_cpus: int) -> int:
        reserved = sum(pool.num_cpus * pool.replicas for pool in self.pools.values())
        wanted = self.embedded_num_cpus if self.embedded_num_cpus is not None else machine_cpus
        return max(wanted, math.ceil(reserved))


def _unless_none(parser_name: str | None) -> str | None:
    """A parser setting, with the word "none" (as on the command line) meaning no parser."""
    return None if parser_name is None or parser_name.lower() == "none" else parser_name
