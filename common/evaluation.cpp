#include "common/evaluation.h"

#include <cmath>

namespace flexfed {

EvalResult Evaluate(const FlexOlmoModel& model, const PackedSequences& data, const std::vector<int64_t>& indices,
                    int64_t batch_size, const Tokenizer& tokenizer, const Routing& routing) {
  c10::InferenceMode inference;
  EvalResult r;
  double nll = 0;
  for (size_t start = 0; start < indices.size(); start += batch_size) {
    const size_t end = std::min(indices.size(), start + static_cast<size_t>(batch_size));
    at::Tensor batch = data.Batch(std::vector<int64_t>(indices.begin() + start, indices.begin() + end));
    const int64_t t = batch.size(1) - 1;
    at::Tensor inputs = batch.narrow(1, 0, t).to(model.device());
    at::Tensor targets = batch.narrow(1, 1, t).reshape({-1});
    at::Tensor logits = model.Forward(inputs, routing).reshape({-1, model.config().vocab_size}).to(at::kFloat);
    nll += at::cross_entropy_loss(logits, targets.to(logits.device()), {}, at::Reduction::Sum).item<double>();
    r.tokens += targets.numel();
    const int64_t* ids = targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < targets.numel(); ++i) r.bytes += tokenizer.TokenBytes(static_cast<int32_t>(ids[i]));
  }
  r.loss = r.tokens > 0 ? nll / static_cast<double>(r.tokens) : 0.0;
  r.bits_per_byte = r.bytes > 0 ? nll / std::log(2.0) / static_cast<double>(r.bytes) : 0.0;
  return r;
}

}  // namespace flexfed
