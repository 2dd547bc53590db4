"""Runs one load level: locust in a subprocess against a running server, then its raw samples read back.

This module never imports locust (the locust process does); it is safe to use next to vllm or ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import Field

from dvd_serve.common.config import FrozenConfig
from dvd_serve.loadtests.metrics import RequestSample, read_samples

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"concurrency": "ConcurrencyChatUser", "poisson": "PoissonChatUser"}
# Seconds locust may take to start and to exit, on top of the load and its drain.
LOCUST_OVERHEAD_S = 60.0


class LoadRunConfig(FrozenConfig):
    """One level of load against one server."""

    base_url: str = Field(description="Server root, e.g. http://127.0.0.1:8000 (the API is under /v1).")
    model: str = Field(description="`model` value of every request (see `served_model`).")
    api_key: str | None = Field(default=None, description="Bearer key, if the server wants one.")
    mode: Literal["concurrency", "poisson"] = Field(
        default="poisson", description="'poisson': open loop at `rate`; 'concurrency': `concurrency` users in a loop."
    )
    rate: float = Field(default=1.0, gt=0, description="Open loop: mean request arrivals per second.")
    concurrency: int = Field(default=1, ge=1, description="Closed loop: requests kept in flight.")
    duration_s: float = Field(default=20.0, gt=0, description="Seconds during which new requests start.")
    drain_timeout_s: float = Field(
        default=60.0, ge=0, description="Seconds running requests may take to finish after `duration_s`."
    )
    request_timeout_s: float = Field(default=300.0, gt=0, description="Most seconds one request may take.")
    first_request: int = Field(
        default=0, ge=0, description="Dataset line of the first request (successive levels use fresh requests).",
    )
    arrival_seed: int = Field(default=0, ge=0, description="Open loop: seed of the arrival times.")


class LoadRunError(RuntimeError):
    """Locust failed to run (not: requests failed, which the samples record)."""


def served_model(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The id of the first model `GET /v1/models` lists."""
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/models")
    if api_key:
        request.add_header("authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)["data"][0]["id"]


def locust_command(config: LoadRunConfig, dataset: Path, samples: Path) -> list[str]:
    users = config.concurrency if config.mode == "concurrency" else 1
    hard_limit_s = config.duration_s + config.drain_timeout_s + LOCUST_OVERHEAD_S / 2
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", config.base_url,
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{int(hard_limit_s) + 1}s",
        "--stop-timeout", "5", "--exit-code-on-error", "0", "--only-summary", "--loglevel", "WARNING",
        "--dvd-dataset", str(dataset), "--dvd-samples", str(samples), "--dvd-model", config.model,
        "--dvd-first-request", str(config.first_request), "--dvd-duration", str(config.duration_s),
        "--dvd-drain-timeout", str(config.drain_timeout_s), "--dvd-request-timeout", str(config.request_timeout_s),
        "--dvd-rate", str(config.rate), "--dvd-seed", str(config.arrival_seed),
    ]
    if config.api_key:
        command += ["--dvd-api-key", config.api_key]
    return command + [USER_CLASSES[config.mode]]


def run_load(config: LoadRunConfig, dataset: Path, samples: Path) -> list[RequestSample]:
    """Offers the load `config` describes from `dataset`; returns the raw samples (also left in `samples`)."""
    samples.parent.mkdir(parents=True, exist_ok=True)
    samples.unlink(missing_ok=True)
    log = samples.with_suffix(".locust.log")
    timeout_s = config.duration_s + config.drain_timeout_s + LOCUST_OVERHEAD_S
    # Locust reads locust.conf / pyproject.toml from its working directory: run it in the output folder.
    with log.open("wb") as out:
        try:
            finished = subprocess.run(
                locust_command(config, dataset, samples), stdout=out, stderr=subprocess.STDOUT,
                cwd=samples.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise LoadRunError(f"locust ran past {timeout_s:.0f} s:\n{_tail(log)}") from None
    if finished.returncode != 0:
        raise LoadRunError(f"locust exited with {finished.returncode}:\n{_tail(log)}")
    return read_samples(samples)


def _tail(path: Path, characters: int = 3000) -> str:
    return path.read_text(errors="replace")[-characters:]
