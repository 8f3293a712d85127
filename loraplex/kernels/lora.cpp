// loraplex's CPU kernel: the mixed-adapter LoRA op (lora/ops.py, add_lora).
//
// Semantics, for each segment (s, start, end) and each token t in [start, end) of it:
//     h = A[s] @ x[t]                                   n * r values, float32 sums
//     y[t, columns of module i] += h[i*r:(i+1)*r] @ Bt_i[s]
// A [num_slots, n * r, in] and Bt_i [num_slots, r, out_i] (B transposed) contiguous; x and y
// rows at the given strides; y's module columns side by side in module order.
//
// Why our own loops: a decoding token reads its own adapter's matrices once, so that work is
// bound by memory traffic, and PyTorch's batched small matmuls move ~8 GB/s here. A prefill
// segment is the opposite case, many tokens on one slot, but its matmuls are small (rank 16) and
// PyTorch's bf16 matmul costs ~20 us a call before any work. Here both are one pass: the tokens
// of a segment go in groups of up to kGroup that share every load (and bf16 conversion) of a
// weight, rows are read contiguously, and the inner loops are kLanes floats wide (one AVX-512
// register) so the compiler keeps the group's sums in registers. In bf16 on CPUs with bf16 dot
// products (AVX512_BF16) the shrink multiplies bf16 directly, 32 products an instruction. The
// threads are OpenMP's, the same runtime PyTorch's own ops use.

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "vectors.h"

namespace {

constexpr int kGroup = 8;        // tokens of one segment computed together
constexpr int64_t kBlock = 256;  // output columns of one unit of expand work

struct Group {
  int64_t slot, first, count;  // tokens first .. first + count - 1, all on slot
};

struct Block {
  int64_t module, column, first, end;  // y columns [column + first, column + end) of module
};

// Independent sums one loop keeps going: a single chain of FMAs waits on each add's latency,
// so a small group (a decoding token is a group of one) works several rows or column vectors
// at once to keep enough loads in flight to reach memory speed.
constexpr int kChains = 8;
constexpr int ways_for(int n) { return n >= kChains ? 1 : kChains / n; }

// A dot product's vector part plus its last terms, from column i on, in float32.
template <typename T>
float dot_tail(float total, const T *row, const float *xf, int64_t i, int64_t in_features) {
  for (; i < in_features; i++) total += load(row[i]) * xf[i];
  return total;
}

// h[g * nr + k] = A row k . xf[g] for R consecutive rows of A and the N tokens of a group
// (xf: their float32 inputs, in_features apart), in float32 multiply-adds.
template <int N, int R, typename T>
void shrink_rows_f32(const T *rows, const float *xf, int64_t in_features, float *h, int64_t nr) {
  f32x16 sums[R][N] = {};
  int64_t i = 0;
  for (; i + kLanes <= in_features; i += kLanes) {
    f32x16 inputs[N];
    for (int g = 0; g < N; g++) inputs[g] = load16(xf + g * in_features + i);
    for (int k = 0; k < R; k++) {
      // The same place R rows on: short rows in parallel outpace the hardware prefetcher.
      __builtin_prefetch(rows + (R + k) * in_features + i);
      const f32x16 w = load16(rows + k * in_features + i);
      for (int g = 0; g < N; g++) sums[k][g] += w * inputs[g];
    }
  }
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) {
      h[g * nr + k] = dot_tail(sum_lanes(sums[k][g]), rows + k * in_features,
                               xf + g * in_features, i, in_features);
    }
  }
}

#if defined(__AVX512BF16__)
// shrink_rows_f32 for bf16 on CPUs with bf16 dot products: A's rows against the tokens' own bf16
// inputs (x, x_stride apart), 32 products an instruction (vdpbf16ps) summed in float32, no
// conversion; the last in_features % 32 from the float32 copies (xf) as above.
template <int N, int R>
void shrink_rows_bf16(const BFloat16 *rows, const BFloat16 *x, int64_t x_stride, const float *xf,
                      int64_t in_features, float *h, int64_t nr) {
  __m512 sums[R][N];
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) sums[k][g] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 2 * kLanes <= in_features; i += 2 * kLanes) {
    __m512bh inputs[N];
    for (int g = 0; g < N; g++) inputs[g] = (__m512bh)_mm512_loadu_si512(x + g * x_stride + i);
    for (int k = 0; k < R; k++) {
      __builtin_prefetch(rows + (R + k) * in_features + i);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(rows + k * in_features + i);
      for (int g = 0; g < N; g++) sums[k][g] = _mm512_dpbf16_ps(sums[k][g], w, inputs[g]);
    }
  }
  for (int k = 0; k < R; k++) {
    for (int g = 0; g < N; g++) {
      h[g * nr + k] = dot_tail(_mm512_reduce_add_ps(sums[k][g]), rows + k * in_features,
                               xf + g * in_features, i, in_features);
    }
  }
}
#endif

// shrink_rows_f32's result for the tokens whose inputs are x (x_stride apart) and xf, in bf16
// dot products where the CPU has them.
template <int N, int R, typename T>
void shrink_rows(const T *rows, const T *x, int64_t x_stride, const float *xf,
                 int64_t in_features, float *h, int64_t nr) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    shrink_rows_bf16<N, R>(rows, x, x_stride, xf, in_features, h, nr);
    return;
  }
