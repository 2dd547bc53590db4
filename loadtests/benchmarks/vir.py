"""ViR (the Flash Visual Resolution Router): what it costs on the vision side and what it saves end to end, one run.

    python -m dvd_serve.loadtests.benchmarks.vir [--shape tiny] [--vision-shape 1b] [--requests 8]
        [--relative 0.33 --absolute 0.0] [--max-tokens 16] [--vit-repeats 1] [--repeats 10] [--bursts 2]
        [--checkpoint-dir DIR]

1. Router cost at the real InternViT width and depth (`--vision-shape`, default 1b = InternViT-300M): a generated
   Flash checkpoint (bfloat16 on disk, float32 compute; only vision tensors are loaded) encodes 448, 896 and
   1344 px images (1, 5, 10 tiles). Times, as medians after a warm-up: `vit_features`, `VisionEncoder.route`
   (router p0 + the per-request decision; also with one torch thread, because on a busy machine the router's
   small, memory-bound ops lose far more to OpenMP synchronisation than the ViT's large matmuls do), and the
   projection with every tile at 256 tokens against the routed mix of mlp1 / mlp2.
2. End to end on the `--shape` Flash checkpoint (float32): one VisionWorker and one LanguageWorker in this process,
   embeddings over loopback gRPC, images as JPEG data URLs, one image per request, greedy decoding of
   `--max-tokens` tokens with ignore_eos. `detail=high` (256 tokens per tile, router not run) against
   `detail=auto` (ViR with the thresholds), per resolution:
   - TTFT p50 over `--requests` sequential requests (submit -> first streamed token), high and auto alternating,
     split into the vision worker's part (decode, preprocess, encode, push) and the rest ("LM": prompt, queue,
     prefill, first token);
   - throughput: `--bursts` bursts of `--requests` concurrent requests per mode (alternating), requests / wall s,
     with TTFT p50 under that load and CPU ms per request of this process and its children (vLLM's AsyncLLM
     always runs its EngineCore in a child process); CPU time is steadier than wall time on a shared machine.
   Prefix caching is off so that a repeated image never skips its prefill.

A table, then one final JSON line. Checkpoints are generated into a temporary folder that is deleted at the end,
unless `--checkpoint-dir` names a folder to generate into (or reuse) and keep.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import torch
from PIL import Image

from dvd_serve.common.chat import ChatJob, ChatMessage, Detail, ImagePart, SamplingConfig, TextPart
from dvd_serve.common.checkpoint.generate import make_checkpoint
from dvd_serve.common.checkpoint.shapes import get_shape
from dvd_serve.lm_worker.engine import LanguageEngineConfig
from dvd_serve.lm_worker.worker import LanguageWorker, LanguageWorkerConfig
from dvd_serve.loadtests.benchmarks.preprocess import _photo_like_pixels
from dvd_serve.loadtests.machine import machine_facts
from dvd_serve.router.decision import TOKENS_COMPRESSED
from dvd_serve.vision_worker.encoder import EncodeRequest, VisionEncoder, VisionEncoderConfig
from dvd_serve.vision_worker.image_decode import DecodeLimits, decode_image
from dvd_serve.vision_worker.preprocess import ImagePreprocessor
from dvd_serve.vision_worker.worker import VisionOutcome, VisionWorker, VisionWorkerConfig

# Square image sides and their tiles under the default tiling (max 12 + thumbnail): 1, 4 + 1, 9 + 1.
RESOLUTIONS = (448, 896, 1344)
MODES = (Detail.HIGH, Detail.AUTO)
MAX_MODEL_LEN = 8192
PROMPT_TEXT = "Describe the image."
T = TypeVar("T")
# Environment for an offline vLLM on CPU; values already set in the environment win.
ENGINE_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def photo_like_jpeg(side: int, seed: int) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(_photo_like_pixels(np.random.default_rng(seed), side, side)).save(encoded, "JPEG", quality=90)
    return encoded.getvalue()


def jpeg_data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def flash_checkpoint(folder: Path, shape: str, dtype: str) -> Path:
    """A Flash chat-format checkpoint of `shape` under `folder`, generated unless a complete one is there."""
    out = folder / f"flash-{shape}-{dtype}"
    if not (out / "config.json").exists():  # written last: its presence means the checkpoint is complete
        if out.exists():
            shutil.rmtree(out)
        make_checkpoint(out, fmt="chat", shape=shape, flash=True, seed=0, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Part 1: router cost beside the ViT


@dataclass(frozen=True, slots=True)
class Timing:
    wall_ms: float  # median wall time of the timed runs
    cpu_ms: float  # median process CPU time (all threads) of the timed runs


def median_timing(run: Callable[[], T], repeats: int, warmup: int) -> tuple[Timing, T]:
    """Runs `run` warmup + repeats times; the medians of the timed runs and the last run's result."""
    walls, cpus = [], []
    for index in range(warmup + repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = run()
        if index >= warmup:
            walls.append(time.perf_counter() - wall_start)
            cpus.append(time.process_time() - cpu_start)
    return Timing(1000 * statistics.median(walls), 1000 * statistics.median(cpus)), result


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_router_cost(
    model: Path, relative: float, absolute: float, vit_repeats: int, repeats: int
) -> list[dict[str, float]]:
    encoder = VisionEncoder.from_config(VisionEncoderConfig(
        model=str(model), dtype="float32", device="cpu",
        router_relative_threshold=relative, router_absolute_threshold=absolute,
    ))
    with ImagePreprocessor.from_spec(encoder.spec) as preprocessor:
        tiles_by_side = {
            side: preprocessor.preprocess([decode_image(photo_like_jpeg(side, seed=side), DecodeLimits())])[0]
            for side in RESOLUTIONS
        }
    encoder.vit_features(tiles_by_side[RESOLUTIONS[0]])  # first-call allocations, once for all sizes
    rows = []
    for side, tiles in tiles_by_side.items():
        tile_count = int(tiles.shape[0])
        vit, features = median_timing(partial(encoder.vit_features, tiles), vit_repeats, warmup=0)
        route = partial(encoder.route, features, [EncodeRequest(images=[tiles], details=[Detail.AUTO])])
        router, compress = median_timing(route, repeats, warmup=2)
        with torch_threads(1):
            router_one_thread, _ = median_timing(route, repeats, warmup=2)
        project_high, _ = median_timing(
            partial(encoder.project, features, torch.zeros_like(compress), [tile_count]), repeats, warmup=1
        )
        project_auto, _ = median_timing(partial(encoder.project, features, compress, [tile_count]), repeats, 1)
        rows.append({
            "px": side,
            "tiles": tile_count,
            "vit_ms": vit.wall_ms,
            "router_ms": router.wall_ms,
            "router_share": router.wall_ms / vit.wall_ms,
            "router_ms_1_thread": router_one_thread.wall_ms,
            "vit_cpu_ms": vit.cpu_ms,
            "router_cpu_ms": router.cpu_ms,
            "router_cpu_share": router.cpu_ms / vit.cpu_ms,
            "project_high_ms": project_high.wall_ms,
            "project_auto_ms": project_auto.wall_ms,
            # what ViR adds on the vision side (router + the change in projection cost), relative to the ViT
            "vision_overhead_share": (router.wall_ms + project_auto.wall_ms - project_high.wall_ms) / vit.wall_ms,
            "compressed_tiles": int(compress.sum()),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Part 2: end to end through the decoupled path


@dataclass(frozen=True, slots=True)
class RequestRecord:
    ttft_s: float  # submit -> first streamed token
    latency_s: float  # submit -> last token
    visual_tokens: int
    tiles: int
    compressed_tiles: int
    vision_s: float  # decode + preprocess + batch wait + encode + push, as the vision worker timed them


def _vision_seconds(outcome: VisionOutcome) -> float:
    return (outcome.fetch_decode_s + outcome.preprocess_s + outcome.queue_wait_s + outcome.encode_s
            + outcome.transfer_s)


class DecoupledPipeline:
    """One VisionWorker and one LanguageWorker in this process, joined over loopback gRPC."""

    def __init__(self, vision: VisionWorker, language: LanguageWorker, sampling: SamplingConfig) -> None:
        self._vision = vision
        self._language = language
        self._sampling = sampling
        self._request_ids = itertools.count()

    @classmethod
    async def start(cls, model: Path, relative: float, absolute: float, max_tokens: int) -> DecoupledPipeline:
        language = await LanguageWorker.start(LanguageWorkerConfig(engine=LanguageEngineConfig(
            model=str(model), dtype="float32", max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False,
        )))
        vision = VisionWorker.load(VisionWorkerConfig(encoder=VisionEncoderConfig(
            model=str(model), dtype="float32", device="cpu",
            router_relative_threshold=relative, router_absolute_threshold=absolute,
        )))
        return cls(vision, language, SamplingConfig(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    async def close(self) -> None:
        await self._vision.close()
        await self._language.stop()

    async def run(self, image_url: str, detail: Detail) -> RequestRecord:
        job = ChatJob(
            request_id=f"vir-{next(self._request_ids)}",
            messages=(ChatMessage("user", (ImagePart(url=image_url, detail=detail), TextPart(PROMPT_TEXT))),),
            sampling=self._sampling,
        )
        started = time.perf_counter()
        push = asyncio.create_task(self._vision.process(job.request_id, job.images, self._language.grpc_address))
        first_token_at: float | None = None
        generated = 0
        try:
            async for delta in self._language.generate(job, expected_images=1):
                if delta.token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                generated += len(delta.token_ids)
            outcome = await push
        finally:
            push.cancel()  # no-op once it has finished
        finished = time.perf_counter()
        if first_token_at is None or generated != self._sampling.max_tokens:
            raise RuntimeError(f"request {job.request_id} produced {generated} tokens, not {self._sampling.max_tokens}")
        tokens_per_tile = outcome.tokens_per_tile[0]
        return RequestRecord(
            ttft_s=first_token_at - started,
            latency_s=finished - started,
            visual_tokens=outcome.tokens_per_image[0],
            tiles=len(tokens_per_tile),
            compressed_tiles=sum(tokens == TOKENS_COMPRESSED for tokens in tokens_per_tile),
            vision_s=_vision_seconds(outcome),
        )


def process_tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live children so far."""
    total = 0.0
    for process in (psutil.Process(), *psutil.Process().children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _median_ms(values: Sequence[float]) -> float:
    return 1000 * statistics.median(values)


def summarise_mode(sequential: list[RequestRecord], loaded: list[RequestRecord], burst_wall_s: float,
                   burst_cpu_s: float) -> dict[str, float]:
    return {
        "tiles": statistics.mean(record.tiles for record in sequential),
        "visual_tokens_per_image": statistics.mean(record.visual_tokens for record in sequential),
        "compressed_fraction": sum(r.compressed_tiles for r in sequential) / sum(r.tiles for r in sequential),
        "ttft_p50_ms": _median_ms([record.ttft_s for record in sequential]),
        "vision_p50_ms": _median_ms([record.vision_s for record in sequential]),
        # embeddings delivered -> first token: prompt, queue and prefill, the part the token cut acts on
        "after_vision_p50_ms": _median_ms([record.ttft_s - record.vision_s for record in sequential]),
        "latency_p50_ms": _median_ms([record.latency_s for record in sequential]),
        "loaded_ttft_p50_ms": _median_ms([record.ttft_s for record in loaded]),
        "requests_per_s": len(loaded) / burst_wall_s,
        "cpu_ms_per_request": 1000 * burst_cpu_s / len(loaded),
    }


async def measure_resolution(pipeline: DecoupledPipeline, image_urls: Sequence[str], bursts: int) -> dict:
    for mode in MODES:
        await pipeline.run(image_urls[0], mode)  # warm-up at this size
    sequential: dict[Detail, list[RequestRecord]] = {mode: [] for mode in MODES}
    for image_url in image_urls:
        for mode in MODES:  # alternating, so background load drifts over both modes alike
            sequential[mode].append(await pipeline.run(image_url, mode))
    loaded: dict[Detail, list[RequestRecord]] = {mode: [] for mode in MODES}
    wall_s = dict.fromkeys(MODES, 0.0)
    cpu_s = dict.fromkeys(MODES, 0.0)
    for _ in range(bursts):
        for mode in MODES:
            wall_start, cpu_start = time.perf_counter(), process_tree_cpu_s()
            loaded[mode] += await asyncio.gather(*(pipeline.run(image_url, mode) for image_url in image_urls))
            wall_s[mode] += time.perf_counter() - wall_start
            cpu_s[mode] += process_tree_cpu_s() - cpu_start
    result = {mode.value: summarise_mode(sequential[mode], loaded[mode], wall_s[mode], cpu_s[mode]) for mode in MODES}
    high, auto = result[Detail.HIGH.value], result[Detail.AUTO.value]
    result["auto_over_high"] = {
        key: auto[key] / high[key]
        for key in ("visual_tokens_per_image", "ttft_p50_ms", "after_vision_p50_ms", "loaded_ttft_p50_ms",
                    "requests_per_s", "cpu_ms_per_request")
    }
    return result


async def measure_end_to_end(model: Path, relative: float, absolute: float, max_tokens: int, requests: int,
                             bursts: int) -> dict[str, dict]:
    pipeline = await DecoupledPipeline.start(model, relative, absolute, max_tokens)
    try:
        results = {}
        for side in RESOLUTIONS:
            image_urls = [jpeg_data_url(photo_like_jpeg(side, seed=1000 * side + index)) for index in range(requests)]
            results[str(side)] = await measure_resolution(pipeline, image_urls, bursts)
        return results
    finally:
        await pipeline.close()


# ---------------------------------------------------------------------------------------------------------------
# Report


def overall_compressed_fraction(end_to_end: dict[str, dict], min_tiles: int) -> float:
    """Compressed share of all `auto` tiles of images with at least `min_tiles` tiles."""
    auto = [result[Detail.AUTO.value] for result in end_to_end.values()]
    auto = [row for row in auto if row["tiles"] >= min_tiles]
    compressed = sum(row["compressed_fraction"] * row["tiles"] for row in auto)
    return compressed / sum(row["tiles"] for row in auto)


def print_router_table(rows: list[dict], vision_shape: str, vit_repeats: int, repeats: int) -> None:
    vision = get_shape(vision_shape).vision
    print(f"Router cost: {vision_shape} vision tower (width {vision.hidden_size}, {vision.num_layers} layers), "
          f"float32, {torch.get_num_threads()} torch threads; ViT median of {vit_repeats}, router/projector median "
          f"of {repeats}")
    print(f"{'px':>5}{'tiles':>6}{'ViT ms':>10}{'router ms':>11}{'share':>8}{'cpu share':>11}{'router 1T ms':>14}"
          f"{'proj high ms':>14}{'proj auto ms':>14}{'ViR net':>9}{'compressed':>12}")
    for row in rows:
        print(f"{row['px']:>5}{row['tiles']:>6}{row['vit_ms']:>10.0f}{row['router_ms']:>11.2f}"
              f"{row['router_share']:>8.2%}{row['router_cpu_share']:>11.2%}{row['router_ms_1_thread']:>14.2f}"
              f"{row['project_high_ms']:>14.1f}{row['project_auto_ms']:>14.1f}{row['vision_overhead_share']:>9.2%}"
              f"{row['compressed_tiles']:>8}/{row['tiles']:<3}")


def print_end_to_end_table(end_to_end: dict[str, dict], shape: str, requests: int, bursts: int,
                           max_tokens: int) -> None:
    print(f"\nEnd to end: {shape} Flash checkpoint, decoupled in-process, float32, {max_tokens} tokens greedy; "
          f"TTFT p50 of {requests} sequential requests; req/s over {bursts} x {requests} concurrent")
    print(f"{'px':>5}{'tiles':>6}{'detail':>7}{'tokens/img':>11}{'compressed':>11}{'TTFT ms':>9}{'vision ms':>10}"
          f"{'LM ms':>8}{'TTFT@load':>10}{'req/s':>7}{'cpu ms/req':>11}")
    for side, result in end_to_end.items():
        for mode in MODES:
            row = result[mode.value]
            print(f"{side:>5}{row['tiles']:>6.0f}{mode.value:>7}{row['visual_tokens_per_image']:>11.0f}"
                  f"{row['compressed_fraction']:>11.0%}{row['ttft_p50_ms']:>9.1f}{row['vision_p50_ms']:>10.1f}"
                  f"{row['after_vision_p50_ms']:>8.1f}{row['loaded_ttft_p50_ms']:>10.1f}{row['requests_per_s']:>7.2f}"
                  f"{row['cpu_ms_per_request']:>11.1f}")
        ratio = result["auto_over_high"]
        print(f"{side:>5} auto/high: tokens {ratio['visual_tokens_per_image']:.2f}, TTFT {ratio['ttft_p50_ms']:.2f}, "
              f"LM {ratio['after_vision_p50_ms']:.2f}, TTFT@load {ratio['loaded_ttft_p50_ms']:.2f}, "
              f"req/s {ratio['requests_per_s']:.2f}, cpu/req {ratio['cpu_ms_per_request']:.2f}")


def _set_engine_environment(scratch: Path) -> None:
    defaults = dict(ENGINE_ENV_DEFAULTS, HF_MODULES_CACHE=str(scratch / "hf-modules"),
                    VLLM_CACHE_ROOT=str(scratch / "vllm-cache"))
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", help="checkpoint shape of the end-to-end run")
    parser.add_argument("--vision-shape", default="1b", help="checkpoint shape whose vision tower the router cost uses")
    parser.add_argument("--requests", type=int, default=8, help="sequential requests, and concurrent ones per burst")
    parser.add_argument("--bursts", type=int, default=2, help="concurrent bursts per mode and resolution")
    parser.add_argument("--relative", type=float, default=0.33, help="router quantile threshold")
    parser.add_argument("--absolute", type=float, default=0.0, help="router least p0 to compress")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--vit-repeats", type=int, default=1, help="timed ViT runs per image size (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=10, help="timed router and projector runs per image size")
    parser.add_argument("--checkpoint-dir", help="generate checkpoints here (or reuse them) and keep them")
    args = parser.parse_args(argv)

    started = datetime.now(timezone.utc)
    scratch = Path(tempfile.mkdtemp(prefix="vir-bench-"))
    _set_engine_environment(scratch)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else scratch
    load_before = os.getloadavg()[0]
    try:
        vision_model = flash_checkpoint(checkpoints, args.vision_shape, "bfloat16")  # compute is float32
        router_rows = measure_router_cost(vision_model, args.relative, args.absolute, args.vit_repeats, args.repeats)
        print_router_table(router_rows, args.vision_shape, args.vit_repeats, args.repeats)
        end_to_end = asyncio.run(measure_end_to_end(
            flash_checkpoint(checkpoints, args.shape, "float32"), args.relative, args.absolute, args.max_tokens,
            args.requests, args.bursts,
        ))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_end_to_end_table(end_to_end, args.shape, args.requests, args.bursts, args.max_tokens)
    compressed_multi_tile = overall_compressed_fraction(end_to_end, min_tiles=2)
    print(f"\nauto compressed {compressed_multi_tile:.0%} of the tiles of multi-tile images "
          f"(relative {args.relative}, absolute {args.absolute}); a 1-tile image is never compressed")
    print(json.dumps({
        "benchmark": "vir",
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
        "machine": dict(machine_facts(), torch_threads=torch.get_num_threads(), load_average_1m_at_start=load_before),
        "settings": vars(args),
        "router_cost": router_rows,
        "end_to_end": end_to_end,
        "compressed_fraction_multi_tile": compressed_multi_tile,
        "compressed_fraction_all_tiles": overall_compressed_fraction(end_to_end, min_tiles=1),
    }))


if __name__ == "__main__":
    main()
