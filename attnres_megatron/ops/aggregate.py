"""Memory-lean depth aggregation as a custom autograd Function.

Forward keeps references to the sources plus two fp32 scalars per source and token
(softmax weight and inverse RMS); keys and logits are recomputed in backward, so no
extra ``[s, b, h]`` activation is saved per sublayer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.reference import compute_dtype


def _source_stats(value: Tensor, weighted_query: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-token inverse RMS and raw dot ``u . v`` of one source, in the compute dtype."""
    inv_rms = torch.rsqrt(value.pow(2).mean(-1) + eps)
    return inv_rms, value @ weighted_query


class AttnResAggregate(torch.autograd.Function):
    """``x = sum_i softmax_i(w . (g * v_i / rms(v_i))) v_i`` with recompute-in-backward."""

    @staticmethod
    def forward(ctx, query: Tensor, gain: Tensor, eps: float, *sources: Tensor) -> Tensor:
        dtype = compute_dtype(sources[0].dtype)
        weighted_query = query.to(dtype) * gain.to(dtype)
        logits, inv_rms = [], []
        for source in sources:
            r, dot = _source_stats(source.to(dtype), weighted_query, eps)
            inv_rms.append(r)
            logits.append(dot * r)
        alpha = torch.softmax(torch.stack(logits), dim=0)  # [n, ...]
        out = torch.zeros(sources[0].shape, dtype=dtype, device=sources[0].device)
        for weight, source in zip(alpha, sources):
            out.addcmul_(weight.unsqueeze(-1), source.to(dtype))
        ctx.eps = eps
        ctx.save_for_backward(query, gain, alpha, torch.stack(inv_rms), *sources)
        return out.to(sources[0].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, alpha, inv_rms, *sources = ctx.saved_tensors
        dtype = alpha.dtype
        hidden = sources[0].shape[-1]
        grad = grad_out.to(dtype)
        weighted_query = query.to(dtype) * gain.to(dtype)
        # d loss / d alpha_i = grad . v_i ; softmax backward gives d loss / d logit_i.
        dots, grad_alpha = [], []
        for source in sources:
            value = source.to(dtype)
            dots.append(value @ weighted_query)
            grad_alpha.append((value * grad).sum(-1))
        grad_alpha = torch.stack(grad_alpha)
        grad_logit = alpha * (grad_alpha - (alpha * grad_alpha).sum(0, keepdim=True))
        grad_weighted_query = torch.zeros_like(weighted_query)
        grad_sources = []
        for i, source in enumerate(sources):
            value = source.to(dtype)
            r, dl = inv_rms[i], grad_logit[i]
            scaled = (dl * r).unsqueeze(-1)
            grad_weighted_query += (scaled * value).reshape(-1, hidden).sum(0)
            if not ctx.needs_input_grad[3 + i]:
                grad_sources.append(None)
                continue
            # logit = r (u . v), so d logit / d v = r u - (u . v) r^3 v / h.
            grad_v = alpha[i].unsqueeze(-1) * grad + scaled * weighted_query
            grad_v -= (dl * dots[i] * r.pow(3) / hidden).unsqueeze(-1) * value
            grad_sources.append(grad_v.to(source.dtype))
        grad_query = (grad_weighted_query * gain.to(dtype)).to(query.dtype)
        grad_gain = (grad_weighted_query * query.to(dtype)).to(gain.dtype)
        return (grad_query, grad_gain, None, *grad_sources)


def aggregate(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Memory-lean AttnRes aggregation of ``sources`` (each ``[..., h]``)."""
    if len(sources) == 0:
        raise ValueError("AttnRes aggregation needs at least one source.")
    return AttnResAggregate.apply(query, gain, eps, *sources)
