"""vLLM's InternVLChatModel, accepting InternVL3.5-Flash checkpoints.

Flash checkpoints add the ViR router (`pooling_before_gating.*`, `gating.*`) and the 64-token projector `mlp2.*`.
The language model never uses them: in dvd-serve the vision service runs them and sends finished embeddings.
This class only skips those tensors while loading; everything else is vLLM's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.internvl import InternVLChatModel

FLASH_ONLY_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


class InternVLFlashChatModel(InternVLChatModel):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        kept = ((name, tensor) for name, tensor in weights if not name.startswith(FLASH_ONLY_PREFIXES))
        return super().load_weights(kept)
