// Specification of owner training (common/train/training.h), router init, and expert export
// (common/core/expert_module.h), on a tiny anchor pretrained here on a synthetic "public" domain.
#include <catch2/catch.hpp>

#include <malloc.h>

#include <filesystem>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#if FLEXFED_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "absl/strings/str_cat.h"
#include "common/model/anchor.h"
#include "common/model/autocast.h"
#include "common/model/moe.h"
#include "common/merge/expert_export.h"
#include "common/core/file_util.h"
#include "common/core/model_config.h"
#include "common/model/tokenizer.h"
#include "common/train/cross_entropy.h"
#include "common/core/dp_accountant.h"
#include "common/train/dp_sgd.h"
#include "common/train/loss.h"
#include "common/train/memory_plan.h"
#include "common/train/router_init.h"
#include "common/train/training.h"
#include "tests/test_util.h"

namespace flexfed {
namespace {

using testing::PlanPartBytes;
using testing::ScopedEnv;
using testing::TempDir;
using testing::ValueOrDie;
namespace fs = std::filesystem;

// Public domain: English-like sentences. Owner domain: arithmetic. Different enough that an
// expert trained on arithmetic must help there, and a router should tell them apart.
void WriteDomain(const std::string& dir, bool arithmetic, int documents, uint32_t seed) {
  fs::create_directories(dir);
  std::mt19937 rng(seed);
  const char* nouns[] = {"cat", "dog", "bird", "house", "tree", "river", "king", "child", "road", "field"};
  const char* verbs[] = {"sees", "likes", "finds", "keeps", "takes", "makes"};
  for (int d = 0; d < documents; ++d) {
    std::string text;
    for (int s = 0; s < 30; ++s) {
      if (arithmetic) {
        const int a = rng() % 50, b = rng() % 50;
        text += absl::StrCat(a, " + ", b, " = ", a + b, ";\n");
      } else {
        text += absl::StrCat("the ", nouns[rng() % 10], " ", verbs[rng() % 6], " the ", nouns[rng() % 10], ".\n");
      }
    }
    REQUIRE(WriteFileAtomically(absl::StrCat(dir, "/doc", d, ".txt"), text).ok());
  }
}

TrainConfig SmallRun(std::vector<std::string> data) {
  TrainConfig c;
  c.data = std::move(data);
  c.seq_len = 64;
  c.batch_size = 8;
  c.max_steps = 40;
  c.lr = 3e-3;
  c.warmup_steps = 4;
  c.val_every = 0;
  c.val_batches = 4;
  c.checkpoint_every = 0;
  c.log_every = 10;
  c.validation_fraction = 0.1;
  c.threads = 2;
  return c;
}

// One anchor for the whole process: a `test`-size model pretrained on the public domain, with r_pub.
struct World {
  TempDir dir;
  std::string anchor, pub, math, math_router, cache;
  World() {
    pub = dir / "public";
    math = dir / "math";
    cache = dir / "cache";
    WriteDomain(pub, /*arithmetic=*/false, 40, 1);
    WriteDomain(math, /*arithmetic=*/true, 40, 2);
    TrainConfig c = SmallRun({pub});
    c.mode = "pretrain";
    c.preset = "test";
    c.max_steps = 80;
    auto trainer = ValueOrDie(Trainer::Create(c, {"", "", dir / "anchor_run", cache}, false));
    REQUIRE(ValueOrDie(trainer->Run(nullptr, nullptr)).steps == 80);
    anchor = dir / "anchor";
    fs::copy(dir / "anchor_run/model", anchor);
    Anchor a = ValueOrDie(LoadAnchor(anchor, /*require_router_pub=*/false));
    TokenCorpus pub_corpus = ValueOrDie(TokenCorpus::Build({pub}, ByteTokenizer(), {}, cache));
    TokenCorpus math_corpus = ValueOrDie(TokenCorpus::Build({math}, ByteTokenizer(), {}, cache));
    RouterInitOptions ro;
    ro.samples = 20;
    const RouterEmbedding pub_row = ValueOrDie(InitRouterEmbedding(a.model, &pub_corpus, ro, nullptr));
    REQUIRE(pub_row.centers.size() == 2);
    REQUIRE(WriteRouterEmbedding(anchor + "/router_pub.safetensors", pub_row).ok());
    math_router = dir / "math_router.safetensors";
    const RouterEmbedding math_row = ValueOrDie(InitRouterEmbedding(a.model, &math_corpus, ro, nullptr, &pub_row));
    CHECK(math_row.centers.empty());
    // The math data's own mean, as a center: what the owner's row is measured against.
    const RouterEmbedding math_mean = ValueOrDie(InitRouterEmbedding(a.model, &math_corpus, ro, nullptr));
    for (int l = 0; l < 2; ++l) {
      // r_pub is zero (no shared offset); the owner's row is v with v·(m − c) = 2D, and the bias
      // puts the boundary half-way (as far as a bias ≤ 0 can).
      CHECK(pub_row.rows[l].abs().max().item<double>() == 0.0);
      const at::Tensor m = math_mean.centers[l].to(at::kDouble), c = pub_row.centers[l].to(at::kDouble);
      const at::Tensor v = (math_row.rows[l] - pub_row.rows[l]).to(at::kDouble);
      const double d = (m - c).norm().item<double>();
      CHECK(std::abs(v.dot(m - c).item<double>() - 2 * ro.margin * d / std::max(d, 0.25 * c.norm().item<double>())) < 1e-3);
      const double half_way = -v.dot((m + c) / 2).item<double>();
      CHECK(std::abs(math_row.biases[l].item<double>() - std::min(0.0, half_way)) < 1e-3 * std::max(1.0, std::abs(half_way)));
    }
    REQUIRE(WriteRouterEmbedding(math_router, math_row).ok());
  }
  TrainInputs Inputs(const std::string& run) const { return {anchor, math_router, Run(run), cache}; }
  // The anchor rounded to bf16 and saved as a bf16 checkpoint (as real anchors are), with r_pub.
  std::string Bf16Anchor() {
    const std::string out = dir / "anchor_bf16";
    if (!fs::exists(out)) {
      fs::copy(anchor, out, fs::copy_options::recursive);
      const FlexOlmoModel m = ValueOrDie(FlexOlmoModel::Load(anchor, at::kBFloat16));
      REQUIRE(m.Save(out).ok());
    }
    return out;
  }
  std::string Run(const std::string& run) const { return dir / ("runs/" + run); }
};

// What each layer's router sees on the first `n` tokens of `corpus`: [n, H] fp32 per layer.
std::vector<at::Tensor> RouterInputs(const FlexOlmoModel& model, const TokenCorpus& corpus, int64_t n) {
  std::vector<int64_t> ids(corpus.tokens(), corpus.tokens() + std::min<int64_t>(n, corpus.num_tokens()));
  ForwardTrace trace;
  trace.want_router_inputs = true;
  model.Forward(at::tensor(ids, at::kLong).view({1, -1}), {}, nullptr, &trace);
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : trace.router_inputs) out.push_back(t[0].to(at::kFloat));
  return out;
}

World& TheWorld() {
  static World world;
  return world;
}

bool Contains(const std::vector<NamedTensor>& tensors, const at::Tensor& t) {
  return std::any_of(tensors.begin(), tensors.end(), [&](const NamedTensor& nt) { return nt.tensor.is_same(t); });
}

TEST_CASE("after a step only expert 1, r_i and b_i have gradients; nothing frozen has one", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  auto trainer = ValueOrDie(Trainer::Create(c, w.Inputs("grads"), false));
  // Stop just before the optimizer drops the gradients: run the forward/backward by hand.
  const int64_t layers = trainer->model().config().num_hidden_layers;
  REQUIRE(trainer->trainable().size() == static_cast<size_t>(layers * 5));  // gate, up, down, r_i, b_i per layer
  for (const NamedTensor& nt : trainer->trainable()) {
    INFO(nt.name);
    CHECK(nt.tensor.requires_grad());
    CHECK(nt.tensor.is_leaf());
  }
  std::vector<NamedTensor> frozen = trainer->FrozenTensors();
  CHECK(frozen.size() > 10);
  for (const NamedTensor& nt : frozen) {
    INFO(nt.name);
    CHECK_FALSE(nt.tensor.requires_grad());
  }
  // The expert-1 weights in the model are the trained leaves; expert 0 is the anchor's (shared, not copied).
  Anchor anchor = ValueOrDie(LoadAnchor(w.anchor, true, at::kFloat));
  for (int64_t l = 0; l < layers; ++l) {
    CHECK(Contains(trainer->trainable(), trainer->model().layers()[l].experts[1].gate_proj));
    CHECK(at::equal(trainer->model().layers()[l].experts[0].gate_proj, anchor.model.layers()[l].experts[0].gate_proj));
  }
  // Run a forward and backward exactly as Step() does, then inspect .grad().
  TrainConfig one = c;
  one.max_steps = 1;
  one.grad_clip = 0;
  auto t2 = ValueOrDie(Trainer::Create(one, w.Inputs("grads2"), false));
  // Tokens of the owner's own text: random bytes over the whole vocabulary include bytes the anchor
  // never saw, whose layer-0 router logits can saturate (p = 0 or 1 exactly, zero gradient) — which
  // made this test fail in about one random test order in twenty.
  const std::string text = ValueOrDie(ReadFile(w.math + "/doc0.txt"));
  REQUIRE(text.size() >= 34);
  at::Tensor ids = at::empty({2, 17}, at::kLong);
  for (int64_t i = 0; i < 34; ++i) ids.view(-1)[i] = static_cast<int64_t>(static_cast<unsigned char>(text[i]));
  ForwardTrace trace;
  at::Tensor logits = t2->model().Forward(ids.narrow(1, 0, 16), {}, nullptr, &trace);
  for (size_t l = 0; l < trace.router_logits.size(); ++l) {
    // Regression: router-init measured the stream entering each layer, not what its router sees
    // (after attention); layer-0 rows came out 80× too long, logits of ±190 on the owner's own
    // text, and the row's gradient was exactly 0.
    INFO("layer " << l);
    const at::Tensor gap = trace.router_logits[l].select(1, 1) - trace.router_logits[l].select(1, 0);
    CHECK(gap.abs().max().item<double>() < 20);
  }
  at::cross_entropy_loss(logits.reshape({-1, 259}), ids.narrow(1, 1, 16).reshape({-1})).backward();
  for (const NamedTensor& nt : t2->trainable()) {
    INFO(nt.name);
    REQUIRE(nt.tensor.grad().defined());
    CHECK(nt.tensor.grad().abs().sum().item<double>() > 0);
  }
  for (const NamedTensor& nt : t2->FrozenTensors()) {
    INFO(nt.name);
    CHECK_FALSE(nt.tensor.grad().defined());
  }
}

TEST_CASE("an expert trained on its domain beats the anchor there and takes its tokens far more often than public ones", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 60;
  auto trainer = ValueOrDie(Trainer::Create(c, w.Inputs("math"), false));
  const EvalResult before = trainer->Validate();  // expert 1 = anchor copy: the anchor's loss
  TrainOutcome out = ValueOrDie(trainer->Run(nullptr, nullptr));
  CHECK_FALSE(out.interrupted);
  const EvalResult after = trainer->Validate();
  INFO("validation loss " << before.loss << " -> " << after.loss);
  CHECK(after.loss < 0.8 * before.loss);

  // The anchor itself on the same validation text agrees with `before`.
  FlexOlmoModel anchor = ValueOrDie(FlexOlmoModel::Load(w.anchor));
  // Routing: on the owner's domain most tokens go first to expert 1; on public text fewer do.
  FlexOlmoModel trained = ValueOrDie(FlexOlmoModel::Load(w.Run("math") + "/model"));
  auto top1_share = [&](const std::string& data) {
    TokenCorpus corpus = ValueOrDie(TokenCorpus::Build({data}, ByteTokenizer(), {}, w.cache));
    std::vector<int64_t> docs(corpus.num_documents());
    std::iota(docs.begin(), docs.end(), 0);
    PackedSequences packed(corpus, docs, 64, ByteTokenizer::kEos);
    c10::InferenceMode guard;
    ForwardTrace trace;
    trained.Forward(packed.Batch({0, 1, 2, 3, 4, 5, 6, 7}).narrow(1, 0, 64), {}, nullptr, &trace);
    double share = 0;
    for (const at::Tensor& idx : trace.expert_indices) share += (idx.select(1, 0) == 1).to(at::kFloat).mean().item<double>();
    return share / trace.expert_indices.size();
  };
  const double math_share = top1_share(w.math), public_share = top1_share(w.pub);
  INFO("expert-1 share: math " << math_share << ", public " << public_share);
  // The router starts with its boundary half-way between the public and the math means
  // (router-init), so about half of the math tokens and few public ones pick expert 1 first.
  CHECK(math_share > 0.4);
  CHECK(math_share > 2 * public_share);

  // Export: the module holds exactly the allow-listed tensors and validates against the anchor.
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  ExpertTensors expert = ValueOrDie(ExtractExpert(trained, a.model, a.router_pub, nullptr));
  ExpertModuleMetadata meta{a.id, ConfigHash(a.model.config()), "acme", "math", "arithmetic", out.tokens, "anchor"};
  REQUIRE(WriteExpertModule(w.dir / "math.safetensors", expert, meta).ok());
  auto file = ValueOrDie(SafetensorsFile::Open(w.dir / "math.safetensors"));
  ExpertModuleMetadata back = ValueOrDie(ValidateExpertModule(w.dir / "math.safetensors", a.model.config(), Dtype::kF32, a.id));
  CHECK(back.tokens_trained == out.tokens);
  std::vector<std::string> allowed;
  for (const AllowedTensor& t : ExpertModuleAllowList(a.model.config(), Dtype::kF32, /*with_bias=*/true)) allowed.push_back(t.name);
  std::sort(allowed.begin(), allowed.end());
  CHECK(file->Names() == allowed);
  // Expert 1's FFN in the module is the trained one, not the anchor's.
  CHECK_FALSE(at::equal(*file->Get("layers.0.up_proj.weight"), a.model.layers()[0].experts[0].up_proj));
  CHECK(at::equal(*file->Get("layers.0.up_proj.weight"), trained.layers()[0].experts[1].up_proj));
  CHECK(back.privacy.empty());
  CHECK_FALSE(ExtractionRate(back).has_value());

  // The optional privacy record: kept and read back when consistent, refused as metadata otherwise.
  meta.privacy = R"({"extraction": {"audited": 200, "extracted": 3, "rate": 0.015, "complete": true}})";
  REQUIRE(WriteExpertModule(w.dir / "math_audited.safetensors", expert, meta).ok());
  back = ValueOrDie(ValidateExpertModule(w.dir / "math_audited.safetensors", a.model.config(), Dtype::kF32, a.id));
  CHECK(ExtractionRate(back) == 0.015);
  for (const char* bad : {R"(not json)", R"([1, 2])", R"({"extraction": {"audited": 0, "extracted": 0, "rate": 0, "complete": true}})",
                          R"({"extraction": {"audited": 10, "extracted": 11, "rate": 1.1, "complete": true}})",
                          R"({"extraction": {"audited": 200, "extracted": 3, "rate": 0.001, "complete": true}})",
                          R"({"extraction": {"audited": 200, "extracted": 3, "rate": "low", "complete": true}})"}) {
    CAPTURE(bad);
    meta.privacy = bad;
    REQUIRE(WriteExpertModule(w.dir / "math_bad.safetensors", expert, meta).ok());
    absl::StatusOr<ExpertModuleMetadata> refused =
        ValidateExpertModule(w.dir / "math_bad.safetensors", a.model.config(), Dtype::kF32, a.id);
    CHECK(RejectionReason(refused.status()) == "metadata");
  }
  // An interrupted audit is recorded but gives no rate to gate on.
  meta.privacy = R"({"extraction": {"audited": 20, "extracted": 0, "rate": 0, "complete": false}})";
  REQUIRE(WriteExpertModule(w.dir / "math_partial.safetensors", expert, meta).ok());
  CHECK_FALSE(ExtractionRate(ValueOrDie(ValidateExpertModule(w.dir / "math_partial.safetensors", a.model.config(), Dtype::kF32, a.id))));
}

TEST_CASE("export refuses a model whose frozen tensors differ from the anchor", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 2;
  if (!fs::exists(w.Run("tamper") + "/model")) {  // Catch runs the body once per SECTION: train once
    auto trainer = ValueOrDie(Trainer::Create(c, w.Inputs("tamper"), false));
    ValueOrDie(trainer->Run(nullptr, nullptr));
  }
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  const std::string model_dir = w.Run("tamper") + "/model";
  CHECK(ExtractExpert(ValueOrDie(FlexOlmoModel::Load(model_dir)), a.model, a.router_pub, nullptr).ok());

  SECTION("an attention weight nudged by one ulp") {
    FlexOlmoModel m = ValueOrDie(FlexOlmoModel::Load(model_dir));
    at::Tensor q = m.layers()[1].q_proj;
    q.view({-1})[5] = std::nextafter(q.view({-1})[5].item<float>(), 1.0f);
    absl::Status s = ExtractExpert(m, a.model, a.router_pub, nullptr).status();
    CHECK(absl::IsFailedPrecondition(s));
    CHECK_THAT(std::string(s.message()), Catch::Contains("model.layers.1.self_attn.q_proj.weight"));
  }
  SECTION("the public expert changed") {
    FlexOlmoModel m = ValueOrDie(FlexOlmoModel::Load(model_dir));
    m.layers()[0].experts[0].down_proj.add_(1e-3);
    CHECK_THAT(std::string(ExtractExpert(m, a.model, a.router_pub, nullptr).status().message()),
               Catch::Contains("mlp.experts.0.down_proj"));
  }
  SECTION("r_pub changed") {
    FlexOlmoModel m = ValueOrDie(FlexOlmoModel::Load(model_dir));
    m.layers()[0].router[0][3].fill_(42.0);
    CHECK_THAT(std::string(ExtractExpert(m, a.model, a.router_pub, nullptr).status().message()), Catch::Contains("r_pub"));
  }
}

TEST_CASE("resuming gives the weights and losses of an uninterrupted run", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 12;
  c.grad_accum = 2;
  c.checkpoint_every = 0;
  c.log_every = 1;
  const bool compact = GENERATE(false, true);  // bf16 moments (saved and restored as bf16), checkpointing
  INFO((compact ? "bf16 moments, activation checkpointing" : "fp32 moments"));
  c.optimizer_moments = compact ? "bf16" : "fp32";
  c.activation_checkpointing = compact;
  const std::string tag = compact ? "-compact" : "";
  // Straight: 12 steps.
  auto straight = ValueOrDie(Trainer::Create(c, w.Inputs("straight" + tag), false));
  std::vector<double> straight_losses;
  for (int i = 0; i < 12; ++i) straight_losses.push_back(straight->Step());

  // Interrupted: 5 steps, a stop (checkpoint), then a new process resumes for 7 more.
  std::vector<double> losses;
  {
    auto first = ValueOrDie(Trainer::Create(c, w.Inputs("resumed" + tag), false));
    std::atomic<bool> stop{false};
    for (int i = 0; i < 5; ++i) losses.push_back(first->Step());
    REQUIRE(first->SaveCheckpoint().ok());
  }
  auto second = ValueOrDie(Trainer::Create(c, w.Inputs("resumed" + tag), /*resume=*/true));
  CHECK(second->step() == 5);
  for (int i = 0; i < 7; ++i) losses.push_back(second->Step());
  REQUIRE(losses.size() == straight_losses.size());
  for (size_t i = 0; i < losses.size(); ++i) CHECK(losses[i] == straight_losses[i]);
  for (size_t i = 0; i < straight->trainable().size(); ++i) {
    INFO(straight->trainable()[i].name);
    CHECK(at::equal(second->trainable()[i].tensor, straight->trainable()[i].tensor));
  }
}

// A run started before a setting existed (here `tokenizer`, added with issue #14) resumes: the
// missing setting had its default value.
TEST_CASE("a run whose settings predate a newer setting resumes with that setting's default", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 4;
  c.checkpoint_every = 2;
  {
    auto first = ValueOrDie(Trainer::Create(c, w.Inputs("older"), false));
    first->Step();
    first->Step();
    REQUIRE(first->SaveCheckpoint().ok());
  }
  const std::string config_path = w.Run("older") + "/train_config.json";
  nlohmann::json saved = nlohmann::json::parse(ValueOrDie(ReadFile(config_path)));
  saved["settings"].erase("tokenizer");
  REQUIRE(WriteFileAtomically(config_path, saved.dump(2)).ok());
  auto resumed = ValueOrDie(Trainer::Create(c, w.Inputs("older"), true));
  CHECK(resumed->step() == 2);
  // A setting that differs is still refused, named.
  saved["settings"]["lr"] = 1.0;
  REQUIRE(WriteFileAtomically(config_path, saved.dump(2)).ok());
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("older"), true).status().message()), Catch::Contains("'lr'"));
}

