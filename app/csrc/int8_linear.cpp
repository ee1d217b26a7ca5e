// int8 weights x int8 activations for the few-row products of a decoding step, on AVX512-VNNI.
//
// A decoding step multiplies a 2-row batch (the CFG pair) by every weight matrix: a read of the weights, so its
// speed is the rate at which one loop streams them from memory. fbgemm's kernels (PyTorch's dynamic quantization)
// read them at ~20 GB/s on one Zen 4 core, where a plain read gets ~27-34 GB/s. This kernel keeps each group of
// 32 output columns' weights in one contiguous stream, 4 consecutive inputs of each column side by side
// (`pack`), so that one 64-byte load feeds one VNNI dot product (vpdpbusd: unsigned 8-bit activations x signed
// 8-bit weights, summed into 32-bit lanes) per row: ~24 GB/s on one core, ~32 GB/s on two.
//
// The maths is fbgemm's dynamic quantization: weights int8 with one scale per output column (symmetric),
// activations uint8 with one scale and zero point per call, from the input's range (0 included), exact 32-bit
// sums, then y = scale_x * scale_w[n] * (sum - zero_x * sum_k w[n][k]) + bias[n].
//
// Built at run time by app/kernel_build.py with the other kernels (kernels.h), AVX512 enabled for them only;
// nothing here runs on a CPU without AVX512F/BW/VL/DQ and VNNI (the loader checks first).

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace musicgen {
namespace {

constexpr int64_t kLanes = 16;          // 32-bit sums in one 512-bit register: output columns per block
constexpr int64_t kBlocks = 2;          // blocks per group: one group is 32 columns
constexpr int64_t kColumns = kLanes * kBlocks;
constexpr int64_t kDepth = 4;           // inputs per 32-bit lane of a dot product

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

struct Quantized {
  float scale;
  int32_t zero;
};

// x: rows x k floats -> rows x k_padded bytes (the padding multiplies zero weights).
Quantized quantize(const float* x, int64_t rows, int64_t k, int64_t k_padded, uint8_t* out) {
  const int64_t count = rows * k;
  __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();  // the range includes 0
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    low = _mm512_min_ps(low, v);
    high = _mm512_max_ps(high, v);
  }
  float lo = _mm512_reduce_min_ps(low), hi = _mm512_reduce_max_ps(high);
  for (; i < count; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  Quantized q{(hi - lo) / 255.f, 0};
  if (!(q.scale > 0.f) || !std::isfinite(q.scale)) q.scale = 1.f;  // all zeros (or not finite: garbage in, out)
  q.zero = static_cast<int32_t>(std::min(255.f, std::max(0.f, std::nearbyint(-lo / q.scale))));
  const float inverse = 1.f / q.scale;
  const __m512 vinverse = _mm512_set1_ps(inverse);
  const __m512i vzero = _mm512_set1_epi32(q.zero), vmin = _mm512_setzero_si512(), vmax = _mm512_set1_epi32(255);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * k;
    uint8_t* dst = out + r * k_padded;
    int64_t j = 0;
    for (; j + kLanes <= k; j += kLanes) {  // rounds to nearest even, as nearbyint
      __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + j), vinverse)), vzero);
      v = _mm512_min_epi32(_mm512_max_epi32(v, vmin), vmax);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), _mm512_cvtepi32_epi8(v));
    }
    for (; j < k; ++j) {
      const float v = std::nearbyint(src[j] * inverse) + static_cast<float>(q.zero);
      dst[j] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, v)));
    }
    for (; j < k_padded; ++j) dst[j] = 0;
  }
  return q;
}

struct Product {
  const uint8_t* x;         // rows x k_padded
  const int8_t* weight;     // packed
  const float* scale;       // [n]: scale_x * scale_w
  const int32_t* offset;    // [n]: zero_x * sum_k w
  const float* bias;        // [n] or null
  const float* residual;    // rows x n, added, or null
  float* y;                 // rows x n
  int64_t n, k_padded;
};

