"""Compatibility suite: the same requests, sent with the official `openai` client to vLLM's own OpenAI server and to
`dvd-serve serve` (both real, same checkpoint, float32, both checkpoint formats), get the same status class and,
at temperature 0, the same answer (text and token counts).

One pair of servers per checkpoint format, shared by every case of the module. Neither is given a context length:
both take the checkpoint's own. Every case sets `max_tokens`, so none runs to the end of the context.

Random weights wander: inside a JSON grammar they write whitespace until the token budget ends. Cases that need a
finished tool call therefore forbid the whitespace-only tokens with `logit_bias` (on both servers alike) and ask
for a single call (`parallel_tool_calls=false`), so the grammar ends the call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest

from tests.dvd_fixtures import ServerProcess, data_url, free_port, running, synthetic_image

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 600
MAX_TOKENS = 6

IMAGE_A = data_url(synthetic_image(448, 448, seed=21))
IMAGE_B = data_url(synthetic_image(896, 448, seed=22))


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


@pytest.fixture(scope="module", params=["chat", "hf"], ids=["chat-format", "hf-format"])
def server_pair(request, session_tmp):
    """(dvd-serve, vLLM's own server) on one tiny checkpoint; started once for all cases of that format."""
    fmt = request.param
    model = str(request.getfixturevalue(f"tiny_{fmt}_checkpoint"))
    ours = ServerProcess(
        "dvd-serve",
        [str(Path(sys.executable).parent / "dvd-serve"), "serve", "--model", model, "--port", str(port := free_port()),
         "--dtype", "float32"],
        port, "/ready", session_tmp / f"dvd-serve-compat-{fmt}.log",
    )
    reference = ServerProcess(
        "vllm",
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
         "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port", str(reference_port := free_port()),
         "--limit-mm-per-prompt", '{"image": 4}', *(["--trust-remote-code"] if fmt == "chat" else []),
         # dvd-serve picks hermes by itself for the Qwen-based checkpoints; vLLM's server is told.
         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        reference_port, "/health", session_tmp / f"vllm-compat-{fmt}.log",
    )
    with running(ours, reference, timeout_s=READY_TIMEOUT_S):
        yield ours.client(max_retries=0), reference.client(max_retries=0)


def _outcome(client: openai.OpenAI, messages: list, **fields) -> tuple[str, object]:
    """('2xx', (texts of the choices, prompt tokens, completion tokens)) or ('4xx' / '5xx', None)."""
    fields.setdefault("max_tokens", MAX_TOKENS)
    fields.setdefault("temperature", 0.0)
    extra = fields.pop("extra_body", {})
    model = client.models.list().data[0].id
    try:
        answer = client.chat.completions.create(model=model, messages=messages, extra_body=extra, **fields)
    except openai.APIStatusError as error:
        return f"{error.status_code // 100}xx", None
    texts = tuple(choice.message.content for choice in sorted(answer.choices, key=lambda choice: choice.index))
    return "2xx", (texts, answer.usage.prompt_tokens, answer.usage.completion_tokens)


def _same(server_pair, messages: list, **fields) -> tuple[str, object]:
    ours, reference = server_pair
    expected = _outcome(reference, messages, **fields)
    assert _outcome(ours, messages, **fields) == expected
    return expected


CONTENT_ORDERS = {
    "text-first": [_text("What is in this picture?"), _image(IMAGE_A)],
    "image-first": [_image(IMAGE_A), _text("What is in this picture?")],
    "interleaved-multi-image": [_text("First:"), _image(IMAGE_A), _text("Second:"), _image(IMAGE_B),
                                _text("Compare them.")],
    "images-only": [_image(IMAGE_B), _image(IMAGE_A)],
}


@pytest.mark.parametrize("order", list(CONTENT_ORDERS))
def test_content_in_the_users_order_gives_vllms_tokens(server_pair, order):
    status, answer = _same(server_pair, [{"role": "user", "content": CONTENT_ORDERS[order]}])
    assert status == "2xx" and answer[2] == MAX_TOKENS


def test_text_first_and_image_first_prompts_differ(server_pair):
    ours, _ = server_pair
    text_first = _outcome(ours, [{"role": "user", "content": CONTENT_ORDERS["text-first"]}])
    image_first = _outcome(ours, [{"role": "user", "content": CONTENT_ORDERS["image-first"]}])
    assert text_first[0] == image_first[0] == "2xx" and text_first[1][0] != image_first[1][0]


def test_multi_turn_appending_the_sdks_message_objects(server_pair):
    """The SDK's own examples: append `choices[0].message` (it carries refusal, annotations, audio, tool_calls)."""
    conversations = []
    for client in server_pair:
        model = client.models.list().data[0].id
        messages: list = [
            {"role": "system", "content": "You describe pictures."},
            {"role": "user", "content": [_text("Look:"), _image(IMAGE_A)]},
        ]
        first = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        messages += [first.choices[0].message, {"role": "user", "content": [_image(IMAGE_B), _text("And this?")]}]
        second = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        messages += [second.choices[0].message.model_dump(), {"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": "Thanks."}]
        third = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        conversations.append([(answer.choices[0].message.content, answer.usage.prompt_tokens)
                              for answer in (first, second, third)])
    assert conversations[0] == conversations[1]


SAMPLING_CASES = {
    "penalties": dict(presence_penalty=1.5, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3}),
    "logit_bias": dict(logit_bias={"100": 50, "101": -100, "7": 30}),
    "min_tokens_ignoring_eos_ids": dict(extra_body={"min_tokens": 4, "top_k": 5, "min_p": 0.1}),
    "stop_token_ids": dict(max_tokens=12, extra_body={"stop_token_ids": [100, 200, 300]}),
    "template_kwargs": dict(extra_body={"chat_template_kwargs": {"unused_variable": 1}, "skip_special_tokens": False}),
    "n_sampled": dict(n=3, temperature=1.0, seed=7),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_fields_are_honoured_like_vllm(server_pair, case):
    fields = dict(SAMPLING_CASES[case])
    messages = [{"role": "user", "content": [_image(IMAGE_A), _text("Describe it.")]}]
    ours, reference = server_pair
    if case == "n_sampled":  # sampled: compare the shape of the answer, not its tokens
        theirs, mine = _outcome(reference, messages, **fields), _outcome(ours, messages, **fields)
        assert theirs[0] == mine[0] == "2xx"
        assert len(mine[1][0]) == len(theirs[1][0]) == 3 and mine[1][1:] == theirs[1][1:]
        return
    assert _same(server_pair, messages, **fields)[0] == "2xx"


def test_continue_final_message_like_vllm(server_pair):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    status, _ = _same(server_pair, messages,
                      extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert status == "2xx"


BAD_INPUT = {
    "min_tokens_above_max_tokens": dict(max_tokens=3, extra_body={"min_tokens": 5}),
    "presence_penalty_out_of_range": dict(presence_penalty=3.0),
    "logit_bias_id_outside_vocab": dict(logit_bias={"999999999": 5}),
    "greedy_with_n_2": dict(n=2, temperature=0.0),
    "top_p_zero": dict(top_p=0.0),
    "max_tokens_beyond_context": dict(max_tokens=10**7),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_4xx_on_both(server_pair, case):
    status, _ = _same(server_pair, [{"role": "user", "content": "Hi"}], **BAD_INPUT[case])
    assert status == "4xx"
    # and nothing is disturbed: the next request is answered normally
    assert _outcome(server_pair[0], [{"role": "user", "content": "Hi"}])[0] == "2xx"


def test_streamed_choices_carry_their_index_and_usage_is_summed(server_pair):
    totals = []
    for client in server_pair:
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], n=2, temperature=1.0, seed=3,
            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        indices, usage = set(), None
        for chunk in stream:
            indices |= {choice.index for choice in chunk.choices}
            usage = chunk.usage or usage
        totals.append((indices, usage.completion_tokens, usage.prompt_tokens))
    assert totals[0] == totals[1] == ({0, 1}, 2 * MAX_TOKENS, totals[1][2])



def _vllm_families(client: openai.OpenAI) -> dict[str, tuple[str, frozenset[str], tuple[float, ...]]]:
    """name -> (type, label names, histogram bucket bounds) of every `vllm:*` family a server's /metrics has."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(str(client.base_url).removesuffix("/").removesuffix("/v1") + "/metrics", timeout=30).text
    families = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        labels = frozenset(key for sample in family.samples for key in sample.labels if key != "le")
        bounds = tuple(sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}))
        families[family.name] = (family.type, labels, bounds)
    return families


def test_vllm_named_metrics_mean_what_vllms_server_exports(server_pair):
    """Every `vllm:*` series dvd-serve exports exists on vLLM's own server with the same type, a subset of its
    labels and, for the latency histograms, the same buckets; after the same requests both have counted them."""
    _same(server_pair, [{"role": "user", "content": "Count this request."}])
    ours, reference = (_vllm_families(client) for client in server_pair)
    assert {"vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:request_success"} <= ours.keys()
    for name, (kind, labels, bounds) in ours.items():
        assert name in reference, name
        reference_kind, reference_labels, reference_bounds = reference[name]
        assert kind == reference_kind and labels <= reference_labels, name
        if name.endswith("_seconds"):
            assert bounds == reference_bounds, name


COLOUR_SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["colour"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", "maybe"]
# The constraint and a check that an answer ending with finish_reason "stop" meets it.
STRUCTURED_CASES = {
    "choice": (dict(extra_body={"structured_outputs": {"choice": CHOICES}}), lambda text: text in CHOICES),
    "regex": (dict(extra_body={"structured_outputs": {"regex": "[a-z]{3,8}"}}),
              lambda text: text.isalpha() and text.islower() and 3 <= len(text) <= 8),
    "grammar": (dict(extra_body={"structured_outputs": {"grammar": 'root ::= "cat" | "dog" | "bird"'}}),
                lambda text: text in ("cat", "dog", "bird")),
    "json_schema_strict_enum": (
        dict(response_format={"type": "json_schema",
                              "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA, "strict": True}}),
        lambda text: json.loads(text)["colour"] in ("red", "green", "blue"),
    ),
    "json_object": (dict(response_format={"type": "json_object"}), lambda text: isinstance(json.loads(text), dict)),
    "structured_outputs_json": (dict(extra_body={"structured_outputs": {"json": COLOUR_SCHEMA}}),
                                lambda text: set(json.loads(text)) == {"colour"}),
}


@pytest.mark.parametrize("case", list(STRUCTURED_CASES))
def test_structured_outputs_give_vllms_tokens_and_meet_the_constraint(server_pair, case):
    fields, meets = STRUCTURED_CASES[case]
    messages = [{"role": "user", "content": [_image(IMAGE_A), _text("Answer in the requested form.")]}]
    answers = []
    for client in server_pair:
        answer = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=messages, temperature=0.0, max_tokens=48,
            **{key: value for key, value in fields.items()})
        choice = answer.choices[0]
        answers.append((choice.message.content, choice.finish_reason, answer.usage.completion_tokens))
    assert answers[0] == answers[1]
    text, finish_reason, _ = answers[0]
    if finish_reason == "stop":
        assert meets(text), text
    else:  # random weights may wander inside the grammar until the token budget ends
        assert finish_reason == "length"


BAD_CONSTRAINTS = {
    "invalid_json_schema": dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}),
    "grammar_syntax_error": dict(extra_body={"structured_outputs": {"grammar": "root ::= ("}}),
    "invalid_regex": dict(extra_body={"structured_outputs": {"regex": "[a-"}}),
    "two_constraints": dict(extra_body={"structured_outputs": {"regex": "a+", "choice": ["a"]}}),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRAINTS))
def test_invalid_constraints_are_a_4xx_on_both(server_pair, case):
    status, _ = _same(server_pair, [{"role": "user", "content": "Hi"}], **BAD_CONSTRAINTS[case])
    assert status == "4xx"
    assert _outcome(server_pair[0], [{"role": "user", "content": "Hi"}])[0] == "2xx"



# ---- tools, through vLLM's hermes tool parser and its structural-tag constraint on both servers ----

TOOLS = [
    {"type": "function", "function": {"name": "click", "description": "Click a button.", "strict": True, "parameters": {
        "type": "object", "properties": {"button": {"type": "string", "enum": ["ok", "cancel"]}},
        "required": ["button"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "scroll", "parameters": {
        "type": "object", "properties": {"down": {"type": "boolean"}}, "required": ["down"]}}},
]
# Strict tools: their arguments are held to the schema too, so a forced call ends (see the module's note).
STRICT_TOOLS = [TOOLS[0], {"type": "function", "function": {**TOOLS[1]["function"], "strict": True, "parameters": {
    **TOOLS[1]["function"]["parameters"], "additionalProperties": False}}}]
TOOL_CHOICES = {
    "auto": {},
    "none": dict(tool_choice="none"),
    "required": dict(tool_choice="required"),
    "named": dict(tool_choice={"type": "function", "function": {"name": "scroll"}}),
    "required_single": dict(tool_choice="required", parallel_tool_calls=False),
}


@pytest.fixture(scope="module")
def compact_json(tiny_chat_checkpoint) -> dict[str, int]:
    """`logit_bias` forbidding every whitespace-only token (both formats share the tokenizer)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_chat_checkpoint / "tokenizer.json"))
    return {str(token): -100 for token in range(tokenizer.get_vocab_size()) if not tokenizer.decode([token]).strip()}