#endif
  shrink_rows_f32<N, R>(rows, xf, in_features, h, nr);
}

// y[g, first:end] += h[g] . Bt[:, first:end] for the N tokens of a group (hr: their r values
// of this module, nr apart; bt: the module's Bt for the slot, [rank, out]), C column vectors
// at a time.
template <int N, int C, typename T>
int64_t expand_columns(const T *bt, int64_t rank, int64_t out, const float *hr, int64_t nr,
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

template <int N, typename T>
void expand_block(const T *bt, int64_t rank, int64_t out, const float *hr, int64_t nr,
                  int64_t first, int64_t end, T *y, int64_t y_stride) {
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

template <typename T>
int add_lora(int64_t num_segments, const int64_t *segments, int64_t num_tokens,
             int64_t num_slots, const T *x, int64_t x_stride, int64_t in_features, const T *a,
             int64_t rank, int64_t num_modules, const T *const *b, const int64_t *outs, T *y,
             int64_t y_stride, int num_threads) {
  std::vector<Group> groups;
  for (int64_t k = 0; k < num_segments; k++) {
    const int64_t slot = segments[3 * k], start = segments[3 * k + 1], end = segments[3 * k + 2];
    if (slot < 0 || slot >= num_slots || start < 0 || end > num_tokens || start >= end) {
      return 1;
    }
    for (int64_t first = start; first < end; first += kGroup) {
      groups.push_back({slot, first, std::min<int64_t>(kGroup, end - first)});
    }
  }
  const int64_t nr = num_modules * rank;
  std::vector<Block> blocks;
  for (int64_t i = 0, column = 0; i < num_modules; column += outs[i], i++) {
    for (int64_t first = 0; first < outs[i]; first += kBlock) {
      blocks.push_back({i, column, first, std::min(first + kBlock, outs[i])});
    }
  }
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // Scratch, uninitialised: only the listed tokens' rows are written and read.
  std::unique_ptr<float[]> xf(new float[num_tokens * in_features]);  // float32 inputs
  std::unique_ptr<float[]> h(new float[num_tokens * nr]);            // [num_tokens, n * r]

#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < num_groups; g++) {
      for (int64_t t = groups[g].first; t < groups[g].first + groups[g].count; t++) {
        const T *input = x + t * x_stride;
        float *converted = xf.get() + t * in_features;
#pragma omp simd
        for (int64_t i = 0; i < in_features; i++) converted[i] = load(input[i]);
      }
    }
    // Shrink: kChains rows of A (fewer at the end) against the group's inputs.
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < num_groups; g++) {
      for (int64_t first = 0; first < nr; first += kChains) {
        const Group &group = groups[g];
        const T *rows = a + (group.slot * nr + first) * in_features;
        const float *inputs = xf.get() + group.first * in_features;
        float *sums = h.get() + group.first * nr + first;
        const T *x_rows = x + group.first * x_stride;
        with_constant<kGroup>(group.count, [&](auto n) {
          constexpr int N = decltype(n)::value, R = ways_for(N);
          int64_t j = first;
          const int64_t end = std::min(first + kChains, nr);
          for (; j + R <= end; j += R) {
            shrink_rows<N, R>(rows + (j - first) * in_features, x_rows, x_stride, inputs,
                              in_features, sums + (j - first), nr);
          }
          for (; j < end; j++) {
            shrink_rows<N, 1>(rows + (j - first) * in_features, x_rows, x_stride, inputs,
                              in_features, sums + (j - first), nr);
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
        const T *bt = b[block.module] + group.slot * rank * out;
        const float *hr = h.get() + group.first * nr + block.module * rank;
        T *target = y + group.first * y_stride + block.column;
        with_constant<kGroup>(group.count, [&](auto n) {
          expand_block<decltype(n)::value>(bt, rank, out, hr, nr, block.first, block.end,
                                           target, y_stride);
        });
      }
    }
  }
  return 0;
}

}  // namespace

// One entry point per dtype. segments: [num_segments, 3] int64 (slot, start, end); b0..b2 and
// out0..out2: the Bt and width of each of the num_modules (1 to 3) modules. Returns 0, or 1 when
// a segment is out of range (nothing is written then).
#define LORAPLEX_ENTRY(NAME, T)                                                                \
  extern "C" int NAME(int64_t num_segments, const int64_t *segments, int64_t num_tokens,       \
                      int64_t num_slots, const void *x, int64_t x_stride, int64_t in_features, \
                      const void *a, int64_t rank, int64_t num_modules, const void *b0,        \
                      const void *b1, const void *b2, int64_t out0, int64_t out1,              \
                      int64_t out2, void *y, int64_t y_stride, int num_threads) {              \
    const T *b[3] = {static_cast<const T *>(b0), static_cast<const T *>(b1),                   \
                     static_cast<const T *>(b2)};                                              \
    const int64_t outs[3] = {out0, out1, out2};                                                \
    if (num_modules < 1 || num_modules > 3) return 1;                                          \
    return add_lora<T>(num_segments, segments, num_tokens, num_slots,                         \
                       static_cast<const T *>(x), x_stride, in_features,                      \
                       static_cast<const T *>(a), rank, num_modules, b, outs,                 \
                       static_cast<T *>(y), y_stride, num_threads);                           \
  }

LORAPLEX_ENTRY(add_lora_f32, float)
LORAPLEX_ENTRY(add_lora_bf16, BFloat16)
