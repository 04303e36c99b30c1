"""Completed blocks' gradients summed in place by the C++ backward kernels of their readers
(``--attn-res-impl auto`` on CPU in training): same gradients as autograd's sum, one buffer."""

from __future__ import annotations

import pytest
import torch
from test_dispatch import EPS, inputs
from test_model import make_config
from test_recompute import BLOCK, RECOMPUTE_MODES, assert_same, loss_and_grads

from attnres_megatron.layers import mixers
from attnres_megatron.ops import cpu_fused
from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused
from attnres_megatron.ops.dispatch import choose, sums_gradients_in_place
from attnres_megatron.ops.reference import aggregate_reference
from attnres_megatron.ops.shared_gradients import SharedGradient


def readers_of_two_blocks(aggregate, blocks, partials, queries, gains, upstream):
    """Three sublayers reading ``blocks`` (and their own partial): sum of their weighted outputs."""
    total = 0
    for partial, query, gain, grad in zip(partials, queries, gains, upstream):
        total = total + (aggregate([*blocks, partial], query, gain) * grad).sum()
    return total


def three_readers(dtype):
    """Two shared blocks, three readers with their own partial, query, gain and upstream gradient."""
    parts = [inputs(3, dtype, seed=seed) for seed in (1, 2, 3)]
    blocks = parts[0][0][:2]
    partials = [p[0][2] for p in parts]
    return blocks, partials, [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts]


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)]
)
def test_shared_block_gradients_equal_the_fp64_reference(dtype, tol):
    blocks, partials, queries, gains, upstream = three_readers(dtype)
    leaves = [*blocks, *partials, *queries, *gains]
    shared = [SharedGradient(b) for b in blocks]

    def ours(sources, query, gain):
        return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

    got = torch.autograd.grad(readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream), leaves)
    copies = [t.detach().double().requires_grad_() for t in leaves]
    n = len(blocks)

    def reference(sources, query, gain):
        return aggregate_reference(sources, query, gain, EPS)

    total = readers_of_two_blocks(
        reference,
        copies[:n],
        copies[n : n + 3],
        copies[n + 3 : n + 6],
        copies[n + 6 :],
        [g.double() for g in upstream],
    )
    want = torch.autograd.grad(total, copies)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    assert all(s.gradient.buffer is None for s in shared)  # handed on and released


def test_later_readers_add_into_the_first_gradient(monkeypatch):
    """In backward the last reader writes the block gradient, the earlier ones add into it."""
    blocks, partials, queries, gains, upstream = three_readers(torch.float32)
    shared = [SharedGradient(b) for b in blocks]
    real = cpu_fused.cpu_extension()
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def fused_backward(self, *args):
            accumulate = args[-1]
            seen.append([t.data_ptr() if t.numel() else None for t in accumulate])
            return real.fused_backward(*args)

    monkeypatch.setattr(cpu_fused, "cpu_extension", lambda: Recording())

    def ours(sources, query, gain):
        return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

    readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream).backward()
    assert len(seen) == 3
    assert seen[0] == [None, None, None]  # the last reader: fresh gradients
    assert seen[1][:2] == seen[2][:2] and None not in seen[1][:2]  # one buffer per block
    assert seen[1][2] is None and seen[2][2] is None  # partials are never shared
    for block in blocks:  # autograd got one gradient per block: the shared buffer
        assert block.grad is not None and block.grad.data_ptr() in seen[1][:2]


def test_a_second_backward_of_a_kept_graph_starts_from_zero():
    blocks, partials, queries, gains, upstream = three_readers(torch.float64)
    shared = [SharedGradient(b) for b in blocks]

    def ours(sources, query, gain):
        return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

    total = readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream)
    (first,) = torch.autograd.grad(total, blocks[:1], retain_graph=True)
    (second,) = torch.autograd.grad(total, blocks[:1])
    assert torch.equal(first, second)


@pytest.mark.parametrize("fields", [dict(attention_residuals="full"), BLOCK], ids=["full", "block_S3"])
@pytest.mark.parametrize("mode", ["none", "full_uniform_1", "selective_attn_res"])
def test_auto_training_equals_the_plain_kernels(reseed, monkeypatch, fields, mode):
    """fp32 model: ``auto`` (shared block gradients) against ``fused`` (autograd sums), and how
    many blocks shared their gradient."""
    made = []
    real = mixers.SharedGradient
    monkeypatch.setattr(mixers, "SharedGradient", lambda t: made.append(t) or real(t))
    plain = loss_and_grads(reseed, torch.float32, num_layers=3, **fields, attn_res_impl="fused")
    assert not made
    shared = loss_and_grads(
        reseed, torch.float32, num_layers=3, **fields, attn_res_impl="auto", **RECOMPUTE_MODES[mode]
    )
    assert_same(shared, plain, 1e-5)  # autograd adds the final mix's part in another order
    config = make_config(num_layers=3, **fields)
    per_block = config.attn_res_sublayers_per_block
    sealed_before_last = (2 * config.num_layers - 1) // per_block  # blocks the last sublayer reads
    if mode.startswith("full_"):  # one layer per recompute group: the recomputed groups made their own
        assert len(made) >= 1 + sealed_before_last
    else:  # the embedding and every sealed block (with attn_res recompute: for the output mix only)
        assert len(made) == 1 + sealed_before_last


def test_the_choice_and_its_log_line():
    assert sums_gradients_in_place("auto", "one-pass", "cpu", torch.float32)
    assert not sums_gradients_in_place("fused", "one-pass", "cpu", torch.float32)
    assert not sums_gradients_in_place("auto", "two-phase", "cpu", torch.float32)
    assert not sums_gradients_in_place("auto", "one-pass", "cuda", torch.bfloat16)
    with torch.no_grad():
        assert not sums_gradients_in_place("auto", "one-pass", "cpu", torch.float32)
        assert "in place" not in choose("auto", "cpu", torch.float32).describe()
    assert choose("auto", "cpu", torch.float32, "full").describe() == (
        "AttnRes aggregation: --attn-res-impl auto -> one-pass with the C++ kernels "
        "(cpu, float32, block gradients summed in place)"
    )


def test_no_reference_cycle_keeps_a_step_alive():
    """After backward and the step's end, the shared gradients are freed without the cyclic GC."""
    import gc
    import weakref

    def one_step():
        blocks, partials, queries, gains, upstream = three_readers(torch.float32)
        shared = [SharedGradient(b) for b in blocks]

        def ours(sources, query, gain):
            return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

        readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream).backward()
        return [weakref.ref(s) for s in shared] + [weakref.ref(s.gradient) for s in shared]

    gc.disable()
    try:
        assert all(ref() is None for ref in one_step())
    finally:
        gc.enable()
