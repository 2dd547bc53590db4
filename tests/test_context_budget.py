"""The context budget the language engine enforces before vLLM sees a request (lm_worker/context_budget.py).

That the count equals vLLM's own prompt length, images expanded, is checked end to end for both checkpoint
formats in test_dvd_token_parity.
"""

from __future__ import annotations

import pytest

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.lm_worker.context_budget import CONTEXT_EXCEEDED_CODE, output_token_budget, prompt_token_count


class CharacterTokenizerDouble:
    """Test double: one token per character, except `<img>` and `</img>`, which are one token each."""

    def encode(self, text: str) -> list[int]:
        marked = text.replace("<img>", "\x01").replace("</img>", "\x02")
        return [ord(character) for character in marked]


@pytest.mark.parametrize("fixture_name", ["tiny_chat_checkpoint", "tiny_hf_checkpoint"])
def test_each_placeholder_counts_its_image_rows_plus_the_two_frame_tokens(fixture_name, request):
    spec = CheckpointSpec.from_dir(request.getfixturevalue(fixture_name))
    prompt = f"ab{spec.image_placeholder}c{spec.image_placeholder}d"
    assert prompt_token_count(CharacterTokenizerDouble(), prompt, spec, [256, 64]) == 4 + 2 * 2 + 256 + 64
    assert prompt_token_count(CharacterTokenizerDouble(), "abcd", spec, []) == 4


def test_an_explicit_max_tokens_that_fits_is_kept_and_one_that_does_not_is_refused_by_its_field():
    assert output_token_budget(4000, 96, 4096, "max_tokens") == 96
    with pytest.raises(InvalidRequestError) as refused:
        output_token_budget(4000, 97, 4096, "max_completion_tokens")
    error = refused.value
    assert (error.http_status, error.code, error.param) == (400, CONTEXT_EXCEEDED_CODE, "max_completion_tokens")
    assert "at most 96" in error.message


def test_a_default_max_tokens_is_lowered_to_the_room_left():
    assert output_token_budget(4000, 1024, 4096, None) == 96
    assert output_token_budget(100, 1024, 4096, None) == 1024


@pytest.mark.parametrize("prompt_tokens", [4096, 4097, 6656])
def test_a_prompt_that_leaves_no_room_for_one_token_is_refused_whatever_max_tokens_says(prompt_tokens):
    for requested_by in (None, "max_tokens"):
        with pytest.raises(InvalidRequestError) as refused:
            output_token_budget(prompt_tokens, 1, 4096, requested_by)
        assert (refused.value.code, refused.value.param) == (CONTEXT_EXCEEDED_CODE, "messages")
    assert output_token_budget(4095, 1, 4096, "max_tokens") == 1
