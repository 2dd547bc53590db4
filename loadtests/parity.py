"""Greedy answers of one server to a fixed request set, and their comparison with a reference answer set.

The OpenAI API gives no token ids: each token comes back as text, and a token that is only part of a UTF-8
character has no text of its own (servers render it as "" or U+FFFD, and its `bytes` follow that rendering). So an
answer is compared as: prompt token count (equal counts mean the same number of visual tokens reached the LM),
completion token count, the full decoded text, and the logprob of every chosen token within `LOGPROB_TOLERANCE`.
With random weights two different tokens at any step would give a different logprob there, and every later step
would diverge, so equal logprob sequences and equal text identify the same token sequence.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from dvd_serve.loadtests.datasets import with_model


LOGPROB_TOLERANCE = 1e-3  # float32 on CPU, different batch shapes: logprobs agree to about 1e-5


@dataclass(frozen=True, slots=True)
class GreedyAnswer:
    text: str
    logprobs: tuple[float, ...]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class ParityResult:
    compared: int
    identical: int
    first_difference: str  # empty when every answer is identical

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.identical == self.compared


def greedy_answer(base_url: str, model: str, body: bytes, api_key: str | None = None,
                  timeout_s: float = 600.0) -> GreedyAnswer:
    """Sends one non-streaming request that asks for logprobs and returns its tokens."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/v1/chat/completions", data=with_model(body, model),
        headers={"content-type": "application/json"},
    )
    if api_key:
        request.add_header("authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        document = json.load(response)
    choice = document["choices"][0]
    return GreedyAnswer(
        text=choice["message"]["content"] or "",
        logprobs=tuple(entry["logprob"] for entry in choice["logprobs"]["content"]),
        prompt_tokens=document["usage"]["prompt_tokens"],
        completion_tokens=document["usage"]["completion_tokens"],
    )


def compare_answers(reference: Sequence[GreedyAnswer], candidate: Sequence[GreedyAnswer]) -> ParityResult:
    if len(reference) != len(candidate):
        raise ValueError("both sides must answer the same requests")
    identical, first_difference = 0, ""
    for index, (expected, actual) in enumerate(zip(reference, candidate)):
        difference = _difference(expected, actual)
        if not difference:
            identical += 1
        elif not first_difference:
            first_difference = f"request {index}: {difference}"
    return ParityResult(compared=len(reference), identical=identical, first_difference=first_difference)


def _difference(expected: GreedyAnswer, actual: GreedyAnswer) -> str:
    """What differs between two answers; empty when they are the same."""
    for name in ("prompt_tokens", "completion_tokens", "text"):
        if getattr(expected, name) != getattr(actual, name):
            return f"{name} {getattr(actual, name)!r} != {getattr(expected, name)!r}"
    if len(expected.logprobs) != len(actual.logprobs):
        return f"{len(actual.logprobs)} logprobs != {len(expected.logprobs)}"
    for position, (want, got) in enumerate(zip(expected.logprobs, actual.logprobs)):
        if abs(want - got) > LOGPROB_TOLERANCE:
            return f"logprob of token {position}: {got:.5f} != {want:.5f}"
    return ""
