"""Plain-autograd depth aggregation (DESIGN section 1); readable, not memory-lean."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def aggregate_reference(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Softmax over depth of ``query . (gain * v / rms(v))``, mixing raw sources ``v``.

    ``sources`` are tensors of one shape ``[..., h]``; returns the mix in the first
    source's dtype. Statistics and accumulation run in fp32 (fp64 for fp64 inputs).
    """
    dtype = compute_dtype(sources[0].dtype)
    values = torch.stack([v.to(dtype) for v in sources])  # [n, ..., h]
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps) * gain.to(dtype)
    logits = keys @ query.to(dtype)  # [n, ...]
    alpha = torch.softmax(logits, dim=0)
    return (alpha.unsqueeze(-1) * values).sum(0).to(sources[0].dtype)
