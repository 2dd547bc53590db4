"""Renders a chat into the prompt string the language engine expects: one placeholder per image.

Rendered as vLLM's own OpenAI server renders it (vllm/renderers/hf.py, vllm/renderers/chat_utils.py), with vLLM's
own helpers where they exist: the checkpoint's chat template decides the content format (`openai` when it loops
over a message's content parts, else `string`); for `openai` every message's parts go to the template in the
user's order, text as `{"type": "text"}`, images as `{"type": "image"}`; for `string` the texts are joined by
newlines and one placeholder per image is put in front (vLLM's default without `interleave_mm_strings`).
vLLM's `safe_apply_chat_template` then turns `developer` into `system` when the template has no developer role,
filters `chat_template_kwargs` to what the template reads, and renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dvd_serve.common.chat import ChatMessage, ImagePart, TextPart
from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.errors import InvalidRequestError


def reserved_image_strings(spec: CheckpointSpec) -> tuple[str, ...]:
    """Strings that would be read as image markup if a client typed them as text."""
    return tuple(dict.fromkeys((
        spec.image_placeholder, spec.image_context_token, spec.image_start_token, spec.image_end_token, "<image>",
    )))


def content_format(model_config, tokenizer) -> str:
    """`openai` or `string`: how the checkpoint's chat template wants message content (vLLM's detection)."""
    from vllm.renderers.hf import resolve_chat_template_content_format

    return resolve_chat_template_content_format(None, None, "auto", tokenizer, model_config=model_config)


def render_prompt(
    model_config,
    tokenizer,
    messages: Sequence[ChatMessage],
    spec: CheckpointSpec,
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The prompt text for `messages`; `model_config` and `tokenizer` are the engine's (vLLM's objects);
    `template_kwargs` and `tools` as vLLM renders them (`RequestPlan.chat_template_kwargs`, `RequestPlan.tools`)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.renderers.chat_utils import _postprocess_messages
    from vllm.renderers.hf import safe_apply_chat_template

    _check_reserved(messages, spec)
    wrap_parts = content_format(model_config, tokenizer) == "openai"
    conversation = [_conversation_message(message, spec, wrap_parts) for message in messages]
    try:
        _postprocess_messages(conversation)  # vLLM's: assistant tool-call arguments as objects for the template
        return safe_apply_chat_template(
            model_config, tokenizer, conversation, tools=tools, chat_template=None, tokenize=False, **template_kwargs
        )
    except VLLMValidationError as error:
        raise InvalidRequestError(
            f"The chat template refused the request: {error.args[0] if error.args else error}",
            code="chat_template_error",
            param="messages",
        ) from None


def _check_reserved(messages: Sequence[ChatMessage], spec: CheckpointSpec) -> None:
    reserved = reserved_image_strings(spec)
    for index, message in enumerate(messages):
        for part in message.parts:
            if isinstance(part, TextPart) and any(token in part.text for token in reserved):
                raise InvalidRequestError(
                    "Text content may not contain image markup tokens.",
                    code="reserved_token_in_text",
                    param=f"messages[{index}].content",
                )


def _conversation_message(message: ChatMessage, spec: CheckpointSpec, wrap_parts: bool) -> dict[str, Any]:
    """One message as vLLM's `_parse_chat_message_content` hands it to the template."""
    content = _content(message, spec, wrap_parts)
    if message.role == "tool" and isinstance(content, list):  # vLLM joins a tool result's text parts
        content = "\n".join(part["text"] for part in content if part.get("type") == "text")
    rendered: dict[str, Any] = {"role": message.role, "content": content}
    if message.role == "assistant":
        if message.tool_calls is not None:
            rendered["tool_calls"] = [
                {**call, "function": dict(call["function"])} for call in message.tool_calls
            ]
        if message.reasoning is not None:
            rendered["reasoning"] = rendered["reasoning_content"] = message.reasoning
    if message.role == "tool" and message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    if message.role == "developer":
        rendered["tools"] = None
    return rendered


def _content(message: ChatMessage, spec: CheckpointSpec, wrap_parts: bool):
    if wrap_parts:
        return [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.parts
        ]
    placeholders = [spec.image_placeholder for part in message.parts if isinstance(part, ImagePart)]
    texts = [part.text for part in message.parts if isinstance(part, TextPart)]
    if texts:
        return "\n".join(placeholders + ["\n".join(texts)])
    return "\n".join(placeholders)
