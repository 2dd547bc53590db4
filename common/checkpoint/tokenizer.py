"""Offline byte-level BPE tokenizer and ChatML (`internvl2_5`) chat template for generated checkpoints.

The tokenizer is trained with the `tokenizers` library on a fixed corpus built below, so every run produces the
same vocabulary without downloads. Ordinary tokens come first; the special tokens follow, then Qwen3's tool and
thinking markup as plain added tokens, as in Qwen's vocabulary. The chat template is the published InternVL3.5 one
in behaviour (plain ChatML: tools, tool calls and thinking are not rendered; see docs/tools.md).
Both checkpoint formats ship the same tokenizer (so the same token ids and embedding rows); they differ only in
the text the chat template writes for an image (`<IMG_CONTEXT>` for the transformers-native format, `<image>` for
the original format, where it is plain text that vLLM later expands) and in the processor roles declared in
tokenizer_config.json.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"
CHAT_IMAGE_PLACEHOLDER = "<image>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, IMAGE_START, IMAGE_END, IMAGE_CONTEXT, VIDEO)
# Qwen3's tool and thinking markup, added as single tokens that are not special (kept in decoded text), as in the
# InternVL3.5 tokenizers; vLLM's tool and reasoning parsers look for them.
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")

# Roles the transformers InternVL processor looks up on its tokenizer (tokenizer.start_image_token, ...).
PROCESSOR_TOKEN_ROLES = {
    "start_image_token": IMAGE_START,
    "end_image_token": IMAGE_END,
    "context_image_token": IMAGE_CONTEXT,
    "video_token": VIDEO,
}
MODEL_MAX_LENGTH = 40960
_BPE_VOCAB_SIZE = 560

_SUBJECTS = (
    "the vision worker", "a language model", "the gateway", "every request", "the router", "our scheduler",
    "this image", "each tile", "the client", "a small batch", "the thumbnail", "one engine",
)
_VERBS = (
    "sends", "receives", "encodes", "streams", "decodes", "batches", "measures", "returns", "describes",
    "compresses", "checks", "writes",
)
_OBJECTS = (
    "embeddings to the server", "tokens for the client", "pixels into tiles", "a short answer", "the final result",
    "numbers and text", "twelve patches", "hidden states", "what is in the picture", "a cat on a red chair",
    "the weather today", "questions about documents",
)
_EXTRA_LINES = (
    "Describe the image in one sentence. What colour is the sky? How many people are there?",
    "0 1 2 3 4 5 6 7 8 9 10 12 14 16 32 64 128 256 448 896 1024 1344 2048 4096",
    "You are a helpful assistant. Please answer briefly and precisely.",
)


def _training_corpus() -> list[str]:
    lines = [f"{s} {v} {o}." for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    return [*lines, *(line.capitalize() for line in lines[::7]), *_EXTRA_LINES]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    return tokenizer.to_str()


def build_tokenizer() -> Tokenizer:
    """A fresh copy of the deterministic tokenizer (callers may mutate it)."""
    return Tokenizer.from_str(_tokenizer_json())


def special_token_ids() -> dict[str, int]:
    """Id of every special token, keyed by its text."""
    tokenizer = build_tokenizer()
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}


def chat_template(image_text: str) -> str:
    """ChatML template writing `image_text` (plus a newline) for each image part of an OpenAI-style content list.

    Plain-string contents are written as they are; `add_generation_prompt` opens the assistant turn.
    """
    return (
        "{%- for message in messages -%}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
        "{%- if message['content'] is string -%}\n"
        "{{- message['content'] -}}\n"
        "{%- else -%}\n"
        "{%- for part in message['content'] -%}\n"
        "{%- if part['type'] in ('image', 'image_url') -%}\n"
        f"{{{{- '{image_text}\\n' -}}}}\n"
        "{%- elif part['type'] in ('video', 'video_url') -%}\n"
        f"{{{{- '{VIDEO}\\n' -}}}}\n"
        "{%- elif part['type'] == 'text' -%}\n"
        "{{- part['text'] -}}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- endif -%}\n"
        "{{- '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "{{- '<|im_start|>assistant\\n' -}}\n"
        "{%- endif -%}\n"
    )


def write_tokenizer_files(out_dir: Path, *, image_text: str, declare_processor_roles: bool) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    `declare_processor_roles` adds the named image/video tokens the transformers InternVL processor needs.
    """
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    tokenizer_config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }
    if declare_processor_roles:
        tokenizer_config["extra_special_tokens"] = dict(PROCESSOR_TOKEN_ROLES)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(chat_template(image_text), encoding="utf-8")
