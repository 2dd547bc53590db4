"""ViR, the InternVL3.5-Flash Visual Resolution Router, as plain torch (no Ray, no protobuf).

`VisualResolutionRouter.from_state_dict(tensors, RouterConfig.from_checkpoint_config(config))` loads the
checkpoint's `pooling_before_gating.*` and `gating.*` tensors; `compress_probability` gives p0 per tile and
`route` / `route_batch` turn p0 into per-request 64-or-256-token decisions.
"""

from dvd_serve.router.config import Detail, RouterConfig
from dvd_serve.router.decision import (
    TOKENS_COMPRESSED,
    TOKENS_FULL,
    DetailSplit,
    decide_compression,
    route_batch,
    split_by_detail,
    tokens_per_tile,
)
from dvd_serve.router.vir import VisualResolutionRouter

__all__ = [
    "TOKENS_COMPRESSED",
    "TOKENS_FULL",
    "Detail",
    "DetailSplit",
    "RouterConfig",
    "VisualResolutionRouter",
    "decide_compression",
    "route_batch",
    "split_by_detail",
    "tokens_per_tile",
]
