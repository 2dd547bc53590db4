"""The model `dvd-serve serve` runs when given none: a tiny random Flash checkpoint, made once in the user cache.

It lets anyone try the whole stack (gateway, vision pool with the router, language pool) in a minute on a laptop.
Its weights are random, so its answers are noise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHE_ENV = "DVD_SERVE_CACHE"
DEFAULT_MODEL_NAME = "tiny-flash"


def cache_root() -> Path:
    """`$DVD_SERVE_CACHE`, else `~/.cache/dvd-serve`."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "dvd-serve"


def default_model_path() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """The default checkpoint's folder, generated on first use (concurrent first uses are safe)."""
    target = default_model_path()
    if (target / "config.json").exists():
        return target
    from dvd_serve.common.checkpoint.generate import make_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{DEFAULT_MODEL_NAME}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    make_checkpoint(staging, fmt="chat", shape="tiny", flash=True, seed=0)
    try:
        staging.rename(target)
    except OSError:
        # Another process finished first (the target now exists and is not empty): keep theirs.
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target
