"""What real OpenAI and vLLM clients send, in process against `ScriptedPipelineDouble`: multi-turn with the SDK's
own message objects, vLLM's extra fields mapped to the job, n > 1 streamed with `index`, X-Request-Id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessage

from dvd_serve.common.chat import GenerationDelta
from dvd_serve.server.api import create_app
from dvd_serve.server.gateway_config import GatewayConfig

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_doubles import FIRST_TIMINGS, LAST_TIMINGS, ScriptedPipelineDouble  # noqa: E402

MODEL = "internvl-double"


def two_choices() -> list[GenerationDelta]:
    """Choice 0 says `t1 t2`, choice 1 says `t7`; the deltas interleave as vLLM's n > 1 outputs do."""
    return [
        GenerationDelta([1], "t1", index=0, choices_running=1, prompt_token_count=40, timings=FIRST_TIMINGS),
        GenerationDelta([7], "t7", finish_reason="length", index=1, choices_running=1),
        GenerationDelta([2], "t2", finish_reason="stop", index=0, choices_running=0, timings=LAST_TIMINGS),
    ]


@pytest.fixture
def double() -> ScriptedPipelineDouble:
    return ScriptedPipelineDouble()


@pytest.fixture
async def client(double):
    app = create_app(double, GatewayConfig(max_n=4))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as http:
        yield http


@pytest.fixture
def openai_client(client):
    return openai.AsyncOpenAI(api_key="unused", base_url="http://gateway.test/v1", http_client=client, max_retries=0)


def sse_documents(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]


async def test_multi_turn_appending_the_sdks_own_message_objects(openai_client, double):
    messages: list = [{"role": "user", "content": "Hello"}]
    first = await openai_client.chat.completions.create(model=MODEL, messages=messages)
    # Both ways the SDK's examples continue a conversation: the message object itself, and its model_dump().
    messages.append(first.choices[0].message)
    messages.append({"role": "user", "content": "And then?"})
    second = await openai_client.chat.completions.create(model=MODEL, messages=messages)
    messages += [second.choices[0].message.model_dump(), {"role": "user", "content": "Thanks."}]
    await openai_client.chat.completions.create(model=MODEL, messages=messages)
    last_job = double.jobs[-1]
    assert [message.role for message in last_job.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert last_job.messages[1].parts[0].text == "t11t12t13"


async def test_assistant_fields_at_their_empty_values_and_refusal_parts_are_accepted(client, double):
    dumped = ChatCompletionMessage(role="assistant", content="Sure.").model_dump()
    assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(dumped)
    messages = [
        {"role": "user", "content": "a"},
        {**dumped, "tool_calls": [], "annotations": []},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}], "name": "bot"},
        {"role": "user", "content": "c"},
    ]
    response = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200, response.text
    job = double.jobs[0]
    assert job.messages[3].parts[0].text == "I cannot." and job.messages[3].name == "bot"


async def test_vllm_extra_fields_reach_the_job(client, double):
    body = {
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3, "temperature": 0.7,
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {"17": -100, "3": 2.5}, "top_k": 5,
        "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2, "max_tokens": 9, "stop_token_ids": [4, 5],
        "skip_special_tokens": False, "chat_template_kwargs": {"enable_thinking": False}, "documents": [{"a": "b"}],
        "mm_processor_kwargs": {"max_dynamic_patch": 4}, "priority": 0, "include_stop_str_in_output": True,
        "bad_words": ["zzz"], "allowed_token_ids": [1, 2, 3], "session_id": "s-1", "use_beam_search": False,
        "echo": False, "add_special_tokens": False, "length_penalty": 1.0, "include_reasoning": True,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    job = double.jobs[0]
    sampling = job.sampling
    assert (sampling.n, sampling.temperature, sampling.presence_penalty, sampling.frequency_penalty) == (
        3, 0.7, 0.5, -0.25)
    assert sampling.logit_bias == {17: -100.0, 3: 2.5}
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty, sampling.min_tokens) == (5, 0.1, 1.2, 2)
    assert sampling.stop_token_ids == (4, 5) and sampling.skip_special_tokens is False
    assert sampling.include_stop_str_in_output and sampling.bad_words == ("zzz",)
    assert sampling.allowed_token_ids == (1, 2, 3)
    assert dict(job.prompt_options.template_kwargs) == {"enable_thinking": False}
    assert job.prompt_options.documents == ({"a": "b"},)
    assert job.prompt_options.add_generation_prompt and not job.prompt_options.continue_final_message


