"""Configuration of an original-format InternVL checkpoint (`InternVLChatModel`, model_type `internvl_chat`).

Written by dvd-serve and copied into the checkpoints it generates, next to `configuration_intern_vit.py`. Defaults
match the upstream class where config.json omits a key (note `ps_version` "v1" and `max_dynamic_patch` 6), so a
config.json must state the real values. Keys it does not declare (e.g. the Flash router's `flash_mode`,
`flash_relative_threshold`, `flash_absolute_threshold`) are kept as plain attributes.
"""

from transformers import AutoConfig, PreTrainedConfig

from .configuration_intern_vit import InternVisionConfig

# Upstream picks the language model class from `llm_config.architectures[0]`; we accept `model_type` first.
_MODEL_TYPE_BY_ARCHITECTURE = {
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}


def _language_config(llm_config: dict) -> PreTrainedConfig:
    settings = dict(llm_config)
    model_type = settings.pop("model_type", None)
    if model_type is None:
        architectures = settings.get("architectures") or ["Qwen3ForCausalLM"]
        model_type = _MODEL_TYPE_BY_ARCHITECTURE.get(architectures[0])
        if model_type is None:
            raise ValueError(f"unsupported llm_config architecture {architectures[0]!r}")
    return AutoConfig.for_model(model_type, **settings)


class InternVLChatConfig(PreTrainedConfig):
    """Top-level InternVL settings plus the nested `vision_config` and `llm_config`."""

    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = InternVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig(**self.vision_config)
        if self.llm_config is None:
            self.llm_config = _language_config({"model_type": "qwen3"})
        elif isinstance(self.llm_config, dict):
            self.llm_config = _language_config(self.llm_config)
        super().__post_init__(**kwargs)
