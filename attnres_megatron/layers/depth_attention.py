"""Depth attention: one sublayer's softmax mix over earlier representations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.layers.norms import _param_device
from attnres_megatron.ops import one_pass_function


class DepthAttention(MegatronModule):
    """Mix sources with ``softmax_i(w . (g * v_i / rms(v_i)))``.

    ``pseudo_query`` (w) starts at zero, so an untrained module returns the mean of its
    sources; ``key_gain`` (g) starts at one. Both are replicated across tensor-parallel
    ranks and tagged ``sequence_parallel`` so Megatron all-reduces their gradients when
    the sequence is split across those ranks.
    """

    def __init__(self, config: AttnResTransformerConfig, **_: object):
        super().__init__(config=config)
        device = _param_device(config)
        shape = (config.hidden_size,)
        self.pseudo_query = torch.nn.Parameter(torch.zeros(shape, dtype=config.params_dtype, device=device))
        self.key_gain = torch.nn.Parameter(torch.ones(shape, dtype=config.params_dtype, device=device))
        for param in (self.pseudo_query, self.key_gain):
            param.sequence_parallel = config.sequence_parallel
        self.eps = config.attn_res_eps
        self._aggregate = one_pass_function(config.attn_res_impl)

    def forward(self, sources: Sequence[Tensor], mix: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """The mix of ``sources``; ``mix`` computes it instead when a two-phase block mixer
        already holds this sublayer's statistics (same value, one call for the hooks)."""
        if mix is not None:
            return mix()
        return self._aggregate(sources, self.pseudo_query, self.key_gain, self.eps)
