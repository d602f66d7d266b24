// The forward pass follows docs/METHOD.md §2 line by line; where HF's
// modeling_flex_olmo.py makes a numerical choice (fp32 softmax, fp32 RoPE, order of expert sums)
// this code makes the same one, so logits agree to rounding.
#include "common/model/model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/model/layer_checkpoint.h"
#include "common/model/layers.h"
#include "common/model/moe_dispatch.h"
#include "common/core/file_util.h"
#include <nlohmann/json.hpp>

namespace flexfed {
namespace {

namespace fs = std::filesystem;

std::string LayerPrefix(int64_t layer) { return absl::StrCat("model.layers.", layer, "."); }

}  // namespace

at::ScalarType ScalarTypeOf(const std::string& torch_dtype) {
  if (torch_dtype == "bfloat16") return at::kBFloat16;
  if (torch_dtype == "float16") return at::kHalf;
  return at::kFloat;
}

std::string TorchDtypeName(at::ScalarType type) {
  if (type == at::kBFloat16) return "bfloat16";
  if (type == at::kHalf) return "float16";
  return "float32";
}

// All experts set to `base`, those listed to !base.
static Routing MarkExperts(int64_t num_experts, const std::vector<int64_t>& listed, bool base) {
  Routing r;
  r.allowed.assign(num_experts, base);
  for (int64_t e : listed) {
    TORCH_CHECK(e >= 0 && e < num_experts, "expert ", e, " does not exist (", num_experts, " experts)");
    r.allowed[e] = !base;
  }
  return r;
}

Routing Routing::Excluding(int64_t num_experts, const std::vector<int64_t>& excluded) {
  return MarkExperts(num_experts, excluded, /*base=*/true);
}

Routing Routing::Only(int64_t num_experts, const std::vector<int64_t>& allowed) {
  return MarkExperts(num_experts, allowed, /*base=*/false);
}

absl::StatusOr<Routing> Routing::FromLists(int64_t num_experts, const std::vector<int64_t>& exclude,
                                           const std::vector<int64_t>& allow) {
  if (!exclude.empty() && !allow.empty()) return absl::InvalidArgumentError("give --exclude or --allow, not both");
  if (exclude.empty() && allow.empty()) return Routing::All();
  for (int64_t e : exclude.empty() ? allow : exclude) {
    if (e < 0 || e >= num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("expert ", e, " does not exist: the model has ", num_experts,
                                                     " expert(s), numbered 0 to ", num_experts - 1));
    }
  }
  Routing r = exclude.empty() ? Only(num_experts, allow) : Excluding(num_experts, exclude);
  if (std::none_of(r.allowed.begin(), r.allowed.end(), [](bool a) { return a; })) {
    return absl::InvalidArgumentError("the expert set allows no expert; keep at least one");
  }
  return r;
}

std::vector<std::string> ExpectedTensorNames(const ModelConfig& config, bool with_router_bias) {
  std::vector<std::string> names = {"model.embed_tokens.weight"};
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const std::string p = LayerPrefix(l);
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}) {
      names.push_back(absl::StrCat(p, "self_attn.", n, ".weight"));
    }
    names.push_back(p + "post_attention_layernorm.weight");
    if (config.is_moe()) {
      names.push_back(p + "mlp.gate.weight");
      if (with_router_bias) names.push_back(p + "mlp.router_bias");
      for (int64_t e = 0; e < config.num_experts; ++e) {
        for (const char* n : {"gate_proj", "up_proj", "down_proj"}) {
          names.push_back(absl::StrCat(p, "mlp.experts.", e, ".", n, ".weight"));
        }
      }
    } else {
      for (const char* n : {"gate_proj", "up_proj", "down_proj"}) names.push_back(absl::StrCat(p, "mlp.", n, ".weight"));
    }
    names.push_back(p + "post_feedforward_layernorm.weight");
  }
  names.push_back("model.norm.weight");
  if (!config.tie_word_embeddings) names.push_back("lm_head.weight");
  return names;
}

// Every weight slot of a model with its name and shape, in ExpectedTensorNames() order.
struct Slot {
  std::string name;
  at::Tensor* tensor;
  std::vector<int64_t> shape;
};