// `Rows` rows (1 or 2) from `row` on, times one group of 32 columns.
template <int Rows>
void group(const Product& p, int64_t g, int64_t row) {
  const int64_t depth = p.k_padded / kDepth;
  __m512i sum[Rows][kBlocks];
  for (int r = 0; r < Rows; ++r)
    for (int b = 0; b < kBlocks; ++b) sum[r][b] = _mm512_setzero_si512();
  const int8_t* w = p.weight + g * depth * kColumns * kDepth;
  const uint8_t* x = p.x + row * p.k_padded;
  for (int64_t d = 0; d < depth; ++d, w += kColumns * kDepth) {
    __m512i weights[kBlocks];
    for (int b = 0; b < kBlocks; ++b) weights[b] = _mm512_loadu_si512(w + b * kLanes * kDepth);
    for (int r = 0; r < Rows; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * p.k_padded + d * kDepth, sizeof four);
      const __m512i inputs = _mm512_set1_epi32(four);
      for (int b = 0; b < kBlocks; ++b) sum[r][b] = _mm512_dpbusd_epi32(sum[r][b], inputs, weights[b]);
    }
  }
  for (int b = 0; b < kBlocks; ++b) {
    const int64_t column = g * kColumns + b * kLanes;
    if (column >= p.n) break;
    const __mmask16 mask = column + kLanes <= p.n ? 0xFFFF : static_cast<__mmask16>((1u << (p.n - column)) - 1);
    const __m512 scale = _mm512_maskz_loadu_ps(mask, p.scale + column);
    const __m512i offset = _mm512_maskz_loadu_epi32(mask, p.offset + column);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + column) : _mm512_setzero_ps();
    for (int r = 0; r < Rows; ++r) {
      const int64_t at = (row + r) * p.n + column;
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[r][b], offset));
      __m512 y = _mm512_fmadd_ps(v, scale, bias);
      if (p.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p.residual + at));
      _mm512_mask_storeu_ps(p.y + at, mask, y);
    }
  }
}

}  // namespace

// weight: int8 [N, K] -> [ceil(N/32)][ceil(K/4)][32][4], zeros where N or K were padded.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack: an int8 matrix");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t rows = round_up(n, kColumns), inputs = round_up(k, kDepth);
  return at::constant_pad_nd(weight, {0, inputs - k, 0, rows - n})
      .view({rows / kColumns, kColumns, inputs / kDepth, kDepth})
      .permute({0, 2, 1, 3})
      .contiguous();
}

void linear_rows(const float* x, int64_t rows, int64_t k, const at::Tensor& packed,
                 const at::Tensor& weight_scale, const at::Tensor& weight_sums, const float* bias,
                 const float* residual, float* y) {
  const int64_t n = weight_scale.size(0), k_padded = packed.size(1) * kDepth;
  TORCH_CHECK(round_up(k, kDepth) == k_padded && packed.size(0) * kColumns >= n, "linear: input and weight differ");
  if (rows == 0) return;
  std::vector<uint8_t> xq(rows * k_padded);
  const Quantized q = quantize(x, rows, k, k_padded, xq.data());
  std::vector<float> scale(n);
  std::vector<int32_t> offset(n);
  const float* ws = weight_scale.data_ptr<float>();
  const int32_t* sums = weight_sums.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = q.scale * ws[i];
    offset[i] = q.zero * sums[i];
  }
  const Product p{xq.data(), packed.data_ptr<int8_t>(), scale.data(), offset.data(), bias, residual, y, n, k_padded};
  // Every thread takes whole groups; a group's weights stay in its core's cache while more than two rows pass.
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      int64_t row = 0;
      for (; row + 2 <= rows; row += 2) group<2>(p, g, row);
      if (row < rows) group<1>(p, g, row);
    }
  });
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& weight_scale,
                  const at::Tensor& weight_sums, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "linear: float input");
  const auto x = input.contiguous();
  const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = weight_scale.size(0);
  auto y = at::empty(sizes, x.options());
  linear_rows(x.data_ptr<float>(), rows, k, packed, weight_scale, weight_sums,
              bias.has_value() ? bias->data_ptr<float>() : nullptr, nullptr, y.data_ptr<float>());
  return y;
}


}  // namespace musicgen