TEST_CASE("Run stops on request with a checkpoint, and resuming finishes the same run", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 6;
  std::atomic<bool> stop{true};  // as if SIGINT arrived during the first step
  auto first = ValueOrDie(Trainer::Create(c, w.Inputs("stopped"), false));
  TrainOutcome out = ValueOrDie(first->Run(&stop, nullptr));
  CHECK(out.interrupted);
  CHECK(out.steps == 1);
  CHECK(ValueOrDie(LatestCheckpoint(w.Run("stopped"))).find("step-00000001") != std::string::npos);
  CHECK_FALSE(fs::exists(w.Run("stopped") + "/model"));  // no half-trained model is published
  auto second = ValueOrDie(Trainer::Create(c, w.Inputs("stopped"), true));
  TrainOutcome done = ValueOrDie(second->Run(nullptr, nullptr));
  CHECK(done.steps == 6);
  CHECK(fs::exists(w.Run("stopped") + "/model/config.json"));
}

TEST_CASE("bad training input is refused with the reason", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  auto error = [&](const TrainConfig& config, TrainInputs inputs, bool resume = false) {
    absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(config, inputs, resume);
    return t.ok() ? std::string("OK") : std::string(t.status().message());
  };
  TrainInputs in = w.Inputs("bad");
  CHECK_THAT(error(c, {w.dir / "nope", w.math_router, w.Run("bad1"), w.cache}), Catch::Contains("no such anchor"));
  CHECK_THAT(error(c, {w.anchor, "", w.Run("bad2"), w.cache}), Catch::Contains("router-init"));
  TrainConfig empty = c;
  empty.data = {w.dir / "missing-data"};
  CHECK_THAT(error(empty, w.Inputs("bad3")), Catch::Contains("no such file or folder"));
  REQUIRE(WriteFileAtomically(w.dir / "latin1.txt", "caf\xE9").ok());
  TrainConfig latin1 = c;
  latin1.data = {w.dir / "latin1.txt"};
  CHECK_THAT(error(latin1, w.Inputs("bad4")), Catch::Contains("invalid UTF-8"));
  TrainConfig tiny_data = c;
  tiny_data.seq_len = 100000;
  CHECK_THAT(error(tiny_data, w.Inputs("bad5")), Catch::Contains("fewer than one batch"));
  // A run folder cannot be started twice, nor resumed with other settings.
  c.max_steps = 1;
  REQUIRE(ValueOrDie(Trainer::Create(c, w.Inputs("once"), false))->SaveCheckpoint().ok());
  CHECK_THAT(error(c, w.Inputs("once")), Catch::Contains("already holds a run"));
  TrainConfig other = c;
  other.lr = 1e-4;
  CHECK_THAT(error(other, w.Inputs("once"), true), Catch::Contains("different 'lr'"));
  CHECK_THAT(error(c, w.Inputs("never-started"), true), Catch::Contains("no run to resume"));
}

