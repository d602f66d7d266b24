// Merging, opt-out equivalence, the model soup, the BTM ensemble and generation (common/merge/merge.h,
// common/train/loss.h, common/model/generation.h).
#include <catch2/catch.hpp>

#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <numeric>
#include <random>

#include "common/model/anchor.h"
#include "common/train/loss.h"
#include "common/merge/expert_export.h"
#include "common/model/generation.h"
#include "common/merge/merge.h"
#include "common/merge/router_tuning.h"
#include "common/train/memory_plan.h"
#include "common/train/training.h"
#include "common/model/model.h"
#include "common/model/router_embedding.h"
#include "common/model/tokenizer.h"
#include "common/core/file_util.h"
#include "evaluation/suite.h"
#include "tests/common/merge/federation_fixture.h"
#include "tests/temp_dir.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::Federation;
using testing::PlanPartBytes;
using testing::RelativeError;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

at::Tensor Ids(int64_t batch, int64_t length, uint64_t seed) {
  at::manual_seed(seed);
  return at::randint(0, 256, {batch, length}, at::kLong);
}

TEST_CASE("merge: expert 0 is public, router rows concatenate in order, the rest is the anchor's", "[merge]") {
  Federation f;
  const std::vector<std::string> modules = {f.Module("code", 1), f.Module("math", 2), f.Module("bible", 3)};
  MergeOptions o;
  o.top_k = 2;
  ValueOrDie(MergeToCheckpoint(f.anchor_dir, modules, o, f.dir / "merged"));
  FlexOlmoModel m = ValueOrDie(FlexOlmoModel::Load(f.dir / "merged"));
  CHECK(m.config().model_type == "flex_olmo");
  CHECK(m.config().num_experts == 4);
  CHECK(m.config().num_experts_per_tok == 2);
  CHECK_FALSE(m.config().norm_topk_prob);
  for (const std::string& name : {"config.json", "model.safetensors", "flexfed_extras.safetensors", "flexfed_merge.json"}) {
    CHECK(fs::exists(fs::path(f.dir / "merged") / name));
  }
  const nlohmann::json record = nlohmann::json::parse(ValueOrDie(ReadFile(f.dir / "merged/flexfed_merge.json")));
  CHECK(record["anchor_id"] == f.anchor.id);
  CHECK(record["experts"][1]["name"] == "math");
  for (int64_t l = 0; l < f.config.num_hidden_layers; ++l) {
    const LayerWeights& w = m.layers()[l];
    CHECK(at::equal(w.router[0], f.anchor.router_pub.rows[l]));
    CHECK(at::equal(w.experts[0].down_proj, f.anchor.model.layers()[l].experts[0].down_proj));
    CHECK(at::equal(w.q_proj, f.anchor.model.layers()[l].q_proj));
    for (int64_t e = 1; e <= 3; ++e) {
      auto file = ValueOrDie(SafetensorsFile::Open(modules[e - 1]));
      ExpertTensors t = ValueOrDie(ReadExpertModule(*file, f.config.num_hidden_layers));
      CHECK(at::equal(w.router[e], t.router_rows[l]));
      CHECK(at::equal(w.experts[e].gate_proj, t.ffn[l].gate_proj));
      CHECK(w.router_bias[e].item<float>() == t.router_bias[l].item<float>());
    }
    CHECK(w.router_bias[0].item<float>() == 0.0f);
  }
  // A merge with --no-bias has no extras file.
  o.with_router_bias = false;
  ValueOrDie(MergeToCheckpoint(f.anchor_dir, modules, o, f.dir / "nobias"));
  CHECK_FALSE(fs::exists(f.dir / "nobias/flexfed_extras.safetensors"));
}

