"""Transformer layer whose two sublayers read AttnRes mixes instead of a residual stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import CheckpointWithoutOutput
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.layers.depth_state import DepthState, seals_before


@dataclass
class AttnResTransformerLayerSubmodules(TransformerLayerSubmodules):
    """Transformer layer submodules plus the depth-attention module built per sublayer."""

    depth_attention: Union[ModuleSpec, type] = DepthAttention


class AttnResTransformerLayer(TransformerLayer):
    """A Megatron ``TransformerLayer`` with Attention Residuals.

    Each sublayer (attention, then MLP/MoE) reads the depth-attention mix of the
    current :class:`DepthState`, keeps its own pre-norm, and adds its raw output
    (bias and dropout applied, no residual add) to the partial sum. Block boundaries
    are placed at global sublayer indices, so pipeline offsets are respected.
    """

    def __init__(self, config, submodules: TransformerLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        if not isinstance(self.cross_attention, IdentityOp):
            raise ValueError("Attention residuals do not support cross-attention layers.")
        depth_attention = getattr(submodules, "depth_attention", DepthAttention)
        self.attn_res_attention = build_module(depth_attention, config=self.config)
        self.attn_res_mlp = build_module(depth_attention, config=self.config)

    @property
    def first_sublayer(self) -> int:
        """Global 0-based index of this layer's attention sublayer."""
        return 2 * (self.layer_number - 1)

    def _sublayer_input(
        self, state: DepthState, sublayer: int, depth_attention: DepthAttention, norm, recompute_norm: bool
    ) -> tuple[DepthState, Tensor, Optional[CheckpointWithoutOutput]]:
        """Seal at a block boundary, then mix and pre-norm the sublayer's input.

        With AttnRes selective recompute the mix and the norm run without saving anything and
        their output is rebuilt in backward (the caller discards it after the sublayer ran);
        with Megatron's ``layernorm`` recompute only the norm is treated so.
        """
        if seals_before(sublayer, self.config.attn_res_sublayers_per_block):
            state = state.seal()
        recompute = self.training and torch.is_grad_enabled()
        if recompute and self.config.attn_res_recompute:
            checkpoint = CheckpointWithoutOutput(fp8=self.config.fp8)
            normed = checkpoint.checkpoint(lambda *sources: norm(depth_attention(sources)), *state.sources())
            return state, normed, checkpoint
        state, mixed = state.mix(sublayer, depth_attention)
        if recompute and recompute_norm:
            checkpoint = CheckpointWithoutOutput(fp8=self.config.fp8)
            return state, checkpoint.checkpoint(norm, mixed), checkpoint
        return state, norm(mixed), None

    def _bias_dropout(self, output_with_bias: tuple[Tensor, Optional[Tensor]]) -> Tensor:
        output, bias = output_with_bias
        if bias is not None:
            output = output + bias
        return F.dropout(output, p=self.hidden_dropout, training=self.training)

    def forward(
        self,
        hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context: Optional[Any] = None,
        packed_seq_params: Optional[Any] = None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        *,
        depth_state: DepthState,
        **_: Any,
    ) -> tuple[DepthState, Optional[Tensor]]:
        """Run both sublayers on ``depth_state``; returns the updated state and ``context``."""
        state, normed, checkpoint = self._sublayer_input(
            depth_state,
            self.first_sublayer,
            self.attn_res_attention,
            self.input_layernorm,
            self.recompute_input_layernorm,
        )
        attention_output = self.self_attention(
            normed,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        _discard_and_recompute(checkpoint, attention_output)
        state = state.add(self._bias_dropout(attention_output))

        state, normed, checkpoint = self._sublayer_input(
            state,
            self.first_sublayer + 1,
            self.attn_res_mlp,
            self.pre_mlp_layernorm,
            self.recompute_pre_mlp_layernorm,
        )
        if self.recompute_mlp:
            from megatron.core import tensor_parallel

            mlp_output = tensor_parallel.checkpoint(
                lambda t: self.mlp(t, padding_mask=padding_mask), False, normed
            )
        else:
            mlp_output = self.mlp(normed, padding_mask=padding_mask)
        _discard_and_recompute(checkpoint, mlp_output)
        state = state.add(self._bias_dropout(mlp_output))
        return state, context

    def __call__(self, *args, **kwargs):
        # Bypass Megatron's CUDA-graph dispatch, which assumes a tensor in and out.
        return torch.nn.Module.__call__(self, *args, **kwargs)


def _discard_and_recompute(
    checkpoint: Optional[CheckpointWithoutOutput], output_with_bias: tuple[Tensor, Optional[Tensor]]
) -> None:
    """Free a checkpointed sublayer input; rebuild it when the sublayer output's grad arrives."""
    if checkpoint is not None:
        checkpoint.discard_output_and_register_recompute(output_with_bias[0])
