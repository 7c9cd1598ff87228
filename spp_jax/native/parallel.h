// What conv.cc and pool.cc share: 16-lane vectors (GCC vector extensions; unaligned loads
// and stores, whole or in part) and parallel_for over XLA's intra-op thread pool.
//
// Why a counter rather than a fixed split: chunks are claimed from an atomic counter by the
// calling thread and by helpers, and the caller waits only for chunks a helper has started,
// so a busy pool can never deadlock the call.
#ifndef SPP_JAX_NATIVE_PARALLEL_H_
#define SPP_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace spp_native {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned loads

inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16 splat(float a) { return v16{} + a; }

// The first `lanes` < 16 lanes of a vector V (16 floats or int32s) at p: a masked load /
// store with AVX-512, else lane by lane (never a memcpy of a run-time length, which is a
// library call per cell).
template <typename V, typename T>
inline V load_part(const T* p, int64_t lanes) {
#ifdef __AVX512F__
  return (V)_mm512_maskz_loadu_ps((__mmask16)((1u << lanes) - 1), p);
#else
  V r{};
  for (int64_t l = 0; l < lanes; ++l) r[l] = p[l];
  return r;
#endif
}

template <typename V, typename T>
inline void store_part(T* p, V v, int64_t lanes) {
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << lanes) - 1), (__m512)v);
#else
  for (int64_t l = 0; l < lanes; ++l) p[l] = v[l];
#endif
}

struct Chunks {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
};

inline void drain(Chunks& c) {
  for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < c.n;) {
    c.fn(i);
    c.done.fetch_add(1, std::memory_order_release);
  }
}

// fn(i) for i in [0, n), on the calling thread and the pool's threads. Which thread runs
// a chunk varies; what a chunk computes must not depend on it.
inline void parallel_for(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  auto c = std::make_shared<Chunks>();
  c->n = n;
  c->fn = std::move(fn);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([c] { drain(*c); });
  drain(*c);
  while (c->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// How many chunks to cut `rows` units of work into: about 4 per thread, so a slow thread
// does not hold up the call.
inline int64_t num_chunks(ffi::ThreadPool& pool, int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, 4 * (pool.num_threads() + 1)));
}

}  // namespace spp_native

#endif  // SPP_JAX_NATIVE_PARALLEL_H_
