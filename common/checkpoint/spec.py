"""`CheckpointSpec`: the format-independent facts every component needs, read from either checkpoint layout.

Transformers-native ("hf") checkpoints keep tiling settings in processor_config.json (transformers 5) or
preprocessor_config.json (older uploads) and take `use_thumbnail` from `crop_to_patches`, as vLLM's `interns1.py`
does. Original ("chat") checkpoints keep everything in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from dvd_serve.common.checkpoint import tokenizer as tok
from dvd_serve.common.config import FrozenConfig

HF_ARCHITECTURE = "InternVLForConditionalGeneration"
CHAT_ARCHITECTURE = "InternVLChatModel"
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class CheckpointSpec(FrozenConfig):
    """What a checkpoint folder holds, independent of its file layout."""

    path: Path = Field(description="Checkpoint folder.")
    model_id: str = Field(description="Folder name, used as the served model id.")
    fmt: Literal["hf", "chat"] = Field(description="'hf': InternVLForConditionalGeneration; 'chat': InternVLChatModel.")
    flash: bool = Field(description="Whether the checkpoint carries the Flash router (mlp2, pooling, gating).")
    torch_dtype: str = Field(description="Dtype the weights are stored in, e.g. 'bfloat16'.")
    image_size: int = Field(description="Side of one tile in pixels (448).")
    patch_size: int = Field(description="Side of one ViT patch in pixels (14).")
    downsample_ratio: float = Field(description="Pixel-shuffle ratio before mlp1 (0.5).")
    tokens_per_tile: int = Field(description="Image tokens per uncompressed tile (256).")
    min_tiles: int = Field(description="Fewest tiles dynamic tiling may choose.")
    max_tiles: int = Field(description="Most tiles dynamic tiling may choose (thumbnail not counted).")
    use_thumbnail: bool = Field(description="Whether multi-tile images get a whole-image thumbnail tile last.")
    select_layer: int = Field(description="ViT layer whose output feeds the projector (-1 = last).")
    vit_hidden: int = Field(description="ViT width.")
    vit_layers: int = Field(description="ViT encoder layers.")
    vit_heads: int = Field(description="ViT attention heads.")
    vit_intermediate: int = Field(description="ViT MLP width.")
    vit_qk_norm: bool = Field(description="Whether ViT attention normalises queries and keys (InternViT-6B).")
    vit_norm_type: Literal["layer_norm", "rms_norm"] = Field(description="ViT norm1/norm2 type.")
    vit_layer_norm_eps: float = Field(description="Epsilon of the ViT norms.")
    vit_qkv_bias: bool = Field(description="Whether the ViT qkv projection has a bias.")
    llm_hidden: int = Field(description="LLM width = width of every image embedding row.")
    llm_vocab: int = Field(description="Rows of the LLM embedding matrix.")
    llm_type: str = Field(default="", description="The language model's `model_type` (qwen3, qwen3_moe, gpt_oss...).")
    image_placeholder: str = Field(
        description="Text a prompt carries once per image for vLLM to expand ('<IMG_CONTEXT>' hf, '<image>' chat)."
    )
    image_context_token: str = Field(description="Token repeated once per image embedding row ('<IMG_CONTEXT>').")
    image_start_token: str = Field(description="Token opening an image's embeddings ('<img>').")
    image_end_token: str = Field(description="Token closing an image's embeddings ('</img>').")
    flash_relative_threshold: float | None = Field(description="ViR quantile threshold; None unless Flash.")
    flash_absolute_threshold: float | None = Field(description="ViR probability threshold; None unless Flash.")

    @classmethod
    def from_dir(cls, path: str | Path) -> CheckpointSpec:
        """Read config.json (and, for hf, the processor config) of the checkpoint in `path`."""
        folder = Path(path)
        config = _read_json(folder / "config.json")
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        try:
            if model_type == "internvl" and HF_ARCHITECTURE in architectures:
                facts = _hf_facts(folder, config)
            elif model_type == "internvl_chat" and CHAT_ARCHITECTURE in architectures:
                facts = _chat_facts(config)
            else:
                raise ValueError(
                    f"unsupported checkpoint (model_type {model_type!r}, architectures {architectures}); expected "
                    f"{HF_ARCHITECTURE} (model_type 'internvl') or {CHAT_ARCHITECTURE} (model_type 'internvl_chat')"
                )
        except KeyError as missing:
            raise ValueError(f"{folder}: config.json lacks the key {missing}") from None
        except ValueError as error:
            raise ValueError(f"{folder}: {error}") from None
        image_size, patch_size, ratio = facts["image_size"], facts["patch_size"], facts["downsample_ratio"]
        if image_size % patch_size:
            raise ValueError(f"{folder}: image_size {image_size} is not a multiple of patch_size {patch_size}")
        tokens_per_tile = (image_size // patch_size) ** 2 * ratio**2
        if tokens_per_tile != int(tokens_per_tile) or tokens_per_tile < 1:
            raise ValueError(f"{folder}: downsample_ratio {ratio} does not give a whole number of tokens per tile")
        return cls(
            path=folder,
            model_id=folder.resolve().name,
            tokens_per_tile=int(tokens_per_tile),
            image_context_token=tok.IMAGE_CONTEXT,
            image_start_token=tok.IMAGE_START,
            image_end_token=tok.IMAGE_END,
            **facts,
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} not found: not a checkpoint folder") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return content


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    section = config.get(key)
    if not isinstance(section, dict):
        raise ValueError(f"config.json has no {key!r} section")
    return section


def _side(value: int | list[int]) -> int:
    """A square size given as an int or as [height, width]."""
    if isinstance(value, int):
        return value
    if len(value) != 2 or value[0] != value[1]:
        raise ValueError(f"only square sizes are supported, got {value}")
    return int(value[0])


def _stored_dtype(config: dict[str, Any], language: dict[str, Any]) -> str:
    for source in (config, language):
        for key in ("torch_dtype", "dtype"):
            if isinstance(source.get(key), str):
                return source[key]
    return "float32"


# Spec field -> (key, default) in the hf format's vision_config, then in the chat format's; default None = required.
# Defaults are those of each format's config class (transformers' InternVLVisionConfig, upstream InternVisionConfig).
_VISION_KEYS: dict[str, tuple[tuple[str, Any], tuple[str, Any]]] = {
    "vit_hidden": (("hidden_size", None), ("hidden_size", None)),
    "vit_layers": (("num_hidden_layers", None), ("num_hidden_layers", None)),
    "vit_heads": (("num_attention_heads", None), ("num_attention_heads", None)),
    "vit_intermediate": (("intermediate_size", None), ("intermediate_size", None)),
    "vit_qk_norm": (("use_qk_norm", False), ("qk_normalization", True)),
    "vit_qkv_bias": (("attention_bias", False), ("qkv_bias", False)),
    "vit_norm_type": (("norm_type", "layer_norm"), ("norm_type", "rms_norm")),
    "vit_layer_norm_eps": (("layer_norm_eps", 1e-6), ("layer_norm_eps", 1e-6)),
}


def _model_facts(fmt: Literal["hf", "chat"], vision: dict[str, Any], language: dict[str, Any]) -> dict[str, Any]:
    """ViT and LLM dimensions, read under each format's key names."""
    facts: dict[str, Any] = {}
    for field, keys in _VISION_KEYS.items():
        key, default = keys[0] if fmt == "hf" else keys[1]
        facts[field] = vision[key] if default is None else vision.get(key, default)
    facts["llm_hidden"] = language["hidden_size"]
    facts["llm_vocab"] = language["vocab_size"]
    facts["llm_type"] = str(language.get("model_type", ""))
    return facts


