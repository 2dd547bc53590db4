"""Runtime shim for the torchvision wheel that installs beside CPU torch.

PyPI's torchvision 0.28 is a CUDA build. Its C extension cannot load next to `torch==2.13.0+cpu`, and
`torchvision/_meta_registrations.py` then fails at import time because it registers fake kernels for the
`torchvision::nms` and `torchvision::qnms` operators, which only the extension defines. The pure-Python transforms
that transformers' image processors use work fine once those two operator schemas exist, so we define them
(schema only, no kernel) before torchvision is imported. On a CUDA machine the extension loads and this is a no-op.

Call `ensure_torchvision_importable()` before anything that may import torchvision; the vLLM plugin does so in
every engine process.
"""

from __future__ import annotations

import importlib
import sys

_MISSING_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library_handle = None  # keeps the fragment alive: torch drops definitions when the Library object is collected


def ensure_torchvision_importable() -> None:
    """Define the two operator schemas torchvision's meta registrations need, if its extension cannot."""
    global _library_handle
    if "torchvision" in sys.modules or _library_handle is not None:
        return
    from dvd_serve.common import torchvision_import_hook

    torchvision_import_hook.uninstall()  # this call does the hook's job; the find_spec below must not re-enter
    import torch

    if hasattr(torch.ops, "torchvision") and _has_operator("nms"):
        return
    if _extension_loads():
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_OPERATOR_SCHEMAS:
        library.define(schema)
    _library_handle = library


def _has_operator(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _extension_loads() -> bool:
    """True when torchvision's compiled extension matches this torch (CUDA machines, CPU torchvision builds)."""
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        for candidate in os.listdir(location):
            if candidate.startswith("_C") and candidate.endswith(".so"):
                try:
                    torch.ops.load_library(os.path.join(location, candidate))
                except (OSError, RuntimeError):
                    return False
                return _has_operator("nms")
    return False


def check_environment() -> None:
    """Fail loudly at install time if the CPU stack cannot import (used by deploy/install.sh)."""
    ensure_torchvision_importable()
    importlib.import_module("torchvision")
    importlib.import_module("transformers")
