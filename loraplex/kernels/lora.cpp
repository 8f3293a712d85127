// loraplex's CPU kernel: the mixed-adapter LoRA op (lora/ops.py, add_lora).
//
// Semantics, for each segment (s, start, end) and each token t in [start, end) of it, with
// (o, r) = places[s] (slot s's first row of Bt and its rank, lora/slots.py):
//     h = A[n*o : n*o + n*r] @ x[t]                     n * r values, float32 sums
//     y[t, columns of module i] += h[i*r:(i+1)*r] @ Bt_i[o : o + r]
// A [n * R, in] and Bt_i [R, out_i] (B transposed) contiguous, R rows in all (the page pool);
// x and y rows at the given strides; y's module columns side by side in module order. With
// int8 weights (lora/quantize.py) h[k] is also multiplied by scales[n*o + k]. Each slot has its
// own rank, so a token reads its adapter's r rows only, never a padding to the largest rank.
//
// Why our own loops: a decoding token reads its own adapter's matrices once, so that work is
// bound by memory traffic, and PyTorch's batched small matmuls move ~8 GB/s here. A prefill
// segment is the opposite case, many tokens on one slot, but its matmuls are small (rank 16) and
// PyTorch's bf16 matmul costs ~20 us a call before any work. Here both are one pass: the tokens
// of a segment go in groups of up to kGroup that share every load (and bf16 conversion) of a
// weight, rows are read contiguously, and the inner loops are kLanes floats wide (one AVX-512
// register) so the compiler keeps the group's sums in registers. Decoding tokens are whole tasks
// of one thread each, which prefetches the next one's matrices while it reads the current ones
// (decode_group). In bf16 on CPUs with bf16 dot products (AVX512_BF16) the shrink multiplies
// bf16 directly, 32 products an instruction. Int8 weights halve the bytes a decoding token
// reads; on CPUs with int16 dot products (AVX512_VNNI) the inputs and h meet them as int16, so
// that an int8 weight costs one widening for 32 products too. The threads are OpenMP's, the
// same runtime PyTorch's own ops use.

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "vectors.h"

namespace {

constexpr int kGroup = 8;          // tokens of one segment computed together
constexpr int kDecodeTokens = 2;   // a group of at most this many is decoding work (below)
constexpr int64_t kBlock = 256;    // output columns of one unit of expand work
constexpr int64_t kWideBlock = 2048;  // output columns a decoding group sums at once
constexpr int64_t kMaxPairs = 128;    // rows of Bt the bf16 expand takes, in pairs

struct Group {
  int64_t slot, first, count;  // tokens first .. first + count - 1, all on slot
  int64_t rank;                // the slot's
  int64_t a_row, b_row;        // its first row of A and of each Bt in the weights read
};

struct Block {
  int64_t module, column, first, end;  // y columns [column + first, column + end) of module
};

// Independent sums one loop keeps going: a single chain of FMAs waits on each add's latency,
// so a small group (a decoding token is a group of one) works several rows or column vectors
// at once to keep enough loads in flight to reach memory speed; a full group works two, so that
// each load of an input (or broadcast of h) serves two multiply-adds.
constexpr int kChains = 8;
constexpr int ways_for(int n) { return std::max(2, kChains / n); }

// v as a T holds it: the shrink's h is rounded to the tensors' precision, as a PyTorch matmul
// stores it (and the bf16 expand multiplies bf16 h exactly).
inline float as_stored(float v, float) { return v; }
inline float as_stored(float v, BFloat16) {
  BFloat16 rounded;
  store(&rounded, v);
  return load(rounded);
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;  // the CPU multiplies bf16 pairs (vdpbf16ps)
#else
constexpr bool kBf16Dot = false;
#endif
#if defined(__AVX512VNNI__)
constexpr bool kInt16Dot = true;  // the CPU sums int16 pair products into int32 (vpdpwssd)
#else
constexpr bool kInt16Dot = false;
#endif
// Whether the shrink reads int16 copies of the inputs, made once a call: int8 weights on CPUs
// with int16 dot products (shrink_rows_int8).
template <typename W>
constexpr bool kQuantizesInputs = std::is_same_v<W, int8_t> && kInt16Dot;
// Whether the shrink reads float32 copies of the inputs, made once a call: bf16 inputs without
// dot products for the weights (bf16 pairs for bf16 weights, int16 ones for int8), so that each
// input is widened once rather than once per row of A.
template <typename T, typename W>
constexpr bool kWidensInputs = std::is_same_v<T, BFloat16> &&
                               !(std::is_same_v<W, int8_t> ? kInt16Dot : kBf16Dot);

// A group's inputs in each form the shrink may read: x itself (x_stride apart), and the float32
// (xf) or int16 (xq, with their scales xs) copies, in_features apart, where a call makes them.
template <typename T>
struct Inputs {
  const T *x;
  int64_t x_stride;
  const float *xf;
  const int16_t *xq;
  const float *xs;
};

// A dot product's vector part plus its last terms, from column i on, in float32.
template <typename T, typename U>
float dot_tail(float total, const T *row, const U *input, int64_t i, int64_t in_features) {
  for (; i < in_features; i++) total += load(row[i]) * load(input[i]);
  return total;
}

// h[g * nr + k] = A row k . input g for R consecutive rows of A and the N tokens of a group
// (xf: their float32 inputs, xf_stride apart), in float32 multiply-adds; int8 rows' sums are
// multiplied by their scales (scales[k]). Each load of A prefetches the place `ahead` values on
// into L2 (rows this thread reads later): short rows read in parallel outpace the hardware
// prefetcher.
template <int N, int R, typename T>
void shrink_rows_f32(const T *rows, const float *xf, int64_t xf_stride, int64_t in_features,
                     float *h, int64_t nr, int64_t ahead, const float *scales) {
  f32x16 sums[R][N] = {};
  int64_t i = 0;
  for (; i + kLanes <= in_features; i += kLanes) {
    f32x16 inputs[N];
    for (int g = 0; g < N; g++) inputs[g] = load16(xf + g * xf_stride + i);
    for (int k = 0; k < R; k++) {
      __builtin_prefetch(rows + k * in_features + i + ahead, 0, 1);
      const f32x16 w = load16(rows + k * in_features + i);
      for (int g = 0; g < N; g++) sums[k][g] += w * inputs[g];
    }
  }
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) {
      const float sum = dot_tail(sum_lanes(sums[k][g]), rows + k * in_features,
                                 xf + g * xf_stride, i, in_features);
      if constexpr (std::is_same_v<T, int8_t>) {
        h[g * nr + k] = sum * scales[k];
      } else {
        h[g * nr + k] = as_stored(sum, T{});
      }
    }
  }
}

