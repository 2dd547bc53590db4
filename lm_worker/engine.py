"""The language-only vLLM engine: prompts with one placeholder per image, embeddings instead of pixels.

vLLM is started with `enable_mm_embeds=True` and an image limit of 0, so it loads no vision tower or projector
and accepts each image as a ready `[tokens, llm_hidden]` tensor; it expands every placeholder in the prompt to
`<img>` + tokens x `<IMG_CONTEXT>` + `</img>` from the tensor's length. The model class comes from the plugin
(see `vllm_models`): it accepts images of different lengths in one step and Flash checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import torch
from pydantic import Field

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import InvalidRequestError, UnavailableError
from dvd_serve.common.chat import AnswerOptions, ChatJob, GenerationDelta, PromptOptions, SamplingConfig
from dvd_serve.lm_worker.answer_parsing import AUTO, AnswerSplitter, RequestPlan, choose_parsers, parser_class
from dvd_serve.lm_worker.context_budget import framed_prompt_ids, output_token_budget
from dvd_serve.lm_worker.vllm_plugin import language_only_overrides, register

logger = logging.getLogger(__name__)

ENGINE_DEAD_CODE = "engine_dead"  # error code of every stream the engine was serving when it died


MAX_ENGINE_ERROR_CHARS = 300  # of vLLM's own words on an invalid constraint, quoted in the 400


def engine_dead_error() -> UnavailableError:
    return UnavailableError("The language engine stopped.", code=ENGINE_DEAD_CODE)


class LanguageEngineConfig(FrozenConfig):
    """How the language worker runs vLLM. One per language replica."""

    model: str = Field(description="Checkpoint folder (either format, Flash included).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights and activations dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    max_model_len: int | None = Field(
        default=None, ge=256,
        description="Context length (visual + text + output tokens); None = the checkpoint's own, lowered to what "
        "the KV cache holds (vLLM's auto-fit, which logs the value it chose).",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Requests decoded together.")
    max_images_per_request: int = Field(default=16, ge=1, description="Images one prompt may carry.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take (ignored on CPU)."
    )
    enforce_eager: bool | None = Field(
        default=None, description="Disable CUDA graphs / compilation; None = eager on CPU, graphs on GPU."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV of shared prompt prefixes.")
    mm_input_cache_gib: float = Field(
        default=0.0, ge=0.0,
        description="vLLM's multimodal input cache (`mm_processor_cache_gb`) in the engine-core process. vLLM "
        "defaults to 4 GiB, which here fills with image embeddings the engine has already consumed (host memory "
        "that grows with traffic until the cap); a replica's embeddings arrive ready from the vision pool, so "
        "0 keeps none.",
    )
    seed: int = Field(default=0, description="Engine-level seed.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="vLLM scheduling: first come first served, or by each request's `priority`."
    )
    tool_call_parser: str | None = Field(
        default=AUTO,
        description="vLLM tool-call parser (vLLM's `--tool-call-parser`, e.g. hermes); `auto` picks it from the "
        "checkpoint (hermes for the Qwen-based members, whose language models were trained on that format); None "
        "turns tool calling off.",
    )
    reasoning_parser: str | None = Field(
        default=AUTO,
        description="vLLM reasoning parser (vLLM's `--reasoning-parser`, e.g. qwen3, deepseek_r1); `auto` picks "
        "qwen3 when the chat template has an `enable_thinking` switch, else none (InternVL3.5's own templates "
        "have none: its thinking mode is a system prompt, so the reasoning is left in `content`).",
    )


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def build_engine_args(config: LanguageEngineConfig, spec: CheckpointSpec, reasoning_parser: str | None = None):
    """vLLM engine arguments for a language-only engine over `config.model`; `reasoning_parser` also gates the
    engine's structured output until reasoning ends, as vLLM's `--reasoning-parser` does."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_gpu = torch.cuda.is_available()
    enforce_eager = (not on_gpu) if config.enforce_eager is None else config.enforce_eager
    return AsyncEngineArgs(
        model=config.model,
        trust_remote_code=spec.fmt == "chat",
        dtype=resolve_dtype(config.dtype),
        max_model_len=-1 if config.max_model_len is None else config.max_model_len,  # -1: vLLM's auto-fit
        max_num_seqs=config.max_num_seqs,
        enforce_eager=enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        seed=config.seed,
        scheduling_policy=config.scheduling_policy,
        gpu_memory_utilization=config.gpu_memory_utilization,
        limit_mm_per_prompt={"image": 0, "video": 0},
        enable_mm_embeds=True,
        mm_processor_cache_gb=config.mm_input_cache_gib,
        hf_overrides=language_only_overrides(spec),
        distributed_executor_backend=None if on_gpu else "uni",
        reasoning_parser=reasoning_parser or "",
    )


