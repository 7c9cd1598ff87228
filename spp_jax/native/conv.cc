// Convolutions of NHWC float32 maps with HWIO kernels at any stride, forward and kernel
// gradient, as XLA FFI handlers for the CPU (spp_jax/native/__init__.py builds and registers
// them; spp_jax/native/conv.py is their JAX side).
//
// Why: XLA's CPU convolutions (Eigen) were the embedded train step's bound, conv1's kernel
// gradient above all. These are register-tiled direct convolutions: a tile of P output
// cells x NV 16-float vectors of output channels stays in registers while the loop runs over
// the kernel taps and input channels (one broadcast input value times NV weight vectors per
// step), so no im2col copy is made. The kernel gradient is the same tile with the roles
// swapped (P input channels, or P neighbouring taps when there are few input channels, x NV
// output-channel vectors; the loop over output cells), each thread summing blocks of rows
// that stay in cache into its own copy.
//
// Contract (spp_jax/native/conv.py keeps it): x (B, H, W, Ci) already zero-padded, kernel
// (KH, KW, Ci, CO) with CO a multiple of 16, output / cotangent (B, OH, OW, COV) with
// OH = (H - KH) / s + 1 (floor), COV == CO or COV < 16 (then the kernel's last filters are
// zero and each cell's vector is loaded and stored in part). Work is split over XLA's
// intra-op thread pool (parallel.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

using namespace spp_native;  // NOLINT: v16, load(_part), store(_part), splat, parallel_for, num_chunks

// ---- forward: y[p, co..] = sum_{ky,kx,ci} x[s p + (ky,kx), ci] * w[ky,kx,ci,co..] ---------

struct Geometry {
  int64_t b, h, w, ci, kh, kw;
  int64_t co;   // the kernel's output channels, a multiple of 16
  int64_t cov;  // y's (dy's) channels: co, or fewer than 16 (the kernel's zero filters dropped)
  int64_t oh, ow, s;
};

// Partial: y holds cov < 16 channels, so the one vector is loaded (stored) in part.
template <bool Partial>
inline v16 load_y(const Geometry& g, const float* p) {
  return Partial ? load_part<v16>(p, g.cov) : load(p);
}

template <bool Partial>
inline void store_y(const Geometry& g, float* p, v16 v) {
  if (Partial)
    store_part(p, v, g.cov);
  else
    store(p, v);
}

// P output cells of one row (consecutive columns) x NV vectors of output channels at co.
template <int P, int NV, bool Partial>
inline void fwd_tile(const Geometry& g, const float* x, const float* k, float* y, int64_t co) {
  v16 acc[P][NV];
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = v16{};
  const int64_t step = g.s * g.ci;  // input floats between neighbouring output cells
  for (int64_t ky = 0; ky < g.kh; ++ky)
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const float* xp = x + (ky * g.w + kx) * g.ci;
      const float* kp = k + (ky * g.kw + kx) * g.ci * g.co + co;
      for (int64_t c = 0; c < g.ci; ++c) {
        v16 wv[NV];
        for (int j = 0; j < NV; ++j) wv[j] = load(kp + c * g.co + 16 * j);
        for (int i = 0; i < P; ++i) {
          v16 a = splat(xp[i * step + c]);
          for (int j = 0; j < NV; ++j) acc[i][j] += a * wv[j];
        }
      }
    }
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < NV; ++j) store_y<Partial>(g, y + i * g.cov + co + 16 * j, acc[i][j]);
}

// One output row, channels [co, co + 16 NV): tiles of P cells, then 4, 2, 1.
template <int P, int NV, bool Partial = false>
void fwd_row(const Geometry& g, const float* x, const float* k, float* y, int64_t co) {
  const int64_t step = g.s * g.ci;
  int64_t o = 0;
  for (; o + P <= g.ow; o += P) fwd_tile<P, NV, Partial>(g, x + o * step, k, y + o * g.cov, co);
  for (; o + 4 <= g.ow; o += 4) fwd_tile<4, NV, Partial>(g, x + o * step, k, y + o * g.cov, co);
  for (; o + 2 <= g.ow; o += 2) fwd_tile<2, NV, Partial>(g, x + o * step, k, y + o * g.cov, co);
  for (; o < g.ow; ++o) fwd_tile<1, NV, Partial>(g, x + o * step, k, y + o * g.cov, co);
}

