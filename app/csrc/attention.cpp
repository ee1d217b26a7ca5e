// One query's attention over a key/value cache, kept in fp16 or int8 (or fp32), on AVX512 (F16C converting fp16).
//
// A decoding step attends with one new query per head over every cached key and value: a read of the cache, which
// past a few hundred steps costs as much as the weights. Kept in fp16 the cache is half the bytes of fp32; this
// kernel converts each row to fp32 as it reads it (vcvtph2ps) and computes in fp32: scores, a softmax in fp32, the
// weighted sum. torch's own attention kernels on CPU read a half-precision cache slower than an fp32 one. Kept in
// int8 with a scale per row (`store_int8`) it is a quarter, plus 4 bytes a row: each row converted to fp32 likewise,
// each key's score and each value's weight times its row's scale. The fp32 variant serves the cross-attention of the
// lean layer (lean_layer.cpp), over the conditioning's keys and values.
//
// So that the read, not the arithmetic, sets its pace: the scores of 16 keys are summed into one register by a tree
// of shuffles (`sum_lanes`), not a reduction per key, and the softmax's exponentials are computed 16 at a time
// (`exp16`), not one by one.
//
// Built at run time by app/kernel_build.py with the other kernels (kernels.h); the loader checks the CPU.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace musicgen {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxDepth = 256;

