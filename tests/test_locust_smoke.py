"""A bounded locust run (about 20 s) against a real tiny `dvd-serve serve` (DvD topology): zero failures, and the
load generator's raw samples agree with the server's own metrics."""

from __future__ import annotations

import pytest

from dvd_serve.loadtests.datasets import WorkloadConfig, text_only_indices, write_dataset
from dvd_serve.loadtests.metrics import exit_code, summarize
from dvd_serve.loadtests.runner import LoadRunConfig, run_load, served_model
from dvd_serve.loadtests.stage_metrics import scrape
from dvd_serve.loadtests.systems import SYSTEMS, ServerProcess, ServerSettings, free_port

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 300
MAX_TOKENS = 8
TILE_TOKENS = 256  # a 448 px image is one tile; the chat checkpoint has no router


def test_locust_smoke_against_a_tiny_serve(tiny_chat_checkpoint, session_tmp):
    port = free_port()
    settings = ServerSettings(dtype="float32", cpus=2, max_images_per_request=2)
    server = ServerProcess("dvd-serve", SYSTEMS["c"].command(tiny_chat_checkpoint, port, settings), port, "/ready",
                           session_tmp / "locust-smoke-serve.log")
    workload = WorkloadConfig(resolution=448, text_only_share=0.25, num_requests=64, max_tokens=MAX_TOKENS, seed=7)
    dataset = write_dataset(workload, session_tmp / "locust-smoke" / "dataset.jsonl")
    with server:
        server.start(READY_TIMEOUT_S)
        load = LoadRunConfig(base_url=server.base_url, model=served_model(server.base_url), mode="concurrency",
                             concurrency=2, duration_s=15.0, drain_timeout_s=30.0, request_timeout_s=60.0)
        before = scrape(server.base_url)
        samples = run_load(load, dataset, session_tmp / "locust-smoke" / "samples.jsonl")
        after = scrape(server.base_url)

    summary = summarize(samples)
    assert summary.requests >= 4, summary
    assert summary.failed == 0, summary.failures
    assert exit_code(summary, max_fail_ratio=0.0) == 0
    text_only = text_only_indices(workload)
    for sample in samples:
        assert sample.output_tokens == MAX_TOKENS
        assert sample.ttft_s is None or 0 < sample.ttft_s <= sample.e2e_s
        image_tokens = 0 if sample.request_index % workload.num_requests in text_only else TILE_TOKENS
        assert sample.visual_tokens == image_tokens
    # The server saw exactly the requests the samples record, with the same visual tokens.
    finished = after["dvd_e2e_request_latency_seconds"].count - before["dvd_e2e_request_latency_seconds"].count
    assert finished == len(samples)
    visual = after["dvd_request_visual_tokens"].total - before["dvd_request_visual_tokens"].total
    assert visual == sum(sample.visual_tokens for sample in samples)
