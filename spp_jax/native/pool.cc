// Spatial pyramid max pooling of NHWC float32 maps, and its gradient, as XLA FFI handlers
// for the CPU (spp_jax/native/pool.py is the JAX side; spp_jax.pool runs on it).
//
// Why: the XLA formulation (spp_jax/binmax.py, spp_jax/pooling.py) makes several passes over
// the map for uneven bins (level 6 of a 10-cell map: bins of 2 and 3 cells), and its coarse
// levels, their gradients and the concatenation are further XLA ops over (B, 6, 6, C) arrays
// that cost more than the map's own pass. Here one call pools every level: the forward reads
// each bin's cells once, keeping the max and the cell it came from per channel in registers,
// and the backward scatters the cotangents to those cells.
//
// Contract: x (B, H, W, C); y and code (B, D, C) with D the pyramid's bins, levels in the
// caller's order, each level's bins row-major. Attribute `steps`: 6 int64 per level in
// computing order, (out, src, src_n, n, m, e): the level's n x m bins go to bins [out, out +
// n * m) of y; src = -1: pooled from the map, bin (i, j) the cells edges[e + 2i .. e + 2i + 1]
// x edges[e + 2n + 2j .. e + 2n + 2j + 1] (half-open; 0 <= start < end <= H, W); src >= 0:
// derived from the src_n x src_n level at bins [src, ...) already computed, the edges then
// counting that level's bins. `code` holds the map cell r * W + c each bin's value came from:
// for a pooled bin its first maximal cell in row-major order, for a derived bin the cell of
// its first maximal source bin in row-major order (spp_jax/pooling.py's rule); -1 where a NaN
// is involved (y is NaN there: the max propagates NaN, and such a bin passes no gradient).
// A later cell replaces the max only when strictly greater, so the first maximum is kept.
// Backward: g (B, D, C) and code -> dx (B, H, W, C), each bin's cotangent added to its cell,
// bins in order (the same sums in the same order on any schedule).
#include <cstdint>
#include <cstring>
#include <limits>

#include "parallel.h"

namespace {

using namespace spp_native;  // NOLINT: v16, load(_part), store(_part), parallel_for, num_chunks

typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));  // 16 int32 lanes

struct Pyramid {
  int64_t b, h, w, c, d;            // x (b, h, w, c); y (b, d, c)
  const int64_t* steps;             // 6 per level: out, src, src_n, n, m, e
  int64_t levels;
  const int64_t* edges;
};

// The source of one level's bins for one sample: the map (cells r * W + c, codes the cells
// themselves), or an earlier level's bins (cells r * src_n + c, codes read from `code`).
struct Grid {
  const float* v;     // value of cell q: v[q * c + ch]
  const int32_t* at;  // code of cell q (nullptr: q itself, scaled to map cells by `w`)
  int64_t w;          // cells per row
};

ffi::Error pyramid(Pyramid& g, ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> y_dims,
                   ffi::Span<const int64_t> steps, ffi::Span<const int64_t> edges) {
  if (x_dims.size() != 4 || y_dims.size() != 3 || steps.size() % 6 != 0)
    return ffi::Error::InvalidArgument("spp_jax pyramid: x must be (B, H, W, C), y (B, D, C)");
  g = {x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1], steps.begin(),
       int64_t(steps.size() / 6), edges.begin()};
  if (y_dims[0] != g.b || y_dims[2] != g.c)
    return ffi::Error::InvalidArgument("spp_jax pyramid: inconsistent shapes");
  if (g.h * g.w > std::numeric_limits<int32_t>::max())
    return ffi::Error::InvalidArgument("spp_jax pyramid: map too large for int32 codes");
  for (int64_t l = 0; l < g.levels; ++l) {
    const int64_t* s = g.steps + 6 * l;
    const int64_t out = s[0], src = s[1], sn = s[2], n = s[3], m = s[4], e = s[5];
    if (out < 0 || out + n * m > g.d || e < 0 || e + 2 * (n + m) > int64_t(edges.size()) ||
        (src >= 0 && src + sn * sn > g.d))
      return ffi::Error::InvalidArgument("spp_jax pyramid: a level outside y or the edges");
    for (int64_t i = 0; i < n + m; ++i) {
      const int64_t lo = g.edges[e + 2 * i], hi = g.edges[e + 2 * i + 1];
      const int64_t side = src >= 0 ? sn : (i < n ? g.h : g.w);
      if (lo < 0 || hi <= lo || hi > side)
        return ffi::Error::InvalidArgument("spp_jax pyramid: a bin outside its grid");
    }
  }
  return ffi::Error::Success();
}

struct Bin {
  int64_t r0, r1, c0, c1;
};