void fwd_rows(const Geometry& g, const float* x, const float* k, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + ((r / g.oh) * g.h + (r % g.oh) * g.s) * g.w * g.ci;
    float* yr = y + r * g.ow * g.cov;
    if (g.cov < 16) {
      fwd_row<12, 1, true>(g, xr, k, yr, 0);
      continue;
    }
    int64_t co = 0;
    for (; co + 64 <= g.co; co += 64) fwd_row<6, 4>(g, xr, k, yr, co);
    for (; co + 32 <= g.co; co += 32) fwd_row<12, 2>(g, xr, k, yr, co);
    for (; co + 16 <= g.co; co += 16) fwd_row<12, 1>(g, xr, k, yr, co);
  }
}

// Below this many input channels the kernel gradient tiles taps, not channels.
constexpr int64_t kFewChannels = 6;

// ---- kernel gradient: dw[ky,kx,ci..,co..] = sum_p x[s p + (ky,kx), ci..] * dy[p, co..] ----

// P rows of dw x NV output-channel vectors at co, summed over output rows [r0, r1) and
// added to out: row i is input value x0[i * x_step] of each window (x0: tap (ky, kx), channel
// c of the window at output cell 0) and dw row out + i * out_step. Channel tiles (P channels
// of one tap): x_step 1, out_step CO; tap tiles (P neighbouring taps of one channel, for few
// input channels): x_step Ci, out_step Ci CO.
template <int P, int NV, bool Partial>
inline void dw_tile(const Geometry& g, const float* x0, int64_t x_step, const float* dy,
                    float* out, int64_t out_step, int64_t co, int64_t r0, int64_t r1) {
  v16 acc[P][NV];
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load(out + i * out_step + 16 * j);
  const int64_t step = g.s * g.ci;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x0 + ((r / g.oh) * g.h + (r % g.oh) * g.s) * g.w * g.ci;
    const float* dr = dy + r * g.ow * g.cov + co;
    for (int64_t o = 0; o < g.ow; ++o) {
      v16 d[NV];
      for (int j = 0; j < NV; ++j) d[j] = load_y<Partial>(g, dr + o * g.cov + 16 * j);
      for (int i = 0; i < P; ++i) {
        v16 a = splat(xr[o * step + i * x_step]);
        for (int j = 0; j < NV; ++j) acc[i][j] += a * d[j];
      }
    }
  }
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < NV; ++j) store(out + i * out_step + 16 * j, acc[i][j]);
}

// The dw tile of P rows from channel c of tap (ky, kx) on (x_step, out_step as dw_tile).
template <int P, int NV, bool Partial>
inline void dw_tile_at(const Geometry& g, const float* x, const float* dy, float* dw, int64_t ky,
                       int64_t kx, int64_t c, int64_t x_step, int64_t out_step, int64_t co,
                       int64_t r0, int64_t r1) {
  dw_tile<P, NV, Partial>(g, x + (ky * g.w + kx) * g.ci + c, x_step, dy,
                          dw + ((ky * g.kw + kx) * g.ci + c) * g.co + co, out_step, co, r0, r1);
}