#if defined(__AVX512BF16__)
// shrink_rows_f32 for bf16 on CPUs with bf16 dot products: A's rows against the tokens' own bf16
// inputs (x, x_stride apart), 32 products an instruction (vdpbf16ps) summed in float32, no
// conversion; the last in_features % 32 one at a time.
template <int N, int R>
void shrink_rows_bf16(const BFloat16 *rows, const BFloat16 *x, int64_t x_stride,
                      int64_t in_features, float *h, int64_t nr, int64_t ahead) {
  __m512 sums[R][N];
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) sums[k][g] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 2 * kLanes <= in_features; i += 2 * kLanes) {
    __m512bh inputs[N];
    for (int g = 0; g < N; g++) inputs[g] = (__m512bh)_mm512_loadu_si512(x + g * x_stride + i);
    for (int k = 0; k < R; k++) {
      __builtin_prefetch(rows + k * in_features + i + ahead, 0, 1);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(rows + k * in_features + i);
      for (int g = 0; g < N; g++) sums[k][g] = _mm512_dpbf16_ps(sums[k][g], w, inputs[g]);
    }
  }
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) {
      h[g * nr + k] = as_stored(dot_tail(_mm512_reduce_add_ps(sums[k][g]),
                                         rows + k * in_features, x + g * x_stride, i,
                                         in_features), BFloat16{});
    }
  }
}
#endif

// Int8 weights times int16 inputs, summed in int32 (vpdpwssd: 32 products an instruction, the
// int8 widened by one instruction), at most this many inputs before the int32 sums go to float:
// 8,192 / 32 instructions add at most 256 * 2 * 127 * 32,767 < 2^31 to a lane.
constexpr int64_t kInt32Span = 8192;

// The largest |value| of count values (NaN lanes are skipped, as std::max skips them).
template <typename T>
float largest_magnitude(const T *values, int64_t count) {
  f32x16 largest16 = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const f32x16 v = load16(values + i);
    const f32x16 magnitude = v < 0 ? -v : v;
    largest16 = magnitude > largest16 ? magnitude : largest16;
  }
  float largest = 0.f;
  for (int l = 0; l < kLanes; l++) largest = std::max(largest, largest16[l]);
  for (; i < count; i++) largest = std::max(largest, std::abs(load(values[i])));
  return largest;
}

// An input as int16 and the scale that gives it back (absmax / 32,767): inputs meet int8
// weights this way where the CPU has int16 dot products. Its rounding (2^-16 of the largest
// input) stays below bf16's own of that input, whose error is then the larger one in any sum of
// products.
template <typename T>
float quantize_input(const T *input, int64_t in_features, int16_t *q) {
  const float largest = largest_magnitude(input, in_features);
  int64_t i = 0;
  if (!(largest > 0.f) || !std::isfinite(largest)) {  // zeros, or NaN/inf that y already holds
    std::fill(q, q + in_features, int16_t{0});
    return 0.f;
  }
  const float inverse = 32767.f / largest;
#if defined(__AVX512F__)
  for (; i + kLanes <= in_features; i += kLanes) {  // rounded to nearest even, as below
    const __m512i rounded = _mm512_cvtps_epi32((__m512)(load16(input + i) * inverse));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(q + i), _mm512_cvtsepi32_epi16(rounded));
  }
#endif
  for (; i < in_features; i++) {
    q[i] = static_cast<int16_t>(std::nearbyint(load(input[i]) * inverse));
  }
  return largest / 32767.f;
}

