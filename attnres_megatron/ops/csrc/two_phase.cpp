// Two-phase Block AttnRes on CPU (paper Algorithm 1): phase 1 over the completed blocks for all S
// sublayer queries at once, phase 2 (forward) merging one sublayer's intra-block partial sum.
// Phase-2 backward is fused_backward over [*blocks, partial]. Math: attnres_megatron/ops/two_phase.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include "rows.h"
#include <cmath>
#include <limits>
#include <vector>

template <typename scalar_t>
static void phase_one_rows(const std::vector<const scalar_t*>& blocks, const at::opmath_type<scalar_t>* U,
                           int64_t S, at::opmath_type<scalar_t>* o, at::opmath_type<scalar_t>* logits,
                           at::opmath_type<scalar_t>* rinv, at::opmath_type<scalar_t>* m,
                           at::opmath_type<scalar_t>* d, int64_t T, int64_t h, double eps, bool stream,
                           int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = blocks.size(), R = tile_rows(h * sizeof(scalar_t), nb);
  // p[((t - t0) * S + j) * nb + i]: the logit, then the unnormalised weight, of block i for sublayer j.
  std::vector<acc_t> p(R * S * nb), acc(o == nullptr ? 0 : h);
  for (int64_t t0 = begin; t0 < end; t0 += R) {
    const int64_t t1 = std::min(end, t0 + R);
    for (int64_t i = 0; i < nb; ++i)  // block by block: one sequential run of tile rows each
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_next_tile(blocks[i], t, R, end, h);
        const scalar_t* v = blocks[i] + t * h;
        acc_t& r = rinv[i * T + t];
        for (int64_t j = 0; j < S; ++j)  // the first pass also gives the inverse RMS; v from cache after it
          logits[(j * nb + i) * T + t] = p[((t - t0) * S + j) * nb + i] =
              j == 0 ? row_logit(v, U, h, eps, r) : row_dot<acc_t>(v, U + j * h, h) * r;
      }
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < S; ++j) {
        acc_t* pj = p.data() + ((t - t0) * S + j) * nb;
        m[j * T + t] = exp_weights(pj, pj, nb, d[j * T + t]);
      }
    if (o == nullptr) continue;  // one block: o_j is the block itself (p = 1, d = 1)
    for (int64_t j = 0; j < S; ++j)  // sublayer by sublayer: one sequential run of o_j rows each
      for (int64_t t = t0; t < t1; ++t) {
        const acc_t* pj = p.data() + ((t - t0) * S + j) * nb;
        weighted_sum(blocks, pj, t, h, acc.data());
        write_row(o + (j * T + t) * h, acc.data(), h * sizeof(acc_t), stream);
      }
  }
  finish_rows();
}

// blocks: nb >= 1 contiguous [T, h] tensors; U: [S, h] (query * gain, stats dtype).
// Returns {o [S, T, h] (empty when nb == 1), logits [S, nb, T], inv_rms [nb, T], m [S, T], d [S, T]}.
std::vector<torch::Tensor> phase_one(std::vector<torch::Tensor> blocks, torch::Tensor U, double eps) {
  const int64_t nb = blocks.size(), S = U.size(0), h = blocks[0].size(-1), T = blocks[0].numel() / h;
  auto opts = U.options();
  auto o = nb > 1 ? torch::empty({S, T, h}, opts) : torch::empty({0}, opts);
  auto logits = torch::empty({S, nb, T}, opts), rinv = torch::empty({nb, T}, opts);
  auto m = torch::empty({S, T}, opts), d = torch::empty({S, T}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, blocks[0].scalar_type(), "attnres_phase_one", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src;
    for (auto& b : blocks) src.push_back(b.data_ptr<scalar_t>());
    acc_t* op = nb > 1 ? o.data_ptr<acc_t>() : nullptr;
    const bool stream = stream_output(T * h * static_cast<int64_t>(sizeof(acc_t)));
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      phase_one_rows<scalar_t>(src, U.data_ptr<acc_t>(), S, op, logits.data_ptr<acc_t>(), rinv.data_ptr<acc_t>(),
                               m.data_ptr<acc_t>(), d.data_ptr<acc_t>(), T, h, eps, stream, begin, end);
    });
  });
  return {o, logits, rinv, m, d};
}

