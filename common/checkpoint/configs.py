"""The JSON files (besides weights and tokenizer) of a generated checkpoint, one builder per file and format.

Key names follow what the loaders read: transformers' `InternVLConfig` / `InternVLVisionConfig` / `Qwen3Config` and
GotOcr2 image processor (hf format), the original `InternVLChatConfig` (chat format; see remote_code/), and vLLM's
`internvl.py` and `interns1.py`.

Flash keys: `flash_mode`, `flash_relative_threshold`, `flash_absolute_threshold` are the names read by the Flash
checkpoints' `modeling_internvl_chat.py` (OpenGVLab/InternVL3_5-*-Flash) and lmdeploy's
`lmdeploy/pytorch/models/internvl.py`. Neither source, nor any other we could reach, states the published values,
so the defaults below are our choice: compress a tile only when the router rates it above the median of its
request's tiles (relative 0.5) and more likely harmless than not (absolute 0.5).
"""

from __future__ import annotations

from typing import Any

from dvd_serve.common.checkpoint import tokenizer as tok
from dvd_serve.common.checkpoint.layout import DOWNSAMPLE_RATIO
from dvd_serve.common.checkpoint.remote_code import AUTO_CONFIG_REFERENCE
from dvd_serve.common.checkpoint.shapes import LanguageShape, ModelShape, VisionShape

FLASH_RELATIVE_THRESHOLD = 0.5
FLASH_ABSOLUTE_THRESHOLD = 0.5
MIN_TILES = 1
MAX_TILES = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_SCALE_INIT = 0.1
CHAT_TEMPLATE_NAME = "internvl2_5"


def tokens_per_tile(vision: VisionShape) -> int:
    return int((vision.image_size // vision.patch_size) ** 2 * DOWNSAMPLE_RATIO**2)


def _qwen3_settings(language: LanguageShape, vocab_rows: int, dtype: str) -> dict[str, Any]:
    token_ids = tok.special_token_ids()
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": language.hidden_size,
        "intermediate_size": language.intermediate_size,
        "num_hidden_layers": language.num_layers,
        "num_attention_heads": language.num_heads,
        "num_key_value_heads": language.num_kv_heads,
        "head_dim": language.head_dim,
        "vocab_size": vocab_rows,
        "max_position_embeddings": language.max_position_embeddings,
        "max_window_layers": language.num_layers,
        "rms_norm_eps": language.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": token_ids[tok.END_OF_TEXT],
        "eos_token_id": token_ids[tok.IM_END],
        "torch_dtype": dtype,
    }


def hf_config(shape: ModelShape, vocab_rows: int, dtype: str) -> dict[str, Any]:
    """config.json of the transformers-native `InternVLForConditionalGeneration` format."""
    vision, language = shape.vision, shape.language
    text_config = _qwen3_settings(language, vocab_rows, dtype)
    text_config["rope_parameters"] = {"rope_theta": language.rope_theta, "rope_type": "default"}
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "image_seq_length": tokens_per_tile(vision),
        "image_token_id": tok.special_token_ids()[tok.IMAGE_CONTEXT],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "text_config": text_config,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "internvl_vision",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size,
            "attention_bias": vision.qkv_bias,
            "use_qk_norm": vision.qk_normalization,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "image_size": [vision.image_size, vision.image_size],
            "patch_size": [vision.patch_size, vision.patch_size],
            "num_channels": 3,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_dropout": 0.0,
            "projection_dropout": 0.0,
            "initializer_range": 0.02,
            "layer_scale_init_value": LAYER_SCALE_INIT,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
            "torch_dtype": dtype,
        },
    }


def chat_config(shape: ModelShape, vocab_rows: int, dtype: str, *, flash: bool) -> dict[str, Any]:
    """config.json of the original `InternVLChatModel` format (remote-code config classes)."""
    vision, language = shape.vision, shape.language
    llm_config = _qwen3_settings(language, vocab_rows, dtype)
    llm_config.update(rope_theta=language.rope_theta, rope_scaling=None)
    config: dict[str, Any] = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": AUTO_CONFIG_REFERENCE},
        "model_type": "internvl_chat",
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "dynamic_image_size": True,
        "force_image_size": vision.image_size,
        "min_dynamic_patch": MIN_TILES,
        "max_dynamic_patch": MAX_TILES,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "template": CHAT_TEMPLATE_NAME,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "llm_config": llm_config,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": 3,
            "qkv_bias": vision.qkv_bias,
            "qk_normalization": vision.qk_normalization,
            "norm_type": vision.norm_type,
            "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": "gelu",
            "initializer_factor": LAYER_SCALE_INIT,
            "initializer_range": 0.02,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
            "torch_dtype": dtype,
        },
    }
    if flash:
        config.update(
            flash_mode=True,
            flash_relative_threshold=FLASH_RELATIVE_THRESHOLD,
            flash_absolute_threshold=FLASH_ABSOLUTE_THRESHOLD,
        )
    return config


def generation_config() -> dict[str, Any]:
    """generation_config.json: Qwen3-style ids (end of turn and end of text both stop generation)."""
    token_ids = tok.special_token_ids()
    return {
        "bos_token_id": token_ids[tok.END_OF_TEXT],
        "eos_token_id": [token_ids[tok.IM_END], token_ids[tok.END_OF_TEXT]],
        "pad_token_id": token_ids[tok.END_OF_TEXT],
    }


def processor_config(vision: VisionShape) -> dict[str, Any]:
    """processor_config.json of the hf format: InternVL processor with GotOcr2 image and InternVL video settings."""
    pixel_settings = {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": vision.image_size, "width": vision.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    return {
        "processor_class": "InternVLProcessor",
        "image_seq_length": tokens_per_tile(vision),
        "image_processor": {
            "image_processor_type": "GotOcr2ImageProcessor",
            "crop_to_patches": True,
            "min_patches": MIN_TILES,
            "max_patches": MAX_TILES,
            **pixel_settings,
        },
        "video_processor": {
            "video_processor_type": "InternVLVideoProcessor",
            "do_sample_frames": False,
            "initial_shift": True,
            **pixel_settings,
        },
    }