TEST_CASE("opting out expert j at inference equals the release built without j", "[merge]") {
  Federation f;
  const std::vector<std::string> modules = {f.Module("code", 1), f.Module("math", 2), f.Module("bible", 3)};
  const at::Tensor ids = Ids(2, 24, 5);
  for (int64_t k : {0, 2}) {  // every expert, and top-2
    MergeOptions o;
    o.top_k = k;
    const std::string all_dir = f.dir / ("all_k" + std::to_string(k));
    ValueOrDie(MergeToCheckpoint(f.anchor_dir, modules, o, all_dir));
    FlexOlmoModel all = ValueOrDie(FlexOlmoModel::Load(all_dir));
    for (int64_t j = 1; j <= 3; ++j) {
      std::vector<std::string> without = modules;
      without.erase(without.begin() + (j - 1));
      MergeOptions ow = o;
      if (k == 0) ow.top_k = 0;  // a release of every remaining expert
      const std::string dir = f.dir / ("without" + std::to_string(j) + "_k" + std::to_string(k));
      ValueOrDie(MergeToCheckpoint(f.anchor_dir, without, ow, dir));
      FlexOlmoModel rebuilt = ValueOrDie(FlexOlmoModel::Load(dir));
      c10::InferenceMode inference;
      const at::Tensor opted_out = all.Forward(ids, Routing::Excluding(4, {j}));
      const at::Tensor expected = rebuilt.Forward(ids);
      INFO("k = " << k << ", expert " << j);
      CHECK(RelativeError(opted_out, expected) < 1e-5);  // fp32 rounding of differently shaped products
      // And it really changes the model: the expert mattered.
      CHECK(RelativeError(all.Forward(ids), expected) > 1e-4);
    }
  }
}

TEST_CASE("merge refuses what does not fit, and leaves nothing behind", "[merge]") {
  Federation f;
  const std::string code = f.Module("code", 1);
  Federation other(/*anchor_seed=*/12);  // another anchor
  const std::string foreign = other.Module("math", 2);
  MergeOptions o;
  absl::StatusOr<MergedModel> r = MergeToCheckpoint(f.anchor_dir, {code, foreign}, o, f.dir / "out");
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(std::string(r.status().message()), Catch::Contains("anchor"));
  CHECK_FALSE(fs::exists(f.dir / "out"));
  CHECK(std::distance(fs::directory_iterator(f.dir.path()), fs::directory_iterator()) == 2);  // anchor, code: no partial output
  o.top_k = 3;
  r = MergeToCheckpoint(f.anchor_dir, {code}, o, f.dir / "out");
  CHECK_THAT(std::string(r.status().message()), Catch::Contains("outside 1..2"));
  o.top_k = 0;
  CHECK_THAT(std::string(MergeToCheckpoint(f.anchor_dir, {code, code}, o, f.dir / "out").status().message()),
             Catch::Contains("once"));
  CHECK_THAT(std::string(MergeToCheckpoint(f.anchor_dir, {code}, o, f.dir / "out", {std::string(64, '0')}).status().message()),
             Catch::Contains("SHA-256"));
  ValueOrDie(MergeToCheckpoint(f.anchor_dir, {code}, o, f.dir / "out"));
  CHECK(absl::IsAlreadyExists(MergeToCheckpoint(f.anchor_dir, {code}, o, f.dir / "out").status()));
}

// Public proxy text for router tuning: the federation folder's proxy.txt, 300 short lines.
std::string WriteProxyText(const Federation& f) {
  std::string proxy;
  for (int i = 0; i < 300; ++i) proxy += "the proxy text number " + std::to_string(i % 17) + " says hello.\n";
  const std::string path = f.dir / "proxy.txt";
  REQUIRE(WriteFileAtomically(path, proxy).ok());
  return path;
}