def _tool_answer(client: openai.OpenAI, messages: list, stream: bool, **fields) -> tuple:
    """(finish_reason, content, [(name, arguments)]) of one answer, summed over its chunks when streamed."""
    model = client.models.list().data[0].id
    fields = {"temperature": 0.0, "max_tokens": 40, "tools": TOOLS, **fields}
    if not stream:
        choice = client.chat.completions.create(model=model, messages=messages, **fields).choices[0]
        calls = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or ()]
        return choice.finish_reason, choice.message.content or "", calls
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **fields):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += (call.function.name or "") if call.function else ""
                entry[1] += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
    return finish, content, [tuple(entry) for _, entry in sorted(calls.items())]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", list(TOOL_CHOICES))
def test_tool_choices_give_vllms_answer(server_pair, choice, stream):
    messages = [{"role": "user", "content": [_image(IMAGE_A), _text("Press the button.")]}]
    ours, reference = server_pair
    expected = _tool_answer(reference, messages, stream, **TOOL_CHOICES[choice])
    assert _tool_answer(ours, messages, stream, **TOOL_CHOICES[choice]) == expected


@pytest.mark.parametrize("choice, finish", [("required", "tool_calls"),
                                            ({"type": "function", "function": {"name": "click"}}, "stop")],
                         ids=["required", "named"])
