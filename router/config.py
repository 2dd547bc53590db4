"""Router configuration: the Flash thresholds, the ViT width and the default detail policy.

`Detail` is the project's `image_url.detail` enum (`dvd_serve.common.chat`), re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from dvd_serve.common.chat import Detail
from dvd_serve.common.config import FrozenConfig

# The published CrossAttentionPooling hard-codes 16 heads; the checkpoint config does not record it.
POOLING_HEADS = 16


class RouterConfig(FrozenConfig):
    """Settings of the Visual Resolution Router of one Flash checkpoint."""

    vit_hidden_size: int = Field(
        gt=0, description="Width of the ViT output the router reads (`vision_config.hidden_size`)."
    )
    relative_threshold: float = Field(
        ge=0.0,
        le=1.0,
        description="Quantile level over a request's p0 values; a tile must lie strictly above that quantile "
        "to be compressed (`flash_relative_threshold`).",
    )
    absolute_threshold: float = Field(
        ge=0.0,
        le=1.0,
        description="Least p0 a tile needs to be compressed (`flash_absolute_threshold`, compared with >=).",
    )
    default_detail: Detail = Field(
        default=Detail.AUTO,
        description="Policy for images that name none: auto = the rule, high = 256 tokens, low = 64 tokens.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> RouterConfig:
        if self.vit_hidden_size % POOLING_HEADS:
            raise ValueError(
                f"vit_hidden_size {self.vit_hidden_size} is not divisible by the router's {POOLING_HEADS} "
                "attention heads; the published pooling module cannot be built for this width"
            )
        return self

    @classmethod
    def from_checkpoint_config(cls, config: Mapping[str, Any], **overrides: Any) -> RouterConfig:
        """Reads an original-format Flash `config.json` (as a dict); keyword overrides win over its values."""
        values: dict[str, Any] = {}
        vision_config = config.get("vision_config") or {}
        if "hidden_size" in vision_config:
            values["vit_hidden_size"] = vision_config["hidden_size"]
        for field, key in (
            ("relative_threshold", "flash_relative_threshold"),
            ("absolute_threshold", "flash_absolute_threshold"),
        ):
            if key in config:
                values[field] = config[key]
        values.update(overrides)
        absent = sorted({"vit_hidden_size", "relative_threshold", "absolute_threshold"} - values.keys())
        if absent:
            raise ValueError(
                f"checkpoint config lacks what the router needs ({', '.join(absent)}); a Flash checkpoint "
                "carries `flash_relative_threshold`, `flash_absolute_threshold` and `vision_config.hidden_size`"
            )
        return cls(**values)