// Router tuning's memory plan (flexfed-owner router-tune --memory-report, and the refusal of a run
// that cannot fit): the merged model's every FFN frozen, the routers trained. Regression: it was
// planned as a dense run (one trained FFN, no frozen experts).
TEST_CASE("router tuning's memory plan: weights and moments exact, activations as measured", "[merge]") {
  Federation f;
  const std::vector<std::string> modules = {f.Module("code", 1), f.Module("math", 2)};
  const std::string proxy = WriteProxyText(f);
  struct Variant {
    int64_t top_k;  // 0: every expert
    bool dispatch;  // the MoE block through the dispatch ops, as on a GPU (here their CPU references)
  };
  for (const Variant v : {Variant{0, false}, Variant{2, false}, Variant{0, true}, Variant{2, true}}) {
    const int64_t top_k = v.top_k;
    INFO("top-k " << top_k << (v.dispatch ? ", dispatch path" : ""));
    testing::ScopedEnv moe("FLEXFED_MOE", v.dispatch ? "dispatch" : nullptr);
    TrainConfig c;
    c.mode = "router";
    c.top_k = top_k;
    c.data = {proxy};
    c.seq_len = 64;
    c.batch_size = 8;
    c.max_steps = 1;
    c.validation_fraction = 0;
    c.threads = 1;  // every tensor from the main thread's heap, which HeapInUse counts
    const TrainInputs in{f.anchor_dir, "", f.dir / ("plan" + std::to_string(top_k) + (v.dispatch ? "d" : "")), f.dir / "cache", modules};
    const MemoryPlan plan = ValueOrDie(PlanRunMemory(c, in, 1));
    auto trainer = ValueOrDie(Trainer::Create(c, in, false));
    int64_t trained = 0, frozen = 0;
    for (const NamedTensor& nt : trainer->trainable()) trained += static_cast<int64_t>(nt.tensor.nbytes());
    for (const NamedTensor& nt : trainer->FrozenTensors()) frozen += static_cast<int64_t>(nt.tensor.nbytes());
    CHECK(PlanPartBytes(plan, "trained weights") == trained);
    CHECK(PlanPartBytes(plan, "gradients") == trained);
    CHECK(PlanPartBytes(plan, "optimizer state") == 2 * trained);
    CHECK(PlanPartBytes(plan, "frozen weights") == frozen);
    // What the forward leaves alive for the backward: the activations and the loss's kept part.
    std::vector<int64_t> sequences(8);
    std::iota(sequences.begin(), sequences.end(), 0);
    c10::AutoGradMode grad_on(true);
    const int64_t before = testing::HeapInUse();
    ForwardTrace trace;
    const at::Tensor losses = trainer->SequenceLosses(sequences, trace);
    const int64_t kept = testing::HeapInUse() - before;
    const int64_t tokens = 8 * 64, h = f.config.hidden_size;
    const double planned = static_cast<double>(PlanPartBytes(plan, "activations") + tokens * (h * 8 + 12));
    CHECK(kept > 0.97 * planned);
    CHECK(kept < 1.08 * planned);
  }
}