def test_a_forced_call_meets_its_schema(server_pair, compact_json, choice, finish):
    messages = [{"role": "user", "content": "Press ok."}]
    answers = [_tool_answer(client, messages, False, tools=STRICT_TOOLS, tool_choice=choice, parallel_tool_calls=False,
                            logit_bias=compact_json, max_tokens=80) for client in server_pair]
    assert answers[0] == answers[1]
    reason, _, calls = answers[0]
    assert reason == finish and len(calls) == 1
    name, arguments = calls[0]
    assert name in ("click", "scroll") if choice == "required" else name == "click"
    arguments = json.loads(arguments)
    assert arguments in ({"button": "ok"}, {"button": "cancel"}) if name == "click" else (
        list(arguments) == ["down"] and isinstance(arguments["down"], bool))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_agent_loop_with_the_official_client(server_pair, compact_json, stream):
    """Screenshot -> forced tool call -> tool result -> next turn, three rounds, history as the SDK builds it."""
    transcripts = []
    for client in server_pair:
        model = client.models.list().data[0].id
        messages: list = [{"role": "user", "content": [_image(IMAGE_A), _text("Close the dialog.")]}]
        transcript = []
        for round_index in range(3):
            fields = dict(model=model, messages=messages, temperature=0.0, max_tokens=80, tools=STRICT_TOOLS,
                          tool_choice="required", parallel_tool_calls=False, logit_bias=compact_json)
            if stream:
                content, calls, finish = "", {}, None
                for chunk in client.chat.completions.create(stream=True, **fields):
                    for choice in chunk.choices:
                        content += choice.delta.content or ""
                        for call in choice.delta.tool_calls or ():
                            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                            entry["id"] += call.id or ""
                            entry["name"] += call.function.name or ""
                            entry["arguments"] += call.function.arguments or ""
                        finish = choice.finish_reason or finish
                made = [{"id": entry["id"], "type": "function",
                         "function": {"name": entry["name"], "arguments": entry["arguments"]}}
                        for entry in calls.values()]
                messages.append({"role": "assistant", "content": content or None, "tool_calls": made})
            else:
                choice = client.chat.completions.create(**fields).choices[0]
                finish, content = choice.finish_reason, choice.message.content or ""
                made = [call.model_dump() for call in choice.message.tool_calls or ()]
                messages.append(choice.message)  # the SDK's message object, as its examples do
            assert finish == "tool_calls" and len(made) == 1, (round_index, finish, content)
            call = made[0]
            json.loads(call["function"]["arguments"])
            transcript.append((call["function"]["name"], call["function"]["arguments"], content))
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": json.dumps({"round": round_index, "done": round_index == 2})})
        transcripts.append(transcript)
    assert transcripts[0] == transcripts[1]