static std::vector<Slot> Slots(const ModelConfig& c, at::Tensor& embed, std::vector<LayerWeights>& layers,
                               at::Tensor& norm, at::Tensor& lm_head, bool with_router_bias) {
  const int64_t h = c.hidden_size, f = c.intermediate_size, qd = c.num_attention_heads * c.head_dim,
                kvd = c.num_key_value_heads * c.head_dim;
  std::vector<std::string> names = ExpectedTensorNames(c, with_router_bias);
  std::vector<Slot> slots;
  size_t i = 0;
  auto add = [&](at::Tensor* t, std::vector<int64_t> shape) { slots.push_back({names[i++], t, std::move(shape)}); };
  add(&embed, {c.vocab_size, h});
  for (LayerWeights& lw : layers) {
    add(&lw.q_proj, {qd, h});
    add(&lw.k_proj, {kvd, h});
    add(&lw.v_proj, {kvd, h});
    add(&lw.o_proj, {h, qd});
    add(&lw.q_norm, {qd});
    add(&lw.k_norm, {kvd});
    add(&lw.post_attention_layernorm, {h});
    if (c.is_moe()) {
      add(&lw.router, {c.num_experts, h});
      if (with_router_bias) add(&lw.router_bias, {c.num_experts});
    }
    for (ExpertWeights& e : lw.experts) {
      add(&e.gate_proj, {f, h});
      add(&e.up_proj, {f, h});
      add(&e.down_proj, {h, f});
    }
    add(&lw.post_feedforward_layernorm, {h});
  }
  add(&norm, {h});
  if (!c.tie_word_embeddings) add(&lm_head, {c.vocab_size, h});
  TORCH_CHECK(i == names.size(), "internal: weight slots and names disagree");
  return slots;
}

void FlexOlmoModel::BuildRope() {
  RopeTables rope = MakeRopeTables(config_.rope_theta, config_.head_dim, config_.max_position_embeddings);
  rope_cos_ = rope.cos.to(device());
  rope_sin_ = rope.sin.to(device());
}

absl::StatusOr<FlexOlmoModel> FlexOlmoModel::Create(const ModelConfig& config, at::ScalarType dtype, uint64_t seed,
                                                    bool with_router_bias) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  FlexOlmoModel m;
  m.config_ = config;
  m.config_.torch_dtype = TorchDtypeName(dtype);
  m.layers_.resize(config.num_hidden_layers);
  for (LayerWeights& lw : m.layers_) lw.experts.resize(config.num_experts);
  at::Generator gen = at::detail::createCPUGenerator(seed);
  for (Slot& s : Slots(m.config_, m.embed_tokens_, m.layers_, m.norm_, m.lm_head_, with_router_bias)) {
    at::Tensor t;
    if (s.shape.size() == 1) {
      // Norm weights start at 1; router biases at 0 (no preference until trained).
      t = s.name.find("router_bias") != std::string::npos ? at::zeros(s.shape, at::kFloat) : at::ones(s.shape, at::kFloat);
    } else {
      t = at::normal(0.0, 0.02, s.shape, gen, at::TensorOptions().dtype(at::kFloat));
    }
    *s.tensor = t.to(dtype);
  }
  if (config.tie_word_embeddings) m.lm_head_ = m.embed_tokens_;
  m.BuildRope();
  return m;
}