#if defined(__AVX512VNNI__)
// shrink_rows_f32 for int8 rows against the tokens' int16 inputs (xq, in_features apart, scales
// xs): 32 products an instruction in int32, each span's sums added up in float32, then times
// the row's scale and the input's.
template <int N, int R>
void shrink_rows_int8(const int8_t *rows, const int16_t *xq, const float *xs,
                      int64_t in_features, float *h, int64_t nr, int64_t ahead,
                      const float *scales) {
  float totals[R][N] = {};
  const int64_t vectors = in_features / 32 * 32;
  for (int64_t span = 0; span < vectors; span += kInt32Span) {
    __m512i sums[R][N];
    for (int k = 0; k < R; k++) {
      for (int g = 0; g < N; g++) sums[k][g] = _mm512_setzero_si512();
    }
    const int64_t end = std::min(vectors, span + kInt32Span);
    for (int64_t i = span; i < end; i += 32) {
      __m512i inputs[N];
      for (int g = 0; g < N; g++) inputs[g] = _mm512_loadu_si512(xq + g * in_features + i);
      for (int k = 0; k < R; k++) {
        const int8_t *row = rows + k * in_features + i;
        if ((i & 63) == 0) __builtin_prefetch(row + ahead, 0, 1);  // once a cache line
        const __m512i w =
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row)));
        for (int g = 0; g < N; g++) sums[k][g] = _mm512_dpwssd_epi32(sums[k][g], w, inputs[g]);
      }
    }
    for (int k = 0; k < R; k++) {
      for (int g = 0; g < N; g++) {
        totals[k][g] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(sums[k][g]));
      }
    }
  }
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) {
      float total = totals[k][g];
      for (int64_t i = vectors; i < in_features; i++) {
        total += static_cast<float>(rows[k * in_features + i]) * xq[g * in_features + i];
      }
      h[g * nr + k] = total * scales[k] * xs[g];
    }
  }
}
#endif

// shrink_rows_f32's result for the tokens of `in`: int8 rows against their int16 copies where
// kQuantizesInputs, bf16 rows against bf16 inputs in bf16 dot products where the CPU has them,
// else in float32 (from the float32 copies where kWidensInputs).
template <int N, int R, typename W, typename T>
void shrink_rows(const W *rows, const Inputs<T> &in, int64_t in_features, float *h, int64_t nr,
                 int64_t ahead, const float *scales) {
  if constexpr (kQuantizesInputs<W>) {
#if defined(__AVX512VNNI__)
    shrink_rows_int8<N, R>(rows, in.xq, in.xs, in_features, h, nr, ahead, scales);
#endif
  } else if constexpr (std::is_same_v<T, float>) {
    shrink_rows_f32<N, R>(rows, in.x, in.x_stride, in_features, h, nr, ahead, scales);
  } else if constexpr (kWidensInputs<T, W>) {
    shrink_rows_f32<N, R>(rows, in.xf, in_features, in_features, h, nr, ahead, scales);
  } else {
#if defined(__AVX512BF16__)
    shrink_rows_bf16<N, R>(rows, in.x, in.x_stride, in_features, h, nr, ahead);
#endif
  }
}

// y[g, first:end] += h[g] . Bt[:, first:end] for the N tokens of a group (hr: their r values
// of this module, nr apart; bt: the module's Bt for the slot, [rank, out]), C column vectors
// at a time.
template <int N, int C, typename W, typename T>
int64_t expand_columns(const W *bt, int64_t rank, int64_t out, const float *hr, int64_t nr,
                       int64_t c, int64_t end, T *y, int64_t y_stride) {
  for (; c + C * kLanes <= end; c += C * kLanes) {
    f32x16 sums[C][N] = {};
    for (int64_t q = 0; q < rank; q++) {
      for (int v = 0; v < C; v++) {
        __builtin_prefetch(bt + q * out + c + (C + v) * kLanes);  // the next columns
        const f32x16 w = load16(bt + q * out + c + v * kLanes);
        for (int g = 0; g < N; g++) sums[v][g] += hr[g * nr + q] * w;
      }
    }
    for (int v = 0; v < C; v++) {
      for (int g = 0; g < N; g++) {
        T *target = y + g * y_stride + c + v * kLanes;
        store16(target, load16(target) + sums[v][g]);
      }
    }
  }
  return c;
}

#if defined(__AVX512BF16__)
// expand_columns for bf16 on CPUs with bf16 dot products, 32 columns at a time: two rows of Bt
// interleaved (vpunpck{l,h}wd: pairs (Bt[q, c], Bt[q+1, c])) against the pair (h[q], h[q+1]),
// 32 products an instruction. The unpacks work within 128-bit lanes, so the sums hold columns
// 0-3, 8-11, 16-19, 24-27 (lo) and 4-7, 12-15, 20-23, 28-31 (hi); two permutes restore them.
template <int N>
int64_t expand_columns_bf16(const BFloat16 *bt, int64_t rank, int64_t out, const float *hr,
                            int64_t nr, int64_t c, int64_t end, BFloat16 *y, int64_t y_stride) {
  constexpr int64_t kStep = 2 * kLanes;
  const __m512i first_half = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4,
                                              19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second_half = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12,
                                               27, 26, 25, 24, 11, 10, 9, 8);
  const int64_t num_pairs = (rank + 1) / 2;
  if (num_pairs > kMaxPairs) return c;  // the float32 loops take such ranks
  // (h[q], h[q+1]) as bf16 bits; h holds bf16 values (as_stored), so the top halves are exact,
  // and an odd rank's last row pairs with zero.
  uint32_t h_pairs[N][kMaxPairs];
  for (int g = 0; g < N; g++) {
    for (int64_t p = 0; p < num_pairs; p++) {
      uint32_t even, odd = 0;
      std::memcpy(&even, hr + g * nr + 2 * p, sizeof even);
      if (2 * p + 1 < rank) std::memcpy(&odd, hr + g * nr + 2 * p + 1, sizeof odd);
      h_pairs[g][p] = (even >> 16) | (odd & 0xffff0000u);
    }
  }
  for (; c + kStep <= end; c += kStep) {
    __m512 lo[N], hi[N];
    for (int g = 0; g < N; g++) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < num_pairs; p++) {
      const __m512i row0 = _mm512_loadu_si512(bt + 2 * p * out + c);
      const __m512i row1 = 2 * p + 1 < rank ? _mm512_loadu_si512(bt + (2 * p + 1) * out + c)
                                            : _mm512_setzero_si512();
      const __m512bh w_lo = (__m512bh)_mm512_unpacklo_epi16(row0, row1);
      const __m512bh w_hi = (__m512bh)_mm512_unpackhi_epi16(row0, row1);
      for (int g = 0; g < N; g++) {
        const __m512bh h = (__m512bh)_mm512_set1_epi32(static_cast<int>(h_pairs[g][p]));
        lo[g] = _mm512_dpbf16_ps(lo[g], w_lo, h);
        hi[g] = _mm512_dpbf16_ps(hi[g], w_hi, h);
      }
    }
    for (int g = 0; g < N; g++) {
      BFloat16 *target = y + g * y_stride + c;
      const f32x16 first = (f32x16)_mm512_permutex2var_ps(lo[g], first_half, hi[g]);
      const f32x16 second = (f32x16)_mm512_permutex2var_ps(lo[g], second_half, hi[g]);
      store16(target, load16(target) + first);
      store16(target + kLanes, load16(target + kLanes) + second);
    }
  }
  return c;
}
#endif

