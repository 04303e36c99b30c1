"""Kimi Delta Attention (KDA) recurrence: token-by-token reference, chunked PyTorch form, dispatcher.

All functions take ``[batch, time, heads, dim]`` layouts: ``q, k`` are ``[b, t, h, d_k]``, ``v`` is
``[b, t, h, d_v]``, the per-channel log-decay ``g`` is ``[b, t, h, d_k]`` (``g <= 0``) and ``beta`` is
``[b, t, h]``. The state ``S`` of each head is ``[d_k, d_v]`` and every step does

    S_t = diag(exp(g_t)) S_{t-1}                       (decay)
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T         (delta-rule update)
    o_t = S_t^T (scale * q_t)                          (readout)

which is the order of FLA's ``naive_recurrent_kda``. ``scale`` defaults to ``d_k ** -0.5``.
Math runs in fp32 (fp64 when the inputs are fp64); ``o`` comes back in ``v``'s dtype and the
final state in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # flash-linear-attention's Triton kernel, used for CUDA tensors when available.
    from fla.ops.kda import chunk_kda as _fla_chunk_kda
except Exception:  # any import failure (missing package, Triton problems) means "no FLA"
    _fla_chunk_kda = None

L2NORM_EPS = 1e-6  # FLA's l2norm: x * rsqrt(sum(x^2) + eps)

__all__ = ["HAVE_FLA", "kda", "kda_chunked", "kda_recurrent_reference", "l2norm"]

HAVE_FLA = _fla_chunk_kda is not None


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32, or fp64 when the input already is fp64."""
    return torch.promote_types(x.dtype, torch.float32)


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """L2-normalise the last dimension the way FLA's ``l2norm`` does (in the compute dtype)."""
    x = x.to(_compute_dtype(x))
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> None:
    """Validate the [b, t, h, d] layouts shared by every KDA entry point."""
    if q.dim() != 4 or q.shape != k.shape or g.shape != q.shape:
        raise ValueError(f"q, k, g must share a [b, t, h, d_k] shape, got {q.shape}, {k.shape}, {g.shape}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [b, t, h, d_v] matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [b, t, h] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")


