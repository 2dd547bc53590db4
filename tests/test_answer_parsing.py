"""The language side's use of vLLM's own tool and reasoning parsers, with the real parsers over the tiny checkpoint's
tokenizer (no engine): which parsers a checkpoint gets, how a job's vLLM request is adjusted, and how output is
split in both modes (per streamed delta, and once over a whole answer)."""

from __future__ import annotations

import json

import pytest

from dvd_serve.common.chat import AnswerOptions, PromptOptions, SamplingConfig
from dvd_serve.common.errors import InvalidRequestError
from dvd_serve.lm_worker.answer_parsing import AnswerSplitter, RequestPlan, choose_parsers, parser_class
from dvd_serve.lm_worker.engine import checkpoint_chat_template

TOOL = {"type": "function", "function": {"name": "click", "parameters": {
    "type": "object", "properties": {"button": {"enum": ["ok", "cancel"]}}, "required": ["button"]}}}
CALL_TEXT = '<tool_call>\n{"name": "click", "arguments": {"button": "ok"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_checkpoint)


def _plan(tokenizer, tool_parser="hermes", reasoning_parser=None, **answer) -> RequestPlan:
    parsers = parser_class(tool_parser, reasoning_parser, "tiny", tokenizer)
    return RequestPlan.build(SamplingConfig(max_tokens=64), AnswerOptions(**answer), PromptOptions(), parsers,
                             tokenizer, None)


