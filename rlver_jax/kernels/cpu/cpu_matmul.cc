// The CPU decode step's projections as an XLA FFI custom call (see cpu_matmul.py, which packs
// the weights and calls it; cpu_kernels.py builds this file):
//
//   wp  [F/16, D, 16] float32 or bfloat16: W [F, D] packed, wp[t, d, c] = W[16 t + c, d]
//   x   [D, B]        float32, the feature-major hidden state of the B rows
//   out [F, B]        float32, out[f, b] = sum_d W[f, d] x[d, b]   (accumulated in float32)
//
// Why a kernel: at decode time a projection multiplies a few rows by a whole matrix, so it
// should cost one pass over the weights. XLA:CPU's GEMM packs its weight operand on every call
// and overlaps neither that nor the arithmetic with streaming (so it runs well below the
// machine's matmul rate), and for bfloat16 weights it computes on float32 copies that its
// loop-invariant code motion hoists out of the decode loop, so it streams twice the bf16 bytes.
// Here the weights are packed once per params into 16-column tiles that each thread streams in
// order; every tile is multiplied into all B rows while it sits in L1/L2 (bf16 widened in
// registers), with up to 6 rows x 16 columns of float32 accumulators. Each output tile is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rlver::Load;
using rlver::Store;
using rlver::Vec;

constexpr int64_t kCols = 16;  // columns of a packed tile
constexpr int kMaxRows = 6;    // rows of a register tile: 12 of AVX2's 16 registers

// Cache lines [first, first + count) of the weight stream, to be prefetched one per d step of a
// register tile's pass (see Tile).
struct Lines {
  uintptr_t first;
  int64_t count;
};

// Rows r of one register tile times columns of the packed tile w [D, 16] over d in [d0, d1):
// acc [R, 16] += sum_d x[d, r] w[d, :] (starting from zero when `first`), with x packed for the
// register tile as xr [D, R]; prefetches `ahead` into L2 on the way.
template <int R, typename T>
void RowTile(const T* w, const float* xr, int64_t d0, int64_t d1, float* acc, bool first,
             Lines ahead) {
  Vec lo[R] = {}, hi[R] = {};
  if (!first)
    for (int r = 0; r < R; ++r) lo[r] = Load(acc + r * kCols), hi[r] = Load(acc + r * kCols + 8);
  for (int64_t d = d0; d < d1; ++d) {
    if (d - d0 < ahead.count)
      __builtin_prefetch(reinterpret_cast<const void*>(ahead.first + 64 * (d - d0)), 0, 2);
    Vec wl = Load(w + d * kCols), wh = Load(w + d * kCols + 8);
    // On Zen 3, from L1: with the weights as memory operands of every multiply-add, as GCC
    // emits them, short tiles (R = 3, 4) run much slower than tall ones (R = 5, 6); with the
    // weights held in registers (this empty asm forces it) the short tiles run faster.
#if defined(__x86_64__)
    if constexpr (R <= 4) __asm__("" : "+x"(wl), "+x"(wh));
#endif
    const float* xd = xr + d * R;
    for (int r = 0; r < R; ++r) {
      lo[r] += wl * xd[r];
      hi[r] += wh * xd[r];
    }
  }
  for (int r = 0; r < R; ++r) Store(acc + r * kCols, lo[r]), Store(acc + r * kCols + 8, hi[r]);
}

// One row (batch 1): the weights stream at memory speed if independent accumulator chains hide
// the multiply-add latency; they are summed in a fixed order at the end. bfloat16 weights are
// also prefetched 8 KB ahead (one line per pair of rows): widening them leaves the hardware
// prefetcher behind; float32 ones stream faster without.
template <typename T>
void SingleRow(const T* w, const float* x, int64_t D, float* out) {
  Vec lo[2] = {}, hi[2] = {};
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    if constexpr (sizeof(T) == 2) __builtin_prefetch(w + (d + 256) * kCols);
    for (int u = 0; u < 2; ++u) {
      lo[u] += Load(w + (d + u) * kCols) * x[d + u];
      hi[u] += Load(w + (d + u) * kCols + 8) * x[d + u];
    }
  }
  for (; d < D; ++d) {
    lo[0] += Load(w + d * kCols) * x[d];
    hi[0] += Load(w + d * kCols + 8) * x[d];
  }
  const Vec l = lo[0] + lo[1], h = hi[0] + hi[1];
  for (int c = 0; c < 8; ++c) out[c] = l[c], out[c + 8] = h[c];
}

// The B rows as register tiles of near-equal height, ceil(B / 6) of them (batch 8: 4 + 4,
// batch 32: 5 5 5 5 6 6) rather than 6s and a short remainder, which runs at a fraction of the
// arithmetic rate while streaming the weight tile from cache as often as a full one.
struct RowSplit {
  int64_t B, count;
  explicit RowSplit(int64_t rows) : B(rows), count((rows + kMaxRows - 1) / kMaxRows) {}
  int64_t Height(int64_t i) const { return B / count + (i >= count - B % count ? 1 : 0); }
  int64_t Start(int64_t i) const {
    const int64_t tall = std::max<int64_t>(0, i - (count - B % count));
    return i * (B / count) + tall;
  }
};