#if defined(__AVX512VNNI__)
// expand_rows for a decoding group's int8 Bt where the CPU has int16 dot products, over the
// module's first out / 32 * 32 columns (returns how many; expand_rows takes the rest): each
// token's r
// values of h as int16 with one scale (absmax / 32,767, finer than the bf16 h of the other
// paths), and per strip of 64 columns its sums in int32 registers over all rows of Bt, each
// row's cache line prefetching the place `ahead` values on: rows q and q+1 interleaved
// (vpunpck{l,h}bw, widened to int16 pairs) against the pair (h[q], h[q+1]), 32 products an
// instruction. The unpacks work within 128-bit lanes, so a 32-column unit's sums hold columns
// 0-7, 16-23 (lo) and 8-15, 24-31 (hi); two permutes restore them. Sums stay below 2^31 for
// ranks up to kMaxPairs * 2 (then nothing is taken here).
template <int N, typename T>
int64_t expand_strips_int8(const int8_t *bt, int64_t rank, int64_t out, const float *hr,
                           int64_t nr, T *y, int64_t y_stride, int64_t ahead) {
  constexpr int64_t kUnit = 32;
  const int64_t num_pairs = (rank + 1) / 2;
  if (num_pairs > kMaxPairs) return 0;
  int32_t h_pairs[N][kMaxPairs];  // (h[q], h[q+1]) as int16 bits, an odd rank's last with 0
  float h_scales[N];
  for (int g = 0; g < N; g++) {
    int16_t q[2 * kMaxPairs] = {};
    h_scales[g] = quantize_input(hr + g * nr, rank, q);
    for (int64_t p = 0; p < num_pairs; p++) {
      h_pairs[g][p] = static_cast<int32_t>(static_cast<uint16_t>(q[2 * p])) |
                      (static_cast<int32_t>(q[2 * p + 1]) << 16);
    }
  }
  const __m512i first_half = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16,
                                              7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i second_half = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24,
                                               15, 14, 13, 12, 11, 10, 9, 8);
  // Sums over all pairs for the U 32-column units from column c, kept in registers.
  auto strip = [&](auto units, int64_t c) {
    constexpr int U = decltype(units)::value;
    __m512i sums[N][U][2];  // [token][unit][lo, hi]
    for (int g = 0; g < N; g++) {
      for (int u = 0; u < U; u++) sums[g][u][0] = sums[g][u][1] = _mm512_setzero_si512();
    }
    for (int64_t p = 0; p < num_pairs; p++) {
      const int8_t *row0 = bt + 2 * p * out + c, *row1 = row0 + out;
      const bool has_row1 = 2 * p + 1 < rank;
      __builtin_prefetch(row0 + ahead, 0, 1);  // the strip's cache line of each row
      if (has_row1) __builtin_prefetch(row1 + ahead, 0, 1);
      for (int u = 0; u < U; u++) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row0 + u * kUnit));
        __m256i w1 = _mm256_setzero_si256();
        if (has_row1) {
          w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(row1 + u * kUnit));
        }
        const __m512i lo = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(w0, w1));
        const __m512i hi = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(w0, w1));
        for (int g = 0; g < N; g++) {
          const __m512i h = _mm512_set1_epi32(h_pairs[g][p]);
          sums[g][u][0] = _mm512_dpwssd_epi32(sums[g][u][0], lo, h);
          sums[g][u][1] = _mm512_dpwssd_epi32(sums[g][u][1], hi, h);
        }
      }
    }
    for (int g = 0; g < N; g++) {
      const __m512 scale = _mm512_set1_ps(h_scales[g]);
      for (int u = 0; u < U; u++) {
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[g][u][0]), scale);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[g][u][1]), scale);
        T *target = y + g * y_stride + c + u * kUnit;
        store16(target, load16(target) + (f32x16)_mm512_permutex2var_ps(lo, first_half, hi));
        store16(target + kLanes,
                load16(target + kLanes) + (f32x16)_mm512_permutex2var_ps(lo, second_half, hi));
      }
    }
  };
  int64_t c = 0;
  for (; c + 2 * kUnit <= out; c += 2 * kUnit) strip(std::integral_constant<int, 2>{}, c);
  if (c + kUnit <= out) {
    strip(std::integral_constant<int, 1>{}, c);
    c += kUnit;
  }
  return c;
}
#endif