def kda_recurrent_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Naive token-by-token KDA recurrence; returns ``(o [b, t, h, d_v], final_state [b, h, d_k, d_v])``."""
    _check_shapes(q, k, v, g, beta)
    b, t, h, d_k = q.shape
    d_v = v.shape[-1]
    out_dtype = v.dtype
    dtype = _compute_dtype(q)
    scale = d_k**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if initial_state is None:
        state = q.new_zeros(b, h, d_k, d_v)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for i in range(t):
        k_i = k[:, i]
        state = state * torch.exp(g[:, i]).unsqueeze(-1)
        predicted = torch.einsum("bhkv,bhk->bhv", state, k_i)
        delta = beta[:, i].unsqueeze(-1) * (v[:, i] - predicted)
        state = state + k_i.unsqueeze(-1) * delta.unsqueeze(-2)
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i] * scale))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(b, 0, h, d_v)
    return o.to(out_dtype), state


def _sub_chunk_size(chunk_size: int) -> int:
    """Secondary block size used inside a chunk for the decay-weighted pair scores."""
    return 16 if chunk_size > 16 and chunk_size % 16 == 0 else chunk_size


def _decayed_pair_scores(a: Tensor, b: Tensor, cum_g: Tensor, strict: bool) -> Tensor:
    """``P[..., r, i] = sum_c a[r, c] b[i, c] exp(G[r, c] - G[i, c])`` for ``i < r`` (``i <= r``), else 0.

    ``cum_g`` is the inclusive within-chunk cumulative log-decay ``G`` (non-increasing along the
    chunk), so every exponent actually evaluated is ``<= 0``: pairs inside one sub-chunk use the
    explicit differences ``G_r - G_i``; pairs across sub-chunks factor through the last position
    ``e`` of the column's sub-chunk, ``exp(G_r - G_e) * exp(G_e - G_i)``, both factors ``<= 1``.
    Masked entries have their exponent replaced by 0 before ``exp`` so no overflow or NaN gradient
    can arise from the unused triangle.
    """
    chunk = cum_g.shape[-2]
    sub = _sub_chunk_size(chunk)
    blocks = chunk // sub
    lead = cum_g.shape[:-2]
    device = cum_g.device

    # Diagonal sub-blocks: explicit pairwise differences, [..., blocks, sub(r), sub(i), d].
    g_blk = cum_g.unflatten(-2, (blocks, sub))
    a_blk = a.unflatten(-2, (blocks, sub))
    b_blk = b.unflatten(-2, (blocks, sub))
    tri = torch.ones(sub, sub, dtype=torch.bool, device=device).tril(-1 if strict else 0)
    diff = g_blk.unsqueeze(-2) - g_blk.unsqueeze(-3)
    decay = torch.exp(diff.masked_fill(~tri.unsqueeze(-1), 0.0))
    diag = (a_blk.unsqueeze(-2) * b_blk.unsqueeze(-3) * decay).sum(-1).masked_fill(~tri, 0.0)
    eye = torch.eye(blocks, dtype=diag.dtype, device=device)
    scores = (diag.unsqueeze(-2) * eye[:, None, :, None]).reshape(*lead, chunk, chunk)
    if blocks == 1:
        return scores

    # Off-diagonal sub-blocks: rows r of a later sub-chunk than column block j.
    ref = g_blk[..., -1, :]  # [..., blocks(j), d]: G at the end of each sub-chunk
    row_block = torch.arange(chunk, device=device) // sub
    later = row_block.unsqueeze(0) > torch.arange(blocks, device=device).unsqueeze(1)  # [j, r]
    left_exp = (cum_g.unsqueeze(-3) - ref.unsqueeze(-2)).masked_fill(~later.unsqueeze(-1), 0.0)
    left = a.unsqueeze(-3) * torch.exp(left_exp)  # [..., j, chunk(r), d]
    right = b_blk * torch.exp(ref.unsqueeze(-2) - g_blk)  # [..., j, sub(i), d]
    off = torch.matmul(left, right.transpose(-1, -2)).masked_fill(~later.unsqueeze(-1), 0.0)
    off = off.movedim(-3, -2).reshape(*lead, chunk, chunk)  # column index j * sub + i
    return scores + off


def kda_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    chunk_size: int = 64,
    initial_state: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel KDA (WY/UT transform inside chunks, sequential state passing between them).

    Inside a chunk with start state ``S0`` and inclusive cumulative log-decay ``G``, the delta-rule
    pseudo-values ``U`` solve the unit lower-triangular system
    ``(I + A) U = diag(beta) (V - (K * exp(G)) S0)`` with
    ``A[r, i] = beta_r sum_c k_rc k_ic exp(G_rc - G_ic)`` (``i < r``), i.e. ``U = U0 - W S0``.
    Then ``O = (Q * exp(G)) S0 + tril(Aqk) U`` and
    ``S_end = exp(G_last) S0 + (K * exp(G_last - G))^T U``. Returns ``(o, final_state)``.
    """
    _check_shapes(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, h, d_k = q.shape
    d_v = v.shape[-1]
    out_dtype = v.dtype
    dtype = _compute_dtype(q)
    scale = d_k**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    q = q * scale

    n_chunks = max(1, math.ceil(t / chunk_size))
    pad = n_chunks * chunk_size - t
    if pad:
        # Padded steps have k = 0, beta = 0 and g = 0: no update and no decay, so the state is untouched.
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, 0, 0, pad))

    def to_chunks(x: Tensor) -> Tensor:
        return x.reshape(b, n_chunks, chunk_size, h, -1).permute(0, 3, 1, 2, 4)  # [b, h, n, c, d]

    q, k, v, g = (to_chunks(x) for x in (q, k, v, g))
    beta = beta.reshape(b, n_chunks, chunk_size, h).permute(0, 3, 1, 2)  # [b, h, n, c]

    cum_g = g.cumsum(-2)  # inclusive, per chunk: only differences within a chunk are ever exponentiated
    decay_in = torch.exp(cum_g)  # exp(G_r) <= 1
    last_g = cum_g[..., -1:, :]
    decay_out = torch.exp(last_g - cum_g)  # exp(G_last - G_i) <= 1

    a_kk = _decayed_pair_scores(k, k, cum_g, strict=True) * beta.unsqueeze(-1)
    a_qk = _decayed_pair_scores(q, k, cum_g, strict=False)
    eye = torch.eye(chunk_size, dtype=dtype, device=q.device)
    rhs = beta.unsqueeze(-1) * torch.cat([k * decay_in, v], dim=-1)
    solved = torch.linalg.solve_triangular(a_kk + eye, rhs, upper=False, unitriangular=True)
    w, u0 = solved[..., :d_k], solved[..., d_k:]
    q_in = q * decay_in
    k_out = (k * decay_out).transpose(-1, -2)  # [b, h, n, d_k, c]
    state_decay = torch.exp(last_g).transpose(-1, -2)  # [b, h, n, d_k, 1]

    if initial_state is None:
        state = q.new_zeros(b, h, d_k, d_v)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for i in range(n_chunks):
        u = u0[:, :, i] - torch.matmul(w[:, :, i], state)
        outputs.append(torch.matmul(q_in[:, :, i], state) + torch.matmul(a_qk[:, :, i], u))
        state = state_decay[:, :, i] * state + torch.matmul(k_out[:, :, i], u)
    o = torch.stack(outputs, dim=2)  # [b, h, n, c, d_v]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, n_chunks * chunk_size, h, d_v)[:, :t]
    return o.to(out_dtype), state


def kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Optional[Tensor]]:
    """KDA forward: FLA's ``chunk_kda`` for CUDA tensors when ``fla`` imports, else :func:`kda_chunked`.

    ``g`` is the per-step log-decay, ``beta`` is post-sigmoid, ``scale`` multiplies q (default
    ``d_k ** -0.5``), ``use_qk_l2norm`` L2-normalises q and k first (in-kernel for FLA, with FLA's
    eps 1e-6 in both paths). ``backend`` is ``"auto"``, ``"fla"`` or ``"torch"``. The final state is
    ``None`` unless ``output_final_state``.
    """
    if backend not in ("auto", "fla", "torch"):
        raise ValueError(f"unknown KDA backend {backend!r}")
    d_k = q.shape[-1]
    scale = d_k**-0.5 if scale is None else scale
    use_fla = backend == "fla" or (backend == "auto" and HAVE_FLA and q.is_cuda)
    if use_fla:
        if _fla_chunk_kda is None:
            raise RuntimeError("backend='fla' requested but flash-linear-attention (fla) is not importable")
        # FLA convention (fla.ops.kda.chunk_kda): [B, T, H, K] layouts, g in log space with
        # use_gate_in_kernel=False (default), beta already sigmoid-ed, the same per-step order as
        # naive_recurrent_kda, the state in [N, H, K, V] fp32. chunk_size is FLA's own (64).
        _check_shapes(q, k, v, g, beta)
        if initial_state is not None:
            initial_state = initial_state.float()
        return _fla_chunk_kda(
            q=q,
            k=k,
            v=v,
            g=g,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm,
        )
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    o, state = kda_chunked(q, k, v, g, beta, chunk_size=chunk_size, initial_state=initial_state, scale=scale)
    return o, (state if output_final_state else None)
