// What loraplex's CPU kernels share: bf16 as bits, and 16-float vectors (GCC / Clang vector
// extensions: one AVX-512 register, two AVX2 ones) with their loads (from float32, bf16 or
// int8), stores and lane sum.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct BFloat16 {
  uint16_t bits;
};

inline float load(float v) { return v; }
inline float load(int8_t v) { return v; }
inline float load(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float *p, float v) { *p = v; }
inline void store(BFloat16 *p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    p->bits = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as PyTorch does
  p->bits = static_cast<uint16_t>(u >> 16);
}

constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

inline f32x16 load16(const float *p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// bf16 <-> float32 of 16 values. With AVX-512 one widening (or narrowing) instruction each:
// GCC's generic lowering of the same conversion splits it into 256-bit halves and shuffles,
// which made the loop compute-bound at a third of memory speed.
#if defined(__AVX512F__)
inline f32x16 load16(const BFloat16 *p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  const __m512i wide = _mm512_cvtepu16_epi32(bits);
  return (f32x16)_mm512_slli_epi32(wide, 16);
}
inline u16x16 narrow16(u32x16 v) { return (u16x16)_mm512_cvtepi32_epi16((__m512i)v); }
inline f32x16 load16(const int8_t *p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
#else
inline f32x16 load16(const BFloat16 *p) {
  u16x16 bits;
  std::memcpy(&bits, p, sizeof bits);
  return (f32x16)(__builtin_convertvector(bits, u32x16) << 16);
}
inline u16x16 narrow16(u32x16 v) { return __builtin_convertvector(v, u16x16); }
inline f32x16 load16(const int8_t *p) {
  i8x16 bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  return __builtin_convertvector(bytes, f32x16);
}
#endif

inline void store16(float *p, f32x16 v) { std::memcpy(p, &v, sizeof v); }
inline void store16(BFloat16 *p, f32x16 v) {
  const u32x16 u = (u32x16)v;
  const u32x16 nan = (u32x16)(v != v);  // all ones in NaN lanes
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest even
  const u16x16 bits = narrow16((rounded & ~nan) | (0x7fc0u & nan));
  std::memcpy(p, &bits, sizeof bits);
}

// The sum of a vector's lanes, pairwise (a tree of 4 dependent adds, not a chain of 15).
inline float sum_lanes(f32x16 v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Calls op(N) with N = n as a compile-time constant for n from 1 to 8, and N = Otherwise for any
// other n, so that the loops over N unroll and their sums are fixed-size register arrays.
template <int Otherwise, typename Op>
void with_constant(int64_t n, Op op) {
  switch (n) {
    case 1: op(std::integral_constant<int, 1>{}); break;
    case 2: op(std::integral_constant<int, 2>{}); break;
    case 3: op(std::integral_constant<int, 3>{}); break;
    case 4: op(std::integral_constant<int, 4>{}); break;
    case 5: op(std::integral_constant<int, 5>{}); break;
    case 6: op(std::integral_constant<int, 6>{}); break;
    case 7: op(std::integral_constant<int, 7>{}); break;
    case 8: op(std::integral_constant<int, 8>{}); break;
    default: op(std::integral_constant<int, Otherwise>{}); break;
  }
}

}  // namespace
