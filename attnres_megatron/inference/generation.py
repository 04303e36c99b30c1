"""Text generation over Megatron-Core's static inference context (the attention KV cache).

The attention layers keep their keys and values in Megatron-Core's ``StaticInferenceContext``;
AttnRes mixes each token over depth from that token's own sources, so the depth state needs no
cache: a decode step runs one token through every layer with the sources it builds on the way.

The pieces are Megatron-Core's: the context, ``GPTInferenceWrapper``'s forward steps (which
advance the cache offset) and ``TextGenerationController``'s sampler (greedy, temperature, top-k,
top-p, its seeded generator). The loop is this module's: Megatron-Core's static loop
(``generate_all_output_tokens_static_batch``) calls ``.cuda()`` and times steps with CUDA events,
and always prefills a prompt in one forward, where this loop can prefill in chunks.

Chunked prefill runs the prompt into the cache ``chunk`` tokens at a time. Once the cache holds
tokens, Megatron-Core's attention drops its causal mask type (a decode step needs none), so each
later chunk carries an explicit causal mask over the cached keys; the SDPA core attention of the
local spec honours it. Transformer Engine's attention ignores masks in that mode, so chunked
prefill is refused with the TE spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.utils import get_model_config
from torch import Tensor

from attnres_megatron.layers.sdpa_attention import SDPACoreAttention

CHUNKED_PREFILL_NEEDS_SDPA = (
    "chunked prefill needs the local spec's SDPA core attention (--transformer-impl local): "
    "Transformer Engine's attention drops the causal mask once the KV cache holds tokens"
)


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is drawn: greedy (``top_k == 1``) or sampled, Megatron-Core's way."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: int = 1234

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken (``top_k == 1`` or temperature 0)."""
        return self.top_k == 1 or self.temperature == 0.0

    def sampling_params(self) -> SamplingParams:
        """Megatron-Core's ``SamplingParams`` for these settings."""
        if self.greedy:
            return SamplingParams(temperature=1.0, top_k=1, top_p=0.0)
        return SamplingParams(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p)
        )


@dataclass
class Generation:
    """Prompts and generated tokens of one batch, and where the time went."""

    tokens: Tensor
    """``[batch, prompt + steps]``: each prompt and its tokens (rows that stopped early end in eod)."""
    prompt_length: int
    lengths: list[int]
    """Generated tokens per row, an end-of-document token included."""
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    """Forward steps after the prefill (one token each)."""

    def generated(self, row: int) -> list[int]:
        """The tokens row ``row`` generated."""
        start = self.prompt_length
        return self.tokens[row, start : start + self.lengths[row]].tolist()


def window_causal_mask(start: int, end: int, device: Any = None) -> Tensor:
    """Megatron's mask (True: masked) of queries ``start..end-1`` over keys ``0..end-1``."""
    queries = torch.arange(start, end, device=device).unsqueeze(1)
    keys = torch.arange(end, device=device).unsqueeze(0)
    return (keys > queries).view(1, 1, end - start, end)


def supports_chunked_prefill(model: torch.nn.Module) -> bool:
    """Whether every attention layer of ``model`` applies explicit masks (the SDPA core attention)."""
    cores = [module.core_attention for module in model.modules() if hasattr(module, "core_attention")]
    return all(isinstance(core, SDPACoreAttention) for core in cores)


class AttnResInferenceWrapper(GPTInferenceWrapper):
    """Megatron-Core's GPT inference wrapper over a static KV cache, with chunked prefill.

    Takes the model (unwrapped, every layer on this rank: tensor parallelism only) and the
    cache's batch and sequence capacity.
    """

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int) -> None:
        config = get_model_config(model)
        wrapper_config = InferenceWrapperConfig(
            hidden_size=config.hidden_size,
            params_dtype=config.params_dtype,
            inference_batch_times_seqlen_threshold=-1,
            padded_vocab_size=model.vocab_size,
            inference_max_requests=max_batch_size,
            inference_max_seq_length=max_sequence_length,
        )
        super().__init__(model, wrapper_config, StaticInferenceContext.from_config(wrapper_config))

    def _build_attention_mask_and_position_ids(self, prompts_tokens: Tensor) -> tuple[None, Tensor]:
        """Positions only: each context window builds its own mask (:meth:`get_batch_for_context_window`)."""
        positions = torch.arange(prompts_tokens.size(1), dtype=torch.long, device=prompts_tokens.device)
        return None, positions.unsqueeze(0).expand_as(prompts_tokens)

    def get_batch_for_context_window(
        self, inference_input: dict[str, Any], context_start_position: int, context_end_position: int
    ) -> dict[str, Any]:
        """The window's tokens and positions; a causal mask over the cache for a multi-token window
        after the first (the first runs causal, and one query may attend to every cached key)."""
        batch = super().get_batch_for_context_window(
            inference_input, context_start_position, context_end_position
        )
        if context_start_position > 0 and context_end_position - context_start_position > 1:
            device = inference_input["tokens"].device
            batch["attention_mask"] = window_causal_mask(context_start_position, context_end_position, device)
        return batch

    def prefill(
        self,
        inference_input: dict[str, Any],
        end: int,
        chunk_size: Optional[int] = None,
        all_logits: bool = False,
    ) -> Tensor:
        """Run tokens ``[0, end)`` into the KV cache, ``chunk_size`` at a time (None: at once).

        Returns ``[batch, end, vocab]`` logits with ``all_logits``, else each chunk's last ones.
        """
        chunk = chunk_size or end
        if chunk < end and not supports_chunked_prefill(self.model):
            raise ValueError(CHUNKED_PREFILL_NEEDS_SDPA)
        self.inference_context.materialize_only_last_token_logits = not all_logits
        logits = []
        for start in range(0, end, chunk):
            window = self.get_batch_for_context_window(inference_input, start, min(start + chunk, end))
            logits.append(self.run_one_forward_step(window))
        return torch.cat(logits, dim=1)

    def decode(self, inference_input: dict[str, Any], position: int) -> Tensor:
        """One decode step: the token at ``position`` through every layer; its ``[batch, 1, vocab]``."""
        self.inference_context.enable_decode_mode()
        self.inference_context.materialize_only_last_token_logits = True
        return self.run_one_forward_step(
            self.get_batch_for_context_window(inference_input, position, position + 1)
        )


