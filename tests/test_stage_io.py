"""The stage I/O object in one process, on plain tensors: what it sends, what it holds, and a
byte ledger that costs nothing until enabled (the multi-process runs are in test_pipeline.py)."""

from __future__ import annotations

import torch

from attnres_megatron.pipeline.cache import SourceCache
from attnres_megatron.pipeline.layout import PipelineLayout
from attnres_megatron.pipeline.ledger import PipelineByteLedger
from attnres_megatron.pipeline.stage_io import StageIO

ROWS, HIDDEN = 4, 3


def one_hop(ledger: PipelineByteLedger, cached: bool = True):
    """Chunk 0 -> chunk 1 of PP2 x V2, one layer per chunk, S = 2: chunk 0 ends on a block
    boundary, so its partial sum is block b1 and rank 0 holds it for chunk 2."""
    plan = PipelineLayout.from_layer_counts(2, 2, 2, [1, 1, 1, 1], cached=cached)
    sender_cache = SourceCache()
    sender = StageIO(plan, plan.chunks[0], sender_cache, ledger)
    receiver = StageIO(plan, plan.chunks[1], SourceCache(), ledger)
    embedding = torch.randn(ROWS, 1, HIDDEN, requires_grad=True)
    start = sender.receive(0, embedding)
    payload = sender.send(0, start.blocks, start.blocks[0] * 2)
    received = payload.detach().requires_grad_()
    assert torch.equal(receiver.accept(received), payload[-ROWS:])
    inputs = receiver.receive(0)
    return sender_cache, received, inputs


def test_the_hop_carries_b0_and_the_partial_and_the_sender_holds_both():
    cache, received, inputs = one_hop(PipelineByteLedger())
    assert received.shape == (2 * ROWS, 1, HIDDEN)
    assert len(inputs.blocks) == 1 and inputs.partial.shape == (ROWS, 1, HIDDEN)
    assert sorted(cache.entries) == [(0, 0), (0, 1)]  # b0 and b1, the block chunk 0 ended with


def test_a_disabled_ledger_records_nothing_and_hooks_nothing():
    ledger = PipelineByteLedger()
    _, received, _ = one_hop(ledger)
    assert not ledger.enabled and ledger.summary() == {}
    assert not received._backward_hooks
    _, received, inputs = one_hop(ledger.reset())
    assert ledger.summary()[0]["forward_bytes"] == {0: 2 * ROWS * HIDDEN * 4}
    inputs.partial.sum().backward()
    assert ledger.summary()[0]["backward_bytes"] == {0: 2 * ROWS * HIDDEN * 4}
