"""Depth-aggregation operators."""

from attnres_megatron.ops.aggregate import AttnResAggregate, aggregate
from attnres_megatron.ops.reference import aggregate_reference

__all__ = ["AttnResAggregate", "aggregate", "aggregate_reference"]
