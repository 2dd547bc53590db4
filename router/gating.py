"""`gating`: four residual MLP blocks and a two-way softmax head over the pooled tile vector.

Published forward (Flash `modeling_internvl_chat.py`, `Gating`): `x = x + block_k(x)` for k = 1..4 with
block = [Linear(D, 4D), GELU, Dropout, Linear(4D, D), Dropout, LayerNorm(D)] (the LayerNorm sits inside the
residual branch), then gate = [LayerNorm(D), Linear(D, 2)] and a softmax. Column 0 is p0, the probability that
compressing the tile to 64 tokens is harmless.
"""

from __future__ import annotations

from torch import Tensor, nn

EXPANSION = 4
BLOCKS = 4


def _residual_branch(width: int) -> nn.Sequential:
    # Identity fills the published Dropout slots (no-ops at inference) so the indices stay 0, 3, 5.
    return nn.Sequential(
        nn.Linear(width, width * EXPANSION),
        nn.GELU(),
        nn.Identity(),
        nn.Linear(width * EXPANSION, width),
        nn.Identity(),
        nn.LayerNorm(width),
    )


class Gating(nn.Module):
    """Parameters named as in the checkpoint: `block{1..4}.{0,3,5}.*`, `gate.{0,1}.*`."""

    def __init__(self, vit_hidden_size: int) -> None:
        super().__init__()
        for index in range(1, BLOCKS + 1):
            self.add_module(f"block{index}", _residual_branch(vit_hidden_size))
        self.gate = nn.Sequential(nn.LayerNorm(vit_hidden_size), nn.Linear(vit_hidden_size, 2))

    def forward(self, pooled: Tensor) -> Tensor:
        """pooled: [tiles, vit] -> probabilities [tiles, 2] in float32 (column 0 = compress is harmless)."""
        x = pooled
        for index in range(1, BLOCKS + 1):
            x = x + self.get_submodule(f"block{index}")(x)
        return self.gate(x).float().softmax(dim=-1)
