"""Fused CPU kernels for the AttnRes aggregation (``--attn-res-impl fused`` on CPU tensors).

C++ with ATen's ``parallel_for`` (OpenMP), built on first use with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja; the build is
cached in ``TORCH_EXTENSIONS_DIR``). Same math as the Triton kernels:

* forward, per token: each source row is read from memory once (sum of squares and ``u . v``
  in one pass, then the online-softmax accumulation re-reads the row from cache);
* backward, per token: ``grad . v_i`` for every source, then the source gradients and the
  query-gradient contribution, the rows again coming from cache while ``n * h`` fits in it;
* deterministic: tokens are cut into a fixed number of chunks (independent of the thread
  count); each chunk sums its query-gradient row in token order and the chunks are added in
  chunk order, so two runs give bitwise-identical gradients on any number of threads.

Saved for backward: the sources (references) plus logits and inverse RMS ``[n, T]`` in the
statistics dtype (fp32; fp64 for fp64 sources).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnres_megatron.ops.reference import compute_dtype

GRAD_CHUNKS = 64
"""Token chunks of the deterministic query-gradient reduction."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <limits>
#include <vector>

template <typename scalar_t>
static void forward_rows(const std::vector<const scalar_t*>& src, const at::opmath_type<scalar_t>* u,
                         scalar_t* out, at::opmath_type<scalar_t>* logits, at::opmath_type<scalar_t>* rinv,
                         int64_t T, int64_t h, double eps, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = src.size();
  std::vector<acc_t> acc(h);
  for (int64_t t = begin; t < end; ++t) {
    acc_t m = -std::numeric_limits<acc_t>::infinity(), d = 0;
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* v = src[i] + t * h;
      acc_t ss = 0, dot = 0;
      #pragma omp simd reduction(+:ss, dot)
      for (int64_t k = 0; k < h; ++k) {
        acc_t x = static_cast<acc_t>(v[k]);
        ss += x * x;
        dot += x * u[k];
      }
      acc_t r = acc_t(1) / std::sqrt(ss / h + static_cast<acc_t>(eps));
      acc_t logit = dot * r;
      logits[i * T + t] = logit;
      rinv[i * T + t] = r;
      acc_t m_new = std::max(m, logit);
      acc_t scale = std::exp(m - m_new), p = std::exp(logit - m_new);
      if (i == 0) {
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) acc[k] = p * static_cast<acc_t>(v[k]);
      } else {
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) acc[k] = acc[k] * scale + p * static_cast<acc_t>(v[k]);
      }
      d = d * scale + p;
      m = m_new;
    }
    scalar_t* o = out + t * h;
    acc_t inv_d = acc_t(1) / d;
    #pragma omp simd
    for (int64_t k = 0; k < h; ++k) o[k] = static_cast<scalar_t>(acc[k] * inv_d);
  }
}

std::vector<torch::Tensor> fused_forward(std::vector<torch::Tensor> sources, torch::Tensor u, double eps) {
  const int64_t n = sources.size(), h = sources[0].size(-1), T = sources[0].numel() / h;
  auto out = torch::empty_like(sources[0]);
  auto logits = torch::empty({n, T}, u.options()), rinv = torch::empty({n, T}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "attnres_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    for (auto& s : sources) src.push_back(s.data_ptr<scalar_t>());
    const acc_t* up = u.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc_t* lp = logits.data_ptr<acc_t>();
    acc_t* rp = rinv.data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(src, up, op, lp, rp, T, h, eps, begin, end);
    });
  });
  return {out, logits, rinv};
}

template <typename scalar_t>
static void backward_rows(const std::vector<const scalar_t*>& src, const std::vector<scalar_t*>& gsrc,
                          const scalar_t* grad, const at::opmath_type<scalar_t>* u,
                          const at::opmath_type<scalar_t>* logits, const at::opmath_type<scalar_t>* rinv,
                          at::opmath_type<scalar_t>* du, int64_t T, int64_t h, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = src.size();
  std::vector<acc_t> alpha(n), ga(n), du_acc(h, acc_t(0));
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* g = grad + t * h;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, logits[i * T + t]);
    acc_t d = 0;
    for (int64_t i = 0; i < n; ++i) {
      alpha[i] = std::exp(logits[i * T + t] - m);
      d += alpha[i];
    }
    acc_t mean_ga = 0;
    for (int64_t i = 0; i < n; ++i) {
      alpha[i] /= d;
      const scalar_t* v = src[i] + t * h;
      acc_t dot = 0;
      #pragma omp simd reduction(+:dot)
      for (int64_t k = 0; k < h; ++k) dot += static_cast<acc_t>(g[k]) * static_cast<acc_t>(v[k]);
      ga[i] = dot;
      mean_ga += alpha[i] * dot;
    }
    for (int64_t i = 0; i < n; ++i) {
      const acc_t logit = logits[i * T + t], r = rinv[i * T + t];
      const acc_t gl = alpha[i] * (ga[i] - mean_ga);
      const acc_t scaled = gl * r, coef = -gl * logit * r * r / h, a = alpha[i];
      const scalar_t* v = src[i] + t * h;
      scalar_t* gv = gsrc[i];
      if (gv == nullptr) {
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) du_acc[k] += scaled * static_cast<acc_t>(v[k]);
        continue;
      }
      gv += t * h;
      #pragma omp simd
      for (int64_t k = 0; k < h; ++k) {
        const acc_t x = static_cast<acc_t>(v[k]);
        du_acc[k] += scaled * x;
        gv[k] = static_cast<scalar_t>(a * static_cast<acc_t>(g[k]) + coef * x + scaled * u[k]);
      }
    }
  }
  for (int64_t k = 0; k < h; ++k) du[k] = du_acc[k];
}

