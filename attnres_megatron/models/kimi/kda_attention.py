"""Kimi Delta Attention (KDA) token mixer as a tensor-parallel Megatron-Core module.

Kimi Linear's KDA layer (arXiv 2510.26692; HF ``modeling_kimi.py``) per token ``x``:

* ``q, k, v = SiLU(causal depthwise conv_K(W x))`` with separate bias-free projections and convs;
  q and k are L2-normalised per head, q is scaled by ``d_k ** -0.5``;
* log forget gate per head and key channel ``g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)``;
* ``beta = sigmoid(b_proj(x))`` per head; the KDA recurrence (:mod:`attnres_megatron.ops.kda`);
* ``o_proj(RMSNorm_head(o) * sigmoid(g_b(g_a(x))))`` with one RMSNorm weight (``d_v``) for all heads.

Tensor parallelism splits heads contiguously: q/k/v/b/f_b/g_b are column-parallel, ``A_log``,
``dt_bias`` and the conv weights hold this rank's heads, o_proj is row-parallel. The low-rank
down-projections f_a/g_a and the norm weight are replicated. The input is gathered (sequence
parallel) or copied (plain TP) once, and its gradient reduced once, by this module; the
projections themselves run as local matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    get_cuda_rng_tracker,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor
from torch.nn import Parameter

from attnres_megatron.ops.kda import kda

_CONV_NAMES = ("q_conv1d", "k_conv1d", "v_conv1d")
_UNSUPPORTED_KWARGS = ("inference_context", "inference_params", "packed_seq_params", "key_value_states")


def _param_device(config: TransformerConfig) -> torch.device | str:
    """Where Megatron places freshly built parameters."""
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def _init_head_sharded(
    full_shape: tuple[int, ...],
    sample: Callable[[tuple[int, ...], Any], Tensor],
    config: TransformerConfig,
    rank: int,
    world: int,
) -> Tensor:
    """Sample a tensor sharded on dim 0 by head: full-then-slice on CPU init (TP-invariant), else local."""
    local = full_shape[0] // world
    if config.use_cpu_initialization:
        return sample(full_shape, "cpu").narrow(0, rank * local, local).clone()
    with get_cuda_rng_tracker().fork():
        return sample((local, *full_shape[1:]), _param_device(config))


def _sample_a_log(shape: tuple[int, ...], device: Any) -> Tensor:
    """FLA/Kimi init: A_log = log(A), A ~ U(1, 16)."""
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(1.0, 16.0).log()


def _sample_dt_bias(shape: tuple[int, ...], device: Any) -> Tensor:
    """Mamba init: dt log-uniform in [1e-3, 0.1] (floored at 1e-4), stored as softplus^{-1}(dt)."""
    lo, hi = math.log(1e-3), math.log(0.1)
    dt = torch.exp(torch.rand(shape, dtype=torch.float32, device=device) * (hi - lo) + lo).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class ShortConvolution(torch.nn.Module):
    """Depthwise causal Conv1d (no bias) followed by SiLU; ``weight`` is ``[channels, 1, kernel]``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = Parameter(weight)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` is ``[b, channels, s]``; output ``[b, channels, s]`` depends on steps ``<= t`` only."""
        kernel = self.weight.shape[-1]
        y = F.conv1d(F.pad(x, (kernel - 1, 0)), self.weight.to(x.dtype), groups=x.shape[1])
        return F.silu(y)


class ReplicatedLinear(torch.nn.Module):
    """Bias-free linear whose weight is identical on every tensor-parallel rank."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        config: TransformerConfig,
        init_method: Callable[[Tensor], Any],
        tp_group: Optional[torch.distributed.ProcessGroup],
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        weight = torch.empty(output_size, input_size, dtype=config.params_dtype, device=_param_device(config))
        if config.perform_initialization:
            init_method(weight)  # default RNG: the same stream on all TP ranks, like other replicated weights
        else:
            weight.zero_()
        self.weight = Parameter(weight)
        set_tensor_model_parallel_attributes(self.weight, False, 0, 1)
        self.weight.allreduce = True

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T``; W's gradient is summed over TP (each rank's consumers see only its heads)."""
        return F.linear(x, copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group))


class HeadRMSNormGated(torch.nn.Module):
    """Per-head RMSNorm over ``d_v`` with one weight shared by all heads, times ``sigmoid(gate)``."""

    def __init__(
        self,
        dim: int,
        eps: float,
        config: TransformerConfig,
        tp_group: Optional[torch.distributed.ProcessGroup],
    ) -> None:
        super().__init__()
        self.eps = eps
        self.tp_group = tp_group
        self.weight = Parameter(torch.ones(dim, dtype=config.params_dtype, device=_param_device(config)))
        set_tensor_model_parallel_attributes(self.weight, False, 0, 1)
        self.weight.allreduce = True

    def forward(self, o: Tensor, gate: Tensor) -> Tensor:
        """``o, gate``: ``[..., heads, d_v]``; fp32 math (fp64 for fp64 inputs), returned in that dtype."""
        dtype = torch.promote_types(o.dtype, torch.float32)
        o = o.to(dtype)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)
        # Each rank normalises only its own heads, so the shared weight's gradient is summed over TP.
        weight = copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        return o * weight.to(dtype) * torch.sigmoid(gate.to(dtype))


class KimiDeltaAttention(MegatronModule):
    """Kimi Delta Attention with Megatron tensor (and sequence) parallelism; returns ``(output, None)``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int = 1,
        pg_collection: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        if getattr(config, "context_parallel_size", 1) > 1:
            raise NotImplementedError("KimiDeltaAttention does not support context parallelism")
        tp = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        self.tp_group = tp if tp is not None else parallel_state.get_tensor_model_parallel_group()
        self.tp_size = get_pg_size(self.tp_group)
        tp_rank = get_pg_rank(self.tp_group)
        self.sequence_parallel = bool(config.sequence_parallel) and self.tp_size > 1

        self.num_heads = getattr(config, "kda_num_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "kda_head_dim", None) or config.kv_channels
        self.gate_rank = getattr(config, "kda_gate_rank", 128)
        self.conv_kernel = getattr(config, "kda_conv_kernel", 4)
        self.chunk_size = getattr(config, "kda_chunk_size", 64)
        self.norm_eps = getattr(config, "kda_norm_eps", config.layernorm_epsilon)
        if self.num_heads % self.tp_size != 0:
            raise ValueError(f"kda_num_heads={self.num_heads} is not divisible by TP size {self.tp_size}")
        self.num_heads_local = self.num_heads // self.tp_size
        width = self.num_heads * self.head_dim  # d_k = d_v
        hidden = config.hidden_size

        def column(input_size: int, output_size: int) -> ColumnParallelLinear:
            # Local matmul on the already gathered input: the gather and the dgrad reduction of
            # the input happen once in forward(), not once per projection.
            layer = ColumnParallelLinear(
                input_size,
                output_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                disable_grad_reduce=True,
                tp_group=self.tp_group,
            )
            layer.sequence_parallel = False
            return layer

        self.q_proj = column(hidden, width)
        self.k_proj = column(hidden, width)
        self.v_proj = column(hidden, width)

        def conv_sample(shape: tuple[int, ...], device: Any) -> Tensor:
            bound = 1.0 / math.sqrt(self.conv_kernel)  # nn.Conv1d's default init for a depthwise kernel
            return torch.empty(shape, dtype=torch.float32, device=device).uniform_(-bound, bound)

        conv_shape = (width, 1, self.conv_kernel)
        for name in _CONV_NAMES:
            weight = self._head_param(conv_shape, conv_sample, config, tp_rank).to(config.params_dtype)
            setattr(self, name, ShortConvolution(weight))

        self.f_a_proj = ReplicatedLinear(hidden, self.gate_rank, config, config.init_method, self.tp_group)
        self.f_b_proj = column(self.gate_rank, width)
        self.b_proj = column(hidden, self.num_heads)
        self.g_a_proj = ReplicatedLinear(hidden, self.gate_rank, config, config.init_method, self.tp_group)
        self.g_b_proj = column(self.gate_rank, width)

        # A_log (per head) and dt_bias (per head x key channel) stay fp32, as in Kimi Linear.
        self.A_log = Parameter(self._head_param((self.num_heads,), _sample_a_log, config, tp_rank))
        self.dt_bias = Parameter(self._head_param((width,), _sample_dt_bias, config, tp_rank))
        for param in (self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(param, True, 0, 1)

        self.o_norm = HeadRMSNormGated(self.head_dim, self.norm_eps, config, self.tp_group)
        self.o_proj = RowParallelLinear(
            width,
            hidden,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=self.tp_group,
        )

    def _head_param(
        self,
        full_shape: tuple[int, ...],
        sample: Callable[[tuple[int, ...], Any], Tensor],
        config: TransformerConfig,
        tp_rank: int,
    ) -> Tensor:
        """This rank's rows of a head-sharded tensor (zeros when initialisation is skipped)."""
        if not config.perform_initialization:
            local = (full_shape[0] // self.tp_size, *full_shape[1:])
            return torch.zeros(local, dtype=torch.float32, device=_param_device(config))
        return _init_head_sharded(full_shape, sample, config, tp_rank, self.tp_size).to(_param_device(config))

    def _short_conv(self, projected: Tensor, conv: ShortConvolution) -> Tensor:
        """``[s, b, heads * d]`` projection -> SiLU(causal conv) as ``[b, s, heads, d]``."""
        s, b, _ = projected.shape
        y = conv(projected.permute(1, 2, 0))  # [b, channels, s]
        return y.transpose(1, 2).reshape(b, s, self.num_heads_local, self.head_dim)

    def forward(
        self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``[s(/tp), b, hidden]`` -> ``([s(/tp), b, hidden], None)``; causal, so the mask is unused."""
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"KimiDeltaAttention does not support {name}")
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=self.tp_group
            )
        else:
            x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        s, b, _ = x.shape
        heads, dim = self.num_heads_local, self.head_dim
        fdt = torch.promote_types(x.dtype, torch.float32)

        q = self._short_conv(self.q_proj(x)[0], self.q_conv1d)
        k = self._short_conv(self.k_proj(x)[0], self.k_conv1d)
        v = self._short_conv(self.v_proj(x)[0], self.v_conv1d)

        f = self.f_b_proj(self.f_a_proj(x))[0].to(fdt).view(s, b, heads, dim)
        decay_rate = torch.exp(self.A_log.to(fdt)).view(heads, 1)
        g = -decay_rate * F.softplus(f + self.dt_bias.to(fdt).view(heads, dim))
        beta = torch.sigmoid(self.b_proj(x)[0].to(fdt))

        o, _ = kda(
            q,
            k,
            v,
            g.transpose(0, 1),
            beta.transpose(0, 1),
            scale=dim**-0.5,
            output_final_state=False,
            use_qk_l2norm=True,
            chunk_size=self.chunk_size,
        )
        gate = self.g_b_proj(self.g_a_proj(x))[0].view(s, b, heads, dim)
        o = self.o_norm(o.transpose(0, 1), gate)  # [s, b, heads, d_v]
        output, bias = self.o_proj(o.to(x.dtype).reshape(s, b, heads * dim))
        return output, bias

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """Distributed-checkpoint view: A_log, dt_bias and the conv weights are TP-sharded on dim 0."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state: dict = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            {"A_log": 0, "dt_bias": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            if name in _CONV_NAMES:
                sharded.update(
                    make_sharded_tensors_for_checkpoint(
                        module.state_dict(prefix="", keep_vars=True),
                        f"{prefix}{name}.",
                        {"weight": 0},
                        sharded_offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=metadata["dp_cp_group"],
                    )
                )
            else:
                sharded.update(
                    sharded_state_dict_default(
                        module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        return sharded
