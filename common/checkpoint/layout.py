"""Every tensor of an InternVL3.5 checkpoint: canonical name, shape, initialisation, and its names in each format.

Canonical names are the original ("chat") format's names. The transformers-native ("hf") format renames them and
splits the fused vision `attn.qkv` into `q_proj`/`k_proj`/`v_proj` (its row blocks, in that order). Names were
checked against transformers' `InternVLForConditionalGeneration.state_dict()`, vLLM's `intern_vit.py`,
`internvl.py` and `interns1.py` (its `hf_to_vllm_mapper`), and the Flash checkpoints' `modeling_internvl_chat.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from dvd_serve.common.checkpoint.shapes import ModelShape

# linear: normal with std 1/sqrt(fan_in); embedding and bias: normal(0, 0.02); layer_scale: uniform [0.1, 1].
Init = Literal["linear", "embedding", "bias", "zeros", "ones", "layer_scale"]
DOWNSAMPLE_RATIO = 0.5
FLASH_POOLING_NORMS = 4
FLASH_GATING_BLOCKS = 4
FLASH_GATING_EXPANSION = 4


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor to generate, under its canonical (original-format) name."""

    name: str
    shape: tuple[int, ...]
    init: Init

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True, slots=True)
class OutputPiece:
    """A tensor as written in one format: a name and, for split tensors, the block of rows it takes."""

    name: str
    row_block: int | None = None
    row_blocks: int = 1


def _linear(prefix: str, out_features: int, in_features: int, *, bias: bool = True) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{prefix}.weight", (out_features, in_features), "linear")
    if bias:
        yield TensorSpec(f"{prefix}.bias", (out_features,), "bias")


def _norm(prefix: str, width: int, *, with_bias: bool = True) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{prefix}.weight", (width,), "ones")
    if with_bias:
        yield TensorSpec(f"{prefix}.bias", (width,), "zeros")


def vision_tensors(shape: ModelShape) -> Iterator[TensorSpec]:
    """InternViT: embeddings and encoder layers (`vision_model.*`)."""
    vit = shape.vision
    width = vit.hidden_size
    has_norm_bias = vit.norm_type == "layer_norm"
    yield TensorSpec("vision_model.embeddings.class_embedding", (1, 1, width), "embedding")
    yield TensorSpec(
        "vision_model.embeddings.patch_embedding.weight", (width, 3, vit.patch_size, vit.patch_size), "linear"
    )
    yield TensorSpec("vision_model.embeddings.patch_embedding.bias", (width,), "bias")
    yield TensorSpec("vision_model.embeddings.position_embedding", (1, vit.num_positions, width), "embedding")
    for index in range(vit.num_layers):
        layer = f"vision_model.encoder.layers.{index}"
        yield from _linear(f"{layer}.attn.qkv", 3 * width, width, bias=vit.qkv_bias)
        if vit.qk_normalization:
            yield from _norm(f"{layer}.attn.q_norm", width, with_bias=False)
            yield from _norm(f"{layer}.attn.k_norm", width, with_bias=False)
        yield from _linear(f"{layer}.attn.proj", width, width)
        yield from _linear(f"{layer}.mlp.fc1", vit.intermediate_size, width)
        yield from _linear(f"{layer}.mlp.fc2", width, vit.intermediate_size)
        yield from _norm(f"{layer}.norm1", width, with_bias=has_norm_bias)
        yield from _norm(f"{layer}.norm2", width, with_bias=has_norm_bias)
        yield TensorSpec(f"{layer}.ls1", (width,), "layer_scale")
        yield TensorSpec(f"{layer}.ls2", (width,), "layer_scale")


def projector_tensors(shape: ModelShape) -> Iterator[TensorSpec]:
    """`mlp1`: LayerNorm, Linear, GELU, Linear from pixel-shuffled ViT tokens to the LLM width."""
    shuffled = shape.vision.hidden_size * int(1 / DOWNSAMPLE_RATIO) ** 2
    llm = shape.language.hidden_size
    yield from _norm("mlp1.0", shuffled)
    yield from _linear("mlp1.1", llm, shuffled)
    yield from _linear("mlp1.3", llm, llm)


def flash_tensors(shape: ModelShape) -> Iterator[TensorSpec]:
    """Flash additions: `mlp2` (64-token projector), `pooling_before_gating` and `gating` (the ViR router)."""
    vit = shape.vision.hidden_size
    llm = shape.language.hidden_size
    shuffled = vit * int(1 / DOWNSAMPLE_RATIO) ** 4
    yield from _norm("mlp2.0", shuffled)
    yield from _linear("mlp2.1", 2 * llm, shuffled)
    yield from _linear("mlp2.4", 2 * llm, 2 * llm)
    yield from _linear("mlp2.7", llm, 2 * llm)
    yield TensorSpec("pooling_before_gating.query_token", (1, vit), "embedding")
    for index in range(1, FLASH_POOLING_NORMS + 1):
        attn = f"pooling_before_gating.attn{index}"
        yield TensorSpec(f"{attn}.in_proj_weight", (3 * vit, vit), "linear")
        yield TensorSpec(f"{attn}.in_proj_bias", (3 * vit,), "bias")
        yield from _linear(f"{attn}.out_proj", vit, vit)
        yield from _norm(f"pooling_before_gating.norm{index}", vit)
    wide = FLASH_GATING_EXPANSION * vit
    for index in range(1, FLASH_GATING_BLOCKS + 1):
        block = f"gating.block{index}"
        yield from _linear(f"{block}.0", wide, vit)
        yield from _linear(f"{block}.3", vit, wide)
        yield from _norm(f"{block}.5", vit)
    yield from _norm("gating.gate.0", vit)
    yield from _linear("gating.gate.1", 2, vit)


