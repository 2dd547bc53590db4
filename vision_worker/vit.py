"""InternViT (the 300M and 6B variants) as plain torch, with the original checkpoint's parameter names.

Parameter names follow the original `InternVLChatModel` layout below the `vision_model.` prefix
(`embeddings.patch_embedding`, `encoder.layers.N.attn.qkv`, ...); transformers-native checkpoints are renamed
onto it by `vision_worker.vision_weights`. Attention goes through `F.scaled_dot_product_attention`, which picks
the fused flash / memory-efficient kernel on GPU.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dvd_serve.common.config import FrozenConfig


class VitConfig(FrozenConfig):
    """Dimensions of an InternViT tower, read from a checkpoint's vision config."""

    hidden_size: int = Field(description="Width of every ViT token (1024 for InternViT-300M, 3200 for InternViT-6B).")
    num_layers: int = Field(description="Number of transformer blocks.")
    num_heads: int = Field(description="Attention heads per block.")
    intermediate_size: int = Field(description="Hidden width of each block's MLP.")
    image_size: int = Field(default=448, description="Tile side in pixels.")
    patch_size: int = Field(default=14, description="Patch side in pixels; a 448 tile gives (448/14)^2 = 1024 tokens.")
    qkv_bias: bool = Field(default=True, description="Whether the fused qkv projection has a bias.")
    qk_norm: bool = Field(default=False, description="RMS-normalise q and k over the full width (InternViT-6B).")
    norm_type: Literal["layer_norm", "rms_norm"] = Field(default="layer_norm", description="Block norm kind.")
    layer_norm_eps: float = Field(default=1e-6, description="Epsilon of every norm in the tower.")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the reference InternViT-6B does."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(config: VitConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class VitEmbeddings(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.patches_per_side**2 + 1, width))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [tiles, 3, 448, 448] -> patches: [tiles, 1024, vit]
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class VitAttention(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.proj = nn.Linear(width, width)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(width, config.layer_norm_eps)
            self.k_norm = RMSNorm(width, config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [tiles, tokens, vit]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        head_dim = width // self.num_heads
        q, k, v = (t.reshape(tiles, tokens, self.num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [tiles, heads, tokens, head_dim]
        return self.proj(out.transpose(1, 2).reshape(tiles, tokens, width))


class VitMlp(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitLayer(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = VitAttention(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.norm2 = _norm(config)
        self.mlp = VitMlp(config)
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VitEncoder(nn.Module):
    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VitLayer(config) for _ in range(config.num_layers))


class InternViT(nn.Module):
    """Tiles in, patch tokens of one layer out (CLS dropped)."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VitEmbeddings(config)
        self.encoder = VitEncoder(config)

    def forward(self, pixels: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """pixels: [tiles, 3, 448, 448] -> [tiles, 1024, vit], the output of block `select_layer` (python index)."""
        layers = self.encoder.layers
        stop = select_layer % len(layers) + 1
        x = self.embeddings(pixels)
        for layer in layers[:stop]:
            x = layer(x)
        return x[:, 1:, :]