template <int N, typename T>
void expand_block(const T *bt, int64_t rank, int64_t out, const float *hr, int64_t nr,
                  int64_t first, int64_t end, T *y, int64_t y_stride) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    first = expand_columns_bf16<N>(bt, rank, out, hr, nr, first, end, y, y_stride);
  }
#endif
  int64_t c = expand_columns<N, ways_for(N)>(bt, rank, out, hr, nr, first, end, y, y_stride);
  c = expand_columns<N, 1>(bt, rank, out, hr, nr, c, end, y, y_stride);
  for (; c < end; c++) {  // the last columns when out is not a multiple of kLanes
    for (int g = 0; g < N; g++) {
      float sum = 0.f;
      for (int64_t q = 0; q < rank; q++) sum += hr[g * nr + q] * load(bt[q * out + c]);
      store(y + g * y_stride + c, load(y[g * y_stride + c]) + sum);
    }
  }
}

// expand_block's result for a decoding group's N tokens over `columns` columns of a module (bt:
// its Bt from the first of them, rows `out` apart): Bt's rows in address order, two at a time,
// the sums kept in float32 in L1 (kWideBlock columns at a time), each load prefetching the place
// `ahead` values on.
template <int N, typename W, typename T>
void expand_rows(const W *bt, int64_t rank, int64_t out, const float *hr, int64_t nr, T *y,
                 int64_t y_stride, int64_t ahead, int64_t columns) {
  alignas(64) float sums[N][kWideBlock];
  for (int64_t first = 0; first < columns; first += kWideBlock) {
    const int64_t width = std::min(kWideBlock, columns - first);
    const int64_t vectors = width / kLanes * kLanes;
    for (int g = 0; g < N; g++) std::fill(sums[g], sums[g] + width, 0.f);
    int64_t q = 0;
    for (; q + 2 <= rank; q += 2) {
      const W *row0 = bt + q * out + first, *row1 = row0 + out;
      float h0[N], h1[N];
      for (int g = 0; g < N; g++) h0[g] = hr[g * nr + q], h1[g] = hr[g * nr + q + 1];
      for (int64_t c = 0; c < vectors; c += kLanes) {
        __builtin_prefetch(row0 + c + ahead, 0, 1);
        __builtin_prefetch(row1 + c + ahead, 0, 1);
        const f32x16 w0 = load16(row0 + c), w1 = load16(row1 + c);
        for (int g = 0; g < N; g++) {
          store16(sums[g] + c, load16(sums[g] + c) + h0[g] * w0 + h1[g] * w1);
        }
      }
      for (int64_t c = vectors; c < width; c++) {
        for (int g = 0; g < N; g++) sums[g][c] += h0[g] * load(row0[c]) + h1[g] * load(row1[c]);
      }
    }
    if (q < rank) {  // an odd rank's last row
      const W *row = bt + q * out + first;
      for (int64_t c = 0; c < width; c++) {
        for (int g = 0; g < N; g++) sums[g][c] += hr[g * nr + q] * load(row[c]);
      }
    }
    for (int g = 0; g < N; g++) {
      T *target = y + g * y_stride + first;
      int64_t c = 0;
      for (; c < vectors; c += kLanes) {
        store16(target + c, load16(target + c) + load16(sums[g] + c));
      }
      for (; c < width; c++) store(target + c, load(target[c]) + sums[g][c]);
    }
  }
}


// All of a decoding group's work (N <= kDecodeTokens tokens on one slot) by one thread: its
// slot's A and each Bt read once, in address order, while the same places of next_slot's (the
// group this thread does next) are prefetched into L2, a whole group ahead. A slot's matrices
// are 6-55 KB apiece, too short for the hardware prefetcher to reach memory speed by itself
// (a decode step of 32 adapters read at ~16 GB/s without this, ~24 GB/s with it, of the ~27
// this machine streams), and the group needs no barrier between its shrink and its expand.
// Int8 Bt is read in 64-column strips over all its rows instead (expand_strips_int8), where
// that path exists: its sums stay in registers.
// h holds the group's tokens' sums h_stride apart; the next group's rows may be of another
// rank, so its prefetch covers the places of this group's rows (those it shares).
template <int N, typename T, typename W>
void decode_group(const Group &group, const Group &next, const Inputs<T> &in,
                  int64_t in_features, const W *a, const float *scales, int64_t num_modules,
                  const W *const *b, const int64_t *outs, float *h, int64_t h_stride, T *y,
                  int64_t y_stride) {
  const int64_t rank = group.rank, nr = num_modules * rank;
  constexpr int R = ways_for(N);
  const W *rows = a + group.a_row * in_features;
  const float *row_scales = scales ? scales + group.a_row : nullptr;
  const int64_t ahead = (next.a_row - group.a_row) * in_features;
  int64_t j = 0;
  for (; j + R <= nr; j += R) {
    shrink_rows<N, R>(rows + j * in_features, in, in_features, h + j, h_stride, ahead,
                      row_scales ? row_scales + j : nullptr);
  }
  for (; j < nr; j++) {
    shrink_rows<N, 1>(rows + j * in_features, in, in_features, h + j, h_stride, ahead,
                      row_scales ? row_scales + j : nullptr);
  }
  for (int64_t i = 0, column = 0; i < num_modules; column += outs[i], i++) {
    const W *bt = b[i] + group.b_row * outs[i];
    const int64_t bt_ahead = (next.b_row - group.b_row) * outs[i];
    int64_t done = 0;  // columns expand_strips_int8 took
    if constexpr (kQuantizesInputs<W>) {
#if defined(__AVX512VNNI__)
      done = expand_strips_int8<N>(bt, rank, outs[i], h + i * rank, h_stride, y + column,
                                   y_stride, bt_ahead);
#endif
    }
    if (done < outs[i]) {
      expand_rows<N>(bt + done, rank, outs[i], h + i * rank, h_stride, y + column + done,
                     y_stride, bt_ahead, outs[i] - done);
    }
  }
}

