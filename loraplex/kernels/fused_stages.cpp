// loraplex's CPU kernels for the small stages between a layer's matmuls (model/llama.py): each
// replaces the chain of PyTorch ops the reference path runs (six to twenty), every one of
// which costs its dispatch and a pass over memory. At one decoding token a step is mostly such
// overhead (about 60 ops a layer), not arithmetic.
//
// Semantics: exactly the reference path's, rounding to the model dtype T where it rounds (each
// PyTorch op on bf16 computes in float32 and rounds its result):
//   rms_norm:   [x = x + h]  n = x * rsqrt(mean(x^2) + eps) in float32;
//               out = w * round(n), or with unit_offset (Gemma) out = n * (1 + w), rounded once
//   rope_kv:    per token, per query and key head: [head rms_norm as above], then
//               out = round(v * cos) + round(rotate_half(v) * sin), rounded; keys and values
//               are written to the layer's KV cache rows, queries and keys to qk_out
//   gated_act:  out = round(act(gate)) * up, act SiLU or tanh-approximated GELU, in float32
// Rows (tokens) are split across threads only when there are many (a prefill chunk): a thread
// team costs more than a decode token's work.

#include <cmath>

#include "vectors.h"

namespace {

constexpr int64_t kRowsPerThread = 16;  // below 2x this, one thread does every row

inline float round_to(float v, float) { return v; }
inline float round_to(float v, BFloat16) {
  BFloat16 b;
  store(&b, v);
  return load(b);
}

// 1 / sqrt(mean(x^2) + eps) of one row, summed in float32 (16 lanes, then a tree).
template <typename T>
float inverse_rms(const T *x, int64_t dim, float eps) {
  f32x16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    const f32x16 v = load16(x + i);
    acc += v * v;
  }
  float sum = sum_lanes(acc);
  for (; i < dim; i++) sum += load(x[i]) * load(x[i]);
  return 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
}

// out[i] = the normalised, weighted x[i] (the semantics above); out may be x.
template <typename T>
void norm_row(const T *x, int64_t dim, const T *w, float eps, bool unit_offset, T *out) {
  const float inv = inverse_rms(x, dim, eps);
  for (int64_t i = 0; i < dim; i++) {
    const float n = load(x[i]) * inv;
    store(out + i, unit_offset ? n * (1.0f + load(w[i])) : load(w[i]) * round_to(n, T{}));
  }
}

template <typename T>
void rms_norm(int64_t rows, int64_t dim, T *x, int64_t x_stride, const T *h, int64_t h_stride,
              const T *w, float eps, bool unit_offset, T *out, int64_t out_stride,
              int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows >= 2 * kRowsPerThread)
  for (int64_t r = 0; r < rows; r++) {
    T *row = x + r * x_stride;
    if (h != nullptr) {  // the residual stream takes the sublayer's output first, rounded
      for (int64_t i = 0; i < dim; i++) store(row + i, load(row[i]) + load(h[r * h_stride + i]));
    }
    norm_row(row, dim, w, eps, unit_offset, out + r * out_stride);
  }
}

// One head of one token: [its rms_norm], then rotated by RoPE into out.
template <typename T>
void rotate_head(const T *v, int64_t dim, const T *cos, const T *sin, const T *norm_w, float eps,
                 bool unit_offset, T *out) {
  T normed[512];  // head_dim <= 512, checked by the entry point
  if (norm_w != nullptr) {
    norm_row(v, dim, norm_w, eps, unit_offset, normed);
    v = normed;
  }
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; d++) {
    const float rotated = d < half ? -load(v[d + half]) : load(v[d - half]);
    const float a = round_to(load(v[d]) * load(cos[d]), T{});
    const float b = round_to(rotated * load(sin[d]), T{});
    store(out + d, a + b);
  }
}

