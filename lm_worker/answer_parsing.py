"""Tools and reasoning for one request, done by vLLM's own machinery exactly where vLLM's OpenAI server does it.

vLLM's server (vllm/entrypoints/openai/chat_completion/serving.py, vllm/renderers/online_renderer.py) builds a
`ChatCompletionRequest`, lets its composed `Parser` (a tool parser such as hermes plus a reasoning parser, from
`vllm.parser.ParserManager`) adjust it (forced tool calls become a structural-tag constraint, tool-call markup
keeps its special tokens), maps it to `SamplingParams`, and then splits the output: `Parser.parse_delta` per
streamed delta, `Parser.parse` once over the whole text for a non-streamed answer, one parser per choice.
`RequestPlan` does the same steps for a `ChatJob`; `AnswerSplitter` the output side, with vLLM's finish-reason
rule (`tool_calls` when an auto or required call was made, `stop` for a named one) and its
`parallel_tool_calls=false` filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dvd_serve.common.chat import AnswerOptions, PromptOptions, SamplingConfig
from dvd_serve.common.errors import InvalidRequestError

AUTO = "auto"
# Language-model families -> the tool-call format they were trained on (Qwen2.5 / Qwen3: JSON in <tool_call> tags,
# vLLM's hermes parser). The InternVL3.5 templates do not render tools, so the family decides, not the template.
TOOL_PARSER_BY_LLM = {"qwen2": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes"}
TOOL_MARKUP = {"hermes": "<tool_call>"}  # tool parser -> what a chat template writes when it renders tools
THINKING_SWITCH = "enable_thinking"  # a chat template reading this opens thinking unless told not to (Qwen3 style)


def choose_parsers(tool_parser: str | None, reasoning_parser: str | None, llm_type: str,
                   chat_template: str) -> tuple[str | None, str | None]:
    """The vLLM parser names for a checkpoint: given names as they are; `auto` from the checkpoint (the tool
    format of its language model's family, or of the markup its template writes; qwen3 reasoning when the
    template reads `enable_thinking`, else none)."""
    if tool_parser == AUTO:
        tool_parser = TOOL_PARSER_BY_LLM.get(llm_type) or next(
            (name for name, markup in TOOL_MARKUP.items() if markup in chat_template), None)
    if reasoning_parser == AUTO:
        reasoning_parser = "qwen3" if THINKING_SWITCH in chat_template else None
    return tool_parser, reasoning_parser


def parser_class(tool_parser: str | None, reasoning_parser: str | None, model_name: str, tokenizer):
    """vLLM's composed parser class (None when neither is set); fails at start-up when the tokenizer lacks what
    the parsers need, as vLLM's server does."""
    from vllm.parser import ParserManager

    return ParserManager.get_parser(
        tool_parser_name=tool_parser,
        reasoning_parser_name=reasoning_parser,
        enable_auto_tools=tool_parser is not None,
        model_name=model_name,
        tokenizer=tokenizer,
    )