// The count values from start on, into L2.
template <typename T>
void prefetch_lines(const T *start, int64_t count) {
  const char *bytes = reinterpret_cast<const char *>(start);
  for (int64_t k = 0; k < count * static_cast<int64_t>(sizeof(T)); k += 64) {
    __builtin_prefetch(bytes + k, 0, 1);
  }
}

// Prefill groups against int8 slots read a copy of their slots' weights in T, made once a call
// (so once for all the groups of a prefill chunk): A's rows times their scales, and Bt as it is
// (int8 values are exact in bf16). Each group's slot is renumbered to its place in the copy.
// Against int16 inputs their shrink would cost an input conversion per token comparable to the
// rank-16 shrink itself; in T they take the bf16 dot products of the other prefill groups.
// Copied slot u's rows start at row u * n * max_rank of the copy's A and u * max_rank of its Bt.
template <typename T>
struct SlotCopy {
  std::vector<Group> slots;   // place in the copy -> a group of that slot (its rank and rows)
  int64_t max_rank = 0;       // of the copied slots
  std::unique_ptr<T[]> a;     // [copied slots, n * max_rank, in]
  std::unique_ptr<T[]> b[3];  // [copied slots, max_rank, out_i]
};

template <typename T>
SlotCopy<T> plan_slot_copy(std::vector<Group> &groups, int64_t num_slots, int64_t in_features,
                           int64_t num_modules, const int64_t *outs) {
  SlotCopy<T> copy;
  std::vector<int64_t> place(num_slots, -1);
  for (const Group &group : groups) {
    if (place[group.slot] < 0) {
      place[group.slot] = static_cast<int64_t>(copy.slots.size());
      copy.slots.push_back(group);
      copy.max_rank = std::max(copy.max_rank, group.rank);
    }
  }
  for (Group &group : groups) {
    group.a_row = place[group.slot] * num_modules * copy.max_rank;
    group.b_row = place[group.slot] * copy.max_rank;
  }
  const int64_t copied = static_cast<int64_t>(copy.slots.size());
  copy.a.reset(new T[copied * num_modules * copy.max_rank * in_features]);
  for (int64_t i = 0; i < num_modules; i++) {
    copy.b[i].reset(new T[copied * copy.max_rank * outs[i]]);
  }
  return copy;
}

template <typename T>
void dequantize_row(const int8_t *row, float scale, int64_t count, T *target) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) store16(target + i, load16(row + i) * scale);
  for (; i < count; i++) store(target + i, scale * load(row[i]));
}