async def test_max_dynamic_patch_is_the_request_tile_cap(client, double):
    image = {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [image]}],
            "mm_processor_kwargs": {"max_dynamic_patch": 3}}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert double.jobs[0].images[0].max_tiles == 3


async def test_continue_final_message_reaches_the_renderer(client, double):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Th"}],
            "add_generation_prompt": False, "continue_final_message": True}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    options = double.jobs[0].prompt_options
    assert (options.add_generation_prompt, options.continue_final_message) == (False, True)


async def test_n_choices_in_one_answer_with_usage_summed(client, double):
    double.script = two_choices()
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 1.0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == [
        (0, "t1t2", "stop"), (1, "t7", "length")]
    assert answer["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                               "prompt_tokens_details": None}
    assert double.finished == [double.jobs[0].request_id]


async def test_n_choices_streamed_with_index_and_continuous_usage(client, double):
    double.script = two_choices()
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 1.0, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = sse_documents(response.text)
    roles = [chunk["choices"][0]["index"] for chunk in chunks if chunk["choices"]
             and chunk["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
        if chunk["choices"]:
            assert chunk["usage"]["prompt_tokens"] == 40  # continuous usage: on every chunk
    assert texts == {0: "t1t2", 1: "t7"} and finishes == {0: "stop", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert response.text.endswith("data: [DONE]\n\n")


async def test_n_beyond_the_configured_bound_is_400(client, double):
    response = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 5})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    assert "at most 4" in response.json()["error"]["message"] and double.jobs == []


async def test_x_request_id_is_honoured_and_echoed(client, double):
    response = await client.post("/v1/chat/completions", headers={"X-Request-Id": "trace-42"},
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "chatcmpl-trace-42"
    # Inside the pipeline the id stays unique even when clients reuse theirs.
    assert double.jobs[0].request_id.startswith("chatcmpl-trace-42-")
    by_body = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "request_id": "body-7"})
    assert by_body.json()["id"] == "chatcmpl-body-7"
    streamed = await client.post("/v1/chat/completions", headers={"X-Request-Id": "s-1"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert streamed.headers["x-request-id"] == "s-1"
    assert {chunk["id"] for chunk in sse_documents(streamed.text)} == {"chatcmpl-s-1"}


async def test_a_bad_x_request_id_is_400(client, double):
    response = await client.post("/v1/chat/completions", headers={"X-Request-Id": "x" * 300},
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "X-Request-Id"
    assert double.jobs == []


async def test_tokenize_a_prompt_and_a_text_chat_and_detokenize(client, double):
    prompt = await client.post("/tokenize", json={"model": MODEL, "prompt": "ab", "return_token_strs": True})
    assert prompt.json() == {"count": 3, "max_model_len": 4096, "tokens": [1, 97, 98], "token_strs": ["t1", "t97", "t98"]}
    chat = await client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                               "chat_template_kwargs": {"x": 1}})
    assert chat.status_code == 200 and chat.json()["tokens"] == [ord(c) for c in "user:hi"]
    assert dict(double.jobs[0].prompt_options.template_kwargs) == {"x": 1}
    back = await client.post("/detokenize", json={"model": MODEL, "tokens": [104, 105]})
    assert back.json() == {"prompt": "hi"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png"}}]}]}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}, "chat_template"),
    ("/tokenize", {"model": "other", "prompt": "x"}, "model"),
    ("/tokenize", {"prompt": "x", "unknown": 1}, "unknown"),
    ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
])
async def test_tokenize_refusals(client, double, path, body, param):
    response = await client.post(path, json=body)
    assert response.status_code in (400, 404) and response.json()["error"]["param"] == param


async def test_version_and_health_like_vllm(client, double):
    version = (await client.get("/version")).json()
    assert version["version"] and version["vllm_version"]
    assert (await client.get("/health")).status_code == 200
    double.engines_are_alive = False
    assert (await client.get("/health")).status_code == 503
