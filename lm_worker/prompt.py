"""Renders a chat into the prompt string the language engine expects: one placeholder per image.

The checkpoint's own chat template does the rendering. For the transformers-native format the template receives
OpenAI-style content lists (`{"type": "image"}` renders the image placeholder); for the original format it
receives strings in which image placeholders come first, one per line, then the text - the same layout vLLM's
OpenAI server produces, so both give identical prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from dvd_serve.common.chat import ChatMessage, ImagePart, TextPart
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.errors import InvalidRequestError


def reserved_image_strings(spec: CheckpointSpec) -> tuple[str, ...]:
    """Strings that would be read as image markup if a client typed them as text."""
    return tuple(dict.fromkeys((
        spec.image_placeholder, spec.image_context_token, spec.image_start_token, spec.image_end_token, "<image>",
    )))


def render_prompt(tokenizer, messages: Sequence[ChatMessage], spec: CheckpointSpec) -> str:
    reserved = reserved_image_strings(spec)
    conversation = []
    for index, message in enumerate(messages):
        for part in message.parts:
            if isinstance(part, TextPart) and any(token in part.text for token in reserved):
                raise InvalidRequestError(
                    "Text content may not contain image markup tokens.",
                    code="reserved_token_in_text",
                    param=f"messages[{index}].content",
                )
        conversation.append({"role": message.role, "content": _content(message, spec)})
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _content(message: ChatMessage, spec: CheckpointSpec):
    if spec.fmt == "hf":
        return [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.parts
        ]
    placeholders = [spec.image_placeholder for part in message.parts if isinstance(part, ImagePart)]
    texts = [part.text for part in message.parts if isinstance(part, TextPart)]
    if texts:
        return "\n".join(placeholders + ["\n".join(texts)])
    return "\n".join(placeholders)