def test_reasoning_controls_are_mapped_as_vllm_maps_them(server_pair):
    """The checkpoint's template (like the published InternVL3.5 one) has no thinking switch: vLLM renders the same
    prompt, so the answers are equal and nothing is refused."""
    messages = [{"role": "user", "content": "Hi"}]
    assert _same(server_pair, messages, reasoning_effort="low")[0] == "2xx"
    assert _same(server_pair, messages, extra_body={"chat_template_kwargs": {"enable_thinking": True},
                                                    "include_reasoning": False})[0] == "2xx"


BAD_TOOLS = {
    "named_tool_not_in_tools": dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "type"}}),
    "tool_choice_without_tools": dict(tool_choice="required"),
    "empty_tools": dict(tools=[]),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tool_requests_are_a_4xx_on_both(server_pair, case):
    status, _ = _same(server_pair, [{"role": "user", "content": "Hi"}], **BAD_TOOLS[case])
    assert status == "4xx"


def test_tool_input_vllm_would_accept_and_fail_on_later_is_a_400_here(server_pair):
    ours, _ = server_pair
    orphan_result = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call-9", "content": "1"}]
    assert _outcome(ours, orphan_result)[0] == "4xx"
    not_an_object = [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]
    assert _outcome(ours, [{"role": "user", "content": "Hi"}], tools=not_an_object)[0] == "4xx"
    assert _outcome(ours, [{"role": "user", "content": "Hi"}])[0] == "2xx"


