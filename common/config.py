"""Base class for every dvd-serve config object: typed, frozen, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenConfig(BaseModel):
    """Immutable, validated configuration. Subclasses give every field a `Field(description=...)`."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
