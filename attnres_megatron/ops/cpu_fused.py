"""Fused CPU kernels for the AttnRes aggregation (``--attn-res-impl fused`` on CPU tensors).

C++ with ATen's ``parallel_for`` (OpenMP) in ``csrc/aggregate.cpp``, built on first use by
:mod:`attnres_megatron.ops.cpu_extension`. Same math as the Triton kernels:

* tiles of rows (``csrc/rows.h``: 256 KiB of the rows read at once, e.g. 4 rows of 5 sources at
  hidden 2304 fp32), each pass reading the tile tensor by tensor, one sequential run of rows each
  (row by row, ``n`` interleaved one-row runs, which the hardware prefetchers follow poorly);
  the next tile is prefetched while one is worked on;
* forward, per tile: each source row is read from memory once (sum of squares and ``u . v`` in
  one pass), then the softmax mix re-reads the tile's rows from cache;
* backward, per tile: ``grad . v_i`` for every source, then the source gradients and the
  query-gradient contribution, source by source, the rows again coming from cache;
* deterministic: tokens are cut into a fixed number of chunks (independent of the thread
  count); each chunk sums its query-gradient row in one fixed order (tiles start at chunk
  boundaries: source by source, token by token) and the chunks are added in
  chunk order, so two runs give bitwise-identical gradients on any number of threads.

Saved for backward: the sources (references) plus logits and inverse RMS ``[n, T]`` in the
statistics dtype (fp32; fp64 for fp64 sources).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.cpu_extension import cpu_extension
from attnres_megatron.ops.shared_gradients import (
    SharedGradient,
    keep_for_backward,
    reader_gradients,
    shared_inputs,
    targets,
)

GRAD_CHUNKS = 64
"""Token chunks of the deterministic query-gradient reduction."""

NO_TENSOR = torch.empty(0)
"""An absent optional tensor argument of the kernels (e.g. ``fused_backward``'s ``deferred``)."""


def kernel_rows(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` as the kernels read it: ``dtype``, contiguous rows (itself when it already is:
    no dispatcher call, which costs more than the kernel on a decode step's single token)."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype).contiguous()


def fused_forward(
    sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The C++ forward: the mix, and the logits and inverse RMS ``[n, T]`` backward needs."""
    dtype = sources[0].dtype
    return cpu_extension().fused_forward([kernel_rows(s, dtype) for s in sources], query, gain, float(eps))


class CpuFusedAttnResAggregate(torch.autograd.Function):
    """AttnRes aggregation with the fused C++ kernels (CPU tensors); a source with a
    :class:`SharedGradient` gets its gradient added to the shared buffer, not returned."""

    @staticmethod
    def forward(ctx, query: Tensor, gain: Tensor, eps: float, shared: tuple, *sources: Tensor) -> Tensor:
        keep_for_backward(ctx, shared)
        out, logits, inv_rms = fused_forward(sources, query, gain, eps)
        ctx.save_for_backward(query, gain, logits, inv_rms, *sources)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, *sources = ctx.saved_tensors
        dtype = sources[0].dtype
        needs = list(ctx.needs_input_grad[4:])  # one per source
        *grads, grad_query, grad_gain = cpu_extension().fused_backward(
            [kernel_rows(s, dtype) for s in sources],
            kernel_rows(grad_out, dtype),
            query,
            gain,
            logits,
            inv_rms,
            needs,
            NO_TENSOR,
            GRAD_CHUNKS,
            [NO_TENSOR if t is None else t for t in targets(ctx.shared)],
        )
        return (grad_query, grad_gain, None, None, *reader_gradients(ctx, grads, needs, sources))


def aggregate_cpu_fused(
    sources: Sequence[Tensor],
    query: Tensor,
    gain: Tensor,
    eps: float,
    shared: Optional[Sequence[Optional[SharedGradient]]] = None,
) -> Tensor:
    """Fused C++ AttnRes aggregation of CPU ``sources`` (each ``[..., h]``); ``shared``: per
    source, its :class:`SharedGradient` or None. Without autograd (generation, evaluation) the
    forward kernel is called directly, with nothing saved."""
    if len(sources) == 0:
        raise ValueError("AttnRes aggregation needs at least one source.")
    if not torch.is_grad_enabled():
        return fused_forward(sources, query, gain, eps)[0]
    shared, inputs = shared_inputs(sources, shared)
    return CpuFusedAttnResAggregate.apply(query, gain, eps, shared, *inputs)