TEST_CASE("bf16 autocast training keeps fp32 master weights and learns like fp32", "[training]") {
  // The CUDA recipe (bf16 autocast, fp32 master weights and optimizer) run on the CPU's autocast.
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 12;
  std::vector<double> losses[2];
  for (int mixed = 0; mixed < 2; ++mixed) {
    c.precision = mixed ? "bf16" : "fp32";
    auto t = ValueOrDie(Trainer::Create(c, w.Inputs(absl::StrCat("precision-", c.precision)), false));
    for (int i = 0; i < 12; ++i) losses[mixed].push_back(t->Step());
    for (const NamedTensor& nt : t->trainable()) {
      INFO(nt.name);
      CHECK(nt.tensor.scalar_type() == at::kFloat);
    }
  }
  INFO("fp32 " << losses[0].front() << " → " << losses[0].back() << ", bf16 " << losses[1].front() << " → "
               << losses[1].back());
  CHECK(losses[1].back() < losses[1].front() - 0.1);
  CHECK(std::abs(losses[1].front() - losses[0].front()) < 0.02 * losses[0].front());  // bf16 products, same model
  CHECK(losses[1].front() != losses[0].front());                                       // ... really in bf16
  CHECK(std::abs(losses[1].back() - losses[0].back()) < 0.05 * losses[0].back());
}

TEST_CASE("--device cuda without a usable GPU is refused with the fix", "[training]") {
  if (at::hasCUDA()) {
    WARN("a GPU is present: the refusal is not reachable here");
    return;
  }
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.device = "cuda";
  absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(c, w.Inputs("no-gpu"), false);
  REQUIRE_FALSE(t.ok());
  CHECK_THAT(std::string(t.status().message()), Catch::Contains("--device cpu"));
  CHECK_FALSE(fs::exists(w.Run("no-gpu")));  // nothing written
}

TEST_CASE("the learning rate warms up linearly then follows a cosine to its floor", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 104;
  c.warmup_steps = 4;
  c.min_lr_ratio = 0.1;
  auto t = ValueOrDie(Trainer::Create(c, w.Inputs("schedule"), false));
  CHECK(t->LearningRate(0) == Approx(c.lr / 4));
  CHECK(t->LearningRate(3) == Approx(c.lr));
  CHECK(t->LearningRate(4) == Approx(c.lr));
  CHECK(t->LearningRate(54) == Approx(0.55 * c.lr));  // half-way: (1 + 0.1) / 2
  CHECK(t->LearningRate(104) == Approx(0.1 * c.lr));
}

TEST_CASE("router-init: vectors from other embedders must fit the hidden size", "[training]") {
  World& w = TheWorld();
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  RouterInitOptions o;
  o.mode = "vectors";
  REQUIRE(WriteSafetensors(w.dir / "vec_ok.safetensors", {{"vectors", at::randn({64})}}).ok());
  RouterEmbedding e = ValueOrDie(InitRouterEmbedding(a.model, nullptr, [&] { auto x = o; x.vectors = w.dir / "vec_ok.safetensors"; return x; }(), nullptr));
  CHECK(e.rows.size() == 2);
  CHECK(at::equal(e.rows[0], e.rows[1]));
  REQUIRE(WriteSafetensors(w.dir / "vec_bad.safetensors", {{"vectors", at::randn({4096})}}).ok());
  o.vectors = w.dir / "vec_bad.safetensors";
  absl::Status s = InitRouterEmbedding(a.model, nullptr, o, nullptr).status();
  CHECK_THAT(std::string(s.message()), Catch::Contains("[4096]") && Catch::Contains("[64]"));
}

// Issue #14: rows from a sentence encoder (scripts/router_vectors.py) get the same selective bias
// as anchor-mode rows — calibrated per layer on public text to the share asked for — and keep
// their direction.
TEST_CASE("router-init: vector rows get their negative bias calibrated on public text", "[training]") {
  World& w = TheWorld();
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  TokenCorpus pub_corpus = ValueOrDie(TokenCorpus::Build({w.pub}, ByteTokenizer(), {}, w.cache));
  at::manual_seed(21);
  const at::Tensor vectors = at::randn({2, 64}) * 0.3;
  REQUIRE(WriteSafetensors(w.dir / "vec_calibrated.safetensors", {{"vectors", vectors}}).ok());
  RouterInitOptions o;
  o.mode = "vectors";
  o.vectors = w.dir / "vec_calibrated.safetensors";
  o.samples = 20;
  o.public_corpus = &pub_corpus;
  o.public_share = 0.1;
  const RouterEmbedding e = ValueOrDie(InitRouterEmbedding(a.model, nullptr, o, nullptr, &a.router_pub));
  const std::vector<at::Tensor> inputs = RouterInputs(a.model, pub_corpus, 4096);
  for (int64_t l = 0; l < 2; ++l) {
    INFO("layer " << l);
    CHECK(at::equal(e.rows[l], vectors[l]));
    REQUIRE(e.biases.size() == 2);
    CHECK(e.biases[l].item<double>() <= 0);
    const double calibrated = std::stod(e.metadata.at(absl::StrCat("public_share_layer", l)));
    if (e.biases[l].item<double>() < 0) CHECK(std::abs(calibrated - 0.1) < 0.01);
    const at::Tensor gap = at::mv(inputs[l], e.rows[l] - a.router_pub.rows[l]) + e.biases[l];
    CHECK((gap > 0).to(at::kDouble).mean().item<double>() < 0.25);  // public text at large: few
  }
  // Without public text: the vectors alone, no bias (as before).
  o.public_corpus = nullptr;
  CHECK(ValueOrDie(InitRouterEmbedding(a.model, nullptr, o, nullptr)).biases.empty());
}

}  // namespace
}  // namespace flexfed

namespace flexfed {
namespace {

// Issue #14, D1: r_pub was the unit mean direction of the public router inputs, so every expert's
// logit carried the offset h·r_pub (≈ |c|) and the router z-loss (1e-3 · Σ lse²) was dominated by
// it. Now r_pub = 0: on public text the router's logsumexp stays small, and the routing — weights
// and choices for every k, with and without an expert opted out, with one or two owners — is the
// one a shared offset gives.
TEST_CASE("router rows carry no shared offset; routing is the same as with one", "[training]") {
  World& w = TheWorld();
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  const int64_t layers = a.model.config().num_hidden_layers, hidden = a.model.config().hidden_size;
  const RouterEmbedding pub = ValueOrDie(ReadRouterEmbedding(w.anchor + "/router_pub.safetensors", layers, hidden));
  const RouterEmbedding math = ValueOrDie(ReadRouterEmbedding(w.math_router, layers, hidden));
  const std::vector<at::Tensor> inputs =
      RouterInputs(a.model, ValueOrDie(TokenCorpus::Build({w.pub}, ByteTokenizer(), {}, w.cache)), 256);
  for (size_t l = 0; l < inputs.size(); ++l) {
    INFO("layer " << l);
    const at::Tensor& h = inputs[l];  // [N, H]
    // A second owner's row for the merges (near the first, so that they compete).
    const at::Tensor v1 = math.rows[l], v2 = math.rows[l] * 0.7;
    const at::Tensor bias = at::stack({at::zeros({1}), math.biases[l], math.biases[l] - 0.5}).view({3});
    const at::Tensor rows = at::stack({pub.rows[l], v1, v2});
    // The same rows with the earlier shared offset: every row plus the unit public direction.
    const at::Tensor u = pub.centers[l] / pub.centers[l].norm();
    const at::Tensor offset_rows = rows + u;
    // On public text: a small logsumexp now (the z-loss term), |c|-sized before.
    const at::Tensor lse = at::logsumexp(RouterLogits(h, rows.slice(0, 0, 2)) + bias.slice(0, 0, 2), -1);
    const at::Tensor lse_before = at::logsumexp(RouterLogits(h, offset_rows.slice(0, 0, 2)) + bias.slice(0, 0, 2), -1);
    CHECK(lse.mean().item<double>() < 1.0);
    CHECK(lse_before.mean().item<double>() > lse.mean().item<double>() + 0.5 * pub.centers[l].norm().item<double>());
    for (int64_t experts : {2, 3}) {  // one owner; two owners merged
      for (int64_t k = 1; k <= experts; ++k) {
        for (int64_t opted_out = 0; opted_out < experts; ++opted_out) {  // 0: none opted out
          INFO("experts " << experts << " k " << k << " opted out " << opted_out);
          at::Tensor mask = at::zeros({experts});
          if (opted_out > 0) mask[opted_out] = -std::numeric_limits<float>::infinity();
          const int64_t kk = std::min<int64_t>(k, experts - (opted_out > 0 ? 1 : 0));
          const RouterOutput now = Route(h, rows.slice(0, 0, experts), bias.slice(0, 0, experts), mask, kk, false);
          const RouterOutput before = Route(h, offset_rows.slice(0, 0, experts), bias.slice(0, 0, experts), mask, kk, false);
          CHECK(at::equal(now.indices, before.indices));
          CHECK((now.weights - before.weights).abs().max().item<double>() < 1e-5);
        }
      }
    }
  }
}

}  // namespace
}  // namespace flexfed