std::vector<torch::Tensor> fused_backward(std::vector<torch::Tensor> sources, torch::Tensor grad,
                                          torch::Tensor u, torch::Tensor logits, torch::Tensor rinv,
                                          std::vector<bool> needs_grad, int64_t chunks) {
  const int64_t n = sources.size(), h = sources[0].size(-1), T = sources[0].numel() / h;
  std::vector<torch::Tensor> grads;
  for (int64_t i = 0; i < n; ++i)
    grads.push_back(needs_grad[i] ? torch::empty_like(sources[i]) : torch::Tensor());
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, T));
  auto du_parts = torch::empty({chunks, h}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "attnres_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    std::vector<scalar_t*> gsrc;
    for (int64_t i = 0; i < n; ++i) {
      src.push_back(sources[i].data_ptr<scalar_t>());
      gsrc.push_back(needs_grad[i] ? grads[i].data_ptr<scalar_t>() : nullptr);
    }
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t* up = u.data_ptr<acc_t>();
    const acc_t* lp = logits.data_ptr<acc_t>();
    const acc_t* rp = rinv.data_ptr<acc_t>();
    acc_t* dp = du_parts.data_ptr<acc_t>();
    const int64_t per_chunk = (T + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * per_chunk, end = std::min(T, begin + per_chunk);
        if (begin >= end) { std::fill(dp + c * h, dp + (c + 1) * h, acc_t(0)); continue; }
        backward_rows<scalar_t>(src, gsrc, gp, up, lp, rp, dp + c * h, T, h, begin, end);
      }
    });
  });
  grads.push_back(du_parts.sum(0));
  return grads;
}
"""


@functools.lru_cache(maxsize=1)
def _extension() -> Any:
    """Build (first call) or load the C++ kernels."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(
            name="attnres_cpu_fused",
            cpp_sources=_SOURCE,
            functions=["fused_forward", "fused_backward"],
            extra_cflags=["-O3", "-fopenmp", "-march=native"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # compiler or ninja missing, build error
        raise RuntimeError(
            "--attn-res-impl fused on CPU builds C++ kernels on first use and that failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); install a C++ "
            "compiler and ninja (pip install ninja), or use --attn-res-impl torch."
        ) from exc


def _rows(tensor: Tensor) -> Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


class CpuFusedAttnResAggregate(torch.autograd.Function):
    """AttnRes aggregation with the fused C++ kernels (CPU tensors)."""

    @staticmethod
    def forward(ctx, query: Tensor, gain: Tensor, eps: float, *sources: Tensor) -> Tensor:
        dtype = sources[0].dtype
        rows = [_rows(s.to(dtype)) for s in sources]
        stats = compute_dtype(dtype)
        weighted_query = (query.to(stats) * gain.to(stats)).contiguous()
        out, logits, inv_rms = _extension().fused_forward(rows, weighted_query, float(eps))
        ctx.save_for_backward(query, gain, logits, inv_rms, *sources)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        query, gain, logits, inv_rms, *sources = ctx.saved_tensors
        dtype = sources[0].dtype
        rows = [_rows(s.to(dtype)) for s in sources]
        stats = logits.dtype
        weighted_query = (query.to(stats) * gain.to(stats)).contiguous()
        needs = [bool(ctx.needs_input_grad[3 + i]) for i in range(len(sources))]
        *grads, du = _extension().fused_backward(
            rows, _rows(grad_out.to(dtype)), weighted_query, logits, inv_rms, needs, GRAD_CHUNKS
        )
        grad_sources = [
            g.view(s.shape).to(s.dtype) if need else None for g, s, need in zip(grads, sources, needs)
        ]
        grad_query = (du * gain.to(stats)).to(query.dtype)
        grad_gain = (du * query.to(stats)).to(gain.dtype)
        return (grad_query, grad_gain, None, *grad_sources)


def aggregate_cpu_fused(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Fused C++ AttnRes aggregation of CPU ``sources`` (each ``[..., h]``)."""
    if len(sources) == 0:
        raise ValueError("AttnRes aggregation needs at least one source.")
    return CpuFusedAttnResAggregate.apply(query, gain, eps, *sources)
