"""ViR router: checkpoint layout, equality with an independent reference, and the per-request decision rule."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from dvd_serve.router import (
    Detail,
    RouterConfig,
    VisualResolutionRouter,
    decide_compression,
    route_batch,
    split_by_detail,
    tokens_per_tile,
)
from dvd_serve.router.pooling import single_query_attention

sys.path.insert(0, str(Path(__file__).parent))
from router_reference import reference_decisions, reference_p0  # noqa: E402

RELATIVE = 0.4
ABSOLUTE = 0.3
TOKENS_PER_TILE = 1024
ROUTER_PREFIXES = ("pooling_before_gating.", "gating.")


def flash_router_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """The published names and shapes, written out independently of the product modules."""
    shapes: dict[str, tuple[int, ...]] = {"pooling_before_gating.query_token": (1, width)}
    for index in range(1, 5):
        attn = f"pooling_before_gating.attn{index}"
        shapes |= {
            f"{attn}.in_proj_weight": (3 * width, width),
            f"{attn}.in_proj_bias": (3 * width,),
            f"{attn}.out_proj.weight": (width, width),
            f"{attn}.out_proj.bias": (width,),
            f"pooling_before_gating.norm{index}.weight": (width,),
            f"pooling_before_gating.norm{index}.bias": (width,),
        }
        block = f"gating.block{index}"
        shapes |= {
            f"{block}.0.weight": (4 * width, width),
            f"{block}.0.bias": (4 * width,),
            f"{block}.3.weight": (width, 4 * width),
            f"{block}.3.bias": (width,),
            f"{block}.5.weight": (width,),
            f"{block}.5.bias": (width,),
        }
    shapes |= {
        "gating.gate.0.weight": (width,),
        "gating.gate.0.bias": (width,),
        "gating.gate.1.weight": (2, width),
        "gating.gate.1.bias": (2,),
    }
    return shapes


def random_router_state(width: int, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in flash_router_shapes(width).items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("query_token"):
            state[name] = noise
        elif len(shape) == 2:
            state[name] = noise / shape[1] ** 0.5
        elif name.endswith("weight"):  # a norm's scale
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = 0.1 * noise
    state["gating.gate.1.weight"] = 2.0 * state["gating.gate.1.weight"]  # spreads p0 over (0, 1)
    return state


def random_image_tokens(tiles: int, width: int, generator: torch.Generator) -> Tensor:
    """[tiles, 1024, width]: per-tile offsets make tiles differ, as real ViT outputs do."""
    per_tile = 2.0 * torch.randn(tiles, 1, width, generator=generator)
    return torch.randn(tiles, TOKENS_PER_TILE, width, generator=generator) + per_tile


def config_for(width: int, **overrides) -> RouterConfig:
    values = dict(vit_hidden_size=width, relative_threshold=RELATIVE, absolute_threshold=ABSOLUTE) | overrides
    return RouterConfig(**values)


@pytest.fixture(scope="module")
def state_64() -> dict[str, Tensor]:
    return random_router_state(64, seed=64)


@pytest.fixture(scope="module")
def router_64(state_64) -> VisualResolutionRouter:
    return VisualResolutionRouter.from_state_dict(state_64, config_for(64))


# ---------------------------------------------------------------- layout and loading


def test_parameters_carry_the_checkpoint_names_and_shapes(state_64, router_64):
    assert {name: tuple(t.shape) for name, t in router_64.state_dict().items()} == flash_router_shapes(64)
    plain = VisualResolutionRouter(config_for(64))
    plain.load_state_dict(state_64, strict=True)
    assert torch.equal(plain.gating.block3.get_submodule("3").weight, state_64["gating.block3.3.weight"])
    assert router_64.pooling_before_gating.attn1.num_heads == 16


def test_from_state_dict_reports_missing_unexpected_and_misshaped_tensors(state_64):
    broken = dict(state_64)
    del broken["gating.block2.3.bias"]
    broken["gating.block5.0.weight"] = torch.zeros(256, 64)
    broken["pooling_before_gating.attn2.in_proj_weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError) as error:
        VisualResolutionRouter.from_state_dict(broken, config_for(64))
    message = str(error.value)
    assert "missing tensor gating.block2.3.bias" in message
    assert "unexpected tensor gating.block5.0.weight" in message
    assert "pooling_before_gating.attn2.in_proj_weight has shape (64, 64), expected (192, 64)" in message


def test_from_state_dict_rejects_a_width_mismatch_and_mixed_dtypes(state_64):
    with pytest.raises(ValueError, match=r"gating.gate.1.weight has shape \(2, 64\), expected \(2, 128\)"):
        VisualResolutionRouter.from_state_dict(state_64, config_for(128))
    mixed = dict(state_64) | {"gating.gate.1.bias": state_64["gating.gate.1.bias"].bfloat16()}
    with pytest.raises(ValueError, match="share one floating dtype"):
        VisualResolutionRouter.from_state_dict(mixed, config_for(64))
    vision_tensor = dict(state_64) | {"vision_model.embeddings.class_embedding": torch.zeros(1, 1, 64)}
    with pytest.raises(ValueError, match="unexpected tensor vision_model.embeddings.class_embedding"):
        VisualResolutionRouter.from_state_dict(vision_tensor, config_for(64))


def test_compress_probability_rejects_wrong_input_shapes(router_64):
    with pytest.raises(ValueError, match=r"\[tiles, tokens, 64\]"):
        router_64.compress_probability(torch.zeros(2, 1024, 32))
    with pytest.raises(ValueError, match=r"\[tiles, tokens, 64\]"):
        router_64.compress_probability(torch.zeros(1024, 64))
    assert router_64.compress_probability(torch.zeros(0, 1024, 64)).shape == (0,)


# ---------------------------------------------------------------- numbers against the reference


def _images_and_requests(count: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """`count` images of 1..13 tiles (1 and 13 always present) grouped into requests of 1..3 images."""
    generator = torch.Generator().manual_seed(seed)
    tiles = [1, 13] + torch.randint(1, 14, (count - 2,), generator=generator).tolist()
    requests, start = [], 0
    while start < count:
        size = int(torch.randint(1, 4, (1,), generator=generator))
        requests.append(tiles[start : start + size])
        start += size
    return tiles, requests


@pytest.mark.parametrize(
    ("width", "image_count"),
    [(64, 24), (1024, 3)],  # width 1024 (16 heads of 64) is ~0.4 s per tile in the float64 reference
)
def test_p0_and_decisions_equal_the_reference(width, image_count):
    state = random_router_state(width, seed=width)
    router = VisualResolutionRouter.from_state_dict(state, config_for(width))
    tiles, requests = _images_and_requests(image_count, seed=width + 1)
    generator = torch.Generator().manual_seed(width + 2)
    tokens = [random_image_tokens(count, width, generator) for count in tiles]

    p0 = router.compress_probability(torch.cat(tokens))
    expected_p0 = torch.cat([reference_p0(state, image) for image in tokens])
    assert (p0.double() - expected_p0).abs().max().item() <= 1e-5

    decisions = router.route(torch.cat(tokens), requests).tolist()
    expected, start = [], 0
    for request in requests:
        request_p0 = expected_p0[start : start + sum(request)].float().tolist()
        expected += reference_decisions(request_p0, RELATIVE, ABSOLUTE)
        start += sum(request)
    assert decisions == expected
    assert 0 < sum(decisions) < len(decisions)


def test_folded_attention_equals_torch_multihead_attention():
    generator = torch.Generator().manual_seed(5)
    for width in (64, 1024):
        attn = torch.nn.MultiheadAttention(width, 16, batch_first=True).eval()
        with torch.no_grad():
            attn.in_proj_bias.normal_(generator=generator)
            attn.out_proj.bias.normal_(generator=generator)
        query = torch.randn(3, width, generator=generator)
        tokens = random_image_tokens(3, width, generator)
        with torch.inference_mode():
            expected = attn(query[:, None], tokens, tokens, need_weights=False)[0][:, 0]
            folded = single_query_attention(attn, query, tokens)
        assert (folded - expected).abs().max().item() <= 1e-5


def test_attn2_runs_three_times_and_attn3_attn4_are_unused(state_64, router_64):
    tokens = random_image_tokens(4, 64, torch.Generator().manual_seed(6))
    baseline = router_64.compress_probability(tokens)
    for unused in ("attn3.in_proj_weight", "attn4.out_proj.weight", "norm3.weight", "norm4.bias"):
        changed = dict(state_64)
        changed[f"pooling_before_gating.{unused}"] = changed[f"pooling_before_gating.{unused}"] + 1.0
        other = VisualResolutionRouter.from_state_dict(changed, config_for(64))
        assert torch.equal(other.compress_probability(tokens), baseline)
    changed = dict(state_64)
    changed["pooling_before_gating.norm2.bias"] = changed["pooling_before_gating.norm2.bias"] + 0.5
    other = VisualResolutionRouter.from_state_dict(changed, config_for(64))
    assert (other.compress_probability(tokens) - baseline).abs().max().item() > 1e-3


def test_bfloat16_gives_the_same_decisions_on_well_separated_p0(router_64):
    tokens = random_image_tokens(48, 64, torch.Generator().manual_seed(7))
    p0 = router_64.compress_probability(tokens)
    p0_bf16_input = router_64.compress_probability(tokens.bfloat16())
    router_bf16 = copy.deepcopy(router_64).to(torch.bfloat16)
    p0_bf16 = router_bf16.compress_probability(tokens.bfloat16())
    assert p0_bf16.dtype == torch.float32
    assert (p0_bf16 - p0).abs().max().item() <= 0.025
    assert (p0_bf16_input - p0).abs().max().item() <= 0.025

    chosen: list[int] = []  # tiles whose float32 p0 lie >= 0.06 apart and >= 0.06 from the absolute bar
    for tile in p0.argsort().tolist():
        value = p0[tile].item()
        if abs(value - ABSOLUTE) >= 0.06 and (not chosen or value - p0[chosen[-1]].item() >= 0.06):
            chosen.append(tile)
    assert len(chosen) >= 8
    shuffled = [chosen[i] for i in torch.randperm(len(chosen), generator=torch.Generator().manual_seed(8))]
    counts = [3, 1, len(shuffled) - 4]
    decided = [route_batch(values[shuffled], counts, RELATIVE, ABSOLUTE) for values in (p0, p0_bf16_input, p0_bf16)]
    assert torch.equal(decided[0], decided[1]) and torch.equal(decided[0], decided[2])
    assert 0 < int(decided[0].sum()) < len(shuffled)


# ---------------------------------------------------------------- the decision rule


@pytest.mark.parametrize(
    ("p0", "relative", "absolute", "expected"),
    [
        ([0.9], 0.0, 0.0, [False]),  # one tile alone is never compressed
        ([0.9], 0.5, 0.0, [False]),
        ([0.9], 1.0, 1.0, [False]),
        ([0.7] * 5, 0.0, 0.0, [False] * 5),  # all equal
        ([0.7] * 5, 0.5, 0.0, [False] * 5),
        ([0.2, 0.5, 0.5, 0.8], 0.5, 0.0, [False, False, False, True]),  # tied with the quantile: strict >
        ([0.1, 0.3, 0.6, 0.9, 0.9], 0.75, 0.0, [False] * 5),
        ([0.1, 0.3, 0.6, 0.9, 0.9], 0.5, 0.0, [False, False, False, True, True]),
        ([0.1, 0.2, 0.3, 0.4], 0.5, 0.0, [False, False, True, True]),  # quantile 0.25 by interpolation
        ([0.1, 1.0, 0.3], 0.0, 1.0, [False, True, False]),  # absolute 1: only p0 == 1
        ([0.1, 0.999, 0.3], 0.0, 1.0, [False, False, False]),
        ([0.1, 0.25, 0.5], 0.0, 0.25, [False, True, True]),  # absolute compared with >=
        ([0.1, 0.25, 0.5], 0.0, 0.5, [False, False, True]),
        ([0.3, 0.1, 0.1, 0.7], 0.0, 0.0, [True, False, False, True]),  # relative 0: all above the minimum
        ([0.3, 0.9, 0.5], 1.0, 0.0, [False, False, False]),  # relative 1: none
        ([0.2, float("nan"), 0.9], 0.5, 0.0, [False, False, False]),  # NaN: keep 256 tokens everywhere
        ([], 0.5, 0.5, []),
    ],
)
def test_decision_rule_edge_cases(p0, relative, absolute, expected):
    assert decide_compression(torch.tensor(p0, dtype=torch.float32), relative, absolute).tolist() == expected
    if not any(value != value for value in p0):
        assert reference_decisions(p0, relative, absolute) == expected


def test_decision_rule_equals_the_reference_on_random_p0_with_ties():
    generator = torch.Generator().manual_seed(9)
    levels = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0]
    for trial in range(300):
        tiles = int(torch.randint(1, 14, (1,), generator=generator))
        p0 = (torch.randint(0, 9, (tiles,), generator=generator) / 8).float()  # grid values give ties
        relative = levels[trial % len(levels)] if trial % 2 else float(torch.rand(1, generator=generator))
        absolute = float(torch.randint(0, 9, (1,), generator=generator)) / 8
        expected = reference_decisions(p0.tolist(), relative, absolute)
        assert decide_compression(p0, relative, absolute).tolist() == expected


def test_decision_rule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="relative_threshold"):
        decide_compression(torch.rand(3), 1.5, 0.0)
    with pytest.raises(ValueError, match="absolute_threshold"):
        decide_compression(torch.rand(3), 0.5, -0.1)
    with pytest.raises(ValueError, match="1-D"):
        decide_compression(torch.rand(3, 2), 0.5, 0.5)
    with pytest.raises(ValueError, match="do not add up"):
        route_batch(torch.rand(5), [2, 2], 0.5, 0.5)


def test_route_batch_equals_each_request_routed_alone():
    generator = torch.Generator().manual_seed(10)
    for _ in range(50):
        counts = torch.randint(0, 14, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator)
        p0 = torch.rand(int(counts.sum()), generator=generator)
        alone = [decide_compression(part, RELATIVE, ABSOLUTE) for part in torch.split(p0, counts.tolist())]
        assert torch.equal(route_batch(p0, counts.tolist(), RELATIVE, ABSOLUTE), torch.cat(alone))


def test_a_request_is_not_decided_by_its_neighbours():
    confident, doubtful = [0.9, 0.95], [0.1, 0.2]
    p0 = torch.tensor(confident + doubtful)
    assert route_batch(p0, [2, 2], 0.5, 0.0).tolist() == [False, True, False, True]
    # One quantile over the whole batch (lmdeploy's engine, `batch_chat`) would decide differently:
    assert decide_compression(p0, 0.5, 0.0).tolist() == [True, True, False, False]


def test_router_decisions_alone_equal_decisions_in_a_batch(router_64):
    generator = torch.Generator().manual_seed(11)
    requests = [[3, 1], [13], [1], [5, 2, 4]]
    tokens = [random_image_tokens(sum(request), 64, generator) for request in requests]
    batched = router_64.route(torch.cat(tokens), requests)
    alone = torch.cat([router_64.route(part, [request]) for part, request in zip(tokens, requests)])
    assert torch.equal(batched, alone)
    assert 0 < int(batched.sum()) < batched.numel()


# ---------------------------------------------------------------- detail policy


def test_split_by_detail_fixes_high_and_low_and_collects_auto_tiles_per_request():
    split = split_by_detail([[2, 3, 1], [4]], [[Detail.HIGH, Detail.AUTO, "low"], ["auto"]])
    assert split.fixed.tolist() == [False] * 5 + [True] + [False] * 4
    assert split.auto_index.tolist() == [2, 3, 4, 6, 7, 8, 9]
    assert split.auto_tile_counts == [3, 4]
    with pytest.raises(ValueError):
        split_by_detail([[2]], [["medium"]])
    with pytest.raises(ValueError):
        split_by_detail([[2, 3]], [["auto"]])


def test_route_applies_high_low_and_auto_per_image(router_64):
    tiles = [[4, 5, 3]]
    tokens = random_image_tokens(12, 64, torch.Generator().manual_seed(12))
    auto_alone = router_64.route(tokens[4:9], [[5]])
    decided = router_64.route(tokens, tiles, [[Detail.HIGH, Detail.AUTO, Detail.LOW]])
    assert decided[:4].tolist() == [False] * 4
    assert torch.equal(decided[4:9], auto_alone)  # the quantile covers the auto tiles only
    assert decided[9:].tolist() == [True] * 3
    assert 0 < int(auto_alone.sum()) < 5
    assert tokens_per_tile(decided) == [256] * 4 + [64 if flag else 256 for flag in auto_alone.tolist()] + [64] * 3


def test_default_detail_comes_from_the_config(state_64):
    tokens = random_image_tokens(6, 64, torch.Generator().manual_seed(13))
    for detail, expected in ((Detail.HIGH, [False] * 6), (Detail.LOW, [True] * 6)):
        router = VisualResolutionRouter.from_state_dict(state_64, config_for(64, default_detail=detail))
        assert router.route(tokens, [[2, 4]]).tolist() == expected
        assert router.route(tokens, [[2, 4]], [[None, "auto"]])[:2].tolist() == expected[:2]


# ---------------------------------------------------------------- configuration


def test_config_from_checkpoint_config_reads_the_flash_keys():
    checkpoint = {
        "flash_relative_threshold": 0.25,
        "flash_absolute_threshold": 0.6,
        "vision_config": {"hidden_size": 1024},
    }
    config = RouterConfig.from_checkpoint_config(checkpoint)
    assert (config.vit_hidden_size, config.relative_threshold, config.absolute_threshold) == (1024, 0.25, 0.6)
    assert config.default_detail is Detail.AUTO
    overridden = RouterConfig.from_checkpoint_config(checkpoint, relative_threshold=0.5, default_detail="high")
    assert (overridden.relative_threshold, overridden.absolute_threshold) == (0.5, 0.6)
    assert overridden.default_detail is Detail.HIGH
    with pytest.raises(ValueError, match="relative_threshold"):
        RouterConfig.from_checkpoint_config({"flash_absolute_threshold": 0.6, "vision_config": {"hidden_size": 64}})


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        config_for(64, relative_threshold=1.5)
    with pytest.raises(ValidationError, match="not divisible by the router's 16"):
        config_for(100)
    with pytest.raises(ValidationError, match="extra"):
        config_for(64, thresholds=0.5)
    with pytest.raises(ValidationError, match="frozen"):
        config_for(64).absolute_threshold = 0.1  # type: ignore[misc]


# ---------------------------------------------------------------- the generated tiny Flash checkpoint


def test_tiny_flash_checkpoint_loads_and_matches_the_reference(request):
    pytest.importorskip("dvd_serve.common.checkpoint.generate", reason="the checkpoint generator is not there yet")
    from safetensors import safe_open

    tiny_flash_checkpoint = request.getfixturevalue("tiny_flash_checkpoint")

    checkpoint_config = json.loads((tiny_flash_checkpoint / "config.json").read_text())
    tensors: dict[str, Tensor] = {}
    for shard in sorted(tiny_flash_checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(ROUTER_PREFIXES)}
    config = RouterConfig.from_checkpoint_config(checkpoint_config)
    router = VisualResolutionRouter.from_state_dict(tensors, config)
    tokens = random_image_tokens(5, config.vit_hidden_size, torch.Generator().manual_seed(14))
    p0 = router.compress_probability(tokens)
    assert (p0.double() - reference_p0(tensors, tokens)).abs().max().item() <= 1e-5