template <typename T>
int rope_kv(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, const T *qkv,
            int64_t qkv_stride, const T *cos, const T *sin, const T *q_norm_w,
            const T *k_norm_w, float eps, bool unit_offset, T *kv, int64_t num_rows,
            const int64_t *slot_mapping, T *qk_out, int num_threads) {
  for (int64_t t = 0; t < tokens; t++) {
    if (slot_mapping[t] < 0 || slot_mapping[t] >= num_rows) return 1;
  }
  const int64_t row = kv_heads * dim;  // one cached token's keys (or values)
  T *keys = kv, *values = kv + num_rows * row;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (tokens >= 2 * kRowsPerThread)
  for (int64_t t = 0; t < tokens; t++) {
    const T *src = qkv + t * qkv_stride;  // [q heads | k heads | v heads] x dim
    const T *c = cos + t * dim, *s = sin + t * dim;
    T *dst = qk_out + t * (heads + kv_heads) * dim;
    for (int64_t h = 0; h < heads; h++) {
      rotate_head(src + h * dim, dim, c, s, q_norm_w, eps, unit_offset, dst + h * dim);
    }
    for (int64_t h = heads; h < heads + kv_heads; h++) {
      rotate_head(src + h * dim, dim, c, s, k_norm_w, eps, unit_offset, dst + h * dim);
    }
    std::memcpy(keys + slot_mapping[t] * row, dst + heads * dim, row * sizeof(T));
    std::memcpy(values + slot_mapping[t] * row, src + (heads + kv_heads) * dim, row * sizeof(T));
  }
  return 0;
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }
inline float gelu_tanh(float g) {
  const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);  // sqrt(2/pi)
  return 0.5f * g * (1.0f + std::tanh(inner));
}

template <typename T>
void gated_act(int64_t rows, int64_t inter, const T *gate_up, int64_t stride, int act, T *out,
               int64_t out_stride, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows >= 2 * kRowsPerThread)
  for (int64_t r = 0; r < rows; r++) {
    const T *gate = gate_up + r * stride, *up = gate + inter;
    for (int64_t i = 0; i < inter; i++) {
      const float g = load(gate[i]);
      const float a = round_to(act == 0 ? silu(g) : gelu_tanh(g), T{});
      store(out + r * out_stride + i, a * load(up[i]));
    }
  }
}

}  // namespace

// Entry points per dtype; every row's last dimension is contiguous, strides in elements.
#define LORAPLEX_STAGES_ENTRIES(SUFFIX, T)                                                     \
  extern "C" void rms_norm_##SUFFIX(int64_t rows, int64_t dim, void *x, int64_t x_stride,      \
                                    const void *h, int64_t h_stride, const void *w, float eps, \
                                    int unit_offset, void *out, int64_t out_stride,            \
                                    int num_threads) {                                         \
    rms_norm<T>(rows, dim, static_cast<T *>(x), x_stride, static_cast<const T *>(h),           \
                h_stride, static_cast<const T *>(w), eps, unit_offset != 0,                    \
                static_cast<T *>(out), out_stride, num_threads);                               \
  }                                                                                            \
  /* Returns 0; 1 when a slot_mapping row is out of range (nothing written); 2 for a */        \
  /* head_dim it does not take (odd or above 512). */                                          \
  extern "C" int rope_kv_##SUFFIX(int64_t tokens, int64_t heads, int64_t kv_heads,             \
                                  int64_t dim, const void *qkv, int64_t qkv_stride,            \
                                  const void *cos, const void *sin, const void *q_norm_w,      \
                                  const void *k_norm_w, float eps, int unit_offset, void *kv,  \
                                  int64_t num_rows, const int64_t *slot_mapping,               \
                                  void *qk_out, int num_threads) {                             \
    if (dim % 2 != 0 || dim > 512) return 2;                                                   \
    return rope_kv<T>(tokens, heads, kv_heads, dim, static_cast<const T *>(qkv), qkv_stride,   \
                      static_cast<const T *>(cos), static_cast<const T *>(sin),                \
                      static_cast<const T *>(q_norm_w), static_cast<const T *>(k_norm_w), eps, \
                      unit_offset != 0, static_cast<T *>(kv), num_rows, slot_mapping,          \
                      static_cast<T *>(qk_out), num_threads);                                  \
  }                                                                                            \
  extern "C" void gated_act_##SUFFIX(int64_t rows, int64_t inter, const void *gate_up,         \
                                     int64_t stride, int act, void *out, int64_t out_stride,   \
                                     int num_threads) {                                        \
    gated_act<T>(rows, inter, static_cast<const T *>(gate_up), stride, act,                    \
                 static_cast<T *>(out), out_stride, num_threads);                              \
  }

LORAPLEX_STAGES_ENTRIES(f32, float)
LORAPLEX_STAGES_ENTRIES(bf16, BFloat16)
