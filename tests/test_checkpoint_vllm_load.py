"""vLLM loads the generated tiny checkpoints of both formats and generates greedy tokens from text and from a
PIL image. The two formats hold the same weights, so they must give the same tokens, and the hf format must give
the tokens transformers gives. The image is 448x448: one tile and no resize, so every preprocessing path (vLLM's
original-format processor, transformers' GotOcr2 processor) feeds the model the same pixels.

vLLM inspects model classes in a `python -m vllm.model_executor.models.registry` subprocess that imports
torchvision first thing; it works because deploy/install.sh installs the torchvision import hook as a `.pth`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dvd_serve.common.checkpoint import tokenizer as tok
from dvd_serve.common.checkpoint.spec import CheckpointSpec

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
QUESTION = "What is in the picture?"


def _image():
    from PIL import Image

    pixels = torch.arange(448 * 448 * 3, dtype=torch.int64).reshape(448, 448, 3) * 7919 % 251
    return Image.fromarray(pixels.to(torch.uint8).numpy(), mode="RGB")


def _text_prompt() -> str:
    return f"{tok.IM_START}user\nThe router measures hidden states.{tok.IM_END}\n{tok.IM_START}assistant\n"


def _image_prompt(spec: CheckpointSpec) -> str:
    return f"{tok.IM_START}user\n{spec.image_placeholder}\n{QUESTION}{tok.IM_END}\n{tok.IM_START}assistant\n"


class _Engine:
    """One in-process vLLM engine over a checkpoint, with the greedy results the tests compare."""

    def __init__(self, path: Path) -> None:
        from vllm import LLM, SamplingParams

        self.spec = CheckpointSpec.from_dir(path)
        self.llm = LLM(
            model=str(path),
            trust_remote_code=self.spec.fmt == "chat",
            enforce_eager=True,
            max_model_len=4096,
            distributed_executor_backend="uni",
            dtype="float32",
            seed=0,
        )
        self.greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def text_tokens(self) -> list[int]:
        return list(self.llm.generate([_text_prompt()], self.greedy, use_tqdm=False)[0].outputs[0].token_ids)

    def image_prompt_result(self):
        request = {"prompt": _image_prompt(self.spec), "multi_modal_data": {"image": _image()}}
        return self.llm.generate([request], self.greedy, use_tqdm=False)[0]

    def image_chat_result(self):
        messages = [{"role": "user", "content": [
            {"type": "image_pil", "image_pil": _image()}, {"type": "text", "text": QUESTION}]}]
        return self.llm.chat(messages, self.greedy, use_tqdm=False)[0]


@contextmanager
def _running_engine(path: Path) -> Iterator[_Engine]:
    from dvd_serve.common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    engine = _Engine(path)
    try:
        yield engine
    finally:
        del engine.llm
        gc.collect()


def _collect_results(path: Path) -> dict[str, object]:
    with _running_engine(path) as engine:
        return {
            "text": engine.text_tokens(),
            "image_prompt": engine.image_prompt_result(),
            "image_chat": engine.image_chat_result(),
        }


@pytest.fixture(scope="module")
def hf_results(tiny_hf_checkpoint: Path) -> dict[str, object]:
    """Everything the tests need from the hf engine, collected before the chat engine starts (one at a time)."""
    return _collect_results(tiny_hf_checkpoint)


@pytest.fixture(scope="module")
def chat_results(tiny_chat_checkpoint: Path, hf_results: dict[str, object]) -> dict[str, object]:
    return _collect_results(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def transformers_tokens(tiny_hf_checkpoint: Path) -> dict[str, list[int]]:
    """Greedy tokens of transformers' own InternVL on the hf checkpoint: the reference."""
    from dvd_serve.common.torch_compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_hf_checkpoint)
    spec = CheckpointSpec.from_dir(tiny_hf_checkpoint)
    tokens = {}
    for kind, inputs in (
        ("text", processor(text=[_text_prompt()], return_tensors="pt")),
        ("image", processor(images=[_image()], text=[_image_prompt(spec)], return_tensors="pt")),
    ):
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens[kind] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens


def test_text_prompt_gives_the_same_greedy_tokens_in_both_formats_and_in_transformers(
    hf_results: dict, chat_results: dict, transformers_tokens: dict[str, list[int]]
) -> None:
    assert len(hf_results["text"]) == MAX_TOKENS
    assert hf_results["text"] == transformers_tokens["text"]
    assert chat_results["text"] == hf_results["text"]


def test_image_prompt_expands_to_one_tile_of_context_tokens(hf_results: dict, chat_results: dict) -> None:
    special = tok.special_token_ids()
    for results in (hf_results, chat_results):
        prompt_ids = list(results["image_prompt"].prompt_token_ids)
        start = prompt_ids.index(special[tok.IMAGE_START])
        assert prompt_ids[start + 1 : start + 257] == [special[tok.IMAGE_CONTEXT]] * 256
        assert prompt_ids[start + 257] == special[tok.IMAGE_END]
        assert prompt_ids.count(special[tok.IMAGE_CONTEXT]) == 256
    assert hf_results["image_prompt"].prompt_token_ids == chat_results["image_prompt"].prompt_token_ids


def test_image_prompt_gives_the_same_greedy_tokens_in_both_formats_and_in_transformers(
    hf_results: dict, chat_results: dict, transformers_tokens: dict[str, list[int]]
) -> None:
    hf_tokens = list(hf_results["image_prompt"].outputs[0].token_ids)
    assert len(hf_tokens) == MAX_TOKENS
    assert hf_tokens == transformers_tokens["image"]
    assert list(chat_results["image_prompt"].outputs[0].token_ids) == hf_tokens
    assert hf_tokens != hf_results["text"]


def test_chat_api_renders_the_image_placeholder_of_each_format(hf_results: dict, chat_results: dict) -> None:
    for results in (hf_results, chat_results):
        chat, raw = results["image_chat"], results["image_prompt"]
        assert chat.prompt_token_ids == raw.prompt_token_ids
        assert chat.outputs[0].token_ids == raw.outputs[0].token_ids
