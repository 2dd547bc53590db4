"""The four systems the ablation benchmark compares, each started as a server subprocess on one machine.

(a) vLLM's own OpenAI server, the checkpoint served monolithically (vision and language in one engine).
(b) dvd-serve, coupled topology: one replica runs vision then language, in one process.
(c) dvd-serve, DvD topology: a vision replica and a language replica joined by the gRPC embedding hop.
(d) as (c) on the Flash checkpoint, so the ViR router picks 256 or 64 tokens per tile.
(a)-(c) serve the original-format checkpoint; (d) the Flash checkpoint made from the same seed, which holds the
same ViT, projector and LLM numbers plus the router, so (d) with `detail: high` must answer exactly like (a).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from dvd_serve.common.config import FrozenConfig

SYSTEM_KEYS = ("a", "b", "c", "d")
STOP_WAIT_S = 90.0
READY_POLL_S = 1.0


class ServerSettings(FrozenConfig):
    """Engine settings every system gets alike, and the machine's share each may use."""

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="float32",
        description="Compute dtype of every system, always explicit: given 'auto', vLLM's own server downcasts a "
        "float32 checkpoint to bfloat16 while dvd-serve computes in float32 on CPU.",
    )
    max_model_len: int = Field(default=4096, ge=256, description="Context length of every engine.")
    max_num_seqs: int = Field(default=64, ge=1, description="Requests one engine decodes together.")
    max_images_per_request: int = Field(default=4, ge=1, description="Images a request may carry.")
    cpus: int = Field(default=2, ge=1, description="CPU cores of the machine; every system may use all of them.")
    gpus: int = Field(default=0, ge=0, description="GPUs of the machine (0 on CPU-only machines).")


@dataclass(frozen=True, slots=True)
class SystemSpec:
    key: str
    label: str
    checkpoint: Literal["chat", "flash"]
    ready_path: str

    def command(self, model: Path, port: int, settings: ServerSettings) -> list[str]:
        if self.key == "a":
            return _vllm_command(model, port, settings)
        return _dvd_serve_command(model, port, settings, topology="coupled" if self.key == "b" else "dvd")

    def placement(self, settings: ServerSettings) -> str:
        """Which share of the machine the system's processes are given (reported next to its numbers)."""
        if settings.gpus == 0:
            vision_cpus, language_cpus = dvd_cpu_split(settings.cpus)
            where = {
                "a": "vLLM API server + engine core",
                "b": f"1 coupled replica reserving {settings.cpus} CPUs",
                "c": f"vision replica {vision_cpus} CPU(s) + language replica {language_cpus} CPU(s)",
            }
            return f"{settings.cpus} cores shared, 0 GPUs ({where.get(self.key, where['c'])})"
        return f"{settings.cpus} cores, {self.gpus_used(settings)} GPU(s)"

    def gpus_used(self, settings: ServerSettings) -> int:
        """(a) and (b) run on one GPU; DvD puts its vision and its language replica on one GPU each."""
        if settings.gpus == 0:
            return 0
        return 1 if self.key in ("a", "b") else 2


SYSTEMS: dict[str, SystemSpec] = {
    "a": SystemSpec("a", "(a) vLLM monolithic", "chat", "/health"),
    "b": SystemSpec("b", "(b) dvd-serve coupled", "chat", "/ready"),
    "c": SystemSpec("c", "(c) dvd-serve DvD", "chat", "/ready"),
    "d": SystemSpec("d", "(d) DvD + ViR (Flash)", "flash", "/ready"),
}


def _vllm_command(model: Path, port: int, settings: ServerSettings) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--trust-remote-code",
        "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs), "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
        "--limit-mm-per-prompt", json.dumps({"image": settings.max_images_per_request}),
    ]
    return command + (["--enforce-eager"] if settings.gpus == 0 else [])


def _dvd_serve_command(model: Path, port: int, settings: ServerSettings, topology: str) -> list[str]:
    command = [
        str(Path(sys.executable).with_name("dvd-serve")), "serve", "--model", str(model), "--topology", topology,
        "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs), "--max-images-per-request",
        str(settings.max_images_per_request), "--host", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(settings.cpus), "--log-level", "warning",
    ]
    if settings.gpus == 0:
        # Ray sets each actor's OpenMP threads to the CPUs it reserves: split the cores so every system has all.
        if topology == "coupled":
            command += ["--lm-cpus-per-replica", str(settings.cpus)]
        else:
            vision_cpus, language_cpus = dvd_cpu_split(settings.cpus)
            command += ["--vision-cpus-per-replica", str(vision_cpus), "--lm-cpus-per-replica", str(language_cpus)]
    return command


def dvd_cpu_split(cpus: int) -> tuple[int, int]:
    """CPUs the DvD vision and language replicas reserve on a machine without GPUs: half each, at least one."""
    vision = max(cpus // 2, 1)
    return vision, max(cpus - vision, 1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """A server subprocess in its own process group: started, awaited until ready, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.command, self.port, self.ready_path, self.log = name, command, port, ready_path, log
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> float:
        """Starts the server and returns the seconds until it answered its readiness probe."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise ServerStartError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return time.monotonic() - started
            time.sleep(READY_POLL_S)
        self.stop()
        raise ServerStartError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole group if it has not exited within `STOP_WAIT_S`; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        self._signal_group(signal.SIGKILL)  # whatever the server left behind in its own group
        return self.process.returncode

    def _signal_group(self, signal_number: int) -> None:
        try:
            os.killpg(self.process.pid, signal_number)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:] if self.log.exists() else ""

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
