// This service's CPU kernels (app/kernel_build.py builds them as one extension; module.cpp binds them to Python).
//
// int8_linear.cpp: int8 weights x int8 activations, the products of a decoding step (app/int8_kernel.py).
// attention.cpp:   one query's attention over an fp16 or int8 (or fp32) key/value cache (app/half_attention.py,
//                  app/int8_kv_cache.py).
// lean_layer.cpp:  a whole transformer layer's decoding step on those two (app/lean_step.py).
// lean_lm.cpp:     the whole LM's decoding step on those layers (app/lean_lm.py).
//
// Every file is compiled with AVX512 (F, BW, VL, DQ), VNNI and F16C enabled; the loader checks the CPU first.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace musicgen {

// int8 [N, K] -> the product kernel's layout.
at::Tensor pack(const at::Tensor& weight);

// float [..., K] x packed int8 [N, K] -> float [..., N] (weight_scale: float [N]; weight_sums: int32 [N]).
at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& weight_scale,
                  const at::Tensor& weight_sums, const c10::optional<at::Tensor>& bias);

// The same product on raw rows: x is `rows` x K floats, y `rows` x N floats; `residual`, if not null, is added
// to the result (it may be y itself).
void linear_rows(const float* x, int64_t rows, int64_t k, const at::Tensor& packed,
                 const at::Tensor& weight_scale, const at::Tensor& weight_sums, const float* bias,
                 const float* residual, float* y);

// float [B, H, 1, D] queries over half [B, H, N, D] keys and values -> float [B, H, 1, D]; or over int8 keys and
// values, each row times its scale (float [B, H, N], the last dimension contiguous).
at::Tensor attend(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const c10::optional<at::Tensor>& key_scales, const c10::optional<at::Tensor>& value_scales);

// A [B, H, N, D] tensor's rows, the last dimension contiguous; for int8 rows, their scales: [B, H, N] floats with
// the last dimension contiguous (a row's values are its int8 numbers times its scale).
template <typename T>
struct Rows {
  const T* data;
  int64_t batch, head, time;  // strides, in elements
  const float* scale = nullptr;
  int64_t scale_batch = 0, scale_head = 0;

  explicit Rows(const at::Tensor& x)
      : data(x.data_ptr<T>()), batch(x.stride(0)), head(x.stride(1)), time(x.stride(2)) {}
  Rows(const at::Tensor& x, const at::Tensor& scales)
      : Rows(x) {
    scale = scales.data_ptr<float>();
    scale_batch = scales.stride(0);
    scale_head = scales.stride(1);
  }
};

// One query per batch row and head over `n` keys and values: query b, head h at q + b * q_batch + h * depth;
// output likewise at out + b * out_batch + h * depth (softmax(q k^T / sqrt(depth)) v, all in fp32).
// T is at::Half (converted as read), int8_t (converted, times its row's scale) or float; depth a multiple of 16,
// at most 256.
template <typename T>
void attend_heads(const float* q, int64_t q_batch, Rows<T> keys, Rows<T> values, int64_t batch, int64_t heads,
                  int64_t n, int64_t depth, float* out, int64_t out_batch);

// Rows `x` (b at x + b * x_batch + h * depth) into a half cache's position `at`, saturated at fp16's range.
void store_half(const float* x, int64_t x_batch, const at::Tensor& cache, int64_t at);

// The same rows into an int8 cache's position `at`, each as its nearest int8 multiples of its own scale (its
// largest magnitude / 127, after the same saturation; 0 for a row of zeros), written into `scales` [B, H, N].
void store_int8(const float* x, int64_t x_batch, const at::Tensor& cache, const at::Tensor& scales, int64_t at);

// The same from Python: `rows` float [B, H, D], each batch row's heads side by side (a step's projected keys or
// values), into position `at` of an int8 cache and its scales.
void store_rows_int8(const at::Tensor& rows, const at::Tensor& cache, const at::Tensor& scales, int64_t at);

// Checks a [B, H, N, D] cache (half, or int8 with `scales`) for the kernels above; `what` names it in the error.
void check_cache(const at::Tensor& cache, const c10::optional<at::Tensor>& scales, const char* what);

