"""vLLM general plugin (entry point group `vllm.general_plugins`), loaded by vLLM in every engine process.

It does two things, both idempotent:
1. makes torchvision importable beside CPU torch (see `dvd_serve.common.torch_compat`), because vLLM's InternVL
   processors import transformers' image processors, which import torchvision;
2. registers `FLASH_ARCHITECTURE`, vLLM's own `InternVLChatModel` minus the Flash router weights. vLLM refuses a
   Flash checkpoint otherwise ("There is no module or parameter named 'gating'"). The language model is unchanged;
   select it with `hf_overrides={"architectures": [FLASH_ARCHITECTURE]}` (see `flash_engine_overrides`).
"""

from __future__ import annotations

FLASH_ARCHITECTURE = "DvdServeInternVLFlashChatModel"
_FLASH_MODEL_CLASS = "dvd_serve.lm_worker.vllm_flash_model:InternVLFlashChatModel"


def register() -> None:
    from dvd_serve.common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from vllm import ModelRegistry

    if FLASH_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(FLASH_ARCHITECTURE, _FLASH_MODEL_CLASS)


def flash_engine_overrides() -> dict[str, list[str]]:
    """`hf_overrides` that make vLLM load a Flash checkpoint with the plugin's model class."""
    return {"architectures": [FLASH_ARCHITECTURE]}
