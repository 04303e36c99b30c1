"""Gradients of completed blocks summed in place by the backward kernels of all their readers.

A completed block is read by every later sublayer; instead of one fresh gradient per reader that
autograd then adds (a write, then two reads and a write per reader), each reader's backward kernel
adds its part into one buffer per block (one read-modify-write), the first to run writing it.
Readers take the block through an alias whose autograd node hands the buffer on. The
C++ kernels (CPU) and the Triton kernels (GPU) both take such buffers; which runs is decided in
:mod:`attnres_megatron.ops.dispatch` (:func:`~attnres_megatron.ops.dispatch.sums_gradients_in_place`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class GradientBuffer:
    """Where the readers of one tensor sum its gradient (held by the collecting node)."""

    def __init__(self) -> None:
        self.buffer: Optional[Tensor] = None

    def take(self) -> Optional[Tensor]:
        """The summed gradient (None when no reader contributed); empties the buffer."""
        buffer, self.buffer = self.buffer, None
        return buffer


class SharedGradient:
    """The gradient of one tensor that several aggregations read (a completed block), summed in
    place by their backward kernels instead of one fresh tensor per reader that autograd then adds.

    Readers take :attr:`alias` (a view of the tensor made by the collecting node) in the tensor's
    place and return no gradient for it; autograd therefore runs the collecting node's backward
    only after every reader's backward of that pass (each reader holds an edge to it), and that
    node hands on the sum as the tensor's gradient (plus whatever gradient autograd summed for the
    alias from readers that return their own). The node holds only the :class:`GradientBuffer`,
    not this object, so no reference cycle keeps the graph alive after the step.
    """

    def __init__(self, tensor: Tensor) -> None:
        self.gradient = GradientBuffer()
        self.alias = _CollectGradient.apply(self.gradient, tensor)


class _CollectGradient(torch.autograd.Function):
    """Forward: a view of the tensor; backward: the shared gradient, once every reader added its part."""

    @staticmethod
    def forward(ctx, gradient: GradientBuffer, tensor: Tensor) -> Tensor:
        ctx.gradient = gradient
        ctx.set_materialize_grads(False)  # readers return None: no zero tensor made for them
        return tensor.view_as(tensor)

    @staticmethod
    @once_differentiable
    def backward(ctx, returned: Optional[Tensor]):
        summed = ctx.gradient.take()
        if summed is None or returned is None:
            return None, returned if summed is None else summed
        return None, summed.add_(returned)


def shared_inputs(
    sources: Sequence[Tensor], shared: Optional[Sequence[Optional[SharedGradient]]]
) -> tuple[tuple[Optional[SharedGradient], ...], list[Tensor]]:
    """``shared`` as one entry per source, and the inputs a reader takes: each shared source's
    alias in its place."""
    if shared is None:
        return (None,) * len(sources), list(sources)
    shared = tuple(shared)
    if len(shared) != len(sources):
        raise ValueError(f"shared gradients: {len(shared)} entries for {len(sources)} sources.")
    return shared, [source if sh is None else sh.alias for source, sh in zip(sources, shared)]


def keep_for_backward(ctx, shared: tuple) -> None:
    """Record on a reader's ``ctx`` the buffers of its shared sources (not the
    :class:`SharedGradient` objects: no reference cycle)."""
    ctx.shared = tuple(None if sh is None else sh.gradient for sh in shared)


def targets(kept: Sequence[Optional[GradientBuffer]]) -> list[Optional[Tensor]]:
    """Per source: the tensor its gradient is added into, or None (a fresh gradient is written)."""
    return [None if buffer is None else buffer.buffer for buffer in kept]


def reader_gradients(
    ctx, grads: Sequence[Optional[Tensor]], needs: Sequence[bool], sources: Sequence[Tensor]
) -> list[Optional[Tensor]]:
    """What a reader's backward returns for its sources: the shared sources' gradients stay in
    their buffers (None for autograd), the others' where needed in their sources' dtypes."""
    returned = []
    for grad, need, buffer, source in zip(grads, needs, ctx.shared, sources):
        if buffer is not None:
            buffer.buffer = grad
        returned.append(like(grad, source) if need and buffer is None else None)
    return returned


def like(grad: Tensor, source: Tensor) -> Tensor:
    """A kernel's gradient of ``source`` (its shape already) in the source's dtype."""
    return grad if grad.dtype == source.dtype else grad.to(source.dtype)
