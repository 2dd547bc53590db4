"""Repeated images: multi-turn conversations that resend one large JPEG every turn, vLLM's own server vs dvd-serve.

    python -m dvd_serve.loadtests.benchmarks.multi_turn --out multi-turn      # 6 conversations x 4 turns
    python -m dvd_serve.loadtests.benchmarks.multi_turn --shape 1b --image-size 896x896 --conversations 2 --turns 3

Each conversation has its own JPEG (2048x1536 by default: 13 tiles at the default cap), sent as a data URL in the
first user message; every turn appends the previous answer and a new question, as a chat client does, so later
turns resend the image. One conversation at a time (latency, not throughput), greedy, `max_tokens` 16 with
`ignore_eos`, streamed with the official `openai` client, with logprobs so TTFT times the first token (random
weights often give tokens with no text yet). Printed: per turn the median TTFT and E2E of each system and the ratio
dvd-serve / vLLM, and each system's later-turn TTFT as a share of its first turn's; for dvd-serve also the vision cache's hits and the prefix cache's share of prompt tokens over
the run (from /metrics). One invocation runs both systems in turn on the same cores; writes `multi_turn.json`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dvd_serve.loadtests.bench import BenchConfig, prepare_checkpoints, ratio
from dvd_serve.loadtests.machine import machine_facts
from dvd_serve.loadtests.stage_metrics import fetch_exposition
from dvd_serve.loadtests.systems import SYSTEMS, ServerProcess, ServerSettings, free_port

START_TIMEOUT_S = 600.0
QUESTIONS = ("What is in this picture?", "Describe the colours.", "What is in the top left?", "Summarise it.")


def jpeg_data_url(width: int, height: int, seed: int) -> str:
    """A seeded, photo-like (smooth plus noise) JPEG as a data URL."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def converse(client, model: str, image_url: str, turns: int, max_tokens: int) -> list[tuple[float, float]]:
    """One conversation; per turn (TTFT, E2E) in seconds, measured at the client."""
    messages: list[dict] = []
    timings = []
    for turn in range(turns):
        content: list[dict] = [{"type": "text", "text": QUESTIONS[turn % len(QUESTIONS)]}]
        if turn == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        messages.append({"role": "user", "content": content})
        started = time.perf_counter()
        first = None
        text = ""
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0.0, stream=True, logprobs=True,
                                                    extra_body={"ignore_eos": True}):
            for choice in chunk.choices:
                if choice.logprobs and choice.logprobs.content:
                    first = first or time.perf_counter()
                text += choice.delta.content or ""
        finished = time.perf_counter()
        timings.append(((first or finished) - started, finished - started))
        messages.append({"role": "assistant", "content": text})
    return timings