class LanguageEngine:
    """A started vLLM `AsyncLLM` over one checkpoint, language model only."""

    def __init__(self, config: LanguageEngineConfig, spec: CheckpointSpec, engine,
                 parsers: tuple[str | None, str | None] = (None, None)) -> None:
        self.config = config
        self.spec = spec
        self._engine = engine
        self.tool_parser, self.reasoning_parser = parsers
        self.parser_cls = parser_class(self.tool_parser, self.reasoning_parser, config.model, self.tokenizer)
        if self.parser_cls is not None:
            logger.info("tool-call parser %s, reasoning parser %s", self.tool_parser, self.reasoning_parser)
        # The checkpoint's generation_config.json sampling defaults, as vLLM's `--generation-config auto` applies.
        self.default_sampling = dict(engine.model_config.get_diff_sampling_param())
        if self.default_sampling:
            logger.info("default sampling parameters from the checkpoint: %s", self.default_sampling)

    @classmethod
    def start(cls, config: LanguageEngineConfig) -> "LanguageEngine":
        register()
        from vllm.v1.engine.async_llm import AsyncLLM

        spec = CheckpointSpec.from_dir(config.model)
        parsers = choose_parsers(config.tool_call_parser, config.reasoning_parser, spec.llm_type,
                                 checkpoint_chat_template(config.model))
        engine = AsyncLLM.from_engine_args(build_engine_args(config, spec, reasoning_parser=parsers[1]))
        return cls(config, spec, engine, parsers)

    @property
    def tokenizer(self):
        return self._engine.get_tokenizer()

    @property
    def model_config(self):
        """vLLM's `ModelConfig` of the engine (chat-template resolution reads it)."""
        return self._engine.model_config

    @property
    def max_model_len(self) -> int:
        """The context length the engine runs with (vLLM's, after its KV-cache check)."""
        return self._engine.model_config.max_model_len

    def plan(self, sampling: SamplingConfig, answer: AnswerOptions = AnswerOptions(),
             prompt_options: PromptOptions = PromptOptions()) -> RequestPlan:
        """vLLM's request for a job, adjusted by the parsers (tool-choice constraints); 400 on what vLLM refuses.
        Made before the prompt is rendered: the template needs its tools."""
        return _validated(lambda: RequestPlan.build(sampling, answer, prompt_options, self.parser_cls, self.tokenizer,
                                                    self.model_config))

    def prepare(self, job: ChatJob) -> tuple[str, RequestPlan]:
        """`job`'s prompt text, rendered as vLLM's server renders it, and its vLLM request."""
        from dvd_serve.lm_worker.prompt import render_prompt

        plan = self.plan(job.sampling, job.answer, job.prompt_options)
        prompt = render_prompt(self.model_config, self.tokenizer, job.messages, self.spec, plan.chat_template_kwargs,
                               plan.tools)
        return prompt, plan

    async def generate(
        self,
        request_id: str,
        prompt: str,
        images: Sequence[torch.Tensor],
        plan: RequestPlan,
        priority: int = 0,
        image_ids: Sequence[str | None] | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Stream the answer to `prompt`, whose placeholders are filled by `images` in order.

        `image_ids[i]` names the embeddings of image i exactly (the vision side's `embedding_identity`); vLLM then
        keys its prefix cache by it instead of hashing the tensor, so a repeated image reuses the KV cache of the
        prompt up to and past it. None (or a None entry): vLLM hashes the tensor, with the same reuse.

        With n > 1 the choices' deltas interleave, each with its `index`. Raises `InvalidRequestError`
        (400) before the engine sees a request that does not fit the context or that vLLM's validation refuses.
        """
        self._check_images(prompt, images)
        if priority and self.config.scheduling_policy != "priority":
            raise InvalidRequestError(
                "'priority' other than 0 needs the priority scheduling policy, which this server does not use.",
                code="invalid_value", param="priority",
            )
        request = plan.request
        # Off the event loop: a long prompt takes tens of milliseconds to tokenize.
        prompt_ids = await asyncio.to_thread(framed_prompt_ids, self.tokenizer, prompt, self.spec)
        max_tokens = self._output_budget(len(prompt_ids) + sum(image.shape[0] for image in images), plan.sampling)
        engine_prompt: dict = {"prompt": prompt}
        if images:
            engine_prompt["multi_modal_data"] = {"image": [image.to(self.dtype) for image in images]}
            if image_ids is not None and all(image_ids):
                engine_prompt["multi_modal_uuids"] = {"image": list(image_ids)}
        params = _validated(lambda: plan.sampling_params(max_tokens, self.default_sampling))
        splitter = None if plan.parser_cls is None else AnswerSplitter(plan, self.tokenizer, self.model_config)
        reasoning_hint = {}
        if splitter is not None and plan.parser_cls.reasoning_parser_cls is not None:
            # The image rows are not in `prompt_ids`; the check looks for the reasoning markers only.
            reasoning_hint = dict(
                reasoning_ended=plan.reasoning_ended(plan.new_parser(self.tokenizer, self.model_config), prompt_ids),
                reasoning_parser_kwargs={"chat_template_kwargs": plan.chat_template_kwargs},
            )
        first = True
        running = request.n or 1
        try:
            async for output in self._engine.generate(engine_prompt, params, request_id, priority=priority,
                                                      **reasoning_hint):
                for completion in output.outputs:
                    running -= completion.finish_reason is not None
                    delta = GenerationDelta(
                        token_ids=list(completion.token_ids),
                        text=completion.text,
                        finish_reason=completion.finish_reason,
                        index=completion.index,
                        choices_running=running if completion.finish_reason is not None else running - 1,
                        prompt_token_count=len(output.prompt_token_ids or ()) if first else None,
                        cached_prompt_tokens=output.num_cached_tokens if first else None,
                        logprobs=_plain_logprobs(completion.logprobs),
                        made_at=time.time(),
                    )
                    if splitter is not None:
                        split = splitter.split(completion.index, completion.text, delta.token_ids,
                                               completion.finish_reason, output.prompt_token_ids)
                        delta.text, delta.reasoning, delta.tool_calls = split.content, split.reasoning, split.tool_calls
                        delta.finish_reason, delta.content_null = split.finish_reason, split.content_null
                        if not request.include_reasoning:  # vLLM hides per-token data that could show reasoning
                            delta.logprobs = None
                    first = False
                    yield delta
        except _vllm_validation_error() as error:
            raise _from_vllm_validation(error) from error
        except (ValueError, _vllm_client_error()) as error:
            # A backstop: what vLLM itself refuses (its validation errors are not all ValueErrors).
            logger.info("request %s rejected by the engine: %s", request_id, error)
            if params.structured_outputs is not None:  # vLLM's backend refused the grammar, schema or regex
                raise InvalidRequestError(
                    f"The structured-output constraint is invalid: {str(error)[:MAX_ENGINE_ERROR_CHARS]}",
                    code="invalid_structured_output",
                    param=_constraint_param(plan.sampling),
                ) from error
            raise InvalidRequestError(
                "The request does not fit the model (context length or image placeholders).",
                code="engine_rejected_prompt",
            ) from error
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as error:
            if self._engine.errored:
                raise engine_dead_error() from error
            raise
        finally:
            # Cancelled, closed early by the consumer, or failed: free the engine's slot and KV blocks.
            if running > 0 and not self._engine.errored:
                await asyncio.shield(self.abort(request_id))

    def _output_budget(self, prompt_tokens: int, sampling: SamplingConfig) -> int:
        """The `max_tokens` to give the engine for a prompt of `prompt_tokens` (images included); 400s as
        `output_token_budget` decides them."""
        max_model_len = self.max_model_len
        if sampling.max_tokens is not None:
            requested = sampling.max_tokens
        else:  # vLLM's `get_max_tokens`: the checkpoint's max_new_tokens if it has one, else the rest of the context
            requested = self.default_sampling.get("max_tokens") or max_model_len
        budget = output_token_budget(prompt_tokens, requested, max_model_len, sampling.max_tokens_param)
        if sampling.min_tokens > budget:
            raise InvalidRequestError(
                f"'min_tokens' ({sampling.min_tokens}) exceeds the {budget} output tokens the context leaves.",
                code="invalid_value", param="min_tokens",
            )
        return budget

    async def prompt_tokens(self, job: ChatJob) -> list[int]:
        """The token ids of `job`'s chat (a text-only `ChatJob`) rendered as for generation (vLLM's `/tokenize`)."""
        prompt, _ = self.prepare(job)
        return await asyncio.to_thread(self.tokenizer.encode, prompt, add_special_tokens=False)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def check_health(self) -> None:
        """Raises when the engine is dead."""
        await self._engine.check_health()

    @property
    def is_dead(self) -> bool:
        return bool(self._engine.errored)

    @property
    def unfinished_requests(self) -> int:
        """Requests the engine holds (running or waiting); an aborted request leaves at once."""
        return self._engine.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._engine.shutdown()

    @property
    def dtype(self) -> torch.dtype:
        """The engine's activation dtype; received embeddings must arrive in it."""
        return self._engine.model_config.dtype

    def _check_images(self, prompt: str, images: Sequence[torch.Tensor]) -> None:
        if len(images) > self.config.max_images_per_request:
            raise InvalidRequestError("Too many images in one request.", code="too_many_images")
        if prompt.count(self.spec.image_placeholder) != len(images):
            raise InvalidRequestError(
                "The prompt's image placeholders do not match the images sent.", code="placeholder_mismatch"
            )
        for image in images:
            if image.dim() != 2 or image.shape[1] != self.spec.llm_hidden or image.shape[0] == 0:
                raise InvalidRequestError("Image embeddings have the wrong shape.", code="bad_embedding_shape")


def _vllm_client_error() -> type[Exception]:
    from vllm.exceptions import VLLMClientError

    return VLLMClientError


def _vllm_validation_error() -> type[Exception]:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError


def _from_vllm_validation(error) -> InvalidRequestError:
    """vLLM's own refusal of a sampling value (out of range, id outside the vocabulary) as a 400 naming the field."""
    return InvalidRequestError(str(error.args[0]) if error.args else "Invalid request.", code="invalid_value",
                               param=error.parameter)


def _validated(build):
    from pydantic import ValidationError

    try:
        return build()
    except _vllm_validation_error() as error:
        raise _from_vllm_validation(error) from error
    except ValidationError as error:  # vLLM's request model refused a field's shape (e.g. `structured_outputs`)
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequestError(f"Invalid '{param}': {first['msg']}.", code="invalid_value", param=param) from None


def _constraint_param(sampling: SamplingConfig) -> str:
    """The request field a constraint came from: the client's own, else the tool schemas."""
    if sampling.structured_outputs is not None:
        return "structured_outputs"
    return "response_format" if sampling.response_format is not None else "tools"


def _plain_logprobs(logprobs) -> list[dict[int, float]] | None:
    if logprobs is None:
        return None
    return [{token: entry.logprob for token, entry in position.items()} for position in logprobs]


def checkpoint_chat_template(model_dir: str) -> str:
    """The chat template a checkpoint ships (chat_template.jinja, chat_template.json, or tokenizer_config.json's
    `chat_template`), as text; "" when it has none. Read before the engine starts: the parser choice needs it."""
    import json
    from pathlib import Path

    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                return "\n".join(str(entry.get("template", "")) for entry in template)
            if isinstance(template, str):
                return template
    return ""
