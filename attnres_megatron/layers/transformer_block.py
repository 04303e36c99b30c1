"""Transformer block that threads the AttnRes depth state and applies the final mix."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Optional

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor, deprecate_inference_params, get_pg_rank, make_viewless_tensor
from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.layers.depth_state import DepthState, seals_before
from attnres_megatron.layers.mixers import output_mix, with_mixers
from attnres_megatron.pipeline.megatron_split import layout_from_config
from attnres_megatron.pipeline.stage_io import StageIO

PIPELINE_INFERENCE_UNSUPPORTED = (
    "Inference with attention residuals runs without pipeline parallelism: a stage's AttnRes "
    "payload is not what Megatron-Core's inference pipeline sends. Load the model with "
    "--pipeline-model-parallel-size 1 (any TP size)."
)


class AttnResTransformerBlock(TransformerBlock):
    """``TransformerBlock`` whose layers share a :class:`DepthState` instead of a residual.

    The embedding output is the first source ``b0``. After the last layer of the model,
    ``attn_res_final`` mixes every source (completed blocks and the last partial sum)
    before the final layernorm. With ``attention_residuals='none'`` the block behaves
    exactly like Megatron-Core's. Under an inference context the layers' attention keeps its
    KV cache there; the depth mix is per token, so the depth state needs no cache of its own.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._build_attn_res()

    @classmethod
    def adopt(cls, block: TransformerBlock) -> AttnResTransformerBlock:
        """Turn an already-built ``TransformerBlock`` into this class in place (no rebuild)."""
        block.__class__ = cls
        block._build_attn_res()
        return block

    def _build_attn_res(self) -> None:
        self.attn_res_final = None
        self.attn_res_layout = None
        self.attn_res_io = None
        if not self.config.attn_res_enabled:
            return
        if self.post_process:
            self.attn_res_final = DepthAttention(self.config)
        if self.config.pipeline_model_parallel_size > 1:
            self.attn_res_layout = layout_from_config(self.config)
            pp_rank = get_pg_rank(self.pg_collection.pp)
            chunk = self.attn_res_layout.chunk(pp_rank, self.vp_stage or 0)
            self.attn_res_io = StageIO(self.attn_res_layout, chunk)

    def set_input_tensor(self, input_tensor: Tensor) -> None:
        """Hand the received stage payload to the stage I/O; ``input_tensor`` is its partial sum."""
        if self.attn_res_io is None or input_tensor is None:
            return super().set_input_tensor(input_tensor)
        self.input_tensor = self.attn_res_io.accept(input_tensor)

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        if not self.config.attn_res_enabled:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        return self._attn_res_forward(hidden_states, attention_mask, *args, **kwargs)

    def _attn_res_forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        *,
        inference_params=None,
        dynamic_inference_decode_only=None,
    ) -> Tensor:
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if inference_context is not None and self.attn_res_io is not None:
            raise ValueError(PIPELINE_INFERENCE_UNSUPPORTED)
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        state = self._initial_state(hidden_states)

        rng_context = (
            tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        )
        outer_quantization, per_layer_quantization = self._quantization_contexts()
        layer_kwargs = dict(
            attention_mask=attention_mask,
            context=context,
            context_mask=context_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            padding_mask=padding_mask,
        )
        with rng_context, outer_quantization:
            for start, end, checkpointed in self._recompute_groups():
                run = self._checkpointed_layers if checkpointed else self._run_layers
                state = run(state, self.layers[start:end], layer_kwargs, per_layer_quantization)
            if not self.post_process:
                return self.attn_res_io.send(self._micro_batch(), state.blocks, state.partial)
            hidden_states = self.attn_res_final(state.sources(), mix=output_mix(state, self.attn_res_final))

        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)

    def _run_layers(self, state: DepthState, layers, layer_kwargs: dict, quantization) -> DepthState:
        """Run ``layers`` on ``state`` (two-phase mixers scoped to these layers)."""
        state = with_mixers(state, layers, self.config)
        for layer in layers:
            with self.offload_context, quantization(layer.layer_number - 1):
                state, _ = layer(**layer_kwargs, depth_state=state)
        return state

    def _recompute_groups(self) -> list[tuple[int, int, bool]]:
        """``(start, end, checkpointed)`` layer ranges for Megatron's full recompute methods."""
        count = len(self.layers)
        if self.config.recompute_granularity != "full" or not self.training or count == 0:
            return [(0, count, False)]
        step = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            return [(start, min(start + step, count), True) for start in range(0, count, step)]
        return [(0, min(step, count), True)] + ([(step, count, False)] if step < count else [])

    def _checkpointed_layers(self, state: DepthState, layers, layer_kwargs: dict, quantization) -> DepthState:
        """Run ``layers`` under full activation recompute.

        Only tensors cross the checkpoint: the sources in, the blocks sealed inside and the
        new partial sum out. Block bookkeeping (sealing at the group's first sublayer, the
        ``on_seal`` taps) happens out here, so re-running the group in backward never seals
        or stores a block twice.
        """
        if seals_before(layers[0].first_sublayer, self.config.attn_res_sublayers_per_block):
            state = state.seal()
        num_blocks, has_partial = len(state.blocks), state.partial is not None

        def run_group(*sources: Tensor) -> tuple[Tensor, ...]:
            inner = DepthState(sources[:num_blocks], sources[num_blocks] if has_partial else None)
            inner = self._run_layers(inner, layers, layer_kwargs, quantization)
            return (*inner.blocks[num_blocks:], inner.partial)

        *sealed, partial = self._checkpoint(run_group, state.sources())
        for block in sealed:
            state = replace(state, partial=block).seal()
        return replace(state, partial=partial)

    def _checkpoint(self, function, tensors: list[Tensor]):
        """Megatron's checkpoint function (Transformer Engine's under FP8/FP4, as Megatron does)."""
        if self.config.fp8 or self.config.fp4:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(
                function,
                self.config.distribute_saved_activations,
                tensor_parallel.random.get_cuda_rng_tracker,
                self.pg_collection.tp,
                *tensors,
            )
        return tensor_parallel.checkpoint(function, self.config.distribute_saved_activations, *tensors)

    def _micro_batch(self) -> int:
        """Micro-batch id that Megatron's schedules set on the layers (0 outside them)."""
        if not len(self.layers):
            return 0
        return getattr(self.layers[0], "current_microbatch", None) or 0

    def _initial_state(self, hidden_states: Optional[Tensor]) -> DepthState:
        """b0 from the embedding, or what the stage I/O received for this chunk."""
        embedding = None
        if self.pre_process or self.attn_res_io is None:
            source = hidden_states if self.pre_process else self.input_tensor
            embedding = make_viewless_tensor(inp=source, requires_grad=True, keep_graph=True)
        if self.attn_res_io is None:
            return DepthState.from_embedding(embedding)
        inputs = self.attn_res_io.receive(self._micro_batch(), embedding)
        return DepthState(inputs.blocks, inputs.partial, on_seal=inputs.on_seal)

    def _quantization_contexts(self):
        """FP8/FP4 contexts as Megatron places them: around the loop (delayed) or per layer."""
        if self.config.fp8:
            from megatron.core.enums import Fp8Recipe
            from megatron.core.fp8_utils import get_fp8_context

            if self.config.fp8_recipe == Fp8Recipe.delayed:
                return get_fp8_context(self.config), lambda _: nullcontext()
            return nullcontext(), lambda layer_no: get_fp8_context(self.config, layer_no)
        if self.config.fp4:
            from megatron.core.fp4_utils import get_fp4_context

            return nullcontext(), lambda layer_no: get_fp4_context(self.config, layer_no)
        return nullcontext(), lambda _: nullcontext()
