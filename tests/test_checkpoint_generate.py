"""Random-weight checkpoints: file layouts, identical numbers across formats, sharding, streaming, selective
reading, loading with transformers, `CheckpointSpec`, and the `make-checkpoint` command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dvd_serve.common.checkpoint import tokenizer as tok
from dvd_serve.common.checkpoint import weights
from dvd_serve.common.checkpoint.generate import initial_values, make_checkpoint
from dvd_serve.common.checkpoint.layout import checkpoint_tensors, output_pieces
from dvd_serve.common.checkpoint.remote_code import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from dvd_serve.common.checkpoint.shapes import SHAPES, LanguageShape, ModelShape, VisionShape
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.checkpoint.writer import INDEX_FILE, ShardedSafetensorsWriter
from dvd_serve.server.cli import main as cli_main

TINY_SEED = 1234  # the seed conftest.py uses for the session checkpoints
TINY_VIT, TINY_LLM, TINY_VOCAB_ROWS = 64, 128, 576


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    return weights.load_tensors(path, [""])


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def sharded_flash_checkpoint(session_tmp: Path) -> Path:
    """The tiny Flash checkpoint again, split into shards of at most 128 KiB."""
    return make_checkpoint(
        session_tmp / "sharded-flash", fmt="chat", flash=True, seed=TINY_SEED, max_shard_bytes=128 * 1024
    )


# --- file layouts -------------------------------------------------------------------------------------------------


def test_hf_checkpoint_has_transformers_files_and_names(tiny_hf_checkpoint: Path) -> None:
    assert {p.name for p in tiny_hf_checkpoint.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "processor_config.json", "chat_template.jinja",
    }
    config = _config(tiny_hf_checkpoint)
    assert (config["model_type"], config["architectures"]) == ("internvl", ["InternVLForConditionalGeneration"])
    assert config["image_token_id"] == tok.special_token_ids()[tok.IMAGE_CONTEXT]
    assert config["text_config"]["model_type"] == "qwen3" and config["text_config"]["vocab_size"] == TINY_VOCAB_ROWS
    names = set(weights.tensor_names(tiny_hf_checkpoint))
    layer0 = {n.removeprefix("model.vision_tower.encoder.layer.0.") for n in names if ".encoder.layer.0." in n}
    assert layer0 == {
        "attention.q_proj.weight", "attention.q_proj.bias", "attention.k_proj.weight", "attention.k_proj.bias",
        "attention.v_proj.weight", "attention.v_proj.bias", "attention.projection_layer.weight",
        "attention.projection_layer.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "layernorm_before.weight", "layernorm_before.bias", "layernorm_after.weight", "layernorm_after.bias",
        "lambda_1", "lambda_2",
    }
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.vision_tower.embeddings.cls_token",
            "model.multi_modal_projector.linear_2.bias"} <= names
    assert all(n.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.",
                             "lm_head.")) for n in names)


def test_chat_checkpoint_has_original_files_and_names(tiny_chat_checkpoint: Path) -> None:
    assert {p.name for p in tiny_chat_checkpoint.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", *REMOTE_CODE_FILES,
    }
    for name in REMOTE_CODE_FILES:
        assert (tiny_chat_checkpoint / name).read_bytes() == (REMOTE_CODE_DIR / name).read_bytes()
    config = _config(tiny_chat_checkpoint)
    expected_top = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "force_image_size": 448, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "dynamic_image_size": True,
        "use_thumbnail": True, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
    }
    assert {key: config[key] for key in expected_top} == expected_top
    assert config["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"
    assert config["llm_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert config["vision_config"]["hidden_size"] == TINY_VIT and config["vision_config"]["drop_path_rate"] == 0
    assert "flash_mode" not in config
    names = set(weights.tensor_names(tiny_chat_checkpoint))
    layer0 = {n.removeprefix("vision_model.encoder.layers.0.") for n in names if ".layers.0." in n and "vision" in n}
    assert layer0 == {
        "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1", "ls2",
    }
    assert {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
            "vision_model.embeddings.patch_embedding.weight", "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias",
            "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"} <= names
    assert not any(n.startswith(("mlp2.", "gating.", "pooling_before_gating.")) for n in names)


def test_flash_checkpoint_adds_router_tensors_with_published_shapes(
    tiny_flash_checkpoint: Path, tiny_chat_checkpoint: Path
) -> None:
    config = _config(tiny_flash_checkpoint)
    assert config["flash_mode"] is True
    assert 0 <= config["flash_relative_threshold"] <= 1 and 0 <= config["flash_absolute_threshold"] <= 1
    flash = _all_tensors(tiny_flash_checkpoint)
    plain = _all_tensors(tiny_chat_checkpoint)
    added = {name: tuple(t.shape) for name, t in flash.items() if name not in plain}
    d, llm = TINY_VIT, TINY_LLM
    expected = {
        "mlp2.0.weight": (16 * d,), "mlp2.0.bias": (16 * d,), "mlp2.1.weight": (2 * llm, 16 * d),
        "mlp2.1.bias": (2 * llm,), "mlp2.4.weight": (2 * llm, 2 * llm), "mlp2.4.bias": (2 * llm,),
        "mlp2.7.weight": (llm, 2 * llm), "mlp2.7.bias": (llm,), "pooling_before_gating.query_token": (1, d),
        "gating.gate.0.weight": (d,), "gating.gate.0.bias": (d,), "gating.gate.1.weight": (2, d),
        "gating.gate.1.bias": (2,),
    }
    for k in range(1, 5):
        attn, norm, block = f"pooling_before_gating.attn{k}", f"pooling_before_gating.norm{k}", f"gating.block{k}"
        expected |= {
            f"{attn}.in_proj_weight": (3 * d, d), f"{attn}.in_proj_bias": (3 * d,),
            f"{attn}.out_proj.weight": (d, d), f"{attn}.out_proj.bias": (d,),
            f"{norm}.weight": (d,), f"{norm}.bias": (d,),
            f"{block}.0.weight": (4 * d, d), f"{block}.0.bias": (4 * d,), f"{block}.3.weight": (d, 4 * d),
            f"{block}.3.bias": (d,), f"{block}.5.weight": (d,), f"{block}.5.bias": (d,),
        }
    assert added == expected
    # Same seed: everything the plain checkpoint has is identical in the Flash one.
    assert all(torch.equal(flash[name], tensor) for name, tensor in plain.items())


# --- numbers --------------------------------------------------------------------------------------------------------


def test_same_seed_gives_same_numbers_in_both_formats(tiny_hf_checkpoint: Path, tiny_chat_checkpoint: Path) -> None:
    hf = _all_tensors(tiny_hf_checkpoint)
    chat = _all_tensors(tiny_chat_checkpoint)
    assert sum(t.numel() for t in hf.values()) == sum(t.numel() for t in chat.values())
    qkv = chat["vision_model.encoder.layers.1.attn.qkv.weight"]
    hf_layer = "model.vision_tower.encoder.layer.1.attention"
    assert qkv.shape == (3 * TINY_VIT, TINY_VIT)
    assert torch.equal(qkv, torch.cat([hf[f"{hf_layer}.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(
        chat["vision_model.encoder.layers.1.attn.qkv.bias"], torch.cat([hf[f"{hf_layer}.{p}_proj.bias"] for p in "qkv"])
    )
    assert torch.equal(chat["language_model.lm_head.weight"], hf["lm_head.weight"])
    assert torch.equal(chat["mlp1.1.weight"], hf["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(chat["vision_model.encoder.layers.0.ls2"], hf["model.vision_tower.encoder.layer.0.lambda_2"])
    for name, tensor in chat.items():
        pieces = output_pieces(name, "hf")
        assert torch.equal(tensor, torch.cat([hf[piece.name] for piece in pieces]))


def test_initialisation_is_finite_and_as_documented(tiny_chat_checkpoint: Path) -> None:
    chat = _all_tensors(tiny_chat_checkpoint)
    assert all(torch.isfinite(t).all() for t in chat.values())
    ls = torch.cat([t for n, t in chat.items() if n.endswith((".ls1", ".ls2"))])
    assert 0.1 <= ls.min() and ls.max() <= 1.0 and ls.std() > 0.1
    assert torch.equal(chat["vision_model.encoder.layers.0.norm1.weight"], torch.ones(TINY_VIT))
    assert torch.equal(chat["vision_model.encoder.layers.0.norm1.bias"], torch.zeros(TINY_VIT))
    embed = chat["language_model.model.embed_tokens.weight"]
    assert abs(embed.std().item() - 0.02) < 0.001 and abs(embed.mean().item()) < 0.001
    fan_ins = {
        "mlp1.1.weight": 4 * TINY_VIT,
        "language_model.model.layers.0.mlp.up_proj.weight": TINY_LLM,
        "vision_model.embeddings.patch_embedding.weight": 3 * 14 * 14,
    }
    for name, fan_in in fan_ins.items():
        assert abs(chat[name].std().item() * fan_in**0.5 - 1) < 0.05, name  # std 1/sqrt(fan_in)
    assert chat["mlp1.1.bias"].abs().max() > 0  # biases are random, so a dropped bias shows in outputs
    assert not torch.equal(chat["language_model.model.layers.0.mlp.up_proj.weight"],
                           chat["language_model.model.layers.1.mlp.up_proj.weight"])


def test_tensor_values_do_not_depend_on_generation_order(tiny_chat_checkpoint: Path) -> None:
    specs = {s.name: s for s in checkpoint_tensors(SHAPES["tiny"], TINY_VOCAB_ROWS, flash=False)}
    with safe_open(str(tiny_chat_checkpoint / "model.safetensors"), framework="pt") as handle:
        for name in ("language_model.lm_head.weight", "vision_model.encoder.layers.1.mlp.fc2.bias"):
            stored = handle.get_tensor(name)
            assert torch.equal(initial_values(specs[name], TINY_SEED), stored)  # generated alone, out of order
            assert not torch.equal(initial_values(specs[name], TINY_SEED + 1), stored)


def test_bfloat16_checkpoint_holds_rounded_float32_values(session_tmp: Path, tiny_hf_checkpoint: Path) -> None:
    bf16 = make_checkpoint(session_tmp / "tiny-hf-bf16", fmt="hf", seed=TINY_SEED, dtype="bfloat16")
    assert _config(bf16)["torch_dtype"] == "bfloat16"
    full = _all_tensors(tiny_hf_checkpoint)
    for name, tensor in _all_tensors(bf16).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


# --- sharding and streaming ----------------------------------------------------------------------------------------


def test_sharded_checkpoint_has_valid_index_and_same_tensors(
    sharded_flash_checkpoint: Path, tiny_flash_checkpoint: Path
) -> None:
    index = json.loads((sharded_flash_checkpoint / INDEX_FILE).read_text())
    shard_files = sorted(p.name for p in sharded_flash_checkpoint.glob("model-*.safetensors"))
    count = len(shard_files)
    assert count > 5 and not (sharded_flash_checkpoint / "model.safetensors").exists()
    assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shard_files)
    total = 0
    for shard in shard_files:
        with safe_open(str(sharded_flash_checkpoint / shard), framework="pt") as handle:
            names = list(handle.keys())
            sizes = [handle.get_slice(n).get_shape() for n in names]
            shard_bytes = sum(4 * torch.Size(size).numel() for size in sizes)
        assert all(index["weight_map"][n] == shard for n in names)
        assert shard_bytes <= 128 * 1024 or len(names) == 1  # only a single oversized tensor may exceed the limit
        total += shard_bytes
    assert index["metadata"]["total_size"] == total
    sharded = _all_tensors(sharded_flash_checkpoint)
    single = _all_tensors(tiny_flash_checkpoint)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[name], single[name]) for name in single)


def test_writer_flushes_before_a_shard_would_overflow(tmp_path: Path) -> None:
    written: list[list[str]] = []
    writer = ShardedSafetensorsWriter(
        tmp_path, max_shard_bytes=1000, on_shard_written=lambda shard: written.append(shard.tensor_names)
    )
    sizes = [100, 100, 60, 200, 10, 300, 10]  # float32 bytes: 400, 400, 240, 800, 40, 1200 (oversized), 40
    for index, numel in enumerate(sizes):
        writer.add(f"t{index}", torch.full((numel,), float(index)))
        assert writer.buffered_bytes <= 1000 or writer.buffered_bytes == 1200  # only the oversized tensor alone
    assert written == [["t0", "t1"], ["t2"], ["t3", "t4"], ["t5"]]
    with pytest.raises(ValueError, match="added twice"):
        writer.add("t0", torch.zeros(1))
    files = writer.close()
    assert written[-1] == ["t6"]
    assert [f.name for f in files] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [INDEX_FILE]
    assert torch.equal(weights.load_tensors(tmp_path, ["t5"])["t5"], torch.full((300,), 5.0))


_PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from dvd_serve.common.checkpoint.generate import checkpoint_nbytes, make_checkpoint
    from dvd_serve.common.checkpoint.shapes import ModelShape
    shape = ModelShape.model_validate_json(sys.argv[2])
    torch.ones(1024, 1024).sum()  # warm the allocator before taking the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    make_checkpoint(sys.argv[1], fmt="chat", shape=shape, seed=1, max_shard_bytes=16 * 1024**2, show_progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = checkpoint_nbytes(shape, 32768, flash=False, dtype="float32")
    print(json.dumps({"growth": after - before, "total": total}))
    """
)