def run_system(key: str, model: Path, images: list[str], size: tuple[int, int], turns: int, max_tokens: int,
               out: Path) -> dict:
    import openai

    spec = SYSTEMS[key]
    port = free_port()
    name = "vllm" if key == "a" else "dvd-serve"
    settings = ServerSettings(max_model_len=8192)
    with ServerProcess(spec.label, spec.command(model, port, settings), port, spec.ready_path,
                       out / "logs" / f"{name}.log", env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as server:
        print(f"{name}: ready in {server.start(START_TIMEOUT_S):.1f} s", file=sys.stderr)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=300)
        served = client.models.list().data[0].id
        converse(client, served, jpeg_data_url(*size, seed=10_000), 2, max_tokens)  # warm-up, own image
        per_turn: list[list[tuple[float, float]]] = [[] for _ in range(turns)]
        for image in images:
            for turn, timing in enumerate(converse(client, served, image, turns, max_tokens)):
                per_turn[turn].append(timing)
        caches = cache_counters(server.base_url) if key != "a" else {}
    result = {
        "system": name,
        "ttft_p50_ms": [statistics.median(t for t, _ in turn) * 1000 for turn in per_turn],
        "e2e_p50_ms": [statistics.median(e for _, e in turn) * 1000 for turn in per_turn],
        "caches": caches,
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def cache_counters(base_url: str) -> dict[str, float]:
    """The vision cache's hits and misses and the prefix cache's queried and cached tokens, from /metrics."""
    lines = fetch_exposition(base_url, timeout_s=30).splitlines()

    def total(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    return {
        "vision_cache_hits": total('dvd_vision_cache_lookups_total{result="hit"}'),
        "vision_cache_misses": total('dvd_vision_cache_lookups_total{result="miss"}'),
        "prefix_cache_queries": total("vllm:prefix_cache_queries_total{"),
        "prefix_cache_hits": total("vllm:prefix_cache_hits_total{"),
    }


def report(results: dict[str, dict], facts: dict, args: argparse.Namespace) -> str:
    vllm, dvd = results.get("vllm"), results.get("dvd-serve")
    lines = [
        f"Machine: {facts.get('cpu', '?')}, {facts.get('cores', '?')} cores; measured {facts.get('date_utc', '?')} "
        f"UTC; shape {args.shape}, {args.conversations} conversations x {args.turns} turns, {args.image_size} JPEG.",
        "",
        "| turn | system | TTFT p50 ms | TTFT / turn 1 | E2E p50 ms | TTFT, E2E dvd / vLLM |",
        "|---|---|---|---|---|---|",
    ]
    for turn in range(args.turns):
        for name, result in results.items():
            ttft, e2e = result["ttft_p50_ms"][turn], result["e2e_p50_ms"][turn]
            versus = ""
            if name == "dvd-serve" and vllm is not None:
                versus = f"{ratio(ttft, vllm['ttft_p50_ms'][turn]):.2f}x, {ratio(e2e, vllm['e2e_p50_ms'][turn]):.2f}x"
            lines.append(f"| {turn + 1} | {name} | {ttft:.0f} | {ratio(ttft, result['ttft_p50_ms'][0]):.2f} "
                         f"| {e2e:.0f} | {versus} |")
    caches = (dvd or {}).get("caches", {})
    if caches:
        lines += ["", f"dvd-serve caches over the run: vision {caches['vision_cache_hits']:.0f} hits / "
                  f"{caches['vision_cache_misses']:.0f} misses; prefix cache held "
                  f"{ratio(caches['prefix_cache_hits'], caches['prefix_cache_queries']):.2f} of the prompt tokens."]
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 2048x1536; got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="multi-turn-results", help="output folder")
    parser.add_argument("--shape", default="tiny", help="checkpoint shape (make-checkpoint --shape)")
    parser.add_argument("--conversations", type=int, default=6, help="conversations, one image each")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (ignore_eos)")
    parser.add_argument("--image-size", type=_size, default=(2048, 1536), help="WIDTHxHEIGHT of each JPEG")
    parser.add_argument("--systems", default="vllm,dvd-serve", help="comma-separated among vllm, dvd-serve")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [name.strip() for name in args.systems.split(",") if name.strip()]
    keys = {"vllm": "a", "dvd-serve": "c"}
    if not wanted or set(wanted) - set(keys):
        parser.error(f"--systems must name some of {', '.join(keys)}")
    model = prepare_checkpoints(BenchConfig(shape=args.shape, seed=0, systems=("a", "c")),
                                lambda line: print(line, file=sys.stderr))["chat"]
    images = [jpeg_data_url(*args.image_size, seed=seed) for seed in range(args.conversations)]
    results = {name: run_system(keys[name], model, images, args.image_size, args.turns, args.max_tokens, out)
               for name in keys if name in wanted}
    facts = machine_facts()
    (out / "multi_turn.json").write_text(json.dumps({"machine": facts, "args": vars(args), **results}, indent=2))
    args.image_size = "x".join(map(str, args.image_size))
    print(report(results, facts, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
