"""`VisualResolutionRouter`: checkpoint tensors -> per-tile p0 -> per-request 256/64 decisions.

Input: the ViT's LAST layer output with the CLS token dropped and before any pixel shuffle, `[tiles, 1024, vit]`
(the Flash reference's `extract_feature_flash` reads `last_hidden_state[:, 1:, :]` whatever `select_layer`
says). Each tile is pooled on its own (the reference passes a split of one tile per sample).

Sources (read, not copied): `modeling_internvl_chat.py` shipped in the OpenGVLab `InternVL3_5-*-Flash`
checkpoints (`CrossAttentionPooling`, `Gating`, `extract_feature_flash`, `generate_flash`); InternLM/lmdeploy
`lmdeploy/pytorch/models/internvl.py` (commit 732a274, same modules and rule); unmerged community ports to
transformers (`InternvlFlashCrossAttentionPooling`), which chain attn1..attn4 and norm1..norm4 instead of
repeating attn2/norm2. The ports disagree with the checkpoint; the checkpoint's own file is followed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dvd_serve.common.chat import Detail
from dvd_serve.router.config import RouterConfig
from dvd_serve.router.decision import route_batch, split_by_detail
from dvd_serve.router.gating import Gating
from dvd_serve.router.pooling import CrossAttentionPooling


class VisualResolutionRouter(nn.Module):
    """Holds `pooling_before_gating` and `gating` under their checkpoint names."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.pooling_before_gating = CrossAttentionPooling(config.vit_hidden_size)
        self.gating = Gating(config.vit_hidden_size)

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor], config: RouterConfig) -> VisualResolutionRouter:
        """Adopts the checkpoint tensors (names `pooling_before_gating.*`, `gating.*`) without copying them.

        Raises ValueError naming every missing, unexpected or mis-shaped tensor, or on mixed / non-float dtypes.
        The router computes in the tensors' dtype (attention and gate softmax in float32).
        """
        with torch.device("meta"):
            router = cls(config)
        expected = {name: tuple(value.shape) for name, value in router.state_dict().items()}
        problems = [f"missing tensor {name} {shape}" for name, shape in expected.items() if name not in tensors]
        problems += [f"unexpected tensor {name}" for name in tensors if name not in expected]
        problems += [
            f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
            for name, shape in expected.items()
            if name in tensors and tuple(tensors[name].shape) != shape
        ]
        dtypes = {value.dtype for value in tensors.values()}
        if len(dtypes) > 1 or not all(dtype.is_floating_point for dtype in dtypes):
            problems.append(f"router tensors must share one floating dtype, got {sorted(map(str, dtypes))}")
        if problems:
            raise ValueError(
                f"router weights do not fit vit_hidden_size {config.vit_hidden_size}: " + "; ".join(problems)
            )
        router.load_state_dict(dict(tensors), strict=True, assign=True)
        return router.requires_grad_(False).eval()

    @torch.inference_mode()
    def compress_probability(self, vit_tokens: Tensor) -> Tensor:
        """vit_tokens: [tiles, n, vit] -> p0 [tiles] in float32 (probability that 64 tokens suffice)."""
        if vit_tokens.dim() != 3 or vit_tokens.shape[-1] != self.config.vit_hidden_size or vit_tokens.shape[1] == 0:
            raise ValueError(
                f"vit_tokens must be [tiles, tokens, {self.config.vit_hidden_size}], got {tuple(vit_tokens.shape)}"
            )
        weight = self.pooling_before_gating.query_token
        # The reference casts the ViT output to the router's dtype before pooling.
        pooled = self.pooling_before_gating(vit_tokens.to(device=weight.device, dtype=weight.dtype))
        return self.gating(pooled)[:, 0]

    def route(
        self,
        vit_tokens: Tensor,
        tiles_per_image: Sequence[Sequence[int]],
        details: Sequence[Sequence[Detail | str | None]] | None = None,
    ) -> Tensor:
        """Tiles of several requests laid end to end -> bool [tiles] on the CPU (True = 64 tokens).

        `tiles_per_image[r][i]` and `details[r][i]` describe image i of request r (None or no list: the
        config's default detail). p0 is computed only for `auto` tiles; each request is decided on its own.
        """
        if details is None:
            details = [[None] * len(request) for request in tiles_per_image]
        resolved = [[detail or self.config.default_detail for detail in request] for request in details]
        split = split_by_detail(tiles_per_image, resolved)
        if split.fixed.numel() != vit_tokens.shape[0]:
            raise ValueError(
                f"tiles_per_image covers {split.fixed.numel()} tiles, vit_tokens has {vit_tokens.shape[0]}"
            )
        decisions = split.fixed.clone()
        if split.auto_index.numel():
            p0 = self.compress_probability(vit_tokens[split.auto_index.to(vit_tokens.device)]).cpu()
            decisions[split.auto_index] = route_batch(
                p0, split.auto_tile_counts, self.config.relative_threshold, self.config.absolute_threshold
            )
        return decisions