absl::Status WriteRandomCheckpoint(const std::string& dir, const ModelConfig& config, at::ScalarType dtype,
                                   uint64_t seed, uint64_t max_shard_bytes) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  std::error_code ec;
  if (fs::exists(dir, ec)) return absl::AlreadyExistsError(absl::StrCat(dir, ": already exists; choose a new directory"));
  // Shapes only: the slots point at empty tensors.
  at::Tensor embed, norm, lm_head;
  std::vector<LayerWeights> layers(static_cast<size_t>(config.num_hidden_layers));
  for (LayerWeights& lw : layers) lw.experts.resize(static_cast<size_t>(config.num_experts));
  std::vector<Slot> slots = Slots(config, embed, layers, norm, lm_head, /*with_router_bias=*/false);
  std::vector<size_t> order(slots.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return slots[a].name < slots[b].name; });
  const int64_t element = at::elementSize(dtype);
  auto bytes_of = [&](const Slot& s) {
    int64_t n = element;
    for (int64_t d : s.shape) n *= d;
    return static_cast<uint64_t>(n);
  };
  // Shards in name order, as WriteCheckpoint fills them.
  std::vector<std::vector<size_t>> shards(1);
  uint64_t in_shard = 0;
  for (size_t i : order) {
    if (in_shard > 0 && in_shard + bytes_of(slots[i]) > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += bytes_of(slots[i]);
  }
  const fs::path final_dir = fs::absolute(dir);
  const fs::path tmp = final_dir.parent_path() / absl::StrCat(".", final_dir.filename().string(), ".partial");
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat(tmp.string(), ": cannot create: ", ec.message()));
  auto fail = [&](absl::Status s) {
    fs::remove_all(tmp, ec);
    return s;
  };
  nlohmann::json weight_map = nlohmann::json::object();
  uint64_t total = 0;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file = shards.size() == 1 ? std::string(kSingleFileName)
                                                : absl::StrFormat("model-%05d-of-%05d.safetensors", k + 1, shards.size());
    std::vector<NamedTensor> tensors;
    for (size_t i : shards[k]) {
      const Slot& s = slots[i];
      at::Tensor t;
      if (s.shape.size() == 1) {
        t = at::ones(s.shape, at::TensorOptions().dtype(dtype));
      } else {
        at::Generator gen = at::detail::createCPUGenerator(seed * 1000003 + i);
        t = at::normal(0.0, 0.02, s.shape, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
      }
      total += t.nbytes();
      tensors.push_back({s.name, std::move(t)});
      weight_map[s.name] = file;
    }
    if (absl::Status s = WriteSafetensors((tmp / file).string(), tensors, {{"format", "pt"}}); !s.ok()) return fail(s);
  }
  if (shards.size() > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    if (absl::Status s = WriteFileAtomically((tmp / kIndexFileName).string(), index.dump(2) + "\n"); !s.ok()) return fail(s);
  }
  ModelConfig c = config;
  c.torch_dtype = TorchDtypeName(dtype);
  if (absl::Status s = WriteModelConfig((tmp / "config.json").string(), c); !s.ok()) return fail(s);
  fs::rename(tmp, final_dir, ec);
  if (ec) return fail(absl::InternalError(absl::StrCat(dir, ": cannot move the checkpoint into place: ", ec.message())));
  return absl::OkStatus();
}

absl::StatusOr<FlexOlmoModel> FlexOlmoModel::Assemble(const ModelConfig& config, at::Tensor embed_tokens,
                                                      std::vector<LayerWeights> layers, at::Tensor norm,
                                                      at::Tensor lm_head) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  if (static_cast<int64_t>(layers.size()) != config.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("Assemble: ", layers.size(), " layers for a config of ",
                                                   config.num_hidden_layers));
  }
  FlexOlmoModel m;
  m.config_ = config;
  m.embed_tokens_ = std::move(embed_tokens);
  m.layers_ = std::move(layers);
  m.norm_ = std::move(norm);
  m.lm_head_ = config.tie_word_embeddings ? m.embed_tokens_ : std::move(lm_head);
  const bool with_bias = m.layers_[0].router_bias.defined();
  for (LayerWeights& lw : m.layers_) {
    if (static_cast<int64_t>(lw.experts.size()) != config.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("Assemble: a layer has ", lw.experts.size(), " experts, the config ",
                                                     config.num_experts));
    }
  }
  for (const Slot& s : Slots(m.config_, m.embed_tokens_, m.layers_, m.norm_, m.lm_head_, with_bias)) {
    if (!s.tensor->defined() || s.tensor->sizes().vec() != s.shape) {
      return absl::InvalidArgumentError(absl::StrCat("Assemble: tensor '", s.name, "' is missing or not of shape ",
                                                     ShapeString(s.shape)));
    }
  }
  m.config_.torch_dtype = TorchDtypeName(m.dtype());
  m.BuildRope();
  return m;
}