// The paper's optional router tuning (docs/METHOD.md §4): only the merged model's routers train, on
// public proxy text; the result is a file for exactly these modules, which a merge applies.
TEST_CASE("router tuning trains only the routers, for exactly the modules it was made with", "[merge]") {
  Federation f;
  const std::vector<std::string> modules = {f.Module("code", 1), f.Module("math", 2)};
  const std::string proxy = WriteProxyText(f);
  TrainConfig c;
  c.mode = "router";
  c.top_k = 0;
  c.data = {proxy};
  c.seq_len = 32;
  c.batch_size = 4;
  c.max_steps = 20;
  c.lr = 2e-2;
  c.z_loss = 0;  // the language-model loss alone, so that "it learned" is measurable
  c.warmup_steps = 1;
  c.val_every = 0;
  c.checkpoint_every = 0;
  c.validation_fraction = 0.2;
  c.threads = 2;
  TrainInputs in{f.anchor_dir, "", f.dir / "rt", f.dir / "cache", modules};
  auto trainer = ValueOrDie(Trainer::Create(c, in, false));
  REQUIRE(trainer->trainable().size() == 2 * static_cast<size_t>(f.config.num_hidden_layers));  // rows and biases
  ValueOrDie(trainer->Run(nullptr, nullptr));
  // Resuming takes the same modules, in the same order, only.
  CHECK(Trainer::Create(c, in, true).ok());
  TrainInputs swapped = in;
  std::swap(swapped.modules[0], swapped.modules[1]);
  CHECK_THAT(std::string(Trainer::Create(c, swapped, true).status().message()), Catch::Contains("other modules"));
  // Only the routers moved: every other tensor is the plain merge's.
  const MergedModel plain = ValueOrDie(MergeExperts(f.anchor, modules, MergeOptions{}));
  const std::vector<NamedTensor> tuned_params = trainer->model().NamedParameters(), plain_params = plain.model.NamedParameters();
  REQUIRE(tuned_params.size() == plain_params.size());
  for (size_t i = 0; i < tuned_params.size(); ++i) {
    const bool trained = std::any_of(trainer->trainable().begin(), trainer->trainable().end(),
                                     [&](const NamedTensor& t) { return t.tensor.is_same(tuned_params[i].tensor); });
    INFO(tuned_params[i].name);
    const std::string& n = tuned_params[i].name;
    CHECK(trained == (n.find("mlp.gate.weight") != std::string::npos || n.find("mlp.router_bias") != std::string::npos));
    if (!trained) CHECK(at::equal(tuned_params[i].tensor, plain_params[i].tensor));
  }
  for (int64_t l = 0; l < f.config.num_hidden_layers; ++l) {
    CHECK_FALSE(at::equal(trainer->model().layers()[l].router.detach(), plain.model.layers()[l].router));
    CHECK_FALSE(at::equal(trainer->model().layers()[l].router_bias.detach(), plain.model.layers()[l].router_bias));
  }
  // The file: for this anchor and these modules, in order; a merge with it has the tuned routers.
  const std::string file = (fs::path(f.dir / "rt") / kRouterTuningFile).string();
  const RouterTuning t = ValueOrDie(ReadRouterTuning(file));
  CHECK(t.anchor_id == f.anchor.id);
  REQUIRE(t.experts.size() == 2);
  CHECK(t.experts[0] == plain.experts[0].sha256);
  MergeOptions with;
  with.router_tuning = file;
  const MergedModel tuned = ValueOrDie(MergeExperts(f.anchor, modules, with));
  for (int64_t l = 0; l < f.config.num_hidden_layers; ++l) {
    CHECK(at::equal(tuned.model.layers()[l].router, trainer->model().layers()[l].router.detach()));
    CHECK(at::equal(tuned.model.layers()[l].router_bias, trainer->model().layers()[l].router_bias.detach()));
    CHECK_FALSE(at::equal(tuned.model.layers()[l].router, plain.model.layers()[l].router));
  }
  {  // It learned: the proxy text scores better with the tuned routers.
    ByteTokenizer tok;
    const EvalText text = ValueOrDie(LoadEvalText({f.dir / "proxy.txt"}, tok, 32, 16, f.dir / "cache"));
    CHECK(Evaluate(tuned.model, *text.packed, text.indices, 8, tok).loss < Evaluate(plain.model, *text.packed, text.indices, 8, tok).loss);
  }
  // Another order, another set, another anchor, or a merge without biases: refused, with the reason.
  CHECK_THAT(std::string(MergeExperts(f.anchor, {modules[1], modules[0]}, with).status().message()),
             Catch::Contains("other modules") && Catch::Contains("expert 1"));
  CHECK_THAT(std::string(MergeExperts(f.anchor, {modules[0]}, with).status().message()), Catch::Contains("expert 2"));
  Federation other(12);
  CHECK_THAT(std::string(MergeExperts(other.anchor, {other.Module("code", 1), other.Module("math", 2)}, with).status().message()),
             Catch::Contains("anchor"));
  with.with_router_bias = false;
  CHECK_THAT(std::string(MergeExperts(f.anchor, modules, with).status().message()), Catch::Contains("no-bias"));
  // Opting out still removes the expert's row exactly: the tuned model with expert 2 masked equals
  // the tuned routers with row 2 dropped.
  {
    c10::InferenceMode inference;
    const at::Tensor ids = Ids(2, 16, 9);
    std::vector<LayerWeights> layers = tuned.model.layers();
    for (LayerWeights& lw : layers) {
      lw.router = lw.router.narrow(0, 0, 2);
      lw.router_bias = lw.router_bias.narrow(0, 0, 2);
      lw.experts.pop_back();
    }
    ModelConfig mc = tuned.model.config();
    mc.num_experts = 2;
    mc.num_experts_per_tok = 2;
    const FlexOlmoModel without = ValueOrDie(FlexOlmoModel::Assemble(mc, tuned.model.embed_tokens(), std::move(layers),
                                                                    tuned.model.norm(), tuned.model.lm_head()));
    CHECK(RelativeError(tuned.model.Forward(ids, Routing::Excluding(3, {2})), without.Forward(ids)) < 1e-5);
  }
  // A file that is not a router tuning is refused.
  CHECK_THAT(std::string(ReadRouterTuning(modules[0]).status().message()), Catch::Contains("router-tune"));
}