namespace flexfed {
namespace {

// Issue #14, D2: the negative bias calibrated on public text — at initialisation, the chosen share
// of public tokens (sampled like the owner's) routes to the owner's expert, in every layer, and
// the owner's own tokens mostly do.
TEST_CASE("router-init calibrates each layer's bias on public text to the share asked for", "[training]") {
  World& w = TheWorld();
  Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  TokenCorpus pub_corpus = ValueOrDie(TokenCorpus::Build({w.pub}, ByteTokenizer(), {}, w.cache));
  TokenCorpus math_corpus = ValueOrDie(TokenCorpus::Build({w.math}, ByteTokenizer(), {}, w.cache));
  RouterInitOptions ro;
  ro.samples = 20;
  ro.public_corpus = &pub_corpus;
  ro.public_share = 0.1;
  const RouterEmbedding row = ValueOrDie(InitRouterEmbedding(a.model, &math_corpus, ro, nullptr, &a.router_pub));
  const std::vector<at::Tensor> pub_inputs = RouterInputs(a.model, pub_corpus, 2048);
  const std::vector<at::Tensor> math_inputs = RouterInputs(a.model, math_corpus, 2048);
  auto share = [&](const std::vector<at::Tensor>& inputs, int64_t l) {  // of those tokens, routed to the owner
    const at::Tensor gap = at::mv(inputs[l], row.rows[l] - a.router_pub.rows[l]) + row.biases[l];
    return (gap > 0).to(at::kDouble).mean().item<double>();
  };
  for (int64_t l = 0; l < a.model.config().num_hidden_layers; ++l) {
    INFO("layer " << l);
    CHECK(row.biases[l].item<double>() <= 0);
    const double calibrated = std::stod(row.metadata.at(absl::StrCat("public_share_layer", l)));
    if (row.biases[l].item<double>() < 0) CHECK(std::abs(calibrated - 0.1) < 0.01);  // on the sample it was set on
    CHECK(share(pub_inputs, l) < 0.25);   // public text at large: few
    CHECK(share(math_inputs, l) > 0.5);   // the owner's own: most
  }
  // Bad use: outside (0, 1), or for r_pub itself.
  ro.public_share = 1.5;
  CHECK(absl::IsInvalidArgument(InitRouterEmbedding(a.model, &math_corpus, ro, nullptr, &a.router_pub).status()));
  ro.public_share = 0.1;
  CHECK(absl::IsInvalidArgument(InitRouterEmbedding(a.model, &math_corpus, ro, nullptr, nullptr).status()));
}

}  // namespace
}  // namespace flexfed

namespace flexfed {
namespace {

// Issue #14, D5: an anchor pretrained on BPE tokens (a tokenizer.json the tokenizers library
// trained), so that routing sees richer states than single bytes. The model takes the tokenizer's
// vocabulary (rows padded to 64) and ids, learns, and carries the files; experts and evaluation then
// find the tokenizer beside it.
TEST_CASE("pretraining with a tokenizer.json: the model takes its vocabulary and carries it", "[training]") {
  const std::string tokenizer_dir = (fs::path(testing::BinaryFromEnv("FLEXFED_TOKENIZER_ORACLE_DIR")) / "dolma2").string();
  World& w = TheWorld();
  const std::unique_ptr<Tokenizer> hf = ValueOrDie(TokenizerForModel(tokenizer_dir, 1 << 20));
  TrainConfig c = SmallRun({w.pub});
  c.mode = "pretrain";
  c.preset = "test";
  c.tokenizer = tokenizer_dir;
  c.max_steps = 30;
  auto trainer = ValueOrDie(Trainer::Create(c, {"", "", w.Run("bpe_anchor"), w.cache}, false));
  const TrainOutcome out = ValueOrDie(trainer->Run(nullptr, nullptr));
  const std::string model_dir = w.Run("bpe_anchor") + "/model";
  const ModelConfig mc = ValueOrDie(ReadModelConfig(model_dir + "/config.json"));
  CHECK(mc.vocab_size % 64 == 0);
  CHECK(mc.vocab_size >= hf->vocab_size());
  CHECK(mc.vocab_size < hf->vocab_size() + 64);
  CHECK(mc.eos_token_ids == std::vector<int64_t>{hf->eos_id()});
  CHECK(mc.pad_token_id == hf->pad_id());
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    CHECK(ValueOrDie(ReadFile(model_dir + "/" + name)) == ValueOrDie(ReadFile(tokenizer_dir + "/" + name)));
  }
  CHECK_FALSE(fs::exists(model_dir + "/flexfed_tokenizer.json"));
  const std::unique_ptr<Tokenizer> carried = ValueOrDie(TokenizerForModel(model_dir, mc.vocab_size));
  CHECK(carried->id() == hf->id());
  // It learned: the loss fell well below a uniform guess over the vocabulary (ln V).
  CHECK(out.last_loss < 0.8 * std::log(static_cast<double>(mc.vocab_size)));
  // The BPE sequences hold more text than byte ones: fewer tokens for the same documents.
  const TokenCorpus bpe = ValueOrDie(TokenCorpus::Build({w.pub}, *hf, {}, w.cache));
  const TokenCorpus bytes = ValueOrDie(TokenCorpus::Build({w.pub}, ByteTokenizer(), {}, w.cache));
  CHECK(bpe.num_tokens() < bytes.num_tokens());
  // Only pretraining takes a tokenizer; a missing folder is named.
  TrainConfig expert = SmallRun({w.math});
  expert.tokenizer = tokenizer_dir;
  CHECK_THAT(std::string(Trainer::Create(expert, w.Inputs("bpe_expert"), false).status().message()),
             Catch::Contains("--pretrain only"));
  c.tokenizer = (fs::path(tokenizer_dir) / "missing").string();
  CHECK_FALSE(Trainer::Create(c, {"", "", w.Run("bpe_missing"), w.cache}, false).ok());

