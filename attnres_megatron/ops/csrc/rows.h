// Row helpers shared by the AttnRes CPU kernels.
#ifndef ATTNRES_CSRC_ROWS_H
#define ATTNRES_CSRC_ROWS_H
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// Tensors at least this large are written with non-temporal (streaming) stores: they cannot
// stay in cache until their next use anyway, and streaming skips the read-for-ownership that
// an ordinary store pays, a third of a copy's memory traffic. Smaller ones stay cached.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

inline bool stream_output(int64_t bytes) { return bytes >= kStreamBytes; }

// dst[0:bytes] = src[0:bytes]; streaming stores when `stream`, dst is 32-byte aligned and AVX
// is available (the tail and other cases use memcpy).
inline void write_row(void* dst, const void* src, int64_t bytes, bool stream) {
#if defined(__AVX__)
  if (stream && (reinterpret_cast<std::uintptr_t>(dst) & 31) == 0) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    int64_t k = 0;
    for (; k + 32 <= bytes; k += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k)));
    if (k < bytes) std::memcpy(d + k, s + k, bytes - k);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Prefetch `bytes` from `p` into the cache, one line at a time.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, 0, 3);
}

// Rows are processed in tiles: a pass that reads every source of a tile reads each source's
// tile rows one after another (one sequential run of R rows per source, which the hardware
// prefetchers follow; row by row, n interleaved runs of one row each reach a fraction of the
// bandwidth), and the passes after it find the tile in the core's cache.
constexpr int64_t kTileBytes = int64_t(256) << 10;

// Rows per tile when a row of each of `streams` tensors takes `row_bytes`.
inline int64_t tile_rows(int64_t row_bytes, int64_t streams) {
  return std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, row_bytes * streams));
}

// The logit u . v / rms(v) of one row of h, in one pass over it; its inverse RMS in r (statistics in acc_t).
template <typename scalar_t, typename acc_t>
inline acc_t row_logit(const scalar_t* v, const acc_t* u, int64_t h, double eps, acc_t& r) {
  acc_t ss = 0, dot = 0;
  #pragma omp simd reduction(+:ss, dot)
  for (int64_t k = 0; k < h; ++k) {
    const acc_t x = static_cast<acc_t>(v[k]);
    ss += x * x;
    dot += x * u[k];
  }
  r = acc_t(1) / std::sqrt(ss / h + static_cast<acc_t>(eps));
  return dot * r;
}

// a . b over one row of h (statistics in acc_t).
template <typename acc_t, typename a_t, typename b_t>
inline acc_t row_dot(const a_t* a, const b_t* b, int64_t h) {
  acc_t d = 0;
  #pragma omp simd reduction(+:d)
  for (int64_t k = 0; k < h; ++k) d += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return d;
}

// acc[0:h] = sum_i p[i] * rows[i][t * h : (t + 1) * h] (statistics in acc_t).
template <typename scalar_t, typename acc_t>
inline void weighted_sum(const std::vector<const scalar_t*>& rows, const acc_t* p, int64_t t, int64_t h, acc_t* acc) {
  const scalar_t* v = rows[0] + t * h;
  #pragma omp simd
  for (int64_t k = 0; k < h; ++k) acc[k] = p[0] * static_cast<acc_t>(v[k]);
  for (size_t i = 1; i < rows.size(); ++i) {
    const scalar_t* vi = rows[i] + t * h;
    const acc_t pi = p[i];
    #pragma omp simd
    for (int64_t k = 0; k < h; ++k) acc[k] += pi * static_cast<acc_t>(vi[k]);
  }
}

// p[0:n] = exp(l[0:n] - max l) (p may be l); returns max l, and their sum in den.
template <typename acc_t>
inline acc_t exp_weights(const acc_t* l, acc_t* p, int64_t n, acc_t& den) {
  acc_t mx = l[0], d = 0;
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, l[i]);
  for (int64_t i = 0; i < n; ++i) d += (p[i] = std::exp(l[i] - mx));
  den = d;
  return mx;
}

// p[0:n] = softmax(l[0:n]) (p may be l).
template <typename acc_t>
inline void softmax_weights(const acc_t* l, acc_t* p, int64_t n) {
  acc_t den;
  exp_weights(l, p, n, den);
  const acc_t inv = acc_t(1) / den;
  for (int64_t i = 0; i < n; ++i) p[i] *= inv;
}

// Prefetches row t + R of `rows`, the same row of the next tile, when it is below `end`: while a
// pass reads one tile, the next one comes in, from all its tensors at once (the hardware
// prefetchers follow one run at a time and stop at every 4 KiB page).
template <typename scalar_t>
inline void prefetch_next_tile(const scalar_t* rows, int64_t t, int64_t R, int64_t end, int64_t h) {
  if (t + R < end) prefetch_row(rows + (t + R) * h, h * sizeof(scalar_t));
}

// Orders this thread's streaming stores before whatever follows (call once per parallel chunk).
inline void finish_rows() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

#endif  // ATTNRES_CSRC_ROWS_H
