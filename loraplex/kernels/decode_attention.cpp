// loraplex's CPU kernel for decode attention: one new query per sequence against its cached
// keys and values, read where they lie in the paged KV cache (model/llama.py, Attention).
//
// Semantics, for each decoding sequence b and query head h (kv head k = h / group):
//     scores[t] = scale * q[b, h] . K[rows[b, t], k]       for t < lens[b], float32 sums
//     out[b, h] = softmax(scores) @ V[rows[b, t], k]
// K and V are the two halves of the layer's cache [2, num_rows, kv_heads, head_dim].
//
// Why our own loop: PyTorch's way first gathers every sequence's keys and values out of the
// pages into a padded copy, then copies them again into the layout its matmul wants; those
// copies were most of a decode step's attention time. Here every cached row is read once, the
// group of query heads sharing a kv head reads it together, and scores and softmax are float32.

#include <algorithm>
#include <vector>

#include "vectors.h"

namespace {

constexpr int kMaxGroup = 16;  // query heads per kv head

// exp(x) of 16 lanes, for x <= 0 (scores minus their maximum): x = n ln2 + r with |r| <= ln2/2,
// exp(x) = 2^n * p(r), p the degree-6 Taylor polynomial (relative error about 2e-7, a float32
// step); below -87 (2^-126, the smallest normal float) it is 0.
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 too_small = (f32x16)(x < -87.0f);
  x = x < -87.0f ? -87.0f : x;
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const i32x16 n = -__builtin_convertvector(0.5f - x * 1.44269504f, i32x16);  // round(x / ln2)
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = x - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;  // ln2 in two parts
  f32x16 p = 1.0f / 120 + r * (1.0f / 720);
  p = 1.0f / 24 + r * p;
  p = 1.0f / 6 + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  const f32x16 power = (f32x16)((n + 127) << 23);  // 2^n, built in the exponent bits
  return (f32x16)((i32x16)(p * power) & ~(i32x16)too_small);
}

// One sequence and one kv head: its `group` query heads at once. D = head_dim / kLanes.
template <int D, typename T>
void attend(const T *q, int64_t q_head_stride, int group, const T *keys, const T *values,
            int64_t row_stride, const int64_t *rows, int64_t len, float scale, T *out,
            int64_t out_head_stride, std::vector<float> &scores) {
  f32x16 query[kMaxGroup][D];
  for (int g = 0; g < group; g++) {
    for (int v = 0; v < D; v++) query[g][v] = load16(q + g * q_head_stride + v * kLanes) * scale;
  }
  scores.resize(group * len);
  for (int64_t t = 0; t < len; t++) {
    if (t + 2 < len) __builtin_prefetch(keys + rows[t + 2] * row_stride);  // rows are scattered
    f32x16 key[D];
    for (int v = 0; v < D; v++) key[v] = load16(keys + rows[t] * row_stride + v * kLanes);
    for (int g = 0; g < group; g++) {
      f32x16 sum = query[g][0] * key[0];
      for (int v = 1; v < D; v++) sum += query[g][v] * key[v];
      scores[g * len + t] = sum_lanes(sum);
    }
  }
  float totals[kMaxGroup];
  for (int g = 0; g < group; g++) {  // softmax numerators in place, and their sum
    float *s = scores.data() + g * len;
    const float top = *std::max_element(s, s + len);
    f32x16 sums = {};
    int64_t t = 0;
    for (; t + kLanes <= len; t += kLanes) {
      const f32x16 e = exp_nonpositive(load16(s + t) - top);
      store16(s + t, e);
      sums += e;
    }
    if (t < len) {  // the last scores: padded with -inf lanes, whose exp is 0
      float tail[kLanes];
      std::fill(tail, tail + kLanes, -1e30f);
      std::copy(s + t, s + len, tail);
      const f32x16 e = exp_nonpositive(load16(tail) - top);
      store16(tail, e);
      std::copy(tail, tail + (len - t), s + t);
      sums += e;
    }
    totals[g] = sum_lanes(sums);
  }
  f32x16 acc[kMaxGroup][D] = {};
  for (int64_t t = 0; t < len; t++) {
    if (t + 2 < len) __builtin_prefetch(values + rows[t + 2] * row_stride);
    f32x16 value[D];
    for (int v = 0; v < D; v++) value[v] = load16(values + rows[t] * row_stride + v * kLanes);
    for (int g = 0; g < group; g++) {
      const float p = scores[g * len + t];
      for (int v = 0; v < D; v++) acc[g][v] += p * value[v];
    }
  }
  for (int g = 0; g < group; g++) {
    for (int v = 0; v < D; v++) {
      store16(out + g * out_head_stride + v * kLanes, acc[g][v] * (1.0f / totals[g]));
    }
  }
}