// T: the inputs' and outputs' type; W: the adapter weights', T or int8 (then with scales, one per
// row of A: [n * R], the product of that row's scale and its Bt row's).
template <typename T, typename W>
int add_lora(int64_t num_segments, const int64_t *segments, int64_t num_tokens,
             int64_t num_slots, const int64_t *places, int64_t num_rows, const T *x,
             int64_t x_stride, int64_t in_features, const W *a, const float *scales,
             int64_t num_modules, const W *const *b, const int64_t *outs, T *y,
             int64_t y_stride, int num_threads) {
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;
  // Decoding groups (a few tokens) each go whole to one thread when there are enough of them to
  // keep every thread busy; the rest (prefill) are split into row chunks (shrink) and column
  // blocks (expand) across the threads. Int8 decoding groups always go whole: the split work
  // would copy their weights first.
  std::vector<Group> decoding, groups;
  int64_t max_rank = 0;  // of the slots in use: h's width per token is n * max_rank
  for (int64_t k = 0; k < num_segments; k++) {
    const int64_t slot = segments[3 * k], start = segments[3 * k + 1], end = segments[3 * k + 2];
    if (slot < 0 || slot >= num_slots || start < 0 || end > num_tokens || start >= end) {
      return 1;
    }
    const int64_t row = places[2 * slot], rank = places[2 * slot + 1];
    if (row < 0 || rank < 1 || rank > num_rows - row) return 1;
    max_rank = std::max(max_rank, rank);
    for (int64_t first = start; first < end; first += kGroup) {
      const int64_t count = std::min<int64_t>(kGroup, end - first);
      (count <= kDecodeTokens ? decoding : groups)
          .push_back({slot, first, count, rank, num_modules * row, row});
    }
  }
  if (!kInt8 && static_cast<int64_t>(decoding.size()) < num_threads) {
    groups.insert(groups.end(), decoding.begin(), decoding.end());
    decoding.clear();
  }
  const int64_t h_stride = num_modules * max_rank;
  std::vector<Block> blocks;
  for (int64_t i = 0, column = 0; i < num_modules; column += outs[i], i++) {
    for (int64_t first = 0; first < outs[i]; first += kBlock) {
      blocks.push_back({i, column, first, std::min(first + kBlock, outs[i])});
    }
  }
  // The weights the split work reads: the slots' rows themselves, or their copy in T.
  const T *split_a = nullptr;
  const T *split_b[3] = {};
  SlotCopy<T> copy;
  if constexpr (kInt8) {
    if (!groups.empty()) {
      copy = plan_slot_copy<T>(groups, num_slots, in_features, num_modules, outs);
      split_a = copy.a.get();
      for (int64_t i = 0; i < num_modules; i++) split_b[i] = copy.b[i].get();
    }
  } else {
    split_a = a;
    for (int64_t i = 0; i < num_modules; i++) split_b[i] = b[i];
  }
  const int64_t num_copied = static_cast<int64_t>(copy.slots.size());
  const int64_t num_decoding = static_cast<int64_t>(decoding.size());
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // Scratch, uninitialised: only the listed tokens' rows are written and read.
  std::unique_ptr<float[]> h(new float[num_tokens * h_stride]);  // [num_tokens, n * max_rank]
  // Copies of the inputs: float32 [num_tokens, in] of every token where the shrink of T or W
  // weights widens them; int16 [num_tokens, in] and their scales [num_tokens] of the decoding
  // tokens where kQuantizesInputs.
  constexpr bool kWidens = kWidensInputs<T, T> || kWidensInputs<T, W>;
  std::unique_ptr<float[]> xf, xs;
  std::unique_ptr<int16_t[]> xq;
  if constexpr (kWidens) xf.reset(new float[num_tokens * in_features]);
  if constexpr (kQuantizesInputs<W>) {
    xq.reset(new int16_t[num_tokens * in_features]);
    xs.reset(new float[num_tokens]);
  }
  auto inputs = [&](int64_t first) {  // the group's from token first on
    return Inputs<T>{x + first * x_stride, x_stride,
                     xf ? xf.get() + first * in_features : nullptr,
                     xq ? xq.get() + first * in_features : nullptr,
                     xs ? xs.get() + first : nullptr};
  };

#pragma omp parallel num_threads(num_threads)
  {
    if constexpr (kWidens || kQuantizesInputs<W>) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < num_decoding + num_groups; k++) {  // by groups: a long segment
        const bool is_decoding = k < num_decoding;              // is many groups
        const Group &group = is_decoding ? decoding[k] : groups[k - num_decoding];
        for (int64_t t = group.first; t < group.first + group.count; t++) {
          const T *input = x + t * x_stride;
          if constexpr (kQuantizesInputs<W>) {
            if (is_decoding) xs[t] = quantize_input(input, in_features, xq.get() + t * in_features);
          }
          if constexpr (kWidens) {
            float *converted = xf.get() + t * in_features;
#pragma omp simd
            for (int64_t i = 0; i < in_features; i++) converted[i] = load(input[i]);
          }
        }
      }
    }
    if constexpr (kInt8) {
      const int64_t copy_rows = num_modules * copy.max_rank;  // of each copied slot
#pragma omp for collapse(2) schedule(static)
      for (int64_t u = 0; u < num_copied; u++) {
        for (int64_t k = 0; k < copy_rows; k++) {
          const Group &source = copy.slots[u];  // its a_row, b_row: the slot's own rows
          if (k >= num_modules * source.rank) continue;
          const int64_t row = source.a_row + k;
          dequantize_row(a + row * in_features, scales[row], in_features,
                         copy.a.get() + (u * copy_rows + k) * in_features);
          if (k < source.rank) {  // Bt row k of each module
            for (int64_t m = 0; m < num_modules; m++) {
              dequantize_row(b[m] + (source.b_row + k) * outs[m], 1.f, outs[m],
                             copy.b[m].get() + (u * copy.max_rank + k) * outs[m]);
            }
          }
        }
      }
    }
    // Each thread takes consecutive decoding groups, so it knows the slot it reads next; its
    // first group's matrices, which no earlier group prefetched, come in one burst.
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t share = (num_decoding + threads - 1) / threads;
    const int64_t begin = std::min(num_decoding, thread * share);
    const int64_t finish = std::min(num_decoding, begin + share);
    if (begin < finish) {
      const Group &group = decoding[begin];
      prefetch_lines(a + group.a_row * in_features, num_modules * group.rank * in_features);
      for (int64_t i = 0; i < num_modules; i++) {
        prefetch_lines(b[i] + group.b_row * outs[i], group.rank * outs[i]);
      }
    }
    for (int64_t d = begin; d < finish; d++) {
      const Group &group = decoding[d];
      const Group &next = d + 1 < finish ? decoding[d + 1] : group;
      auto run = [&](auto n) {
        decode_group<decltype(n)::value>(group, next, inputs(group.first), in_features, a,
                                         scales, num_modules, b, outs,
                                         h.get() + group.first * h_stride, h_stride,
                                         y + group.first * y_stride, y_stride);
      };
      if (group.count == 1) {
        run(std::integral_constant<int, 1>{});
      } else {
        run(std::integral_constant<int, kDecodeTokens>{});
      }
    }
    // Shrink: kChains rows of A (fewer at the end) against the group's inputs; a group of a
    // lower rank than the largest skips the chunks past its rows.
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < num_groups; g++) {
      for (int64_t first = 0; first < h_stride; first += kChains) {
        const Group &group = groups[g];
        const int64_t nr = num_modules * group.rank;
        if (first >= nr) continue;
        const T *rows = split_a + (group.a_row + first) * in_features;
        const Inputs<T> in = inputs(group.first);
        float *sums = h.get() + group.first * h_stride + first;
        with_constant<kGroup>(group.count, [&](auto n) {
          constexpr int N = decltype(n)::value, R = ways_for(N);
          int64_t j = first;
          const int64_t end = std::min(first + kChains, nr);
          for (; j + R <= end; j += R) {  // prefetching the next R rows
            shrink_rows<N, R>(rows + (j - first) * in_features, in, in_features,
                              sums + (j - first), h_stride, R * in_features, nullptr);
          }
          for (; j < end; j++) {
            shrink_rows<N, 1>(rows + (j - first) * in_features, in, in_features,
                              sums + (j - first), h_stride, in_features, nullptr);
          }
        });
      }
    }
    // Expand: a block of output columns from r rows of Bt.
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < num_groups; g++) {
      for (int64_t k = 0; k < num_blocks; k++) {
        const Group &group = groups[g];
        const Block &block = blocks[k];
        const int64_t out = outs[block.module];
        const T *bt = split_b[block.module] + group.b_row * out;
        const float *hr = h.get() + group.first * h_stride + block.module * group.rank;
        T *target = y + group.first * y_stride + block.column;
        with_constant<kGroup>(group.count, [&](auto n) {
          expand_block<decltype(n)::value>(bt, group.rank, out, hr, h_stride, block.first,
                                           block.end, target, y_stride);
        });
      }
    }
  }
  return 0;
}