def vllm_chat_request(sampling: SamplingConfig, answer: AnswerOptions, prompt: PromptOptions):
    """vLLM's own request model for the job (no messages: the prompt is rendered separately); its validators
    check the tool fields as on vLLM's server. Always streamed: the return path carries deltas."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    fields: dict[str, Any] = dict(
        messages=[],
        stream=True,
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs is not None,
        top_logprobs=sampling.logprobs or 0,
        logit_bias={str(token): bias for token, bias in sampling.logit_bias.items()} if sampling.logit_bias else None,
        allowed_token_ids=list(sampling.allowed_token_ids) if sampling.allowed_token_ids is not None else None,
        bad_words=list(sampling.bad_words),
        ignore_eos=sampling.ignore_eos,
        skip_special_tokens=sampling.skip_special_tokens,
        spaces_between_special_tokens=sampling.spaces_between_special_tokens,
        response_format=sampling.response_format,
        structured_outputs=sampling.structured_outputs,
        include_reasoning=answer.include_reasoning,
        reasoning_effort=answer.reasoning_effort,
        chat_template_kwargs=dict(prompt.template_kwargs) or None,
        add_generation_prompt=prompt.add_generation_prompt,
        continue_final_message=prompt.continue_final_message,
        documents=list(prompt.documents) if prompt.documents is not None else None,
    )
    if answer.tools:
        fields["tools"] = [dict(tool) for tool in answer.tools]
    if answer.tool_choice is not None:  # absent, vLLM's validator picks auto when there are tools
        fields["tool_choice"] = answer.tool_choice
    if answer.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = answer.parallel_tool_calls
    return VllmChatRequest(**fields)


def template_kwargs(request) -> dict[str, Any]:
    """The chat-template variables vLLM renders with (`build_chat_params`: the request's settings over its
    `chat_template_kwargs`, `reasoning_effort` mapped to `enable_thinking`)."""
    return request.build_chat_params(None, "auto").chat_template_kwargs


def tool_dicts(request) -> list[dict[str, Any]] | None:
    """The tools as vLLM hands them to the chat template (its models' dump, defaults included)."""
    return None if request.tools is None else [tool.model_dump() for tool in request.tools]


@dataclass
class RequestPlan:
    """One job's vLLM request, after the parser has adjusted it; `parser_cls` None = no tool or reasoning parser."""

    request: Any  # vLLM's ChatCompletionRequest
    sampling: SamplingConfig
    parser_cls: Any
    chat_template_kwargs: dict[str, Any]
    streamed: bool

    @classmethod
    def build(cls, sampling: SamplingConfig, answer: AnswerOptions, prompt: PromptOptions, parser_cls,
              tokenizer, model_config) -> "RequestPlan":
        request = vllm_chat_request(sampling, answer, prompt)
        _check_tool_choice_possible(request, parser_cls)
        kwargs = template_kwargs(request)
        plan = cls(request=request, sampling=sampling, parser_cls=parser_cls, chat_template_kwargs=kwargs,
                   streamed=answer.streamed)
        if parser_cls is not None and (parser_cls.always_adjust_request or parser_cls.reasoning_parser_cls is not None
                                       or request.tool_choice != "none"):
            plan.request = plan.new_parser(tokenizer, model_config).adjust_request(request=request)
        return plan

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template receives them."""
        return tool_dicts(self.request)

    def new_parser(self, tokenizer, model_config):
        return self.parser_cls(tokenizer, self.request.tools, chat_template_kwargs=self.chat_template_kwargs,
                               model_config=model_config)

    def sampling_params(self, max_tokens: int, defaults: dict):
        return self.request.to_sampling_params(max_tokens, defaults)

    def reasoning_ended(self, parser, prompt_token_ids: list[int]) -> bool | None:
        """vLLM's hint to the engine's structured-output gate: whether reasoning is already over at the start."""
        return self.request.resolve_reasoning_ended(parser, prompt_token_ids)


def _check_tool_choice_possible(request, parser_cls) -> None:
    """vLLM's refusals when no tool parser is configured (`render_chat`), as 400s."""
    if request.tool_choice in (None, "none") or (parser_cls is not None and parser_cls.tool_parser_cls is not None):
        return
    if request.tool_choice == "auto":
        message = "'tool_choice' auto needs a tool-call parser, and this checkpoint has none configured."
    else:
        message = "Forced tool calls need a tool-call parser, and this checkpoint has none configured."
    raise InvalidRequestError(message, code="unsupported_parameter", param="tool_choice")


@dataclass(slots=True)
class SplitOutput:
    """One choice's new output, split."""

    content: str
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    content_null: bool = False  # whole answers: the parser found no content (vLLM then answers `content: null`)


@dataclass
class AnswerSplitter:
    """Splits each choice's output into content, reasoning and tool calls with one vLLM parser per choice."""

    plan: RequestPlan
    tokenizer: Any
    model_config: Any
    _parsers: dict[int, Any] = field(default_factory=dict)
    _whole_text: dict[int, list[str]] = field(default_factory=dict)
    _whole_ids: dict[int, list[int]] = field(default_factory=dict)
    _tools_streamed: set[int] = field(default_factory=set)

    def split(self, index: int, text: str, token_ids: list[int], finish_reason: str | None,
              prompt_token_ids: list[int] | None) -> SplitOutput:
        parser = self._parsers.get(index)
        if parser is None:
            parser = self._parsers[index] = self.plan.new_parser(self.tokenizer, self.model_config)
        if self.plan.streamed:
            return self._streamed(index, parser, text, token_ids, finish_reason, prompt_token_ids)
        self._whole_text.setdefault(index, []).append(text)
        self._whole_ids.setdefault(index, []).extend(token_ids)
        if finish_reason is None:
            return SplitOutput(content="")
        return self._whole(index, parser, finish_reason, prompt_token_ids)

    def _streamed(self, index, parser, text, token_ids, finish_reason, prompt_token_ids) -> SplitOutput:
        request = self.plan.request
        delta = parser.parse_delta(text, list(token_ids), request, prompt_token_ids,
                                   finished=finish_reason is not None)
        if delta is None:
            return SplitOutput(content="", finish_reason=self._finish(index, finish_reason))
        calls = [call.model_dump(exclude_none=True) for call in delta.tool_calls] or None
        if calls and request.parallel_tool_calls is False:  # vLLM's `maybe_filter_parallel_tool_calls`
            calls = [call for call in calls if call["index"] == 0] or None
        if calls:
            self._tools_streamed.add(index)
        return SplitOutput(content=delta.content or "", reasoning=delta.reasoning or "", tool_calls=calls,
                           finish_reason=self._finish(index, finish_reason))

    def _finish(self, index: int, finish_reason: str | None) -> str | None:
        if finish_reason == "stop" and index in self._tools_streamed and not _named_choice(self.plan.request):
            return "tool_calls"
        return finish_reason

    def _whole(self, index, parser, finish_reason, prompt_token_ids) -> SplitOutput:
        from vllm.renderers.chat_utils import make_tool_call_id

        request = self.plan.request
        if prompt_token_ids is not None:
            parser.set_prompt_token_ids(prompt_token_ids)
        reasoning, content, calls = parser.parse(
            "".join(self._whole_text.pop(index)), request,
            enable_auto_tools=self.plan.parser_cls.tool_parser_cls is not None,
            model_output_token_ids=self._whole_ids.pop(index),
        )
        if not request.include_reasoning:
            reasoning = None
        choice = request.tool_choice
        forced = choice == "required" or _named_choice(request)
        auto = (choice == "auto" or choice is None) and bool(request.tools)
        tool_calls = None
        if calls and (forced or auto):
            tool_calls = [
                {"id": call.id or make_tool_call_id(), "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
                for call in calls
            ]
            if request.parallel_tool_calls is False:
                tool_calls = tool_calls[:1]
        if (auto and tool_calls) or (choice == "required" and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return SplitOutput(content=content or "", reasoning=reasoning or "", tool_calls=tool_calls,
                           finish_reason=finish_reason, content_null=content is None and not forced)


def _named_choice(request) -> bool:
    return request.tool_choice is not None and not isinstance(request.tool_choice, str)