  // Regression (found making issue #16's privacy table): an owner's model trained against a BPE
  // anchor carried a bytes marker instead of the anchor's tokenizer, so `eval RUN/model` and `audit
  // --run` read it as bytes (13.8 bits per byte) and nothing was ever extracted.
  const std::string anchor = w.Run("bpe_owner_anchor");
  fs::copy(model_dir, anchor);
  RouterEmbedding pub, mine;
  for (int64_t l = 0; l < mc.num_hidden_layers; ++l) {
    pub.rows.push_back(at::zeros({mc.hidden_size}));
    mine.rows.push_back(at::randn({mc.hidden_size}));
  }
  REQUIRE(WriteRouterEmbedding(anchor + "/router_pub.safetensors", pub).ok());
  REQUIRE(WriteRouterEmbedding(anchor + "/mine.safetensors", mine).ok());
  for (const std::string mode : {"expert", "dense"}) {
    TrainConfig owner = SmallRun({w.math});
    owner.mode = mode;
    owner.max_steps = 2;
    const std::string run = w.Run("bpe_owner_" + mode);
    auto t = ValueOrDie(Trainer::Create(owner, {anchor, mode == "expert" ? anchor + "/mine.safetensors" : "", run, w.cache}, false));
    ValueOrDie(t->Run(nullptr, nullptr));
    CHECK(ValueOrDie(ReadFile(run + "/model/tokenizer.json")) == ValueOrDie(ReadFile(tokenizer_dir + "/tokenizer.json")));
    CHECK_FALSE(fs::exists(run + "/model/flexfed_tokenizer.json"));
    CHECK(ValueOrDie(TokenizerForModel(run + "/model", mc.vocab_size))->id() == hf->id());
  }
}

// ------------------------------------------------------------------------ the memory plan

TEST_CASE("the memory plan: weights, gradients and moments exact; activations as measured", "[training]") {
  World& w = TheWorld();
  struct Variant {
    bool bf16, checkpointing, bf16_moments, dispatch;
  };
  // `dispatch`: the expert's MoE block through the dispatch ops, as on a GPU (here their CPU references).
  for (const Variant v : {Variant{false, false, false, false}, Variant{true, false, false, false},
                          Variant{false, true, false, false}, Variant{true, true, true, false},
                          Variant{true, false, false, true}, Variant{true, true, false, true}}) {
    for (const std::string mode : {"expert", "dense"}) {
      if (v.dispatch && mode != "expert") continue;
      INFO(mode << (v.bf16 ? ", bf16 autocast" : ", fp32") << (v.checkpointing ? ", checkpointing" : "")
                << (v.bf16_moments ? ", bf16 moments" : "") << (v.dispatch ? ", dispatch path" : ""));
      ScopedEnv moe("FLEXFED_MOE", v.dispatch ? "dispatch" : nullptr);
      TempDir run;
      TrainConfig c = SmallRun({w.math});
      c.mode = mode;
      c.batch_size = 8;
      c.seq_len = 128;
      c.precision = v.bf16 ? "bf16" : "fp32";
      c.activation_checkpointing = v.checkpointing;
      c.optimizer_moments = v.bf16_moments ? "bf16" : "fp32";
      c.threads = 1;  // every tensor from the main thread, where the meters listen
      const TrainInputs inputs{v.bf16 ? w.Bf16Anchor() : w.anchor, mode == "expert" ? w.math_router : "", run / "run", w.cache};
      const MemoryPlan plan = ValueOrDie(PlanRunMemory(c, inputs, 1));
      auto trainer = ValueOrDie(Trainer::Create(c, inputs, false));
      int64_t trained = 0, frozen = 0;
      for (const NamedTensor& nt : trainer->trainable()) trained += nt.tensor.numel() * 4;
      for (const NamedTensor& nt : trainer->FrozenTensors()) {
        frozen += static_cast<int64_t>(nt.tensor.nbytes());
        // Under bf16 autocast a bf16 anchor's frozen matrices and embeddings are bf16; vectors fp32.
        const bool matrix = nt.tensor.dim() == 2 && nt.tensor.size(0) > 1;
        INFO(nt.name);
        CHECK(nt.tensor.scalar_type() == (v.bf16 && matrix ? at::kBFloat16 : at::kFloat));
      }
      CHECK(PlanPartBytes(plan, "trained weights") == trained);
      CHECK(PlanPartBytes(plan, "gradients") == trained);
      CHECK(PlanPartBytes(plan, "optimizer state") == 2 * trained / (v.bf16_moments ? 2 : 1));
      CHECK(PlanPartBytes(plan, "frozen weights") == frozen);
      // What the forward leaves alive for the backward: the plan's activations (with checkpointing,
      // their kept part) and the loss's saved part.
      std::vector<int64_t> sequences(8);
      std::iota(sequences.begin(), sequences.end(), 0);
      c10::AutoGradMode grad_on(true);
      // Tensors only: the libraries' own heap is not the plan's (on a CPU with native bf16, oneDNN
      // keeps a primitive for each new product shape, and the expert path's shapes change each step).
      std::optional<TensorMemoryMeter> forward(std::in_place);
      ForwardTrace trace;
      at::Tensor losses = trainer->SequenceLosses(sequences, trace);
      const int64_t kept = forward->net_bytes();
      const ModelConfig& mc = trainer->model().config();
      MemoryPlanSettings s;
      s.mode = mode;
      s.bf16_autocast = v.bf16;
      s.activation_checkpointing = v.checkpointing;
      s.fused_silu = !v.bf16;  // the CPU's fp32 training keeps no silu(gate)
      s.dispatch_moe = v.dispatch;
      const int64_t loss_saved = 8 * 128 * (mc.hidden_size * ((v.bf16 ? 2 : 4) + 4) + 12);  // the loss part's kept share
      CHECK(PlanPartBytes(plan, "activations") == 8 * 128 * ActivationBytesPerToken(mc, s));
      const double planned = static_cast<double>(8 * 128 * KeptActivationBytesPerToken(mc, s) + loss_saved);
      // Within a few percent, which also tells the two MoE paths apart: the LibTorch path's plan is 18% above what the dispatch path keeps.
      CHECK(kept > 0.97 * planned);
      CHECK(kept < 1.08 * planned);
      // A whole step at the tensors' level (after a first step has made the optimizer's moments):
      // its peak stays within the plan's per-step parts — gradients, activations, the loss's and
      // autocast's — and is most of them: the plan adds the whole gradient to the activations, while
      // the backward frees each layer's activations as its gradients appear (with checkpointing, the
      // recomputed layer's too; here 2 layers, so a layer's gradients are half of them).
      losses = at::Tensor();
      trace = ForwardTrace();
      REQUIRE(forward->net_bytes() < 4096);  // the forward's graph is gone
      forward.reset();
      trainer->StepOn(sequences);
      int64_t peak = 0;
      {
        const TensorMemoryMeter meter;
        trainer->StepOn(sequences);
        peak = meter.peak_bytes();
        CHECK(meter.net_bytes() < 4096);  // nothing of the step outlives it
      }
      int64_t step_planned = PlanPartBytes(plan, "gradients") + PlanPartBytes(plan, "activations") + PlanPartBytes(plan, "loss");
      if (v.bf16) step_planned += PlanPartBytes(plan, "autocast copies");
      INFO("step peak " << peak << " of " << step_planned << " planned");
      CHECK(peak <= step_planned);
      CHECK(peak > (v.checkpointing ? 0.7 : 0.9) * step_planned);
    }
  }
  // ZeRO-1: each of two ranks keeps about half of the moments.
  const ModelConfig small = ValueOrDie(ModelConfig::Preset("small"));
  MemoryPlanSettings s;
  const MemoryPlan one = PlanTrainingMemory(small, s);
  s.world_size = 2;
  const MemoryPlan two = PlanTrainingMemory(small, s);
  CHECK(two.parts[3].name == "optimizer state");
  CHECK(two.parts[3].bytes == one.parts[3].bytes / 2);  // 8 layers × 3 equal matrices split evenly; rows and biases balance
}

TEST_CASE("the memory plan at the 7B shape: fp32 state does not fit 80 GB; the compact plan fits 75 GB", "[training]") {
  const ModelConfig seven = ValueOrDie(ModelConfig::Preset("7b"));
  MemoryPlanSettings s;
  s.micro_batch = 4;
  s.seq_len = 4096;
  s.bf16_autocast = true;
  const MemoryPlan plan = PlanTrainingMemory(seven, s);
  // fp32 frozen anchor (7.3 B), trained FFN 4.3 B: masters, gradients, two moments.
  CHECK(plan.parts[0].bytes == Approx(7.3e9 * 4).epsilon(0.02));
  CHECK(plan.parts[1].bytes == Approx(4.33e9 * 4).epsilon(0.01));
  CHECK(plan.total() > int64_t{80} << 30);
  CHECK_THAT(plan.Table(), Catch::Contains("total"));
  // The 7B recipe (docs/OWNER_GUIDE.md "Memory"): bf16 frozen matrices and embeddings (an OLMo-2
  // checkpoint is bf16), bf16 moments, activation checkpointing; fp32 masters and gradients.
  s.bf16_frozen = s.bf16_embeddings = s.bf16_moments = s.activation_checkpointing = true;
  s.micro_batch = 1;
  const MemoryPlan compact = PlanTrainingMemory(seven, s);
  INFO(compact.Table());
  CHECK(compact.parts[0].bytes == Approx(7.3e9 * 2).epsilon(0.02));
  CHECK(compact.parts[3].bytes == Approx(4.33e9 * 4).epsilon(0.01));  // two bf16 moments
  CHECK(compact.total() < int64_t{75} * 1000 * 1000 * 1000);
  // Checkpointing keeps a tenth of the activations or less: 2 × 4096 tokens per micro-batch fit 80 GB.
  MemoryPlanSettings all = s;
  all.activation_checkpointing = false;
  CHECK(ActivationBytesPerToken(seven, s) * 10 < ActivationBytesPerToken(seven, all));
  s.micro_batch = 2;
  CHECK(PlanTrainingMemory(seven, s).total() < int64_t{80} * 1000 * 1000 * 1000);
}

TEST_CASE("a run that does not fit: the settings that would, on the same sequences per step", "[training]") {
  World& w = TheWorld();
  TempDir run;
  TrainConfig c = SmallRun({w.math});
  c.batch_size = 12;
  c.grad_accum = 2;
  c.seq_len = 128;
  c.precision = "fp32";
  c.device = "cpu";
  const TrainInputs inputs{w.anchor, w.math_router, run / "run", w.cache};
  const int64_t full = ValueOrDie(PlanRunMemory(c, inputs, 1)).total();
  CHECK(ValueOrDie(FittingSettings(c, inputs, 1, full)).fits.empty());  // it fits as it is

  // Every suggestion fits, trains on the same sequences per step and validates on the same ones, and
  // is the largest micro-batch (a divisor of 12) its other changes allow.
  auto check_fits = [&](const TrainConfig& base, int64_t capacity) {
    const MemoryFits fits = ValueOrDie(FittingSettings(base, inputs, 1, capacity));
    for (const MemoryFit& f : fits.fits) {
      INFO(f.args);
      CHECK(ValueOrDie(PlanRunMemory(f.config, inputs, 1)).total() == f.total_bytes);
      CHECK(f.total_bytes <= capacity);
      CHECK(f.config.batch_size * f.config.grad_accum == base.batch_size * base.grad_accum);
      CHECK(f.config.batch_size * f.config.val_batches == base.batch_size * base.val_batches);
      CHECK(f.config.Validate().ok());
      for (int64_t larger = f.config.batch_size + 1; larger <= base.batch_size; ++larger) {
        if (base.batch_size % larger != 0) continue;
        TrainConfig bigger = f.config;
        bigger.batch_size = larger;
        CHECK(ValueOrDie(PlanRunMemory(bigger, inputs, 1)).total() > capacity);
        break;
      }
    }
    return fits;
  };
  const MemoryPlan plan = ValueOrDie(PlanRunMemory(c, inputs, 1));
  const int64_t activations = PlanPartBytes(plan, "activations") + PlanPartBytes(plan, "loss");
  const int64_t fixed = full - activations;
  {  // room for a third of the activations: a smaller micro-batch alone does it, and first
    const MemoryFits fits = check_fits(c, fixed + activations / 3 + 4096);
    REQUIRE_FALSE(fits.fits.empty());
    CHECK(fits.fits[0].args == "--batch-size 4 --grad-accum 6 --val-batches 12");
    CHECK(fits.fits[0].config.batch_size == 4);
    for (const MemoryFit& f : fits.fits) {
      // Each later one adds a change and gets a larger micro-batch for it.
      if (&f != &fits.fits[0]) CHECK(f.config.batch_size > 4);
    }
  }
  {  // less than a micro-batch of one needs without checkpointing, even with bf16 moments
    TrainConfig one = c;
    one.batch_size = 1;
    one.optimizer_moments = "bf16";
    const MemoryFits fits = check_fits(c, ValueOrDie(PlanRunMemory(one, inputs, 1)).total() - 1);
    REQUIRE_FALSE(fits.fits.empty());
    for (const MemoryFit& f : fits.fits) CHECK_THAT(f.args, Catch::Contains("--activation-checkpointing"));
  }
  {  // DP-SGD: never checkpointing; beta2 above 0.99: never bf16 moments
    TrainConfig dp = c;
    dp.dp_max_grad_norm = 1.0;
    dp.dp_noise_multiplier = 1.0;
    dp.beta2 = 0.999;
    const MemoryPlan dp_plan = ValueOrDie(PlanRunMemory(dp, inputs, 1));
    const int64_t dp_activations = PlanPartBytes(dp_plan, "activations") + PlanPartBytes(dp_plan, "loss");
    const MemoryFits fits = check_fits(dp, dp_plan.total() - dp_activations / 3);
    REQUIRE_FALSE(fits.fits.empty());
    for (const MemoryFit& f : fits.fits) {
      CHECK_THAT(f.args, !Catch::Contains("--activation-checkpointing"));
      CHECK_THAT(f.args, !Catch::Contains("bf16"));
    }
  }
  {  // nothing fits: the least any combination needs — every change at once
    const MemoryFits none = ValueOrDie(FittingSettings(c, inputs, 1, 1024));
    CHECK(none.fits.empty());
    CHECK(none.smallest.args == "--batch-size 1 --grad-accum 24 --val-batches 48 --activation-checkpointing --optimizer-moments bf16");
    CHECK(none.smallest.total_bytes == ValueOrDie(PlanRunMemory(none.smallest.config, inputs, 1)).total());
  }
}

TEST_CASE("train --memory-limit holds PyTorch's allocator on a GPU to the limit", "[gpu]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: this [gpu] test is skipped (docs/GPU.md)");
    return;
  }
