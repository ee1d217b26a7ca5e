// One query's attention over a key/value cache kept in fp16, on AVX512 (with F16C's conversions).
//
// A decoding step attends with one new query per head over every cached key and value: a read of the cache, which
// past a few hundred steps costs as much as the weights. Kept in fp16 the cache is half the bytes of fp32; this
// kernel converts each row to fp32 as it reads it (vcvtph2ps) and computes in fp32: scores, a softmax in fp32, the
// weighted sum. torch's own attention kernels on CPU read a half-precision cache slower than an fp32 one.
//
// Built at run time by app/half_attention.py, with AVX512 enabled for this file only; the loader checks the CPU.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

inline __m512 row(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// q: float [B, H, 1, D]; k, v: half [B, H, N, D] (any strides but the last); D a multiple of 16, at most 256.
// Returns float [B, H, 1, D]: softmax(q k^T / sqrt(D)) v, as torch's scaled_dot_product_attention.
torch::Tensor attend(const torch::Tensor& query, const torch::Tensor& keys, const torch::Tensor& values) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat && keys.scalar_type() == torch::kHalf &&
                  values.scalar_type() == torch::kHalf, "attend: float query, half keys and values");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && query.size(2) == 1, "attend: one query");
  const int64_t batch = keys.size(0), heads = keys.size(1), n = keys.size(2), depth = keys.size(3);
  TORCH_CHECK(depth % kLanes == 0 && depth <= 256 && keys.stride(3) == 1 && values.stride(3) == 1 &&
                  values.sizes() == keys.sizes() && query.size(0) == batch && query.size(1) == heads &&
                  query.size(3) == depth && n > 0, "attend: shapes");
  const auto q = query.contiguous();
  auto out = torch::empty({batch, heads, 1, depth}, q.options());
  const int64_t chunks = depth / kLanes;
  const float scale = 1.f / std::sqrt(static_cast<float>(depth));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* qp = q.data_ptr<float>() + bh * depth;
      const at::Half* kp = keys.data_ptr<at::Half>() + b * keys.stride(0) + h * keys.stride(1);
      const at::Half* vp = values.data_ptr<at::Half>() + b * values.stride(0) + h * values.stride(1);
      __m512 qs[256 / kLanes];
      for (int64_t c = 0; c < chunks; ++c) qs[c] = _mm512_mul_ps(_mm512_loadu_ps(qp + c * kLanes), _mm512_set1_ps(scale));
      float top = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        const at::Half* r = kp + t * keys.stride(2);
        __m512 sum = _mm512_mul_ps(qs[0], row(r));
        for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(qs[c], row(r + c * kLanes), sum);
        weights[t] = _mm512_reduce_add_ps(sum);
        top = std::max(top, weights[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < n; ++t) total += weights[t] = std::exp(weights[t] - top);
      const float inverse = 1.f / total;
      __m512 acc[256 / kLanes];
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const at::Half* r = vp + t * values.stride(2);
        const __m512 w = _mm512_set1_ps(weights[t] * inverse);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, row(r + c * kLanes), acc[c]);
      }
      float* o = out.data_ptr<float>() + bh * depth;
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(o + c * kLanes, acc[c]);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "one query's attention over fp16 keys and values -> float");
}