absl::StatusOr<FlexOlmoModel> FlexOlmoModel::Load(const std::string& dir, std::optional<at::ScalarType> dtype) {
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::exists(config_path)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no config.json here; point to a checkpoint directory "
                                                 "(config.json + model.safetensors or its index)"));
  }
  absl::StatusOr<ModelConfig> config = ReadModelConfig(config_path.string());
  if (!config.ok()) return config.status();
  absl::StatusOr<Checkpoint> ckpt = Checkpoint::Open(dir);
  if (!ckpt.ok()) return ckpt.status();

  // FlexFed's negative router biases live beside the HF files (HF checkpoints cannot carry them).
  const fs::path extras_path = fs::path(dir) / kExtrasFileName;
  std::shared_ptr<const SafetensorsFile> extras_file;
  if (fs::exists(extras_path)) {
    absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(extras_path.string());
    if (!file.ok()) return file.status();
    if (!config->is_moe()) {
      return absl::InvalidArgumentError(absl::StrCat(extras_path.string(),
                                                     ": router biases given for a dense olmo2 model; remove the file"));
    }
    extras_file = *std::move(file);
  }
  const bool with_bias = extras_file != nullptr;

  FlexOlmoModel m;
  m.config_ = *config;
  const at::ScalarType type = dtype.value_or(ScalarTypeOf(config->torch_dtype));
  m.config_.torch_dtype = TorchDtypeName(type);
  m.layers_.resize(config->num_hidden_layers);
  for (LayerWeights& lw : m.layers_) lw.experts.resize(config->num_experts);

  std::set<std::string> used;
  for (Slot& s : Slots(m.config_, m.embed_tokens_, m.layers_, m.norm_, m.lm_head_, with_bias)) {
    const bool is_bias = s.name.find("router_bias") != std::string::npos;
    const std::string where = is_bias ? extras_path.string() : dir;
    absl::StatusOr<at::Tensor> t = is_bias ? extras_file->Get(s.name) : ckpt->Get(s.name);
    if (!t.ok()) {
      return absl::NotFoundError(absl::StrCat(where, ": missing tensor '", s.name, "' that a ", config->model_type,
                                              " model of this config.json needs; the checkpoint is incomplete"));
    }
    if (t->sizes().vec() != s.shape) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", s.name, "' has shape ",
                                                     ShapeString(t->sizes().vec()), " but config.json implies ",
                                                     ShapeString(s.shape)));
    }
    if (!at::isFloatingType(t->scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", s.name, "' is not floating point"));
    }
    // Biases stay fp32 (they are added to fp32 router logits); everything else takes `type`.
    *s.tensor = t->to(is_bias ? at::kFloat : type);
    used.insert(s.name);
  }
  for (const std::string& name : ckpt->Names()) {
    if (used.count(name)) continue;
    if (name == "lm_head.weight" && config->tie_word_embeddings) continue;  // HF ignores it when tied
    return absl::InvalidArgumentError(absl::StrCat(dir, ": unexpected tensor '", name, "' for a ", config->model_type,
                                                   " model of this config.json; FlexFed refuses weights it would ignore"));
  }
  if (extras_file) {
    for (const std::string& name : extras_file->Names()) {
      if (!used.count(name)) {
        return absl::InvalidArgumentError(absl::StrCat(extras_path.string(), ": unexpected tensor '", name, "'"));
      }
    }
  }
  if (config->tie_word_embeddings) m.lm_head_ = m.embed_tokens_;
  m.BuildRope();
  return m;
}

std::vector<NamedTensor> FlexOlmoModel::NamedParameters() const {
  auto& self = const_cast<FlexOlmoModel&>(*this);  // Slots() hands out pointers; nothing is written here
  const bool with_bias = !layers_.empty() && layers_[0].router_bias.defined();
  std::vector<NamedTensor> out;
  for (const Slot& s : Slots(config_, self.embed_tokens_, self.layers_, self.norm_, self.lm_head_, with_bias)) {
    out.push_back({s.name, *s.tensor});
  }
  return out;
}

absl::Status FlexOlmoModel::Save(const std::string& dir, uint64_t max_shard_bytes) const {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", ec.message()));
  // Weights of mixed dtypes (an owner's fp32 expert beside bf16 frozen matrices) are written in the
  // widest of them, converted one tensor at a time as they are written. Router biases are fp32
  // always, in their own file.
  auto is_bias = [](const NamedTensor& nt) { return nt.name.find("router_bias") != std::string::npos; };
  at::ScalarType widest = dtype();
  for (const NamedTensor& nt : NamedParameters()) {
    if (!is_bias(nt)) widest = at::promote_types(widest, nt.tensor.scalar_type());
  }
  std::vector<NamedTensor> weights, extras;
  for (NamedTensor& nt : NamedParameters()) {
    if (is_bias(nt)) {
      extras.push_back(std::move(nt));
      continue;
    }
    if (nt.tensor.scalar_type() != widest) nt.write_as = widest;
    weights.push_back(std::move(nt));
  }
  if (absl::Status s = WriteCheckpoint(dir, weights, {{"format", "pt"}}, max_shard_bytes); !s.ok()) return s;
  const std::string extras_path = (fs::path(dir) / kExtrasFileName).string();
  if (!extras.empty()) {
    if (absl::Status s = WriteSafetensors(extras_path, extras, {{"format", "flexfed"}}); !s.ok()) return s;
  } else {
    fs::remove(extras_path, ec);
  }
  ModelConfig c = config_;
  c.torch_dtype = TorchDtypeName(widest);
  return WriteModelConfig((fs::path(dir) / "config.json").string(), c);
}

