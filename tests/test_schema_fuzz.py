"""Schema fuzzing of the gateway against the OpenAPI document it serves (issue #8, robustness catalogue item A.13).

schemathesis reads `/openapi.json` from the app and sends generated requests to every operation through the ASGI
interface: schema-valid ones and broken ones (wrong types, unknown fields and content-part types, NUL bytes, odd
Unicode, out-of-range and non-finite numbers, missing fields). No answer may be a 5xx, broken input must be
refused with a 4xx, and every answer must conform to the document: a declared status code, content type and body
schema. The pipeline is `ScriptedPipelineDouble` (tests/pipeline_doubles.py), so a few hundred requests take
seconds; the chat endpoint is fuzzed against the real stack (Ray, vision replica, vLLM) in
tests/test_robustness_catalogue.py. Examples are bounded and derandomized: every run sends the same requests.
"""

from __future__ import annotations

import re

import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from dvd_serve.server.api import create_app
from dvd_serve.server.gateway_config import GatewayConfig
from tests.pipeline_doubles import ScriptedPipelineDouble

EXAMPLES_PER_OPERATION = 40
_CONVERTOR = re.compile(r":\w+}")  # "{model_id:path}" is documented as "{model_id}"
SCHEMA_CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def aim_at_served_model(case, model_id: str, max_tokens: int | None = None) -> None:
    """Valid requests mostly name the served model, so they get past the model check into the pipeline; with
    `max_tokens`, valid chat bodies are capped so a real engine answers quickly."""
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    if isinstance(case.body, dict):
        case.body["model"] = model_id
        if max_tokens is not None:
            case.body.pop("max_completion_tokens", None)
            case.body["max_tokens"] = max_tokens
    if len(case.path_parameters.get("model_id", "")) % 2:
        case.path_parameters["model_id"] = model_id


def fuzz_operation(
    base_url: str, method: str, path: str, *, headers: dict[str, str], max_examples: int, model_id: str
) -> None:
    """Fuzzes one operation of a live server with valid and broken requests; raises on any 5xx or any answer
    outside the document."""
    live = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers, timeout=30)
    operation = live[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(FUZZ_SETTINGS, max_examples=max_examples)
    @given(case=cases)
    def run(case) -> None:
        aim_at_served_model(case, model_id, max_tokens=2)
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        case.validate_response(response, checks=SCHEMA_CHECKS)

    run()


# Built at import: schemathesis' lazy `from_fixture` loader does not work with pytest 9.
DOUBLE = ScriptedPipelineDouble()
GATEWAY = create_app(DOUBLE, GatewayConfig(max_body_bytes=256 * 1024, request_timeout_s=5.0))
schema = schemathesis.openapi.from_asgi("/openapi.json", GATEWAY)


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_generated_request_gets_a_server_error_and_every_answer_conforms(case):
    aim_at_served_model(case, DOUBLE.model_id)
    response = case.call()
    case.validate_response(response, checks=SCHEMA_CHECKS)


def test_every_operation_is_fuzzed():
    """The parametrized test above covers what the document lists; a route missing from it would escape."""
    documented = {(result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()}
    served = {
        (method, _CONVERTOR.sub("}", route.path))
        for route in GATEWAY.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert ("POST", "/v1/chat/completions") in documented
    assert documented == served
