"""Two-phase Block AttnRes computation (paper section 4.2, Algorithm 1) for training.

For a block with ``S`` sublayers, all ``S`` pseudo-queries are known at the block start, so
the inter-block part of every sublayer's softmax is computed at once:

* **Phase 1** (:func:`phase_one`, once per block): for every completed block tensor ``v_i``
  compute its inverse RMS ``r_i`` once and the logits of all ``S`` queries with one matmul,
  ``l_{j,i} = r_i * (v_i @ U^T)`` with ``u_j = w_j * g_j`` (the key's RMSNorm gain belongs to
  the sublayer, so it is folded into the query). An online softmax over blocks yields, per
  sublayer ``j``, the unnormalised accumulator ``o_j = sum_i exp(l_{j,i} - m_j) v_i`` (fp32),
  the running max ``m_j`` and the normaliser ``d_j = sum_i exp(l_{j,i} - m_j)``.
* **Phase 2** (:func:`phase_two`, per sublayer): merge the intra-block partial sum
  ``b_n^{i-1}`` (one more source) with an online-softmax step:
  ``h = (e^{m_j - m} o_j + e^{l_p - m} v_p) / (e^{m_j - m} d_j + e^{l_p - m})``.

The result equals ``aggregate_reference([*blocks, partial], w_j, g_j, eps)`` up to fp32
rounding (exactly in fp64 up to fp64 rounding).

Autograd and memory
    Phase 1 runs without autograd: its outputs are forward-only statistics. Each
    :func:`phase_two` call is one custom autograd Function with the blocks, the partial, the
    query and the gain as differentiable inputs, so gradients w.r.t. all of them are exact.
    Saved for backward per sublayer: references to the blocks and the partial (no copies),
    the query and gain, and per-token fp32 scalars only -- the sublayer's block logits
    ``[n, T]`` (a view of the block-wide ``[S, n, T]`` logit buffer), the block inverse RMS
    ``[n, T]`` (one buffer shared by all ``S`` sublayers), the partial's logit and inverse
    RMS ``[T]`` and the log-sum-exp ``[T]``. The fp32 accumulators ``o`` (``[S, ..., h]``)
    are **not** saved: they live only until the block's forward has consumed them
    (:meth:`TwoPhaseBlockAggregator.mix` drops its reference after the last sublayer).
    Backward recomputes what it needs from the saved logits and reads each source twice
    (``grad . v`` for the softmax backward, then the source gradient), like
    :class:`attnres_megatron.ops.aggregate.AttnResAggregate`; backward is per sublayer
    because the partial's gradient needs the full softmax of that sublayer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.dispatch import two_phase_backend
from attnres_megatron.ops.reference import compute_dtype

if TYPE_CHECKING:
    from attnres_megatron.ops.cpu_two_phase import CppTwoPhaseBlock


@dataclass
class SublayerStats:
    """Phase-1 statistics of one sublayer ``j`` (all fp32, or fp64 for fp64 blocks).

    ``o``: unnormalised accumulator ``[..., h]``; ``m``: max logit ``[...]``; ``d``: normaliser
    ``[...]``; ``logits``: block logits ``[n, ...]``; ``inv_rms``: block inverse RMS ``[n, ...]``.
    With no completed blocks (``n == 0``) ``o`` is ``None``, ``m = -inf`` and ``d = 0``.
    """

    o: Optional[Tensor]
    m: Tensor
    d: Tensor
    logits: Tensor
    inv_rms: Tensor
    blocks: tuple[Tensor, ...]


@dataclass
class InterBlockStats:
    """Phase-1 statistics of all ``S`` sublayers of a block against its completed blocks.

    ``o``: ``[S, ..., h]`` unnormalised accumulators; ``m``, ``d``: ``[S, ...]``;
    ``logits``: ``[S, n, ...]``; ``inv_rms``: ``[n, ...]`` (shared by all sublayers).
    Index with ``stats[j]`` to get the :class:`SublayerStats` of sublayer ``j``.
    """

    o: Optional[Tensor]
    m: Tensor
    d: Tensor
    logits: Tensor
    inv_rms: Tensor
    blocks: tuple[Tensor, ...]

    def __len__(self) -> int:
        return self.m.shape[0]

    def __getitem__(self, j: int) -> SublayerStats:
        return SublayerStats(
            o=None if self.o is None else self.o[j],
            m=self.m[j],
            d=self.d[j],
            logits=self.logits[j],
            inv_rms=self.inv_rms,
            blocks=self.blocks,
        )


@torch.no_grad()
def phase_one(blocks: Sequence[Tensor], queries: Tensor, gains: Tensor, eps: float) -> InterBlockStats:
    """Phase 1: inter-block attention statistics for ``S`` queries against ``n`` completed blocks.

    ``blocks``: ``n >= 0`` tensors of one shape ``[..., h]``; ``queries``, ``gains``: ``[S, h]``.
    Per block, for all ``S`` queries together: its inverse RMS (one reduction), the ``[..., S]``
    logits (one matmul with ``U^T``) and the online-softmax update of the ``[S, ..., h]``
    accumulator (one broadcast multiply-add). In eager PyTorch that is three kernels reading
    the block (a fused kernel could make it one), independent of ``S``; aggregating each
    sublayer separately reads every block ``S`` times as often.
    """
    if queries.dim() != 2 or gains.shape != queries.shape:
        raise ValueError("phase_one expects queries and gains of shape [S, h].")
    blocks = tuple(blocks)
    n_sub, hidden = queries.shape
    if not blocks:
        dtype = compute_dtype(queries.dtype)
        device = queries.device
        return InterBlockStats(
            o=None,
            m=torch.full((n_sub,), float("-inf"), dtype=dtype, device=device),
            d=torch.zeros(n_sub, dtype=dtype, device=device),
            logits=torch.empty(n_sub, 0, dtype=dtype, device=device),
            inv_rms=torch.empty(0, dtype=dtype, device=device),
            blocks=blocks,
        )
    shape = blocks[0].shape
    if any(b.shape != shape for b in blocks):
        raise ValueError("AttnRes blocks must share one shape.")
    dtype = compute_dtype(blocks[0].dtype)
    weighted = (queries.to(dtype) * gains.to(dtype)).t()  # U^T: [h, S]
    inv_rms, logits = [], []
    o = m = d = None
    for block in blocks:
        value = block.to(dtype)
        r = torch.rsqrt(value.pow(2).mean(-1) + eps)  # [...]
        logit = (value @ weighted) * r.unsqueeze(-1)  # [..., S]
        logit = logit.movedim(-1, 0)  # [S, ...]
        inv_rms.append(r)
        logits.append(logit)
        if o is None:
            m = logit.clone()
            p = torch.ones_like(logit)
            d = p.clone()
            o = value.unsqueeze(0).expand(n_sub, *shape).clone()
        else:
            m_new = torch.maximum(m, logit)
            scale = torch.exp(m - m_new)
            p = torch.exp(logit - m_new)
            d = d * scale + p
            o.mul_(scale.unsqueeze(-1)).addcmul_(p.unsqueeze(-1), value.unsqueeze(0))
            m = m_new
    assert o is not None and m is not None and d is not None
    return InterBlockStats(
        o=o,
        m=m,
        d=d,
        logits=torch.stack(logits, dim=1),
        inv_rms=torch.stack(inv_rms),
        blocks=blocks,
    )


class _PhaseTwoMix(torch.autograd.Function):
    """Online-softmax merge of phase-1 stats with the partial sum; exact backward."""

    @staticmethod
    def forward(
        ctx,
        o: Optional[Tensor],
        m: Tensor,
        d: Tensor,
        logits: Tensor,
        inv_rms: Tensor,
        partial: Optional[Tensor],
        query: Tensor,
        gain: Tensor,
        eps: float,
        *blocks: Tensor,
    ) -> Tensor:
        out_dtype = blocks[0].dtype if blocks else partial.dtype  # type: ignore[union-attr]
        dtype = m.dtype if blocks else compute_dtype(out_dtype)
        if partial is None:
            if o is None:
                raise ValueError("phase_two needs a partial sum when there are no completed blocks.")
            out = o / d.unsqueeze(-1)
            lse = m + torch.log(d)
            lp = rp = None
        else:
            vp = partial.to(dtype)
            weighted = query.to(dtype) * gain.to(dtype)
            rp = torch.rsqrt(vp.pow(2).mean(-1) + eps)
            lp = (vp @ weighted) * rp
            m_all = torch.maximum(m, lp)
            a = torch.exp(m - m_all)
            b = torch.exp(lp - m_all)
            den = a * d + b
            if o is None:
                out = vp * (b / den).unsqueeze(-1)
            else:
                out = (o * a.unsqueeze(-1)).addcmul_(vp, b.unsqueeze(-1)).div_(den.unsqueeze(-1))
            lse = m_all + torch.log(den)
        ctx.has_partial = partial is not None
        ctx.n_blocks = len(blocks)
        saved = [query, gain, logits, inv_rms, lse, *blocks]
        if partial is not None:
            saved += [partial, lp, rp]
        ctx.save_for_backward(*saved)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, lse, *rest = ctx.saved_tensors
        blocks = rest[: ctx.n_blocks]
        dtype = lse.dtype
        hidden = grad_out.shape[-1]
        grad = grad_out.to(dtype)
        weighted = query.to(dtype) * gain.to(dtype)
        values = [b.to(dtype) for b in blocks]
        alphas = [torch.exp(logits[i] - lse) for i in range(len(blocks))]
        grad_alpha = [(v * grad).sum(-1) for v in values]
        c = torch.zeros_like(lse)
        for a, ga in zip(alphas, grad_alpha):
            c += a * ga
        if ctx.has_partial:
            partial, lp, rp = rest[ctx.n_blocks :]
            vp = partial.to(dtype)
            beta = torch.exp(lp - lse)
            grad_beta = (vp * grad).sum(-1)
            c += beta * grad_beta
        grad_weighted = torch.zeros_like(weighted)

        def source_grad(v: Tensor, alpha: Tensor, ga: Tensor, logit: Tensor, r: Tensor) -> Tensor:
            nonlocal grad_weighted
            dl = alpha * (ga - c)
            scaled = (dl * r).unsqueeze(-1)
            grad_weighted = grad_weighted + (scaled * v).reshape(-1, hidden).sum(0)
            # logit = r (u . v) => d logit / d v = r u - logit r^2 v / h.
            gv = alpha.unsqueeze(-1) * grad + scaled * weighted
            gv -= (dl * logit * r * r / hidden).unsqueeze(-1) * v
            return gv

        grad_blocks = []
        for i, block in enumerate(blocks):
            gv = source_grad(values[i], alphas[i], grad_alpha[i], logits[i], inv_rms[i])
            grad_blocks.append(gv.to(block.dtype) if ctx.needs_input_grad[9 + i] else None)
        grad_partial = None
        if ctx.has_partial:
            gp = source_grad(vp, beta, grad_beta, lp, rp)
            grad_partial = gp.to(partial.dtype) if ctx.needs_input_grad[5] else None
        grad_query = (grad_weighted * gain.to(dtype)).to(query.dtype)
        grad_gain = (grad_weighted * query.to(dtype)).to(gain.dtype)
        return (None, None, None, None, None, grad_partial, grad_query, grad_gain, None, *grad_blocks)


def phase_two(
    stats_j: SublayerStats, partial: Optional[Tensor], query_j: Tensor, gain_j: Tensor, eps: float
) -> Tensor:
    """Phase 2 for sublayer ``j``: merge the intra-block ``partial`` into the phase-1 stats.

    Returns the AttnRes mix over ``[*blocks, partial]`` (``o_j / d_j`` if ``partial`` is None)
    in the blocks' dtype. ``query_j``/``gain_j`` must be the values used in :func:`phase_one`
    for this sublayer; gradients flow to them, to the blocks and to ``partial``.
    """
    return _PhaseTwoMix.apply(
        stats_j.o,
        stats_j.m,
        stats_j.d,
        stats_j.logits,
        stats_j.inv_rms,
        partial,
        query_j,
        gain_j,
        eps,
        *stats_j.blocks,
    )


class TwoPhaseBlockAggregator:
    """Per-block driver: phase 1 at construction, then :meth:`mix` per sublayer.

    ``blocks``: completed block tensors ``[b_0, ..., b_{n-1}]``; ``queries``/``gains``: the
    ``S`` sublayers' pseudo-queries and key-norm gains (sequences of ``[h]`` tensors, e.g. the
    Parameters, or ``[S, h]`` tensors). Phase 1 uses detached copies; gradients reach the
    originals through :meth:`mix`.

    ``backend`` (``auto``, ``cpp`` or ``torch``, resolved by
    :func:`attnres_megatron.ops.dispatch.two_phase_backend`) picks the C++ CPU kernels or the
    eager ATen passes; both compute the same function and gradients.

    With ``release_after_last`` (default) the fp32 phase-1 accumulators are dropped once every
    sublayer has been mixed; pass ``False`` when the layer loop may call :meth:`mix` again
    (e.g. activation recompute re-running a sublayer), then call :meth:`release` yourself.
    """

    def __init__(
        self,
        blocks: Sequence[Tensor],
        queries: Sequence[Tensor] | Tensor,
        gains: Sequence[Tensor] | Tensor,
        eps: float,
        release_after_last: bool = True,
        backend: str = "auto",
    ) -> None:
        self.release_after_last = release_after_last
        self.queries = list(queries)
        self.gains = list(gains)
        if len(self.queries) != len(self.gains) or not self.queries:
            raise ValueError("TwoPhaseBlockAggregator needs S >= 1 matching (query, gain) pairs.")
        self.eps = eps
        self._cpp: Optional[CppTwoPhaseBlock] = None
        self._stats: Optional[InterBlockStats] = None
        if two_phase_backend(backend, blocks) == "cpp":
            from attnres_megatron.ops.cpu_two_phase import CppTwoPhaseBlock

            self._cpp = CppTwoPhaseBlock(blocks, self.queries, self.gains, eps)
        else:
            with torch.no_grad():
                q = torch.stack([t.detach() for t in self.queries])
                g = torch.stack([t.detach() for t in self.gains])
            self._stats = phase_one(blocks, q, g, eps)
        self._remaining = set(range(len(self.queries)))

    @property
    def num_sublayers(self) -> int:
        """S, the number of sublayers this aggregator serves."""
        return len(self.queries)

    def mix(self, i: int, partial: Optional[Tensor]) -> Tensor:
        """AttnRes input of sublayer ``i``: softmax mix over the completed blocks and ``partial``.

        The phase-1 accumulators are released once every sublayer has been mixed (see
        ``release_after_last``).
        """
        if self._stats is None and self._cpp is None:
            raise RuntimeError("TwoPhaseBlockAggregator: all sublayers were already mixed.")
        if self._cpp is not None:
            out = self._cpp.mix(i, partial)
        else:
            out = phase_two(self._stats[i], partial, self.queries[i], self.gains[i], self.eps)
        self._remaining.discard(i)
        if self.release_after_last and not self._remaining:
            self.release()
        return out

    def release(self) -> None:
        """Drop the phase-1 statistics (the ``[S, ..., h]`` fp32 accumulators)."""
        if self._cpp is not None:
            self._cpp.release()
        self._cpp = None
        self._stats = None