// A pre-norm transformer layer's decoding step for one new token (audiocraft's StreamingTransformerLayer as
// app/lean_step.py runs it): int8 products, self-attention over an fp16 or int8 cache, cross-attention over fp32 keys
// and values, layer norms, residuals and the feed-forward activation, in one call.
class Layer {
 public:
  using Norm = std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, double>;  // weight, bias, eps
  // packed weight, weight scale, weight sums, bias: `linear`'s arguments.
  using Product = std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>>;

  // activation: "relu" or "gelu" (exact); the cross-attention's three parts are all given or none.
  Layer(int64_t heads, const std::string& activation, Norm norm1, Product self_in, Product self_out,
        c10::optional<Norm> norm_cross, c10::optional<Product> cross_in, c10::optional<Product> cross_out,
        Norm norm2, Product linear1, Product linear2);

  // x: float [B, 1, dim]; keys, values: half [B, heads, capacity, dim / heads], or int8 with their scales (float
  // [B, heads, capacity]), the new token's written at `length` (< capacity); cross keys/values: float
  // [B, heads, S, dim / heads]. Returns the layer's output.
  at::Tensor step(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& values, int64_t length,
                  const c10::optional<at::Tensor>& cross_keys, const c10::optional<at::Tensor>& cross_values,
                  const c10::optional<at::Tensor>& key_scales, const c10::optional<at::Tensor>& value_scales) const;

  int64_t dim() const;  // the layer's width: its input's and output's last dimension

 private:
  int64_t heads_;
  bool gelu_;
  Norm norm1_, norm2_;
  Product self_in_, self_out_, linear1_, linear2_;
  c10::optional<Norm> norm_cross_;
  c10::optional<Product> cross_in_, cross_out_;
};

// The pieces of a step on raw rows that `Layer` and `LM` share (lean_layer.cpp).
// A layer norm over each of `rows` rows of d floats (d a multiple of 16) into y.
void layer_norm(const float* x, int64_t rows, int64_t d, const Layer::Norm& norm, float* y);
// y = x W^T + bias (+ residual, which may be y itself), on `rows` rows of k floats.
void product(const Layer::Product& p, const float* x, int64_t rows, int64_t k, float* y,
             const float* residual = nullptr);
// A product's outputs (N).
int64_t outputs(const Layer::Product& p);
// Whether a norm's weight and bias (where it has them) are `dim` contiguous floats.
bool norm_fits(const Layer::Norm& norm, int64_t dim);

// An LM's decoding step for one new token of every codebook (audiocraft's LMModel.forward in streaming mode, as
// app/lean_lm.py runs it): the codebooks' embeddings summed, the sinusoidal position added, every layer's step
// (`Layer`), the output norm and each codebook's output product, in one call.
class LM {
 public:
  // embeddings: float [card + 1, dim], one per codebook; periods: float [dim / 2], what the position is divided by
  // for each phase (audiocraft's max_period ** (i / (dim / 2 - 1)), computed by torch); heads: one per codebook.
  LM(std::vector<at::Tensor> embeddings, at::Tensor periods, double positional_scale, std::vector<Layer> layers,
     c10::optional<Layer::Norm> out_norm, std::vector<Layer::Product> heads);

  // Called, where given, before each layer with its index and input; what it returns (if anything) is the input.
  using BeforeLayer = std::function<c10::optional<at::Tensor>(int64_t, const at::Tensor&)>;

  // tokens: long [B, K, 1]; position: the new token's, from the start of the sequence; `length` keys cached in every
  // layer before it; one cache of each kind per layer, as `Layer::step` takes them. Returns float [B, K, 1, card].
  at::Tensor step(const at::Tensor& tokens, int64_t position, int64_t length, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values, const std::vector<c10::optional<at::Tensor>>& cross_keys,
                  const std::vector<c10::optional<at::Tensor>>& cross_values,
                  const std::vector<c10::optional<at::Tensor>>& key_scales,
                  const std::vector<c10::optional<at::Tensor>>& value_scales,
                  const BeforeLayer& before_layer = nullptr) const;

 private:
  std::vector<at::Tensor> embeddings_;
  at::Tensor periods_;
  float positional_scale_;
  std::vector<Layer> layers_;
  c10::optional<Layer::Norm> out_norm_;
  std::vector<Layer::Product> heads_;
};

}  // namespace musicgen
