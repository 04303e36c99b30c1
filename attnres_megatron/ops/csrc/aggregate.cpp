// Fused AttnRes aggregation on CPU: forward and deterministic backward, one token row at a time.
// Math and memory traffic: see attnres_megatron/ops/cpu_fused.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "rows.h"
#include <ATen/OpMathType.h>
#include <cmath>
#include <limits>
#include <vector>

// Logits and inverse RMS of rows [t0, t1) of every source, source by source (one sequential run
// of rows each); w[(t - t0) * n + i] receives the logit of source i at token t. The next tile of
// the first half of the sources is prefetched here, the other half's during the mix (see
// forward_rows).
template <typename scalar_t, typename acc_t>
static void tile_logits(const std::vector<const scalar_t*>& src, const acc_t* u, acc_t* w, acc_t* logits,
                        acc_t* rinv, int64_t T, int64_t h, double eps, int64_t t0, int64_t t1, int64_t R,
                        int64_t end) {
  const int64_t n = src.size();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = t0; t < t1; ++t) {
      if (2 * i < n) prefetch_next_tile(src[i], t, R, end, h);
      logits[i * T + t] = w[(t - t0) * n + i] = row_logit(src[i] + t * h, u, h, eps, rinv[i * T + t]);
    }
}

template <typename scalar_t>
static void forward_rows(const std::vector<const scalar_t*>& src, const at::opmath_type<scalar_t>* u,
                         scalar_t* out, at::opmath_type<scalar_t>* logits, at::opmath_type<scalar_t>* rinv,
                         int64_t T, int64_t h, double eps, bool stream, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = src.size(), R = tile_rows(h * sizeof(scalar_t), n);
  std::vector<acc_t> w(R * n), acc(h);
  std::vector<scalar_t> row(h);
  for (int64_t t0 = begin; t0 < end; t0 += R) {
    const int64_t t1 = std::min(end, t0 + R);
    tile_logits(src, u, w.data(), logits, rinv, T, h, eps, t0, t1, R, end);
    for (int64_t t = t0; t < t1; ++t) {  // the mix, row by row, the tile's rows from cache
      // The next tile of the sources' second half comes in meanwhile: memory stays busy while the
      // mix computes and writes (all of it in the logit pass left the mix with no reads in
      // flight; forward 3-8 % slower at [2048, 1, 2304], tools/bench_kernel_variants.py).
      for (int64_t i = (n + 1) / 2; i < n; ++i) prefetch_next_tile(src[i], t, R, end, h);
      acc_t* p = w.data() + (t - t0) * n;
      softmax_weights(p, p, n);
      weighted_sum(src, p, t, h, acc.data());
      #pragma omp simd
      for (int64_t k = 0; k < h; ++k) row[k] = static_cast<scalar_t>(acc[k]);
      write_row(out + t * h, row.data(), h * sizeof(scalar_t), stream);
    }
  }
  finish_rows();
}

// u = query * gain in the statistics dtype (fp32; fp64 for fp64 sources), contiguous.
static torch::Tensor weighted_query(const torch::Tensor& source, const torch::Tensor& query, const torch::Tensor& gain) {
  const auto stats = at::toOpMathType(source.scalar_type());
  return (query.to(stats) * gain.to(stats)).contiguous();
}

// sources: n contiguous tensors of one shape [..., h] and dtype; query, gain: [h] (any float dtype).
// Returns {out (the sources' shape), logits [n, T], inv_rms [n, T]} (statistics dtype).
std::vector<torch::Tensor> fused_forward(std::vector<torch::Tensor> sources, torch::Tensor query, torch::Tensor gain,
                                         double eps) {
  const int64_t n = sources.size(), h = sources[0].size(-1), T = sources[0].numel() / h;
  const auto u = weighted_query(sources[0], query, gain);
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
    const bool stream = stream_output(out.nbytes());
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(src, up, op, lp, rp, T, h, eps, stream, begin, end);
    });
  });
  return {out, logits, rinv};
}

