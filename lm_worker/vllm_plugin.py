"""vLLM general plugin (entry point group `vllm.general_plugins`), loaded by vLLM in every engine process.

It does three things, all idempotent:
1. makes torchvision importable beside CPU torch (see `dvd_serve.common.torch_compat`);
2. registers the language worker's model classes (see `vllm_models`): vLLM's InternVL classes accepting images
   of different token counts in one step, and Flash checkpoints. `language_only_overrides(spec)` selects them
   through `hf_overrides`;
3. in an engine process whose language replica asked for memory samples, starts sampling (see
   `dvd_serve.common.process_memory`).
"""

from __future__ import annotations

from dvd_serve.common.checkpoint.spec import CheckpointSpec

CHAT_ARCHITECTURE = "DvdServeLanguageOnlyInternVLChatModel"
HF_ARCHITECTURE = "DvdServeLanguageOnlyInternVLForConditionalGeneration"
_MODEL_CLASSES = {
    CHAT_ARCHITECTURE: "dvd_serve.lm_worker.vllm_models:LanguageOnlyInternVLChatModel",
    HF_ARCHITECTURE: "dvd_serve.lm_worker.vllm_models:LanguageOnlyInternVLForConditionalGeneration",
}


def register() -> None:
    from dvd_serve.common.process_memory import record_engine_memory_if_asked
    from dvd_serve.common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    record_engine_memory_if_asked()
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, model_class in _MODEL_CLASSES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_class)


def language_only_overrides(spec: CheckpointSpec) -> dict[str, list[str]]:
    """`hf_overrides` that make vLLM load `spec`'s checkpoint with the language worker's model class."""
    return {"architectures": [CHAT_ARCHITECTURE if spec.fmt == "chat" else HF_ARCHITECTURE]}


def flash_monolithic_overrides() -> dict[str, list[str]]:
    """For vLLM serving a Flash checkpoint monolithically (pixels in): it cannot load the router weights otherwise.

    The model then behaves as if every tile kept 256 tokens, which is what vLLM does for Flash checkpoints.
    """
    return {"architectures": [CHAT_ARCHITECTURE]}