def _hf_facts(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    vision = _section(config, "vision_config")
    language = _section(config, "text_config")
    image_processor = _hf_image_processor(folder)
    return {
        "fmt": "hf",
        "flash": False,
        "torch_dtype": _stored_dtype(config, language),
        "image_size": _side(image_processor.get("size", {}).get("height", vision.get("image_size", 448))),
        "patch_size": _side(vision.get("patch_size", 14)),
        "downsample_ratio": float(config.get("downsample_ratio", 0.5)),
        "min_tiles": int(image_processor.get("min_patches", 1)),
        "max_tiles": int(image_processor.get("max_patches", 12)),
        "use_thumbnail": bool(image_processor.get("crop_to_patches", False)),
        "select_layer": int(config.get("vision_feature_layer", -1)),
        "image_placeholder": tok.IMAGE_CONTEXT,
        "flash_relative_threshold": None,
        "flash_absolute_threshold": None,
        **_model_facts("hf", vision, language),
    }


def _hf_image_processor(folder: Path) -> dict[str, Any]:
    for name in _PROCESSOR_FILES:
        path = folder / name
        if path.exists():
            content = _read_json(path)
            return content.get("image_processor", content)
    raise ValueError(f"{folder}: no {' or '.join(_PROCESSOR_FILES)} with the image tiling settings")


def _chat_facts(config: dict[str, Any]) -> dict[str, Any]:
    vision = _section(config, "vision_config")
    language = _section(config, "llm_config")
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {config.get('ps_version', 'v1')!r} is not supported (InternVL3.5 uses 'v2')")
    dynamic = bool(config.get("dynamic_image_size", False))
    flash = bool(config.get("flash_mode", False))
    return {
        "fmt": "chat",
        "flash": flash,
        "torch_dtype": _stored_dtype(config, language),
        "image_size": _side(config.get("force_image_size") or vision.get("image_size", 448)),
        "patch_size": _side(vision.get("patch_size", 14)),
        "downsample_ratio": float(config.get("downsample_ratio", 0.5)),
        "min_tiles": int(config.get("min_dynamic_patch", 1)) if dynamic else 1,
        "max_tiles": int(config.get("max_dynamic_patch", 6)) if dynamic else 1,
        "use_thumbnail": bool(config.get("use_thumbnail", False)) and dynamic,
        "select_layer": int(config.get("select_layer", -1)),
        "image_placeholder": tok.CHAT_IMAGE_PLACEHOLDER,
        "flash_relative_threshold": float(config["flash_relative_threshold"]) if flash else None,
        "flash_absolute_threshold": float(config["flash_absolute_threshold"]) if flash else None,
        **_model_facts("chat", vision, language),
    }