// One row of a source gradient, value = a * grad + coef * v + scaled * u, and du += scaled * v.
// kAdd: gv += value in place (the row was just read: an ordinary store); else gv = value, written
// through `row` (streaming stores for large tensors).
template <bool kAdd, typename scalar_t, typename acc_t>
static inline void gradient_row(const scalar_t* v, const scalar_t* g, const acc_t* u, acc_t a, acc_t coef,
                                acc_t scaled, scalar_t* gv, scalar_t* row, acc_t* du, int64_t h, bool stream) {
  #pragma omp simd
  for (int64_t k = 0; k < h; ++k) {
    const acc_t x = static_cast<acc_t>(v[k]);
    du[k] += scaled * x;
    const acc_t value = a * static_cast<acc_t>(g[k]) + coef * x + scaled * u[k];
    if constexpr (kAdd) {
      gv[k] = static_cast<scalar_t>(static_cast<acc_t>(gv[k]) + value);
    } else {
      row[k] = static_cast<scalar_t>(value);
    }
  }
  if constexpr (!kAdd) write_row(gv, row, h * sizeof(scalar_t), stream);
}

template <typename scalar_t>
static void backward_rows(const std::vector<const scalar_t*>& src, const std::vector<scalar_t*>& gsrc,
                          const std::vector<char>& accumulate, at::opmath_type<scalar_t>* deferred,
                          int64_t n_deferred, const scalar_t* grad, const at::opmath_type<scalar_t>* u,
                          const at::opmath_type<scalar_t>* logits, const at::opmath_type<scalar_t>* rinv,
                          at::opmath_type<scalar_t>* du, int64_t per_chunk, int64_t R, int64_t T, int64_t h,
                          bool stream, int64_t begin, int64_t end) {
  // du: [chunks, h] (zeros); row t adds its query-gradient part to chunk t / per_chunk's row. A
  // tile is either whole chunks (R a multiple of per_chunk) or lies within one chunk, and tiles
  // start at chunk boundaries, so each chunk's additions come in one order whatever the threads.
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = src.size();
  // Per tile row t and source i: grad . v_i, then the gradient's coefficients (alpha, coef, scaled).
  std::vector<acc_t> ga(R * n), cf(3 * R * n), l(n), alpha(n);
  std::vector<scalar_t> row(h);
  for (int64_t t0 = begin, t1; t0 < end; t0 = t1) {
    t1 = std::min({end, t0 + R, R >= per_chunk ? end : (t0 / per_chunk + 1) * per_chunk});
    for (int64_t i = 0; i < n; ++i)  // source by source; the gradient rows come from cache after the first
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_next_tile(src[i], t, R, end, h);
        if (i == 0) prefetch_next_tile(grad, t, R, end, h);
        ga[(t - t0) * n + i] = row_dot<acc_t>(grad + t * h, src[i] + t * h, h);
      }
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* c = cf.data() + (t - t0) * n * 3;
      const acc_t* dots = ga.data() + (t - t0) * n;
      for (int64_t i = 0; i < n; ++i) l[i] = logits[i * T + t];
      softmax_weights(l.data(), alpha.data(), n);
      acc_t mean_ga = 0;
      for (int64_t i = 0; i < n; ++i) mean_ga += alpha[i] * dots[i];
      for (int64_t i = 0; i < n; ++i) {
        const acc_t r = rinv[i * T + t], gl = alpha[i] * (dots[i] - mean_ga);
        c[3 * i] = alpha[i];
        c[3 * i + 1] = -gl * l[i] * r * r / h;  // coef
        c[3 * i + 2] = gl * r;                     // scaled
        if (i < n_deferred)  // grad_v = alpha * grad + coef * v + scaled * u, summed later (two-phase)
          for (int64_t q = 0; q < 3; ++q) deferred[(q * n_deferred + i) * T + t] = c[3 * i + q];
      }
    }
    for (int64_t i = 0; i < n; ++i)  // source by source again: one sequential run of gradient rows each
      for (int64_t t = t0; t < t1; ++t) {
        const acc_t* c = cf.data() + ((t - t0) * n + i) * 3;
        const acc_t a = c[0], coef = c[1], scaled = c[2];
        const scalar_t* v = src[i] + t * h;
        const scalar_t* g = grad + t * h;
        acc_t* du_acc = du + (t / per_chunk) * h;
        scalar_t* gv = gsrc[i];
        if (gv == nullptr) {
          #pragma omp simd
          for (int64_t k = 0; k < h; ++k) du_acc[k] += scaled * static_cast<acc_t>(v[k]);
        } else if (accumulate[i]) {  // gv += this call's part of the source gradient (one read-modify-write)
          prefetch_next_tile(gv, t, R, end, h);
          gradient_row<true>(v, g, u, a, coef, scaled, gv + t * h, row.data(), du_acc, h, stream);
        } else {
          gradient_row<false>(v, g, u, a, coef, scaled, gv + t * h, row.data(), du_acc, h, stream);
        }
      }
  }
  finish_rows();
}