def test_tokenizing_a_tool_conversation_gives_vllms_tokens(server_pair):
    """/tokenize renders tools, tool calls and tool results exactly as generation does, on both servers."""
    import httpx

    call = {"id": "call-1", "type": "function", "function": {"name": "click", "arguments": '{"button": "ok"}'}}
    body = {"messages": [{"role": "user", "content": "Press ok."},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call-1", "content": "pressed"}],
            "tools": TOOLS}
    answers = []
    for client in server_pair:
        base = str(client.base_url).removesuffix("/").removesuffix("/v1")
        response = httpx.post(f"{base}/tokenize", json={**body, "model": client.models.list().data[0].id},
                              timeout=60)
        assert response.status_code == 200, response.text
        answers.append(response.json()["tokens"])
    assert answers[0] == answers[1] and answers[0]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_every_choice_of_n_gets_its_own_tool_call(server_pair, compact_json, stream):
    """n > 1: one parser per choice (sampled, so the shape of the answer is compared, not its tokens)."""
    shapes = []
    for client in server_pair:
        model = client.models.list().data[0].id
        fields = dict(model=model, messages=[{"role": "user", "content": "Press ok."}], n=2, temperature=1.0, seed=5,
                      max_tokens=80, tools=STRICT_TOOLS, tool_choice="required", parallel_tool_calls=False,
                      logit_bias=compact_json)
        calls: dict[int, dict[int, list[str]]] = {0: {}, 1: {}}
        finishes: dict[int, str] = {}
        if stream:
            for chunk in client.chat.completions.create(stream=True, **fields):
                for choice in chunk.choices:
                    for call in choice.delta.tool_calls or ():
                        entry = calls[choice.index].setdefault(call.index, ["", ""])
                        entry[0] += call.function.name or ""
                        entry[1] += call.function.arguments or ""
                    finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        else:
            for choice in client.chat.completions.create(**fields).choices:
                calls[choice.index] = {i: [call.function.name, call.function.arguments]
                                       for i, call in enumerate(choice.message.tool_calls or ())}
                finishes[choice.index] = choice.finish_reason
        for index in (0, 1):
            assert len(calls[index]) == 1, (index, calls, finishes)
            name, arguments = calls[index][0]
            assert name in ("click", "scroll") and isinstance(json.loads(arguments), dict)
        shapes.append(sorted(finishes.items()))
    assert shapes[0] == shapes[1] == [(0, "tool_calls"), (1, "tool_calls")]