inline __m512 row(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 row(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 row(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// 16 registers' lane sums in one register (lane j: the sum of sums[j]'s lanes), in a tree of shuffles: ~3
// instructions a register, where a reduction of each takes ~8.
inline __m512 sum_lanes(const __m512 (&sums)[16]) {
  // Pairs of registers: a 256-bit half of each, summed over its two halves.
  __m512 halves[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = sums[2 * i], b = sums[2 * i + 1];
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  // Quarter k of quads[i]: 4 partial sums of register 4 i + k.
  __m512 quads[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 a = halves[2 * i], b = halves[2 * i + 1];
    quads[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  // Within each quarter: lane m of quarter k, the sum of register 4 m + k.
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(quads[0], quads[1]), _mm512_unpackhi_ps(quads[0], quads[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(quads[2], quads[3]), _mm512_unpackhi_ps(quads[2], quads[3]));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y0, y1, 0x44), _mm512_shuffle_ps(y0, y1, 0xEE));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// e^x on 16 lanes, within ~2 ulp of expf: x = n ln 2 + r (|r| <= ln 2 / 2, ln 2 in two parts), e^r by its Taylor
// polynomial to r^7, then times 2^n. Below -87.3 the result is 0 (scores less their maximum are never above 0).
inline __m512 exp16(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-87.3f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lowest);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// fp16's largest finite value: beyond it a key or value is stored saturated, not as an infinity (which would turn
// its head's attention into NaN for the rest of the generation).
constexpr float kHalfMax = 65504.f;

// int8 rows carry a scale each (Rows::scale).
template <typename T>
constexpr bool kScaled = std::is_same_v<T, int8_t>;

}  // namespace

template <typename T>
void attend_heads(const float* q, int64_t q_batch, Rows<T> keys, Rows<T> values, int64_t batch, int64_t heads,
                  int64_t n, int64_t depth, float* out, int64_t out_batch) {
  const int64_t chunks = depth / kLanes;
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(depth)));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(round_up(n, kLanes));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const T* kp = keys.data + b * keys.batch + h * keys.head;
      const T* vp = values.data + b * values.batch + h * values.head;
      // int8 rows: each key's score times its scale; each value's weight times its (nullptr otherwise).
      const float* ks = keys.scale ? keys.scale + b * keys.scale_batch + h * keys.scale_head : nullptr;
      const float* vs = values.scale ? values.scale + b * values.scale_batch + h * values.scale_head : nullptr;
      __m512 qs[kMaxDepth / kLanes];
      for (int64_t c = 0; c < chunks; ++c) {
        qs[c] = _mm512_mul_ps(_mm512_loadu_ps(q + b * q_batch + h * depth + c * kLanes), scale);
      }
      // Scores, 16 keys at a time into one register; the tail one at a time.
      __m512 top = _mm512_set1_ps(-INFINITY);
      int64_t t = 0;
      for (; t + kLanes <= n; t += kLanes) {
        __m512 sums[kLanes];
        for (int64_t j = 0; j < kLanes; ++j) {
          const T* r = kp + (t + j) * keys.time;
          sums[j] = _mm512_mul_ps(qs[0], row(r));
          for (int64_t c = 1; c < chunks; ++c) sums[j] = _mm512_fmadd_ps(qs[c], row(r + c * kLanes), sums[j]);
        }
        __m512 scores = sum_lanes(sums);
        if constexpr (kScaled<T>) scores = _mm512_mul_ps(scores, _mm512_loadu_ps(ks + t));
        _mm512_storeu_ps(weights.data() + t, scores);
        top = _mm512_max_ps(top, scores);
      }
      float largest = _mm512_reduce_max_ps(top);
      for (; t < n; ++t) {
        const T* r = kp + t * keys.time;
        __m512 sum = _mm512_mul_ps(qs[0], row(r));
        for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(qs[c], row(r + c * kLanes), sum);
        weights[t] = _mm512_reduce_add_ps(sum);
        if constexpr (kScaled<T>) weights[t] *= ks[t];
        largest = std::max(largest, weights[t]);
      }
      // Softmax: exp(score - largest), 16 at a time (for int8 values, kept times each value's scale).
      const __m512 shift = _mm512_set1_ps(largest);
      __m512 totals = _mm512_setzero_ps();
      for (t = 0; t < n; t += kLanes) {
        const __mmask16 mask = t + kLanes <= n ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, weights.data() + t), shift));
        totals = _mm512_mask_add_ps(totals, mask, totals, e);
        if constexpr (kScaled<T>) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(mask, vs + t));
        _mm512_mask_storeu_ps(weights.data() + t, mask, e);
      }
      const float inverse = 1.f / _mm512_reduce_add_ps(totals);
      __m512 acc[kMaxDepth / kLanes];
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (t = 0; t < n; ++t) {
        const T* r = vp + t * values.time;
        const __m512 w = _mm512_set1_ps(weights[t]);
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, row(r + c * kLanes), acc[c]);
      }
      float* o = out + b * out_batch + h * depth;
      const __m512 normalize = _mm512_set1_ps(inverse);
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(o + c * kLanes, _mm512_mul_ps(acc[c], normalize));
    }
  });
}

template void attend_heads<at::Half>(const float*, int64_t, Rows<at::Half>, Rows<at::Half>, int64_t, int64_t,
                                     int64_t, int64_t, float*, int64_t);
template void attend_heads<float>(const float*, int64_t, Rows<float>, Rows<float>, int64_t, int64_t, int64_t,
                                  int64_t, float*, int64_t);
template void attend_heads<int8_t>(const float*, int64_t, Rows<int8_t>, Rows<int8_t>, int64_t, int64_t, int64_t,
                                   int64_t, float*, int64_t);

void check_cache(const at::Tensor& cache, const c10::optional<at::Tensor>& scales, const char* what) {
  TORCH_CHECK(cache.dim() == 4 && cache.stride(3) == 1 && cache.size(3) % kLanes == 0 && cache.size(3) <= kMaxDepth,
              what, ": [batch, heads, time, depth], depth a multiple of 16, at most 256, contiguous");
  if (cache.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.has_value() && scales->scalar_type() == at::kFloat && scales->dim() == 3 &&
                    scales->size(0) == cache.size(0) && scales->size(1) == cache.size(1) &&
                    scales->size(2) == cache.size(2) && scales->stride(2) == 1,
                what, ": an int8 cache needs its scales, float [batch, heads, time]");
  } else {
    TORCH_CHECK(cache.scalar_type() == at::kHalf && !scales.has_value(), what, ": half, or int8 with scales");
  }
}

