"""How many tokens a prompt takes once its images are expanded, and how many output tokens the context leaves.

Decided before the engine sees the request, so an oversized request is a clean 400 (vLLM's own OpenAI server
answers the same) rather than an engine-side failure or a silently shortened answer. The count is exact: every
image placeholder is counted as the `<img>` + N x `<IMG_CONTEXT>` + `</img>` vLLM expands it to, with N the rows
of that image's embeddings, and the rest of the prompt is tokenized as vLLM tokenizes a text prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.errors import InvalidRequestError

CONTEXT_EXCEEDED_CODE = "context_length_exceeded"


def framed_prompt_ids(tokenizer, prompt: str, spec: CheckpointSpec) -> list[int]:
    """`prompt`'s token ids with each image placeholder as the bare `<img></img>` pair (two special tokens): the
    engine's prompt without the image rows."""
    image_frame = spec.image_start_token + spec.image_end_token
    return tokenizer.encode(prompt.replace(spec.image_placeholder, image_frame))


def prompt_token_count(tokenizer, prompt: str, spec: CheckpointSpec, image_tokens: Sequence[int]) -> int:
    """Tokens the engine will hold for `prompt` whose placeholders stand for images of `image_tokens` rows each."""
    return len(framed_prompt_ids(tokenizer, prompt, spec)) + sum(image_tokens)


def output_token_budget(prompt_tokens: int, requested: int, max_model_len: int, requested_by: str | None) -> int:
    """The `max_tokens` to hand the engine.

    A prompt that leaves no room for one output token is refused, and so is a `max_tokens` the client set
    (`requested_by` names its field) that does not fit beside the prompt; a default (`requested_by` None) is
    lowered to the room that is left.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        raise InvalidRequestError(
            f"The prompt takes {prompt_tokens} tokens (images included), which leaves no room for output in the "
            f"model's context length of {max_model_len} tokens. Send fewer or smaller images, or less text.",
            code=CONTEXT_EXCEEDED_CODE,
            param="messages",
        )
    if requested <= room:
        return requested
    if requested_by is None:
        return room
    raise InvalidRequestError(
        f"The prompt takes {prompt_tokens} tokens (images included) and {requested} output tokens were requested: "
        f"together more than the model's context length of {max_model_len} tokens. Lower '{requested_by}' to at "
        f"most {room}.",
        code=CONTEXT_EXCEEDED_CODE,
        param=requested_by,
    )
