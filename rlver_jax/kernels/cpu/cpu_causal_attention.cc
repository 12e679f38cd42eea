// Causal attention of a block of tokens over its own keys (a prompt's prefill) on the CPU, as
// an XLA FFI custom call (cpu_causal_attention.py calls it; cpu_kernels.py builds this file):
//
//   q    [B, T, H, Dh] float32, query head h = j G + g of kv head j
//   k    [B, K, Dh, T] float32 (the cache layout: keys minor)
//   v    [B, K, T, Dh] float32
//   mask [B, T, T]     bool, mask[b, t, s]: query t may see key s; the caller promises that
//                      it is false for every s > t (causal)
//   out  [B, T, H, Dh] float32
//
//   scores[t, h, s] = sum_d q[t, h, d] k[j, d, s] / sqrt(Dh)       (keys s <= t only)
//   out[t, h, :]    = sum_s softmax_s(scores, masked)[t, h, s] v[j, s, :]
//
// (a query that sees no key gets zeros). Why a kernel: XLA:CPU runs the two products as
// batched GEMMs of small matrices between layout copies and separate softmax passes (a large
// share of a prefill, at a low arithmetic rate); and it computes every masked score above the
// diagonal unless the queries are split into blocks. Here a register tile of 6 query rows (one
// kv head's queries, token-major) computes its scores over keys [0, last token of the tile]
// only, its softmax and its value product while the scores sit in L1, and the pair's keys and
// values stay in L2. Work items are (row, kv head, run of tiles); each is computed by one
// thread in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rlver::kLanes;
using rlver::Load;
using rlver::SoftmaxRow;
using rlver::Store;
using rlver::Vec;

constexpr int kRows = 6;         // query rows of a register tile: 12 of AVX2's 16 registers
constexpr int64_t kCols = 16;    // keys (scores) or features (outputs) of a register tile
constexpr int64_t kTiles = 16;   // register tiles of a work item

struct Shape {
  int64_t B, T, H, K, G, Dh;
  int64_t Tp;  // T rounded up to kCols: the row stride of the transposed-key and score scratch
};

// out[r, c] = sum_k a[r a_stride + k] b[k b_stride + c] for R rows and kCols columns, k in
// [0, n) in order: both products' register tile (the scores: a = queries, b = transposed keys;
// the outputs: a = weights, b = values).
template <int R>
void RegisterTile(const float* a, int64_t a_stride, const float* b, int64_t b_stride, int64_t n,
                  float* out, int64_t out_stride) {
  Vec lo[R] = {}, hi[R] = {};
  for (int64_t k = 0; k < n; ++k) {
    Vec bl = Load(b + k * b_stride), bh = Load(b + k * b_stride + 8);
#if defined(__x86_64__)
    // Short tiles run faster with b in registers than as memory operands of every multiply-add
    // (as in cpu_matmul.cc's RowTile).
    if constexpr (R <= 4) __asm__("" : "+x"(bl), "+x"(bh));
#endif
    for (int r = 0; r < R; ++r) {
      const float w = a[r * a_stride + k];
      lo[r] += bl * w;
      hi[r] += bh * w;
    }
  }
  for (int r = 0; r < R; ++r) Store(out + r * out_stride, lo[r]), Store(out + r * out_stride + 8, hi[r]);
}

// One row of scores in place: `SoftmaxRow` over the keys s in [0, t], 0 at every s in (t, n);
// returns 1 / the sum, or 0 (and a row of zeros) when no key is visible.
inline float Softmax(float* row, const bool* mask, int64_t t, int64_t n) {
  const int64_t seen = t + 1;
  std::fill(row + seen, row + n, 0.0f);
  if (std::none_of(mask, mask + seen, [](bool m) { return m; })) {
    std::fill(row, row + seen, 0.0f);
    return 0.0f;
  }
  return SoftmaxRow(row, mask, seen, false);
}

struct Scratch {
  std::vector<float> kt, scores, qr, o;
  explicit Scratch(const Shape& s)
      : kt(s.Dh * s.Tp), scores(kRows * s.Tp), qr(kRows * s.Dh), o(kRows * s.Dh) {}
};

