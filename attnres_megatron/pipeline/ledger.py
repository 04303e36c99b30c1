"""Bytes that cross pipeline boundaries, measured on the tensors the schedule sends.

Off until someone asks for it: :meth:`PipelineByteLedger.enable` (or :meth:`reset`, which
starts a fresh recording) turns it on. Disabled, the stage I/O does no bookkeeping at all
(no records, no gradient hooks), so a run that never reads the ledger pays nothing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class BoundaryTraffic:
    """Payload bytes over one boundary (sender chunk -> next chunk), per micro-batch."""

    forward: dict[int, int] = field(default_factory=dict)
    backward: dict[int, int] = field(default_factory=dict)
    sources: dict[int, int] = field(default_factory=dict)


class PipelineByteLedger:
    """Forward payloads and backward gradients, by sender chunk index and micro-batch."""

    def __init__(self) -> None:
        self.enabled = False
        self.boundaries: dict[int, BoundaryTraffic] = defaultdict(BoundaryTraffic)

    def enable(self, enabled: bool = True) -> PipelineByteLedger:
        """Record from now on (``enabled=False`` stops recording and keeps the records)."""
        self.enabled = enabled
        return self

    def record_forward(self, chunk: int, micro_batch: int, payload: Tensor, sources: int) -> None:
        traffic = self.boundaries[chunk]
        traffic.forward[micro_batch] = payload.numel() * payload.element_size()
        traffic.sources[micro_batch] = sources

    def record_backward(self, chunk: int, micro_batch: int, grad: Tensor) -> None:
        """``chunk`` is the sender of the forward payload whose gradient comes back."""
        self.boundaries[chunk].backward[micro_batch] = grad.numel() * grad.element_size()

    def summary(self) -> dict:
        """Per boundary: bytes per micro-batch each way, sources per hop, and totals."""
        return {
            chunk: {
                "forward_bytes": dict(sorted(t.forward.items())),
                "backward_bytes": dict(sorted(t.backward.items())),
                "sources": dict(sorted(t.sources.items())),
                "forward_total": sum(t.forward.values()),
                "backward_total": sum(t.backward.values()),
            }
            for chunk, t in sorted(self.boundaries.items())
        }

    def reset(self) -> PipelineByteLedger:
        """Forget the records and start a fresh recording."""
        self.boundaries.clear()
        return self.enable()


_LEDGER = PipelineByteLedger()


def get_byte_ledger() -> PipelineByteLedger:
    """This rank's ledger (it sees the boundaries its own chunks send over)."""
    return _LEDGER
