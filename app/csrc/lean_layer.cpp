// A transformer layer's whole decoding step in one call (kernels.h's `Layer`), for app/lean_step.py.
//
// With its products on the int8 kernel and its attention on the cache kernel, what a step spent between them in
// Python and small torch operators (layer norms, views, casts, cache writes, residual additions, a dispatch of each)
// was about a fifth of the step on two cores. Here the layer runs on raw rows: a layer norm into a scratch row, a
// product, the new key and value written into the fp16 (or int8) cache, attention, the output product added onto the
// residual in its epilogue, and so on. The same maths as the layer's stock forward, in fp32 between the int8
// products: audiocraft's StreamingTransformerLayer with norm_first, no layer scale, no dropout (inference).

#include "kernels.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace musicgen {
namespace {

constexpr int64_t kLanes = 16;

float sum(const float* x, int64_t d) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += kLanes) total = _mm512_add_ps(total, _mm512_loadu_ps(x + i));
  return _mm512_reduce_add_ps(total);
}

float squared_deviations(const float* x, int64_t d, float mean) {
  const __m512 m = _mm512_set1_ps(mean);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += kLanes) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + i), m);
    total = _mm512_fmadd_ps(v, v, total);
  }
  return _mm512_reduce_add_ps(total);
}

}  // namespace

void layer_norm(const float* x, int64_t rows, int64_t d, const Layer::Norm& norm, float* y) {
  const auto& [weight, bias, eps] = norm;
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float mean = sum(xr, d) / static_cast<float>(d);
    const float variance = squared_deviations(xr, d, mean) / static_cast<float>(d);
    const __m512 m = _mm512_set1_ps(mean);
    const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(variance + static_cast<float>(eps)));
    for (int64_t i = 0; i < d; i += kLanes) {
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + i), m), scale);
      if (w) v = _mm512_mul_ps(v, _mm512_loadu_ps(w + i));
      if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + i));
      _mm512_storeu_ps(yr + i, v);
    }
  }
}

void product(const Layer::Product& p, const float* x, int64_t rows, int64_t k, float* y,
             const float* residual) {
  const auto& [packed, scale, sums, bias] = p;
  linear_rows(x, rows, k, packed, scale, sums, bias.has_value() ? bias->data_ptr<float>() : nullptr, residual, y);
}

int64_t outputs(const Layer::Product& p) { return std::get<1>(p).size(0); }

bool norm_fits(const Layer::Norm& norm, int64_t dim) {
  for (const auto& part : {std::get<0>(norm), std::get<1>(norm)}) {
    if (part.has_value() && (part->scalar_type() != at::kFloat || part->numel() != dim || !part->is_contiguous())) {
      return false;
    }
  }
  return true;
}

Layer::Layer(int64_t heads, const std::string& activation, Norm norm1, Product self_in, Product self_out,
             c10::optional<Norm> norm_cross, c10::optional<Product> cross_in, c10::optional<Product> cross_out,
             Norm norm2, Product linear1, Product linear2)
    : heads_(heads), gelu_(activation == "gelu"), norm1_(std::move(norm1)), norm2_(std::move(norm2)),
      self_in_(std::move(self_in)), self_out_(std::move(self_out)), linear1_(std::move(linear1)),
      linear2_(std::move(linear2)), norm_cross_(std::move(norm_cross)), cross_in_(std::move(cross_in)),
      cross_out_(std::move(cross_out)) {
  TORCH_CHECK(activation == "relu" || activation == "gelu", "Layer: relu or gelu");
  TORCH_CHECK(norm_cross_.has_value() == cross_in_.has_value() && cross_in_.has_value() == cross_out_.has_value(),
              "Layer: all of the cross-attention or none");
  const int64_t dim = outputs(self_out_);
  TORCH_CHECK(dim % kLanes == 0 && dim % heads == 0 && (dim / heads) % kLanes == 0 && dim / heads <= 256 &&
                  outputs(self_in_) == 3 * dim && outputs(linear2_) == dim &&
                  (!cross_in_ || (outputs(*cross_in_) == dim && outputs(*cross_out_) == dim)) &&
                  norm_fits(norm1_, dim) && norm_fits(norm2_, dim) && (!norm_cross_ || norm_fits(*norm_cross_, dim)),
              "Layer: shapes");
}

