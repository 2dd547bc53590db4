"""Suite-wide set-up: hermetic caches and offline mode, and the tiny checkpoints every test shares.

Checkpoints are generated once per session (seconds) into a temporary folder. The hf and chat checkpoints are
made from the same seed, so they hold the same numbers under each format's names.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="dvd-serve-tests-"))
atexit.register(shutil.rmtree, _SESSION_ROOT, ignore_errors=True)
# Set before anything imports transformers or vLLM, so no test reads or writes the user's caches or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HF_HOME"] = str(_SESSION_ROOT / "hf-home")
os.environ["HF_MODULES_CACHE"] = str(_SESSION_ROOT / "hf-modules")
os.environ["VLLM_CACHE_ROOT"] = str(_SESSION_ROOT / "vllm-cache")
os.environ["DVD_SERVE_CACHE"] = str(_SESSION_ROOT / "dvd-serve-cache")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SEED = 1234


def _make(name: str, **kwargs) -> Path:
    from dvd_serve.common.checkpoint.generate import make_checkpoint

    out = _SESSION_ROOT / "checkpoints" / name
    if not (out / "config.json").exists():
        make_checkpoint(out, shape="tiny", seed=TINY_SEED, dtype="float32", **kwargs)
    return out


@pytest.fixture(scope="session")
def tiny_hf_checkpoint() -> Path:
    """Transformers-native (`InternVLForConditionalGeneration`) tiny checkpoint."""
    return _make("tiny-hf", fmt="hf")


@pytest.fixture(scope="session")
def tiny_chat_checkpoint() -> Path:
    """Original-format (`InternVLChatModel`) tiny checkpoint with the same weights as `tiny_hf_checkpoint`."""
    return _make("tiny-chat", fmt="chat")


@pytest.fixture(scope="session")
def tiny_flash_checkpoint() -> Path:
    """Original-format tiny Flash checkpoint (adds mlp2, pooling_before_gating, gating)."""
    return _make("tiny-flash", fmt="chat", flash=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_ROOT
