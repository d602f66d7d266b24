#include "common/train/router_init.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace flexfed {

namespace {

// Runs the anchor on up to o.samples documents of `corpus` (in an order drawn from `seed`, each cut
// to o.max_tokens) and hands `each` what every layer's router sees ([T, H] per layer). Returns how
// many documents it used.
int64_t ForSampledDocuments(const FlexOlmoModel& anchor, const TokenCorpus& corpus, const RouterInitOptions& o, uint64_t seed,
                            ProgressReporter* progress, const std::function<void(const std::vector<at::Tensor>&)>& each) {
  const ModelConfig& c = anchor.config();
  const int64_t limit = std::min<int64_t>(o.max_tokens, c.max_position_embeddings);
  const int64_t target = std::min<int64_t>(o.samples, corpus.num_documents());
  const auto start = std::chrono::steady_clock::now();
  int64_t used = 0;
  for (int64_t d : Permutation(corpus.num_documents(), seed)) {
    if (used == o.samples) break;
    const int64_t len = std::min(corpus.document_length(d), limit);
    if (len == 0) continue;
    const int32_t* begin = corpus.tokens() + corpus.doc_offsets()[d];
    std::vector<int64_t> ids(begin, begin + len);
    ForwardTrace trace;
    trace.want_router_inputs = true;
    anchor.Forward(at::tensor(ids, at::kLong).view({1, len}).to(anchor.device()), {}, nullptr, &trace);
    std::vector<at::Tensor> inputs;
    for (const at::Tensor& t : trace.router_inputs) inputs.push_back(t[0]);
    each(inputs);
    ++used;
    if (progress != nullptr && (used % 50 == 0 || used == o.samples)) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      progress->Update(used, target, absl::StrFormat("%.1f docs/s", used / std::max(elapsed, 1e-9)), elapsed / used * (target - used));
    }
  }
  if (progress != nullptr) progress->Finish();
  return used;
}

// Sets each layer's bias so that a fraction o.public_share of the sampled public tokens have
// h·v + b > 0 (go to this expert rather than the public one), `owner_v[l]` being the owner's row
// minus r_pub (issue #14, D2).
absl::Status CalibrateBiasOnPublic(const FlexOlmoModel& anchor, const RouterInitOptions& o, const std::vector<at::Tensor>& owner_v,
                                   RouterEmbedding& e) {
  const int64_t layers = anchor.config().num_hidden_layers;
  std::vector<std::vector<at::Tensor>> gaps(layers);
  const int64_t public_used = ForSampledDocuments(anchor, *o.public_corpus, o, o.seed + 1, nullptr, [&](const std::vector<at::Tensor>& inputs) {
    for (int64_t l = 0; l < layers; ++l) gaps[l].push_back(at::mv(inputs[l].to(at::kFloat).to(at::kCPU), owner_v[l]));
  });
  if (public_used == 0) return absl::InvalidArgumentError("every sampled public document is empty");
  e.biases.resize(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor g = at::cat(gaps[l]).to(at::kDouble);
    const double above = at::quantile(g, 1.0 - o.public_share).item<double>();
    e.biases[l] = at::full({1}, static_cast<float>(std::min(0.0, -above)), at::kFloat);
    e.metadata[absl::StrCat("public_share_layer", l)] =
        absl::StrFormat("%.4f", (g + e.biases[l].item<double>() > 0).to(at::kDouble).mean().item<double>());
  }
  e.metadata["bias"] = absl::StrFormat("calibrated on %d public documents: %.3f of their tokens to this expert", public_used,
                                       o.public_share);
  return absl::OkStatus();
}

