"""Depth-aggregation operators; :mod:`attnres_megatron.ops.dispatch` decides which one runs."""

from attnres_megatron.ops.aggregate import AttnResAggregate, aggregate
from attnres_megatron.ops.dispatch import one_pass_function
from attnres_megatron.ops.reference import aggregate_reference

__all__ = ["AttnResAggregate", "aggregate", "aggregate_reference", "one_pass_function"]
