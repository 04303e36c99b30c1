"""Kimi Delta Attention: chunked vs recurrent kernels, a by-hand recurrence, and the Megatron module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnres_megatron.ops.kda import HAVE_FLA, kda, kda_chunked, kda_recurrent_reference, l2norm


def make_inputs(
    b: int, t: int, h: int, d_k: int, d_v: int, dtype: torch.dtype, seed: int = 0, g_min: float = -5.0
) -> dict[str, torch.Tensor]:
    """Random KDA inputs: unit-norm keys, log-decay g in [g_min, 0], beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(b, t, h, d_k, generator=gen, dtype=dtype),
        "k": F.normalize(torch.randn(b, t, h, d_k, generator=gen, dtype=dtype), dim=-1),
        "v": torch.randn(b, t, h, d_v, generator=gen, dtype=dtype),
        "g": g_min * torch.rand(b, t, h, d_k, generator=gen, dtype=dtype),
        "beta": torch.rand(b, t, h, generator=gen, dtype=dtype),
        "initial_state": torch.randn(b, h, d_k, d_v, generator=gen, dtype=dtype),
    }


def run_with_grads(fn, inputs: dict[str, torch.Tensor], names: list[str], seed: int = 1):
    """Run ``fn`` on leaf copies of ``inputs``; return (o, state, grads of a random projection)."""
    leaves = {n: x.clone().requires_grad_(n in names) for n, x in inputs.items()}
    o, state = fn(**leaves)
    gen = torch.Generator().manual_seed(seed)
    w_o, w_s = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in (o, state))
    loss = (o * w_o).sum() + (state * w_s).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), state.detach(), dict(zip(names, grads))


@pytest.mark.parametrize(
    "b,t,h,d_k,d_v,chunk,with_state",
    [
        (2, 37, 3, 8, 6, 4, False),
        (1, 50, 2, 16, 8, 16, True),
        (2, 130, 2, 8, 8, 64, True),
        (1, 64, 1, 8, 4, 64, False),
        (1, 3, 2, 4, 4, 16, True),
        (1, 70, 2, 8, 8, 48, True),
    ],
)
def test_chunked_matches_recurrent_fp64(b, t, h, d_k, d_v, chunk, with_state):
    inputs = make_inputs(b, t, h, d_k, d_v, torch.float64, seed=t + chunk)
    if not with_state:
        inputs.pop("initial_state")
    names = list(inputs)
    o_ref, s_ref, g_ref = run_with_grads(kda_recurrent_reference, inputs, names)
    o_chk, s_chk, g_chk = run_with_grads(lambda **kw: kda_chunked(chunk_size=chunk, **kw), inputs, names)
    assert o_chk.shape == (b, t, h, d_v) and s_chk.shape == (b, h, d_k, d_v)
    torch.testing.assert_close(o_chk, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_chk, s_ref, rtol=1e-10, atol=1e-10)
    for name in names:
        torch.testing.assert_close(g_chk[name], g_ref[name], rtol=1e-9, atol=1e-9, msg=name)


def test_chunked_strong_decay_fp32_is_finite_and_accurate():
    # g down to -20 per step: cumulative decay over a 64-chunk reaches exp(-1000) and underflows.
    inputs = make_inputs(2, 150, 2, 16, 16, torch.float32, seed=3, g_min=-20.0)
    names = list(inputs)
    o, state, grads = run_with_grads(lambda **kw: kda_chunked(chunk_size=64, **kw), inputs, names)
    for tensor in (o, state, *grads.values()):
        assert torch.isfinite(tensor).all()
    ref = {n: x.double() for n, x in inputs.items()}
    o_ref, s_ref, g_ref = run_with_grads(kda_recurrent_reference, ref, names)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), s_ref, rtol=1e-4, atol=1e-4)
    for name in names:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=1e-3, atol=1e-3, msg=name)