template <typename scalar_t, typename o_t>
static void phase_two_rows(const scalar_t* vp, const o_t* o, const at::opmath_type<scalar_t>* m,
                           const at::opmath_type<scalar_t>* d, const at::opmath_type<scalar_t>* u,
                           scalar_t* out, at::opmath_type<scalar_t>* lp, at::opmath_type<scalar_t>* rp,
                           int64_t h, double eps, bool stream, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<scalar_t> y(h);
  const int64_t R = tile_rows(h * sizeof(scalar_t), 2);
  for (int64_t t0 = begin; t0 < end; t0 += R) {
    const int64_t t1 = std::min(end, t0 + R);
    if (vp != nullptr)  // the partial's logits first: one sequential run of its tile rows
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_next_tile(vp, t, R, end, h);
        lp[t] = row_logit(vp + t * h, u, h, eps, rp[t]);
      }
    for (int64_t t = t0; t < t1; ++t) {
      const o_t* ot = o + t * h;
      if (vp == nullptr) {  // first sublayer of a block: no partial sum yet
        const acc_t inv_d = acc_t(1) / d[t];
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) y[k] = static_cast<scalar_t>(static_cast<acc_t>(ot[k]) * inv_d);
        write_row(out + t * h, y.data(), h * sizeof(scalar_t), stream);
        continue;
      }
      const scalar_t* v = vp + t * h;
      const acc_t mx = std::max(m[t], lp[t]);
      const acc_t a = std::exp(m[t] - mx), b = std::exp(lp[t] - mx);
      const acc_t inv_den = acc_t(1) / (a * d[t] + b), wa = a * inv_den, wb = b * inv_den;
      #pragma omp simd
      for (int64_t k = 0; k < h; ++k)
        y[k] = static_cast<scalar_t>(wa * static_cast<acc_t>(ot[k]) + wb * static_cast<acc_t>(v[k]));
      write_row(out + t * h, y.data(), h * sizeof(scalar_t), stream);
    }
  }
  finish_rows();
}

// partial: contiguous [T, h] or empty (no partial); o: contiguous [T, h], either the phase-1
// accumulator (stats dtype) or, with one completed block, the block itself (source dtype);
// m, d: [T]; u: [h]; lp, rp: [T] outputs (the partial's logit and inverse RMS). Returns out.
torch::Tensor phase_two_forward(torch::Tensor partial, torch::Tensor o, torch::Tensor m, torch::Tensor d,
                                torch::Tensor u, double eps, torch::Tensor lp, torch::Tensor rp,
                                torch::Tensor like) {
  const int64_t h = like.size(-1), T = like.numel() / h;
  auto out = torch::empty(like.sizes(), like.options());  // contiguous, whatever like's strides
  const bool has_partial = partial.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, like.scalar_type(), "attnres_phase_two", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = has_partial ? partial.data_ptr<scalar_t>() : nullptr;
    acc_t* lpp = has_partial ? lp.data_ptr<acc_t>() : nullptr;
    acc_t* rpp = has_partial ? rp.data_ptr<acc_t>() : nullptr;
    const bool stream = stream_output(out.nbytes());
    auto run = [&](auto* op) {
      at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
        phase_two_rows<scalar_t>(vp, op, m.data_ptr<acc_t>(), d.data_ptr<acc_t>(), u.data_ptr<acc_t>(),
                                 out.data_ptr<scalar_t>(), lpp, rpp, h, eps, stream, begin, end);
      });
    };
    if (o.scalar_type() == like.scalar_type()) {
      run(o.data_ptr<scalar_t>());
    } else {
      run(o.data_ptr<acc_t>());
    }
  });
  return out;
}