int64_t Layer::dim() const { return outputs(self_out_); }

at::Tensor Layer::step(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                       const c10::optional<at::Tensor>& cross_keys, const c10::optional<at::Tensor>& cross_values,
                       const c10::optional<at::Tensor>& key_scales,
                       const c10::optional<at::Tensor>& value_scales) const {
  const int64_t dim = outputs(self_out_), depth = dim / heads_, hidden = outputs(linear1_);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(1) == 1 && x.size(2) == dim,
              "Layer.step: float [batch, 1, dim]");
  const int64_t batch = x.size(0);
  check_cache(keys, key_scales, "Layer.step: the keys");
  check_cache(values, value_scales, "Layer.step: the values");
  for (const auto& cache : {keys, values}) {
    TORCH_CHECK(cache.scalar_type() == keys.scalar_type() && cache.size(0) == batch && cache.size(1) == heads_ &&
                    cache.size(3) == depth && 0 <= length && length < cache.size(2), "Layer.step: the cache's shape");
  }
  TORCH_CHECK(cross_keys.has_value() == cross_in_.has_value() && cross_values.has_value() == cross_in_.has_value(),
              "Layer.step: cross-attention keys and values where the layer has cross-attention");
  if (cross_in_) {
    for (const auto& cache : {*cross_keys, *cross_values}) {
      TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.dim() == 4 && cache.size(0) == batch &&
                      cache.size(1) == heads_ && cache.size(2) > 0 && cache.size(3) == depth && cache.stride(3) == 1 &&
                      cache.sizes() == cross_keys->sizes(), "Layer.step: the cross-attention keys and values");
    }
  }
  const auto input = x.contiguous();
  auto out = at::empty_like(input);  // the residual stream: the input plus the self-attention's, then updated
  float* residual = out.data_ptr<float>();
  std::vector<float> normed(batch * dim), projected(batch * 3 * dim), attended(batch * dim), inner(batch * hidden);

  layer_norm(input.data_ptr<float>(), batch, dim, norm1_, normed.data());
  product(self_in_, normed.data(), batch, dim, projected.data());  // per row: q, k, v, each (heads, depth)
  if (keys.scalar_type() == at::kChar) {
    store_int8(projected.data() + dim, 3 * dim, keys, *key_scales, length);
    store_int8(projected.data() + 2 * dim, 3 * dim, values, *value_scales, length);
    attend_heads(projected.data(), 3 * dim, Rows<int8_t>(keys, *key_scales), Rows<int8_t>(values, *value_scales),
                 batch, heads_, length + 1, depth, attended.data(), dim);
  } else {
    store_half(projected.data() + dim, 3 * dim, keys, length);
    store_half(projected.data() + 2 * dim, 3 * dim, values, length);
    attend_heads(projected.data(), 3 * dim, Rows<at::Half>(keys), Rows<at::Half>(values), batch, heads_,
                 length + 1, depth, attended.data(), dim);
  }
  product(self_out_, attended.data(), batch, dim, residual, input.data_ptr<float>());

  if (cross_in_) {
    layer_norm(residual, batch, dim, *norm_cross_, normed.data());
    product(*cross_in_, normed.data(), batch, dim, projected.data());
    attend_heads(projected.data(), dim, Rows<float>(*cross_keys), Rows<float>(*cross_values), batch, heads_,
                 cross_keys->size(2), depth, attended.data(), dim);
    product(*cross_out_, attended.data(), batch, dim, residual, residual);
  }

  layer_norm(residual, batch, dim, norm2_, normed.data());
  product(linear1_, normed.data(), batch, dim, inner.data());
  if (gelu_) {
    auto h = at::from_blob(inner.data(), {batch, hidden});
    at::gelu_(h);  // exact (erf), torch's vectorized kernel
  } else {
    for (auto& v : inner) v = std::max(v, 0.f);
  }
  product(linear2_, inner.data(), batch, hidden, residual, residual);
  return out;
}

}  // namespace musicgen
