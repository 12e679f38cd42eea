// Eight-float vectors for the CPU kernels (cpu_attention.cc, cpu_causal_attention.cc,
// cpu_matmul.cc), written with GCC/Clang vector extensions: one AVX2 register (NEON takes two),
// float32 or bfloat16 memory; and a softmax row on them (its exp, the masking).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace rlver {

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Vec16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Vec32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));

constexpr float kMaskValue = -0.7f * std::numeric_limits<float>::max();

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r;
// ~1 ulp) on eight lanes; n is x log2(e) rounded to nearest by the 1.5 * 2^23 trick.
inline Vec ExpNonPositive(Vec x) {
  const Vec floor_x = Vec{} - 87.0f;  // exp(-87) ~ 1.6e-38: the weight of a masked slot is ~0
  x = x < floor_x ? floor_x : x;
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  Vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec e = p * r * r + r + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline float ExpNonPositive(float x) { return ExpNonPositive(Vec{} + x)[0]; }

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec Load(const uint16_t* p) {  // bfloat16 is the high half of a float32
  Vec16 h;
  std::memcpy(&h, p, sizeof h);
  const Vec32 bits = __builtin_convertvector(h, Vec32) << 16;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Through a by-value copy: taking the address of an accumulator array's element makes GCC keep
// the whole array on the stack, with a store and reload around every multiply-add.
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A row of n scores under its mask [n]: masked slots (all of them when `none`) become
// kMaskValue, then exp(score - max) in place (a masked slot's weight ~1e-38: the exp is floored
// at -87); returns 1 / their sum.
inline float SoftmaxRow(float* sg, const bool* mask, int64_t n, bool none) {
  const Vec masked = Vec{} + kMaskValue;
  Vec top = Vec{} - std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Bytes m;
    std::memcpy(&m, mask + i, sizeof m);
    const VecI keep = __builtin_convertvector(m, VecI) != 0;
    Vec sc = Load(sg + i);
    sc = (keep & !none) ? sc : masked;
    Store(sg + i, sc);
    top = top > sc ? top : sc;
  }
  float best = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kLanes; ++l) best = std::max(best, top[l]);
  for (; i < n; ++i) {
    sg[i] = (none || !mask[i]) ? kMaskValue : sg[i];
    best = std::max(best, sg[i]);
  }
  Vec sum = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
    const Vec e = ExpNonPositive(Load(sg + i) - best);
    Store(sg + i, e);
    sum += e;
  }
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  for (; i < n; ++i) total += sg[i] = ExpNonPositive(sg[i] - best);
  return 1.0f / total;
}

}  // namespace rlver
