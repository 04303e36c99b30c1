"""Cross-stage source cache for interleaved pipelines (paper Eq. 8), with exact gradients.

Under an interleaved schedule a rank runs several chunks of the same micro-batch. Blocks
it saw in an earlier chunk stay here, so later hops need not carry them again.

Gradients: a later chunk reads a cached block through a detached leaf, so its backward
*deposits* the block's gradient in ``leaf.grad`` without reaching into the earlier
chunk's graph. The earlier (producing) chunk passed the block through a :class:`_Tap`,
whose backward *drains* the deposit into the gradient flowing to the block's producer.
Interleaved 1F1B runs a micro-batch's later chunks' backward before its earlier ones, so
every deposit is in place before the drain. Deposits (counted by a gradient hook) and
drains are checked per entry; :meth:`SourceCache.finish_iteration` fails loudly on any
entry that was never drained, drained twice, or whose deposits never arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


class CacheAccountingError(RuntimeError):
    """A cached block's gradient was lost, counted twice, or never delivered."""


@dataclass
class CacheEntry:
    """One cached block of one micro-batch on this rank."""

    micro_batch: int
    block: int
    leaf: Tensor
    deposits: int = 0
    drains: int = 0
    delivered: bool = False
    hook_handle: Optional[object] = field(default=None, repr=False)

    def describe(self) -> str:
        return f"block b{self.block} of micro-batch {self.micro_batch}"


class _Tap(torch.autograd.Function):
    """Identity whose backward adds the gradient deposited by later chunks on this rank."""

    @staticmethod
    def forward(ctx, source: Tensor, cache: SourceCache, entry: CacheEntry) -> Tensor:
        ctx.cache, ctx.entry = cache, entry
        return source.view_as(source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        deposited = ctx.cache.drain(ctx.entry)
        if deposited is not None:
            grad = deposited.to(grad.dtype) if grad is None else grad + deposited.to(grad.dtype)
        return grad, None, None


class SourceCache:
    """Blocks kept on this rank per micro-batch, with deposit/drain accounting."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], CacheEntry] = {}
        self.pending: dict[int, CacheEntry] = {}  # id(entry) -> entry, awaiting their drain
        self.stored = self.deposited = self.drained = 0
        self.last_counts: dict = {}
        self.violations: list[str] = []

    def store(self, micro_batch: int, block: int, source: Tensor) -> Tensor:
        """Cache ``source`` for later chunks; returns the tapped tensor this chunk must use."""
        key = (micro_batch, block)
        if key in self.entries:
            raise CacheAccountingError(f"block b{block} of micro-batch {micro_batch} cached twice")
        track_grad = torch.is_grad_enabled() and source.requires_grad
        leaf = source.detach().requires_grad_(track_grad)
        entry = CacheEntry(micro_batch, block, leaf)
        self.entries[key] = entry
        self.stored += 1
        if not track_grad:
            return source
        entry.hook_handle = leaf.register_hook(lambda grad: self._count_deposit(entry))
        self.pending[id(entry)] = entry
        return _Tap.apply(source, self, entry)

    def load(self, micro_batch: int, block: int) -> Tensor:
        """The cached leaf of a block (its gradient is deposited for the producing chunk)."""
        entry = self.entries.get((micro_batch, block))
        if entry is None:
            raise CacheAccountingError(
                f"block b{block} of micro-batch {micro_batch} is not in this rank's cache; "
                "the pipeline layout and the cache disagree"
            )
        return entry.leaf

    def release(self, micro_batch: int) -> None:
        """Forget a micro-batch's entries once the rank's last chunk has read them (the taps
        keep what their backward still needs)."""
        for key in [key for key in self.entries if key[0] == micro_batch]:
            del self.entries[key]

    def _count_deposit(self, entry: CacheEntry) -> None:
        if entry.drains:
            self.violations.append(f"{entry.describe()}: gradient deposited after its drain")
        entry.deposits += 1
        self.deposited += 1

    def _collect(self, entry: CacheEntry) -> Optional[Tensor]:
        """Take the accumulated deposit out of the leaf."""
        grad, entry.leaf.grad = entry.leaf.grad, None
        return grad

    def drain(self, entry: CacheEntry) -> Optional[Tensor]:
        """Hand the deposited gradient to the producer, exactly once."""
        # Problems are recorded, not raised: raising inside one rank's backward would leave
        # its pipeline peers waiting forever; finish_iteration() reports them all.
        entry.drains += 1
        if entry.drains > 1:
            self.violations.append(f"{entry.describe()}: drained twice")
        grad = self._collect(entry)
        if entry.deposits and grad is None:
            self.violations.append(
                f"{entry.describe()}: {entry.deposits} gradient deposit(s) never reached the producer"
            )
        if grad is not None and not entry.deposits:
            self.violations.append(f"{entry.describe()}: gradient arrived without a deposit")
        entry.delivered = True
        self.drained += 1
        self.pending.pop(id(entry), None)
        if entry.hook_handle is not None:
            entry.hook_handle.remove()
        return grad

    def finish_iteration(self) -> dict:
        """Check every tapped entry was drained once; clear the cache. Returns the counts."""
        leaked = list(self.pending.values())
        violations, self.violations = self.violations, []
        counts = {"stored": self.stored, "deposits": self.deposited, "drains": self.drained}
        self.pending.clear()
        self.entries.clear()
        self.stored = self.deposited = self.drained = 0
        self.last_counts = counts
        if leaked:
            names = ", ".join(entry.describe() for entry in leaked[:5])
            violations.append(f"{len(leaked)} cached block(s) were never drained (gradients lost): {names}")
        if violations:
            raise CacheAccountingError("; ".join(violations))
        return counts


_CACHE = SourceCache()


def get_source_cache() -> SourceCache:
    """This process's (this rank's) source cache."""
    return _CACHE