#if FLEXFED_WITH_CUDA
  TrainConfig c;
  c.device = "cuda";
  c10::cuda::CUDACachingAllocator::emptyCache();  // no cached block may serve the allocation below
  REQUIRE(LimitDeviceMemory(c, 0, int64_t{512} << 20).ok());
  CHECK_THROWS(at::empty({int64_t{1} << 30}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, 0)));
  CHECK_NOTHROW(at::empty({int64_t{256} << 20}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, 0)));
  c10::cuda::CUDACachingAllocator::setMemoryFraction(1.0, 0);  // the other tests' whole device back
#else
  WARN("a build without CUDA: this [gpu] test is skipped (docs/GPU.md)");
#endif
}

TEST_CASE("activation checkpointing: the plain step's loss and gradients, one layer's activations", "[training]") {
  World& w = TheWorld();
  for (const std::string mode : {"expert", "dense", "pretrain"}) {
    for (const bool bf16 : {false, true}) {
      INFO(mode << (bf16 ? ", bf16 autocast" : ", fp32"));
      TrainConfig c = SmallRun({mode == "pretrain" ? w.pub : w.math});
      c.mode = mode;
      c.preset = "test";
      c.precision = bf16 ? "bf16" : "fp32";
      c.z_loss = 1e-2;  // the router logits' gradient flows through the checkpointed layers too
      TrainInputs in = w.Inputs("");
      if (mode != "expert") in.router_init = "";
      if (mode == "pretrain") in.anchor_dir = "";
      std::unique_ptr<Trainer> t[2];
      for (int on = 0; on < 2; ++on) {
        c.activation_checkpointing = on == 1;
        in.run_dir = w.Run(absl::StrCat("ckpt-", mode, bf16, on));
        t[on] = ValueOrDie(Trainer::Create(c, in, false));
        CHECK(t[on]->model().activation_checkpointing() == (on == 1));
      }
      c10::AutoGradMode grad_on(true);
      const std::vector<int64_t> batch = {4, 1, 9, 2};
      at::Tensor loss[2];
      for (int on = 0; on < 2; ++on) {
        ForwardTrace trace;
        loss[on] = t[on]->SequenceLosses(batch, trace);
        if (mode == "expert") CHECK(trace.router_logits.size() == 2);
        loss[on].sum().backward();
      }
      CHECK(at::equal(loss[0], loss[1]));
      for (size_t i = 0; i < t[0]->trainable().size(); ++i) {
        const at::Tensor& g0 = t[0]->trainable()[i].tensor.grad();
        const at::Tensor& g1 = t[1]->trainable()[i].tensor.grad();
        INFO(t[0]->trainable()[i].name);
        REQUIRE(g0.defined());
        REQUIRE(g1.defined());
        CHECK(testing::RelativeError(g1, g0) <= 1e-6);
      }
      // Steps: the same weights (the gradients above are left in place; each step starts afresh).
      for (int on = 0; on < 2; ++on) {
        for (const NamedTensor& nt : t[on]->trainable()) nt.tensor.mutable_grad() = at::Tensor();
        for (int i = 0; i < 3; ++i) t[on]->Step();
      }
      for (size_t i = 0; i < t[0]->trainable().size(); ++i) {
        INFO(t[0]->trainable()[i].name);
        CHECK(testing::RelativeError(t[1]->trainable()[i].tensor, t[0]->trainable()[i].tensor) <= 1e-6);
      }
    }
  }
}

// What a GPU trains with: the expert's MoE block through the dispatch ops (router, align, gather,
// the experts' products, combine), run here through the ops' CPU references (FLEXFED_MOE=dispatch).
TEST_CASE("the GPU's MoE path trains the expert as the LibTorch path does", "[training]") {
  World& w = TheWorld();
  struct Variant {
    int64_t top_k;        // 2 of 2: the slices known on the host; 1: read back from the counts
    bool checkpointing;   // the dispatch run recomputes its layers in the backward
    bool bf16;
  };
  for (const Variant v : {Variant{2, false, false}, Variant{1, false, false}, Variant{2, true, false}, Variant{2, false, true}}) {
    INFO("top-" << v.top_k << (v.checkpointing ? ", checkpointing" : "") << (v.bf16 ? ", bf16 autocast" : ", fp32"));
    TrainConfig c = SmallRun({w.math});
    c.top_k = v.top_k;
    c.z_loss = 1e-2;  // the router logits' gradient too
    c.precision = v.bf16 ? "bf16" : "fp32";
    c.log_every = 1;
    const std::string tag = absl::StrCat("dispatch-", v.top_k, v.checkpointing, v.bf16);
    auto libtorch = ValueOrDie(Trainer::Create(c, w.Inputs(tag + "-libtorch"), false));
    c.activation_checkpointing = v.checkpointing;
    auto dispatch = ValueOrDie(Trainer::Create(c, w.Inputs(tag + "-dispatch"), false));
    // One forward and backward: per-sequence losses and every trained tensor's gradient.
    const std::vector<int64_t> batch = {4, 1, 9, 2};
    std::vector<at::Tensor> losses, grads[2];
    ForwardTrace traces[2];
    for (int i = 0; i < 2; ++i) {
      ScopedEnv moe("FLEXFED_MOE", i == 1 ? "dispatch" : nullptr);
      Trainer& t = i == 0 ? *libtorch : *dispatch;
      c10::AutoGradMode grad_on(true);
      losses.push_back(t.SequenceLosses(batch, traces[i]));
      losses.back().sum().backward();
      for (const NamedTensor& nt : t.trainable()) {
        REQUIRE(nt.tensor.grad().defined());
        grads[i].push_back(nt.tensor.grad().clone());
        nt.tensor.mutable_grad() = at::Tensor();
      }
    }
    // The same experts chosen, in the same order (under bf16 the residual streams differ a little).
    REQUIRE(traces[0].expert_indices.size() == traces[1].expert_indices.size());
    for (size_t l = 0; l < traces[0].expert_indices.size(); ++l) {
      const at::Tensor& a = traces[0].expert_indices[l];
      const at::Tensor& b = traces[1].expert_indices[l];
      REQUIRE(a.sizes() == b.sizes());
      CHECK(a.ne(b).sum().item<int64_t>() <= (v.bf16 ? a.numel() / 50 : 0));
    }
    const double tolerance = v.bf16 ? 2e-2 : 1e-5;
    CHECK(testing::RelativeError(losses[1], losses[0]) <= (v.bf16 ? 2e-3 : 1e-6));
    for (size_t i = 0; i < grads[0].size(); ++i) {
      INFO(libtorch->trainable()[i].name);
      CHECK(testing::RelativeError(grads[1][i], grads[0][i]) <= tolerance);
    }
    // Four steps: the same losses and updates.
    std::vector<at::Tensor> initial;
    for (const NamedTensor& nt : libtorch->trainable()) initial.push_back(nt.tensor.clone());
    std::vector<double> step_losses[2];
    for (int i = 0; i < 2; ++i) {
      ScopedEnv moe("FLEXFED_MOE", i == 1 ? "dispatch" : nullptr);
      Trainer& t = i == 0 ? *libtorch : *dispatch;
      for (int s = 0; s < 4; ++s) step_losses[i].push_back(t.Step());
    }
    for (int s = 0; s < 4; ++s) CHECK(step_losses[1][s] == Approx(step_losses[0][s]).epsilon(v.bf16 ? 2e-3 : 1e-6));
    for (size_t i = 0; i < libtorch->trainable().size(); ++i) {
      INFO(libtorch->trainable()[i].name);
      // AdamW's first steps move each weight by about ±lr whatever its gradient's size, so where a
      // gradient is near 0 its rounding decides the sign: fp32, element by element; bf16 autocast
      // (whose paths round at different points), over the whole tensor.
      const at::Tensor update = libtorch->trainable()[i].tensor - initial[i];
      const at::Tensor other = dispatch->trainable()[i].tensor - initial[i];
      if (v.bf16) {
        CHECK((other - update).norm().item<double>() <= 0.03 * update.norm().item<double>());  // measured 0.6–0.8%
      } else {
        CHECK(testing::RelativeError(other, update) <= 1e-3);
      }
    }
  }
}

