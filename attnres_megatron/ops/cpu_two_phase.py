"""Two-phase Block AttnRes with the C++ CPU kernels (``--attn-res-impl two-phase`` on CPU).

Same math as :mod:`attnres_megatron.ops.two_phase`, with the passes fused per token row:

* phase 1 (``csrc/two_phase.cpp``): every block row is read from memory once for its inverse
  RMS and the logits of all ``S`` queries, and once more from cache for the ``S`` accumulators
  ``o_j`` (written once, fp32). With a single completed block ``o_j`` is that block: nothing is
  written.
* phase 2 forward: the partial row is read once (its RMS and logit, then the merge from cache)
  together with ``o_j``; the output is written once.
* phase 2 backward: the fused aggregation backward over ``[*blocks, partial]``. The block
  gradients of all ``S`` sublayers are **accumulated in place** into one buffer per block (the
  first sublayer to run backward writes it, the others add to it), instead of autograd adding
  ``S`` separate gradient tensors.

Autograd wiring: :class:`_PhaseOne` takes the blocks and returns a scalar token; each
:class:`_PhaseTwo` takes the token, so autograd runs phase-1 backward only after every phase-2
backward of the block. Phase-2 backward accumulates into :class:`BlockGradients` and returns a
zero token gradient; phase-1 backward hands the accumulated block gradients to autograd.
Phase 2 also takes the blocks, only to save them for backward (no copies; saved-tensor hooks
and in-place checks see them); it returns no gradient for them.

Saved for backward per sublayer: references to the blocks and the partial, the query and gain,
and ``(n + 1)`` fp32 logits and inverse RMS per token. The accumulators are dropped by
:meth:`CppTwoPhaseBlock.release`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.cpu_extension import cpu_extension
from attnres_megatron.ops.cpu_fused import GRAD_CHUNKS, NO_TENSOR, contiguous_rows
from attnres_megatron.ops.reference import compute_dtype


class BlockGradients:
    """Block gradients accumulated across one block's phase-2 backward calls."""

    def __init__(self, needs: list[bool]) -> None:
        self.needs = needs
        self.buffers: list[Optional[Tensor]] = [None] * len(needs)

    def targets(self) -> list[Tensor]:
        return [NO_TENSOR if b is None else b for b in self.buffers]

    def take(self) -> list[Optional[Tensor]]:
        buffers, self.buffers = self.buffers, [None] * len(self.needs)
        return buffers


class _PhaseOne(torch.autograd.Function):
    """Phase 1 in forward; in backward, the block gradients accumulated by the phase-2 calls."""

    @staticmethod
    def forward(ctx, block: CppTwoPhaseBlock, weighted: Tensor, *blocks: Tensor) -> Tensor:
        rows = [contiguous_rows(b.detach().to(blocks[0].dtype)).view(-1, b.shape[-1]) for b in blocks]
        o, logits, inv_rms, m, d = cpu_extension().phase_one(rows, weighted, block.eps)
        block.o = rows * len(m) if len(rows) == 1 else o
        block.logits, block.inv_rms, block.m, block.d = logits, inv_rms, m, d
        ctx.grads = block.grads
        return torch.zeros((), dtype=weighted.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_token: Tensor):
        return (None, None, *ctx.grads.take())