void FlexOlmoModel::To(at::Device device) {
  for (Slot& s : Slots(config_, embed_tokens_, layers_, norm_, lm_head_, !layers_.empty() && layers_[0].router_bias.defined())) {
    *s.tensor = s.tensor->to(device);
  }
  if (config_.tie_word_embeddings) lm_head_ = embed_tokens_;
  rope_cos_ = rope_cos_.to(device);
  rope_sin_ = rope_sin_.to(device);
}

KvCache FlexOlmoModel::NewCache(int64_t batch, int64_t capacity) const {
  KvCache cache;
  auto options = embed_tokens_.options().requires_grad(false);
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    cache.keys.push_back(at::empty({batch, config_.num_key_value_heads, capacity, config_.head_dim}, options));
    cache.values.push_back(at::empty({batch, config_.num_key_value_heads, capacity, config_.head_dim}, options));
  }
  return cache;
}

// x: [B, T, H] → attention output after o_proj, [B, T, H]. Keys/values of the T new positions are
// appended to `cache` (when given) at positions past .. past+T-1.
at::Tensor FlexOlmoModel::Attention(int64_t layer, const LayerWeights& w, const at::Tensor& x, int64_t past,
                                    KvCache* cache) const {
  const int64_t b = x.size(0), t = x.size(1), d = config_.head_dim;
  const int64_t nq = config_.num_attention_heads, nkv = config_.num_key_value_heads;
  const double eps = config_.rms_norm_eps;

  // QK-norm over the full projection width, before the head split and RoPE.
  at::Tensor q = RmsNorm(at::linear(x, w.q_proj), w.q_norm, eps).view({b, t, nq, d}).transpose(1, 2);
  at::Tensor k = RmsNorm(at::linear(x, w.k_proj), w.k_norm, eps).view({b, t, nkv, d}).transpose(1, 2);
  at::Tensor v = at::linear(x, w.v_proj).view({b, t, nkv, d}).transpose(1, 2);

  at::Tensor cos = rope_cos_.narrow(0, past, t), sin = rope_sin_.narrow(0, past, t);
  q = ApplyRope(q, cos, sin);
  k = ApplyRope(k, cos, sin);

  if (cache != nullptr) {
    cache->keys[layer].narrow(2, past, t).copy_(k);
    cache->values[layer].narrow(2, past, t).copy_(v);
    k = cache->keys[layer].narrow(2, 0, past + t);
    v = cache->values[layer].narrow(2, 0, past + t);
  }
  k = RepeatKv(k, nq / nkv);
  v = RepeatKv(v, nq / nkv);

  at::Tensor out = CausalAttention(q, k, v, past, 1.0 / std::sqrt(static_cast<double>(d)));  // [b, nq, t, d]
  out = out.transpose(1, 2).reshape({b, t, nq * d});
  return at::linear(out, w.o_proj);
}

// x: [N, H] → [N, H]. routing_mask: [E] fp32, 0 for allowed experts and -inf for excluded ones.
at::Tensor FlexOlmoModel::Moe(const LayerWeights& w, const at::Tensor& x, const at::Tensor& routing_mask, int64_t top_k,
                              ForwardTrace* trace) const {
  FfnActivations* record = nullptr;
  if (trace != nullptr && trace->ffn_expert >= 0) {
    trace->ffn.emplace_back();
    record = &trace->ffn.back();
  }
  if (!config_.is_moe()) {  // olmo2: one dense FFN, no router
    const ExpertWeights& e = w.experts[0];
    if (record != nullptr) {
      record->rows = at::arange(x.size(0), x.options().dtype(at::kLong));
      return SwiGluRecorded(x, e, record);
    }
    return SwiGlu(x, e.gate_proj, e.up_proj, e.down_proj);
  }
  if (record == nullptr && UseDispatchMoe(x.device())) {  // CUDA kernels (common/model/moe_dispatch.h)
    DispatchMoeOutput r = DispatchMoe(x, w.router, w.router_bias, routing_mask, top_k, config_.norm_topk_prob, w.experts);
    if (trace != nullptr) {
      trace->router_logits.push_back(r.logits);
      trace->expert_indices.push_back(r.indices);
    }
    return r.out;
  }
  RouterOutput route = Route(x, w.router, w.router_bias, routing_mask, top_k, config_.norm_topk_prob);
  if (trace != nullptr) {
    trace->router_logits.push_back(route.logits);
    trace->expert_indices.push_back(route.indices);
  }
  return CombineExperts(x, w.experts, route, trace != nullptr ? trace->ffn_expert : -1, record);
}

