// Every decoder layer of a decode-only step (each token one decoding sequence's new token, a
// few of them) in one call: the same kernels model/llama.py calls one by one on its fused path
// (rms_norm, linear_rows, add_lora, rope_kv, decode_attention, gated_act), in the same order
// and with the same roundings, so the results are that path's bit for bit. At one token a
// layer's 13 calls from Python cost ~25 us each in wrappers and dispatch, about 10 ms of a
// SmolLM2-135M token against ~20 ms of weight reads; here they are plain C++ calls.
//
// Each layer is a row of kLayerFields int64 values (pointers as integers), filled once by
// kernels/decode_layers.py from the model's parameters, its KV caches and its LoRA slots.

#include <cstdint>
#include <vector>

#include "vectors.h"

#define LORAPLEX_DECLARE(SUFFIX)                                                                 \
  extern "C" void rms_norm_##SUFFIX(int64_t, int64_t, void *, int64_t, const void *, int64_t,  \
                                    const void *, float, int, void *, int64_t, int);           \
  extern "C" int rope_kv_##SUFFIX(int64_t, int64_t, int64_t, int64_t, const void *, int64_t,   \
                                  const void *, const void *, const void *, const void *,      \
                                  float, int, void *, int64_t, const int64_t *, void *, int);  \
  extern "C" void gated_act_##SUFFIX(int64_t, int64_t, const void *, int64_t, int, void *,     \
                                     int64_t, int);                                            \
  extern "C" void linear_rows_##SUFFIX(int64_t, int64_t, int64_t, const void *, int64_t,       \
                                       const void *, const void *, void *, int64_t, int);      \
  extern "C" int decode_attention_##SUFFIX(int64_t, int64_t, int64_t, int64_t, const void *,   \
                                           int64_t, int64_t, const void *, int64_t,            \
                                           const int64_t *, int64_t, const int64_t *, int64_t, \
                                           float, void *, int64_t, int64_t, int);              \
  extern "C" int add_lora_##SUFFIX(int64_t, const int64_t *, int64_t, int64_t, const int64_t *, \
                                   int64_t, const void *, int64_t, int64_t, const void *,      \
                                   const float *, int64_t, const void *, const void *,         \
                                   const void *, int64_t, int64_t, int64_t, void *, int64_t,   \
                                   int);                                                       \
  extern "C" int add_lora_##SUFFIX##_int8(                                                      \
      int64_t, const int64_t *, int64_t, int64_t, const int64_t *, int64_t, const void *,      \
      int64_t, int64_t, const void *, const float *, int64_t, const void *, const void *,      \
      const void *, int64_t, int64_t, int64_t, void *, int64_t, int);

LORAPLEX_DECLARE(f32)
LORAPLEX_DECLARE(bf16)

