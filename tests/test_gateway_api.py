"""The OpenAI-compatible gateway, in process, against `ScriptedPipelineDouble` (tests/pipeline_doubles.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr

from dvd_serve.common.chat import Detail, GenerationDelta, ImagePart, TextPart
from dvd_serve.common.errors import InvalidRequestError, OverloadedError, UpstreamError
from dvd_serve.server.api import create_app
from dvd_serve.server.gateway_config import GatewayConfig

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_doubles import HANG, ScriptedPipelineDouble, scripted_answer  # noqa: E402

MODEL = "internvl-double"
API_KEY = "sk-test-0123456789"
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode()
SECRET_TEXT = "secret-path /srv/internal 0xdeadbeef"
TEST_CONFIG = GatewayConfig(max_images_per_request=4, max_body_bytes=128 * 1024, request_timeout_s=5.0)


def chat_body(content: object = "Describe the image.", **fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def image_part(url: str = PNG_DATA_URL, **image_fields: object) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **image_fields}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def sse_payloads(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]


def assert_error_shape(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def build(double: ScriptedPipelineDouble, config: GatewayConfig = TEST_CONFIG):
    app = create_app(double, config)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return app, httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


@pytest.fixture
def double() -> ScriptedPipelineDouble:
    return ScriptedPipelineDouble()


@pytest.fixture
async def client(double):
    _app, http = build(double)
    async with http:
        yield http


@pytest.fixture
async def openai_client(client):
    return openai.AsyncOpenAI(api_key="unused", base_url="http://gateway.test/v1", http_client=client, max_retries=0)


@dataclass
class AsgiCall:
    """Drives the ASGI app directly: exact paths (no client-side normalisation), chunked bodies, disconnects."""

    method: str = "GET"
    path: str = "/"
    raw_path: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_chunks: list[bytes] = field(default_factory=lambda: [b""])
    messages: list[dict] = field(default_factory=list)
    disconnect: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_delivered: int = 0

    async def run(self, app) -> None:
        pending = list(self.body_chunks)

        async def receive() -> dict:
            if pending:
                chunk = pending.pop(0)
                self.chunks_delivered += 1
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            await self.disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            self.messages.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": self.method, "scheme": "http", "path": self.path,
            "raw_path": self.raw_path if self.raw_path is not None else self.path.encode(), "query_string": b"",
            "root_path": "", "headers": [(name.lower().encode(), value.encode()) for name, value in self.headers],
            "client": ("127.0.0.1", 50000), "server": ("gateway.test", 80),
        }
        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    @property
    def status(self) -> int:
        return next(message["status"] for message in self.messages if message["type"] == "http.response.start")

    @property
    def body(self) -> bytes:
        bodies = [message for message in self.messages if message["type"] == "http.response.body"]
        return b"".join(message.get("body", b"") for message in bodies)


# ---------- answers ----------


async def test_non_stream_answer_parsed_by_openai_client(openai_client, double):
    completion = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=3
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-") and completion.id == double.jobs[0].request_id
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "t11t12t13"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        530, 3, 533,
    )
    assert double.finished == [completion.id] and double.aborted == []


async def test_stream_with_usage_parsed_by_openai_client(openai_client):
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].delta.content for chunk in chunks[1:4]] == ["t11", "t12", "t13"]
    assert chunks[4].choices[0].finish_reason == "stop" and chunks[4].choices[0].delta.content is None
    assert chunks[5].choices == [] and chunks[5].usage.prompt_tokens == 530
    assert chunks[5].usage.completion_tokens == 3
    assert all(chunk.usage is None for chunk in chunks[:5])
    assert len({chunk.id for chunk in chunks}) == 1


async def test_stream_wire_format_without_usage(client):
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert len(chunks) == 5 and all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert response.headers["x-request-id"] == chunks[0]["id"]


async def test_logprobs_in_openai_format(client, double):
    double.script = scripted_answer(token_ids=(7, 8), with_logprobs=True)
    response = await client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2))
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["t7", "t8"]
    assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == list(b"t7")
    assert [(top["token"], top["logprob"]) for top in content[0]["top_logprobs"]] == [("t7", -0.5), ("t107", -1.5)]
    assert double.jobs[0].sampling.logprobs == 2

    stream = await client.post("/v1/chat/completions", json=chat_body(stream=True, logprobs=True, top_logprobs=1))
    chunks = [json.loads(payload) for payload in sse_payloads(stream.text)[:-1]]
    streamed = [chunk["choices"][0]["logprobs"]["content"] for chunk in chunks[1:3]]
    assert [[(entry["token"], [top["token"] for top in entry["top_logprobs"]]) for entry in entries]
            for entries in streamed] == [[("t7", ["t7"])], [("t8", ["t8"])]]


async def test_request_maps_to_chat_job(client, double):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            text_part("Compare"),
            image_part(detail="low", max_tiles=2),
            image_part("https://images.example.com/b.jpg"),
        ]},
        {"role": "assistant", "content": "Two images."},
        {"role": "developer", "content": [text_part("Answer in English.")]},
        {"role": "user", "content": [image_part("http://images.example.com/c.png", detail="high")]},
    ]
    body = {
        "model": MODEL, "messages": messages, "max_completion_tokens": 17, "temperature": 0.0, "top_p": 0.5,
        "seed": 42, "stop": ["###", "END"], "max_tiles": 6, "ignore_eos": True,
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    job = double.jobs[0]
    assert job.request_id == response.json()["id"]
    # `developer` reaches the renderer, which turns it into `system` when the template has no developer role.
    assert [message.role for message in job.messages] == ["system", "user", "assistant", "developer", "user"]
    assert job.messages[0].parts == (TextPart("Be brief."),)
    assert job.messages[1].parts == (
        TextPart("Compare"),
        ImagePart(PNG_DATA_URL, Detail.LOW, 2, "messages[1].content[1].image_url"),
        ImagePart("https://images.example.com/b.jpg", Detail.AUTO, 6, "messages[1].content[2].image_url"),
    )
    assert job.messages[4].parts == (
        ImagePart("http://images.example.com/c.png", Detail.HIGH, 6, "messages[4].content[0].image_url"),
    )
    assert len(job.images) == 3
    sampling = job.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (17, 0.0, 0.5, 42)
    assert sampling.stop == ("###", "END") and sampling.ignore_eos is True and sampling.logprobs is None
    assert job.deadline_s == TEST_CONFIG.request_timeout_s


async def test_defaults_and_single_stop_string(client, double):
    await client.post("/v1/chat/completions", json=chat_body(stop="\n\n", max_tokens=5))
    await client.post("/v1/chat/completions", json=chat_body())
    assert double.jobs[0].sampling.stop == ("\n\n",) and double.jobs[0].sampling.max_tokens == 5
    default = double.jobs[1].sampling
    # Unset: the engine applies the checkpoint's generation_config defaults, else vLLM's, and the rest of the context.
    assert (default.max_tokens, default.temperature, default.top_p, default.stop) == (None, None, None, ())


async def test_fields_clients_send_by_default_are_accepted(client):
    body = chat_body(
        n=1, stream=False, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="u-1", store=False,
        metadata={"team": "a"}, tool_choice="none", response_format={"type": "text"}, parallel_tool_calls=True,
        service_tier="auto",
    )
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


# ---------- early 400s: decided before the pipeline sees anything ----------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
EARLY_REJECTIONS = [
    ("n above the bound", chat_body(n=17), "n", "invalid_value"),
    ("n 0", chat_body(n=0), "n", "invalid_value"),
    ("presence_penalty 2.5", chat_body(presence_penalty=2.5), "presence_penalty", "invalid_value"),
    ("frequency_penalty -3", chat_body(frequency_penalty=-3), "frequency_penalty", "invalid_value"),
    ("repetition_penalty 0", chat_body(repetition_penalty=0), "repetition_penalty", "invalid_value"),
    ("min_p 2", chat_body(min_p=2), "min_p", "invalid_value"),
    ("top_k -2", chat_body(top_k=-2), "top_k", "invalid_value"),
    ("logit_bias 101", chat_body(logit_bias={"5": 101}), "logit_bias", "invalid_value"),
    ("logit_bias -100.5", chat_body(logit_bias={"5": -100.5}), "logit_bias", "invalid_value"),
    ("logit_bias word key", chat_body(logit_bias={"hello": 1}), "logit_bias", "invalid_value"),
    ("logit_bias negative id", chat_body(logit_bias={"-1": 1}), "logit_bias", "invalid_value"),
    ("min_tokens > max_tokens", chat_body(min_tokens=9, max_tokens=8), "min_tokens", "invalid_value"),
    ("beam search", chat_body(use_beam_search=True), "use_beam_search", "unsupported_parameter"),
    ("request chat_template", chat_body(chat_template="{{ 1 }}"), "chat_template", "unsupported_parameter"),
    ("echo", chat_body(echo=True), "echo", "unsupported_parameter"),
    ("response_format of unknown type", chat_body(response_format={"type": "yaml"}), "response_format.type",
     "invalid_value"),
    ("json_schema format without a schema", chat_body(response_format={"type": "json_schema"}),
     "response_format.json_schema", "invalid_value"),
    ("unknown processor kwarg", chat_body(mm_processor_kwargs={"min_dynamic_patch": 2}),
     "mm_processor_kwargs.min_dynamic_patch", "unsupported_parameter"),
    ("max_dynamic_patch too high", chat_body(mm_processor_kwargs={"max_dynamic_patch": 13}),
     "mm_processor_kwargs.max_dynamic_patch", "invalid_value"),
    ("generation prompt and continue", chat_body(continue_final_message=True), "continue_final_message",
     "invalid_value"),
    ("template kwargs set tokenize", chat_body(chat_template_kwargs={"tokenize": True}),
     "chat_template_kwargs.tokenize", "invalid_value"),
    ("tool result answering no call", {"model": MODEL, "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "42"}]}, "messages[2].tool_call_id", "invalid_value"),
    ("tool result before the call", {"model": MODEL, "messages": [
        {"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_call_id", "invalid_value"),
    ("tool message without an id", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool_call_id", "invalid_value"),
    ("tool_call_id on a user message", {"model": MODEL, "messages": [
        {"role": "user", "content": "a", "tool_call_id": "c1"}]}, "messages[0].tool_call_id", "invalid_value"),
    ("reasoning on a user message", {"model": MODEL, "messages": [
        {"role": "user", "content": "a", "reasoning": "hm"}]}, "messages[0].reasoning", "invalid_value"),
    ("empty tools", chat_body(tools=[]), "tools", "invalid_value"),
    ("129 tools", chat_body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
     "tools", "too_many_tools"),
    ("tool_choice without tools", chat_body(tool_choice="required"), "tool_choice", "invalid_value"),
    ("named tool not in tools", chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", "invalid_value"),
    ("tool parameters not an object schema", chat_body(tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
     "tools[0].function.parameters", "invalid_value"),
    ("tool parameters as a list", chat_body(tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"items": {}}}}]),
     "tools[0].function.parameters", "invalid_value"),
    ("two tools of one name", chat_body(tools=[TOOL, TOOL]), "tools[1].function.name", "invalid_value"),
    ("tool name with spaces", chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]),
     "tools[0].function.name", "invalid_value"),
    ("unknown tool_choice", chat_body(tools=[TOOL], tool_choice="always"), "tool_choice", "invalid_value"),
    ("legacy functions", chat_body(functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    ("reasoning_effort unknown", chat_body(reasoning_effort="extreme"), "reasoning_effort", "invalid_value"),
    ("assistant audio", {"model": MODEL, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "x", "audio": {"id": "a1"}}]},
     "messages[1].audio", "unsupported_parameter"),
    ("refusal in a user message", {"model": MODEL, "messages": [{"role": "user", "content": "a", "refusal": "no"}]},
     "messages[0].refusal", "invalid_value"),
    ("user without content", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content",
     "invalid_value"),
    ("too many images", chat_body([image_part()] * 5), "messages", "too_many_images"),
    ("thousand images", chat_body([image_part("data:image/png;base64,AA==")] * 1000), "messages", "too_many_images"),
    ("empty data URL", chat_body([text_part("x"), image_part("data:image/png;base64,")]),
     "messages[0].content[1].image_url", "invalid_data_url"),
    ("bad base64", chat_body([image_part("data:image/png;base64,@@not-base64@@")]),
     "messages[0].content[0].image_url", "invalid_base64"),
    ("non-image data URL", chat_body([image_part("data:text/html;base64,PGI+")]),
     "messages[0].content[0].image_url", "invalid_data_url"),
    ("file URL", chat_body([image_part("file:///etc/passwd")]), "messages[0].content[0].image_url",
     "unsupported_image_url_scheme"),
    ("ftp URL", chat_body([image_part("ftp://example.com/a.png")]), "messages[0].content[0].image_url",
     "unsupported_image_url_scheme"),
    ("bare path", chat_body([image_part("/etc/passwd")]), "messages[0].content[0].image_url",
     "unsupported_image_url_scheme"),
    ("userinfo URL", chat_body([image_part("http://user@example.com/a.png")]), "messages[0].content[0].image_url",
     "invalid_image_url"),
    ("decimal IP URL", chat_body([image_part("http://2130706433/a.png")]), "messages[0].content[0].image_url",
     "invalid_image_url"),
    ("max_tokens 0", chat_body(max_tokens=0), "max_tokens", "invalid_value"),
    ("max_tokens -1", chat_body(max_tokens=-1), "max_tokens", "invalid_value"),
    ("max_tokens 1e9", chat_body(max_tokens=1e9), "max_tokens", "invalid_value"),
    ("max_tokens text", chat_body(max_tokens="x"), "max_tokens", "invalid_value"),
    ("max_tokens = context", chat_body(max_tokens=4096), "max_tokens", "context_length_exceeded"),
    ("max_completion_tokens huge", chat_body(max_completion_tokens=10**9), "max_completion_tokens",
     "context_length_exceeded"),
    ("max_tokens disagree", chat_body(max_tokens=5, max_completion_tokens=6), "max_tokens", "invalid_value"),
    ("temperature 3", chat_body(temperature=3), "temperature", "invalid_value"),
    ("<IMG_CONTEXT> typed", chat_body("look <IMG_CONTEXT> here"), "messages[0].content", "reserved_token_in_text"),
    ("<img> typed", chat_body([text_part("a <img> b")]), "messages[0].content[0].text", "reserved_token_in_text"),
    ("</img> typed", chat_body("a </img>"), "messages[0].content", "reserved_token_in_text"),
    ("<image> typed", chat_body("<image>\nWhat is it?"), "messages[0].content", "reserved_token_in_text"),
    ("unknown field", chat_body(best_of=2), "best_of", "unknown_parameter"),
    ("top_logprobs alone", chat_body(top_logprobs=2), "top_logprobs", "invalid_value"),
    ("stream_options alone", chat_body(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    ("audio part", chat_body([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
     "messages[0].content[0]", "invalid_value"),
    ("missing url", chat_body([{"type": "image_url", "image_url": {}}]), "messages[0].content[0].image_url.url",
     "missing_required_parameter"),
    ("max_tiles too high", chat_body([image_part(max_tiles=13)]), "messages[0].content[0].image_url.max_tiles",
     "invalid_value"),
    ("empty messages", {"model": MODEL, "messages": []}, "messages", "invalid_value"),
    ("assistant image", {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": [image_part()]}]},
     "messages[1].content[0]", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), [case[1:] for case in EARLY_REJECTIONS],
                         ids=[case[0] for case in EARLY_REJECTIONS])
async def test_early_rejections_are_400_before_any_pipeline_work(client, double, body, param, code):
    response = await client.post("/v1/chat/completions", json=body)
    assert_error_shape(response, 400, param=param, code=code)
    assert double.jobs == []


async def test_nan_temperature_is_400(client, double):
    raw = b'{"model": "internvl-double", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}'
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error_shape(response, 400, param="temperature")
    assert double.jobs == []


FUZZ_BODIES = [
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "nul \\u0000 byte"}], "n": 1e308}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url":'
    b' {"url": "http://example.com/\\ud800.png"}}]}]}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url":'
    b' {"url": "data:image/png;base64,\\u00e9\\u00e9=="}}]}]}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": [[[[{}]]]]}]}',
    b'{"model": "internvl-double", "messages": {"role": "user"}}',
    b'[1, 2, 3]',
    b'"just a string"',
    b'',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "x"}], "seed": 1e400}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "x"}], "stop": [""]}',
    b'{"model": "internvl-double", "messages": [{"role": "user", "content": "x"}], "\\u0000": 1}',
]


@pytest.mark.parametrize("raw", FUZZ_BODIES)
async def test_malformed_bodies_are_4xx_never_5xx(client, double, raw):
    response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert_error_shape(response, response.status_code)
    assert double.jobs == []


async def test_unknown_model_is_404(client, double):
    response = await client.post("/v1/chat/completions", json={**chat_body(), "model": "gpt-4o"})
    assert_error_shape(response, 404, param="model", code="model_not_found")
    assert double.jobs == []


# ---------- one error shape everywhere ----------


async def test_invalid_json_unknown_path_and_wrong_method(client):
    json_header = {"content-type": "application/json"}
    response = await client.post("/v1/chat/completions", content=b"{not json", headers=json_header)
    assert_error_shape(response, 400, code="invalid_json")
    assert_error_shape(await client.get("/v1/nothing"), 404, code="not_found")
    assert_error_shape(await client.get("/health/"), 404, code="not_found")
    wrong_method = await client.get("/v1/chat/completions")
    assert_error_shape(wrong_method, 405, code="method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


async def test_oversized_body_by_content_length_is_413(client, double):
    response = await client.post("/v1/chat/completions", json=chat_body("x" * 140_000))
    assert_error_shape(response, 413, code="request_too_large")
    assert double.jobs == []


async def test_oversized_chunked_body_is_413_without_reading_it_all(double):
    app, _http = build(double)
    chunks = [b"{" + b" " * 29_999] * 10  # 300 kB, no Content-Length: refused once the total passes 128 KiB
    call = AsgiCall(method="POST", path="/v1/chat/completions", headers=[("content-type", "application/json")],
                    body_chunks=chunks)
    await call.run(app)
    assert call.status == 413 and json.loads(call.body)["error"]["code"] == "request_too_large"
    assert call.chunks_delivered == 5  # five 30 kB chunks read (150 kB > 128 KiB), the rest never received
    assert double.jobs == []


async def test_compressed_body_is_415(client):
    response = await client.post("/v1/chat/completions", content=b"\x1f\x8b\x08\x00",
                                 headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert_error_shape(response, 415)


async def test_unexpected_exception_is_fixed_500_without_internals(client, double, caplog):
    double.script = [RuntimeError(SECRET_TEXT)]
    response = await client.post("/v1/chat/completions", json=chat_body())
    error = assert_error_shape(response, 500, code="internal_error")
    assert error["message"] == "Internal server error."
    for leaked in ("secret", "/srv", "0xdeadbeef", "Traceback", "RuntimeError"):
        assert leaked not in response.text
    assert SECRET_TEXT in caplog.text  # logged server-side with its traceback
    assert response.headers["x-request-id"] == double.jobs[0].request_id


async def test_exception_escaping_a_route_is_fixed_500_and_counted(double):
    app, http = build(double)
    app.state.gateway = replace(app.state.gateway, pipeline=object())  # model_id lookups now raise
    async with http:
        response = await http.get("/v1/models")
        error = assert_error_shape(response, 500, code="internal_error")
        assert "AttributeError" not in response.text and "object" not in error["message"]
        metrics = (await http.get("/metrics")).text
    assert 'dvd_http_requests_total{endpoint="/v1/models",status_code="500"} 1.0' in metrics


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequestError("The image could not be decoded.", code="bad_image",
                             param="messages[0].content[0].image_url"), 400),
        (OverloadedError("Too many requests in flight.", code="overloaded"), 429),
        (UpstreamError("The image URL's server failed.", code="image_url_server_error"), 502),
    ],
)
async def test_error_before_first_delta_gets_its_real_status(client, double, error, status, stream):
    double.script = [error]
    response = await client.post("/v1/chat/completions", json=chat_body([image_part()], stream=stream))
    body = assert_error_shape(response, status, code=error.code)
    assert body["param"] == error.param and body["message"] == error.message
    assert ("retry-after" in response.headers) == (status == 429)


async def test_mid_stream_error_sends_error_event_then_done(openai_client, client, double):
    double.script = [*scripted_answer()[:2], UpstreamError("The image URL's server failed.", code="upstream_x")]
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2]) == {"error": {"message": "The image URL's server failed.",
                                                  "type": "upstream_error", "param": None, "code": "upstream_x"}}
    stream = await openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                         stream=True)
    received = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            received.append(chunk)
    assert [chunk.choices[0].delta.content for chunk in received] == ["", "t11", "t12"]


async def test_mid_stream_unexpected_exception_is_fixed_error_event(client, double):
    double.script = [*scripted_answer()[:1], RuntimeError(SECRET_TEXT)]
    response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    payloads = sse_payloads(response.text)
    assert json.loads(payloads[-2])["error"]["code"] == "internal_error" and payloads[-1] == "[DONE]"
    assert "secret" not in response.text and "Traceback" not in response.text


async def test_stream_ending_without_finish_reason_is_an_error(client, double):
    double.script = scripted_answer()[:2]
    response = await client.post("/v1/chat/completions", json=chat_body())
    assert_error_shape(response, 500, code="internal_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_504_and_aborts_the_pipeline(double, stream):
    double.script = [HANG] if not stream else [scripted_answer()[0], HANG]
    _app, http = build(double, TEST_CONFIG.model_copy(update={"request_timeout_s": 0.2}))
    async with http:
        response = await http.post("/v1/chat/completions", json=chat_body(stream=stream))
    if stream:
        assert json.loads(sse_payloads(response.text)[-2])["error"]["code"] == "request_timeout"
    else:
        assert_error_shape(response, 504, code="request_timeout")
    assert double.aborted == [double.jobs[0].request_id]


# ---------- client disconnect cancels the pipeline iteration ----------


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_pipeline_iteration(double, stream):
    double.script = [scripted_answer()[0], HANG] if stream else [HANG]
    app, _http = build(double)
    call = AsgiCall(method="POST", path="/v1/chat/completions", headers=[("content-type", "application/json")],
                    body_chunks=[json.dumps(chat_body(stream=stream)).encode()])
    running = asyncio.create_task(call.run(app))
    await asyncio.wait_for(double.started.wait(), 5)
    if stream:
        while not any(message.get("body") for message in call.messages):
            await asyncio.sleep(0.01)
    call.disconnect.set()
    await asyncio.wait_for(running, 5)
    assert double.aborted == [double.jobs[0].request_id]
    exposition = (app.state.gateway.metrics.exposition()).decode()
    assert "dvd_gateway_in_flight_requests 0.0" in exposition
    if stream:
        assert 'dvd_stream_aborts_total{reason="client_disconnected"} 1.0' in exposition


# ---------- auth ----------

PATH_TRICKS = [
    ("//v1/models", None), ("/v1/./models", None), ("/v1/models/", None), ("/v1/models", b"/v1%2Fmodels"),
    ("/health/", None), ("//health", None), ("/./health", None), ("/HEALTH", None), ("/health", b"/%68ealth"),
    ("/health/../v1/models", b"/health%2F..%2Fv1/models"), ("/v1/chat/completions", None), ("/metrics", None),
    ("/openapi.json", None),
]


@pytest.fixture
def protected_app(double):
    app, _http = build(double, TEST_CONFIG.model_copy(update={"api_keys": (SecretStr(API_KEY),)}))
    return app


@pytest.mark.parametrize(("path", "raw_path"), PATH_TRICKS)
async def test_protected_paths_and_path_tricks_need_a_key(protected_app, double, path, raw_path):
    for method in ("GET", "POST"):
        call = AsgiCall(method=method, path=path, raw_path=raw_path, headers=[("content-type", "application/json")],
                        body_chunks=[json.dumps(chat_body()).encode()])
        await call.run(protected_app)
        assert call.status == 401
        assert json.loads(call.body)["error"]["code"] == "invalid_api_key"
    assert double.jobs == []


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer", API_KEY]
)
async def test_wrong_or_missing_key_is_401(protected_app, authorization):
    headers = [("authorization", authorization)] if authorization else []
    call = AsgiCall(path="/v1/models", headers=headers)
    await call.run(protected_app)
    assert call.status == 401
    assert (b"www-authenticate", b"Bearer") in [tuple(pair) for pair in call.messages[0]["headers"]]


async def test_right_key_passes_and_public_paths_need_none(protected_app, double):
    transport = httpx.ASGITransport(app=protected_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        authorized = {"authorization": f"Bearer {API_KEY}"}
        assert (await http.get("/v1/models", headers=authorized)).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat_body(), headers=authorized)).status_code == 200
        assert (await http.get("/metrics", headers=authorized)).status_code == 200
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200
    assert len(double.jobs) == 1


async def test_auth_off_by_default(client):
    assert (await client.get("/v1/models")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200


async def test_cors_off_by_default_and_preflight_when_configured(client, double):
    preflight_headers = {"origin": "https://app.example", "access-control-request-method": "POST"}
    plain = await client.get("/v1/models", headers={"origin": "https://app.example"})
    assert not any(name.startswith("access-control-") for name in plain.headers)
    config = TEST_CONFIG.model_copy(
        update={"cors_allow_origins": ("https://app.example",), "api_keys": (SecretStr(API_KEY),)}
    )
    _app, http = build(double, config)
    async with http:
        preflight = await http.options("/v1/chat/completions", headers=preflight_headers)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_public_paths_must_be_canonical():
    for path in ("/health/", "//health", "/./health", "health"):
        with pytest.raises(ValueError):
            GatewayConfig(public_paths=(path,))


# ---------- models, probes, metrics, schema, headers ----------


async def test_models_endpoint(client):
    listing = (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    assert [(card["id"], card["object"], card["max_model_len"]) for card in listing["data"]] == [
        (MODEL, "model", 4096)
    ]
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL
    assert_error_shape(await client.get("/v1/models/other"), 404, code="model_not_found")


async def test_health_and_readiness(client, double):
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    double.pools["language"] = False
    not_ready = await client.get("/ready")
    assert not_ready.status_code == 503
    assert not_ready.json() == {"status": "not_ready", "pools": {"vision": True, "language": False}}
    double.readiness_error = RuntimeError(SECRET_TEXT)
    failed = await client.get("/ready")
    assert failed.status_code == 503 and "secret" not in failed.text
    assert (await client.get("/health")).status_code == 200


async def test_metrics_exposition(client):
    await client.post("/v1/chat/completions", json=chat_body())
    await client.post("/v1/chat/completions", json=chat_body(n=99))
    await client.get("/ready")
    text = (await client.get("/metrics")).text
    assert 'dvd_http_requests_total{endpoint="/v1/chat/completions",status_code="200"} 1.0' in text
    assert 'dvd_http_requests_total{endpoint="/v1/chat/completions",status_code="400"} 1.0' in text
    assert "dvd_time_to_first_token_seconds_count 1.0" in text
    assert "dvd_time_per_output_token_seconds_count 1.0" in text
    assert "dvd_e2e_request_latency_seconds_count 1.0" in text
    assert "dvd_request_vision_seconds_sum 0.125" in text
    assert "dvd_lm_queue_seconds_sum 0.0375" in text
    assert "dvd_request_visual_tokens_sum 512.0" in text
    assert "dvd_prompt_tokens_total 530.0" in text and "dvd_completion_tokens_total 3.0" in text
    assert 'dvd_pool_ready{pool="vision"} 1.0' in text
    for name in (
        "dvd_gateway_in_flight_requests", "dvd_image_fetch_decode_seconds", "dvd_image_preprocess_seconds",
        "dvd_vision_queue_seconds", "dvd_vision_batch_tiles", "dvd_vision_encode_seconds",
        "dvd_embedding_transfer_bytes", "dvd_embedding_transfer_seconds", "dvd_visual_tokens_per_image",
        "dvd_router_compression_ratio", "dvd_pool_in_flight_jobs", "dvd_stream_aborts_total",
    ):
        assert f"# TYPE {name} " in text, name


async def test_vllm_named_series_follow_vllm_names_labels_and_counts(client):
    """vLLM's dashboards read `vllm:*` series labelled `model_name`; one request per stream mode, n=2 once."""
    from prometheus_client.parser import text_string_to_metric_families

    await client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    await client.post("/v1/chat/completions", json=chat_body(stream=True))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families((await client.get("/metrics")).text)
        for sample in family.samples
        if sample.name.startswith("vllm:")
    }
    model = (("model_name", MODEL),)
    assert samples[("vllm:prompt_tokens_total", model)] == 2 * 530
    assert samples[("vllm:generation_tokens_total", model)] == 2 * 3
    assert samples[("vllm:request_success_total", (("finished_reason", "stop"), *model))] == 2
    for histogram in (
        "time_to_first_token_seconds", "e2e_request_latency_seconds", "request_time_per_output_token_seconds",
        "request_prompt_tokens", "request_generation_tokens", "request_params_n", "request_queue_time_seconds",
        "request_inference_time_seconds",
    ):
        assert samples[(f"vllm:{histogram}_count", model)] == 2, histogram
    assert samples[("vllm:request_generation_tokens_sum", model)] == 6
    assert samples[("vllm:request_params_max_tokens_count", model)] == 1  # the streamed request set no max_tokens
    assert samples[("vllm:inter_token_latency_seconds_count", model)] == 2 * 2  # 3 tokens: 2 gaps each