class _PhaseTwo(torch.autograd.Function):
    """Phase 2 of sublayer ``j``: merge the partial sum; fused backward over blocks + partial."""

    @staticmethod
    def forward(
        ctx,
        block: CppTwoPhaseBlock,
        j: int,
        token: Tensor,
        partial: Optional[Tensor],
        query: Tensor,
        gain: Tensor,
        *blocks: Tensor,
    ) -> Tensor:
        stats = block.m.dtype
        n_blocks, n_tokens = block.inv_rms.shape
        like = blocks[0]
        n_sources = n_blocks + (partial is not None)
        logits = torch.empty(n_sources, n_tokens, dtype=stats)
        inv_rms = torch.empty_like(logits)
        logits[:n_blocks] = block.logits[j]
        inv_rms[:n_blocks] = block.inv_rms
        u = (query.to(stats) * gain.to(stats)).contiguous()
        rows = contiguous_rows(partial.to(like.dtype)) if partial is not None else NO_TENSOR
        out = cpu_extension().phase_two_forward(
            rows,
            block.o[j],
            block.m[j],
            block.d[j],
            u,
            block.eps,
            logits[-1],
            inv_rms[-1],
            contiguous_rows(like),
        )
        ctx.grads, ctx.has_partial = block.grads, partial is not None
        ctx.save_for_backward(query, gain, logits, inv_rms, *blocks, *([partial] if ctx.has_partial else []))
        return out.view(like.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, *sources = ctx.saved_tensors
        grads_of_blocks: BlockGradients = ctx.grads
        dtype = sources[0].dtype
        stats = logits.dtype
        u = (query.to(stats) * gain.to(stats)).contiguous()
        needs = list(grads_of_blocks.needs)
        targets = grads_of_blocks.targets()
        if ctx.has_partial:
            needs.append(bool(ctx.needs_input_grad[3]))
            targets.append(NO_TENSOR)
        rows = [contiguous_rows(s.to(dtype)) for s in sources]
        *grads, du = cpu_extension().fused_backward(
            rows, contiguous_rows(grad_out.to(dtype)), u, logits, inv_rms, needs, targets, GRAD_CHUNKS
        )
        n_blocks = len(grads_of_blocks.needs)
        for i in range(n_blocks):
            if needs[i]:
                grads_of_blocks.buffers[i] = grads[i]
        grad_partial = None
        if ctx.has_partial and needs[-1]:
            partial = sources[-1]
            grad_partial = grads[-1].view(partial.shape).to(partial.dtype)
        grad_query = (du * gain.to(stats)).to(query.dtype)
        grad_gain = (du * query.to(stats)).to(gain.dtype)
        token_grad = torch.zeros((), dtype=stats)
        return (None, None, token_grad, grad_partial, grad_query, grad_gain, *([None] * n_blocks))


class CppTwoPhaseBlock:
    """One block's two-phase computation on CPU: phase 1 at construction, :meth:`mix` per sublayer.

    ``blocks``: ``n >= 1`` completed block tensors of one shape; ``queries``/``gains``: the
    ``S`` sublayers' ``[h]`` pseudo-queries and key gains.
    """

    def __init__(
        self, blocks: Sequence[Tensor], queries: Sequence[Tensor], gains: Sequence[Tensor], eps: float
    ):
        self.blocks = tuple(blocks)
        self.queries, self.gains, self.eps = list(queries), list(gains), float(eps)
        dtype = self.blocks[0].dtype
        if any(b.shape != self.blocks[0].shape for b in self.blocks):
            raise ValueError("AttnRes blocks must share one shape.")
        self.grads = BlockGradients([b.requires_grad for b in self.blocks])
        stats = compute_dtype(dtype)
        with torch.no_grad():
            weighted = torch.stack([q.to(stats) * g.to(stats) for q, g in zip(self.queries, self.gains)])
        self.o: Optional[Sequence[Tensor]] = None
        self.token = _PhaseOne.apply(self, weighted.contiguous(), *self.blocks)

    def mix(self, j: int, partial: Optional[Tensor]) -> Tensor:
        """AttnRes input of sublayer ``j``: the softmax mix over the blocks and ``partial``."""
        if self.o is None:
            raise RuntimeError("two-phase block: the phase-1 accumulators were already released.")
        return _PhaseTwo.apply(self, j, self.token, partial, self.queries[j], self.gains[j], *self.blocks)

    def release(self) -> None:
        """Drop the ``[S, T, h]`` phase-1 accumulators."""
        self.o = None