def language_tensors(shape: ModelShape, vocab_rows: int) -> Iterator[TensorSpec]:
    """Qwen3 decoder (`language_model.model.*`) and its output head (`language_model.lm_head`)."""
    lm = shape.language
    width = lm.hidden_size
    yield TensorSpec("language_model.model.embed_tokens.weight", (vocab_rows, width), "embedding")
    for index in range(lm.num_layers):
        layer = f"language_model.model.layers.{index}"
        yield from _linear(f"{layer}.self_attn.q_proj", lm.num_heads * lm.head_dim, width, bias=False)
        yield from _linear(f"{layer}.self_attn.k_proj", lm.num_kv_heads * lm.head_dim, width, bias=False)
        yield from _linear(f"{layer}.self_attn.v_proj", lm.num_kv_heads * lm.head_dim, width, bias=False)
        yield from _linear(f"{layer}.self_attn.o_proj", width, lm.num_heads * lm.head_dim, bias=False)
        yield from _norm(f"{layer}.self_attn.q_norm", lm.head_dim, with_bias=False)
        yield from _norm(f"{layer}.self_attn.k_norm", lm.head_dim, with_bias=False)
        yield from _linear(f"{layer}.mlp.gate_proj", lm.intermediate_size, width, bias=False)
        yield from _linear(f"{layer}.mlp.up_proj", lm.intermediate_size, width, bias=False)
        yield from _linear(f"{layer}.mlp.down_proj", width, lm.intermediate_size, bias=False)
        yield from _norm(f"{layer}.input_layernorm", width, with_bias=False)
        yield from _norm(f"{layer}.post_attention_layernorm", width, with_bias=False)
    yield from _norm("language_model.model.norm", width, with_bias=False)
    yield from _linear("language_model.lm_head", vocab_rows, width, bias=False)


def checkpoint_tensors(shape: ModelShape, vocab_rows: int, *, flash: bool) -> Iterator[TensorSpec]:
    """All tensors of one checkpoint, vision side first, one at a time (nothing is allocated here)."""
    yield from vision_tensors(shape)
    yield from projector_tensors(shape)
    if flash:
        yield from flash_tensors(shape)
    yield from language_tensors(shape, vocab_rows)


# Canonical -> transformers-native renames: name prefixes outside the ViT encoder layers, and the parts of a layer.
_HF_PREFIXES = (
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    ("mlp1.0.", "model.multi_modal_projector.layer_norm."),
    ("mlp1.1.", "model.multi_modal_projector.linear_1."),
    ("mlp1.3.", "model.multi_modal_projector.linear_2."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
_HF_VISION_LAYER_PARTS = (  # first match wins: attn.proj before attn
    ("attn.proj.", "attention.projection_layer."),
    ("attn.", "attention."),
    ("mlp.", "mlp."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("ls1", "lambda_1"),
    ("ls2", "lambda_2"),
)
_VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(?P<index>\d+)\.(?P<part>.+)$")
_FUSED_QKV = re.compile(r"^(?P<layer>vision_model\.encoder\.layers\.\d+)\.attn\.qkv\.(?P<kind>weight|bias)$")


def output_pieces(name: str, fmt: Literal["hf", "chat"]) -> tuple[OutputPiece, ...]:
    """How the canonical tensor `name` is written in format `fmt`."""
    if fmt == "chat":
        return (OutputPiece(name),)
    fused = _FUSED_QKV.match(name)
    if fused:
        layer = _hf_name(f"{fused['layer']}.attn.")
        return tuple(
            OutputPiece(f"{layer}{part}_proj.{fused['kind']}", row_block=block, row_blocks=3)
            for block, part in enumerate("qkv")
        )
    return (OutputPiece(_hf_name(name)),)


def _hf_name(name: str) -> str:
    layer = _VISION_LAYER.match(name)
    if layer:
        part = layer["part"]
        for canonical, renamed in _HF_VISION_LAYER_PARTS:
            if part.startswith(canonical):
                return f"model.vision_tower.encoder.layer.{layer['index']}.{renamed}{part[len(canonical):]}"
    else:
        for canonical, renamed in _HF_PREFIXES:
            if name.startswith(canonical):
                return renamed + name[len(canonical):]
    raise ValueError(f"tensor {name!r} has no transformers-native name")
