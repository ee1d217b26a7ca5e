// One query's attention over a key/value cache, kept in fp16 (or fp32), on AVX512 (with F16C's conversions).
//
// A decoding step attends with one new query per head over every cached key and value: a read of the cache, which
// past a few hundred steps costs as much as the weights. Kept in fp16 the cache is half the bytes of fp32; this
// kernel converts each row to fp32 as it reads it (vcvtph2ps) and computes in fp32: scores, a softmax in fp32, the
// weighted sum. torch's own attention kernels on CPU read a half-precision cache slower than an fp32 one. The fp32
// variant serves the cross-attention of the lean layer (lean_layer.cpp), over the conditioning's keys and values.
//
// Built at run time by app/kernel_build.py with the other kernels (kernels.h); the loader checks the CPU.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace musicgen {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxDepth = 256;

inline __m512 row(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 row(const float* p) { return _mm512_loadu_ps(p); }

// fp16's largest finite value: beyond it a key or value is stored saturated, not as an infinity (which would turn
// its head's attention into NaN for the rest of the generation).
constexpr float kHalfMax = 65504.f;

}  // namespace

template <typename T>
void attend_heads(const float* q, int64_t q_batch, Rows<T> keys, Rows<T> values, int64_t batch, int64_t heads,
                  int64_t n, int64_t depth, float* out, int64_t out_batch) {
  const int64_t chunks = depth / kLanes;
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(depth)));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* qp = q + b * q_batch + h * depth;
      const T* kp = keys.data + b * keys.batch + h * keys.head;
      const T* vp = values.data + b * values.batch + h * values.head;
      __m512 qs[kMaxDepth / kLanes];
      for (int64_t c = 0; c < chunks; ++c) qs[c] = _mm512_mul_ps(_mm512_loadu_ps(qp + c * kLanes), scale);
      float top = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const T* r = kp + t * keys.time;
        __m512 sum = _mm512_mul_ps(qs[0], row(r));
        for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(qs[c], row(r + c * kLanes), sum);
        weights[t] = _mm512_reduce_add_ps(sum);
        top = std::max(top, weights[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < n; ++t) total += weights[t] = std::exp(weights[t] - top);
      const float inverse = 1.f / total;
      __m512 acc[kMaxDepth / kLanes];
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const T* r = vp + t * values.time;
        const __m512 w = _mm512_set1_ps(weights[t] * inverse);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, row(r + c * kLanes), acc[c]);
      }
      float* o = out + b * out_batch + h * depth;
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(o + c * kLanes, acc[c]);
    }
  });
}

template void attend_heads<at::Half>(const float*, int64_t, Rows<at::Half>, Rows<at::Half>, int64_t, int64_t,
                                     int64_t, int64_t, float*, int64_t);
template void attend_heads<float>(const float*, int64_t, Rows<float>, Rows<float>, int64_t, int64_t, int64_t,
                                  int64_t, float*, int64_t);

// q: float [B, H, 1, D]; k, v: half [B, H, N, D] (any strides but the last); D a multiple of 16, at most 256.
// Returns float [B, H, 1, D]: softmax(q k^T / sqrt(D)) v, as torch's scaled_dot_product_attention.
at::Tensor attend(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kHalf &&
                  values.scalar_type() == at::kHalf, "attend: float query, half keys and values");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && query.size(2) == 1, "attend: one query");
  const int64_t batch = keys.size(0), heads = keys.size(1), n = keys.size(2), depth = keys.size(3);
  TORCH_CHECK(depth % kLanes == 0 && depth <= kMaxDepth && keys.stride(3) == 1 && values.stride(3) == 1 &&
                  values.sizes() == keys.sizes() && query.size(0) == batch && query.size(1) == heads &&
                  query.size(3) == depth && n > 0, "attend: shapes");
  const auto q = query.contiguous();
  auto out = at::empty({batch, heads, 1, depth}, q.options());
  attend_heads(q.data_ptr<float>(), heads * depth, Rows<at::Half>(keys), Rows<at::Half>(values), batch, heads, n,
               depth, out.data_ptr<float>(), heads * depth);
  return out;
}

void store_half(const float* x, int64_t x_batch, const at::Tensor& cache, int64_t at) {
  const int64_t batch = cache.size(0), heads = cache.size(1), depth = cache.size(3);
  const __m512 low = _mm512_set1_ps(-kHalfMax), high = _mm512_set1_ps(kHalfMax);
  at::Half* base = cache.data_ptr<at::Half>() + at * cache.stride(2);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = x + b * x_batch + h * depth;
      at::Half* dst = base + b * cache.stride(0) + h * cache.stride(1);
      for (int64_t c = 0; c < depth; c += kLanes) {
        const __m512 v = _mm512_min_ps(high, _mm512_max_ps(low, _mm512_loadu_ps(src + c)));  // NaN stays NaN
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      }
    }
  }
}

}  // namespace musicgen
