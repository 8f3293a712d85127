// A linear layer for a few rows (decoding tokens): y = x W^T (+ bias), x [rows, in], W [out,
// in], at memory speed. At one to a few rows the matmul is a stream over W, and PyTorch's CPU
// GEMV reads bf16 weights at about 9 GB/s on an AVX-512 Xeon where a plain sum reads 21 GB/s
// (float32: 18 GB/s), which made W's reads alone take 29 ms of a SmolLM2-135M token.
//
// Semantics: F.linear's, each output summed in float32 over in (in another order than
// PyTorch's, so float32 results differ in the last bits) and rounded once to T.
// Work: the output rows are shared out in blocks of kOuts among the threads, each thread's
// blocks side by side so that it streams its part of W from memory in order; a block's kOuts
// rows of W are read once for every chunk of kTokens rows of x (they stay in L1 between
// chunks), and each (output, token) pair keeps one 16-lane float32 sum in a register.

#include <algorithm>
#include <vector>

#include "vectors.h"

namespace {

constexpr int kOuts = 4;  // rows of W a block reads side by side
constexpr int kTokens = 4;  // rows of x a pass over a block serves: 16 sums + 8 loads in registers
// W is prefetched this far ahead of each row's reads: the hardware prefetcher alone left a
// thread's four row streams at 12-15 GB/s for two threads (measured 5-10% slower).
constexpr int64_t kPrefetchBytes = 1024;

// y[t, o..o+M) for the N tokens of xf (float32 rows of in_padded values) from W's rows o...
template <int M, int N, typename T>
void block(const float *xf, int64_t in, int64_t in_padded, const T *w, int64_t o,
           const T *bias, T *y, int64_t y_stride) {
  f32x16 acc[M][N] = {};
  const int64_t vector_end = in / kLanes * kLanes;
  for (int64_t k = 0; k < vector_end; k += kLanes) {
    f32x16 xv[N];
    for (int t = 0; t < N; t++) xv[t] = load16(xf + t * in_padded + k);
    for (int m = 0; m < M; m++) {
      __builtin_prefetch(w + (o + m) * in + k + kPrefetchBytes / sizeof(T), 0, 3);
      const f32x16 wv = load16(w + (o + m) * in + k);
      for (int t = 0; t < N; t++) acc[m][t] += wv * xv[t];
    }
  }
  for (int m = 0; m < M; m++) {
    for (int t = 0; t < N; t++) {
      float sum = sum_lanes(acc[m][t]);
      for (int64_t k = vector_end; k < in; k++) {
        sum += load(w[(o + m) * in + k]) * xf[t * in_padded + k];
      }
      if (bias != nullptr) sum += load(bias[o + m]);
      store(y + t * y_stride + o + m, sum);
    }
  }
}

// Every chunk of up to kTokens tokens for W's rows [o, o + M).
template <int M, typename T>
void outputs(int64_t rows, const float *xf, int64_t in, int64_t in_padded, const T *w,
             int64_t o, const T *bias, T *y, int64_t y_stride) {
  for (int64_t t0 = 0; t0 < rows; t0 += kTokens) {
    const float *x = xf + t0 * in_padded;
    T *yt = y + t0 * y_stride;
    with_constant<kTokens>(std::min<int64_t>(rows - t0, kTokens), [&](auto n) {
      block<M, decltype(n)::value>(x, in, in_padded, w, o, bias, yt, y_stride);
    });
  }
}

template <typename T>
void linear_rows(int64_t rows, int64_t in, int64_t out, const T *x, int64_t x_stride,
                 const T *w, const T *bias, T *y, int64_t y_stride, int num_threads) {
  const int64_t in_padded = (in + kLanes - 1) / kLanes * kLanes;
  std::vector<float> xf(rows * in_padded);  // x in float32, read by every block
  for (int64_t t = 0; t < rows; t++) {
    for (int64_t k = 0; k < in; k++) xf[t * in_padded + k] = load(x[t * x_stride + k]);
  }
  const int64_t blocks = out / kOuts;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < blocks; b++) {
    outputs<kOuts>(rows, xf.data(), in, in_padded, w, b * kOuts, bias, y, y_stride);
  }
  for (int64_t o = blocks * kOuts; o < out; o++) {  // the last out % kOuts rows
    outputs<1>(rows, xf.data(), in, in_padded, w, o, bias, y, y_stride);
  }
}

}  // namespace

#define LINEAR_ROWS(SUFFIX, T)                                                                   \
  extern "C" void linear_rows_##SUFFIX(int64_t rows, int64_t in, int64_t out, const void *x,   \
                                       int64_t x_stride, const void *w, const void *bias,       \
                                       void *y, int64_t y_stride, int num_threads) {            \
    linear_rows(rows, in, out, static_cast<const T *>(x), x_stride, static_cast<const T *>(w), \
                static_cast<const T *>(bias), static_cast<T *>(y), y_stride, num_threads);     \
  }

LINEAR_ROWS(f32, float)
LINEAR_ROWS(bf16, BFloat16)
