// The short-token part of the mixed-adapter LoRA op (lora/ops.py, add_lora) on CPU.
//
// Semantics, for the m listed tokens (k-th: token t = tokens[k] on slot s = slots[k]):
//     h = A[s] @ x[t]                                   n * r values, float32 sums
//     y[t, columns of module i] += h[i*r:(i+1)*r] @ Bt_i[s]
// A [num_slots, n * r, in] and Bt_i [num_slots, r, out_i] (B transposed) contiguous; x and y
// rows at the given strides; y's module columns side by side in module order.
//
// Why our own loop: a decoding token reads its own adapter's matrices once, so the work is bound
// by memory traffic. PyTorch's batched small matmuls move ~8 GB/s here; these loops run over
// contiguous rows (dot products for the shrink, row updates for the expand), converting bf16 in
// registers, at 2-4x that. The threads are OpenMP's, the same runtime PyTorch's ops use.

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct BFloat16 {
  uint16_t bits;
};

inline float load(float v) { return v; }
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

constexpr int64_t kBlock = 256;  // output columns one thread updates at a time (1 KiB of sums)

struct Block {
  int64_t module, column, first, end;  // y columns [column + first, column + end) of module
};

template <typename T>
int lora_short_tokens(int64_t m, const int64_t *tokens, const int64_t *slots, int64_t num_tokens,
                      int64_t num_slots, const T *x, int64_t x_stride, int64_t in_features,
                      const T *a, int64_t rank, int64_t num_modules, const T *const *b,
                      const int64_t *outs, T *y, int64_t y_stride, int num_threads) {
  for (int64_t k = 0; k < m; k++) {
    if (tokens[k] < 0 || tokens[k] >= num_tokens || slots[k] < 0 || slots[k] >= num_slots) {
      return 1;
    }
  }
  const int64_t nr = num_modules * rank;
  std::vector<Block> blocks;
  for (int64_t i = 0, column = 0; i < num_modules; column += outs[i], i++) {
    for (int64_t first = 0; first < outs[i]; first += kBlock) {
      blocks.push_back({i, column, first, first + kBlock < outs[i] ? first + kBlock : outs[i]});
    }
  }
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::vector<float> h(m * nr);  // [m, n * r]

#pragma omp parallel num_threads(num_threads)
  {
    // Shrink: one dot product of a row of A with the token's input each.
#pragma omp for collapse(2) schedule(static)
    for (int64_t k = 0; k < m; k++) {
      for (int64_t j = 0; j < nr; j++) {
        const T *row = a + (slots[k] * nr + j) * in_features;
        const T *input = x + tokens[k] * x_stride;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < in_features; i++) sum += load(row[i]) * load(input[i]);
        h[k * nr + j] = sum;
      }
    }
    // Expand: a block of output columns is the sum of r rows of Bt scaled by h.
#pragma omp for collapse(2) schedule(static)
    for (int64_t k = 0; k < m; k++) {
      for (int64_t blk = 0; blk < num_blocks; blk++) {
        const Block &block = blocks[blk];
        const int64_t out = outs[block.module], width = block.end - block.first;
        const T *bt = b[block.module] + slots[k] * rank * out + block.first;
        const float *hk = h.data() + k * nr + block.module * rank;
        float sums[kBlock] = {};
        for (int64_t q = 0; q < rank; q++) {
          const float weight = hk[q];
          const T *row = bt + q * out;
#pragma omp simd
          for (int64_t o = 0; o < width; o++) sums[o] += weight * load(row[o]);
        }
        T *target = y + tokens[k] * y_stride + block.column + block.first;
        for (int64_t o = 0; o < width; o++) store(target + o, load(target[o]) + sums[o]);
      }
    }
  }
  return 0;
}

}  // namespace

// One entry point per dtype; 0 on success, 1 when a token or slot index is out of range
// (nothing is written then).
#define LORAPLEX_ENTRY(NAME, T)                                                                \
  extern "C" int NAME(int64_t m, const int64_t *tokens, const int64_t *slots,                  \
                      int64_t num_tokens, int64_t num_slots, const void *x, int64_t x_stride,  \
                      int64_t in_features, const void *a, int64_t rank, int64_t num_modules,   \
                      const void *const *b, const int64_t *outs, void *y, int64_t y_stride,    \
                      int num_threads) {                                                       \
    return lora_short_tokens<T>(m, tokens, slots, num_tokens, num_slots,                       \
                                static_cast<const T *>(x), x_stride, in_features,              \
                                static_cast<const T *>(a), rank, num_modules,                  \
                                reinterpret_cast<const T *const *>(b), outs,                   \
                                static_cast<T *>(y), y_stride, num_threads);                   \
  }

LORAPLEX_ENTRY(lora_short_tokens_f32, float)
LORAPLEX_ENTRY(lora_short_tokens_bf16, BFloat16)
