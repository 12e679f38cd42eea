// One-query attention over a KV cache on the CPU, as an XLA FFI custom call (see
// cpu_attention.py, which calls it; cpu_kernels.py builds this file). Layouts are `KVCache`'s:
//
//   q    [B, K, G, Dh] float32, already scaled by 1/sqrt(Dh); query head h = j G + g
//   k    [B, K, Dh, S] float32 or bfloat16 (or bf16 held as uint16 bits: kv_cache.as_bits)
//   v    [B, K, S, Dh] same dtype as k
//   mask [B, S]        bool, the slots a row may attend to
//   out  [B, K, G, Dh] float32
//
//   scores[g, s] = sum_d q[g, d] k[d, s]          (masked slots: MASK_VALUE, as in XLA's path)
//   out[g, d]    = sum_s softmax_s(scores)[g, s] v[s, d]
//
// Why a kernel: XLA:CPU runs this as several loops that each stream the cache (scores, the
// softmax's reductions, the output) and barely use a second core. Here each (row, kv head) pair
// reads its k and v blocks once, only between its first and last unmasked slot (a decode step
// leaves the cache's tail unwritten and a left-padded row its head), with the G queries of the
// group sharing each read (up to 3 queries' accumulators in registers), and prefetches the next
// pair's lines while it computes; runs of pairs are shared out over XLA's CPU thread pool.
// Every pair is computed by one thread in a fixed order, so results do not depend on the
// thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
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
using rlver::ToFloat;
using rlver::Vec;

// Cache lines of the next pair's k and v spans, fetched a few at a time from inside this pair's
// loops so that streaming them overlaps this pair's arithmetic (a thread that waits for each
// line reads far below the memory's bandwidth; the arithmetic of a pair takes about as long as
// its reads).
struct Prefetcher {
  const char* at = nullptr;  // next line of the current range
  const char* end = nullptr;
  const char* next_begin = nullptr;  // the second range
  const char* next_end = nullptr;

  void Step() {
    for (int j = 0; j < 2; ++j) {
      if (at >= end) {
        if (next_begin == nullptr) return;
        at = next_begin, end = next_end, next_begin = nullptr;
      }
      __builtin_prefetch(at);
      at += 64;
    }
  }
};

struct Shape {
  int64_t B, K, G, Dh, S;
};

// Scores of GB queries q [GB, Dh] over slots k[:, 0..n) (row stride S) into scores [GB, n]:
// scores[g, i] = sum_d q[g, d] k[d, i], d in order. Rows of k are taken four at a time over the
// whole span, so the cache streams row by row and each score is loaded and stored once per
// four multiply-adds (one per row: the stores would otherwise bound the loop).
template <int GB, typename T>
void Scores(const float* q, const T* k, int64_t n, int64_t S, int64_t Dh, float* scores,
            Prefetcher& pf) {
  std::fill(scores, scores + GB * n, 0.0f);
  int64_t d = 0;
  for (; d + 4 <= Dh; d += 4) {
    float qd[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int r = 0; r < 4; ++r) qd[g][r] = q[g * Dh + d + r];
    const T* k0 = k + d * S;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      pf.Step();
      const Vec a = Load(k0 + i), b = Load(k0 + S + i), c = Load(k0 + 2 * S + i),
                e = Load(k0 + 3 * S + i);
      for (int g = 0; g < GB; ++g) {
        Vec sc = Load(scores + g * n + i);
        sc += a * qd[g][0];
        sc += b * qd[g][1];
        sc += c * qd[g][2];
        sc += e * qd[g][3];
        Store(scores + g * n + i, sc);
      }
    }
    for (; i < n; ++i)
      for (int g = 0; g < GB; ++g)
        for (int r = 0; r < 4; ++r) scores[g * n + i] += qd[g][r] * ToFloat(k0[r * S + i]);
  }
  for (; d < Dh; ++d)
    for (int64_t i = 0; i < n; ++i)
      for (int g = 0; g < GB; ++g) scores[g * n + i] += q[g * Dh + d] * ToFloat(k[d * S + i]);
}

