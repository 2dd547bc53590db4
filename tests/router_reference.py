"""Test-only reference of the published ViR algorithm, written independently of `dvd_serve.router`.

It reads the same checkpoint-named state dict but shares no code with the product modules: float64 throughout,
one tile at a time, explicit per-head q/k/v projections of every token, hand-written softmax, layer norm (eps 1e-5,
nn.LayerNorm's default used by the published modules) and exact-erf GELU, and a quantile by sorting and linear
interpolation. The product instead folds the single-query attention and uses torch's nn modules and
torch.quantile.

Published algorithm (Flash `modeling_internvl_chat.py`): per tile, q = query_token; q = norm1(mha1(q, X, X));
three times q = norm2(mha2(q, X, X)); then x = pooled, x += block_k(x) for k in 1..4 with
block = LN(Linear(GELU(Linear(x)))), p = softmax(Linear(LN(x))), p0 = p[0]. Decision over one call's tiles:
p0 > quantile(p0, relative) and p0 >= absolute, the quantile in float32 with torch's linear interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

HEADS = 16
LAYER_NORM_EPS = 1e-5


def _weights(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value.double() for name, value in state.items() if name.startswith(prefix)}


def _affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x @ weight.T + bias


def _normalise(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(variance + LAYER_NORM_EPS) * weight + bias


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _keys_values(attn: dict[str, Tensor], tokens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens: [n, width] -> every token's key and value projections, each [n, width]."""
    width = tokens.shape[1]
    packed_weight, packed_bias = attn["in_proj_weight"], attn["in_proj_bias"]
    keys = _affine(tokens, packed_weight[width : 2 * width], packed_bias[width : 2 * width])
    values = _affine(tokens, packed_weight[2 * width :], packed_bias[2 * width :])
    return keys, values


def _attend(attn: dict[str, Tensor], query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """query: [width]; keys, values: [n, width] -> [width]; standard multi-head attention with one query."""
    width = query.shape[0]
    head_dim = width // HEADS
    q = _affine(query, attn["in_proj_weight"][:width], attn["in_proj_bias"][:width]).reshape(HEADS, head_dim)
    per_head_keys = keys.reshape(-1, HEADS, head_dim).transpose(0, 1)  # [heads, n, head_dim]
    per_head_values = values.reshape(-1, HEADS, head_dim).transpose(0, 1)
    scores = (per_head_keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(head_dim)  # [heads, n]
    exps = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    probabilities = exps / exps.sum(dim=-1, keepdim=True)
    mixed = (probabilities.unsqueeze(1) @ per_head_values).reshape(width)  # heads concatenated in order
    return _affine(mixed, attn["out_proj.weight"], attn["out_proj.bias"])


def reference_p0(state: dict[str, Tensor], vit_tokens: Tensor) -> Tensor:
    """vit_tokens: [tiles, n, width] -> p0 [tiles] (float64)."""
    pool = _weights(state, "pooling_before_gating.")
    gating = _weights(state, "gating.")
    attn = {i: {k.split(".", 1)[1]: v for k, v in pool.items() if k.startswith(f"attn{i}.")} for i in (1, 2)}
    p0_values = []
    for tile in vit_tokens.double():
        first, second = _keys_values(attn[1], tile), _keys_values(attn[2], tile)
        x = _normalise(_attend(attn[1], pool["query_token"][0], *first), pool["norm1.weight"], pool["norm1.bias"])
        for _ in range(3):
            x = _normalise(_attend(attn[2], x, *second), pool["norm2.weight"], pool["norm2.bias"])
        for block in ("block1", "block2", "block3", "block4"):
            hidden = _gelu(_affine(x, gating[f"{block}.0.weight"], gating[f"{block}.0.bias"]))
            branch = _affine(hidden, gating[f"{block}.3.weight"], gating[f"{block}.3.bias"])
            x = x + _normalise(branch, gating[f"{block}.5.weight"], gating[f"{block}.5.bias"])
        gate_input = _normalise(x, gating["gate.0.weight"], gating["gate.0.bias"])
        logits = _affine(gate_input, gating["gate.1.weight"], gating["gate.1.bias"])
        p0_values.append(1.0 / (1.0 + torch.exp(logits[1] - logits[0])))  # softmax column 0 of two logits
    return torch.stack(p0_values) if p0_values else torch.zeros(0, dtype=torch.float64)


def reference_quantile(values: list[float], level: float) -> float:
    """Sorted-order linear interpolation; the rank q*(n-1) is formed in float32 as torch.quantile does."""
    ordered = sorted(values)
    rank = float(np.float32(level) * np.float32(len(ordered) - 1))
    below = math.floor(rank)
    above = math.ceil(rank)
    return ordered[below] + (rank - below) * (ordered[above] - ordered[below])


def reference_decisions(p0: list[float], relative: float, absolute: float) -> list[bool]:
    """One call's tiles (one request) -> compress flags."""
    if not p0:
        return []
    cutoff = reference_quantile(p0, relative)
    return [value > cutoff and value >= absolute for value in p0]