// Rows m in [m0, m0 + R) of kv head j's queries (m = t G + g: token t, query head j G + g).
template <int R>
void Tile(const float* q, const float* kt, const float* v, const bool* mask, int64_t j,
          int64_t m0, const Shape& s, Scratch& w, float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.Dh));
  int64_t t[R];
  const float* qrow[R];
  for (int r = 0; r < R; ++r) {
    t[r] = (m0 + r) / s.G;
    qrow[r] = q + (t[r] * s.H + j * s.G + (m0 + r) % s.G) * s.Dh;
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < s.Dh; ++d) w.qr[r * s.Dh + d] = qrow[r][d] * scale;
  const int64_t n = (t[R - 1] + 1 + kCols - 1) / kCols * kCols;  // keys [0, last token]
  float* scores = w.scores.data();
  for (int64_t k = 0; k < n; k += kCols)  // scores [R, n] = qr [R, Dh] kt [Dh, n]
    RegisterTile<R>(w.qr.data(), s.Dh, kt + k, s.Tp, s.Dh, scores + k, s.Tp);
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = Softmax(scores + r * s.Tp, mask + t[r] * s.T, t[r], n);
  for (int64_t c = 0; c < s.Dh; c += kCols)  // o [R, Dh] = weights [R, keys] v [keys, Dh]
    RegisterTile<R>(scores, s.Tp, v + c, s.Dh, std::min(n, s.T), w.o.data() + c, s.Dh);
  for (int r = 0; r < R; ++r) {
    float* dst = out + (qrow[r] - q);
    for (int64_t c = 0; c < s.Dh; c += kLanes) Store(dst + c, Load(w.o.data() + r * s.Dh + c) * inv[r]);
  }
}

// Work item (b, j, run i): tiles [i kTiles, (i + 1) kTiles) of kv head j's G T query rows.
void Item(const float* q, const float* k, const float* v, const bool* mask, int64_t item,
          const Shape& s, Scratch& w, float* out) {
  const int64_t M = s.T * s.G, runs = (M + kRows * kTiles - 1) / (kRows * kTiles);
  const int64_t pair = item / runs, run = item % runs, b = pair / s.K, j = pair % s.K;
  const int64_t m_begin = run * kRows * kTiles, m_end = std::min(M, m_begin + kRows * kTiles);
  // The keys the run's last query can see, transposed-layout copy with a zero tail to Tp
  // (Scores reads whole tiles of kCols keys).
  const int64_t last = (m_end - 1) / s.G + 1;
  const int64_t n = (last + kCols - 1) / kCols * kCols;
  const float* kp = k + pair * s.Dh * s.T;
  for (int64_t d = 0; d < s.Dh; ++d) {
    std::memcpy(w.kt.data() + d * s.Tp, kp + d * s.T, std::min(n, s.T) * sizeof(float));
    std::fill(w.kt.data() + d * s.Tp + std::min(n, s.T), w.kt.data() + d * s.Tp + n, 0.0f);
  }
  const float* qb = q + b * s.T * s.H * s.Dh;
  const float* vp = v + pair * s.T * s.Dh;
  const bool* mb = mask + b * s.T * s.T;
  float* ob = out + b * s.T * s.H * s.Dh;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
    switch (std::min<int64_t>(kRows, m_end - m0)) {
      case 1: Tile<1>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
      case 2: Tile<2>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
      case 3: Tile<3>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
      case 4: Tile<4>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
      case 5: Tile<5>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
      default: Tile<6>(qb, w.kt.data(), vp, mb, j, m0, s, w, ob); break;
    }
  }
}

ffi::Error CausalAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             md = mask.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3 || od.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ranks must be q 4, k 4, v 4, mask 3");
  const int64_t B = qd[0], T = qd[1], H = qd[2], Dh = qd[3], K = kd[1];
  const bool ok = K > 0 && H % K == 0 && Dh % kCols == 0 && kd[0] == B && kd[2] == Dh &&
                  kd[3] == T && vd[0] == B && vd[1] == K && vd[2] == T && vd[3] == Dh &&
                  md[0] == B && md[1] == T && md[2] == T && od[0] == B && od[1] == T &&
                  od[2] == H && od[3] == Dh;
  if (!ok)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "shapes must be q [B,T,H,Dh], k [B,K,Dh,T], v [B,K,T,Dh], mask [B,T,T], "
                      "with K dividing H and Dh a multiple of 16");
  const Shape s{B, T, H, K, H / K, Dh, (T + kCols - 1) / kCols * kCols};
  const int64_t runs = (T * s.G + kRows * kTiles - 1) / (kRows * kTiles);
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const bool* ms = mask.typed_data();
  float* os = out->typed_data();
  auto make_worker = [&] {
    return [&, w = Scratch(s)](int64_t item) mutable { Item(qs, ks, vs, ms, item, s, w, os); };
  };
  rlver::ParallelFor(B * K * runs, pool, make_worker);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverCausalAttentionF32, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
