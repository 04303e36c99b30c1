"""Aggregation implementations and activation recompute inside the model.

Every implementation and recompute mode must give the loss and gradients of the plain run;
block bookkeeping must run once per forward; AttnRes recompute must bring the bytes saved
for backward down to a standard residual stream's.
"""

from __future__ import annotations

import pytest
import torch
from test_model import SEQ, VOCAB, logits_of, make_config, tokens

from attnres_megatron.diagnostics.saved_activations import OUTSIDE_LAYERS, measure_saved_activations
from attnres_megatron.layers.depth_state import DepthState
from attnres_megatron.layers.transformer_block import AttnResTransformerBlock
from attnres_megatron.models.builder import build_gpt_model

BLOCK = dict(attention_residuals="block", attn_res_block_size=3)
RECOMPUTE_MODES = {
    "none": {},
    "selective_attn_res": dict(recompute_granularity="selective", recompute_modules=["attn_res"]),
    "selective_attn_res_layernorm": dict(
        recompute_granularity="selective", recompute_modules=["attn_res", "layernorm", "core_attn"]
    ),
    "selective_layernorm": dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform_3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def loss_and_grads(reseed, dtype=torch.float64, num_layers=4, **fields):
    """Logits and every parameter gradient for random (non-zero) AttnRes parameters."""
    reseed()
    model = build_gpt_model(
        make_config(num_layers=num_layers, **fields), VOCAB, SEQ, transformer_impl="local"
    )
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "attn_res" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    logits = logits_of(model, tokens(1))
    upstream = torch.randn(logits.shape, generator=generator).to(dtype)
    (logits.float() * upstream.float()).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(result, expected, tolerance):
    (logits, grads), (want_logits, want_grads) = result, expected
    torch.testing.assert_close(logits, want_logits, rtol=tolerance, atol=tolerance)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize("mode", sorted(RECOMPUTE_MODES))
@pytest.mark.parametrize("impl", ["torch", "two-phase", "auto"])
def test_recompute_gives_the_plain_gradients(reseed, impl, mode):
    if impl == "two-phase" and "attn_res" in RECOMPUTE_MODES[mode].get("recompute_modules", []):
        pytest.skip("refused by the config (tested in test_config.py)")
    plain = loss_and_grads(reseed, **BLOCK, attn_res_impl="reference")
    assert_same(loss_and_grads(reseed, **BLOCK, attn_res_impl=impl, **RECOMPUTE_MODES[mode]), plain, 1e-12)


@pytest.mark.parametrize("mode", ["none", "selective_attn_res", "full_uniform_1"])
@pytest.mark.parametrize("fields", [dict(attention_residuals="full"), BLOCK], ids=["full", "block_S3"])
def test_fused_impl_matches_reference_fp32(reseed, fields, mode):
    plain = loss_and_grads(reseed, torch.float32, num_layers=3, **fields, attn_res_impl="reference")
    fused = loss_and_grads(
        reseed, torch.float32, num_layers=3, **fields, attn_res_impl="fused", **RECOMPUTE_MODES[mode]
    )
    assert_same(fused, plain, 2e-4)


BF16_ULP = 2.0**-7
"""One bf16 ulp relative to a value in [1, 2): the step between neighbouring bf16 numbers."""


@pytest.mark.parametrize(
    ("impl", "kernels"), [("fused", "triton"), ("fused", "cpp"), ("two-phase", "cpp")], ids=str
)
def test_fast_impls_are_as_accurate_as_reference_in_bf16(reseed, monkeypatch, impl, kernels):
    """Every fast path stores each bf16 tensor within half an ulp of its fp32 value, as the
    reference does (``test_bf16_rounding.py``); they differ from it only in fp32 summation
    order (and two-phase rounds a block's gradient once instead of after each sublayer's
    addition), so a stored value may land one ulp away from the reference's. The model's error
    may exceed the reference's by that much at its largest value, not more."""
    if kernels == "cpp":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the C++ kernels
    exact = loss_and_grads(reseed, torch.float64, num_layers=3, **BLOCK, attn_res_impl="reference")
    reference = loss_and_grads(reseed, torch.bfloat16, num_layers=3, **BLOCK, attn_res_impl="reference")
    fast = loss_and_grads(reseed, torch.bfloat16, num_layers=3, **BLOCK, attn_res_impl=impl)

    def error(value, want):
        return ((value.double() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()

    pairs = [(fast[0], reference[0], exact[0])]
    pairs += [(fast[1][name], reference[1][name], exact[1][name]) for name in exact[1]]
    for fast_value, reference_value, want in pairs:
        assert error(fast_value, want) <= error(reference_value, want) + BF16_ULP


@pytest.mark.parametrize("mode", ["none", "selective_attn_res", "full_uniform_1", "full_block_2"])
def test_each_block_is_sealed_once_per_forward(reseed, monkeypatch, mode):
    sealed: list[int] = []
    initial_state = AttnResTransformerBlock._initial_state

    def counting_state(self, hidden_states):
        state = initial_state(self, hidden_states)

        def on_seal(block: int, tensor):
            sealed.append(block)
            return tensor

        return DepthState(state.blocks, state.partial, on_seal=on_seal)

    monkeypatch.setattr(AttnResTransformerBlock, "_initial_state", counting_state)
    # 5 layers, S = 3: blocks close before sublayers 3, 6 and 9.
    reseed()
    config = make_config(num_layers=5, **BLOCK, **RECOMPUTE_MODES[mode])
    model = build_gpt_model(config, VOCAB, SEQ, transformer_impl="local")
    logits_of(model, tokens(1)).sum().backward()
    assert sealed == [1, 2, 3]


def saved_bytes(reseed, **fields):
    reseed()
    model = build_gpt_model(make_config(num_layers=4, **fields), VOCAB, SEQ, transformer_impl="local")
    with measure_saved_activations(model) as saved:
        logits = logits_of(model, tokens(1))
    logits.sum().backward()
    return saved


def test_attn_res_recompute_saves_no_more_than_standard_residuals(reseed):
    stream_bytes = 2 * SEQ * 32 * 4  # one [s, b, h] fp32 tensor (BATCH = 2, h = 32)
    baseline = saved_bytes(reseed, attention_residuals="none")
    block = saved_bytes(reseed, attention_residuals="block", attn_res_block_size=4)
    recomputed = saved_bytes(
        reseed,
        attention_residuals="block",
        attn_res_block_size=4,
        recompute_granularity="selective",
        recompute_modules=["attn_res"],
    )
    # Without recompute every sublayer keeps its mixed input on top of the stream.
    assert block.total >= baseline.total + 8 * stream_bytes
    boundaries = 8 // 4 - 1
    assert recomputed.total <= baseline.total + boundaries * stream_bytes
    for layer, nbytes in recomputed.layers().items():
        assert nbytes <= baseline.layers()[layer], layer
    assert recomputed.per_owner[OUTSIDE_LAYERS] > 0


@pytest.mark.parametrize("mode", ["none", "selective_attn_res", "full_uniform_1"])
def test_fused_cpu_kernels_match_reference_fp64(reseed, monkeypatch, mode):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors then take the C++ kernels
    plain = loss_and_grads(reseed, **BLOCK, attn_res_impl="reference")
    assert_same(loss_and_grads(reseed, **BLOCK, attn_res_impl="fused", **RECOMPUTE_MODES[mode]), plain, 1e-12)