// Returns {grad of each source (undefined where not needed or deferred), grad query, grad gain}.
std::vector<torch::Tensor> fused_backward(std::vector<torch::Tensor> sources, torch::Tensor grad,
                                          torch::Tensor query, torch::Tensor gain, torch::Tensor logits,
                                          torch::Tensor rinv, std::vector<bool> needs_grad, torch::Tensor deferred,
                                          int64_t chunks, std::vector<torch::Tensor> accumulate) {
  // deferred: empty, or [3, n_deferred, T] (stats dtype) receiving, for the first n_deferred
  // sources, the per-token coefficients of their gradient instead of the gradient itself.
  // accumulate: empty, or one tensor per source: a non-empty one (contiguous, the sources' dtype
  // and shape) receives source i's gradient added to what it holds, and is returned as it.
  const int64_t n = sources.size(), h = sources[0].size(-1), T = sources[0].numel() / h;
  const int64_t n_deferred = deferred.numel() > 0 ? deferred.size(1) : 0;
  std::vector<torch::Tensor> grads;
  std::vector<char> adds(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    const bool needed = needs_grad[i] && i >= n_deferred;
    adds[i] = needed && !accumulate.empty() && accumulate[i].numel() > 0;
    if (adds[i]) TORCH_CHECK(accumulate[i].is_contiguous() && accumulate[i].numel() == sources[i].numel() &&
                             accumulate[i].scalar_type() == sources[i].scalar_type(),
                             "fused_backward: accumulate[", i, "] must match source ", i);
    grads.push_back(adds[i] ? accumulate[i] : needed ? torch::empty_like(sources[i]) : torch::Tensor());
  }
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, T));
  const auto u = weighted_query(sources[0], query, gain);
  auto du_parts = torch::zeros({chunks, h}, u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, sources[0].scalar_type(), "attnres_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    std::vector<scalar_t*> gsrc;
    for (int64_t i = 0; i < n; ++i) {
      src.push_back(sources[i].data_ptr<scalar_t>());
      gsrc.push_back(grads[i].defined() ? grads[i].data_ptr<scalar_t>() : nullptr);
    }
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const acc_t* up = u.data_ptr<acc_t>();
    const acc_t* lp = logits.data_ptr<acc_t>();
    const acc_t* rp = rinv.data_ptr<acc_t>();
    acc_t* dp = du_parts.data_ptr<acc_t>();
    const int64_t per_chunk = (T + chunks - 1) / chunks;
    // Tiles of whole chunks where a tile holds several (each a parallel item), else tiles within a chunk.
    // (a power of two chunks per item: the items split evenly between 2^k threads)
    const int64_t fit = tile_rows(h * sizeof(scalar_t), n + 1);
    int64_t group = 1;
    while (2 * group * per_chunk <= fit && 2 * group <= chunks) group *= 2;
    const int64_t R = group > 1 ? group * per_chunk : std::min(fit, per_chunk), span = group * per_chunk;
    const bool stream = stream_output(sources[0].nbytes());
    at::parallel_for(0, (T + span - 1) / span, 1, [&](int64_t a, int64_t b) {
      backward_rows<scalar_t>(src, gsrc, adds, n_deferred ? deferred.data_ptr<acc_t>() : nullptr, n_deferred, gp, up,
                              lp, rp, dp, per_chunk, R, T, h, stream, a * span, std::min(T, b * span));
    });
  });
  const auto du = du_parts.sum(0);
  grads.push_back((du * gain.to(du.scalar_type())).to(query.scalar_type()));
  grads.push_back((du * query.to(du.scalar_type())).to(gain.scalar_type()));
  return grads;
}