async def test_two_apps_in_one_process_keep_separate_metrics():
    first, second = ScriptedPipelineDouble(), ScriptedPipelineDouble()
    _app1, http1 = build(first)
    _app2, http2 = build(second)
    async with http1, http2:
        await http1.post("/v1/chat/completions", json=chat_body())
        assert "dvd_completion_tokens_total 3.0" in (await http1.get("/metrics")).text
        assert "dvd_completion_tokens_total 0.0" in (await http2.get("/metrics")).text


async def test_openapi_schema(client):
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"} <= set(schema["paths"])


async def test_timing_headers(client):
    answer = await client.post("/v1/chat/completions", json=chat_body())
    assert answer.headers["x-request-id"] == answer.json()["id"]
    assert (answer.headers["x-dvd-vision-ms"], answer.headers["x-dvd-queue-ms"]) == ("125.0", "37.5")
    assert answer.headers["x-dvd-inference-ms"] == "250.0"  # from the last delta's timings
    assert answer.headers["x-dvd-visual-tokens"] == "512"
    stream = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert stream.headers["x-dvd-vision-ms"] == "125.0"
    assert stream.headers["x-dvd-inference-ms"] == "0.0"  # only the first delta is known when headers go out


# ---------- tools and reasoning: what the language side split out reaches the client OpenAI-shaped ----------