TEST_CASE("the model soup's FFN is the mean of the experts' FFNs", "[merge]") {
  Federation f;
  const std::vector<std::string> modules = {f.Module("code", 1), f.Module("math", 2)};
  FlexOlmoModel soup = ValueOrDie(SoupModel(f.anchor, ValueOrDie(LoadExperts(f.anchor, modules))));
  CHECK(soup.config().num_experts == 1);
  auto a = ValueOrDie(ReadExpertModule(*ValueOrDie(SafetensorsFile::Open(modules[0])), 2));
  auto b = ValueOrDie(ReadExpertModule(*ValueOrDie(SafetensorsFile::Open(modules[1])), 2));
  CHECK(RelativeError(soup.layers()[1].experts[0].up_proj, (a.ffn[1].up_proj + b.ffn[1].up_proj) / 2) < 1e-6);
  CHECK(at::equal(soup.layers()[1].k_proj, f.anchor.model.layers()[1].k_proj));
  // Written like a merge: a loadable dense checkpoint, never over an existing directory.
  REQUIRE(WriteModelDirectory(soup, f.anchor_dir, f.dir / "soup", kDefaultMaxShardBytes, {{"note.txt", "soup"}}).ok());
  FlexOlmoModel back = ValueOrDie(FlexOlmoModel::Load(f.dir / "soup"));
  CHECK(back.config().model_type == f.config.model_type);
  CHECK(at::equal(back.layers()[0].experts[0].gate_proj, soup.layers()[0].experts[0].gate_proj));
  CHECK(ValueOrDie(ReadFile(f.dir / "soup/note.txt")) == "soup");
  CHECK(absl::IsAlreadyExists(WriteModelDirectory(soup, f.anchor_dir, f.dir / "soup", kDefaultMaxShardBytes, {})));
}

TEST_CASE("BTM ensemble: causal prefix weights over the members' token probabilities", "[merge]") {
  at::manual_seed(3);
  TokenScores good{at::rand({3, 10}, at::kDouble) * 0.5, at::ones({3, 10}, at::kLong)};
  TokenScores bad{good.nll + 3.0, good.bytes};
  // One member: the ensemble is that member.
  CHECK(RelativeError(EnsembleScores({good}, 4, 1.0).nll, good.nll) < 1e-12);
  TokenScores mix = EnsembleScores({good, bad}, 4, 1.0);
  // Token 0 has no prefix: equal weights, p = (p_good + p_bad) / 2.
  const at::Tensor p0 = (at::exp(-good.nll.select(1, 0)) + at::exp(-bad.nll.select(1, 0))) / 2;
  CHECK(RelativeError(mix.nll.select(1, 0), -at::log(p0)) < 1e-12);
  // After the prefix the weights stop changing, and the better member dominates.
  const at::Tensor w_good = 1.0 / (1.0 + at::exp(-(bad.nll - good.nll).narrow(1, 0, 4).sum(1)));
  const at::Tensor p9 = w_good * at::exp(-good.nll.select(1, 9)) + (1 - w_good) * at::exp(-bad.nll.select(1, 9));
  CHECK(RelativeError(mix.nll.select(1, 9), -at::log(p9)) < 1e-12);
  CHECK((mix.nll.narrow(1, 4, 6) < good.nll.narrow(1, 4, 6) + 0.01).all().item<bool>());
  // Top-k (the paper's BTM mixes 2): the worst member is dropped once the prefix has spoken, and the
  // kept members' weights are renormalised; top-1 picks the first member while weights are equal.
  TokenScores worse{good.nll + 5.0, good.bytes};
  TokenScores top2 = EnsembleScores({good, worse, bad}, 4, 1.0, 2);
  CHECK(RelativeError(top2.nll.select(1, 9), -at::log(p9)) < 1e-12);
  CHECK(RelativeError(EnsembleScores({good, bad}, 4, 1.0, 2).nll, mix.nll) < 1e-12);  // k = M: all of them
  CHECK(RelativeError(EnsembleScores({good, worse, bad}, 4, 1.0, 1).nll.select(1, 0), good.nll.select(1, 0)) < 1e-12);
}

