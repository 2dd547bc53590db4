"""vLLM's InternVL model classes as the language worker needs them (registered by `vllm_plugin`).

Two changes, both at vLLM's supported extension point (out-of-tree model classes):
1. Images of different token counts in one engine step. vLLM 0.32 validates precomputed image embeddings against a
   schema whose feature dimension must agree across the step's images (`TensorShape("n", "f", "h")`); two images
   with different tile counts (or ViR decisions) in the same step raise inside the engine core and kill it. Here
   that dimension is declared dynamic. The embeddings were already validated by the embedding sink (dtype, rank,
   hidden size, finiteness, token counts).
2. Flash checkpoints: their router (`pooling_before_gating.*`, `gating.*`) and 64-token projector (`mlp2.*`) are
   skipped while loading; vLLM otherwise refuses them. The language model is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

import torch
from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration
from vllm.model_executor.models.internvl import InternVLChatModel
from vllm.utils.tensor_schema import TensorSchema, TensorShape

FLASH_ONLY_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


class VariableLengthImageEmbeddings(TensorSchema):
    """Dimensions: n images, f tokens (may differ per image), h hidden size."""

    type: Literal["image_embeds"]
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("n", "f", "h", dynamic_dims={"f"})]


def _embeddings_only(kwargs: dict, pixel_key: str) -> VariableLengthImageEmbeddings | None:
    if kwargs.get(pixel_key) is not None or kwargs.get("image_embeds") is None:
        return None
    kwargs.pop("image_num_patches", None)
    return VariableLengthImageEmbeddings(type="image_embeds", data=kwargs.pop("image_embeds"))


class LanguageOnlyInternVLChatModel(InternVLChatModel):
    """Original-format checkpoints (Flash included)."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        return _embeddings_only(kwargs, "pixel_values_flat") or super()._parse_and_validate_image_input(**kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        kept = ((name, tensor) for name, tensor in weights if not name.startswith(FLASH_ONLY_PREFIXES))
        return super().load_weights(kept)


class LanguageOnlyInternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    """Transformers-native checkpoints (`InternVLForConditionalGeneration`)."""

    def _parse_and_validate_image_input(self, **kwargs: object):
        return _embeddings_only(kwargs, "pixel_values") or super()._parse_and_validate_image_input(**kwargs)
