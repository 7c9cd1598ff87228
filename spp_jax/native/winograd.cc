// The tile transforms of Winograd's F(2x2, 3x3) convolution of NHWC float32 maps, and their
// adjoints, as XLA FFI handlers for the CPU (spp_jax/native/winograd.py is the JAX side: it
// multiplies the transformed tiles by the transformed kernel with XLA's dots).
//
// Why native: written as XLA ops, the transforms (sixteen strided slices, their sums, a
// stack, the output's interleave) cost as much as the matrix products they feed (2026-12-07:
// ~100 ms beside the dots' 113 ms for a 512 -> 512 layer at 18x18, batch 32); here each is one
// pass over its operand.
//
// Contract (Lavin & Gray's F(2x2, 3x3)): the output is cut into 2x2 tiles, th x tw per image,
// tile t = (b * th + ty) * tw + tx; tile t reads the 4x4 window of the padded input whose top
// left corner is (2 ty - top, 2 tx - left) in x's coordinates (zero outside x).
//   input:        x (B, H, W, C)  -> V (16, T, C),  V[4a + b][t] = (B^T d B)[a][b], d the window
//   input_grad:   dV (16, T, C)   -> dx (B, H, W, C), the adjoint: each tile's B dV B^T added
//                                    into its window (the part inside x)
//   output:       M (16, T, F)    -> y (B, OH, OW, F), y's 2x2 tile = A^T M A (the part inside y)
//   output_grad:  dy (B, OH, OW, F) -> dM (16, T, F), the adjoint: A dy A^T (zero outside y)
// with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], A^T = [1 1 1 0; 0 1 -1 -1]. Attributes
// top, left (padding) for the input pair; th, tw for all. T = B * th * tw.
//
// Work is split over units that never write the same cell (each_tile_row, each_channel_block),
// and the input adjoint's overlapping sums run in tile order within one unit: the results do
// not depend on the schedule (deterministic).
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace {

using namespace spp_native;  // NOLINT: v16, load(_part), store(_part), parallel_for, num_chunks

constexpr int64_t kBlock = 64;  // channels per unit of the input's adjoint

struct Tiles {
  int64_t b, h, w, c;  // the map side: x / dx (b, h, w, c), or y / dy (b, oh, ow, f)
  int64_t th, tw, top, left;
  int64_t t() const { return b * th * tw; }
};

ffi::Error tiles(Tiles& g, ffi::Span<const int64_t> map, ffi::Span<const int64_t> tiled,
                 int64_t th, int64_t tw, int64_t top, int64_t left) {
  if (map.size() != 4 || tiled.size() != 3)
    return ffi::Error::InvalidArgument(
        "spp_jax winograd: map must be (B, H, W, C), tiles (16, T, C)");
  g = {map[0], map[1], map[2], map[3], th, tw, top, left};
  // Cells outside the map read as zero and are never written, so any tiling is memory-safe.
  if (tiled[0] != 16 || tiled[1] != g.t() || tiled[2] != g.c || th < 1 || tw < 1 || top < 0 ||
      left < 0)
    return ffi::Error::InvalidArgument("spp_jax winograd: tiles do not match the map");
  return ffi::Error::Success();
}

// One 16-channel vector (or its first `lanes`) of map cell (r, c), zero outside the map.
struct Cells {
  const Tiles& g;
  int64_t lanes;
  v16 get(const float* m, int64_t r, int64_t c) const {
    if (r < 0 || r >= g.h || c < 0 || c >= g.w) return v16{};
    const float* p = m + (r * g.w + c) * g.c;
    return lanes == 16 ? load(p) : load_part<v16>(p, lanes);
  }
  void put(float* m, int64_t r, int64_t c, v16 v) const {
    float* p = m + (r * g.w + c) * g.c;
    lanes == 16 ? store(p, v) : store_part(p, v, lanes);
  }
  v16 tile(const float* v, int64_t p, int64_t t) const {
    const float* q = v + (p * g.t() + t) * g.c;
    return lanes == 16 ? load(q) : load_part<v16>(q, lanes);
  }
  void set_tile(float* v, int64_t p, int64_t t, v16 x) const {
    float* q = v + (p * g.t() + t) * g.c;
    lanes == 16 ? store(q, x) : store_part(q, x, lanes);
  }
};

// B^T applied to a 4-vector (in place), and B applied.
inline void bt4(v16* d, int64_t s) {
  const v16 d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
  d[0] = d0 - d2, d[s] = d1 + d2, d[2 * s] = d2 - d1, d[3 * s] = d1 - d3;
}
inline void b4(v16* v, int64_t s) {
  const v16 v0 = v[0], v1 = v[s], v2 = v[2 * s], v3 = v[3 * s];
  v[0] = v0, v[s] = v1 - v2 + v3, v[2 * s] = v1 + v2 - v0, v[3 * s] = -v3;
}

// Work units. Tile rows (sample, ty), each over all its tiles and channels: what the forward
// transforms and the output's adjoint take (no two units write the same cell; a cell's
// channels are contiguous). Channel blocks (sample, kBlock channels), each over all tiles:
// what the input's adjoint takes, whose windows overlap (one unit adds a cell's sums, in tile
// order) and which must still split a single large image.
template <typename F>
void each_tile_row(ffi::ThreadPool& pool, const Tiles& g, F f) {
  const int64_t units = g.b * g.th, n = num_chunks(pool, units);
  parallel_for(pool, n, [&](int64_t k) {
    for (int64_t u = units * k / n; u < units * (k + 1) / n; ++u) f(u / g.th, u % g.th);
  });
}

// f(cells, sample, ty, tx, first channel) for every tile and 16-lane channel vector, by tile
// rows (each_tile_row).
template <typename F>
void each_tile_vector(ffi::ThreadPool& pool, const Tiles& g, F f) {
  each_tile_row(pool, g, [&](int64_t s, int64_t ty) {
    for (int64_t tx = 0; tx < g.tw; ++tx)
      for (int64_t c = 0; c < g.c; c += 16)
        f(Cells{g, std::min<int64_t>(16, g.c - c)}, s, ty, tx, c);
  });
}

template <typename F>
void each_channel_block(ffi::ThreadPool& pool, const Tiles& g, F f) {
  const int64_t blocks = (g.c + kBlock - 1) / kBlock, units = g.b * blocks;
  const int64_t n = num_chunks(pool, units);
  parallel_for(pool, n, [&](int64_t k) {
    for (int64_t u = units * k / n; u < units * (k + 1) / n; ++u) {
      const int64_t c0 = (u % blocks) * kBlock;
      f(u / blocks, c0, std::min(c0 + kBlock, g.c));
    }
  });
}

ffi::Error Input(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> v,
                 int64_t th, int64_t tw, int64_t top, int64_t left) {
  Tiles g;
  if (ffi::Error e = tiles(g, x.dimensions(), v->dimensions(), th, tw, top, left); e.failure())
    return e;
  const float* xp = x.typed_data();
  float* vp = v->typed_data();
  each_tile_vector(pool, g, [&](const Cells& at, int64_t s, int64_t ty, int64_t tx, int64_t c) {
    const float* m = xp + s * g.h * g.w * g.c + c;
    v16 d[16];
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < 4; ++j)
        d[4 * i + j] = at.get(m, 2 * ty - top + i, 2 * tx - left + j);
    for (int64_t j = 0; j < 4; ++j) bt4(d + j, 4);      // rows: B^T d
    for (int64_t i = 0; i < 4; ++i) bt4(d + 4 * i, 1);  // columns: (B^T d) B
    const int64_t t = (s * th + ty) * tw + tx;
    for (int64_t p = 0; p < 16; ++p) at.set_tile(vp + c, p, t, d[p]);
  });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dx,
                     int64_t th, int64_t tw, int64_t top, int64_t left) {
  Tiles g;
  if (ffi::Error e = tiles(g, dx->dimensions(), dv.dimensions(), th, tw, top, left); e.failure())
    return e;
  const float* vp = dv.typed_data();
  float* xp = dx->typed_data();
  each_channel_block(pool, g, [&](int64_t s, int64_t c0, int64_t c1) {
    float* m0 = xp + s * g.h * g.w * g.c;
    for (int64_t q = 0; q < g.h * g.w; ++q)
      std::memset(m0 + q * g.c + c0, 0, (c1 - c0) * sizeof(float));
    for (int64_t ty = 0; ty < th; ++ty)
      for (int64_t tx = 0; tx < tw; ++tx)
        for (int64_t c = c0; c < c1; c += 16) {
          const Cells at{g, std::min<int64_t>(16, c1 - c)};
          float* m = m0 + c;
          const int64_t t = (s * th + ty) * tw + tx;
          v16 d[16];
          for (int64_t p = 0; p < 16; ++p) d[p] = at.tile(vp + c, p, t);
          for (int64_t j = 0; j < 4; ++j) b4(d + j, 4);
          for (int64_t i = 0; i < 4; ++i) b4(d + 4 * i, 1);
          for (int64_t i = 0; i < 4; ++i)
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t r = 2 * ty - top + i, cc = 2 * tx - left + j;
              if (r >= 0 && r < g.h && cc >= 0 && cc < g.w)
                at.put(m, r, cc, at.get(m, r, cc) + d[4 * i + j]);
            }
        }
  });
  return ffi::Error::Success();
}

