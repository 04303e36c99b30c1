"""AttnRes configuration: a Megatron-Core ``TransformerConfig`` with depth-attention fields."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from attnres_megatron.ops.dispatch import validate_impl

ATTN_RES_MODES = ("none", "block", "full")
ATTN_RES_RECOMPUTE_MODULE = "attn_res"
"""Name of the AttnRes entry in ``recompute_modules`` (selective recompute)."""


def resolve_sublayers_per_block(
    mode: str,
    num_layers: int,
    block_size: Optional[int] = None,
    layers_per_block: Optional[int] = None,
    num_blocks: Optional[int] = None,
) -> Optional[int]:
    """Return S (sublayers per depth block) for a mode and exactly one block-size option.

    Raises ``ValueError`` naming the offending option (as a command-line flag) and the fix.
    Returns ``None`` for mode ``none``.
    """
    if mode not in ATTN_RES_MODES:
        raise ValueError(f"--attention-residuals must be one of {', '.join(ATTN_RES_MODES)}; got {mode!r}.")
    given = {
        "--attn-res-block-size": block_size,
        "--attn-res-layers-per-block": layers_per_block,
        "--attn-res-num-blocks": num_blocks,
    }
    set_flags = [flag for flag, value in given.items() if value is not None]
    if mode == "none":
        if set_flags:
            raise ValueError(
                f"{set_flags[0]} is set but --attention-residuals is 'none'; "
                "pass --attention-residuals block (or full), or drop the option."
            )
        return None
    for flag, value in given.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{flag} must be a positive integer; got {value!r}.")
    num_sublayers = 2 * num_layers
    if mode == "full":
        if set_flags and block_size != 1:
            raise ValueError(
                f"{set_flags[0]} conflicts with --attention-residuals full (which is one "
                "sublayer per block); use --attention-residuals block, or drop the option."
            )
        return 1
    if len(set_flags) != 1:
        raise ValueError(
            "--attention-residuals block needs exactly one of --attn-res-block-size "
            "(sublayers per block), --attn-res-layers-per-block or --attn-res-num-blocks; "
            + (f"got {', '.join(set_flags)}." if set_flags else "got none (e.g. --attn-res-num-blocks 8).")
        )
    if block_size is not None:
        sublayers = block_size
        flag = "--attn-res-block-size"
    elif layers_per_block is not None:
        sublayers = 2 * layers_per_block
        flag = "--attn-res-layers-per-block"
    else:
        if num_blocks > num_sublayers:
            raise ValueError(
                f"--attn-res-num-blocks {num_blocks} exceeds the {num_sublayers} sublayers of "
                f"{num_layers} layers; use at most {num_sublayers} (that is Full AttnRes)."
            )
        sublayers = math.ceil(num_sublayers / num_blocks)
        flag = "--attn-res-num-blocks"
    if sublayers > num_sublayers:
        raise ValueError(
            f"{flag} gives {sublayers} sublayers per block, more than the {num_sublayers} "
            f"sublayers of {num_layers} layers; use a block size of at most {num_sublayers}."
        )
    return sublayers


@dataclass
class AttnResTransformerConfig(TransformerConfig):
    """TransformerConfig with Attention Residuals (arXiv 2603.15031) options.

    Exactly one of ``attn_res_block_size`` (sublayers per block, S),
    ``attn_res_layers_per_block`` (S = 2k) or ``attn_res_num_blocks``
    (S = ceil(2L / N)) selects the block size in ``block`` mode.
    """

    attention_residuals: str = "none"
    """Depth mixing: 'none' (standard residuals), 'block' or 'full' (S = 1)."""

    attn_res_block_size: Optional[int] = None
    """Sublayers per depth block (S); attention and MLP count as one sublayer each."""

    attn_res_layers_per_block: Optional[int] = None
    """Transformer layers per depth block (S = 2 * this)."""

    attn_res_num_blocks: Optional[int] = None
    """Number of depth blocks N over the whole model (S = ceil(2L / N))."""

    attn_res_eps: Optional[float] = None
    """Epsilon of the RMS normalisation applied to the depth keys; None (the default) takes the
    model's ``layernorm_epsilon``, as Kimi's models do (resolved in ``__post_init__``)."""

    attn_res_impl: str = "auto"
    """Aggregation implementation (:mod:`attnres_megatron.ops.dispatch`): 'auto' (the fastest
    for the device), 'torch' (memory-lean eager op), 'fused' (C++ kernels on CPU, Triton on
    GPU), 'two-phase' (paper Algorithm 1: batched inter-block pass per block) or 'reference'."""

    def __post_init__(self) -> None:
        # Megatron validates recompute_modules against its own list; take ours out first.
        modules = self.recompute_modules
        self.attn_res_recompute = bool(modules) and ATTN_RES_RECOMPUTE_MODULE in modules
        if self.attn_res_recompute:
            self.recompute_modules = [m for m in modules if m != ATTN_RES_RECOMPUTE_MODULE]
        if self.attention_residuals != "none" and self.pipeline_model_parallel_size > 1:
            if self.moe_token_dispatcher_type == "allgather" and self.num_moe_experts:
                raise ValueError(
                    "moe_token_dispatcher_type='allgather' cannot run with attention residuals under "
                    "pipeline parallelism: stage payloads have a per-boundary width "
                    "(variable_seq_lengths), which Megatron's allgather dispatcher refuses; use "
                    "--moe-token-dispatcher-type alltoall."
                )
            # Each boundary carries exactly the depth sources its receiver lacks, so shapes
            # travel per message; parity-ordered (non-batched) p2p keeps the two directions
            # between the same pair of ranks apart (see compat/pipeline_shapes.py).
            self.variable_seq_lengths = True
            self.batch_p2p_comm = False
            if not self.num_moe_experts:  # unused without experts, but checked by Megatron
                self.moe_token_dispatcher_type = "alltoall"
        super().__post_init__()
        if self.attn_res_eps is None:
            self.attn_res_eps = self.layernorm_epsilon
        if self.attn_res_recompute:
            self.recompute_modules.append(ATTN_RES_RECOMPUTE_MODULE)
        self.attn_res_sublayers_per_block = resolve_sublayers_per_block(
            self.attention_residuals,
            self.num_layers,
            self.attn_res_block_size,
            self.attn_res_layers_per_block,
            self.attn_res_num_blocks,
        )
        if not self.attn_res_enabled:
            return
        if not self.attn_res_eps > 0:
            raise ValueError(f"--attn-res-eps must be > 0; got {self.attn_res_eps}.")
        validate_impl(self.attn_res_impl)
        unsupported = {
            "apply_residual_connection_post_layernorm": (
                self.apply_residual_connection_post_layernorm,
                "AttnRes replaces the residual stream; unset it",
            ),
            "mtp_num_layers": (
                self.mtp_num_layers,
                "multi-token prediction is not supported with AttnRes; unset it",
            ),
            "cpu_offloading": (self.cpu_offloading, "unset it"),
            "heterogeneous_block_specs": (self.heterogeneous_block_specs, "unset it"),
        }
        for option, (value, fix) in unsupported.items():
            if value:
                raise ValueError(f"{option}={value!r} is not supported with attention residuals: {fix}.")
        self._validate_attn_res_impl()
        self._validate_attn_res_recompute()

    def _validate_attn_res_impl(self) -> None:
        if self.attn_res_impl == "fused":
            from attnres_megatron.ops.triton_aggregate import MAX_SOURCES, require_triton

            if torch.cuda.is_available():  # CPU tensors use the C++ kernels instead
                require_triton()
            sources = self.attn_res_num_sources_at_output()
            if sources > MAX_SOURCES:
                raise ValueError(
                    f"--attn-res-impl fused mixes at most {MAX_SOURCES} sources, but this model's "
                    f"final aggregation has {sources}; use fewer blocks (--attn-res-num-blocks) "
                    "or --attn-res-impl torch / two-phase."
                )

    def _validate_attn_res_recompute(self) -> None:
        if self.attn_res_recompute and self.recompute_granularity != "selective":
            raise ValueError(
                f"--recompute-modules {ATTN_RES_RECOMPUTE_MODULE} needs --recompute-granularity "
                "selective; add it, or drop the module."
            )
        if self.attn_res_recompute and self.attn_res_impl == "two-phase":  # auto takes one pass then
            raise ValueError(
                f"--recompute-modules {ATTN_RES_RECOMPUTE_MODULE} cannot recompute the two-phase "
                "aggregation (its block statistics are freed after the forward); use "
                "--attn-res-impl torch or fused with it."
            )

    @property
    def attn_res_enabled(self) -> bool:
        """Whether AttnRes replaces the residual stream."""
        return self.attention_residuals != "none"

    def attn_res_num_sources_at_output(self) -> int:
        """Sources seen by the final aggregation: b0, completed blocks, and the last partial."""
        if not self.attn_res_enabled:
            return 0
        return 1 + math.ceil(2 * self.num_layers / self.attn_res_sublayers_per_block)
