"""Applies `torch_compat.ensure_torchvision_importable()` just before the first `import torchvision` of a process.

vLLM's CPU platform starts its engine core with the `spawn` method; the fresh interpreter imports vLLM, which
imports transformers' image utilities, which import torchvision, before any dvd-serve code could run. The install
step therefore adds a one-line `dvd_serve_torchvision.pth` to the environment that imports this module: it only
registers a finder (no torch import at start-up) that does the work when torchvision is first requested.
"""

from __future__ import annotations

import importlib.abc
import sys


class _BeforeTorchvisionImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname == "torchvision":
            uninstall()
            from dvd_serve.common.torch_compat import ensure_torchvision_importable

            ensure_torchvision_importable()
        return None  # let the regular finders import it


def install() -> None:
    if not any(isinstance(finder, _BeforeTorchvisionImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvisionImport())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _BeforeTorchvisionImport)]


install()