at::Tensor FlexOlmoModel::Forward(const at::Tensor& ids, const Routing& routing, KvCache* cache,
                                  ForwardTrace* trace) const {
  return at::linear(ForwardHidden(ids, routing, cache, trace), lm_head_);
}

at::Tensor FlexOlmoModel::ForwardHidden(const at::Tensor& ids, const Routing& routing, KvCache* cache,
                                        ForwardTrace* trace) const {
  TORCH_CHECK(ids.dim() == 2, "Forward: ids must be [batch, tokens], got ", ids.sizes());
  const int64_t b = ids.size(0), t = ids.size(1);
  const int64_t past = cache != nullptr ? cache->length : 0;
  TORCH_CHECK(past + t <= config_.max_position_embeddings, "Forward: position ", past + t - 1,
              " exceeds max_position_embeddings (", config_.max_position_embeddings, ")");
  if (cache != nullptr) {
    TORCH_CHECK(past + t <= cache->capacity(), "Forward: KV cache holds ", cache->capacity(), " positions, needs ", past + t);
    TORCH_CHECK(cache->keys[0].size(0) == b, "Forward: KV cache batch ", cache->keys[0].size(0), " != ", b);
  }

  at::Tensor routing_mask;
  int64_t top_k = config_.num_experts_per_tok;
  if (!routing.allowed.empty()) {
    TORCH_CHECK(static_cast<int64_t>(routing.allowed.size()) == config_.num_experts, "Forward: routing lists ",
                routing.allowed.size(), " experts, the model has ", config_.num_experts);
    std::vector<float> mask(config_.num_experts);
    int64_t allowed = 0;
    for (int64_t e = 0; e < config_.num_experts; ++e) {
      mask[e] = routing.allowed[e] ? 0.0f : -std::numeric_limits<float>::infinity();
      allowed += routing.allowed[e];
    }
    TORCH_CHECK(allowed > 0, "Forward: routing allows no expert");
    // With fewer experts allowed than K, every allowed expert is used (as in a model built without the rest).
    top_k = std::min(top_k, allowed);
    if (allowed < config_.num_experts) routing_mask = at::tensor(mask).to(device());
  }

  at::Tensor h = at::embedding(embed_tokens_, ids).to(norm_.scalar_type());  // [B, T, H], no scaling
  const bool checkpoint = checkpoint_layers_ && at::GradMode::is_enabled() && cache == nullptr &&
                          (trace == nullptr || (trace->ffn_expert < 0 && !trace->want_router_inputs));
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    if (trace != nullptr && trace->want_layer_inputs) trace->layer_inputs.push_back(h);
    if (checkpoint) {
      CheckpointedLayerOutput out = CheckpointedLayer(*this, l, h, routing_mask, top_k);
      if (trace != nullptr && out.router_logits.defined()) {
        trace->router_logits.push_back(out.router_logits);
        trace->expert_indices.push_back(out.expert_indices);
      }
      h = out.hidden;
    } else {
      h = DecoderLayer(l, layers_[l], h, past, cache, routing_mask, top_k, trace);
    }
  }
  if (cache != nullptr) cache->length = past + t;
  return RmsNorm(h, norm_, config_.rms_norm_eps);
}

at::Tensor FlexOlmoModel::DecoderLayer(int64_t layer, const LayerWeights& w, const at::Tensor& h, int64_t past,
                                       KvCache* cache, const at::Tensor& routing_mask, int64_t top_k,
                                       ForwardTrace* trace) const {
  const int64_t b = h.size(0), t = h.size(1), hidden = config_.hidden_size;
  // Reordered norm: each norm applies to its sublayer's output; there is no input norm.
  at::Tensor x = h + RmsNorm(Attention(layer, w, h, past, cache), w.post_attention_layernorm, config_.rms_norm_eps);
  if (trace != nullptr && trace->want_router_inputs) trace->router_inputs.push_back(x);
  at::Tensor m = Moe(w, x.reshape({b * t, hidden}), routing_mask, top_k, trace).view({b, t, hidden});
  return x + RmsNorm(m, w.post_feedforward_layernorm, config_.rms_norm_eps);
}

void SetCpuThreads(int threads) {
  at::set_num_threads(threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

}  // namespace flexfed
