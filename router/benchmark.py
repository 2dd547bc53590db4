"""Benchmark: router time per request, the folded single-query attention against nn.MultiheadAttention's forward.

    python -m dvd_serve.router.benchmark --width 1024 --tiles 13 --repeats 5 --dtype float32 --device cpu

Random weights (the cost does not depend on the values). The baseline pools exactly as the published code does,
calling each nn.MultiheadAttention on all tokens; both paths share the same gating. Prints one line per path and
a final JSON line with the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import Tensor

from dvd_serve.router.config import RouterConfig
from dvd_serve.router.pooling import ATTN2_REPEATS, CrossAttentionPooling
from dvd_serve.router.vir import VisualResolutionRouter


def _pool_with_multihead_attention(pooling: CrossAttentionPooling, vit_tokens: Tensor) -> Tensor:
    query = pooling.query_token.expand(vit_tokens.shape[0], -1).unsqueeze(1)  # [tiles, 1, vit]
    pooled = pooling.norm1(pooling.attn1(query, vit_tokens, vit_tokens, need_weights=False)[0])
    for _ in range(ATTN2_REPEATS):
        pooled = pooling.norm2(pooling.attn2(pooled, vit_tokens, vit_tokens, need_weights=False)[0])
    return pooled.squeeze(1)


def _seconds(run, repeats: int, device: torch.device) -> list[float]:
    timings = []
    for _ in range(repeats + 1):  # the first call warms up and is dropped
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return timings[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="ViT width (1024: InternViT-300M, 3200: 6B)")
    parser.add_argument("--tiles", type=int, default=13, help="tiles of one request (13 = 12 + thumbnail)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    router = VisualResolutionRouter(RouterConfig(vit_hidden_size=args.width, relative_threshold=0.5,
                                                 absolute_threshold=0.0))
    torch.nn.init.normal_(router.pooling_before_gating.query_token)
    router = router.to(device=device, dtype=dtype).eval()
    vit_tokens = torch.randn(args.tiles, 1024, args.width, device=device, dtype=dtype)

    with torch.inference_mode():
        folded_p0 = router.compress_probability(vit_tokens)
        baseline_p0 = router.gating(_pool_with_multihead_attention(router.pooling_before_gating, vit_tokens))[:, 0]
        folded = _seconds(lambda: router.compress_probability(vit_tokens), args.repeats, device)
        baseline = _seconds(
            lambda: router.gating(_pool_with_multihead_attention(router.pooling_before_gating, vit_tokens)),
            args.repeats,
            device,
        )
    result = {
        "width": args.width,
        "tiles": args.tiles,
        "dtype": args.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "folded_ms_median": round(1000 * sorted(folded)[len(folded) // 2], 3),
        "multihead_attention_ms_median": round(1000 * sorted(baseline)[len(baseline) // 2], 3),
        "p0_max_abs_diff": (folded_p0 - baseline_p0).abs().max().item(),
    }
    print(f"folded single-query attention: {result['folded_ms_median']} ms per {args.tiles}-tile request")
    print(f"nn.MultiheadAttention forward: {result['multihead_attention_ms_median']} ms per {args.tiles}-tile request")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
