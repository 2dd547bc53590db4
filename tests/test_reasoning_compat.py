"""Thinking mode with a reasoning parser: vLLM's own server and `dvd-serve serve`, both started with
`--reasoning-parser qwen3` on the same tiny checkpoint, split the same answers into `reasoning` and `content`,
streamed and not, and gate structured output on the end of the reasoning alike.

The qwen3 parser starts in the reasoning state (Qwen3's thinking default), so a random model's answer is all
reasoning unless `enable_thinking` is false. The InternVL3.5 templates ignore that variable; the parser reads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest

from tests.dvd_fixtures import ServerProcess, free_port, running

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 600
MESSAGES = [{"role": "user", "content": "Think, then answer: what is in the picture?"}]


@pytest.fixture(scope="module")
def thinking_pair(tiny_chat_checkpoint, session_tmp):
    model = str(tiny_chat_checkpoint)
    ours = ServerProcess(
        "dvd-serve",
        [str(Path(sys.executable).parent / "dvd-serve"), "serve", "--model", model, "--port", str(port := free_port()),
         "--dtype", "float32", "--reasoning-parser", "qwen3"],
        port, "/ready", session_tmp / "dvd-serve-reasoning.log",
    )
    reference = ServerProcess(
        "vllm",
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
         "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port", str(reference_port := free_port()),
         "--trust-remote-code", "--reasoning-parser", "qwen3"],
        reference_port, "/health", session_tmp / "vllm-reasoning.log",
    )
    with running(ours, reference, timeout_s=READY_TIMEOUT_S):
        yield ours.client(max_retries=0), reference.client(max_retries=0)


def _split(client: openai.OpenAI, stream: bool, **fields) -> tuple[str | None, str | None, str]:
    """(reasoning, content, finish_reason) of one greedy answer, summed over its chunks when streamed."""
    model = client.models.list().data[0].id
    fields = {"temperature": 0.0, "max_tokens": 12, **fields}
    if not stream:
        choice = client.chat.completions.create(model=model, messages=MESSAGES, **fields).choices[0]
        return (choice.message.model_extra or {}).get("reasoning"), choice.message.content, choice.finish_reason
    reasoning = content = ""
    finish = None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **fields):
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning or None, content or None, finish


CASES = {
    "thinking_default": {},
    "thinking_off": dict(extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
    "reasoning_hidden": dict(extra_body={"include_reasoning": False}),
    "effort_none": dict(reasoning_effort="none"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_reasoning_is_split_like_vllm(thinking_pair, case, stream):
    ours, reference = thinking_pair
    expected = _split(reference, stream, **CASES[case])
    assert _split(ours, stream, **CASES[case]) == expected
    reasoning, content, _ = expected
    if case == "thinking_default":
        assert reasoning and not content  # random weights never close the thinking
    if case in ("thinking_off", "reasoning_hidden"):
        assert reasoning is None


def test_structured_output_waits_for_the_reasoning_like_vllm(thinking_pair):
    fields = dict(max_tokens=16, extra_body={"structured_outputs": {"choice": ["cat", "dog"]},
                                             "chat_template_kwargs": {"enable_thinking": False}})
    ours, reference = thinking_pair
    expected = _split(reference, False, **fields)
    assert _split(ours, False, **fields) == expected
    assert expected[1] in ("cat", "dog")