CALL = {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}


async def test_tool_request_reaches_the_pipeline_with_its_answer_options(client, double):
    body = chat_body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}},
                     parallel_tool_calls=False, reasoning_effort="low", include_reasoning=False, stream=True)
    body["messages"] += [
        {"role": "assistant", "content": None, "reasoning_content": "thought", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": CALL["id"], "content": [{"type": "text", "text": "42"}]},
    ]
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    job = double.jobs[0]
    assert job.answer.tools == (TOOL,) and job.answer.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert (job.answer.parallel_tool_calls, job.answer.include_reasoning, job.answer.reasoning_effort,
            job.answer.streamed) == (False, False, "low", True)
    assistant, tool = job.messages[1], job.messages[2]
    assert assistant.tool_calls == (CALL,) and assistant.reasoning == "thought" and assistant.parts == ()
    assert tool.role == "tool" and tool.tool_call_id == CALL["id"] and tool.parts[0].text == "42"


async def test_a_whole_answer_with_tool_calls_and_reasoning(openai_client, double):
    double.script = [GenerationDelta(token_ids=[1, 2, 3], text="", reasoning="why", tool_calls=[CALL],
                                     content_null=True, finish_reason="tool_calls", prompt_token_count=9)]
    answer = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a"}], tools=[TOOL])
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(call.id, call.function.name, call.function.arguments) for call in message.tool_calls] == [
        (CALL["id"], "f", '{"x": 1}')]
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == "why"


async def test_streamed_tool_call_pieces_and_reasoning_are_chunks(openai_client, double):
    double.script = [
        GenerationDelta(token_ids=[1], text="", reasoning="hm", prompt_token_count=9),
        GenerationDelta(token_ids=[2], text="", tool_calls=[
            {"index": 0, "id": CALL["id"], "type": "function", "function": {"name": "f"}}]),
        GenerationDelta(token_ids=[3], text="", tool_calls=[{"index": 0, "function": {"arguments": '{"x": 1}'}}]),
        GenerationDelta(token_ids=[4], text="", finish_reason="tool_calls"),
    ]
    stream = await openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a"}], tools=[TOOL], stream=True)
    reasoning, name, arguments, finish = "", "", "", None
    async for chunk in stream:
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning") or ""
            for call in choice.delta.tool_calls or []:
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (reasoning, name, arguments, finish) == ("hm", "f", '{"x": 1}', "tool_calls")
