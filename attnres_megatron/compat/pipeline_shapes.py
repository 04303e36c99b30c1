"""Exact-width stage payloads through Megatron-Core's p2p: an unambiguous shape channel.

AttnRes stage payloads differ in width per boundary, so Megatron must exchange tensor
shapes before each transfer (``variable_seq_lengths``). Megatron-Core 0.16 posts the
four shape messages of a step with ``batch_isend_irecv`` on the pipeline group itself,
where point-to-point messages between two ranks are matched in posting order. With two
pipeline stages the same peer is both ``prev`` and ``next``, so a forward-activation
shape can pair with a backward-gradient shape; and shape messages can pair with data
messages still in flight on the same group. Either silently corrupts or deadlocks an
interleaved schedule.

This module replaces ``P2PCommunicator._communicate_shapes`` (version-checked) with one
that sends shapes on two dedicated gloo groups per pipeline group: one for messages
going downstream (``send_next``/``recv_prev``), one for upstream. Each group then
carries a single, ordered stream per rank pair. Shapes are three integers, so a gloo
(CPU) channel costs microseconds on GPU machines too.
"""

from __future__ import annotations

import torch

from attnres_megatron.compat.megatron_fixes import check_megatron_core_version

_CHANNELS: dict[tuple[int, ...], tuple[object, object]] = {}
_INSTALLED = False


def initialize_shape_channel() -> None:
    """Create the shape groups for every pipeline group (collective: call on all ranks
    after ``initialize_model_parallel``) and install the shape exchange."""
    from megatron.core import parallel_state

    global _INSTALLED
    check_megatron_core_version()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    mine = tuple(parallel_state._PIPELINE_GLOBAL_RANKS)
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    _CHANNELS.clear()
    for ranks in sorted(set(everyone)):
        downstream = torch.distributed.new_group(list(ranks), backend="gloo")
        upstream = torch.distributed.new_group(list(ranks), backend="gloo")
        _CHANNELS[ranks] = (downstream, upstream)
    if not _INSTALLED:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        P2PCommunicator._communicate_shapes = _communicate_shapes
        _INSTALLED = True


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """Drop-in for ``P2PCommunicator._communicate_shapes`` over the per-direction groups."""
    ranks = tuple(torch.distributed.get_process_group_ranks(self.pp_group))
    if ranks not in _CHANNELS:
        raise RuntimeError(
            "the AttnRes pipeline shape channel is not initialised for this pipeline group; "
            "call attnres_megatron.compat.pipeline_shapes.initialize_shape_channel() on all "
            "ranks after initialize_model_parallel()"
        )
    downstream, upstream = _CHANNELS[ranks]
    received = {}
    requests = []
    if tensor_send_next is not None:
        shape = torch.tensor(tensor_send_next.size(), dtype=torch.int64)
        requests.append(torch.distributed.isend(shape, dst=self.next_rank, group=downstream))
    if recv_prev:
        received["prev"] = torch.empty(3, dtype=torch.int64)
        requests.append(torch.distributed.irecv(received["prev"], src=self.prev_rank, group=downstream))
    if tensor_send_prev is not None:
        shape = torch.tensor(tensor_send_prev.size(), dtype=torch.int64)
        requests.append(torch.distributed.isend(shape, dst=self.prev_rank, group=upstream))
    if recv_next:
        received["next"] = torch.empty(3, dtype=torch.int64)
        requests.append(torch.distributed.irecv(received["next"], src=self.next_rank, group=upstream))
    for request in requests:
        request.wait()
    prev_shape = received["prev"].tolist() if "prev" in received else [0, 0, 0]
    next_shape = received["next"].tolist() if "next" in received else [0, 0, 0]
    return prev_shape, next_shape