// Tap (ky, kx): tiles of P input channels, then 4, 2, 1.
template <int P, int NV, bool Partial = false>
void dw_channels(const Geometry& g, const float* x, const float* dy, float* dw, int64_t ky,
                 int64_t kx, int64_t co, int64_t r0, int64_t r1) {
  auto at = [&](auto tile, int64_t c) { tile(g, x, dy, dw, ky, kx, c, 1, g.co, co, r0, r1); };
  int64_t c = 0;
  for (; c + P <= g.ci; c += P) at(dw_tile_at<P, NV, Partial>, c);
  for (; c + 4 <= g.ci; c += 4) at(dw_tile_at<4, NV, Partial>, c);
  for (; c + 2 <= g.ci; c += 2) at(dw_tile_at<2, NV, Partial>, c);
  for (; c < g.ci; ++c) at(dw_tile_at<1, NV, Partial>, c);
}

// Few input channels (conv1: 1 or 3, 7 taps a row): row ky of each channel in tiles of T
// neighbouring taps, then 4, 2, 1.
template <int T, int NV, bool Partial = false>
void dw_taps(const Geometry& g, const float* x, const float* dy, float* dw, int64_t ky,
             int64_t co, int64_t r0, int64_t r1) {
  for (int64_t c = 0; c < g.ci; ++c) {
    auto at = [&](auto tile, int64_t kx) {
      tile(g, x, dy, dw, ky, kx, c, g.ci, g.ci * g.co, co, r0, r1);
    };
    int64_t kx = 0;
    for (; kx + T <= g.kw; kx += T) at(dw_tile_at<T, NV, Partial>, kx);
    for (; kx + 4 <= g.kw; kx += 4) at(dw_tile_at<4, NV, Partial>, kx);
    for (; kx + 2 <= g.kw; kx += 2) at(dw_tile_at<2, NV, Partial>, kx);
    for (; kx < g.kw; ++kx) at(dw_tile_at<1, NV, Partial>, kx);
  }
}

// dw rows ky, output channels [c0, c1), for few input channels (dw_taps).
void dw_few_channels(const Geometry& g, const float* x, const float* dy, float* dw, int64_t ky,
                     int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
  if (g.cov < 16) return dw_taps<8, 1, true>(g, x, dy, dw, ky, 0, r0, r1);
  int64_t co = c0;
  for (; co + 64 <= c1; co += 64) dw_taps<6, 4>(g, x, dy, dw, ky, co, r0, r1);
  for (; co + 32 <= c1; co += 32) dw_taps<8, 2>(g, x, dy, dw, ky, co, r0, r1);
  for (; co + 16 <= c1; co += 16) dw_taps<8, 1>(g, x, dy, dw, ky, co, r0, r1);
}

// dw tap (ky, kx), output channels [c0, c1).
void dw_tap(const Geometry& g, const float* x, const float* dy, float* dw, int64_t ky, int64_t kx,
            int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
  if (g.cov < 16) return dw_channels<12, 1, true>(g, x, dy, dw, ky, kx, 0, r0, r1);
  int64_t co = c0;
  for (; co + 64 <= c1; co += 64) dw_channels<6, 4>(g, x, dy, dw, ky, kx, co, r0, r1);
  for (; co + 32 <= c1; co += 32) dw_channels<12, 2>(g, x, dy, dw, ky, kx, co, r0, r1);
  for (; co + 16 <= c1; co += 16) dw_channels<12, 1>(g, x, dy, dw, ky, kx, co, r0, r1);
}

// A part of dw: taps [t0, t1) (t = ky KW + kx; with few input channels t = ky, all of its
// row), output channels [c0, c1), summed over output rows [r0, r1) in blocks whose dy stays
// in L2.
struct DwPart {
  int64_t r0, r1, t0, t1, c0, c1;
};

void dw_part(const Geometry& g, const float* x, const float* dy, float* dw, const DwPart& p) {
  const int64_t block = std::max<int64_t>(1, (128 * 1024) / (4 * g.ow * g.cov));
  for (int64_t b0 = p.r0; b0 < p.r1; b0 += block) {
    int64_t b1 = std::min(p.r1, b0 + block);
    for (int64_t t = p.t0; t < p.t1; ++t) {
      if (g.ci < kFewChannels) dw_few_channels(g, x, dy, dw, t, p.c0, p.c1, b0, b1);
      else dw_tap(g, x, dy, dw, t / g.kw, t % g.kw, p.c0, p.c1, b0, b1);
    }
  }
}

