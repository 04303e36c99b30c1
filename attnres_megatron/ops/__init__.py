"""Depth-aggregation operators."""

from collections.abc import Callable

from attnres_megatron.ops.aggregate import AttnResAggregate, aggregate
from attnres_megatron.ops.reference import aggregate_reference


def aggregate_for(impl: str) -> Callable:
    """The single-call aggregation of ``--attn-res-impl impl`` (two-phase mixes whole blocks
    through :mod:`attnres_megatron.ops.two_phase`; its single calls use the torch op)."""
    if impl == "reference":
        return aggregate_reference
    if impl == "fused":
        from attnres_megatron.ops.triton_aggregate import aggregate_fused

        return aggregate_fused
    return aggregate


__all__ = ["AttnResAggregate", "aggregate", "aggregate_for", "aggregate_reference"]