def _pieces(tokenizer, text: str) -> list[tuple[str, list[int]]]:
    """`text` as the engine streams it: one token's text and id at a time."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:end])
        pieces.append((decoded[len(previous):], [ids[end - 1]]))
        previous = decoded
    return pieces


def _stream(splitter: AnswerSplitter, pieces, finish_reason="stop"):
    """Content, reasoning, tool-call name and arguments, and the last finish reason, summed over the deltas."""
    content = reasoning = name = arguments = ""
    finish = None
    for position, (text, ids) in enumerate(pieces):
        out = splitter.split(0, text, ids, finish_reason if position == len(pieces) - 1 else None, [1, 2])
        content += out.content
        reasoning += out.reasoning
        for call in out.tool_calls or ():
            name += call.get("function", {}).get("name") or ""
            arguments += call.get("function", {}).get("arguments") or ""
        finish = out.finish_reason or finish
    return content, reasoning, name, arguments, finish


def test_parsers_are_chosen_from_the_checkpoint(tiny_chat_checkpoint):
    template = checkpoint_chat_template(str(tiny_chat_checkpoint))
    assert "<|im_start|>" in template
    # The published InternVL3.5 template renders neither tools nor thinking: the language family decides the tools.
    assert choose_parsers("auto", "auto", "qwen3", template) == ("hermes", None)
    assert choose_parsers("auto", "auto", "gpt_oss", template) == (None, None)
    assert choose_parsers("auto", "auto", "llama", "{{ '<tool_call>' }}{% if enable_thinking %}{% endif %}") == (
        "hermes", "qwen3")
    assert choose_parsers("pythonic", "deepseek_r1", "qwen3", template) == ("pythonic", "deepseek_r1")
    assert choose_parsers(None, None, "qwen3", template) == (None, None)


def test_a_forced_call_becomes_vllms_structural_tag_and_keeps_special_tokens(tokenizer):
    plan = _plan(tokenizer, tools=(TOOL,), tool_choice="required")
    params = plan.sampling_params(64, {})
    assert params.structured_outputs is not None and params.structured_outputs.structural_tag is not None
    assert "click" in params.structured_outputs.structural_tag
    assert params.skip_special_tokens is False
    assert _plan(tokenizer, tools=(TOOL,), tool_choice="none").sampling_params(64, {}).structured_outputs is None


def test_tool_choice_without_a_tool_parser_is_a_400(tokenizer):
    for choice in ("auto", "required"):
        with pytest.raises(InvalidRequestError) as refused:
            _plan(tokenizer, tool_parser=None, tools=(TOOL,), tool_choice=choice)
        assert refused.value.param == "tool_choice"
    assert _plan(tokenizer, tool_parser=None, tools=(TOOL,), tool_choice="none").parser_cls is None


@pytest.mark.parametrize("choice, finish", [("auto", "tool_calls"), ("required", "tool_calls"),
                                            ({"type": "function", "function": {"name": "click"}}, "stop")])
def test_streamed_calls_are_split_out_with_vllms_finish_reason(tokenizer, choice, finish):
    # With a structural-tag parser (hermes) forced calls are written in the parser's own format too.
    plan = _plan(tokenizer, tools=(TOOL,), tool_choice=choice)
    content, _, name, arguments, last = _stream(AnswerSplitter(plan, tokenizer, None), _pieces(tokenizer, CALL_TEXT))
    assert (content, name, json.loads(arguments), last) == ("", "click", {"button": "ok"}, finish)


def test_a_whole_answer_is_parsed_once(tokenizer):
    plan = _plan(tokenizer, tools=(TOOL,), streamed=False)
    splitter = AnswerSplitter(plan, tokenizer, None)
    pieces = _pieces(tokenizer, "Sure." + CALL_TEXT)
    outs = [splitter.split(0, text, ids, "stop" if i == len(pieces) - 1 else None, [1])
            for i, (text, ids) in enumerate(pieces)]
    assert all(out.content == "" and out.tool_calls is None for out in outs[:-1])
    last = outs[-1]
    assert last.content == "Sure." and last.finish_reason == "tool_calls" and not last.content_null
    (call,) = last.tool_calls
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("click", {"button": "ok"})


def test_no_call_in_an_auto_answer_leaves_the_text_as_content(tokenizer):
    plan = _plan(tokenizer, tools=(TOOL,))
    content, _, name, _, last = _stream(AnswerSplitter(plan, tokenizer, None), _pieces(tokenizer, "the final result"))
    assert (content, name, last) == ("the final result", "", "stop")


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    plan = _plan(tokenizer, tools=(TOOL,), parallel_tool_calls=False, streamed=False)
    splitter = AnswerSplitter(plan, tokenizer, None)
    pieces = _pieces(tokenizer, CALL_TEXT + CALL_TEXT.replace('"ok"', '"cancel"'))
    last = [splitter.split(0, text, ids, "stop" if i == len(pieces) - 1 else None, [1])
            for i, (text, ids) in enumerate(pieces)][-1]
    assert [json.loads(call["function"]["arguments"]) for call in last.tool_calls] == [{"button": "ok"}]


@pytest.mark.parametrize("streamed", [True, False])
def test_a_reasoning_parser_separates_the_thinking(tokenizer, streamed):
    plan = _plan(tokenizer, tool_parser=None, reasoning_parser="qwen3", streamed=streamed)
    pieces = _pieces(tokenizer, "<think>twelve patches</think>a short answer")
    content, reasoning, *_ = _stream(AnswerSplitter(plan, tokenizer, None), pieces)
    assert (reasoning.strip(), content.strip()) == ("twelve patches", "a short answer")
    hidden = _plan(tokenizer, tool_parser=None, reasoning_parser="qwen3", streamed=streamed, include_reasoning=False)
    content, reasoning, *_ = _stream(AnswerSplitter(hidden, tokenizer, None), pieces)
    assert (reasoning, content.strip()) == ("", "a short answer")


def test_a_whole_answer_without_content_says_so(tokenizer):
    """vLLM answers `content: null` when the parser leaves nothing; a forced call keeps an empty string."""
    for choice, null in (("auto", True), ("required", False)):
        splitter = AnswerSplitter(_plan(tokenizer, tools=(TOOL,), tool_choice=choice, streamed=False), tokenizer, None)
        pieces = _pieces(tokenizer, CALL_TEXT)
        last = [splitter.split(0, text, ids, "stop" if i == len(pieces) - 1 else None, [1])
                for i, (text, ids) in enumerate(pieces)][-1]
        assert (last.content, last.content_null) == ("", null)