int64_t dw_taps_count(const Geometry& g) { return g.ci < kFewChannels ? g.kh : g.kh * g.kw; }

// x (B, H, W, Ci), a (KH, KW, Ci, CO) kernel (or its gradient), the (B, OH, OW, COV) output
// (or its cotangent) at stride s.
ffi::Error geometry(Geometry& g, ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kd,
                    ffi::Span<const int64_t> yd, int64_t s) {
  g = Geometry{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], yd[3], yd[1], yd[2], s};
  bool ok = g.co % 16 == 0 && (g.cov == g.co || g.cov < 16) && g.cov <= g.co && s >= 1 &&
            g.oh >= 1 && g.ow >= 1 && kd[2] == g.ci && yd[0] == g.b &&
            (g.oh - 1) * s + g.kh <= g.h && (g.ow - 1) * s + g.kw <= g.w;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "spp_jax conv: inconsistent shapes (kernel outputs must be a multiple of 16, and the "
        "output's channels equal to them or fewer than 16)");
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride) {
  Geometry g;
  if (ffi::Error e = geometry(g, x.dimensions(), k.dimensions(), y->dimensions(), stride);
      e.failure())
    return e;
  const float *xp = x.typed_data(), *kp = k.typed_data();
  float* yp = y->typed_data();
  int64_t rows = g.b * g.oh, n = num_chunks(pool, rows);
  parallel_for(pool, n, [&](int64_t i) {
    fwd_rows(g, xp, kp, yp, rows * i / n, rows * (i + 1) / n);
  });
  return ffi::Error::Success();
}

// Floats of dw copies one call may hold, for the row split below.
constexpr int64_t kMaxCopies = 4 << 20;

// dw from x and dy, deterministically (the same sums in the same order on any schedule):
// small kernels split the output rows into chunks, each summing into its own copy of dw,
// the copies then added in chunk order; large ones split dw into (tap, 64 output channels)
// parts, each computed whole by one chunk.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride) {
  Geometry g;
  if (ffi::Error e = geometry(g, x.dimensions(), dw->dimensions(), dy.dimensions(), stride);
      e.failure())
    return e;
  const int64_t size = g.kh * g.kw * g.ci * g.co, rows = g.b * g.oh, n = num_chunks(pool, rows);
  const int64_t taps = dw_taps_count(g);
  const float *xp = x.typed_data(), *dp = dy.typed_data();
  float* out = dw->typed_data();
  if (size * n <= kMaxCopies) {
    std::vector<float> parts(size * n, 0.0f);
    parallel_for(pool, n, [&](int64_t i) {
      dw_part(g, xp, dp, parts.data() + i * size,
              {rows * i / n, rows * (i + 1) / n, 0, taps, 0, g.co});
    });
    std::memcpy(out, parts.data(), size * sizeof(float));
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < size; ++j) out[j] += parts[i * size + j];
    return ffi::Error::Success();
  }
  std::memset(out, 0, size * sizeof(float));
  const int64_t groups = (g.co + 63) / 64;
  parallel_for(pool, taps * groups, [&](int64_t i) {
    int64_t t = i / groups, c0 = (i % groups) * 64;
    dw_part(g, xp, dp, out, {0, rows, t, t + 1, c0, std::min(g.co, c0 + 64)});
  });
  return ffi::Error::Success();
}

}  // namespace

// Both handlers: (XLA's thread pool; x, the second operand; the result; the stride).
#define SPP_CONV_BINDING                        \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Arg<ffi::Buffer<ffi::F32>>()             \
      .Ret<ffi::Buffer<ffi::F32>>()             \
      .Attr<int64_t>("stride")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppConvForward, ConvForward, SPP_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SppConvKernelGrad, ConvKernelGrad, SPP_CONV_BINDING);
