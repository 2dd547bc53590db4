"""`pooling_before_gating`: one learned query attends over a tile's ViT tokens and yields one vector per tile.

Published forward (Flash `modeling_internvl_chat.py`, `CrossAttentionPooling`): the query token is expanded to
every tile, then `norm1(attn1(query, x, x))`, then `norm2(attn2(prev, x, x))` applied three times in a row with
the same attn2/norm2 weights. No residual connections. attn3, attn4, norm3 and norm4 are loaded but never used.
The output is the last normalised query, `[tiles, vit]`.

Every attention here has a single query, so the key and value projections of the 1024 tokens are folded into
the query side: scores need `W_k^T q` (one vector per head) instead of projecting every token, and the value
projection is applied once to the attention-weighted token mean. This is the same function as
`nn.MultiheadAttention(q, x, x)` up to float rounding, at about 1/60 of the work for vit width 1024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvd_serve.router.config import POOLING_HEADS

# The published forward applies attn2/norm2 this many times after attn1/norm1.
ATTN2_REPEATS = 3


def single_query_attention(attn: nn.MultiheadAttention, query: Tensor, tokens: Tensor) -> Tensor:
    """`attn(query, tokens, tokens)` for one query per tile, with the projections folded onto the query.

    query: [tiles, vit]; tokens: [tiles, n, vit] -> [tiles, vit].
    """
    tiles, width = query.shape
    heads = attn.num_heads
    head_dim = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # each [vit, vit], rows grouped by head
    b_q, _, b_v = attn.in_proj_bias.chunk(3)
    # The key bias adds q·b_k to every score of a head alike, so softmax removes it.
    q = F.linear(query, w_q, b_q).view(tiles, heads, head_dim) * head_dim**-0.5
    q_in_token_space = torch.einsum("thd,hdv->thv", q, w_k.view(heads, head_dim, width))  # [tiles, heads, vit]
    scores = torch.einsum("thv,tnv->thn", q_in_token_space, tokens)  # [tiles, heads, n]
    weights = scores.float().softmax(dim=-1).to(tokens.dtype)
    mixed_tokens = torch.einsum("thn,tnv->thv", weights, tokens)  # [tiles, heads, vit]
    # The weights of a head sum to 1, so the value bias passes through unchanged.
    values = torch.einsum("thv,hdv->thd", mixed_tokens, w_v.view(heads, head_dim, width)) + b_v.view(heads, head_dim)
    return attn.out_proj(values.reshape(tiles, width))


class CrossAttentionPooling(nn.Module):
    """Parameters named as in the checkpoint: `query_token`, `attn{1..4}.*`, `norm{1..4}.*`."""

    def __init__(self, vit_hidden_size: int) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.empty(1, vit_hidden_size))
        for index in range(1, 5):
            self.add_module(f"attn{index}", nn.MultiheadAttention(vit_hidden_size, POOLING_HEADS, batch_first=True))
            self.add_module(f"norm{index}", nn.LayerNorm(vit_hidden_size))

    def forward(self, vit_tokens: Tensor) -> Tensor:
        """vit_tokens: [tiles, n, vit] (CLS dropped; token order does not matter) -> pooled [tiles, vit]."""
        query = self.query_token.expand(vit_tokens.shape[0], -1)
        pooled = self.norm1(single_query_attention(self.attn1, query, vit_tokens))
        for _ in range(ATTN2_REPEATS):
            pooled = self.norm2(single_query_attention(self.attn2, pooled, vit_tokens))
        return pooled