TEST_CASE("paired bootstrap: the relative difference of bits per byte and its 95% interval", "[merge]") {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(50, 150);
  SequenceTotals a, b, c;
  for (int s = 0; s < 40; ++s) {
    a.bytes.push_back(u(rng));
    a.nll.push_back(a.bytes.back() * 0.7 * u(rng) / 100);
  }
  b = a;
  for (double& x : b.nll) x *= 1.1;  // B is exactly 10% worse on every sequence
  c = a;
  for (size_t s = 0; s < c.nll.size(); ++s) c.nll[s] *= s % 2 ? 1.2 : 0.9;  // worse on some, better on others
  // The same model: 0, no spread. A constant ratio: that ratio under every resample.
  Interval same = PairedBootstrap({a}, {a}, 500, 1);
  CHECK(same.estimate == 0);
  CHECK(same.low == 0);
  CHECK(same.high == 0);
  Interval tenth = PairedBootstrap({a}, {b}, 500, 1);
  CHECK(tenth.estimate == Approx(1 / 1.1 - 1).epsilon(1e-12));
  CHECK(tenth.high - tenth.low < 1e-12);
  // Noisy differences: the interval holds the point estimate and has width; the seed repeats it.
  Interval noisy = PairedBootstrap({a}, {c}, 2000, 1);
  CHECK(noisy.low < noisy.estimate);
  CHECK(noisy.estimate < noisy.high);
  CHECK(noisy.high - noisy.low > 0.01);
  const Interval again = PairedBootstrap({a}, {c}, 2000, 1);
  CHECK(again.low == noisy.low);
  CHECK(again.high == noisy.high);
  // Several domains: the relative difference of the mean of the domains' bits per byte.
  auto bpb = [](const SequenceTotals& t) {
    double n = 0, by = 0;
    for (size_t s = 0; s < t.nll.size(); ++s) n += t.nll[s], by += t.bytes[s];
    return n / by / std::log(2.0);
  };
  const Interval two = PairedBootstrap({a, b}, {c, a}, 0, 1);
  CHECK(two.estimate == Approx((bpb(a) + bpb(b)) / (bpb(c) + bpb(a)) - 1).epsilon(1e-12));
  CHECK(two.low == two.estimate);
}

TEST_CASE("generation: greedy with the KV cache equals re-running the model; sampling repeats with its seed", "[merge]") {
  Federation f;
  MergeOptions o;
  o.top_k = 2;
  MergedModel merged = ValueOrDie(MergeExperts(f.anchor, {f.Module("code", 1), f.Module("math", 2)}, o));
  const FlexOlmoModel& m = merged.model;
  ByteTokenizer tok;
  const std::vector<int32_t> prompt = tok.Encode("The quick brown fox");
  GenerateOptions g;
  g.max_new_tokens = 12;
  g.stop_at_eos = false;
  const Routing routing = Routing::Excluding(3, {1});
  GenerateResult greedy = ValueOrDie(Generate(m, tok, prompt, g, routing));
  REQUIRE(greedy.tokens.size() == 12);
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  {
    c10::InferenceMode inference;
    for (int32_t expected : greedy.tokens) {
      at::Tensor logits = m.Forward(at::tensor(seq, at::kLong).unsqueeze(0), routing).select(1, -1).squeeze(0);
      logits.index_put_({tok.bos_id()}, -INFINITY);
      logits.index_put_({tok.pad_id()}, -INFINITY);
      CHECK(logits.argmax().item<int64_t>() == expected);
      seq.push_back(expected);
    }
  }
  g.temperature = 1.0;
  g.top_p = 0.9;
  g.seed = 7;
  const auto a = ValueOrDie(Generate(m, tok, prompt, g)).tokens;
  CHECK(ValueOrDie(Generate(m, tok, prompt, g)).tokens == a);
  g.seed = 8;
  CHECK(ValueOrDie(Generate(m, tok, prompt, g)).tokens != a);
  g.top_k = 1;  // top-1 sampling is greedy
  GenerateOptions greedy_all = g;
  greedy_all.temperature = 0;
  CHECK(ValueOrDie(Generate(m, tok, prompt, g)).tokens == ValueOrDie(Generate(m, tok, prompt, greedy_all)).tokens);
  g.max_new_tokens = 10000;
  CHECK_THAT(std::string(Generate(m, tok, prompt, g).status().message()), Catch::Contains("positions"));
}

