"""Memory-lean depth aggregation as a custom autograd Function.

Forward keeps references to the sources plus two fp32 scalars per source and token
(logit and inverse RMS); the softmax and everything ``[s, b, h]`` are recomputed in
backward, so no extra ``[s, b, h]`` activation is saved per sublayer. Every pass over a
source is one fused ATen call (row dot products, matrix-vector product, ``addcmul_``, ``addr_``) that
writes no ``[s, b, h]`` temporary in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.reference import compute_dtype


class AttnResAggregate(torch.autograd.Function):
    """``x = sum_i softmax_i(w . (g * v_i / rms(v_i))) v_i`` with recompute-in-backward."""

    @staticmethod
    def forward(ctx, query: Tensor, gain: Tensor, eps: float, *sources: Tensor) -> Tensor:
        dtype = compute_dtype(sources[0].dtype)
        hidden = sources[0].shape[-1]
        weighted_query = query.to(dtype) * gain.to(dtype)
        logits = torch.empty((len(sources), *sources[0].shape[:-1]), dtype=dtype, device=sources[0].device)
        inv_rms = torch.empty_like(logits)
        for i, source in enumerate(sources):
            value = source.to(dtype)
            # One read each for the sum of squares and the dot; no [s, b, h] temporaries.
            torch.rsqrt(_row_dot(value, value).div_(hidden).add_(eps), out=inv_rms[i])
            torch.mul(value @ weighted_query, inv_rms[i], out=logits[i])
        alpha = torch.softmax(logits, dim=0)
        out = None
        for weight, source in zip(alpha, sources):
            term = weight.unsqueeze(-1)
            out = source.to(dtype) * term if out is None else out.addcmul_(term, source.to(dtype))
        ctx.eps = eps
        ctx.save_for_backward(query, gain, logits, inv_rms, *sources)
        return out.to(sources[0].dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, *sources = ctx.saved_tensors
        dtype = logits.dtype
        hidden = sources[0].shape[-1]
        grad = grad_out.to(dtype)
        weighted_query = query.to(dtype) * gain.to(dtype)
        alpha = torch.softmax(logits, dim=0)
        # d loss / d alpha_i = grad . v_i ; softmax backward gives d loss / d logit_i.
        grad_alpha = torch.stack([_row_dot(source.to(dtype), grad) for source in sources])
        grad_logit = alpha * (grad_alpha - (alpha * grad_alpha).sum(0, keepdim=True))
        scaled = grad_logit * inv_rms  # d loss / d (u . v_i)
        # logit = r (u . v), so d logit / d v = r u - (u . v) r^3 v / h = r u - logit r^2 v / h.
        value_coef = -grad_logit * logits * inv_rms.square() / hidden
        grad_weighted_query = torch.zeros_like(weighted_query)
        grad_sources = []
        for i, source in enumerate(sources):
            value = source.to(dtype)
            flat_value = value.reshape(-1, hidden)
            grad_weighted_query.addmv_(flat_value.T, scaled[i].reshape(-1))
            if not ctx.needs_input_grad[3 + i]:
                grad_sources.append(None)
                continue
            grad_v = grad * alpha[i].unsqueeze(-1)
            grad_v.addcmul_(value, value_coef[i].unsqueeze(-1))
            grad_v.view(-1, hidden).addr_(scaled[i].reshape(-1), weighted_query)
            grad_sources.append(grad_v.to(source.dtype))
        grad_query = (grad_weighted_query * gain.to(dtype)).to(query.dtype)
        grad_gain = (grad_weighted_query * query.to(dtype)).to(gain.dtype)
        return (grad_query, grad_gain, None, *grad_sources)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` without materialising the product."""
    return torch.einsum("...h,...h->...", a, b)


def aggregate(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Memory-lean AttnRes aggregation of ``sources`` (each ``[..., h]``)."""
    if len(sources) == 0:
        raise ValueError("AttnRes aggregation needs at least one source.")
    return AttnResAggregate.apply(query, gain, eps, *sources)
