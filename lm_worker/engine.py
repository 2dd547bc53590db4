"""The language-only vLLM engine: prompts with one placeholder per image, embeddings instead of pixels.

vLLM is started with `enable_mm_embeds=True` and an image limit of 0, so it loads no vision tower or projector
and accepts each image as a ready `[tokens, llm_hidden]` tensor; it expands every placeholder in the prompt to
`<img>` + tokens x `<IMG_CONTEXT>` + `</img>` from the tensor's length. The model class comes from the plugin
(see `vllm_models`): it accepts images of different lengths in one step and Flash checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import torch
from pydantic import Field

from dvd_serve.common.checkpoint.spec import CheckpointSpec
from dvd_serve.common.config import FrozenConfig
from dvd_serve.common.errors import InvalidRequestError, UnavailableError
from dvd_serve.common.chat import GenerationDelta, SamplingConfig
from dvd_serve.lm_worker.context_budget import output_token_budget, prompt_token_count
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


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def build_engine_args(config: LanguageEngineConfig, spec: CheckpointSpec):
    """vLLM engine arguments for a language-only engine over `config.model`."""
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
    )


class LanguageEngine:
    """A started vLLM `AsyncLLM` over one checkpoint, language model only."""

    def __init__(self, config: LanguageEngineConfig, spec: CheckpointSpec, engine) -> None:
        self.config = config
        self.spec = spec
        self._engine = engine
        # The checkpoint's generation_config.json sampling defaults, as vLLM's `--generation-config auto` applies.
        self.default_sampling = dict(engine.model_config.get_diff_sampling_param())
        if self.default_sampling:
            logger.info("default sampling parameters from the checkpoint: %s", self.default_sampling)

    @classmethod
    def start(cls, config: LanguageEngineConfig) -> "LanguageEngine":
        register()
        from vllm.v1.engine.async_llm import AsyncLLM

        spec = CheckpointSpec.from_dir(config.model)
        engine = AsyncLLM.from_engine_args(build_engine_args(config, spec))
        return cls(config, spec, engine)

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

    async def generate(
        self,
        request_id: str,
        prompt: str,
        images: Sequence[torch.Tensor],
        sampling: SamplingConfig,
        priority: int = 0,
    ) -> AsyncIterator[GenerationDelta]:
        """Stream the answer to `prompt`, whose placeholders are filled by `images` in order.

        With `sampling.n` > 1 the choices' deltas interleave, each with its `index`. Raises `InvalidRequestError`
        (400) before the engine sees a request that does not fit the context or that vLLM's validation refuses.
        """
        self._check_images(prompt, images)
        if priority and self.config.scheduling_policy != "priority":
            raise InvalidRequestError(
                "'priority' other than 0 needs the priority scheduling policy, which this server does not use.",
                code="invalid_value", param="priority",
            )
        max_tokens = await self._output_budget(prompt, images, sampling)
        engine_prompt: dict = {"prompt": prompt}
        if images:
            engine_prompt["multi_modal_data"] = {"image": [image.to(self.dtype) for image in images]}
        params = _validated(lambda: to_vllm_sampling_params(sampling, max_tokens, self.default_sampling))
        first = True
        running = sampling.n
        try:
            async for output in self._engine.generate(engine_prompt, params, request_id, priority=priority):
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
                    )
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
                    param="structured_outputs" if sampling.structured_outputs is not None else "response_format",
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

    async def _output_budget(self, prompt: str, images: Sequence[torch.Tensor], sampling: SamplingConfig) -> int:
        # Off the event loop: a long prompt takes tens of milliseconds to tokenize.
        prompt_tokens = await asyncio.to_thread(
            prompt_token_count, self.tokenizer, prompt, self.spec, [image.shape[0] for image in images]
        )
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

    async def prompt_tokens(self, job) -> list[int]:
        """The token ids of `job`'s chat (a text-only `ChatJob`) rendered as for generation (vLLM's `/tokenize`)."""
        from dvd_serve.lm_worker.prompt import render_prompt

        prompt = render_prompt(self.model_config, self.tokenizer, job.messages, self.spec, job.prompt_options)
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


def to_vllm_sampling_params(config: SamplingConfig, max_tokens: int, defaults: dict | None = None):
    """vLLM's parameters for `config`, mapped by vLLM's own chat request (`to_sampling_params`): the client's value,
    else the checkpoint's generation-config default (`defaults`), else vLLM's neutral default. `max_tokens` is the
    output budget the context leaves. Streams deltas (vLLM's `stream=True` output kind)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    request = VllmChatRequest(
        messages=[],
        stream=True,
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        min_p=config.min_p,
        presence_penalty=config.presence_penalty,
        frequency_penalty=config.frequency_penalty,
        repetition_penalty=config.repetition_penalty,
        seed=config.seed,
        stop=list(config.stop),
        stop_token_ids=list(config.stop_token_ids),
        include_stop_str_in_output=config.include_stop_str_in_output,
        min_tokens=config.min_tokens,
        logprobs=config.logprobs is not None,
        top_logprobs=config.logprobs or 0,
        logit_bias={str(token): bias for token, bias in config.logit_bias.items()} if config.logit_bias else None,
        allowed_token_ids=list(config.allowed_token_ids) if config.allowed_token_ids is not None else None,
        bad_words=list(config.bad_words),
        ignore_eos=config.ignore_eos,
        skip_special_tokens=config.skip_special_tokens,
        spaces_between_special_tokens=config.spaces_between_special_tokens,
        response_format=config.response_format,
        structured_outputs=config.structured_outputs,
    )
    return request.to_sampling_params(max_tokens, defaults or {})


def _plain_logprobs(logprobs) -> list[dict[int, float]] | None:
    if logprobs is None:
        return None
    return [{token: entry.logprob for token, entry in position.items()} for position in logprobs]