// The shapes built: head_dim 16 to 128 by 16, or 256 (D = head_dim / kLanes vectors a head),
// and up to kMaxGroup query heads per kv head.
bool shape_is_built(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  return num_kv_heads >= 1 && num_heads % num_kv_heads == 0 &&
         num_heads / num_kv_heads <= kMaxGroup && head_dim % kLanes == 0 &&
         (head_dim <= 8 * kLanes || head_dim == 16 * kLanes);
}

template <typename T>
int decode_attention(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     const T *q, int64_t q_seq_stride, int64_t q_head_stride, const T *kv,
                     int64_t num_rows, const int64_t *rows, int64_t rows_stride,
                     const int64_t *lens, int64_t width, float scale, T *out,
                     int64_t out_seq_stride, int64_t out_head_stride, int num_threads) {
  if (!shape_is_built(num_heads, num_kv_heads, head_dim)) return 2;
  for (int64_t b = 0; b < num_seqs; b++) {  // every index is checked before anything is read
    if (lens[b] < 1 || lens[b] > width) return 1;
    for (int64_t t = 0; t < lens[b]; t++) {
      const int64_t row = rows[b * rows_stride + t];
      if (row < 0 || row >= num_rows) return 1;
    }
  }
  const int group = static_cast<int>(num_heads / num_kv_heads);
  const int64_t row_stride = num_kv_heads * head_dim;  // one cached token's keys (or values)
  const T *values = kv + num_rows * row_stride;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic)
    for (int64_t unit = 0; unit < num_seqs * num_kv_heads; unit++) {
      const int64_t b = unit / num_kv_heads, k = unit % num_kv_heads;
      const int64_t h = k * group;  // its first query head
      with_constant<16>(head_dim / kLanes, [&](auto d) {
        attend<decltype(d)::value>(q + b * q_seq_stride + h * q_head_stride, q_head_stride,
                                   group, kv + k * head_dim, values + k * head_dim, row_stride,
                                   rows + b * rows_stride, lens[b], scale,
                                   out + b * out_seq_stride + h * out_head_stride,
                                   out_head_stride, scores);
      });
    }
  }
  return 0;
}

}  // namespace

// One entry point per dtype. q and out: [num_seqs, num_heads, head_dim] at the given strides
// (head_dim contiguous); kv: the layer's cache [2, num_rows, num_kv_heads, head_dim],
// contiguous; rows: [num_seqs, width] cache rows (rows_stride apart); lens: [num_seqs].
// Returns 0; 1 when a length or row is out of range; 2 for a shape it does not take (head_dim
// not among 16, 32, ..., 128 and 256; more than 16 query heads per kv head). Nothing is
// written unless 0.
#define LORAPLEX_ATTENTION_ENTRY(NAME, T)                                                     \
  extern "C" int NAME(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,               \
                      int64_t head_dim, const void *q, int64_t q_seq_stride,                   \
                      int64_t q_head_stride, const void *kv, int64_t num_rows,                 \
                      const int64_t *rows, int64_t rows_stride, const int64_t *lens,           \
                      int64_t width, float scale, void *out, int64_t out_seq_stride,           \
                      int64_t out_head_stride, int num_threads) {                              \
    return decode_attention<T>(num_seqs, num_heads, num_kv_heads, head_dim,                    \
                               static_cast<const T *>(q), q_seq_stride, q_head_stride,         \
                               static_cast<const T *>(kv), num_rows, rows, rows_stride, lens,  \
                               width, scale, static_cast<T *>(out), out_seq_stride,            \
                               out_head_stride, num_threads);                                 \
  }

// Whether the kernel is built for a model of this shape (1) or not (0).
extern "C" int decode_attention_takes(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  return shape_is_built(num_heads, num_kv_heads, head_dim);
}

LORAPLEX_ATTENTION_ENTRY(decode_attention_f32, float)
LORAPLEX_ATTENTION_ENTRY(decode_attention_bf16, BFloat16)