// Rows of T as int8 with one step each (lora/quantize.py, quantize): step = absmax / 127 and
// q = round(v / step) to nearest even, the same float32 operations as the PyTorch path, so both
// give the same bytes. Rows [outer, inner, cols], at src / dst strides (in elements) per outer
// and inner index, columns contiguous; steps [outer, inner] contiguous.
template <typename T>
void quantize_rows(const T *src, int64_t outer, int64_t inner, int64_t cols, int64_t src_outer,
                   int64_t src_inner, int8_t *dst, int64_t dst_outer, int64_t dst_inner,
                   float *steps, int num_threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
  for (int64_t o = 0; o < outer; o++) {
    for (int64_t i = 0; i < inner; i++) {
      const T *row = src + o * src_outer + i * src_inner;
      int8_t *target = dst + o * dst_outer + i * dst_inner;
      const float step = largest_magnitude(row, cols) / 127.f;
      const float divisor = std::max(step, std::numeric_limits<float>::min());
      int64_t c = 0;
#if defined(__AVX512F__)
      for (; c + kLanes <= cols; c += kLanes) {  // division and rounding as below, 16 at a time
        const __m512i q = _mm512_cvtps_epi32((__m512)(load16(row + c) / divisor));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(target + c), _mm512_cvtsepi32_epi8(q));
      }
#endif
      for (; c < cols; c++) target[c] = static_cast<int8_t>(std::nearbyint(load(row[c]) / divisor));
      steps[o * inner + i] = step;
    }
  }
}

}  // namespace

// One entry point per (activation dtype, weight dtype). segments: [num_segments, 3] int64 (slot,
// start, end); places: [num_slots, 2] int64 (first Bt row, rank) of each slot, inside the
// num_rows rows of each Bt; b0..b2 and out0..out2: the Bt and width of each of the num_modules
// (1 to 3) modules; scales: [n * num_rows] float32 for int8 weights, else ignored. Returns 0, or
// 1 when a segment or a slot's rows are out of range (nothing is written then).
#define LORAPLEX_ENTRY(NAME, T, W)                                                             \
  extern "C" int NAME(int64_t num_segments, const int64_t *segments, int64_t num_tokens,       \
                      int64_t num_slots, const int64_t *places, int64_t num_rows,              \
                      const void *x, int64_t x_stride, int64_t in_features, const void *a,     \
                      const float *scales, int64_t num_modules, const void *b0,                \
                      const void *b1, const void *b2, int64_t out0, int64_t out1,              \
                      int64_t out2, void *y, int64_t y_stride, int num_threads) {              \
    const W *b[3] = {static_cast<const W *>(b0), static_cast<const W *>(b1),                   \
                     static_cast<const W *>(b2)};                                              \
    const int64_t outs[3] = {out0, out1, out2};                                                \
    if (num_modules < 1 || num_modules > 3) return 1;                                          \
    return add_lora<T, W>(num_segments, segments, num_tokens, num_slots, places, num_rows,    \
                          static_cast<const T *>(x), x_stride, in_features,                   \
                          static_cast<const W *>(a), scales, num_modules, b, outs,            \
                          static_cast<T *>(y), y_stride, num_threads);                        \
  }

LORAPLEX_ENTRY(add_lora_f32, float, float)
LORAPLEX_ENTRY(add_lora_bf16, BFloat16, BFloat16)
LORAPLEX_ENTRY(add_lora_f32_int8, float, int8_t)
LORAPLEX_ENTRY(add_lora_bf16_int8, BFloat16, int8_t)

#define LORAPLEX_QUANTIZE_ENTRY(NAME, T)                                                        \
  extern "C" void NAME(const void *src, int64_t outer, int64_t inner, int64_t cols,           \
                       int64_t src_outer, int64_t src_inner, int8_t *dst, int64_t dst_outer,   \
                       int64_t dst_inner, float *steps, int num_threads) {                     \
    quantize_rows<T>(static_cast<const T *>(src), outer, inner, cols, src_outer, src_inner,    \
                     dst, dst_outer, dst_inner, steps, num_threads);                           \
  }

LORAPLEX_QUANTIZE_ENTRY(quantize_rows_f32, float)
LORAPLEX_QUANTIZE_ENTRY(quantize_rows_bf16, BFloat16)
