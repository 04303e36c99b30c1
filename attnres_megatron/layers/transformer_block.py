"""Transformer block that threads the AttnRes depth state and applies the final mix."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor, make_viewless_tensor
from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.layers.depth_state import DepthState


class AttnResTransformerBlock(TransformerBlock):
    """``TransformerBlock`` whose layers share a :class:`DepthState` instead of a residual.

    The embedding output is the first source ``b0``. After the last layer of the model,
    ``attn_res_final`` mixes every source (completed blocks and the last partial sum)
    before the final layernorm. With ``attention_residuals='none'`` the block behaves
    exactly like Megatron-Core's.
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
        if not self.config.attn_res_enabled:
            return
        if self.config.pipeline_model_parallel_size > 1:
            raise ValueError(
                "attention residuals with pipeline_model_parallel_size > 1 are not "
                "supported by this block; use pipeline_model_parallel_size=1."
            )
        if self.post_process:
            self.attn_res_final = DepthAttention(self.config)

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
        if inference_context is not None or inference_params is not None:
            raise ValueError("Inference contexts (KV caches) are not supported with attention residuals.")
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if not self.pre_process:
            hidden_states = self.input_tensor
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        state = DepthState.from_embedding(hidden_states)

        rng_context = (
            tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else nullcontext()
        )
        outer_quantization, per_layer_quantization = self._quantization_contexts()
        with rng_context, outer_quantization:
            for layer in self.layers:
                with self.offload_context, per_layer_quantization(layer.layer_number - 1):
                    state, context = layer(
                        attention_mask=attention_mask,
                        context=context,
                        context_mask=context_mask,
                        rotary_pos_emb=rotary_pos_emb,
                        rotary_pos_cos=rotary_pos_cos,
                        rotary_pos_sin=rotary_pos_sin,
                        rotary_pos_cos_sin=rotary_pos_cos_sin,
                        attention_bias=attention_bias,
                        packed_seq_params=packed_seq_params,
                        sequence_len_offset=sequence_len_offset,
                        padding_mask=padding_mask,
                        depth_state=state,
                    )
            hidden_states = self.attn_res_final(state.sources())

        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)

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
