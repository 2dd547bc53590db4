"""RayPipeline joins a two-node Ray cluster and places each pool on the node that offers its resource.

Both nodes run on this machine as separate `ray start` processes: the head offers `vision_gpu`, the worker
`lm_gpu`. The nodes use the Ray authentication mode this test process uses: Ray takes it from `RAY_AUTH_MODE`
(unset means no token for a driver joining an explicit address; a local `ray.init` earlier in the session switches
the process to token mode, with the user's Ray token), and a driver whose mode differs from the cluster's cannot
own actors there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dvd_serve.common.chat import ChatJob, ChatMessage, Detail, ImagePart, SamplingConfig, TextPart
from dvd_serve.server.serve_config import PoolConfig, ServeConfig
from tests.dvd_fixtures import data_url, synthetic_image

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
NODE_START_TIMEOUT_S = 90
NODE_STOP_TIMEOUT_S = 5
OBJECT_STORE_BYTES = 100 * 1024**2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Own session, so the node's daemons (gcs_server, raylet, agents) can be ended as one process group.
    with log.open("wb") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", f"--object-store-memory={OBJECT_STORE_BYTES}",
             "--num-cpus=1", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def _stop_node(node: subprocess.Popen) -> None:
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(node.pid, stop_signal)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=NODE_STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        for node, log in zip(nodes, logs, strict=True):
            if node.poll() is not None:
                pytest.fail(f"ray node exited early:\n{log.read_text()[-3000:]}")
        status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, timeout=60)
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(1)
    pytest.fail(f"the {count}-node cluster did not come up within {NODE_START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def two_node_cluster(session_tmp):
    import ray

    assert not ray.is_initialized()
    env = {"RAY_AUTH_MODE": "disabled", **os.environ}
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths under it must fit in 107 bytes
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = [session_tmp / "ray-head.log", session_tmp / "ray-worker.log"]
    nodes = [
        _start_node(["--head", "--include-dashboard=false", f"--port={port}", '--resources={"vision_gpu": 1}',
                     f"--temp-dir={temp_dir}"], logs[0], env)
    ]
    try:
        _wait_for_nodes(address, 1, nodes, logs[:1])
        nodes.append(_start_node([f"--address={address}", '--resources={"lm_gpu": 1}'], logs[1], env))
        _wait_for_nodes(address, 2, nodes, logs)
        yield address
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_offering(resource: str) -> str:
    import ray

    return next(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get(resource))


async def test_vision_and_language_pools_run_on_different_nodes(two_node_cluster, tiny_flash_checkpoint):
    from dvd_serve.server.ray_pipeline import RayPipeline

    config = ServeConfig(
        model=str(tiny_flash_checkpoint),
        dtype="float32",
        ray_address=two_node_cluster,
        vision_pool=PoolConfig(num_cpus=0, resources={"vision_gpu": 1}),
        language_pool=PoolConfig(num_cpus=0, resources={"lm_gpu": 1}),
        grpc_auth_token="two-node-test-token",
    )
    progress: list[str] = []
    pipeline = await RayPipeline.start(config, progress.append)
    try:
        vision_node = pipeline.pools["vision"].replicas[0].info.node_id
        language_node = pipeline.pools["language"].replicas[0].info.node_id
        assert vision_node != language_node
        assert (vision_node, language_node) == (_node_offering("vision_gpu"), _node_offering("lm_gpu"))

        image = ImagePart(url=data_url(synthetic_image(896, 448, seed=5)), detail=Detail.HIGH)
        job = ChatJob(
            request_id="two-nodes",
            messages=(ChatMessage("user", (image, TextPart("What is shown?"))),),
            sampling=SamplingConfig(max_tokens=5, temperature=0.0, ignore_eos=True),
        )
        deltas = [delta async for delta in pipeline.generate(job)]
        assert sum(len(delta.token_ids) for delta in deltas) == 5
        assert deltas[-1].finish_reason == "length"
        assert deltas[-1].timings.visual_tokens == 3 * 256  # 2 tiles + thumbnail, crossed from node to node
        assert deltas[-1].timings.vision_s > 0
    finally:
        await pipeline.shutdown()