absl::Status CheckPublicShare(const RouterInitOptions& o, bool relative) {
  if (o.public_corpus != nullptr && (!relative || o.public_share <= 0 || o.public_share >= 1)) {
    return absl::InvalidArgumentError(relative ? "--public-share must be in (0, 1)"
                                               : "calibrating on public text is for owners' rows (an anchor with r_pub centers)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RouterEmbedding> InitRouterEmbedding(const FlexOlmoModel& anchor, const TokenCorpus* corpus,
                                                    const RouterInitOptions& o, ProgressReporter* progress,
                                                    const RouterEmbedding* router_pub) {
  const ModelConfig& c = anchor.config();
  RouterEmbedding e;
  e.metadata = {{"mode", o.mode}, {"seed", std::to_string(o.seed)}};
  if (o.mode == "vectors") {
    if (o.vectors.empty()) return absl::InvalidArgumentError("vectors mode needs --vectors FILE (.npy or .safetensors)");
    absl::StatusOr<RouterEmbedding> v = ReadExternalVectors(o.vectors, c.num_hidden_layers, c.hidden_size);
    if (!v.ok()) return v.status();
    v->metadata = {{"mode", "vectors"}, {"source", o.vectors}};
    if (o.public_corpus != nullptr) {  // the negative bias, calibrated on public text as in anchor mode
      if (absl::Status s = CheckPublicShare(o, router_pub != nullptr); !s.ok()) return s;
      std::vector<at::Tensor> owner_v;
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        owner_v.push_back(router_pub->rows.empty() ? v->rows[l] : v->rows[l] - router_pub->rows[l].to(at::kFloat));
      }
      c10::InferenceMode inference;
      if (absl::Status s = CalibrateBiasOnPublic(anchor, o, owner_v, *v); !s.ok()) return s;
    }
    return v;
  }
  if (o.mode == "random") {
    at::Generator gen = at::detail::createCPUGenerator(o.seed);
    at::Tensor r = at::normal(0.0, 0.02, {c.hidden_size}, gen, at::TensorOptions().dtype(at::kFloat));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) e.rows.push_back(r.clone());  // the same vector in every layer
    return e;
  }
  if (o.mode != "anchor") {
    return absl::InvalidArgumentError(absl::StrCat("router-init mode '", o.mode, "' is not anchor, vectors or random"));
  }
  if (corpus == nullptr || corpus->num_documents() == 0) {
    return absl::InvalidArgumentError("anchor mode needs documents (--data)");
  }
  if (o.samples < 1 || o.max_tokens < 1) return absl::InvalidArgumentError("--samples and --max-tokens must be positive");
  const bool relative = router_pub != nullptr && !router_pub->centers.empty();
  if (absl::Status s = CheckPublicShare(o, relative); !s.ok()) return s;
  c10::InferenceMode inference;
  std::vector<at::Tensor> sums(c.num_hidden_layers);
  for (at::Tensor& s : sums) s = at::zeros({c.hidden_size}, at::kDouble);
  const int64_t used = ForSampledDocuments(anchor, *corpus, o, o.seed, progress, [&](const std::vector<at::Tensor>& inputs) {
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) sums[l] += inputs[l].to(at::kDouble).mean(0).to(at::kCPU);
  });
  if (used == 0) return absl::InvalidArgumentError("every sampled document is empty");
  std::vector<at::Tensor> owner_v;  // per layer, the owner's v (relative mode)
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const at::Tensor mean = (sums[l] / static_cast<double>(used)).to(at::kFloat);
    if (relative) {
      // v = 2D (m − c) / |m − c|² and b = −v·(c + f (m − c)): logit(i) − logit(pub) = h·v + b
      // is 0 at the fraction f of the way from the public mean to the owner's, 2D(1 − f) at
      // the owner's mean and −2Df at the public one. Only a negative bias can be carried.
      const at::Tensor& center = router_pub->centers[l];
      const at::Tensor step = mean - center;
      // Where the means nearly coincide (layer 0 sees single-token embeddings) the step is
      // floored at a quarter of |c|: otherwise v explodes, logits saturate and the row's
      // gradient underflows to exactly 0 (a dead router row).
      const double distance = step.norm().item<double>();
      const double floor = std::max(distance, std::max(0.25 * center.norm().item<double>(), 1e-12));
      const at::Tensor v = step * (2 * o.margin / (std::max(distance, 1e-12) * floor));
      e.rows.push_back(router_pub->rows[l] + v);
      const double bias = -v.dot(center + o.boundary * step).item<double>();
      e.biases.push_back(at::full({1}, static_cast<float>(std::min(0.0, bias)), at::kFloat));
      owner_v.push_back(v);
    } else {
      // r_pub = 0: the public expert's logit is 0 for every token, and an owner's row is only its
      // v. Routing depends on logit differences alone (softmax and top-k do not change when the
      // same vector is added to every row), so this routes exactly as any shared r_pub would —
      // without a shared offset h·r_pub in every logit (|c|, 20–26 in the demo's anchor), which
      // made the router z-loss a third of the training loss and its gradient push the same
      // direction into the expert on every token (issue #14, D1).
      e.rows.push_back(at::zeros_like(mean));
      e.centers.push_back(mean);
    }
  }
  if (o.public_corpus != nullptr) {
    if (absl::Status s = CalibrateBiasOnPublic(anchor, o, owner_v, e); !s.ok()) return s;
  }
  e.metadata["relative_to"] = relative ? "router_pub" : "none (this is r_pub; centers kept)";
  e.metadata["documents"] = std::to_string(used);
  e.metadata["max_tokens"] = std::to_string(std::min<int64_t>(o.max_tokens, c.max_position_embeddings));
  return e;
}

}  // namespace flexfed