def test_generation_streams_with_memory_far_below_model_size(tmp_path: Path) -> None:
    mid_size = ModelShape(
        name="mid",
        vision=VisionShape(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512, qkv_bias=True,
                           qk_normalization=False, norm_type="layer_norm"),
        language=LanguageShape(hidden_size=512, num_layers=24, num_heads=8, num_kv_heads=2, head_dim=64,
                               intermediate_size=2048, vocab_size=32768),
    )
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(tmp_path / "mid"), mid_size.model_dump_json()],
        capture_output=True, text=True, check=True, timeout=300,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    largest_tensor = 32768 * 512 * 4
    assert measured["total"] > 400 * 1024**2
    # At most one shard buffer plus the tensor being generated (and allocator slack), never the whole model.
    assert measured["growth"] < 16 * 1024**2 + 3 * largest_tensor
    assert measured["growth"] < measured["total"] / 4


# --- selective reading ------------------------------------------------------------------------------------------------


class _SafeOpenSpy:
    """Wraps safetensors.safe_open and records which files were opened and which tensors were read."""

    def __init__(self) -> None:
        self.opened_files: list[str] = []
        self.read_names: list[str] = []

    def __call__(self, filename: str, *args, **kwargs):
        self.opened_files.append(Path(filename).name)
        spy = self

        class _Handle:
            def __enter__(self):
                self._inner = safe_open(filename, *args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

            def keys(self):
                return self._inner.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                spy.read_names.append(name)
                return self._inner.get_tensor(name)

        return _Handle()


def test_load_tensors_reads_only_requested_tensors_and_shards(
    sharded_flash_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight_map = json.loads((sharded_flash_checkpoint / INDEX_FILE).read_text())["weight_map"]
    vision_side = ("vision_model.", "mlp1.", "mlp2.", "pooling_before_gating.", "gating.")
    llm_only_shards = set(weight_map.values()) - {f for n, f in weight_map.items() if n.startswith(vision_side)}
    assert llm_only_shards  # precondition: some shards hold language-model tensors only
    spy = _SafeOpenSpy()
    monkeypatch.setattr(weights, "safe_open", spy)
    loaded = weights.load_tensors(sharded_flash_checkpoint, vision_side, dtype=torch.bfloat16)
    assert sorted(loaded) == sorted(n for n in weight_map if n.startswith(vision_side))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert sorted(spy.read_names) == sorted(loaded)
    assert not any(name.startswith("language_model") for name in spy.read_names)
    assert not llm_only_shards & set(spy.opened_files)
    assert len(spy.opened_files) == len(set(spy.opened_files))  # each shard opened once


def test_load_tensors_from_single_file_and_names(tiny_hf_checkpoint: Path) -> None:
    names = weights.tensor_names(tiny_hf_checkpoint)
    assert names == sorted(names) and "lm_head.weight" in names
    projector = weights.load_tensors(tiny_hf_checkpoint, ["model.multi_modal_projector."])
    assert sorted(projector) == [n for n in names if n.startswith("model.multi_modal_projector.")]
    assert projector["model.multi_modal_projector.linear_1.weight"].shape == (TINY_LLM, 4 * TINY_VIT)
    assert weights.load_tensors(tiny_hf_checkpoint, []) == {}
    with pytest.raises(TypeError):
        weights.load_tensors(tiny_hf_checkpoint, "model.")  # type: ignore[arg-type]


# --- tokenizer --------------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_image_text_are_stable() -> None:
    tokenizer = tok.build_tokenizer()
    ids = tok.special_token_ids()
    size = tokenizer.get_vocab_size()
    markup = len(tok.MARKUP_TOKENS)
    assert sorted(ids.values()) == list(range(size - markup - len(tok.SPECIAL_TOKENS), size - markup))
    # Tool and thinking markup: one token each, not special, so decoding keeps them (as Qwen3's tokenizer does).
    for position, token in enumerate(tok.MARKUP_TOKENS):
        assert tokenizer.encode(token).ids == [size - markup + position]
    call = "<tool_call>\n{}\n</tool_call>"
    assert tokenizer.decode(tokenizer.encode(call).ids, skip_special_tokens=True) == call
    assert SHAPES["tiny"].language.vocab_rows(size) == TINY_VOCAB_ROWS
    for token, token_id in ids.items():
        assert tokenizer.encode(token).ids == [token_id]
    # vLLM finds `<image>` by its token ids: they must not change with the surrounding text.
    placeholder = tokenizer.encode(tok.CHAT_IMAGE_PLACEHOLDER).ids
    in_prompt = tokenizer.encode("<|im_start|>user\n<image>\nWhat is it?").ids
    assert any(in_prompt[i : i + len(placeholder)] == placeholder for i in range(len(in_prompt)))
    text = "The router measures 448 tiles."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.to_str() == tok.build_tokenizer().to_str()


# --- loading with transformers ------------------------------------------------------------------------------------


def test_transformers_loads_hf_checkpoint_and_processor_offline(tiny_hf_checkpoint: Path) -> None:
    from dvd_serve.common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from PIL import Image
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        tiny_hf_checkpoint, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stored = _all_tensors(tiny_hf_checkpoint)
    assert torch.equal(model.state_dict()["lm_head.weight"], stored["lm_head.weight"])
    processor = AutoProcessor.from_pretrained(tiny_hf_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[Image.new("RGB", (448, 448), (200, 40, 90))], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    ids = inputs["input_ids"][0].tolist()
    special = tok.special_token_ids()
    start = ids.index(special[tok.IMAGE_START])
    assert ids[start + 1 : start + 257] == [special[tok.IMAGE_CONTEXT]] * 256
    assert ids[start + 257] == special[tok.IMAGE_END]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == TINY_VOCAB_ROWS and torch.isfinite(logits).all()


def test_chat_checkpoint_config_and_tokenizer_load_with_remote_code(tiny_flash_checkpoint: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_flash_checkpoint, trust_remote_code=True)
    assert type(config).__name__ == "InternVLChatConfig"
    assert (config.ps_version, config.max_dynamic_patch, config.vision_config.hidden_size) == ("v2", 12, TINY_VIT)
    assert type(config.llm_config).__name__ == "Qwen3Config" and config.llm_config.vocab_size == TINY_VOCAB_ROWS
    assert config.flash_mode is True and config.flash_relative_threshold == 0.5
    tokenizer = AutoTokenizer.from_pretrained(tiny_flash_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids(tok.IMAGE_CONTEXT) == tok.special_token_ids()[tok.IMAGE_CONTEXT]


# --- CheckpointSpec -------------------------------------------------------------------------------------------------


def test_checkpoint_spec_reads_all_fixture_formats(
    tiny_hf_checkpoint: Path, tiny_chat_checkpoint: Path, tiny_flash_checkpoint: Path
) -> None:
    specs = {path: CheckpointSpec.from_dir(path) for path in (tiny_hf_checkpoint, tiny_chat_checkpoint,
                                                                   tiny_flash_checkpoint)}
    shared = {
        "image_size": 448, "patch_size": 14, "downsample_ratio": 0.5, "tokens_per_tile": 256, "min_tiles": 1,
        "max_tiles": 12, "use_thumbnail": True, "select_layer": -1, "vit_hidden": TINY_VIT, "vit_layers": 2,
        "vit_heads": 2, "vit_intermediate": 256, "vit_qk_norm": False, "vit_norm_type": "layer_norm",
        "vit_layer_norm_eps": 1e-6, "vit_qkv_bias": True, "llm_hidden": TINY_LLM, "llm_vocab": TINY_VOCAB_ROWS,
        "image_context_token": "<IMG_CONTEXT>", "image_start_token": "<img>", "image_end_token": "</img>",
        "torch_dtype": "float32",
    }
    for path, spec in specs.items():
        assert spec.model_dump(include=set(shared)) == shared
        assert spec.model_id == path.name and spec.path == path
    hf, chat, flash = specs.values()
    assert (hf.fmt, hf.flash, hf.image_placeholder, hf.flash_relative_threshold) == ("hf", False, "<IMG_CONTEXT>", None)
    assert (chat.fmt, chat.flash, chat.image_placeholder, chat.flash_absolute_threshold) == (
        "chat", False, "<image>", None)
    assert (flash.fmt, flash.flash, flash.flash_relative_threshold, flash.flash_absolute_threshold) == (
        "chat", True, 0.5, 0.5)


def test_checkpoint_spec_rejects_unknown_and_unsupported_configs(tmp_path: Path, tiny_chat_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        CheckpointSpec.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported checkpoint"):
        CheckpointSpec.from_dir(tmp_path)
    config = _config(tiny_chat_checkpoint)
    (tmp_path / "config.json").write_text(json.dumps(config | {"ps_version": "v1"}))
    with pytest.raises(ValueError, match="ps_version"):
        CheckpointSpec.from_dir(tmp_path)
    del config["vision_config"]["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        CheckpointSpec.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config(tiny_chat_checkpoint) | {"flash_mode": True}))
    with pytest.raises(ValueError, match="flash_relative_threshold"):
        CheckpointSpec.from_dir(tmp_path)


# --- shapes and the command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "billions"), [("1b", 1.06), ("2b", 2.35), ("8b", 8.53), ("38b", 38.4)]
)
def test_full_size_shapes_have_published_parameter_counts(name: str, billions: float) -> None:
    shape = SHAPES[name]
    specs = list(checkpoint_tensors(shape, 151936, flash=False))
    assert abs(sum(s.numel for s in specs) / 1e9 - billions) < 0.05
    assert all(len(output_pieces(s.name, "hf")) in (1, 3) for s in specs)
    names = {s.name for s in specs}
    six_b = name == "38b"
    assert ("vision_model.encoder.layers.0.attn.q_norm.weight" in names) == six_b
    assert ("vision_model.encoder.layers.0.attn.qkv.bias" in names) == (not six_b)
    assert ("vision_model.encoder.layers.0.norm1.bias" in names) == (not six_b)


def test_make_checkpoint_rejects_bad_requests(tmp_path: Path, tiny_chat_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="original"):
        make_checkpoint(tmp_path / "a", fmt="hf", flash=True)
    with pytest.raises(ValueError, match="format"):
        make_checkpoint(tmp_path / "b", fmt="gguf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        make_checkpoint(tmp_path / "c", fmt="chat", dtype="int8")
    with pytest.raises(ValueError, match="unknown shape"):
        make_checkpoint(tmp_path / "d", fmt="chat", shape="70b")
    with pytest.raises(FileExistsError):
        make_checkpoint(tiny_chat_checkpoint, fmt="chat")


def test_cli_writes_checkpoint_and_reports_errors(
    tmp_path: Path, tiny_flash_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-flash"
    assert cli_main(["make-checkpoint", str(out), "--format", "chat", "--flash", "--seed", str(TINY_SEED)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    spec = CheckpointSpec.from_dir(out)
    assert (spec.fmt, spec.flash) == ("chat", True)
    from_cli, from_fixture = _all_tensors(out), _all_tensors(tiny_flash_checkpoint)
    assert from_cli.keys() == from_fixture.keys()
    assert all(torch.equal(from_cli[name], from_fixture[name]) for name in from_fixture)
    assert cli_main(["make-checkpoint", str(tmp_path / "x"), "--format", "hf", "--flash"]) == 2
    assert "--format chat" in capsys.readouterr().err
    assert cli_main(["make-checkpoint", str(out), "--format", "chat"]) == 2
    assert "not empty" in capsys.readouterr().err