// NV vectors of 16 channels from channel ch of one bin (Partial: one vector of the last
// `lanes` < 16 channels): the running max and its code stay in registers over the bin's
// cells, row-major.
template <int NV, bool Partial = false>
void bin_vectors(const Grid& src, const Bin& bin, int64_t c, int64_t ch, int64_t lanes, float* y,
                 int32_t* code) {
  auto get = [&](const float* p) { return Partial ? load_part<v16>(p, lanes) : load(p); };
  auto code_of = [&](int64_t q, int v) {
    if (!src.at) return vi16{} + int32_t(q);
    const int32_t* p = src.at + q * c + ch + 16 * v;
    if (Partial) return load_part<vi16>(p, lanes);
    vi16 r;
    std::memcpy(&r, p, sizeof r);
    return r;
  };
  v16 best[NV];
  vi16 at[NV], nan[NV];
  const int64_t first = bin.r0 * src.w + bin.c0;
  for (int v = 0; v < NV; ++v) {
    best[v] = get(src.v + first * c + ch + 16 * v);
    at[v] = code_of(first, v);
    nan[v] = best[v] != best[v];
  }
  for (int64_t r = bin.r0; r < bin.r1; ++r)
    for (int64_t col = (r == bin.r0 ? bin.c0 + 1 : bin.c0); col < bin.c1; ++col) {
      const int64_t q = r * src.w + col;
      for (int v = 0; v < NV; ++v) {
        v16 val = get(src.v + q * c + ch + 16 * v);
        vi16 gt = val > best[v];
        best[v] = gt ? val : best[v];
        at[v] = gt ? code_of(q, v) : at[v];
        nan[v] |= val != val;
      }
    }
  for (int v = 0; v < NV; ++v) {
    v16 out = nan[v] ? v16{} + std::numeric_limits<float>::quiet_NaN() : best[v];
    vi16 cell = nan[v] ? vi16{} - 1 : at[v];
    if (Partial) {
      store_part(y, out, lanes);
      store_part(code, cell, lanes);
    } else {
      store(y + 16 * v, out);
      std::memcpy(code + 16 * v, &cell, sizeof cell);
    }
  }
}

// One bin, every channel: 4 vectors at a time (a cell's loads are 256 contiguous bytes),
// then single vectors, then the last channels in part.
void bin_channels(const Grid& src, const Bin& bin, int64_t c, float* y, int32_t* code) {
  int64_t ch = 0;
  for (; ch + 64 <= c; ch += 64) bin_vectors<4>(src, bin, c, ch, 16, y + ch, code + ch);
  for (; ch + 16 <= c; ch += 16) bin_vectors<1>(src, bin, c, ch, 16, y + ch, code + ch);
  if (ch < c) bin_vectors<1, true>(src, bin, c, ch, c - ch, y + ch, code + ch);
}

// Every level of one sample, in computing order (derived levels after their sources).
void sample_pyramid(const Pyramid& g, const float* x, float* y, int32_t* code) {
  for (int64_t l = 0; l < g.levels; ++l) {
    const int64_t* s = g.steps + 6 * l;
    const int64_t out = s[0], src = s[1], sn = s[2], n = s[3], m = s[4];
    const int64_t* rows = g.edges + s[5];
    const int64_t* cols = rows + 2 * n;
    const Grid grid = src < 0 ? Grid{x, nullptr, g.w} : Grid{y + src * g.c, code + src * g.c, sn};
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const int64_t k = (out + i * m + j) * g.c;
        bin_channels(grid, {rows[2 * i], rows[2 * i + 1], cols[2 * j], cols[2 * j + 1]}, g.c,
                     y + k, code + k);
      }
  }
}

ffi::Error PyramidMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                      ffi::ResultBuffer<ffi::S32> code, ffi::Span<const int64_t> steps,
                      ffi::Span<const int64_t> edges) {
  Pyramid g;
  if (ffi::Error e = pyramid(g, x.dimensions(), y->dimensions(), steps, edges); e.failure())
    return e;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  int32_t* cp = code->typed_data();
  const int64_t map = g.h * g.w * g.c, per = g.d * g.c, n = num_chunks(pool, g.b);
  parallel_for(pool, n, [&](int64_t t) {
    for (int64_t b = g.b * t / n; b < g.b * (t + 1) / n; ++b)
      sample_pyramid(g, xp + b * map, yp + b * per, cp + b * per);
  });
  return ffi::Error::Success();
}

// Bins may share cells, so a sample's scatter stays on one thread: chunks of samples.
ffi::Error PyramidMaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::S32> code, ffi::ResultBuffer<ffi::F32> dx,
                          ffi::Span<const int64_t> steps, ffi::Span<const int64_t> edges) {
  Pyramid g;
  if (ffi::Error e = pyramid(g, dx->dimensions(), dy.dimensions(), steps, edges); e.failure())
    return e;
  const float* gp = dy.typed_data();
  const int32_t* cp = code.typed_data();
  float* out = dx->typed_data();
  const int64_t map = g.h * g.w * g.c, per = g.d * g.c, n = num_chunks(pool, g.b);
  parallel_for(pool, n, [&](int64_t t) {
    for (int64_t b = g.b * t / n; b < g.b * (t + 1) / n; ++b) {
      float* d = out + b * map;
      std::memset(d, 0, map * sizeof(float));
      const float* gb = gp + b * per;
      const int32_t* cb = cp + b * per;
      for (int64_t k = 0; k < g.d; ++k)
        for (int64_t ch = 0; ch < g.c; ++ch) {
          const int32_t at = cb[k * g.c + ch];
          if (at >= 0) d[at * g.c + ch] += gb[k * g.c + ch];
        }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Both handlers: (XLA's thread pool; the operand(s); the result(s); the levels and edges).
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppPyramidMax, PyramidMax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<ffi::Span<const int64_t>>("steps")
                                  .Attr<ffi::Span<const int64_t>>("edges"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppPyramidMaxGrad, PyramidMaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("steps")
                                  .Attr<ffi::Span<const int64_t>>("edges"));