TEST_CASE("the evaluation suite scores every row on every domain and checks the expected results", "[merge]") {
  Federation f;
  std::string a_text, b_text, mixed_text;
  for (int i = 0; i < 400; ++i) {
    a_text += "alpha beta gamma " + std::to_string(i % 13) + "\n";
    b_text += "{x: " + std::to_string(i * 7 % 101) + "}\n";
    mixed_text += i % 2 ? "alpha beta gamma " + std::to_string(i % 13) + "\n" : "{x: " + std::to_string(i * 7 % 101) + "}\n";
  }
  REQUIRE(WriteFileAtomically(f.dir / "a.txt", a_text).ok());
  REQUIRE(WriteFileAtomically(f.dir / "b.txt", b_text).ok());
  REQUIRE(WriteFileAtomically(f.dir / "mixed.txt", mixed_text).ok());
  const nlohmann::json spec_json = {
      {"anchor", f.anchor_dir},
      {"domains", {{{"name", "public"}, {"heldout", f.dir / "a.txt"}}, {{"name", "b"}, {"heldout", f.dir / "b.txt"}},
                   {{"name", "mixed"}, {"heldout", f.dir / "mixed.txt"}, {"mixed", true}}}},
      {"owners", {{{"name", "bee"}, {"domain", "b"}, {"module", f.Module("bee", 1)}, {"dense_module", f.Module("bee_dense", 2)},
                   {"no_bias_module", f.Module("bee_nobias", 3, /*with_bias=*/false)},
                   {"encoder_init_module", f.Module("bee_encoder", 4)}}}},
      {"top_k", {0, 1}}, {"seq_len", 32}, {"max_sequences", 4}, {"btm_prefix", 8}, {"cache_dir", f.dir / "cache"}};
  SuiteSpec spec = ValueOrDie(SuiteSpec::FromJson(spec_json, "spec"));
  std::vector<std::string> lines;
  nlohmann::json r = ValueOrDie(RunSuite(spec, [&](const std::string& l) { lines.push_back(l); }));
  std::vector<std::string> names;
  for (const auto& row : r["rows"]) names.push_back(row["name"]);
  CHECK(names == std::vector<std::string>{"Public anchor", "Two-expert model: bee", "Dense expert: bee",
                                          "Model soup (mean of the experts' FFNs)",
                                          "BTM (public + dense experts, top-2, prefix 8)",
                                          "BTM of the two-expert models (prefix 8, tau 1)",
                                          "FlexOlmo merged (2 experts, k = 2)", "FlexOlmo without the negative bias",
                                          "FlexOlmo trained without the negative bias",
                                          "FlexOlmo with sentence-encoder router init",
                                          "No coordination (dense experts merged)", "FlexOlmo, bee opted out",
                                          "FlexOlmo merged (2 experts, k = 1)"});
  CHECK(lines.size() == names.size() - 2);  // the BTM rows are computed from their members' scores, not run
  // With one owner, the merged model is its two-expert model, that BTM its only member, and the
  // opt-out the anchor.
  auto bpb = [&](size_t row, const char* d) { return r["rows"][row]["bits_per_byte"][d].get<double>(); };
  CHECK(bpb(6, "b") == Approx(bpb(1, "b")).epsilon(1e-9));
  CHECK(bpb(5, "b") == Approx(bpb(1, "b")).epsilon(1e-9));
  CHECK(bpb(11, "public") == Approx(bpb(0, "public")).epsilon(1e-6));
  // The dense expert is the anchor with the dense module's FFN; the paper's BTM mixes it with the
  // anchor by prefix likelihood (top-2 of 2 here), computed again here from the two models.
  {
    const FlexOlmoModel dense = ValueOrDie(SoupModel(f.anchor, ValueOrDie(LoadExperts(f.anchor, {f.Module("bee_dense", 2)}))));
    ByteTokenizer tok;
    const EvalText text = ValueOrDie(LoadEvalText({f.dir / "mixed.txt"}, tok, 32, 4, f.dir / "cache"));
    const TokenScores on_anchor = ScoreTokens(f.anchor.model, *text.packed, text.indices, 8, tok);
    const TokenScores on_dense = ScoreTokens(dense, *text.packed, text.indices, 8, tok);
    CHECK(bpb(2, "mixed") == Approx(Summarize(on_dense).bits_per_byte).epsilon(1e-9));
    CHECK(bpb(4, "mixed") == Approx(Summarize(EnsembleScores({on_anchor, on_dense}, 8, 1.0, 2)).bits_per_byte).epsilon(1e-9));
    CHECK(bpb(4, "mixed") != bpb(5, "mixed"));
  }
  // The average is over the single-domain columns only; the mixed column comes after it.
  CHECK(r["rows"][0]["average"].get<double>() == Approx((bpb(0, "public") + bpb(0, "b")) / 2));
  CHECK(r["mixed_domains"] == nlohmann::json::array({"mixed"}));
  CHECK_THAT(r["table"].get<std::string>(), Catch::Contains("| model | public | b | average | mixed |"));
  CHECK(r["routing"]["b"].size() == 2);  // [layer][expert] shares of the merged model
  CHECK(r["routing"]["b"][0][0].get<double>() + r["routing"]["b"][0][1].get<double>() == Approx(1.0));
  // The paper's claims: on b, on mixed, public within 3%, soup, BTM, and 2 per opt-out.
  REQUIRE(r["checks"].size() == 7);
  for (const auto& c : r["checks"]) {
    INFO(c.dump());
    CHECK(c["low"].get<double>() <= c["estimate"].get<double>());
    CHECK(c["estimate"].get<double>() <= c["high"].get<double>());
    if (c["confident"].get<bool>()) CHECK(c["holds"].get<bool>());
  }
  CHECK(r["checks"][1]["claim"] == "merged beats the public model on mixed");
  CHECK(r["checks"][4]["claim"] == "merged beats BTM (public + dense experts, top-2, prefix 8) on average");
  // Opting the only expert out gives the public model back exactly: no difference, no spread.
  CHECK(r["checks"][5]["estimate"].get<double>() < 1e-6);
  CHECK(r["checks"][5]["high"].get<double>() < 1e-6);
  // Every other row against the merged model, with intervals.
  CHECK(r["differences"].size() == names.size() - 1);
  CHECK(r["differences"][1]["row"] == "Two-expert model: bee");
  CHECK(std::abs(r["differences"][1]["merged_vs_row"]["b"]["estimate"].get<double>()) < 1e-9);
  CHECK_THAT(r["table"].get<std::string>(), Catch::Contains("| Public anchor |"));
  CHECK_THAT(r["routing_table"].get<std::string>(), Catch::Contains("| domain, layer | public | bee |"));
  CHECK_THAT(r["routing_table"].get<std::string>(), Catch::Contains("| mixed, 1 |"));
  CHECK_THAT(std::string(SuiteSpec::FromJson({{"anchor", "x"}, {"domains", nlohmann::json::array()}}, "s").status().message()),
             Catch::Contains("owners"));
}

TEST_CASE("top-p keeps the smallest set of tokens with that much probability", "[merge]") {
  at::Generator gen = at::detail::createCPUGenerator(1);
  const at::Tensor logits = at::log(at::tensor({0.5f, 0.3f, 0.15f, 0.05f}));
  GenerateOptions o;
  o.temperature = 1.0;
  o.top_p = 0.75;  // {0, 1} hold 0.8 ≥ 0.75
  std::set<int64_t> seen;
  for (int i = 0; i < 300; ++i) seen.insert(SampleToken(logits, o, gen));
  CHECK(seen == std::set<int64_t>{0, 1});
  o.top_p = 1.0;
  o.top_k = 3;
  seen.clear();
  for (int i = 0; i < 600; ++i) seen.insert(SampleToken(logits, o, gen));
  CHECK(seen == std::set<int64_t>{0, 1, 2});
}

}  // namespace
}  // namespace flexfed
