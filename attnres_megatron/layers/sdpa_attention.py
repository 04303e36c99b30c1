"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for Megatron's ``DotProductAttention`` in local (non-TE) specs: same
constructor and ``[s, b, heads, dim]`` inputs, no global memory buffer, flash/efficient
kernels on GPU and a fused kernel on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


class SDPACoreAttention(DotProductAttention):
    """Megatron core attention computed with PyTorch SDPA."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError("Packed sequences need the Transformer Engine spec (--transformer-impl te).")
        if attention_bias is not None:
            raise ValueError("attention_bias needs the Transformer Engine spec (--transformer-impl te).")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # Megatron masks are True where attention is forbidden.
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        # [b, n, s, d] -> [s, b, n * d]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.shape[0], context.shape[1], -1)
