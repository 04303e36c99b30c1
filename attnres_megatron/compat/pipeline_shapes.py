"""Exact-width stage payloads through Megatron-Core's p2p, without shape messages.

AttnRes stage payloads differ in width per boundary. Megatron-Core 0.16 handles unequal
shapes (``variable_seq_lengths``) by exchanging shapes before every transfer, in a
blocking phase that must finish in both directions before the data is posted. Under
interleaved schedules this extra dependency deadlocks rings of four or more stages, and
with two stages the forward and backward shape messages between the same pair of ranks
can be matched to each other.

Every width is known in advance: it depends only on which chunk receives, and Megatron's
schedule table fixes the order in which a rank's chunks receive. So this module
replaces ``P2PCommunicator._communicate_shapes`` (an entry of the compat registry) with a
lookup in a per-call plan: no shape messages at all, and the same communication pattern
as fixed-shape pipelines. :func:`plan_pipeline_shapes` builds the plan before a
forward-backward call; :func:`finish_pipeline_shapes` checks it was used up exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class PipelineShapeError(RuntimeError):
    """The schedule asked for a transfer the plan did not foresee (or skipped one)."""


@dataclass
class ShapePlan:
    """Receive shapes of this rank, in the order the schedule receives them."""

    forward: deque = field(default_factory=deque)
    backward: deque = field(default_factory=deque)


_PLAN: ShapePlan | None = None


def receive_order(num_microbatches: int, virtual_size: int, group_size: int) -> list[int]:
    """Virtual stage of each forward step on a rank, in schedule order (Megatron's table)."""
    if virtual_size == 1:
        return [0] * num_microbatches
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    return [chunk for _, chunk in get_schedule_table(num_microbatches, virtual_size, group_size)]


def plan_pipeline_shapes(
    layout,
    pp_rank: int,
    num_microbatches: int,
    rows_per_source: int,
    micro_batch_size: int,
    hidden_size: int,
    forward_only: bool,
    group_size: int,
) -> None:
    """Expected payload shapes for one forward-backward call on this rank."""
    global _PLAN
    _check_installed()
    plan = ShapePlan()
    last = len(layout.chunks) - 1
    order = receive_order(num_microbatches, layout.virtual_size, group_size)
    for vp_stage in order:
        chunk = layout.chunk(pp_rank, vp_stage)
        if chunk.index > 0:
            rows = layout.sources_received(chunk) * rows_per_source
            plan.forward.append([rows, micro_batch_size, hidden_size])
    if not forward_only:
        for vp_stage in order:
            chunk = layout.chunk(pp_rank, layout.virtual_size - 1 - vp_stage)
            if chunk.index < last:
                rows = layout.sources_received(layout.chunks[chunk.index + 1]) * rows_per_source
                plan.backward.append([rows, micro_batch_size, hidden_size])
    _PLAN = plan


def finish_pipeline_shapes() -> None:
    """Check the call received exactly the planned transfers; drop the plan."""
    global _PLAN
    plan, _PLAN = _PLAN, None
    if plan is not None and (plan.forward or plan.backward):
        raise PipelineShapeError(
            f"the pipeline schedule skipped {len(plan.forward)} forward and {len(plan.backward)} "
            "backward receives the AttnRes shape plan expected"
        )


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """Drop-in for ``P2PCommunicator._communicate_shapes``: planned, not exchanged."""
    if _PLAN is None:
        raise PipelineShapeError(
            "AttnRes pipeline payloads need a shape plan: run the schedule through "
            "attnres_megatron.pipeline.schedule.get_forward_backward_func()"
        )
    try:
        prev_shape = _PLAN.forward.popleft() if recv_prev else [0, 0, 0]
        next_shape = _PLAN.backward.popleft() if recv_next else [0, 0, 0]
    except IndexError:
        raise PipelineShapeError("the schedule received more payloads than planned") from None
    return prev_shape, next_shape


def _check_installed() -> None:
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if P2PCommunicator._communicate_shapes is not _communicate_shapes:
        raise PipelineShapeError(
            "AttnRes pipeline payloads need the plugin's adaptations: call "
            "attnres_megatron.compat.install_adaptations(device) once at the start of the program."
        )


def install_planned_shapes() -> None:
    """``P2PCommunicator._communicate_shapes`` answers from the plan (see the module docstring)."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    P2PCommunicator._communicate_shapes = _communicate_shapes