// out[g, c0 + c] = inv[g] sum_i p[g, i] v[i, c0 + c] for GB queries and VB vectors of columns,
// i in order; v [n, Dh] from the first span slot, p [GB, n] (row stride n).
template <int GB, int VB, typename T>
void OutputBlock(const float* p, const T* v, int64_t n, int64_t Dh, int64_t c0,
                 const float* inv, float* out, Prefetcher& pf) {
  Vec acc[GB][VB] = {};
  for (int64_t i = 0; i < n; ++i, pf.Step())
    for (int b = 0; b < VB; ++b) {
      const Vec vv = Load(v + i * Dh + c0 + b * kLanes);
      for (int g = 0; g < GB; ++g) acc[g][b] += vv * p[g * n + i];
    }
  for (int g = 0; g < GB; ++g)
    for (int b = 0; b < VB; ++b) Store(out + g * Dh + c0 + b * kLanes, acc[g][b] * inv[g]);
}

template <int GB, typename T>
void Output(const float* p, const T* v, int64_t n, int64_t Dh, const float* inv, float* out,
            Prefetcher& pf) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= Dh; c += 4 * kLanes) OutputBlock<GB, 4>(p, v, n, Dh, c, inv, out, pf);
  for (; c + kLanes <= Dh; c += kLanes) OutputBlock<GB, 1>(p, v, n, Dh, c, inv, out, pf);
  for (; c < Dh; ++c)
    for (int g = 0; g < GB; ++g) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) sum += p[g * n + i] * ToFloat(v[i * Dh + c]);
      out[g * Dh + c] = sum * inv[g];
    }
}

// Queries are taken up to 3 at a time: 3 x 4 accumulators, the 3 query values (or 4 cache
// vectors) and one temporary fill AVX2's 16 registers.
template <typename Fn>
void ForQueryGroups(int64_t G, Fn&& fn) {
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    switch (std::min<int64_t>(3, G - g0)) {
      case 1: fn(g0, std::integral_constant<int, 1>{}); break;
      case 2: fn(g0, std::integral_constant<int, 2>{}); break;
      default: fn(g0, std::integral_constant<int, 3>{}); break;
    }
  }
}

// The slots that can carry weight, [lo, hi): first..last unmasked; all S slots when none is
// (XLA's softmax is then uniform over every slot).
using SlotSpan = std::pair<int64_t, int64_t>;
inline SlotSpan Span(const bool* mask, int64_t S) {
  int64_t lo = 0, hi = S;
  while (lo < S && !mask[lo]) ++lo;
  while (hi > lo && !mask[hi - 1]) --hi;
  return lo == hi ? SlotSpan{0, S} : SlotSpan{lo, hi};
}

// The lines of a pair's k and v over its row's span, for a `Prefetcher`.
template <typename T>
Prefetcher SpanLines(const T* k, const T* v, SlotSpan span, const Shape& s) {
  const auto [lo, hi] = span;
  Prefetcher pf;
  pf.at = reinterpret_cast<const char*>(k + lo);
  pf.end = reinterpret_cast<const char*>(k + (s.Dh - 1) * s.S + hi);
  pf.next_begin = reinterpret_cast<const char*>(v + lo * s.Dh);
  pf.next_end = reinterpret_cast<const char*>(v + hi * s.Dh);
  return pf;
}

// One (row, kv head) pair over its row's mask and `Span` of it, prefetching the next pair's
// cache lines through `pf`. scratch: G * S + G floats.
template <typename T>
void AttendPair(const float* q, const T* k, const T* v, const bool* mask, SlotSpan span,
                float* out, const Shape& s, float* scratch, Prefetcher& pf) {
  const int64_t G = s.G, Dh = s.Dh, S = s.S;
  const auto [lo, hi] = span;
  const bool none = !mask[lo];  // Span's lo is the first unmasked slot when there is one
  const int64_t n = hi - lo;
  float* scores = scratch;      // [G, n]
  float* inv = scratch + G * n;  // [G]: 1 / the softmax's sum
  ForQueryGroups(G, [&](int64_t g0, auto gb) {
    Scores<decltype(gb)::value>(q + g0 * Dh, k + lo, n, S, Dh, scores + g0 * n, pf);
  });
  for (int64_t g = 0; g < G; ++g) inv[g] = SoftmaxRow(scores + g * n, mask + lo, n, none);
  ForQueryGroups(G, [&](int64_t g0, auto gb) {
    Output<decltype(gb)::value>(scores + g0 * n, v + lo * Dh, n, Dh, inv + g0, out + g0 * Dh,
                                pf);
  });
}

