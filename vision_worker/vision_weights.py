"""Reads the vision-side tensors of a checkpoint (either format) under one set of names.

Only the ViT, the projector(s) and the router are read; language-model tensors are never opened. Names come out
in the original format's layout without the `vision_model.` prefix for the ViT (`embeddings.*`, `encoder.*`),
and `mlp1.*`, `mlp2.*`, `pooling_before_gating.*`, `gating.*` for the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.checkpoint.weights import load_tensors

CHAT_VISION_PREFIXES = ("vision_model.", "mlp1.", "mlp2.", "pooling_before_gating.", "gating.")
HF_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")

# transformers-native name (after `model.vision_tower.` / `model.`) -> original name
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"encoder.layers.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.lambda_1$", r"encoder.layers.\1.ls1"),
    (r"^encoder\.layer\.(\d+)\.lambda_2$", r"encoder.layers.\1.ls2"),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def load_vision_tensors(path: str | Path, spec: CheckpointSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All vision-side tensors of the checkpoint at `path`, renamed to the original layout, cast to `dtype`."""
    if spec.fmt == "chat":
        raw = load_tensors(path, CHAT_VISION_PREFIXES, dtype=dtype)
        return {name.removeprefix("vision_model."): tensor for name, tensor in raw.items()}
    raw = load_tensors(path, HF_VISION_PREFIXES, dtype=dtype)
    return _rename_hf(raw)


def _rename_hf(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for full_name, tensor in raw.items():
        name = full_name.removeprefix("model.").removeprefix("vision_tower.")
        qkv = _HF_QKV.match(name)
        if qkv:
            layer, which, kind = qkv.groups()
            qkv_parts.setdefault((layer, kind), {})[which] = tensor
            continue
        for pattern, replacement in _HF_RENAMES:
            new_name, count = re.subn(pattern, replacement, name)
            if count:
                renamed[new_name] = tensor
                break
        else:
            raise ValueError(f"unexpected vision tensor in checkpoint: {full_name}")
    for (layer, kind), parts in qkv_parts.items():
        # The original format fuses q, k and v row-wise: qkv.weight is [3*vit, vit].
        renamed[f"encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return renamed
