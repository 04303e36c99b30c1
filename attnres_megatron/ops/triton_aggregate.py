"""Fused Triton implementation of the AttnRes depth aggregation (``--attn-res-impl fused`` or
``auto`` on GPU).

Math per token (same as :func:`attnres_megatron.ops.reference.aggregate_reference`)::

    u       = query * gain                               (fp32, computed once per call)
    r_i     = 1 / sqrt(mean(v_i ** 2) + eps)             (fp32)
    logit_i = r_i * (u . v_i)                            (= query . (gain * v_i * r_i))
    alpha   = softmax_i(logit)                           (fp32)
    out     = sum_i alpha_i v_i                          (fp32 accumulate, cast to the source dtype)

Source passing
    The sources stay separate tensors. The kernels receive a pointer table (``int64[n]`` of
    ``data_ptr()``) and a stride table (``int64[n, 3]``) built per call, so non-contiguous
    sources (e.g. Megatron ``[s, b, h]`` views) are read in place: no ``[n, T, h]`` stack is
    materialised. Extra memory is ``n * 32`` bytes of tables. Each source is addressed as a
    ``[A, B, h]`` view (token ``t`` -> ``(t // B, t % B)``); a source with more than two
    non-collapsible leading dims is copied once by ``reshape`` (rare; documented cost
    ``T * h`` elements for that source). All sources must share one shape; sources of a
    different dtype than the first are cast (copied) to the first source's dtype.

Reads per call (``n`` sources, ``T`` tokens, hidden ``h``)
    * forward, ``h`` fits one tile (``next_pow2(h) <= MAX_SINGLE_TILE``): each source is read
      **once** (sum of squares, ``u . v`` and the online-softmax accumulation share one load);
      output written once.
    * forward, wider ``h``: two passes, each source read **twice** (stats pass, then the
      weighted-sum pass over hidden tiles).
    * backward: each source read **twice** (pass A: ``grad . v_i`` for the softmax backward;
      pass B: source gradient), ``grad`` read once (single tile) or ``n + 1`` times (tiled);
      each source gradient written once (or added, one read-modify-write, into a shared block
      gradient that an earlier reader wrote: :mod:`attnres_megatron.ops.shared_gradients`).

Saved for backward
    The sources (references, no copies) plus per-token fp32 stats: logits ``[n, T]``, inverse
    RMS ``[n, T]`` and log-sum-exp ``[T]``, i.e. ``(2 n + 1) * 4`` bytes per token.

Determinism
    No atomics. Each backward program owns a fixed contiguous range of tokens and writes its
    partial ``d(query * gain)`` row to a ``[P, h]`` fp32 buffer (``P`` = number of programs,
    at most a few hundred), which is reduced by ``torch.sum(dim=0)`` in a fixed order.

Triton is optional: it is imported lazily on first use; see :func:`require_triton`.
CPU tensors work under ``TRITON_INTERPRET=1`` (used by the tests; not a performance path).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops import shared_gradients
from attnres_megatron.ops.dispatch import MAX_TRITON_SOURCES

MAX_SOURCES = MAX_TRITON_SOURCES
"""Largest number of sources one call accepts (the kernels loop over sources, unrolled or not
as the compiler sees fit; the cap only bounds the per-call pointer tables)."""

MAX_SINGLE_TILE = 8192
"""Largest ``next_pow2(h)`` handled by the single-read forward (full hidden row per program)."""

TRITON_MISSING_MESSAGE = (
    "--attn-res-impl fused needs Triton: pip install 'attnres-megatron[triton]' "
    "(CPU tests use TRITON_INTERPRET=1)"
)

# Set by ``_kernels()``: the jitted kernels resolve ``tl`` and the helpers through module globals
# (the Triton interpreter re-executes kernel source against the module's global namespace).
tl: Any = None
_load_tile: Any = None
_store_gradient: Any = None


def require_triton() -> Any:
    """Import and return the ``triton`` module, or raise ``ImportError`` with install advice."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in tests
        raise ImportError(TRITON_MISSING_MESSAGE) from exc
    return triton


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[str, Any]:
    """Build (once) and return the jitted forward / backward kernels."""
    triton = require_triton()
    global tl, _load_tile, _store_gradient
    tl = triton.language

    @triton.jit
    def _load_tile(
        table_ptr, stride_ptr, idx, rows, cols, row_mask, col_mask, batch_inner, ELT: tl.constexpr
    ):
        """Load ``[BLOCK_T, BLOCK_H]`` of source ``idx`` (fp32) using its pointer/stride table."""
        base = tl.load(table_ptr + idx).to(tl.pointer_type(ELT))
        s_a = tl.load(stride_ptr + idx * 3 + 0)
        s_b = tl.load(stride_ptr + idx * 3 + 1)
        s_h = tl.load(stride_ptr + idx * 3 + 2)
        offs = (rows // batch_inner) * s_a + (rows % batch_inner) * s_b
        ptrs = base + offs[:, None] + cols[None, :].to(tl.int64) * s_h
        mask = row_mask[:, None] & col_mask[None, :]
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _forward_kernel(
        table_ptr,
        stride_ptr,
        u_ptr,
        out_ptr,
        logit_ptr,
        rinv_ptr,
        lse_ptr,
        n_tokens,
        hidden,
        batch_inner,
        eps,
        N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = rows.to(tl.int64)
        row_mask = rows < n_tokens
        ELT = out_ptr.dtype.element_ty
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_T], tl.float32)
        if SINGLE_TILE:
            # One read per source: stats and the online-softmax accumulation share the tile.
            cols = tl.arange(0, BLOCK_H)
            col_mask = cols < hidden
            u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
            acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
            for i in range(N):
                v = _load_tile(table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT)
                r = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / hidden + eps)
                logit = r * tl.sum(v * u[None, :], axis=1)
                tl.store(logit_ptr + i * n_tokens + rows, logit, mask=row_mask)
                tl.store(rinv_ptr + i * n_tokens + rows, r, mask=row_mask)
                m_new = tl.maximum(m, logit)
                scale = tl.exp(m - m_new)
                p = tl.exp(logit - m_new)
                acc = acc * scale[:, None] + p[:, None] * v
                d = d * scale + p
                m = m_new
            out = acc / d[:, None]
            out_ptrs = out_ptr + rows[:, None] * hidden + cols[None, :]
            tl.store(out_ptrs, out.to(ELT), mask=row_mask[:, None] & col_mask[None, :])
        else:
            # Pass 1: per-source stats over hidden tiles (one read per source).
            for i in range(N):
                sq = tl.zeros([BLOCK_T], tl.float32)
                dot = tl.zeros([BLOCK_T], tl.float32)
                for h0 in range(0, hidden, BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    col_mask = cols < hidden
                    u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
                    v = _load_tile(table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT)
                    sq += tl.sum(v * v, axis=1)
                    dot += tl.sum(v * u[None, :], axis=1)
                r = 1.0 / tl.sqrt(sq / hidden + eps)
                logit = r * dot
                tl.store(logit_ptr + i * n_tokens + rows, logit, mask=row_mask)
                tl.store(rinv_ptr + i * n_tokens + rows, r, mask=row_mask)
                m_new = tl.maximum(m, logit)
                d = d * tl.exp(m - m_new) + tl.exp(logit - m_new)
                m = m_new
            # Pass 2: weighted sum, tile by tile (second read per source).
            for h0 in range(0, hidden, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                col_mask = cols < hidden
                acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
                for i in range(N):
                    logit = tl.load(logit_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                    w = tl.exp(logit - m) / d
                    v = _load_tile(table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT)
                    acc += w[:, None] * v
                out_ptrs = out_ptr + rows[:, None] * hidden + cols[None, :]
                tl.store(out_ptrs, acc.to(ELT), mask=row_mask[:, None] & col_mask[None, :])
        tl.store(lse_ptr + rows, m + tl.log(d), mask=row_mask)

    @triton.jit
    def _store_gradient(gtable_ptr, adds_ptr, i, rows, cols, mask2, hidden, dv, ELT: tl.constexpr):
        """Write source ``i``'s gradient tile, or add it to what the tensor holds (``adds[i]``:
        a shared block gradient that an earlier reader's kernel wrote)."""
        ptrs = tl.load(gtable_ptr + i).to(tl.pointer_type(ELT)) + rows[:, None] * hidden + cols[None, :]
        if tl.load(adds_ptr + i) != 0:
            dv += tl.load(ptrs, mask=mask2, other=0.0).to(tl.float32)
        tl.store(ptrs, dv.to(ELT), mask=mask2)

    @triton.jit
    def _backward_kernel(
        table_ptr,
        stride_ptr,
        gtable_ptr,
        adds_ptr,
        u_ptr,
        grad_ptr,
        logit_ptr,
        rinv_ptr,
        lse_ptr,
        galpha_ptr,
        du_ptr,
        n_tokens,
        hidden,
        batch_inner,
        blocks_per_program,
        N: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ELT = grad_ptr.dtype.element_ty
        inv_h = 1.0 / hidden
        if SINGLE_TILE:
            cols = tl.arange(0, BLOCK_H)
            col_mask = cols < hidden
            u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
            du = tl.zeros([BLOCK_H], tl.float32)
            for blk in range(0, blocks_per_program):
                rows = (pid * blocks_per_program + blk) * BLOCK_T + tl.arange(0, BLOCK_T)
                rows = rows.to(tl.int64)
                row_mask = rows < n_tokens
                mask2 = row_mask[:, None] & col_mask[None, :]
                g = tl.load(grad_ptr + rows[:, None] * hidden + cols[None, :], mask=mask2, other=0.0).to(
                    tl.float32
                )
                lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
                # Pass A: c = sum_i alpha_i (grad . v_i)  (first read of each source).
                c = tl.zeros([BLOCK_T], tl.float32)
                for i in range(N):
                    v = _load_tile(table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT)
                    logit = tl.load(logit_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                    c += tl.exp(logit - lse) * tl.sum(g * v, axis=1)
                # Pass B: source gradients (second read of each source).
                for i in range(N):
                    v = _load_tile(table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT)
                    logit = tl.load(logit_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                    r = tl.load(rinv_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                    alpha = tl.exp(logit - lse)
                    dl = alpha * (tl.sum(g * v, axis=1) - c)
                    dl = tl.where(row_mask, dl, 0.0)
                    dlr = dl * r
                    coef = dl * logit * r * r * inv_h
                    dv = alpha[:, None] * g + dlr[:, None] * u[None, :] - coef[:, None] * v
                    _store_gradient(gtable_ptr, adds_ptr, i, rows, cols, mask2, hidden, dv, ELT)
                    du += tl.sum(dlr[:, None] * v, axis=0)
            tl.store(du_ptr + pid * hidden + cols, du, mask=col_mask)
        else:
            for h0 in range(0, hidden, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                tl.store(du_ptr + pid * hidden + cols, tl.zeros([BLOCK_H], tl.float32), mask=cols < hidden)
            for blk in range(0, blocks_per_program):
                rows = (pid * blocks_per_program + blk) * BLOCK_T + tl.arange(0, BLOCK_T)
                rows = rows.to(tl.int64)
                row_mask = rows < n_tokens
                lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
                # Pass A: grad . v_i for every source, kept in the [N, T] fp32 scratch buffer.
                c = tl.zeros([BLOCK_T], tl.float32)
                for i in range(N):
                    ga = tl.zeros([BLOCK_T], tl.float32)
                    for h0 in range(0, hidden, BLOCK_H):
                        cols = h0 + tl.arange(0, BLOCK_H)
                        col_mask = cols < hidden
                        g = tl.load(
                            grad_ptr + rows[:, None] * hidden + cols[None, :],
                            mask=row_mask[:, None] & col_mask[None, :],
                            other=0.0,
                        ).to(tl.float32)
                        v = _load_tile(
                            table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT
                        )
                        ga += tl.sum(g * v, axis=1)
                    tl.store(galpha_ptr + i * n_tokens + rows, ga, mask=row_mask)
                    logit = tl.load(logit_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                    c += tl.exp(logit - lse) * ga
                # Pass B: tile-major; grad tile read once per tile, each source once per tile.
                for h0 in range(0, hidden, BLOCK_H):
                    cols = h0 + tl.arange(0, BLOCK_H)
                    col_mask = cols < hidden
                    mask2 = row_mask[:, None] & col_mask[None, :]
                    u = tl.load(u_ptr + cols, mask=col_mask, other=0.0)
                    g = tl.load(grad_ptr + rows[:, None] * hidden + cols[None, :], mask=mask2, other=0.0).to(
                        tl.float32
                    )
                    du = tl.load(du_ptr + pid * hidden + cols, mask=col_mask, other=0.0)
                    for i in range(N):
                        logit = tl.load(logit_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                        r = tl.load(rinv_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                        ga = tl.load(galpha_ptr + i * n_tokens + rows, mask=row_mask, other=0.0)
                        alpha = tl.exp(logit - lse)
                        dl = tl.where(row_mask, alpha * (ga - c), 0.0)
                        dlr = dl * r
                        coef = dl * logit * r * r * inv_h
                        v = _load_tile(
                            table_ptr, stride_ptr, i, rows, cols, row_mask, col_mask, batch_inner, ELT
                        )
                        dv = alpha[:, None] * g + dlr[:, None] * u[None, :] - coef[:, None] * v
                        _store_gradient(gtable_ptr, adds_ptr, i, rows, cols, mask2, hidden, dv, ELT)
                        du += tl.sum(dlr[:, None] * v, axis=0)
                    tl.store(du_ptr + pid * hidden + cols, du, mask=col_mask)

    return {"forward": _forward_kernel, "backward": _backward_kernel}


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _token_view(source: Tensor) -> tuple[Tensor, int, tuple[int, int, int]]:
    """Address ``source [..., h]`` as ``[A, B, h]``; return (tensor kept alive, B, strides)."""
    if source.dim() == 1:
        return source, 1, (0, 0, source.stride(0))
    if source.dim() == 2:
        return source, source.shape[0], (0, source.stride(0), source.stride(1))
    if source.dim() > 3:
        try:
            source = source.view(-1, source.shape[-2], source.shape[-1])
        except RuntimeError:
            source = source.reshape(-1, source.shape[-2], source.shape[-1])
    return source, source.shape[1], (source.stride(0), source.stride(1), source.stride(2))


def _pointer_tables(sources: Sequence[Tensor]) -> tuple[list[Tensor], int, Tensor, Tensor]:
    """Pointer table ``int64[n]`` and stride table ``int64[n, 3]`` for ``sources``."""
    views, strides, inner = [], [], None
    for source in sources:
        view, b, st = _token_view(source)
        if inner is not None and b != inner:
            raise ValueError("AttnRes sources must share one shape.")
        inner = b
        views.append(view)
        strides.append(st)
    device = sources[0].device
    table = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64, device=device)
    stride_table = torch.tensor(strides, dtype=torch.int64, device=device)
    return views, int(inner or 1), table, stride_table


def _launch_config(hidden: int, block_h: int | None) -> tuple[int, int, bool, int]:
    """(BLOCK_T, BLOCK_H, SINGLE_TILE, num_warps) for a hidden size."""
    full = _next_pow2(hidden)
    if block_h is None:
        block_h = full if full <= MAX_SINGLE_TILE else 1024
    block_h = min(_next_pow2(block_h), full)
    single = block_h >= hidden
    block_t = max(1, min(16, 2048 // block_h))
    num_warps = 8 if block_h * block_t >= 4096 else 4
    return block_t, block_h, single, num_warps


def _num_backward_programs(n_token_blocks: int, device: torch.device) -> int:
    """Fixed number of backward programs: a few per SM on GPU, a handful on the CPU interpreter."""
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 8
    return max(1, min(n_token_blocks, cap))


class FusedAttnResAggregate(torch.autograd.Function):
    """Triton-fused ``sum_i softmax_i(query . (gain * v_i / rms(v_i))) v_i``; see module docstring."""

    @staticmethod
    def forward(
        ctx, query: Tensor, gain: Tensor, eps: float, block_h: int | None, shared: tuple, *sources: Tensor
    ) -> Tensor:
        kernels = _kernels()
        shared_gradients.keep_for_backward(ctx, shared)
        dtype = sources[0].dtype
        if dtype == torch.float64:
            raise TypeError("aggregate_fused supports fp32/bf16/fp16 sources; use aggregate() for fp64.")
        sources = tuple(s if s.dtype == dtype else s.to(dtype) for s in sources)
        shape = sources[0].shape
        if any(s.shape != shape for s in sources):
            raise ValueError("AttnRes sources must share one shape.")
        hidden = shape[-1]
        n_tokens = sources[0].numel() // hidden
        n = len(sources)
        views, inner, table, stride_table = _pointer_tables(sources)
        u = (query.detach().float() * gain.detach().float()).contiguous()
        device = sources[0].device
        out = torch.empty(shape, dtype=dtype, device=device)
        logits = torch.empty(n, n_tokens, dtype=torch.float32, device=device)
        rinv = torch.empty_like(logits)
        lse = torch.empty(n_tokens, dtype=torch.float32, device=device)
        block_t, block_hh, single, num_warps = _launch_config(hidden, block_h)
        grid = (triton_cdiv(n_tokens, block_t),)
        if n_tokens > 0:
            kernels["forward"][grid](
                table,
                stride_table,
                u,
                out,
                logits,
                rinv,
                lse,
                n_tokens,
                hidden,
                inner,
                float(eps),
                N=n,
                BLOCK_T=block_t,
                BLOCK_H=block_hh,
                SINGLE_TILE=single,
                num_warps=num_warps,
            )
        ctx.block_h = block_h
        ctx.save_for_backward(query, gain, logits, rinv, lse, *views)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        kernels = _kernels()
        query, gain, logits, rinv, lse, *views = ctx.saved_tensors
        n, n_tokens = logits.shape
        dtype = views[0].dtype
        device = views[0].device
        hidden = grad_out.shape[-1]
        shape = grad_out.shape
        grad = grad_out.to(dtype).contiguous()
        _, inner, table, stride_table = _pointer_tables(views)
        into = shared_gradients.targets(ctx.shared)
        grads = [torch.empty(shape, dtype=dtype, device=device) if t is None else t for t in into]
        gtable = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64, device=device)
        adds = torch.tensor([t is not None for t in into], dtype=torch.int32, device=device)
        u = (query.detach().float() * gain.detach().float()).contiguous()
        block_t, block_hh, single, num_warps = _launch_config(hidden, ctx.block_h)
        n_blocks = triton_cdiv(n_tokens, block_t)
        programs = _num_backward_programs(n_blocks, device)
        blocks_per_program = triton_cdiv(n_blocks, programs)
        programs = triton_cdiv(n_blocks, blocks_per_program)
        du_partial = torch.zeros(programs, hidden, dtype=torch.float32, device=device)
        galpha = torch.empty(0 if single else n * n_tokens, dtype=torch.float32, device=device)
        if n_tokens > 0:
            kernels["backward"][(programs,)](
                table,
                stride_table,
                gtable,
                adds,
                u,
                grad,
                logits,
                rinv,
                lse,
                galpha,
                du_partial,
                n_tokens,
                hidden,
                inner,
                blocks_per_program,
                N=n,
                BLOCK_T=block_t,
                BLOCK_H=block_hh,
                SINGLE_TILE=single,
                num_warps=num_warps,
            )
        du = du_partial.sum(dim=0)  # fixed-order reduction: deterministic
        grad_query = (du * gain.float()).to(query.dtype)
        grad_gain = (du * query.float()).to(gain.dtype)
        needs = list(ctx.needs_input_grad[5:])  # one per source
        return (
            grad_query,
            grad_gain,
            None,
            None,
            None,
            *shared_gradients.reader_gradients(ctx, grads, needs, views),
        )


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (kept local so shape logic does not need Triton)."""
    return -(-a // b)


def aggregate_fused(
    sources: Sequence[Tensor],
    query: Tensor,
    gain: Tensor,
    eps: float,
    shared: Optional[Sequence[Optional[shared_gradients.SharedGradient]]] = None,
    *,
    block_h: int | None = None,
) -> Tensor:
    """Fused AttnRes aggregation of 1..128 ``sources`` (each ``[..., h]``, fp32/bf16/fp16).

    GPU tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, a test
    mode). Which kernels a model runs is decided in :mod:`attnres_megatron.ops.dispatch`.

    ``shared``: per source, its :class:`~attnres_megatron.ops.shared_gradients.SharedGradient` or
    None (the source's gradient is then added to the shared buffer by the backward kernel, not
    returned).

    ``block_h`` overrides the hidden tile width (testing the two-pass path); by default the
    whole hidden row is one tile when ``next_pow2(h) <= MAX_SINGLE_TILE``.
    """
    if len(sources) == 0:
        raise ValueError("AttnRes aggregation needs at least one source.")
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"aggregate_fused supports at most {MAX_SOURCES} sources, got {len(sources)}.")
    require_triton()
    shared, inputs = shared_gradients.shared_inputs(sources, shared)
    return FusedAttnResAggregate.apply(query, gain, eps, block_h, shared, *inputs)
