"""NoPE Multi-head Latent Attention (Kimi Linear's full-attention layers) on Megatron-Core's MLA.

Kimi Linear's MLA (``mla_use_nope=true``) keeps DeepSeek's 64-d "rope" slice of every query
head and the single shared key slice, but never rotates them. Megatron-Core 0.16.1's
``MLASelfAttention`` always builds a ``RotaryEmbedding`` and applies it to that slice, so
:class:`NoPEMLASelfAttention` swaps in :class:`NoRotaryEmbedding`: a rotary embedding with
zero rotary channels. Megatron's rotary apply rotates ``t[..., :rot_dim]`` and passes
``t[..., rot_dim:]`` through unchanged, so with ``rot_dim = 0`` the slice reaches the
attention bit for bit as projected (no angle, and no even/odd deinterleave either), at the
cost of one concatenation. Everything else (projections, the 512-d latent RMSNorm, the
softmax scale ``1/sqrt(qk_head_dim + qk_pos_emb_head_dim)``, tensor/sequence/context
parallelism) is stock Megatron-Core.

Use it with ``rope_type='rope'`` (YaRN would also rescale the softmax and the slice) and
``apply_rope_fusion=False``, and build the model with ``position_embedding_type='none'``:
``GPTModel`` then passes ``rotary_pos_emb=None`` to the layers, as MLA requires.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.models.common.embeddings import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from attnres_megatron.layers.sdpa_attention import SDPACoreAttention


class NoRotaryEmbedding(RotaryEmbedding):
    """A ``RotaryEmbedding`` with zero rotary channels: ``apply_rotary_pos_emb`` becomes the identity."""

    def __init__(self, cp_group: Optional[torch.distributed.ProcessGroup] = None) -> None:
        super().__init__(kv_channels=2, rotary_percent=1.0, use_cpu_initialization=True, cp_group=cp_group)
        # freqs = outer(positions, inv_freq) is then [s, 0]: nothing is rotated or permuted.
        self.inv_freq = self.inv_freq[:0]


class MLASDPACoreAttention(SDPACoreAttention):
    """SDPA core attention for MLA's local spec: q/k heads of ``k_channels``, v heads of ``v_channels``."""

    def __init__(
        self, *args: Any, k_channels: Optional[int] = None, v_channels: Optional[int] = None, **kwargs: Any
    ) -> None:
        # Megatron's DotProductAttention takes no per-tensor head sizes (MLA is TE-only in 0.16.1);
        # SDPA reads them from the tensors, and MLA passes its softmax scale explicitly.
        super().__init__(*args, **kwargs)
        self.k_channels, self.v_channels = k_channels, v_channels


class DuplicatedLinear(torch.nn.Module):
    """A bias-free linear replicated on every tensor-parallel rank (TE's 'duplicated' mode).

    Megatron-Core's local MLA shards ``linear_kv_down_proj`` by output columns and gathers
    the result with ``gather_from_tensor_model_parallel_region``, whose backward only
    splits: the shared positional key slice is read by every rank's heads, so the other
    ranks' gradient contributions to it are lost. Replicated, the projection's output is
    already whole; under sequence parallelism Megatron then gathers the positional slice
    along the sequence (a backward that sums over ranks) and, since each rank sees only
    its tokens, the weight is tagged ``sequence_parallel`` so its gradient is all-reduced.
    """

    def __init__(self, input_size: int, output_size: int, config: TransformerConfig, tp_size: int):
        super().__init__()
        if tp_size > 1 and not config.sequence_parallel:
            raise ValueError(
                "Kimi Linear's MLA with the local spec and --tensor-model-parallel-size > 1 needs "
                "--sequence-parallel (Megatron also requires it for MoE with tensor parallelism)."
            )
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(x, self.weight), None


class NoPEMLASelfAttention(MLASelfAttention):
    """Megatron-Core ``MLASelfAttention`` whose positional q/k slice is never rotated (NoPE)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLASelfAttentionSubmodules,
        layer_number: int,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if getattr(config, "rope_type", None) != "rope":
            raise ValueError(
                f"NoPE MLA needs rope_type='rope' (got {getattr(config, 'rope_type', None)!r}): "
                "YaRN would rescale the softmax and the positional slice."
            )
        if config.apply_rope_fusion:
            raise ValueError("NoPE MLA needs apply_rope_fusion=False (there is nothing to rotate).")
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.rotary_pos_emb = NoRotaryEmbedding(cp_group=self.pg_collection.cp)
        if isinstance(self.linear_kv_down_proj, ColumnParallelLinear):
            self.linear_kv_down_proj = DuplicatedLinear(
                config.hidden_size,
                config.kv_lora_rank + config.qk_pos_emb_head_dim,
                config,
                tp_size=self.pg_collection.tp.size(),
            )