def test_two_tokens_by_hand():
    """S_t = (I - b k k^T) diag(e^g) S_{t-1} + b k v^T and o_t = S_t^T q_t / sqrt(d_k), written out."""
    inputs = make_inputs(1, 2, 1, 3, 2, torch.float64, seed=11)
    q, k, v, g, beta = (inputs[n][0, :, 0] for n in ("q", "k", "v", "g", "beta"))
    state = inputs["initial_state"][0, 0]
    eye = torch.eye(3, dtype=torch.float64)
    expected = []
    for i in range(2):
        transition = eye - beta[i] * torch.outer(k[i], k[i])
        state = transition @ torch.diag(torch.exp(g[i])) @ state + beta[i] * torch.outer(k[i], v[i])
        expected.append(state.T @ q[i] / math.sqrt(3))
    expected = torch.stack(expected)
    for fn in (kda_recurrent_reference, lambda **kw: kda_chunked(chunk_size=1, **kw), kda_chunked):
        o, final = fn(**inputs)
        torch.testing.assert_close(o[0, :, 0], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[0, 0], state, rtol=1e-12, atol=1e-12)


def test_dispatcher_cpu_path():
    inputs = make_inputs(1, 20, 2, 8, 8, torch.float32, seed=5)
    q, k = inputs["q"] * 3.0, inputs["k"] * 0.5
    o, state = kda(q, k, inputs["v"], inputs["g"], inputs["beta"], use_qk_l2norm=True, chunk_size=8)
    o_ref, s_ref = kda_recurrent_reference(l2norm(q), l2norm(k), inputs["v"], inputs["g"], inputs["beta"])
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_ref, rtol=1e-5, atol=1e-5)
    _, none_state = kda(q, k, inputs["v"], inputs["g"], inputs["beta"], output_final_state=False)
    assert none_state is None
    if not HAVE_FLA:
        with pytest.raises(RuntimeError):
            kda(q, k, inputs["v"], inputs["g"], inputs["beta"], backend="fla")


# --- the Megatron module --------------------------------------------------------------------

HIDDEN, HEADS, HEAD_DIM, RANK, KERNEL = 32, 4, 8, 8, 4


def build_module(chunk_size: int = 4):
    """A small KimiDeltaAttention on CPU (needs Megatron's parallel state)."""
    from megatron.core.transformer import TransformerConfig

    from attnres_megatron.models.kimi.kda_attention import KimiDeltaAttention

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        kv_channels=HEAD_DIM,
        use_cpu_initialization=True,
        add_bias_linear=False,
    )
    config.kda_gate_rank = RANK
    config.kda_conv_kernel = KERNEL
    config.kda_chunk_size = chunk_size
    torch.manual_seed(7)
    return KimiDeltaAttention(config, layer_number=1, attn_mask_type=None, cp_comm_type=None, vp_stage=0)


def module_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The module's math in plain fp64 torch from its own weights."""
    x = x.double()
    s, b, _ = x.shape

    def w(name: str) -> torch.Tensor:
        return module.get_parameter(name).detach().double()

    def short_conv(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(y)
        for tap in range(KERNEL):  # tap j multiplies y[t - (KERNEL - 1 - j)]
            shift = KERNEL - 1 - tap
            shifted = torch.cat([y.new_zeros(shift, b, y.shape[-1]), y[: s - shift]]) if shift else y
            out = out + weight[:, 0, tap] * shifted
        return out * torch.sigmoid(out)

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.reshape(s, b, HEADS, HEAD_DIM)

    def unit(y: torch.Tensor) -> torch.Tensor:
        return y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-6)

    q = unit(heads(short_conv(x @ w("q_proj.weight").T, w("q_conv1d.weight"))))
    k = unit(heads(short_conv(x @ w("k_proj.weight").T, w("k_conv1d.weight"))))
    v = heads(short_conv(x @ w("v_proj.weight").T, w("v_conv1d.weight")))
    f = heads(x @ w("f_a_proj.weight").T @ w("f_b_proj.weight").T) + w("dt_bias").view(HEADS, HEAD_DIM)
    g = -torch.exp(w("A_log")).view(HEADS, 1) * torch.log1p(torch.exp(f))
    beta = torch.sigmoid(x @ w("b_proj.weight").T)
    o, _ = kda_recurrent_reference(*(y.transpose(0, 1) for y in (q, k, v, g, beta)))
    o = o.transpose(0, 1)
    gate = heads(x @ w("g_a_proj.weight").T @ w("g_b_proj.weight").T)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * w("o_norm.weight") * torch.sigmoid(gate)
    return o.reshape(s, b, HEADS * HEAD_DIM) @ w("o_proj.weight").T


