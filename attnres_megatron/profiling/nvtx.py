"""NVTX ranges (no-ops without CUDA) and hooks that mark every AttnRes aggregation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.profiling.timers import Stopwatch


def nvtx_enabled() -> bool:
    """Whether NVTX ranges are emitted (only where CUDA is available)."""
    return torch.cuda.is_available()


def range_push(name: str) -> None:
    """Open an NVTX range on CUDA; nothing on CPU."""
    if nvtx_enabled():
        torch.cuda.nvtx.range_push(name)


def range_pop() -> None:
    """Close the innermost NVTX range on CUDA; nothing on CPU."""
    if nvtx_enabled():
        torch.cuda.nvtx.range_pop()


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range('name'):`` around a region (no-op on CPU)."""
    range_push(name)
    try:
        yield
    finally:
        range_pop()


def depth_attention_modules(chunks: Iterable[torch.nn.Module]) -> list[tuple[str, DepthAttention]]:
    """Every ``DepthAttention`` of the model chunks, with its qualified name."""
    found = []
    for index, chunk in enumerate(chunks):
        for name, module in chunk.named_modules():
            if isinstance(module, DepthAttention):
                found.append((f"chunk{index}.{name}", module))
    return found


class AggregationProbe:
    """Forward pre/post hooks on every ``DepthAttention``: an NVTX range ``attnres.aggregate``
    around each call, a call count, and (when ``timing`` is on) the seconds spent in them.
    The layer and op code stay untouched; the hooks live only while attached."""

    def __init__(self, modules: list[tuple[str, DepthAttention]], clock: Stopwatch) -> None:
        self.modules = modules
        self.clock = clock
        self.timing = False
        self.calls = 0
        self.seconds = 0.0
        self._started: Optional[float] = None
        self._handles: list = []

    def attach(self) -> AggregationProbe:
        """Register the hooks (idempotent)."""
        if not self._handles:
            for name, module in self.modules:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._post_hook))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self, timing: bool) -> None:
        """Zero the counters; ``timing`` turns the per-call clock on (it synchronises CUDA)."""
        self.calls, self.seconds, self.timing = 0, 0.0, timing

    def _pre_hook(self, name: str):
        def hook(module, args) -> None:
            range_push(f"attnres.aggregate:{name}")
            if self.timing:
                self._started = self.clock.now()

        return hook

    def _post_hook(self, module, args, output) -> None:
        if self.timing and self._started is not None:
            self.seconds += self.clock.now() - self._started
            self._started = None
        self.calls += 1
        range_pop()
