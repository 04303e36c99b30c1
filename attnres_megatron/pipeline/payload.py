"""Stage payloads: depth sources concatenated along the sequence dimension."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pack_sources(sources: Sequence[Tensor]) -> Tensor:
    """One fresh, viewless ``[n * s, b, h]`` tensor (what Megatron's p2p sends)."""
    return torch.cat(list(sources), dim=0)


def unpack_sources(payload: Tensor, count: int) -> list[Tensor]:
    """Views of the ``count`` sources in a payload (gradients flow back into it)."""
    if count < 1 or payload.shape[0] % count:
        raise ValueError(
            f"a stage payload of {payload.shape[0]} rows cannot hold {count} sources; "
            "the sending and receiving stages disagree on the pipeline layout"
        )
    return list(payload.chunk(count, dim=0))