TEST_CASE("under bf16 autocast, bf16 frozen matrices give the fp32 ones' numbers", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.precision = "bf16";
  // An fp32 anchor's values are not bf16: its frozen weights stay fp32, the anchor's to the bit.
  {
    auto fp32_anchor = ValueOrDie(Trainer::Create(c, w.Inputs("frozen-fp32"), false));
    CHECK(fp32_anchor->model().layers()[0].q_proj.scalar_type() == at::kFloat);
    CHECK(fp32_anchor->model().embed_tokens().scalar_type() == at::kFloat);
  }
  TrainInputs in = w.Inputs("frozen-bf16");
  in.anchor_dir = w.Bf16Anchor();
  auto t = ValueOrDie(Trainer::Create(c, in, false));
  const FlexOlmoModel& compact = t->model();
  CHECK(compact.embed_tokens().scalar_type() == at::kBFloat16);
  // The same model with every frozen matrix widened back to fp32 (exact).
  std::vector<LayerWeights> layers = compact.layers();
  int widened = 0;
  for (LayerWeights& lw : layers) {
    for (at::Tensor* m : {&lw.q_proj, &lw.k_proj, &lw.v_proj, &lw.o_proj, &lw.experts[0].gate_proj, &lw.experts[0].up_proj,
                          &lw.experts[0].down_proj}) {
      CHECK(m->scalar_type() == at::kBFloat16);
      *m = m->to(at::kFloat);
      ++widened;
    }
    CHECK(lw.post_attention_layernorm.scalar_type() == at::kFloat);
    CHECK(lw.experts[1].gate_proj.scalar_type() == at::kFloat);
  }
  CHECK(widened == 14);
  const FlexOlmoModel wide = ValueOrDie(FlexOlmoModel::Assemble(compact.config(), compact.embed_tokens(), layers,
                                                                compact.norm(), compact.lm_head()));
  at::manual_seed(3);
  const at::Tensor ids = at::randint(0, 256, {2, 32}, at::kLong);
  at::Tensor a, b;
  {
    AutocastScope autocast(at::kCPU, at::kBFloat16);
    a = compact.ForwardHidden(ids);
    b = wide.ForwardHidden(ids);
  }
  CHECK(a.scalar_type() == at::kFloat);  // the residual stream stays fp32
  CHECK(at::equal(a, b));
  // The owner's model is written in fp32: the frozen matrices widened, exactly.
  REQUIRE(t->WriteModel().ok());
  const FlexOlmoModel written = ValueOrDie(FlexOlmoModel::Load(w.Run("frozen-bf16") + "/model"));
  CHECK(written.dtype() == at::kFloat);
  CHECK(at::equal(written.layers()[1].q_proj, compact.layers()[1].q_proj.to(at::kFloat)));
  CHECK(at::equal(written.layers()[1].experts[1].up_proj, compact.layers()[1].experts[1].up_proj));
}

TEST_CASE("the 7B recipe on CPU: bf16 frozen matrices and moments, checkpointing, against the fp32 run", "[training]") {
  // The accuracy check of the compact memory plan over a short run: the recipe's loss curve and
  // weights against full fp32 (fp32 frozen weights, fp32 moments, every activation kept).
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 30;
  c.val_batches = 4;
  std::vector<double> losses[3];
  double val[3];
  std::vector<std::unique_ptr<Trainer>> t;
  for (int run = 0; run < 3; ++run) {
    // 0: fp32; 1: fp32 with bf16 moments (the moments' own effect); 2: the whole recipe.
    c.precision = run == 2 ? "bf16" : "fp32";
    c.optimizer_moments = run >= 1 ? "bf16" : "fp32";
    c.activation_checkpointing = run == 2;
    TrainInputs in = w.Inputs(absl::StrCat("recipe-", run));
    in.anchor_dir = w.Bf16Anchor();
    t.push_back(ValueOrDie(Trainer::Create(c, in, false)));
    for (int i = 0; i < 30; ++i) losses[run].push_back(t.back()->Step());
    val[run] = t.back()->Validate().loss;
  }
  double moments_gap = 0, recipe_gap = 0;
  for (int i = 0; i < 30; ++i) {
    moments_gap = std::max(moments_gap, std::abs(losses[1][i] - losses[0][i]) / losses[0][i]);
    recipe_gap = std::max(recipe_gap, std::abs(losses[2][i] - losses[0][i]) / losses[0][i]);
  }
  double weight_gap = 0;
  for (size_t i = 0; i < t[0]->trainable().size(); ++i) {
    const at::Tensor start = t[0]->trainable()[i].tensor;
    weight_gap = std::max(weight_gap, testing::RelativeError(t[1]->trainable()[i].tensor, start));
  }
  INFO("loss " << losses[0].front() << " → " << losses[0].back() << " (fp32), " << losses[1].back() << " (bf16 moments), "
               << losses[2].back() << " (recipe); largest gap " << moments_gap << " / " << recipe_gap
               << "; validation " << val[0] << " / " << val[1] << " / " << val[2] << "; weights " << weight_gap);
  CHECK(losses[0].back() < losses[0].front() - 0.3);  // it learns
  CHECK(moments_gap < 0.01);
  CHECK(recipe_gap < 0.05);
  CHECK(std::abs(val[1] - val[0]) < 0.01 * val[0]);
  CHECK(std::abs(val[2] - val[0]) < 0.03 * val[0]);
  CHECK(weight_gap < 1e-2);
  CHECK(weight_gap > 0);  // the moments really are bf16
}

// ------------------------------------------------------------------------ the chunked loss

TEST_CASE("the chunked cross-entropy equals the whole-logits one, values and gradients", "[training]") {
  c10::AutoGradMode grad_on(true);
  at::manual_seed(5);
  const int64_t n = 37, h = 16, v = 50;
  at::Tensor targets = at::randint(0, v, {n}, at::kLong);
  for (int64_t chunk : {1, 8, 36, 37, 100}) {
    INFO("chunk " << chunk);
    at::Tensor hidden = at::randn({n, h}).requires_grad_(), weight = at::randn({v, h}).mul_(0.3).requires_grad_();
    at::Tensor want = at::cross_entropy_loss(at::linear(hidden, weight), targets, {}, at::Reduction::None);
    at::Tensor got = ChunkedCrossEntropy(hidden, weight, targets, chunk);
    CHECK(got.scalar_type() == at::kFloat);
    CHECK(testing::RelativeError(got, want) < 1e-6);
    at::Tensor g = at::rand({n});  // a weighted sum: each token's gradient scales on its own
    std::vector<at::Tensor> gw = torch::autograd::grad({want}, {hidden, weight}, {g});
    std::vector<at::Tensor> gg = torch::autograd::grad({got}, {hidden, weight}, {g});
    CHECK(testing::RelativeError(gg[0], gw[0]) < 1e-5);
    CHECK(testing::RelativeError(gg[1], gw[1]) < 1e-5);
    // A frozen head (the owner's): the hidden state's gradient is formed in the forward.
    const at::Tensor head = weight.detach();
    at::Tensor frozen_got = ChunkedCrossEntropy(hidden, head, targets, chunk);
    CHECK(testing::RelativeError(frozen_got, want) < 1e-6);
    const at::Tensor frozen_grad = torch::autograd::grad({frozen_got}, {hidden}, {g})[0];
    CHECK(testing::RelativeError(frozen_grad, gw[0]) < 1e-5);
  }
  // Without gradients (validation) the frozen head's forward alone runs: the same values.
  {
    const at::Tensor hidden = at::randn({n, h}), head = at::randn({v, h});
    c10::AutoGradMode no_grad(false);
    const at::Tensor want = at::cross_entropy_loss(at::linear(hidden, head), targets, {}, at::Reduction::None);
    CHECK(testing::RelativeError(ChunkedCrossEntropy(hidden, head, targets, 8), want) < 1e-6);
  }
  // A frozen output head gets no gradient; bf16 operands compute in bf16 and reduce in fp32.
  at::Tensor hidden = at::randn({n, h}).requires_grad_(), frozen = at::randn({v, h});
  at::Tensor loss = ChunkedCrossEntropy(hidden.to(at::kBFloat16), frozen.to(at::kBFloat16), targets, 8);
  CHECK(loss.scalar_type() == at::kFloat);
  at::Tensor reference = at::cross_entropy_loss(at::linear(hidden.to(at::kBFloat16), frozen.to(at::kBFloat16)).to(at::kFloat),
                                                targets, {}, at::Reduction::None);
  CHECK(testing::RelativeError(loss, reference) < 1e-5);
  loss.sum().backward();
  REQUIRE(hidden.grad().defined());
  CHECK_FALSE(frozen.grad().defined());
  {
    at::Tensor x = hidden.detach().to(at::kBFloat16).to(at::kFloat).requires_grad_();
    at::cross_entropy_loss(at::linear(x, frozen.to(at::kBFloat16).to(at::kFloat)), targets, {}, at::Reduction::Sum).backward();
    CHECK(testing::RelativeError(hidden.grad(), x.grad()) < 2e-2);  // bf16 products and gradients
  }
  // A trained output head under bf16 autocast (pretraining on a GPU): its gradient is summed in
  // fp32 over the chunks. Regression: the fp32 sum was fed bf16 operands and the backward threw.
  {
    at::Tensor head = (at::randn({v, h}) * 0.3).requires_grad_(), x = at::randn({n, h}).requires_grad_();
    at::Tensor chunked;
    {
      AutocastScope autocast(at::kCPU, at::kBFloat16);
      chunked = ChunkedCrossEntropy(x, head, targets, 8);
    }
    chunked.sum().backward();
    REQUIRE(head.grad().defined());
    CHECK(head.grad().scalar_type() == at::kFloat);
    at::Tensor x32 = x.detach().requires_grad_(), head32 = head.detach().requires_grad_();
    at::cross_entropy_loss(at::linear(x32, head32), targets, {}, at::Reduction::Sum).backward();
    CHECK(testing::RelativeError(head.grad(), head32.grad()) < 2e-2);
    CHECK(testing::RelativeError(x.grad(), x32.grad()) < 2e-2);
  }
  CHECK(DefaultLossChunk(100352) == 334);  // a [334, 100352] fp32 block: 128 MiB
  CHECK(DefaultLossChunk(259) == (int64_t{128} << 20) / 4 / 259);
}

// ---------------------------------------------------------------------- differential privacy

TEST_CASE("per-sequence gradient norms equal the norms of each sequence's own gradient", "[privacy]") {
  World& w = TheWorld();
  for (const bool dense : {false, true}) {
    CAPTURE(dense);
    TrainConfig c = SmallRun({w.math});
    c.mode = dense ? "dense" : "expert";
    c.max_steps = 3;
    TrainInputs in = w.Inputs(dense ? "norms_dense" : "norms_expert");
    if (dense) in.router_init = "";
    auto trainer = ValueOrDie(Trainer::Create(c, in, false));
    for (int i = 0; i < 2; ++i) trainer->Step();  // away from the init, where the bias sits at its start
    const std::vector<int64_t> batch = {3, 0, 7, 12, 5};
    const at::Tensor norms = trainer->SequenceGradientNormsSq(batch).sqrt();
    for (size_t i = 0; i < batch.size(); ++i) {
      ForwardTrace trace;
      const at::Tensor loss = trainer->SequenceLosses({batch[i]}, trace).sum();
      std::vector<at::Tensor> leaves;
      for (const NamedTensor& nt : trainer->trainable()) leaves.push_back(nt.tensor);
      double sq = 0;
      for (const at::Tensor& g : torch::autograd::grad({loss}, leaves, {}, false, false, /*allow_unused=*/true)) {
        if (g.defined()) sq += g.to(at::kDouble).pow(2).sum().item<double>();
      }
      INFO("sequence " << batch[i]);
      CHECK(norms[i].item<double>() == Approx(std::sqrt(sq)).epsilon(1e-4));
    }
  }
}

