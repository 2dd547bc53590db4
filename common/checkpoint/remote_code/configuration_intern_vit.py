"""Configuration of the InternViT vision encoder inside an original-format InternVL checkpoint.

Written by dvd-serve and copied into the checkpoints it generates. Field names and defaults follow the keys that
original-format config.json files carry under `vision_config` and that vLLM's `intern_vit.py` reads.
"""

from transformers import PreTrainedConfig


class InternVisionConfig(PreTrainedConfig):
    """InternViT hyper-parameters (the defaults describe InternViT-6B)."""

    model_type = "intern_vit_6b"
    base_config_key = "vision_config"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = False
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1