ffi::Error Output(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> mm, ffi::ResultBuffer<ffi::F32> y,
                  int64_t th, int64_t tw) {
  Tiles g;
  if (ffi::Error e = tiles(g, y->dimensions(), mm.dimensions(), th, tw, 0, 0); e.failure())
    return e;
  const float* mp = mm.typed_data();
  float* yp = y->typed_data();
  each_tile_vector(pool, g, [&](const Cells& at, int64_t s, int64_t ty, int64_t tx, int64_t c) {
    float* m = yp + s * g.h * g.w * g.c + c;
    const int64_t t = (s * th + ty) * tw + tx;
    v16 d[16], r[8];
    for (int64_t p = 0; p < 16; ++p) d[p] = at.tile(mp + c, p, t);
    for (int64_t j = 0; j < 4; ++j)  // rows: A^T M
      r[j] = d[j] + d[4 + j] + d[8 + j], r[4 + j] = d[4 + j] - d[8 + j] - d[12 + j];
    for (int64_t i = 0; i < 2 && 2 * ty + i < g.h; ++i) {  // columns: (A^T M) A
      const v16* a = r + 4 * i;
      at.put(m, 2 * ty + i, 2 * tx, a[0] + a[1] + a[2]);
      if (2 * tx + 1 < g.w) at.put(m, 2 * ty + i, 2 * tx + 1, a[1] - a[2] - a[3]);
    }
  });
  return ffi::Error::Success();
}