// x [D, B] -> per register tile i, xr_i [D, Height(i)] at xp + Start(i) D: the rows a register
// tile broadcasts are then adjacent, so a pass over d touches D * Height(i) floats of x, not
// D cache lines.
void PackRows(const float* x, int64_t D, const RowSplit& rows, float* xp) {
  for (int64_t i = 0; i < rows.count; ++i) {
    const int64_t h = rows.Height(i), b0 = rows.Start(i);
    float* xr = xp + b0 * D;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < h; ++r) xr[d * h + r] = x[d * rows.B + b0 + r];
  }
}

// One packed tile w [D, 16] times all rows, into out [16, B] (row stride B). The weights are
// taken in blocks of d that fit L1 (8 KB) so that every register tile after the first reads the
// block from L1; acc [B, 16] holds the partial sums between blocks (each sum still runs over d
// in order). The register tiles of a block share out the prefetching of the next 8 KB of the
// stream (the next block, or the next tile's first one: a thread's tiles are adjacent), so
// memory keeps streaming while a block is re-read from L1; left to the hardware prefetcher, a
// block's first pass waits on memory and the others leave it idle.
template <typename T>
void Tile(const T* w, const float* x, const float* xp, const RowSplit& rows, int64_t D,
          float* acc, float* out) {
  if (rows.B == 1) return SingleRow(w, x, D, out);
  constexpr int64_t kBlock = (8 << 10) / (kCols * sizeof(T));
  constexpr int64_t kBlockLines = kBlock * kCols * sizeof(T) / 64;
  for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const int64_t d1 = std::min(D, d0 + kBlock);
    const uintptr_t next = reinterpret_cast<uintptr_t>(w) + d1 * kCols * sizeof(T);
    for (int64_t i = 0; i < rows.count; ++i) {
      const int64_t b0 = rows.Start(i);
      const float* xr = xp + b0 * D;
      float* a = acc + b0 * kCols;
      const bool first = d0 == 0;
      const int64_t l0 = kBlockLines * i / rows.count, l1 = kBlockLines * (i + 1) / rows.count;
      const Lines ahead{next + 64 * l0, l1 - l0};
      switch (rows.Height(i)) {
        case 1: RowTile<1>(w, xr, d0, d1, a, first, ahead); break;
        case 2: RowTile<2>(w, xr, d0, d1, a, first, ahead); break;
        case 3: RowTile<3>(w, xr, d0, d1, a, first, ahead); break;
        case 4: RowTile<4>(w, xr, d0, d1, a, first, ahead); break;
        case 5: RowTile<5>(w, xr, d0, d1, a, first, ahead); break;
        default: RowTile<6>(w, xr, d0, d1, a, first, ahead); break;
      }
    }
  }
  for (int64_t b = 0; b < rows.B; ++b)
    for (int64_t c = 0; c < kCols; ++c) out[c * rows.B + b] = acc[b * kCols + c];
}

template <ffi::DataType W>
ffi::Error PackedMatmul(ffi::Buffer<W> wp, ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  const auto wd = wp.dimensions(), xd = x.dimensions(), od = out->dimensions();
  if (wd.size() != 3 || xd.size() != 2 || od.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ranks must be wp 3, x 2, out 2");
  const int64_t tiles = wd[0], D = wd[1], B = xd[1];
  if (wd[2] != kCols || xd[0] != D || od[0] != tiles * kCols || od[1] != B)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "shapes must be wp [F/16, D, 16], x [D, B], out [F, B]");
  using T = ffi::NativeType<W>;
  const T* w = wp.typed_data();
  const float* xs = x.typed_data();
  float* o = out->typed_data();
  // A few chunks per thread: enough to even out, each a long contiguous run of the weights.
  const int64_t chunk = std::max<int64_t>(1, tiles / (16 * std::max<int64_t>(1, pool.num_threads())));
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  const RowSplit rows(B);
  std::vector<float> xp(B > 1 ? B * D : 0);
  if (B > 1) PackRows(xs, D, rows, xp.data());
  auto make_worker = [&] {
    return [&, acc = std::vector<float>(B * kCols)](int64_t i) mutable {
      for (int64_t t = i * chunk, end = std::min(tiles, t + chunk); t < end; ++t)
        Tile(w + t * D * kCols, xs, xp.data(), rows, D, acc.data(), o + t * kCols * B);
    };
  };
  rlver::ParallelFor(chunks, pool, make_worker);
  return ffi::Error::Success();
}

}  // namespace

#define RLVER_BIND_MATMUL(W)          \
  ffi::Ffi::Bind()                    \
      .Arg<ffi::Buffer<W>>()          \
      .Arg<ffi::Buffer<ffi::F32>>()   \
      .Ret<ffi::Buffer<ffi::F32>>()   \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverPackedMatmulF32, PackedMatmul<ffi::F32>,
                              RLVER_BIND_MATMUL(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverPackedMatmulBF16, PackedMatmul<ffi::BF16>,
                              RLVER_BIND_MATMUL(ffi::BF16));