class TokenSampler:
    """Megatron-Core's sampler over the tokenizer's ids; every tensor-parallel rank takes rank 0's token."""

    def __init__(self, wrapper: GPTInferenceWrapper, settings: SamplingSettings, vocab_size: int) -> None:
        self.controller = TextGenerationController(wrapper, tokenizer=None)
        self.controller.sampling_rng.manual_seed(settings.seed)
        self.params = settings.sampling_params()
        self.vocab_size = vocab_size

    def __call__(self, logits: Tensor) -> Tensor:
        """The next token of each row of ``[batch, padded vocab]`` logits (padding ids never)."""
        logits = logits.float()
        logits[:, self.vocab_size :] = float("-inf")
        tokens = self.controller.sample_from_logits(logits, self.params, self.vocab_size)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                tokens,
                parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        return tokens


def _seconds_since(start: float, device: torch.device) -> float:
    """Seconds since ``start`` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_capacity(wrapper: AttnResInferenceWrapper, batch: int, total_length: int) -> None:
    """``ValueError`` when the batch or prompt plus new tokens exceed the cache."""
    context = wrapper.inference_context
    if batch > context.max_batch_size:
        raise ValueError(f"batch of {batch} prompts exceeds the KV cache's {context.max_batch_size}.")
    if total_length > context.max_sequence_length:
        raise ValueError(
            f"prompt plus new tokens ({total_length}) exceed the KV cache's "
            f"{context.max_sequence_length} tokens."
        )


@torch.inference_mode()
def generate(
    wrapper: AttnResInferenceWrapper,
    sampler: TokenSampler,
    prompt: Tensor,
    max_new_tokens: int,
    prefill_chunk_size: Optional[int] = None,
    eod: Optional[int] = None,
) -> Generation:
    """Continue each row of ``prompt`` (``[batch, length]`` ids) by up to ``max_new_tokens``.

    The prompt runs into the KV cache (in chunks of ``prefill_chunk_size``), then each step
    decodes one token. A row stops at ``eod`` (None: never); the loop ends when every row did.
    """
    batch, prompt_length = prompt.shape
    if prompt_length < 1 or max_new_tokens < 1:
        raise ValueError(f"need a prompt token and a new token; got {prompt_length} and {max_new_tokens}.")
    check_capacity(wrapper, batch, prompt_length + max_new_tokens)
    tokens = torch.zeros((batch, prompt_length + max_new_tokens), dtype=torch.long, device=prompt.device)
    tokens[:, :prompt_length] = prompt
    wrapper.prep_model_for_inference()
    inference_input = wrapper.prep_inference_input(tokens)
    started = time.perf_counter()
    logits = wrapper.prefill(inference_input, prompt_length, prefill_chunk_size)
    prefill_seconds = _seconds_since(started, logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long)
    steps, position = 0, prompt_length
    started = time.perf_counter()
    while True:
        token = sampler(logits[:, -1, :])
        tokens[:, position] = torch.where(finished, tokens[:, position - 1], token)
        if eod is not None:
            stopped = (token == eod) & ~finished
            lengths[stopped.cpu()] = position - prompt_length + 1
            finished |= stopped
        position += 1
        if position == prompt_length + max_new_tokens or bool(finished.all()):
            break
        logits = wrapper.decode(inference_input, position - 1)
        steps += 1
    return Generation(
        tokens=tokens[:, :position].clone(),
        prompt_length=prompt_length,
        lengths=lengths.clamp(max=position - prompt_length).tolist(),
        prefill_seconds=prefill_seconds,
        decode_seconds=_seconds_since(started, logits.device),
        decode_steps=steps,
    )
