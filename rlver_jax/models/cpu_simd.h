// Eight-float vectors for the CPU kernels (cpu_attention.cc, cpu_matmul.cc), written with
// GCC/Clang vector extensions: one AVX2 register (NEON takes two), float32 or bfloat16 memory.
#pragma once

#include <cstdint>
#include <cstring>

namespace rlver {

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t Vec16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Vec32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

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

}  // namespace rlver