TEST_CASE("with no noise and no sequence clipped, the DP step is the plain step bit for bit", "[privacy]") {
  World& w = TheWorld();
  TrainConfig plain = SmallRun({w.math});
  plain.grad_clip = 0;  // DP-SGD replaces the global clip by the per-sequence one
  TrainConfig dp = plain;
  dp.dp_max_grad_norm = 1e30;
  dp.dp_noise_multiplier = 0;
  auto a = ValueOrDie(Trainer::Create(plain, w.Inputs("bitwise_plain"), false));
  auto b = ValueOrDie(Trainer::Create(dp, w.Inputs("bitwise_dp"), false));
  for (const std::vector<int64_t>& batch : {std::vector<int64_t>{1, 4, 9, 16, 25, 30, 2, 8}, std::vector<int64_t>{0, 3, 6, 11, 14, 19, 22, 27}}) {
    CHECK(a->StepOn(batch) == b->StepOn(batch));
  }
  for (size_t i = 0; i < a->trainable().size(); ++i) {
    INFO(a->trainable()[i].name);
    CHECK(at::equal(a->trainable()[i].tensor, b->trainable()[i].tensor));
  }
}

TEST_CASE("DP-SGD clips: with a small norm bound the step differs from the plain one; ε follows the accountant", "[privacy]") {
  World& w = TheWorld();
  TrainConfig dp = SmallRun({w.math});
  dp.dp_max_grad_norm = 1e-3;
  dp.dp_noise_multiplier = 0;
  dp.max_steps = 4;
  auto clipped = ValueOrDie(Trainer::Create(dp, w.Inputs("clipped"), false));
  TrainConfig plain = SmallRun({w.math});
  plain.grad_clip = 0;
  auto free = ValueOrDie(Trainer::Create(plain, w.Inputs("unclipped"), false));
  const std::vector<int64_t> batch = {1, 4, 9, 16, 25, 30, 2, 8};
  clipped->StepOn(batch);
  free->StepOn(batch);
  bool differs = false;
  for (size_t i = 0; i < free->trainable().size(); ++i) differs |= !at::equal(free->trainable()[i].tensor, clipped->trainable()[i].tensor);
  CHECK(differs);

  dp.dp_noise_multiplier = 1.1;
  auto noisy = ValueOrDie(Trainer::Create(dp, w.Inputs("noisy"), false));
  ValueOrDie(noisy->Run(nullptr, nullptr));
  const DpAccount spent = *noisy->Privacy();
  RdpAccountant reference;
  reference.Compose(spent.sampling_rate, 1.1, 4);
  CHECK(spent.steps == 4);
  CHECK(spent.epsilon == reference.Epsilon(dp.dp_delta).epsilon);
  CHECK(spent.expected_batch == 8);
  CHECK(spent.sampling_rate > 0);
  CHECK(spent.sampling_rate < 1);
  // The checkpoint records it for export.
  const nlohmann::json state = nlohmann::json::parse(ValueOrDie(ReadFile(ValueOrDie(LatestCheckpoint(w.Run("noisy"))) + "/state.json")));
  CHECK(state["dp"]["epsilon"].get<double>() == spent.epsilon);
  CHECK(state["dp"]["noise_multiplier"].get<double>() == 1.1);
}

TEST_CASE("a target ε is met: the solved noise keeps the whole run within it", "[privacy]") {
  World& w = TheWorld();
  TrainConfig dp = SmallRun({w.math});
  dp.dp_max_grad_norm = 1.0;
  dp.dp_epsilon = 3.0;
  dp.dp_delta = 1e-4;
  dp.max_steps = 6;
  auto trainer = ValueOrDie(Trainer::Create(dp, w.Inputs("target_eps"), false));
  ValueOrDie(trainer->Run(nullptr, nullptr));
  const DpAccount spent = *trainer->Privacy();
  CHECK(spent.epsilon <= 3.0);
  CHECK(spent.epsilon > 2.9);  // σ is the smallest that meets it (to 0.1%)
}

TEST_CASE("huge noise: the expert learns nothing from the data; no noise: it learns", "[privacy]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.max_steps = 30;
  c.dp_max_grad_norm = 1.0;
  c.dp_noise_multiplier = 0;
  auto learned = ValueOrDie(Trainer::Create(c, w.Inputs("dp_sigma0"), false));
  ValueOrDie(learned->Run(nullptr, nullptr));
  c.dp_noise_multiplier = 1e4;
  auto noised = ValueOrDie(Trainer::Create(c, w.Inputs("dp_sigma_huge"), false));
  ValueOrDie(noised->Run(nullptr, nullptr));
  const Anchor a = ValueOrDie(LoadAnchor(w.anchor));
  const TokenCorpus math = ValueOrDie(TokenCorpus::Build({w.math}, ByteTokenizer(), {}, w.cache));
  PackedSequences packed(math, [&] { std::vector<int64_t> d(math.num_documents()); std::iota(d.begin(), d.end(), 0); return d; }(), 64, ByteTokenizer().eos_id());
  std::vector<int64_t> ids(16);
  std::iota(ids.begin(), ids.end(), 0);
  auto loss_of = [&](const FlexOlmoModel& m) { return Evaluate(m, packed, ids, 8, ByteTokenizer(), {}).loss; };
  const double anchor = loss_of(a.model), plain = loss_of(ValueOrDie(FlexOlmoModel::Load(w.Run("dp_sigma0") + "/model")));
  const double noisy = loss_of(ValueOrDie(FlexOlmoModel::Load(w.Run("dp_sigma_huge") + "/model")));
  INFO("anchor " << anchor << ", σ = 0 " << plain << ", σ = 1e4 " << noisy);
  CHECK(plain < anchor - 0.1);
  CHECK(noisy > anchor - 0.1 * (anchor - plain));  // no more than a tenth of what the data teaches
}

TEST_CASE("DP settings that cannot work are refused with the fix", "[privacy]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.dp_noise_multiplier = 1.0;  // without a clipping norm
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("dp_bad1"), false).status().message()), Catch::Contains("--dp-max-grad-norm"));
  c.dp_max_grad_norm = 1.0;
  c.dp_epsilon = 2.0;  // both σ and ε
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("dp_bad2"), false).status().message()), Catch::Contains("not both"));
  c.dp_epsilon = 0;
  c.mode = "pretrain";
  c.preset = "test";
  CHECK_THAT(std::string(Trainer::Create(c, {"", "", w.Run("dp_bad3"), w.cache}, false).status().message()), Catch::Contains("owner's expert"));
  c.mode = "expert";
  c.activation_checkpointing = true;  // per-sequence norms need every layer's activations
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("dp_bad4"), false).status().message()),
             Catch::Contains("--activation-checkpointing does not combine with DP-SGD"));
}

TEST_CASE("bf16 moments with a β2 whose updates bf16 cannot hold are refused with the fix", "[training]") {
  World& w = TheWorld();
  TrainConfig c = SmallRun({w.math});
  c.optimizer_moments = "bf16";
  c.beta2 = 0.999;
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("moments_bad"), false).status().message()),
             Catch::Contains("needs beta2 ≤ 0.99"));
  c.optimizer_moments = "fp16";
  CHECK_THAT(std::string(Trainer::Create(c, w.Inputs("moments_bad2"), false).status().message()),
             Catch::Contains("fp32 or bf16"));
}

TEST_CASE("Poisson samples: deterministic per step, at the rate asked, in order", "[privacy]") {
  const std::vector<int64_t> a = PoissonSample(100000, 0.01, 5, 17), again = PoissonSample(100000, 0.01, 5, 17);
  CHECK(a == again);
  CHECK(a != PoissonSample(100000, 0.01, 5, 18));
  CHECK(std::abs(static_cast<double>(a.size()) - 1000.0) < 5 * std::sqrt(1000.0));
  CHECK(std::is_sorted(a.begin(), a.end()));
  CHECK(std::adjacent_find(a.begin(), a.end()) == a.end());
  CHECK(a.back() < 100000);
  CHECK(PoissonSample(50, 1.0, 1, 0).size() == 50);
  CHECK(PoissonSample(50, 0.0, 1, 0).empty());
}

TEST_CASE("linear-layer norms from activations equal the norms of the explicit gradients", "[privacy]") {
  at::manual_seed(3);
  // Two shapes: one where the ghost form is cheaper (few rows, wide layer), one where it is not.
  for (const auto& [in, out, seq_len] : {std::tuple<int64_t, int64_t, int64_t>{64, 96, 8}, {4, 3, 32}}) {
    const int64_t b = 3, n_total = b * seq_len;
    const at::Tensor rows = at::tensor(std::vector<int64_t>{0, 2, 3, seq_len + 1, 2 * seq_len, 2 * seq_len + 5, n_total - 1}, at::kLong);
    const at::Tensor x = at::randn({rows.size(0), in}, at::kFloat), g = at::randn({rows.size(0), out}, at::kFloat);
    at::Tensor got = at::zeros({b}, at::kDouble);
    AddLinearNormsSq(x, g, rows, seq_len, got);
    for (int64_t s = 0; s < b; ++s) {
      const at::Tensor in_s = (at::div(rows, seq_len, "floor") == s);
      const at::Tensor grad = at::mm(g.index({in_s}).t(), x.index({in_s})).to(at::kDouble);
      CHECK(got[s].item<double>() == Approx(grad.pow(2).sum().item<double>()).epsilon(1e-5));
    }
  }
  // Router rows and biases: per-token gradient g_t·x_t and g_t, summed per sequence.
  const at::Tensor x = at::randn({12, 5}, at::kFloat), g = at::randn({12}, at::kFloat);
  at::Tensor rows = at::zeros({3}, at::kDouble), scalars = at::zeros({3}, at::kDouble);
  AddRowNormsSq(x, g, 4, rows);
  AddScalarNormsSq(g, 4, scalars);
  for (int64_t s = 0; s < 3; ++s) {
    const at::Tensor v = (x.narrow(0, 4 * s, 4) * g.narrow(0, 4 * s, 4).unsqueeze(1)).sum(0).to(at::kDouble);
    CHECK(rows[s].item<double>() == Approx(v.pow(2).sum().item<double>()).epsilon(1e-6));
    CHECK(scalars[s].item<double>() == Approx(std::pow(g.narrow(0, 4 * s, 4).sum().item<double>(), 2)).epsilon(1e-6));
  }
}

}  // namespace
}  // namespace flexfed

