// One-query attention over a KV cache on the CPU, as an XLA FFI custom call (see
// cpu_attention.py, which calls it; cpu_kernels.py builds this file). Layouts are `KVCache`'s:
//
//   q    [B, K, G, Dh] float32, already scaled by 1/sqrt(Dh); query head h = j G + g
//   k    [B, K, Dh, S] float32 or bfloat16
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
// group sharing each read; pairs are shared out over XLA's CPU thread pool. Every pair is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskValue = -0.7f * std::numeric_limits<float>::max();

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) {  // bfloat16: the high half of a float32
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r;
// ~1 ulp), written so that the compiler vectorises it.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: the softmax weight of a masked slot is ~0
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

struct Shape {
  int64_t B, K, G, Dh, S;
};

// One (row, kv head) pair. scratch: G * S + G * Dh + G floats.
template <typename T>
void AttendPair(const float* q, const T* k, const T* v, const bool* mask, float* out,
                const Shape& s, float* scratch) {
  const int64_t G = s.G, Dh = s.Dh, S = s.S;
  int64_t lo = 0, hi = S;  // the slots that can carry weight: first..last unmasked
  while (lo < S && !mask[lo]) ++lo;
  while (hi > lo && !mask[hi - 1]) --hi;
  const bool none = lo == hi;  // all masked: XLA's softmax is uniform over all S slots
  if (none) lo = 0, hi = S;
  const int64_t n = hi - lo;
  float* scores = scratch;       // [G, n]
  float* acc = scratch + G * n;  // [G, Dh]
  float* inv = acc + G * Dh;     // [G]: 1 / the softmax's sum
  std::fill(scores, scores + G * n, 0.0f);
  for (int64_t d = 0; d < Dh; ++d) {
    const T* kd = k + d * S + lo;
    for (int64_t g = 0; g < G; ++g) {
      const float qv = q[g * Dh + d];
      float* sg = scores + g * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) sg[i] += qv * ToFloat(kd[i]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = (none || !mask[lo + i]) ? kMaskValue : sg[i];
      top = std::max(top, sg[i]);
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sg[i] = ExpNonPositive(sg[i] - top);
      sum += sg[i];
    }
    inv[g] = 1.0f / sum;
  }
  std::fill(acc, acc + G * Dh, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const T* vs = v + (lo + i) * Dh;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * n + i];
      float* ag = acc + g * Dh;
#pragma omp simd
      for (int64_t d = 0; d < Dh; ++d) ag[d] += p * ToFloat(vs[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < Dh; ++d) out[g * Dh + d] = acc[g * Dh + d] * inv[g];
}

template <typename T>
void AttendAll(const float* q, const T* k, const T* v, const bool* mask, float* out,
               const Shape& s, ffi::ThreadPool& pool) {
  auto make_worker = [&] {
    return [&, scratch = std::vector<float>(s.G * s.S + s.G * s.Dh + s.G)](int64_t p) mutable {
      const int64_t b = p / s.K;
      AttendPair(q + p * s.G * s.Dh, k + p * s.Dh * s.S, v + p * s.S * s.Dh, mask + b * s.S,
                 out + p * s.G * s.Dh, s, scratch.data());
    };
  };
  rlver::ParallelFor(s.B * s.K, pool, make_worker);
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