namespace {

// One layer's row (kernels/decode_layers.py LAYER_FIELDS names the same fields in order).
enum LayerField {
  kInputNorm, kQkvWeight, kQkvBias, kQNorm, kKNorm, kOWeight, kPostNorm, kGateUpWeight,
  kDownWeight, kKvCache, kLoraFields  // then one LoraField group per linear, in Linear order
};
// One linear's LoRA slots, as kernels/cpu.py LoraKernel binds them: kind 0 none, 1 weights in
// the model's dtype, 2 int8 weights with scales.
enum LoraField { kKind, kRows, kA, kScales, kModules, kB0, kB1, kB2, kOut0, kOut1, kOut2,
                 kLoraWidth };
enum Linear { kQkv, kO, kGateUp, kDown, kLinears };
constexpr int kLayerFields = kLoraFields + kLinears * kLoraWidth;

// The model's shape (kernels/decode_layers.py SHAPE_FIELDS).
enum ShapeField { kHidden, kInter, kHeads, kKvHeads, kHeadDim, kUnitOffset, kAct, kKvRows };

template <typename T>
const T *ptr(int64_t v) { return reinterpret_cast<const T *>(v); }

// The entry points of one dtype, picked by a suffix of the C names.
#define LORAPLEX_ENTRIES(NAME, SUFFIX, TYPE)                                                     \
  struct NAME {                                                                                \
    using T = TYPE;                                                                            \
    static constexpr auto rms_norm = rms_norm_##SUFFIX;                                        \
    static constexpr auto rope_kv = rope_kv_##SUFFIX;                                          \
    static constexpr auto gated_act = gated_act_##SUFFIX;                                      \
    static constexpr auto linear_rows = linear_rows_##SUFFIX;                                  \
    static constexpr auto decode_attention = decode_attention_##SUFFIX;                        \
    static constexpr auto add_lora = add_lora_##SUFFIX;                                        \
    static constexpr auto add_lora_int8 = add_lora_##SUFFIX##_int8;                            \
  };
LORAPLEX_ENTRIES(F32, f32, float)
LORAPLEX_ENTRIES(BF16, bf16, BFloat16)

// y [rows, out] = x [rows, in] W^T (+ bias), plus the LoRA deltas of the step's segments.
template <typename K>
int linear(const int64_t *layer, Linear which, int64_t weight_field, int64_t bias, int64_t rows,
           int64_t in, int64_t out, const void *x, void *y, int64_t num_segments,
           const int64_t *segments, int64_t num_slots, const int64_t *places, int threads) {
  K::linear_rows(rows, in, out, x, in, ptr<void>(layer[weight_field]), ptr<void>(bias), y, out,
                 threads);
  const int64_t *lora = layer + kLoraFields + which * kLoraWidth;
  if (num_segments == 0 || lora[kKind] == 0) return 0;
  auto entry = lora[kKind] == 2 ? K::add_lora_int8 : K::add_lora;
  return entry(num_segments, segments, rows, num_slots, places, lora[kRows], x, in, in,
               ptr<void>(lora[kA]), ptr<float>(lora[kScales]), lora[kModules],
               ptr<void>(lora[kB0]), ptr<void>(lora[kB1]), ptr<void>(lora[kB2]), lora[kOut0],
               lora[kOut1], lora[kOut2], y, out, threads) == 0 ? 0 : 3;
}

// Returns 0; 1 a KV cache row out of range, 2 a head shape not built, 3 a LoRA segment out of
// range (the sub-kernels' own checks; nothing after the failing layer ran).
template <typename K>
int decode_layers(int64_t rows, int64_t num_layers, const int64_t *layers, const int64_t *shape,
                  float eps, typename K::T *x, const void *cos, const void *sin,
                  const int64_t *slot_mapping, const int64_t *kv_rows, int64_t kv_rows_stride,
                  const int64_t *lens, int64_t width, float scale, int64_t num_segments,
                  const int64_t *segments, int64_t num_slots, const int64_t *places,
                  int threads) {
  using T = typename K::T;
  const int64_t hidden = shape[kHidden], inter = shape[kInter], heads = shape[kHeads];
  const int64_t kv_heads = shape[kKvHeads], dim = shape[kHeadDim];
  const int64_t qkv_width = (heads + 2 * kv_heads) * dim, q_width = heads * dim;
  const int unit_offset = static_cast<int>(shape[kUnitOffset]);
  // Scratch for one layer, reused by the next: the normed input, q/k/v, the rotated q and k,
  // attention's output, the o and down projections, gate/up and the gated activation.
  std::vector<T> normed(rows * hidden), qkv(rows * qkv_width), qk(rows * (heads + kv_heads) * dim),
      attended(rows * q_width), projected(rows * hidden), gate_up(rows * 2 * inter),
      act(rows * inter);
  const auto lin = [&](const int64_t *layer, Linear which, int64_t field, int64_t bias,
                       int64_t in, int64_t out, const void *input, void *output) {
    return linear<K>(layer, which, field, bias, rows, in, out, input, output, num_segments,
                     segments, num_slots, places, threads);
  };
  for (int64_t l = 0; l < num_layers; l++) {
    const int64_t *layer = layers + l * kLayerFields;
    // The residual stream takes the previous layer's MLP output as it is normed (one pass).
    K::rms_norm(rows, hidden, x, hidden, l == 0 ? nullptr : projected.data(), hidden,
                ptr<void>(layer[kInputNorm]), eps, unit_offset, normed.data(), hidden, threads);
    int status = lin(layer, kQkv, kQkvWeight, layer[kQkvBias], hidden, qkv_width,
                     normed.data(), qkv.data());
    if (status == 0) {
      status = K::rope_kv(rows, heads, kv_heads, dim, qkv.data(), qkv_width, cos, sin,
                          ptr<void>(layer[kQNorm]), ptr<void>(layer[kKNorm]), eps, unit_offset,
                          reinterpret_cast<T *>(layer[kKvCache]),
                          shape[kKvRows], slot_mapping, qk.data(), threads);
    }
    if (status == 0) {
      status = K::decode_attention(rows, heads, kv_heads, dim, qk.data(), (heads + kv_heads) * dim,
                                   dim, ptr<void>(layer[kKvCache]), shape[kKvRows], kv_rows,
                                   kv_rows_stride, lens, width, scale, attended.data(), q_width,
                                   dim, threads);
    }
    if (status == 0) {
      status = lin(layer, kO, kOWeight, 0, q_width, hidden, attended.data(), projected.data());
    }
    if (status != 0) return status;
    K::rms_norm(rows, hidden, x, hidden, projected.data(), hidden, ptr<void>(layer[kPostNorm]),
                eps, unit_offset, normed.data(), hidden, threads);
    status = lin(layer, kGateUp, kGateUpWeight, 0, hidden, 2 * inter, normed.data(),
                 gate_up.data());
    if (status != 0) return status;
    K::gated_act(rows, inter, gate_up.data(), 2 * inter, static_cast<int>(shape[kAct]),
                 act.data(), inter, threads);
    status = lin(layer, kDown, kDownWeight, 0, inter, hidden, act.data(), projected.data());
    if (status != 0) return status;
  }
  // The last layer's MLP output joins the residual stream, rounded as x + h rounds.
  for (int64_t i = 0; i < rows * hidden; i++) store(x + i, load(x[i]) + load(projected[i]));
  return 0;
}

}  // namespace

#define LORAPLEX_DECODE_LAYERS(SUFFIX, K)                                                       \
  extern "C" int decode_layers_##SUFFIX(                                                        \
      int64_t rows, int64_t num_layers, const int64_t *layers, const int64_t *shape, float eps, \
      void *x, const void *cos, const void *sin, const int64_t *slot_mapping,                   \
      const int64_t *kv_rows, int64_t kv_rows_stride, const int64_t *lens, int64_t width,       \
      float scale, int64_t num_segments, const int64_t *segments, int64_t num_slots,            \
      const int64_t *places, int num_threads) {                                                 \
    using T = typename K::T;                                                                    \
    return decode_layers<K>(rows, num_layers, layers, shape, eps, static_cast<T *>(x), cos, sin, \
                            slot_mapping, kv_rows, kv_rows_stride, lens, width, scale,          \
                            num_segments, segments, num_slots, places, num_threads);            \
  }

LORAPLEX_DECODE_LAYERS(f32, F32)
LORAPLEX_DECODE_LAYERS(bf16, BF16)
