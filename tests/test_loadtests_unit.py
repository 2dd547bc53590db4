"""Load-test building blocks without any model: statistics, stream reading, datasets, outputs, exit codes, and the
locust process end to end against a scripted SSE server (a test double standing in for a chat server)."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dvd_serve.loadtests import cli as loadtest_cli
from dvd_serve.loadtests.bench import BenchConfig, BenchResult, LevelResult, plan_levels
from dvd_serve.loadtests.datasets import (
    WorkloadConfig,
    image_sources,
    poisson_arrivals,
    read_dataset,
    request_bodies,
    text_only_indices,
    with_model,
    write_dataset,
)
from dvd_serve.loadtests.metrics import (
    Distribution,
    RequestSample,
    exact_percentile,
    exit_code,
    read_samples,
    summarize,
    write_json,
    write_rows_csv,
    write_samples_csv,
)
from dvd_serve.loadtests.parity import GreedyAnswer, compare_answers
from dvd_serve.loadtests.report import headline_json, markdown, visual_tokens
from dvd_serve.loadtests.stage_metrics import parse_totals, stage_means
from dvd_serve.loadtests.stream import ChatStreamReader
from dvd_serve.loadtests.systems import SYSTEMS, ServerSettings
from dvd_serve.loadtests import bench_cli


def _sample(index: int, start: float, e2e: float, ttft: float | None, tokens: int, status: str = "ok",
            prompt: int = 100, visual: int | None = None) -> RequestSample:
    return RequestSample(index, start, e2e, ttft, tokens, prompt, status, "", visual)


# ---- statistics ----


@pytest.mark.parametrize("size", [1, 2, 7, 100, 1001])
def test_exact_percentile_equals_numpy_linear(size):
    values = np.random.default_rng(size).exponential(0.3, size).tolist()
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert exact_percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


def test_exact_percentile_interpolates_between_ranks():
    assert exact_percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert exact_percentile([10.0, 20.0], 90) == 19.0
    with pytest.raises(ValueError):
        exact_percentile([], 50)


def test_ttft_tpot_e2e_from_synthetic_samples():
    samples = [
        _sample(0, 100.0, e2e=1.0, ttft=0.2, tokens=9),  # tpot (1.0 - 0.2) / 8 = 0.1
        _sample(1, 100.5, e2e=2.0, ttft=0.5, tokens=4),  # tpot 1.5 / 3 = 0.5
        _sample(2, 101.0, e2e=0.5, ttft=0.5, tokens=1),  # one token: no tpot
        _sample(3, 101.0, e2e=0.3, ttft=None, tokens=2),  # no content: no ttft, no tpot
        _sample(4, 101.2, e2e=0.1, ttft=None, tokens=0, status="http_503"),
    ]
    assert samples[0].tpot_s == pytest.approx(0.1)
    assert samples[2].tpot_s is None and samples[3].tpot_s is None
    summary = summarize(samples)
    assert (summary.requests, summary.succeeded, summary.failed) == (5, 4, 1)
    assert summary.fail_ratio == pytest.approx(0.2)
    assert summary.failures == {"http_503": 1}
    assert summary.without_output == 1
    assert summary.duration_s == pytest.approx(102.5 - 100.0)  # first start to the last end (sample 1)
    assert summary.request_throughput == pytest.approx(4 / 2.5)
    assert summary.output_token_throughput == pytest.approx((9 + 4 + 1 + 2) / 2.5)
    assert (summary.ttft.count, summary.ttft.p50) == (3, pytest.approx(0.5))
    assert summary.ttft.mean == pytest.approx(1.2 / 3)
    assert summary.tpot.p50 == pytest.approx(0.3)  # median of 0.1 and 0.5
    assert summary.e2e.p90 == pytest.approx(exact_percentile([1.0, 2.0, 0.5, 0.3], 90))
    assert summary.flat()["tpot_p50_ms"] == pytest.approx(300.0)


def test_empty_distribution_is_nan():
    empty = Distribution.of([])
    assert empty.count == 0 and math.isnan(empty.p99)
    assert summarize([]).requests == 0


@pytest.mark.parametrize("failed, total, allowed, expected", [
    (0, 10, 0.0, 0), (1, 10, 0.0, 1), (1, 10, 0.1, 0), (2, 10, 0.1, 1), (0, 0, 1.0, 1),
])
def test_exit_code_follows_max_fail_ratio(failed, total, allowed, expected):
    samples = [_sample(i, 0.0, 0.1, 0.05, 3, status="http_500" if i < failed else "ok") for i in range(total)]
    assert exit_code(summarize(samples), allowed) == expected


# ---- stream reading ----


def _event(document: dict | str) -> bytes:
    return b"data: " + (document if isinstance(document, str) else json.dumps(document)).encode() + b"\n\n"


def _delta(content: str | None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


def test_stream_reader_times_first_non_empty_content_across_split_chunks():
    stream = (_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) + _event(_delta(""))
              + _event(_delta("Hel")) + _event(_delta("lo"))
              + _event({"choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 7}}) + _event("[DONE]"))
    reader = ChatStreamReader()
    cut = stream.index(b"Hel") + 2  # the first content event arrives in two pieces
    reader.feed(stream[:40], 0.1)
    reader.feed(stream[40:cut], 0.2)
    assert reader.outcome.first_output_at is None
    reader.feed(stream[cut:], 0.35)
    outcome = reader.outcome
    assert (outcome.first_output_at, outcome.content_chunks, outcome.text) == (0.35, 2, "Hello")
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.done, outcome.error) == (300, 7, True, None)


def test_stream_reader_times_the_first_logprob_when_tokens_are_not_text_yet():
    empty_with_logprob = {"choices": [{"delta": {"content": ""}, "logprobs": {"content": [{"token": "", "logprob": -1}]}}]}
    reader = ChatStreamReader()
    reader.feed(_event(_delta("")), 0.1)
    reader.feed(_event(empty_with_logprob), 0.2)
    reader.feed(_event(_delta("x")), 0.3)
    assert (reader.outcome.first_output_at, reader.outcome.content_chunks) == (0.2, 1)
    assert reader.outcome.logprob_tokens == [""]


def test_stream_reader_reports_error_events_and_crlf():
    reader = ChatStreamReader()
    reader.feed(b'data: {"error": {"message": "engine died", "code": "engine_dead"}}\r\n\r\ndata: [DONE]\r\n\r\n', 1.0)
    assert reader.outcome.error == "engine died" and reader.outcome.done


# ---- datasets ----


def _decode_image(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_dataset_is_deterministic_and_shaped_as_asked(tmp_path):
    config = WorkloadConfig(resolution=64, images_per_request=2, text_only_share=0.3, num_requests=10, seed=5)
    first = write_dataset(config, tmp_path / "one.jsonl").read_bytes()
    assert write_dataset(config, tmp_path / "two.jsonl").read_bytes() == first
    assert write_dataset(config.model_copy(update={"seed": 6}), tmp_path / "three.jsonl").read_bytes() != first

    bodies = [json.loads(line) for line in read_dataset(tmp_path / "one.jsonl")]
    image_counts = [sum(part["type"] == "image_url" for part in body["messages"][0]["content"]) for body in bodies]
    assert sorted(image_counts) == [0, 0, 0] + [2] * 7
    assert [i for i, count in enumerate(image_counts) if count == 0] == sorted(text_only_indices(config))
    urls = [part["image_url"]["url"] for body in bodies for part in body["messages"][0]["content"]
            if part["type"] == "image_url"]
    assert len(set(urls)) == 14  # every image distinct
    assert _decode_image(urls[0]).size == (64, 64)
    assert all(body["stream"] and body["stream_options"] == {"include_usage": True} for body in bodies)
    assert all(body["max_tokens"] == 32 and body["ignore_eos"] and "model" not in body for body in bodies)


def test_repeated_images_come_from_earlier_requests_of_the_same_segment_only():
    config = WorkloadConfig(resolution=32, num_requests=40, text_only_share=0.25, repeated_image_share=0.5,
                            segment_starts=(15, 30), seed=3)
    sources = image_sources(config)
    assert set(sources) == set(range(40)) - text_only_indices(config)
    repeats = {index: source for index, source in sources.items() if source != index}
    assert len(repeats) == round(0.5 * len(sources))
    segment = lambda index: sum(index >= start for start in (15, 30))  # noqa: E731
    assert all(source < index and segment(source) == segment(index) and sources[source] == source
               for index, source in repeats.items())
    bodies = list(request_bodies(config))
    url = lambda index: bodies[index]["messages"][0]["content"][0]["image_url"]["url"]  # noqa: E731
    assert all(url(index) == url(source) for index, source in repeats.items())
    fresh = [index for index, source in sources.items() if source == index]
    assert len({url(index) for index in fresh}) == len(fresh)
    texts = [body["messages"][0]["content"][-1]["text"] for body in bodies]
    assert len(set(texts)) == 40  # each question its own
    plain = WorkloadConfig(resolution=32, num_requests=40, text_only_share=0.25, seed=3)
    assert list(request_bodies(config.model_copy(update={"repeated_image_share": 0.0}))) == list(
        request_bodies(plain))  # no repeats: the same bytes as before repeats existed
    everything = image_sources(config.model_copy(update={"repeated_image_share": 1.0}))
    assert sum(source == index for index, source in everything.items()) == 3  # the first of each segment


def test_parity_style_bodies_set_detail_logprobs_and_no_stream():
    body = next(request_bodies(WorkloadConfig(resolution=32, detail="high", logprobs=True, stream=False)))
    assert body["messages"][0]["content"][0]["image_url"]["detail"] == "high"
    assert body["logprobs"] is True and "stream" not in body


def test_with_model_prepends_the_model_key():
    assert json.loads(with_model(b'{"a":1}', 'm"x')) == {"model": 'm"x', "a": 1}
    assert json.loads(with_model(b"{}", "m")) == {"model": "m"}
    with pytest.raises(ValueError):
        with_model(b"[1]", "m")


def test_poisson_arrivals_are_seeded_bounded_and_near_the_rate():
    arrivals = poisson_arrivals(20.0, 50.0, seed=3)
    assert arrivals == poisson_arrivals(20.0, 50.0, seed=3) != poisson_arrivals(20.0, 50.0, seed=4)
    assert all(0 <= a < 50.0 for a in arrivals) and arrivals == sorted(arrivals)
    assert 900 <= len(arrivals) <= 1100  # 1000 expected; sd ~32
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential: coefficient of variation 1


# ---- outputs ----


def test_samples_csv_and_json_round_trip(tmp_path):
    samples = [_sample(0, 10.0, 1.0, 0.2, 9, visual=256), _sample(1, 10.5, 0.4, None, 1, status="timeout")]
    with (tmp_path / "samples.jsonl").open("w") as out:
        out.writelines(sample.to_json() + "\n" for sample in samples)
    assert read_samples(tmp_path / "samples.jsonl") == samples

    rows = list(csv.DictReader(write_samples_csv(samples, tmp_path / "samples.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "timeout"]
    assert float(rows[0]["tpot_s"]) == pytest.approx(0.1) and rows[1]["tpot_s"] == ""
    assert rows[0]["visual_tokens"] == "256"

    summary = summarize([*samples, _sample(2, 11.0, 0.3, 0.3, 1, status="http_429")])
    document = json.loads(write_json({"summary": summary}, tmp_path / "out" / "summary.json").read_text())
    assert document["summary"]["failures"] == {"timeout": 1, "http_429": 1}
    assert document["summary"]["ttft"]["p50"] == pytest.approx(0.2)
    assert document["summary"]["tpot"]["p50"] == pytest.approx(0.1)
    assert json.loads(write_json(summarize([]), tmp_path / "empty.json").read_text())["ttft"]["p50"] is None
    table = list(csv.DictReader(write_rows_csv([{"level": 1, **summary.flat()}], tmp_path / "s.csv").open()))
    assert float(table[0]["ttft_p50_ms"]) == pytest.approx(200.0) and table[0]["level"] == "1"


# ---- per-stage metrics, parity, planning, report ----


EXPOSITION = """# HELP dvd_request_vision_seconds x
# TYPE dvd_request_vision_seconds histogram
dvd_request_vision_seconds_bucket{le="+Inf"} %(count)s
dvd_request_vision_seconds_sum %(total)s
dvd_request_vision_seconds_count %(count)s
# HELP vllm:request_prefill_time_seconds x
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{model_name="a",le="+Inf"} %(count)s
vllm:request_prefill_time_seconds_sum{model_name="a"} %(total)s
vllm:request_prefill_time_seconds_count{model_name="a"} %(count)s
vllm:request_prefill_time_seconds_sum{model_name="b"} 1.0
vllm:request_prefill_time_seconds_count{model_name="b"} 1.0
"""


def test_stage_means_are_sum_over_count_between_scrapes():
    before = parse_totals(EXPOSITION % {"count": 2, "total": 0.5})
    after = parse_totals(EXPOSITION % {"count": 6, "total": 2.5})
    means = stage_means(before, after)
    assert means["vision_ms"] == pytest.approx(500.0)  # (2.5 - 0.5) / (6 - 2) s
    assert means["vllm_prefill_ms"] == pytest.approx(500.0)  # label b did not change
    assert "encode_ms" not in means


def _answer(text: str, logprobs: tuple[float, ...], prompt: int = 300) -> GreedyAnswer:
    return GreedyAnswer(text, logprobs, prompt, len(logprobs))


def test_parity_compares_counts_text_and_logprobs():
    reference = [_answer("ab", (-1.0, -2.0)), _answer("c", (-0.5,)), _answer("d", (-0.1,))]
    same = [_answer("ab", (-1.0, -2.0004)), _answer("c", (-0.5,)), _answer("d", (-0.1,))]
    assert compare_answers(reference, same).passed
    different = [_answer("ab", (-1.0, -2.1)), _answer("c", (-0.5,), prompt=299), _answer("d", (-0.1,))]
    result = compare_answers(reference, different)
    assert (result.identical, result.passed) == (1, False)
    assert result.first_difference.startswith("request 0: logprob of token 1")


def test_levels_use_fresh_requests_and_the_arrival_schedule():
    config = BenchConfig(rates={448: (2.0, 5.0)}, resolutions=(448,), duration_s=20.0, seed=2)
    first, second = plan_levels(config, 448)
    assert first.first_request == 0 and second.first_request == first.requests
    assert first.requests == len(poisson_arrivals(2.0, 20.0, first.arrival_seed))
    assert second.requests == len(poisson_arrivals(5.0, 20.0, second.arrival_seed))


def _level(system: str, rps: float, prompt: int, visual: int | None) -> LevelResult:
    # Eight requests sent together, all ending at 8 / rps: exactly `rps` requests per second.
    samples = [_sample(i, 0.0, 8 / rps, 0.1, 9, prompt=prompt, visual=visual) for i in range(8)]
    return LevelResult(system, 448, 4.0, summarize(samples), {"vision_ms": 12.0} if system != "a" else {})


def test_report_ratios_and_derived_visual_tokens(tmp_path):
    config = BenchConfig(resolutions=(448,), rates={448: (4.0,)}, out_dir=str(tmp_path))
    result = BenchResult(config, levels=[_level("a", 2.0, 300, None), _level("b", 1.0, 300, 256),
                                         _level("c", 4.0, 300, 256), _level("d", 5.0, 172, 128)])
    assert visual_tokens(result, result.levels[0]) == (pytest.approx(256.0), True)  # 300 - (300 - 256)
    assert visual_tokens(result, result.levels[3]) == (pytest.approx(128.0), False)
    headline = headline_json(result)["448"]
    assert headline["c_over_a"] == pytest.approx(2.0) and headline["c_over_b"] == pytest.approx(4.0)
    assert headline["d_over_a"] == pytest.approx(2.5) and headline["d_over_b"] == pytest.approx(5.0)
    text = markdown(result, {"cores": "2"})
    assert "| 448 | (c) dvd-serve DvD | 4 | 4.00 |" in text
    assert "| 256* |" in text and "| 2.00 | 4.00 | 0/8 |" in text


# ---- commands of the systems and the bench command line ----


def test_system_commands_share_settings_and_split_the_cores():
    settings = ServerSettings(dtype="float32", cpus=2)
    vllm = SYSTEMS["a"].command(Path("/m"), 9000, settings)
    coupled = SYSTEMS["b"].command(Path("/m"), 9001, settings)
    flash = SYSTEMS["d"].command(Path("/f"), 9002, settings)
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in vllm
    assert coupled[coupled.index("--topology") + 1] == "coupled"
    assert coupled[coupled.index("--lm-cpus-per-replica") + 1] == "2"
    assert flash[flash.index("--topology") + 1] == "dvd" and flash[flash.index("--model") + 1] == "/f"
    assert flash[flash.index("--vision-cpus-per-replica") + 1] == "1"
    for command in (vllm, coupled, flash):
        assert command[command.index("--max-num-seqs") + 1] == "64"
        assert command[command.index("--dtype") + 1] == "float32"
    assert (SYSTEMS["d"].checkpoint, SYSTEMS["c"].checkpoint) == ("flash", "chat")


def test_bench_command_line_becomes_a_config():
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--systems", "a,c", "--resolutions", "896", "--rates", "896=3,1",
                              "--duration", "5", "--out", "x"])
    config = bench_cli.config_from_args(args)
    assert config.systems == ("a", "c") and config.resolutions == (896,)
    assert config.rates_for(896) == (1.0, 3.0) and config.duration_s == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--rates", "896"])


# ---- locust, for real, against a scripted SSE server ----


class ScriptedChatServerDouble(BaseHTTPRequestHandler):
    """Test double of a chat server: answers every 4th request (index 3, 7, ...) with 500, the others with a
    stream of TOKENS content chunks, the first after FIRST_TOKEN_S, then one every TOKEN_GAP_S."""

    TOKENS, FIRST_TOKEN_S, TOKEN_GAP_S = 5, 0.05, 0.01

    def do_GET(self) -> None:  # noqa: N802
        self._reply(200, "application/json", json.dumps({"data": [{"id": "double"}]}).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        parts = body["messages"][0]["content"]
        index = int(parts[-1]["text"].split(":")[0].split()[1])
        if index % 4 == 3 or body["model"] != "double":
            self._reply(500, "application/json", b'{"error": {"message": "scripted failure"}}')
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("x-dvd-visual-tokens", str(256 * (len(parts) - 1)))
        self.end_headers()
        self._send(_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]}))
        time.sleep(self.FIRST_TOKEN_S)
        for token in range(self.TOKENS):
            self._send(_event(_delta(f"t{token}")))
            time.sleep(self.TOKEN_GAP_S)
        self._send(_event({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": self.TOKENS}}))
        self._send(_event("[DONE]"))

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _reply(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedChatServerDouble)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode, allowed, expected_exit", [("concurrency", 0.0, 1), ("poisson", 0.5, 0)])
def test_cli_runs_locust_and_exits_by_fail_ratio(scripted_server, tmp_path, mode, allowed, expected_exit):
    status = loadtest_cli.main([
        "--url", scripted_server, "--resolution", "32", "--text-only-share", "0.25", "--mode", mode,
        "--concurrency", "2", "--rate", "8", "--duration", "2", "--drain-timeout", "10", "--seed", "1",
        "--max-fail-ratio", str(allowed), "--out", str(tmp_path),
    ])
    assert status == expected_exit
    samples = read_samples(tmp_path / "samples.jsonl")
    assert samples
    for sample in samples:
        if sample.request_index % 4 == 3:
            assert sample.status == "http_500"
            continue
        assert sample.status == "ok" and sample.output_tokens == ScriptedChatServerDouble.TOKENS
        assert sample.ttft_s >= ScriptedChatServerDouble.FIRST_TOKEN_S
        # The server's pacing bounds only the end-to-end time: a busy client may read several chunks at once,
        # so the per-token gap it sees can be far below TOKEN_GAP_S.
        server_pacing_s = ScriptedChatServerDouble.FIRST_TOKEN_S + (
            ScriptedChatServerDouble.TOKENS - 1) * ScriptedChatServerDouble.TOKEN_GAP_S
        assert sample.e2e_s >= server_pacing_s * 0.99
        assert sample.tpot_s == pytest.approx(
            (sample.e2e_s - sample.ttft_s) / (ScriptedChatServerDouble.TOKENS - 1))
        assert sample.visual_tokens in (0, 256)
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["requests"] == len(samples)
    assert summary["failed"] == sum(sample.request_index % 4 == 3 for sample in samples) > 0
    assert len(list(csv.DictReader((tmp_path / "samples.csv").open()))) == len(samples)
    if mode == "poisson":  # open loop: exactly the seeded arrivals were sent, in dataset order
        assert sorted(sample.request_index for sample in samples) == list(range(len(poisson_arrivals(8, 2, 1))))


def test_vs_vllm_cpu_delta_counts_new_processes_from_zero_and_groups_by_label():
    from dvd_serve.loadtests.benchmarks.vs_vllm import cpu_delta

    before = {1: ("gateway", 2.0), 2: ("language", 5.0)}
    after = {1: ("gateway", 2.5), 2: ("language", 6.0), 3: ("language", 0.25)}
    assert cpu_delta(before, after) == {"gateway": 0.5, "language": 1.25}


def test_vs_vllm_workloads_parse_with_vllms_own_benchmark_arguments():
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from dvd_serve.loadtests.benchmarks.vs_vllm import workloads

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    for workload in workloads(64, 16).values():
        args = parser.parse_args(["--model", "m", *workload.client_args])
        assert args.random_input_len == 64 and args.random_output_len == 16
    image = parser.parse_args(["--model", "m", *workloads(64, 16)["image896"].client_args])
    assert image.random_mm_bucket_config == {(896, 896, 1): 1.0}


def test_vs_vllm_token_path_means_per_hop_and_the_gateways_share():
    from dvd_serve.loadtests.benchmarks.vs_vllm import token_path_means_ms

    before = {"replica": (1.0, 100), "transport": (0.5, 100), "response": (3.0, 100)}
    after = {"replica": (1.2, 200), "transport": (0.6, 200), "response": (3.5, 200), "idle": (0.0, 0)}
    means = token_path_means_ms(before, after)
    assert means == pytest.approx({"replica": 2.0, "transport": 1.0, "response": 5.0, "gateway": 2.0})
    assert token_path_means_ms({}, {}) == {}