template <typename T>
void AttendAll(const float* q, const T* k, const T* v, const bool* mask, float* out,
               const Shape& s, ffi::ThreadPool& pool) {
  // Runs of consecutive pairs, a few per thread, so that each pair can prefetch the next.
  const int64_t pairs = s.B * s.K;
  const int64_t run = std::max<int64_t>(1, pairs / (8 * std::max<int64_t>(1, pool.num_threads())));
  std::vector<SlotSpan> spans(s.B);  // once per row: its K pairs share the mask
  for (int64_t b = 0; b < s.B; ++b) spans[b] = Span(mask + b * s.S, s.S);
  const int64_t kv_block = s.Dh * s.S;  // one pair's k (or v) elements
  auto make_worker = [&] {
    return [&, scratch = std::vector<float>(s.G * s.S + s.G)](int64_t r) mutable {
      for (int64_t p = r * run, end = std::min(pairs, p + run); p < end; ++p) {
        Prefetcher pf;
        if (p + 1 < end)
          pf = SpanLines(k + (p + 1) * kv_block, v + (p + 1) * kv_block, spans[(p + 1) / s.K], s);
        const int64_t b = p / s.K;
        AttendPair(q + p * s.G * s.Dh, k + p * kv_block, v + p * kv_block, mask + b * s.S,
                   spans[b], out + p * s.G * s.Dh, s, scratch.data(), pf);
      }
    };
  };
  rlver::ParallelFor((pairs + run - 1) / run, pool, make_worker);
}

template <ffi::DataType KV>
ffi::Error OneQueryAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<KV> k, ffi::Buffer<KV> v,
                             ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                             ffi::ThreadPool pool) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
             md = mask.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || od.size() != 4)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "ranks must be q 4, k 4, v 4, mask 2");
  const Shape s{qd[0], qd[1], qd[2], qd[3], kd[3]};
  const bool ok = kd[0] == s.B && kd[1] == s.K && kd[2] == s.Dh && vd[0] == s.B &&
                  vd[1] == s.K && vd[2] == s.S && vd[3] == s.Dh && md[0] == s.B &&
                  md[1] == s.S && od[0] == s.B && od[1] == s.K && od[2] == s.G &&
                  od[3] == s.Dh;
  if (!ok)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "shapes must be q [B,K,G,Dh], k [B,K,Dh,S], v [B,K,S,Dh], mask [B,S]");
  using T = ffi::NativeType<KV>;
  AttendAll<T>(q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
               out->typed_data(), s, pool);
  return ffi::Error::Success();
}

}  // namespace

#define RLVER_BIND(KV)                    \
  ffi::Ffi::Bind()                        \
      .Arg<ffi::Buffer<ffi::F32>>()       \
      .Arg<ffi::Buffer<KV>>()             \
      .Arg<ffi::Buffer<KV>>()             \
      .Arg<ffi::Buffer<ffi::PRED>>()      \
      .Ret<ffi::Buffer<ffi::F32>>()       \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverOneQueryAttentionF32, OneQueryAttention<ffi::F32>,
                              RLVER_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverOneQueryAttentionBF16, OneQueryAttention<ffi::BF16>,
                              RLVER_BIND(ffi::BF16));
// A bf16 cache held as its uint16 bits (`kv_cache.as_bits`): the same code.
XLA_FFI_DEFINE_HANDLER_SYMBOL(RlverOneQueryAttentionBF16Bits, OneQueryAttention<ffi::U16>,
                              RLVER_BIND(ffi::U16));