def test_module_shapes_and_parallel_attributes(single_rank):
    module = build_module()
    x = torch.randn(11, 2, HIDDEN)
    out, bias = module(x, attention_mask=None)
    assert out.shape == (11, 2, HIDDEN) and bias is None
    assert torch.isfinite(out).all()
    width = HEADS * HEAD_DIM
    shapes = {
        "q_proj.weight": (width, HIDDEN),
        "q_conv1d.weight": (width, 1, KERNEL),
        "f_a_proj.weight": (RANK, HIDDEN),
        "f_b_proj.weight": (width, RANK),
        "b_proj.weight": (HEADS, HIDDEN),
        "g_b_proj.weight": (width, RANK),
        "A_log": (HEADS,),
        "dt_bias": (width,),
        "o_norm.weight": (HEAD_DIM,),
        "o_proj.weight": (HIDDEN, width),
    }
    for name, shape in shapes.items():
        assert tuple(module.get_parameter(name).shape) == shape, name
    for name in ("A_log", "dt_bias", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
        param = module.get_parameter(name)
        assert (param.tensor_model_parallel, param.partition_dim, param.partition_stride) == (True, 0, 1)
    assert not module.f_a_proj.weight.tensor_model_parallel
    assert module.A_log.dtype == torch.float32 and module.dt_bias.dtype == torch.float32
    # Init ranges: A = exp(A_log) in [1, 16]; dt = softplus(dt_bias) in [1e-3, 0.1].
    assert ((module.A_log.exp() >= 1) & (module.A_log.exp() <= 16)).all()
    dt = F.softplus(module.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    sharded = module.sharded_state_dict(prefix="layer.")
    assert {"layer.A_log", "layer.dt_bias", "layer.q_conv1d.weight", "layer.o_proj.weight"} <= set(sharded)


def test_module_is_causal(single_rank):
    module = build_module(chunk_size=4)
    x = torch.randn(13, 2, HIDDEN)
    with torch.no_grad():
        out, _ = module(x)
        for t0 in (0, 5, 12):
            x2 = x.clone()
            x2[t0] += torch.randn(2, HIDDEN)
            out2, _ = module(x2)
            torch.testing.assert_close(out2[:t0], out[:t0], rtol=0, atol=1e-6)
            assert (out2[t0] - out[t0]).abs().max() > 1e-4


@pytest.mark.parametrize("chunk_size", [4, 64])
def test_module_matches_plain_torch_fp64(single_rank, chunk_size):
    module = build_module(chunk_size=chunk_size).double()
    x = torch.randn(10, 3, HIDDEN, dtype=torch.float64)
    out, _ = module(x)
    torch.testing.assert_close(out, module_reference(module, x), rtol=1e-10, atol=1e-10)


def test_module_backward_reaches_every_parameter(single_rank):
    module = build_module(chunk_size=4)
    x = torch.randn(9, 2, HIDDEN, requires_grad=True)
    out, _ = module(x)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_module_bf16_runs_close_to_fp32(single_rank):
    module = build_module(chunk_size=4)
    x = torch.randn(8, 2, HIDDEN)
    with torch.no_grad():
        ref, _ = module(x)
        out, _ = module.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
