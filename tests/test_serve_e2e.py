"""`dvd-serve serve`: its command line, and a real serve process answering the official `openai` client exactly
like vLLM's own OpenAI server.

Both servers run the tiny Flash checkpoint in float32. vLLM never runs the Flash router, so requests ask for
`detail: high` (every tile keeps 256 tokens) to make the two comparable. Images arrive as data URLs and as http
URLs from a local server (our server is started with private-network fetching allowed, for this test only).
The last test sends SIGTERM during a stream and checks the drain: /ready fails, new requests get 503, the
running stream completes, and the process exits with status 0.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from dvd_serve.lm_worker.vllm_plugin import flash_monolithic_overrides
from tests.dvd_fixtures import ImageOrigin, ServerProcess, data_url, free_port, png_bytes, running, synthetic_image

READY_TIMEOUT_S = 420
MAX_TOKENS = 8
TOP_LOGPROBS = 3
DRAIN_STREAM_TOKENS = 600


def test_command_line_becomes_one_serve_config(tiny_flash_checkpoint, monkeypatch):
    from dvd_serve.server.cli import build_parser
    from dvd_serve.server.serve import config_from_args

    monkeypatch.setenv("DVD_SERVE_API_KEY", "from-env, second")
    args = build_parser().parse_args([
        "serve", "--model", str(tiny_flash_checkpoint), "--port", "9001", "--topology", "coupled",
        "--vision-replicas", "2", "--lm-replicas", "3", "--lm-gpus-per-replica", "0.5", "--lm-cpus-per-replica", "2",
        "--lm-resources", '{"lm_gpu": 1}', "--api-key", "from-flag", "--address", "ray-head:6379",
        "--max-model-len", "2048", "--allow-private-image-urls", "--max-tiles-per-image", "6",
        "--max-image-pixels", "1000000", "--request-timeout", "30", "--retry-after", "5",
        "--vision-max-outstanding", "4", "--lm-max-outstanding", "0",
    ])
    config = config_from_args(args)
    assert (config.topology, config.max_model_len, config.ray_address) == ("coupled", 2048, "ray-head:6379")
    assert (config.vision_pool.replicas, config.language_pool.replicas) == (2, 3)
    assert (config.language_pool.num_gpus, config.language_pool.num_cpus) == (0.5, 2.0)
    assert config.language_pool.resources == {"lm_gpu": 1}
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 9001)
    assert [key.get_secret_value() for key in config.gateway.api_keys] == ["from-flag", "from-env", "second"]
    assert config.image_fetch.allow_private_networks
    assert config.grpc_auth_token is not None and len(config.grpc_auth_token.get_secret_value()) >= 32
    assert config.grpc_auth_token != config_from_args(args).grpc_auth_token  # a fresh token per deployment
    assert (config.gateway.max_tiles_per_image, config.vision_worker_config().max_tiles_per_image) == (6, 6)
    assert config.image_decode.max_pixels == config.vision_worker_config().decode.max_pixels == 1_000_000
    assert (config.gateway.request_timeout_s, config.gateway.retry_after_s) == (30.0, 5)
    assert (config.vision_pool.max_outstanding_per_replica, config.language_pool.max_outstanding_per_replica) == (
        4, None  # 0 = no bound
    )


def test_parser_flags_reach_the_language_engines(tiny_flash_checkpoint):
    from dvd_serve.server.cli import build_parser
    from dvd_serve.server.serve import config_from_args

    def engine(*flags: str):
        args = build_parser().parse_args(["serve", "--model", str(tiny_flash_checkpoint), *flags])
        return config_from_args(args).language_engine_config()

    assert (engine().tool_call_parser, engine().reasoning_parser) == ("auto", "auto")
    chosen = engine("--tool-call-parser", "pythonic", "--reasoning-parser", "deepseek_r1")
    assert (chosen.tool_call_parser, chosen.reasoning_parser) == ("pythonic", "deepseek_r1")
    off = engine("--tool-call-parser", "none", "--reasoning-parser", "None")
    assert (off.tool_call_parser, off.reasoning_parser) == (None, None)


def test_the_serving_code_does_not_import_the_load_tests():
    """`bench` and `soak` come from the load-test package through the `dvd_serve.commands` entry points; building
    the command line, serving and the workers import nothing of it."""
    probe = (
        "import sys\n"
        "import dvd_serve.server.cli as cli, dvd_serve.server.serve, dvd_serve.server.ray_pipeline, "
        "dvd_serve.server.ray_actors, dvd_serve.server.api.app, dvd_serve.lm_worker.worker, "
        "dvd_serve.vision_worker.worker\n"
        "commands = cli.build_parser()._subparsers._group_actions[0].choices\n"
        "assert {'make-checkpoint', 'serve'} <= set(commands), commands\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('dvd_serve.loadtests'))\n"
        "print('LOADTESTS', loaded)\n"
    )
    import subprocess

    # Entry points load lazily only when the parser is built; block them to see what the product itself imports.
    result = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m\n"
         "m.entry_points = lambda **kw: []\n" + probe],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADTESTS []" in result.stdout, result.stdout
    with_commands = subprocess.run([sys.executable, "-m", "dvd_serve.server.cli", "--help"], capture_output=True,
                                   text=True, timeout=300)
    assert "bench" in with_commands.stdout and "soak" in with_commands.stdout


def test_limit_flags_left_out_keep_the_config_defaults(tiny_flash_checkpoint):
    from dvd_serve.server.cli import build_parser
    from dvd_serve.server.serve import config_from_args
    from dvd_serve.server.serve_config import ServeConfig

    config = config_from_args(build_parser().parse_args(["serve", "--model", str(tiny_flash_checkpoint)]))
    defaults = ServeConfig(model=str(tiny_flash_checkpoint))
    assert config.gateway.max_tiles_per_image == defaults.gateway.max_tiles_per_image
    assert config.gateway.request_timeout_s == defaults.gateway.request_timeout_s
    assert config.gateway.retry_after_s == defaults.gateway.retry_after_s
    assert config.image_decode == defaults.image_decode
    assert config.vision_pool.max_outstanding_per_replica == defaults.vision_pool.max_outstanding_per_replica
    assert config.language_pool.max_outstanding_per_replica == defaults.language_pool.max_outstanding_per_replica


def test_without_a_model_serve_makes_the_tiny_flash_checkpoint_once(session_tmp):
    from dvd_serve.common.checkpoint.spec import CheckpointSpec
    from dvd_serve.server.cli import build_parser
    from dvd_serve.server.serve import config_from_args

    args = build_parser().parse_args(["serve"])
    first = Path(config_from_args(args).model)
    made_at = (first / "config.json").stat().st_mtime_ns
    assert Path(config_from_args(args).model) == first
    assert (first / "config.json").stat().st_mtime_ns == made_at
    assert first == session_tmp / "dvd-serve-cache" / "models" / "tiny-flash"  # $DVD_SERVE_CACHE, set by conftest
    spec = CheckpointSpec.from_dir(first)
    assert (spec.flash, spec.fmt, spec.model_id) == (True, "chat", "tiny-flash")


@pytest.fixture(scope="module")
def image_host():
    images = {
        "/wide.png": png_bytes(synthetic_image(896, 448, seed=11)),
        "/square.png": png_bytes(synthetic_image(896, 896, seed=12)),
    }
    with ImageOrigin(images) as origin:
        yield origin.base_url


@pytest.fixture(scope="module")
def servers(tiny_flash_checkpoint, session_tmp):
    model = str(tiny_flash_checkpoint)
    ours = ServerProcess(
        "dvd-serve",
        [str(Path(sys.executable).parent / "dvd-serve"), "serve", "--model", model, "--port", str(port := free_port()),
         "--dtype", "float32", "--allow-private-image-urls", "--drain-timeout", "120"],
        port, "/ready", session_tmp / "dvd-serve-e2e.log",
    )
    reference = ServerProcess(
        "vllm",
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--trust-remote-code",
         "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
         "--host", "127.0.0.1", "--port", str(reference_port := free_port()),
         "--hf-overrides", json.dumps(flash_monolithic_overrides()), "--limit-mm-per-prompt", '{"image": 4}'],
        reference_port, "/health", session_tmp / "vllm-e2e.log",
    )
    with running(ours, reference, timeout_s=READY_TIMEOUT_S):
        yield ours, reference


def _content(images: list[str], text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "high"}} for url in images]
    return parts + [{"type": "text", "text": text}]


def _greedy(client: openai.OpenAI, content: list[dict], stream: bool) -> tuple[str, list[str], list[list[float]], int]:
    """Text, chosen tokens, per token the logprobs of the chosen and the top alternatives, prompt tokens."""
    model = client.models.list().data[0].id
    request = dict(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0.0,
        logprobs=True, top_logprobs=TOP_LOGPROBS, extra_body={"ignore_eos": True},
    )
    if not stream:
        answer = client.chat.completions.create(**request)
        choice = answer.choices[0]
        entries = choice.logprobs.content
        return choice.message.content, [e.token for e in entries], _logprob_values(entries), answer.usage.prompt_tokens
    text, entries, prompt_tokens = "", [], 0
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            entries += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    return text, [e.token for e in entries], _logprob_values(entries), prompt_tokens


def _logprob_values(entries) -> list[list[float]]:
    return [[entry.logprob, *sorted(top.logprob for top in entry.top_logprobs)] for entry in entries]


def _assert_same_answer(ours, reference) -> None:
    text, tokens, logprobs, prompt_tokens = ours
    assert len(tokens) == len(reference[1]) == MAX_TOKENS
    assert (text, prompt_tokens) == (reference[0], reference[3])
    for step, expected in zip(logprobs, reference[2], strict=True):
        assert step == pytest.approx(expected, abs=1e-3)
    # A token holding part of a UTF-8 character reads "\ufffd" here; vLLM rewrites it using the tokens before it.
    assert [token for token in tokens if "\ufffd" not in token] == [
        theirs for token, theirs in zip(tokens, reference[1]) if "\ufffd" not in token
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_greedy_answers_equal_vllms_own_server(servers, image_host, stream):
    ours, reference = servers
    content = _content([data_url(synthetic_image(448, 448, seed=10)), image_host + "/wide.png"], "Compare them.")
    _assert_same_answer(_greedy(ours.client(), content, stream), _greedy(reference.client(), content, stream=False))


@pytest.mark.slow
def test_several_images_from_urls_and_data(servers, image_host):
    ours, reference = servers
    content = _content(
        [image_host + "/square.png", data_url(synthetic_image(896, 448, seed=13)), image_host + "/wide.png"],
        "What do these three pictures have in common?",
    )
    answer = _greedy(ours.client(), content, stream=True)
    _assert_same_answer(answer, _greedy(reference.client(), content, stream=False))
    assert answer[3] > 256 * (5 + 3 + 3)  # every tile of every image reached the prompt


@pytest.mark.slow
def test_text_only_answer_equals_vllms(servers):
    ours, reference = servers
    content = [{"type": "text", "text": "Tell me a story."}]
    _assert_same_answer(_greedy(ours.client(), content, stream=False), _greedy(reference.client(), content, False))


@pytest.mark.slow
def test_a_repeated_image_by_data_or_by_uuid_alone_gives_the_same_answer_from_the_caches(servers):
    ours, reference = servers
    image = {"url": data_url(synthetic_image(896, 896, seed=21)), "detail": "high"}
    sent = [{"type": "image_url", "image_url": image, "uuid": "e2e-doc-1"}, {"type": "text", "text": "Read it."}]
    by_uuid = [{"type": "image_url", "image_url": None, "uuid": "e2e-doc-1"}, {"type": "text", "text": "Read it."}]
    first = _greedy(ours.client(), sent, stream=False)
    _assert_same_answer(first, _greedy(reference.client(), sent, stream=False))
    assert _greedy(ours.client(), sent, stream=True)[:2] == first[:2]
    assert _greedy(ours.client(), by_uuid, stream=False)[:2] == first[:2]

    unknown = [{"type": "image_url", "uuid": "never-sent"}, {"type": "text", "text": "Read it."}]
    with pytest.raises(openai.BadRequestError) as refused:
        _greedy(ours.client(max_retries=0), unknown, stream=False)
    error = refused.value.body
    assert (error["code"], error["param"]) == ("image_not_cached", "messages[0].content[0].uuid")

    metrics = urllib.request.urlopen(ours.base_url + "/metrics", timeout=10).read().decode()
    assert _counter(metrics, 'dvd_vision_cache_lookups_total{result="hit"}') >= 2
    assert _counter(metrics, "vllm:prefix_cache_hits_total{") > 0


def _counter(exposition: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines() if line.startswith(prefix))


@pytest.mark.slow
def test_sigterm_drains_running_requests_and_exits_cleanly(servers):
    ours, _ = servers
    client = ours.client(max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Go on."}], max_tokens=DRAIN_STREAM_TOKENS,
        temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    ours.process.send_signal(signal.SIGTERM)

    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(ours.base_url + "/ready", timeout=10)
    assert not_ready.value.code == 503
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "shutting_down"

    rest = list(chunks)
    usage = rest[-1].usage
    finish_reasons = [choice.finish_reason for chunk in [first, *rest] for choice in chunk.choices]
    assert usage is not None and usage.completion_tokens == DRAIN_STREAM_TOKENS
    assert finish_reasons[-1] == "length"
    assert ours.process.wait(timeout=120) == 0, ours.log_tail()
