"""Blocks a rank keeps for its later chunks (paper Eq. 8), with exact, canonical gradients.

Under an interleaved schedule a rank runs several chunks of the same micro-batch. The
chunk of a rank that first has a block *holds* it (:meth:`SourceCache.hold`): the block
passes through a :class:`_Tap`, and with the value cache the block itself stays here, so
later hops need not carry it again. A later chunk reads the block
(:meth:`SourceCache.read`) through a fresh detached leaf of its own: its backward
*deposits* the block's gradient in ``leaf.grad`` without reaching into the earlier chunk's
graph. The tap's backward *drains* the deposits into the gradient flowing to the block's
producer. Interleaved 1F1B runs a micro-batch's later chunks' backward before its earlier
ones, so every deposit is in place before the drain.

Canonical order: the drain adds the deposits in read order (chunk order), one leaf per
reading chunk, then adds that sum to the holder's own gradient. The uncached reference
(every hop carries every block the receiver reads) routes gradients the same way, reading
the received copy instead of the kept value, so both give bitwise-identical gradients.

Accounting: deposits (counted by a gradient hook per leaf) and drains are checked per
entry; :meth:`SourceCache.finish_iteration` fails loudly on any entry that was never
drained, drained twice, or whose deposits never arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


class CacheAccountingError(RuntimeError):
    """A kept block's gradient was lost, counted twice, or never delivered."""


@dataclass
class CacheEntry:
    """One held block of one micro-batch on this rank."""

    micro_batch: int
    block: int
    value: Optional[Tensor]
    tracked: bool
    leaves: list = field(default_factory=list, repr=False)
    leaf_deposits: list = field(default_factory=list)
    deposits: int = 0
    drains: int = 0
    hook_handles: list = field(default_factory=list, repr=False)

    def describe(self) -> str:
        return f"block b{self.block} of micro-batch {self.micro_batch}"


class _Tap(torch.autograd.Function):
    """Identity whose backward adds the gradients deposited by later chunks on this rank."""

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
    """Blocks held on this rank per micro-batch, with deposit/drain accounting."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], CacheEntry] = {}
        self.pending: dict[int, CacheEntry] = {}  # id(entry) -> entry, awaiting their drain
        self.stored = self.reads = self.deposited = self.drained = 0
        self.last_counts: dict = {}
        self.violations: list[str] = []

    def hold(self, micro_batch: int, block: int, source: Tensor, keep_value: bool = True) -> Tensor:
        """Hold ``source`` for this rank's later chunks (keeping its value when ``keep_value``);
        returns the tapped tensor this chunk must use."""
        key = (micro_batch, block)
        if key in self.entries:
            raise CacheAccountingError(f"block b{block} of micro-batch {micro_batch} held twice")
        tracked = torch.is_grad_enabled() and source.requires_grad
        entry = CacheEntry(micro_batch, block, source.detach() if keep_value else None, tracked)
        self.entries[key] = entry
        if not tracked:
            return source
        self.stored += 1
        self.pending[id(entry)] = entry
        return _Tap.apply(source, self, entry)

    def read(self, micro_batch: int, block: int, received: Optional[Tensor] = None) -> Tensor:
        """A held block for a later chunk: the kept value, or ``received`` (the copy a hop
        carried, uncached), as a leaf whose gradient is deposited for the holder."""
        entry = self.entries.get((micro_batch, block))
        if entry is None:
            raise CacheAccountingError(
                f"block b{block} of micro-batch {micro_batch} is not held on this rank; "
                "the pipeline layout and the cache disagree"
            )
        value = entry.value if received is None else received.detach()
        if value is None:
            raise CacheAccountingError(f"{entry.describe()} was held without its value and none was received")
        if not (entry.tracked and torch.is_grad_enabled()):
            return value
        leaf = value.detach().requires_grad_(True)
        index = len(entry.leaves)
        entry.leaves.append(leaf)
        entry.leaf_deposits.append(0)
        entry.hook_handles.append(leaf.register_hook(lambda grad: self._count_deposit(entry, index)))
        self.reads += 1
        return leaf

    def release(self, micro_batch: int) -> None:
        """Forget a micro-batch's entries once the rank's last chunk has read them (the taps
        keep what their backward still needs)."""
        for key in [key for key in self.entries if key[0] == micro_batch]:
            del self.entries[key]

    def _count_deposit(self, entry: CacheEntry, index: int) -> None:
        if entry.drains:
            self.violations.append(f"{entry.describe()}: gradient deposited after its drain")
        entry.leaf_deposits[index] += 1
        entry.deposits += 1
        self.deposited += 1

    def _collect(self, entry: CacheEntry) -> Optional[Tensor]:
        """Take the deposits out of the leaves and add them in read order (the canonical order)."""
        total = None
        for index, leaf in enumerate(entry.leaves):
            grad, leaf.grad = leaf.grad, None
            if grad is None:
                if entry.leaf_deposits[index]:
                    self.violations.append(f"{entry.describe()}: a deposit vanished from its leaf")
                continue
            total = grad if total is None else total + grad
        return total

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
        self.drained += 1
        self.pending.pop(id(entry), None)
        for handle in entry.hook_handles:
            handle.remove()
        entry.leaves, entry.hook_handles, entry.value = [], [], None
        return grad

    def finish_iteration(self) -> dict:
        """Check every tapped entry was drained once; clear the cache. Returns the counts."""
        leaked = list(self.pending.values())
        violations, self.violations = self.violations, []
        counts = dict(stored=self.stored, reads=self.reads, deposits=self.deposited, drains=self.drained)
        self.pending.clear()
        self.entries.clear()
        self.stored = self.reads = self.deposited = self.drained = 0
        self.last_counts = counts
        if leaked:
            names = ", ".join(entry.describe() for entry in leaked[:5])
            violations.append(f"{len(leaked)} held block(s) were never drained (gradients lost): {names}")
        if violations:
            raise CacheAccountingError("; ".join(violations))
        return counts


_CACHE = SourceCache()


def get_source_cache() -> SourceCache:
    """This process's (this rank's) source cache."""
    return _CACHE
