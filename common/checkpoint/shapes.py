"""Named InternVL3.5 model shapes: the vision encoder and language model dimensions of each size we generate.

Published dimensions (InternVL3.5 paper Table 1 and the model cards; Qwen3 and InternViT config.json files):
InternViT-300M (1B/2B/8B) is 1024 wide, 24 layers, 16 heads, MLP 4096, qkv bias, LayerNorm; InternViT-6B (38B) is
3200 wide, 45 layers, 25 heads, MLP 12800, no qkv bias, qk-RMSNorm, RMSNorm. Qwen3 LLMs use head_dim 128, 8 KV
heads, 151936 vocabulary rows, rope_theta 1e6 and 40960 positions. `tiny` is our own test size (fast on CPU, with
a head_dim that vLLM's CPU attention supports).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dvd_serve.common.config import FrozenConfig

QWEN3_VOCAB_ROWS = 151936
VOCAB_ROW_MULTIPLE = 64


class VisionShape(FrozenConfig):
    """InternViT dimensions."""

    hidden_size: int = Field(description="Width of every ViT token.")
    num_layers: int = Field(description="Number of encoder layers.")
    num_heads: int = Field(description="Attention heads per layer.")
    intermediate_size: int = Field(description="Hidden width of each layer's MLP.")
    qkv_bias: bool = Field(description="Whether the fused qkv projection has a bias (300M: yes, 6B: no).")
    qk_normalization: bool = Field(description="RMSNorm on queries and keys (InternViT-6B only).")
    norm_type: Literal["layer_norm", "rms_norm"] = Field(description="Normalisation used by norm1/norm2.")
    layer_norm_eps: float = Field(default=1e-6, description="Epsilon of every vision norm.")
    image_size: int = Field(default=448, description="Side of one square tile in pixels.")
    patch_size: int = Field(default=14, description="Side of one ViT patch in pixels.")

    @property
    def num_positions(self) -> int:
        """Patches per tile plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class LanguageShape(FrozenConfig):
    """Qwen3 decoder dimensions."""

    hidden_size: int = Field(description="Width of the residual stream and of every image embedding row.")
    num_layers: int = Field(description="Number of decoder layers.")
    num_heads: int = Field(description="Query heads per layer.")
    num_kv_heads: int = Field(description="Key/value heads per layer (grouped-query attention).")
    head_dim: int = Field(description="Width of one attention head.")
    intermediate_size: int = Field(description="Hidden width of each layer's gated MLP.")
    vocab_size: int | None = Field(
        description="Embedding rows; None means the bundled tokenizer's size rounded up to a multiple of 64."
    )
    rope_theta: float = Field(default=1_000_000.0, description="RoPE base frequency.")
    max_position_embeddings: int = Field(default=40960, description="Longest supported sequence.")
    rms_norm_eps: float = Field(default=1e-6, description="Epsilon of every RMSNorm.")

    def vocab_rows(self, tokenizer_size: int) -> int:
        """Rows of the embedding matrix and of lm_head for a tokenizer of `tokenizer_size` tokens."""
        if self.vocab_size is not None:
            if self.vocab_size < tokenizer_size:
                raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer ({tokenizer_size})")
            return self.vocab_size
        return -(-tokenizer_size // VOCAB_ROW_MULTIPLE) * VOCAB_ROW_MULTIPLE


class ModelShape(FrozenConfig):
    """One InternVL3.5 size: vision encoder plus language model."""

    name: str = Field(description="Shape name used on the command line and in folder names.")
    vision: VisionShape = Field(description="Vision encoder dimensions.")
    language: LanguageShape = Field(description="Language model dimensions.")


_INTERN_VIT_300M = VisionShape(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
    qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
)
_INTERN_VIT_6B = VisionShape(
    hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
    qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
)


def _qwen3(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> LanguageShape:
    return LanguageShape(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=intermediate_size,
        vocab_size=QWEN3_VOCAB_ROWS,
    )


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        vision=VisionShape(
            hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
            qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
        ),
        language=LanguageShape(
            hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, intermediate_size=256,
            vocab_size=None,
        ),
    ),
    "1b": ModelShape(name="1b", vision=_INTERN_VIT_300M, language=_qwen3(1024, 28, 16, 3072)),
    "2b": ModelShape(name="2b", vision=_INTERN_VIT_300M, language=_qwen3(2048, 28, 16, 6144)),
    "8b": ModelShape(name="8b", vision=_INTERN_VIT_300M, language=_qwen3(4096, 36, 32, 12288)),
    "38b": ModelShape(name="38b", vision=_INTERN_VIT_6B, language=_qwen3(5120, 64, 64, 25600)),
}


def get_shape(shape: str | ModelShape) -> ModelShape:
    """The named shape, or `shape` itself when a custom `ModelShape` is given."""
    if isinstance(shape, ModelShape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}") from None
