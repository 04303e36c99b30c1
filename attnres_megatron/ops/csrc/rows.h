// Row helpers shared by the AttnRes CPU kernels.
#ifndef ATTNRES_CSRC_ROWS_H
#define ATTNRES_CSRC_ROWS_H
#include <cstdint>
#include <cstring>
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

// Rows this far ahead of the one being read are prefetched (at least 2 KiB ahead per stream):
// a row's sources are read one after another with a reduction in between, and the hardware
// prefetchers alone keep too few lines in flight for DRAM's latency when the rows are cold.
inline int64_t prefetch_rows(int64_t row_bytes) { return row_bytes >= 2048 ? 1 : (2048 + row_bytes - 1) / row_bytes; }

// Prefetch `bytes` from `p` into the cache, one line at a time.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, 0, 3);
}

// Orders this thread's streaming stores before whatever follows (call once per parallel chunk).
inline void finish_rows() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

#endif  // ATTNRES_CSRC_ROWS_H
