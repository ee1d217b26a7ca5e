// The LM's whole decoding step in one call (kernels.h's `LM`), for app/lean_lm.py.
//
// With every layer's step one call (lean_layer.cpp), what was left of a step in Python was audiocraft's LMModel and
// StreamingTransformer around the layers: four embedding look-ups and their sum, the sinusoidal position made from
// scratch (arange, pow, cos, sin, cat), a module call and a few checks for each of the 24 layers, the output norm
// and the four output products stacked: ~1-1.5 ms of a ~15 ms step on two cores at musicgen-small's size. Here all
// of it runs on raw rows between the layers' calls, without the interpreter's lock (module.cpp releases it; a
// `before_layer` given, the layers' pre-hooks from app/lean_lm.py, takes it back for each call).

#include "kernels.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace musicgen {

LM::LM(std::vector<at::Tensor> embeddings, at::Tensor periods, double positional_scale, std::vector<Layer> layers,
       c10::optional<Layer::Norm> out_norm, std::vector<Layer::Product> heads)
    : embeddings_(std::move(embeddings)), periods_(std::move(periods)),
      positional_scale_(static_cast<float>(positional_scale)), layers_(std::move(layers)),
      out_norm_(std::move(out_norm)), heads_(std::move(heads)) {
  TORCH_CHECK(!layers_.empty() && !embeddings_.empty() && heads_.size() == embeddings_.size(),
              "LM: layers, and an embedding and an output product per codebook");
  const int64_t dim = layers_.front().dim();
  for (const auto& layer : layers_) TORCH_CHECK(layer.dim() == dim, "LM: the layers' widths differ");
  for (const auto& table : embeddings_) {
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(1) == dim &&
                    table.is_contiguous(), "LM: embeddings float [card + 1, dim], contiguous");
  }
  TORCH_CHECK(periods_.scalar_type() == at::kFloat && periods_.dim() == 1 && 2 * periods_.size(0) == dim &&
                  periods_.is_contiguous(), "LM: periods float [dim / 2]");
  TORCH_CHECK(!out_norm_ || norm_fits(*out_norm_, dim), "LM: the output norm's shape");
  for (const auto& head : heads_) TORCH_CHECK(outputs(head) == outputs(heads_.front()), "LM: the heads' outputs");
}

at::Tensor LM::step(const at::Tensor& tokens, int64_t position, int64_t length, const std::vector<at::Tensor>& keys,
                    const std::vector<at::Tensor>& values, const std::vector<c10::optional<at::Tensor>>& cross_keys,
                    const std::vector<c10::optional<at::Tensor>>& cross_values,
                    const std::vector<c10::optional<at::Tensor>>& key_scales,
                    const std::vector<c10::optional<at::Tensor>>& value_scales,
                    const BeforeLayer& before_layer) const {
  const int64_t codebooks = static_cast<int64_t>(embeddings_.size()), dim = layers_.front().dim();
  const size_t depth = layers_.size();
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 3 && tokens.size(1) == codebooks &&
                  tokens.size(2) == 1, "LM.step: long tokens [batch, codebooks, 1]");
  TORCH_CHECK(keys.size() == depth && values.size() == depth && cross_keys.size() == depth &&
                  cross_values.size() == depth && key_scales.size() == depth && value_scales.size() == depth,
              "LM.step: a cache of each kind per layer");
  TORCH_CHECK(position >= 0, "LM.step: a position from 0");
  const int64_t batch = tokens.size(0);
  const auto ids = tokens.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();

  // The codebooks' embeddings summed in codebook order, then the position's sinusoid, as audiocraft adds them.
  auto x = at::empty({batch, 1, dim}, embeddings_.front().options());
  float* rows = x.data_ptr<float>();
  const float* period = periods_.data_ptr<float>();
  const int64_t half = dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    float* row = rows + b * dim;
    for (int64_t k = 0; k < codebooks; ++k) {
      const int64_t token = id[b * codebooks + k];
      TORCH_CHECK(0 <= token && token < embeddings_[k].size(0), "LM.step: a token outside its embedding");
      const float* e = embeddings_[k].data_ptr<float>() + token * dim;
      if (k == 0) {
        std::memcpy(row, e, dim * sizeof(float));
      } else {
        for (int64_t i = 0; i < dim; ++i) row[i] += e[i];
      }
    }
    for (int64_t i = 0; i < half; ++i) {
      const float phase = static_cast<float>(position) / period[i];
      row[i] += positional_scale_ * std::cos(phase);
      row[half + i] += positional_scale_ * std::sin(phase);
    }
  }

  for (size_t l = 0; l < depth; ++l) {
    if (before_layer) {
      auto input = before_layer(static_cast<int64_t>(l), x);
      if (input.has_value()) x = *input;
    }
    x = layers_[l].step(x, keys[l], values[l], length, cross_keys[l], cross_values[l], key_scales[l],
                        value_scales[l]);
  }

  // The output norm, then each codebook's product, laid out as audiocraft stacks them: [B, K, 1, card].
  const float* out = x.data_ptr<float>();
  std::vector<float> normed;
  if (out_norm_) {
    normed.resize(batch * dim);
    layer_norm(out, batch, dim, *out_norm_, normed.data());
    out = normed.data();
  }
  const int64_t card = outputs(heads_.front());
  auto logits = at::empty({batch, codebooks, 1, card}, x.options());
  float* logit = logits.data_ptr<float>();
  std::vector<float> head(batch * card);
  for (int64_t k = 0; k < codebooks; ++k) {
    product(heads_[k], out, batch, dim, head.data());
    for (int64_t b = 0; b < batch; ++b) {
      std::memcpy(logit + (b * codebooks + k) * card, head.data() + b * card, card * sizeof(float));
    }
  }
  return logits;
}

}  // namespace musicgen