// q: float [B, H, 1, D]; k, v: half [B, H, N, D], or int8 with their scales [B, H, N] (any strides but the last);
// D a multiple of 16, at most 256. Returns float [B, H, 1, D]: softmax(q k^T / sqrt(D)) v, as torch's
// scaled_dot_product_attention.
at::Tensor attend(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const c10::optional<at::Tensor>& key_scales, const c10::optional<at::Tensor>& value_scales) {
  check_cache(keys, key_scales, "attend: keys");
  check_cache(values, value_scales, "attend: values");
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == values.scalar_type(),
              "attend: float query, keys and values alike");
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "attend: one query");
  const int64_t batch = keys.size(0), heads = keys.size(1), n = keys.size(2), depth = keys.size(3);
  TORCH_CHECK(values.sizes() == keys.sizes() && query.size(0) == batch && query.size(1) == heads &&
                  query.size(3) == depth && n > 0, "attend: shapes");
  const auto q = query.contiguous();
  auto out = at::empty({batch, heads, 1, depth}, q.options());
  if (keys.scalar_type() == at::kChar) {
    attend_heads(q.data_ptr<float>(), heads * depth, Rows<int8_t>(keys, *key_scales),
                 Rows<int8_t>(values, *value_scales), batch, heads, n, depth, out.data_ptr<float>(), heads * depth);
  } else {
    attend_heads(q.data_ptr<float>(), heads * depth, Rows<at::Half>(keys), Rows<at::Half>(values), batch, heads, n,
                 depth, out.data_ptr<float>(), heads * depth);
  }
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

void store_int8(const float* x, int64_t x_batch, const at::Tensor& cache, const at::Tensor& scales, int64_t at) {
  const int64_t batch = cache.size(0), heads = cache.size(1), depth = cache.size(3), chunks = depth / kLanes;
  const __m512 low = _mm512_set1_ps(-kHalfMax), high = _mm512_set1_ps(kHalfMax);
  int8_t* base = cache.data_ptr<int8_t>() + at * cache.stride(2);
  float* scale_base = scales.data_ptr<float>() + at;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = x + b * x_batch + h * depth;
      __m512 v[kMaxDepth / kLanes];
      __m512 largest = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        v[c] = _mm512_min_ps(high, _mm512_max_ps(low, _mm512_loadu_ps(src + c * kLanes)));
        largest = _mm512_max_ps(largest, _mm512_abs_ps(v[c]));
      }
      // x / scale, rounded to nearest even: the operations of app/int8_kv_cache.py's `quantize`, in the same order.
      const float scale = _mm512_reduce_max_ps(largest) / 127.f;
      const __m512 divisor = _mm512_set1_ps(scale > 0.f ? scale : 1.f);
      int8_t* dst = base + b * cache.stride(0) + h * cache.stride(1);
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i n = _mm512_cvt_roundps_epi32(_mm512_div_ps(v[c], divisor),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * kLanes), _mm512_cvtsepi32_epi8(n));
      }
      scale_base[b * scales.stride(0) + h * scales.stride(1)] = scale;
    }
  }
}

void store_rows_int8(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& scales, int64_t at) {
  check_cache(cache, scales, "store_int8: the cache");
  TORCH_CHECK(cache.scalar_type() == at::kChar, "store_int8: an int8 cache");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 3 && rows.size(0) == cache.size(0) &&
                  rows.size(1) == cache.size(1) && rows.size(2) == cache.size(3) && rows.stride(2) == 1 &&
                  rows.stride(1) == rows.size(2) && 0 <= at && at < cache.size(2),
              "store_int8: float rows [batch, heads, depth], each batch's heads side by side, at a position inside");
  store_int8(rows.data_ptr<float>(), rows.stride(0), cache, scales, at);
}

}  // namespace musicgen