template <typename scalar_t>
static void block_grad_rows(const std::vector<const scalar_t*>& blocks, const std::vector<scalar_t*>& gblocks,
                            const std::vector<const scalar_t*>& grads, const at::opmath_type<scalar_t>* coefs,
                            const at::opmath_type<scalar_t>* U, int64_t T, int64_t h, bool stream, int64_t begin,
                            int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = blocks.size(), S = grads.size(), R = tile_rows(h * sizeof(scalar_t), S + nb);
  std::vector<acc_t> acc(h);
  std::vector<scalar_t> row(h);
  auto coef = [&](int64_t j, int64_t kind, int64_t i, int64_t t) { return coefs[((j * 3 + kind) * nb + i) * T + t]; };
  int64_t first = 0;  // the first block whose gradient is written reads the gradient rows from memory
  while (first < nb && gblocks[first] == nullptr) ++first;
  for (int64_t t0 = begin; t0 < end; t0 += R) {
    const int64_t t1 = std::min(end, t0 + R);
    for (int64_t i = 0; i < nb; ++i) {  // block by block: one sequential run of rows each
      if (gblocks[i] == nullptr) continue;
      for (int64_t t = t0; t < t1; ++t) {
        prefetch_next_tile(blocks[i], t, R, end, h);
        for (int64_t j = 0; j < S && i == first; ++j) prefetch_next_tile(grads[j], t, R, end, h);
        // grad b_i = sum_j (alpha_ji grad_j + coef_ji b_i + scaled_ji u_j): the S gradient rows of
        // the tile come from cache after the first block.
        const scalar_t* v = blocks[i] + t * h;
        acc_t c = 0;
        for (int64_t j = 0; j < S; ++j) c += coef(j, 1, i, t);
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) acc[k] = c * static_cast<acc_t>(v[k]);
        for (int64_t j = 0; j < S; ++j) {
          const acc_t a = coef(j, 0, i, t), sc = coef(j, 2, i, t);
          const scalar_t* g = grads[j] + t * h;
          const acc_t* u = U + j * h;
          #pragma omp simd
          for (int64_t k = 0; k < h; ++k) acc[k] += a * static_cast<acc_t>(g[k]) + sc * u[k];
        }
        #pragma omp simd
        for (int64_t k = 0; k < h; ++k) row[k] = static_cast<scalar_t>(acc[k]);
        write_row(gblocks[i] + t * h, row.data(), h * sizeof(scalar_t), stream);
      }
    }
  }
  finish_rows();
}

// Block gradients of one two-phase block from the S' sublayers that ran backward: blocks: nb
// contiguous [T, h]; grads: their S' upstream gradients [T, h]; coefs: [S', 3, nb, T] (alpha,
// coef, scaled per sublayer, block and token, from fused_backward's `deferred`); U: [S', h].
std::vector<torch::Tensor> phase_one_backward(std::vector<torch::Tensor> blocks, std::vector<torch::Tensor> grads,
                                              torch::Tensor coefs, torch::Tensor U, std::vector<bool> needs_grad) {
  const int64_t nb = blocks.size(), h = blocks[0].size(-1), T = blocks[0].numel() / h;
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < nb; ++i) out.push_back(needs_grad[i] ? torch::empty_like(blocks[i]) : torch::Tensor());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, blocks[0].scalar_type(), "attnres_phase_one_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> src, g;
    std::vector<scalar_t*> gsrc;
    for (int64_t i = 0; i < nb; ++i) {
      src.push_back(blocks[i].data_ptr<scalar_t>());
      gsrc.push_back(needs_grad[i] ? out[i].data_ptr<scalar_t>() : nullptr);
    }
    for (auto& x : grads) g.push_back(x.data_ptr<scalar_t>());
    const bool stream = stream_output(blocks[0].nbytes());
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      block_grad_rows<scalar_t>(src, gsrc, g, coefs.data_ptr<acc_t>(), U.data_ptr<acc_t>(), T, h, stream, begin, end);
    });
  });
  return out;
}