ffi::Error OutputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dm, int64_t th, int64_t tw) {
  Tiles g;
  if (ffi::Error e = tiles(g, dy.dimensions(), dm->dimensions(), th, tw, 0, 0); e.failure())
    return e;
  const float* yp = dy.typed_data();
  float* mp = dm->typed_data();
  each_tile_vector(pool, g, [&](const Cells& at, int64_t s, int64_t ty, int64_t tx, int64_t c) {
    const float* m = yp + s * g.h * g.w * g.c + c;
    v16 u[4], r[8];  // u: the 2x2 cotangent tile; r = A u (4 x 2); then (A u) A^T
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 2; ++j) u[2 * i + j] = at.get(m, 2 * ty + i, 2 * tx + j);
    for (int64_t j = 0; j < 2; ++j)
      r[j] = u[j], r[2 + j] = u[j] + u[2 + j], r[4 + j] = u[j] - u[2 + j], r[6 + j] = -u[2 + j];
    const int64_t t = (s * th + ty) * tw + tx;
    for (int64_t i = 0; i < 4; ++i) {
      const v16 a = r[2 * i], b = r[2 * i + 1];
      at.set_tile(mp + c, 4 * i, t, a);
      at.set_tile(mp + c, 4 * i + 1, t, a + b);
      at.set_tile(mp + c, 4 * i + 2, t, a - b);
      at.set_tile(mp + c, 4 * i + 3, t, -b);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Handlers: (XLA's thread pool; the operand; the result; the tiling, and for the input's pair
// its padding).
#define SPP_WINOGRAD_BINDING                    \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<int64_t>("th")                      \
      .Attr<int64_t>("tw")
#define SPP_WINOGRAD_PADDED_BINDING SPP_WINOGRAD_BINDING.Attr<int64_t>("top").Attr<int64_t>("left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppWinogradInput, Input, SPP_WINOGRAD_PADDED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppWinogradInputGrad, InputGrad, SPP_WINOGRAD_PADDED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppWinogradOutput, Output, SPP_WINOGRAD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppWinogradOutputGrad, OutputGrad, SPP_WINOGRAD_BINDING);
