"""Two-phase Block AttnRes with the C++ CPU kernels (``--attn-res-impl two-phase`` on CPU).

Same math as :mod:`attnres_megatron.ops.two_phase`, with the passes fused per tile of token rows
(read tensor by tensor, as in :mod:`attnres_megatron.ops.cpu_fused`):

* phase 1 (``csrc/two_phase.cpp``): every block row is read from memory once for its inverse
  RMS and the logits of all ``S`` queries, and once more from cache for the ``S`` accumulators
  ``o_j`` (written once, fp32). With a single completed block ``o_j`` is that block: nothing is
  written.
* phase 2 forward: the partial row is read once (its RMS and logit, then the merge from cache)
  together with ``o_j``; the output is written once.
* phase 2 backward: the fused aggregation backward over ``[*blocks, partial]``, writing the
  partial's gradient and the query gradient, but for the blocks only three fp32 numbers per
  block and token (``grad b_i = alpha_i g + coef_i b_i + scaled_i u``); it keeps a reference
  to its upstream gradient ``g``.
* phase 1 backward: **one pass per block for all S sublayers**: per token, the ``S`` upstream
  gradient rows (from cache), the block row and the coefficients give the block's gradient,
  written once. Summing ``S`` per-sublayer block gradients (autograd's way, or in place)
  would read and write every block gradient ``S`` times.

Autograd wiring: :class:`_PhaseOne` takes the blocks and returns a scalar token; each
:class:`_PhaseTwo` takes the token, so autograd runs phase-1 backward only after every phase-2
backward of the block in that backward pass. Phase-2 backward records into
:class:`DeferredBlockGradients` and returns a zero token gradient; phase-1 backward computes
the block gradients from what was recorded and clears it. Phase 2 also takes the blocks, only
to save them for backward (no copies; saved-tensor hooks and in-place checks see them); it
returns no gradient for them.

Saved for backward per sublayer: references to the blocks and the partial, the query and gain,
and ``(n + 1)`` fp32 logits and inverse RMS per token. During the block's backward, the
upstream gradients of its sublayers are held until phase-1 backward (at most ``S`` ``[T, h]``
tensors, freed right after). The accumulators are dropped by :meth:`CppTwoPhaseBlock.release`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.cpu_extension import cpu_extension
from attnres_megatron.ops.cpu_fused import GRAD_CHUNKS, NO_TENSOR, kernel_rows
from attnres_megatron.ops.reference import compute_dtype
from attnres_megatron.ops.shared_gradients import like


class DeferredBlockGradients:
    """What the phase-2 backward calls of one backward pass leave for phase-1 backward."""

    def __init__(self, needs: list[bool]) -> None:
        self.needs = needs
        self._clear()

    def _clear(self) -> None:
        self.grads: list[Tensor] = []  # upstream gradient rows [T, h] per sublayer
        self.coefs: list[Tensor] = []  # [3, n_blocks, T] per sublayer
        self.queries: list[Tensor] = []  # u = query * gain [h] per sublayer

    def record(self, grad: Tensor, coefs: Tensor, weighted_query: Tensor) -> None:
        self.grads.append(grad)
        self.coefs.append(coefs)
        self.queries.append(weighted_query)

    def block_grads(self, blocks: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """The blocks' gradients from the recorded sublayers (None where not needed or none ran);
        clears the record."""
        if not self.grads:
            return [None] * len(blocks)
        rows = [kernel_rows(b, b.dtype) for b in blocks]
        grads = cpu_extension().phase_one_backward(
            rows, self.grads, torch.stack(self.coefs), torch.stack(self.queries), self.needs
        )
        self._clear()
        return [None if g is None else g.view(b.shape) for g, b in zip(grads, blocks)]


class _PhaseOne(torch.autograd.Function):
    """Phase 1 in forward; in backward, the block gradients of all the phase-2 calls at once."""

    @staticmethod
    def forward(ctx, block: CppTwoPhaseBlock, weighted: Tensor, *blocks: Tensor) -> Tensor:
        rows = [kernel_rows(b.detach(), blocks[0].dtype).view(-1, b.shape[-1]) for b in blocks]
        o, logits, inv_rms, m, d = cpu_extension().phase_one(rows, weighted, block.eps)
        block.o = rows * len(m) if len(rows) == 1 else o
        block.logits, block.inv_rms, block.m, block.d = logits, inv_rms, m, d
        ctx.grads = block.grads
        ctx.save_for_backward(*blocks)
        return torch.zeros((), dtype=weighted.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, _grad_token: Tensor):
        return (None, None, *ctx.grads.block_grads(ctx.saved_tensors))


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
        rows = kernel_rows(partial, like.dtype) if partial is not None else NO_TENSOR
        out = cpu_extension().phase_two_forward(
            rows,
            block.o[j],
            block.m[j],
            block.d[j],
            u,
            block.eps,
            logits[-1],
            inv_rms[-1],
            like,
        )
        ctx.grads, ctx.has_partial = block.grads, partial is not None
        ctx.save_for_backward(query, gain, logits, inv_rms, *blocks, *([partial] if ctx.has_partial else []))
        return out.view(like.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, *sources = ctx.saved_tensors
        deferred: DeferredBlockGradients = ctx.grads
        n_blocks = len(deferred.needs)
        dtype = sources[0].dtype
        stats = logits.dtype
        u = (query.to(stats) * gain.to(stats)).contiguous()
        needs = [False] * n_blocks + ([bool(ctx.needs_input_grad[3])] if ctx.has_partial else [])
        coefs = torch.empty(3, n_blocks, logits.shape[1], dtype=stats)
        grad = kernel_rows(grad_out, dtype).view(-1, grad_out.shape[-1])
        rows = [kernel_rows(s, dtype) for s in sources]
        *grads, grad_query, grad_gain = cpu_extension().fused_backward(
            rows, grad, query, gain, logits, inv_rms, needs, coefs, GRAD_CHUNKS, []
        )
        if any(deferred.needs):
            deferred.record(grad, coefs, u)
        grad_partial = like(grads[-1], sources[-1]) if ctx.has_partial and needs[-1] else None
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
        self.grads = DeferredBlockGradients([b.requires_grad for b in self.blocks])
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
