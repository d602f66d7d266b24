// A small federation made in process for the merge and release tests: a `test` anchor with r_pub,
// and owners' modules that differ from it and from each other (seeded).
#pragma once

#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <filesystem>
#include <string>

#include "common/core/expert_module.h"
#include "common/merge/expert_export.h"
#include "common/model/anchor.h"
#include "common/model/hf_tokenizer.h"
#include "common/model/tokenizer.h"
#include "common/model/model.h"
#include "common/model/router_embedding.h"
#include "tests/temp_dir.h"
#include "tests/test_util.h"

namespace flexfed::testing {

// `anchor_seed` draws the anchor's weights and r_pub: two federations with different seeds have
// different anchors. With `tokenizer_dir`, the anchor carries that folder's tokenizer files
// (tokenizer.json, ...) and a vocabulary of `vocab_size` rows; else the byte tokenizer's 259.
struct Federation {
  explicit Federation(uint64_t anchor_seed = 11, const std::string& tokenizer_dir = "", int64_t vocab_size = 0)
      : config(ConfigWithVocab(vocab_size, tokenizer_dir)), anchor(MakeAnchor(anchor_dir, config, anchor_seed, tokenizer_dir)) {}

  TempDir dir;
  ModelConfig config;
  std::string anchor_dir = dir / "anchor";
  Anchor anchor;

  static ModelConfig ConfigWithVocab(int64_t vocab_size, const std::string& tokenizer_dir) {
    ModelConfig c = ValueOrDie(ModelConfig::Preset("test"));
    if (tokenizer_dir.empty()) return c;
    std::unique_ptr<Tokenizer> tok = ValueOrDie(LoadHfTokenizer(tokenizer_dir));
    c.vocab_size = vocab_size;
    c.bos_token_id.reset();
    c.eos_token_ids = {tok->eos_id()};
    c.pad_token_id = tok->pad_id();
    return c;
  }

  static Anchor MakeAnchor(const std::string& anchor_dir, const ModelConfig& config, uint64_t seed,
                           const std::string& tokenizer_dir = "") {
    REQUIRE(ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, seed)).Save(anchor_dir).ok());
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      if (tokenizer_dir.empty()) break;
      std::filesystem::copy_file(std::filesystem::path(tokenizer_dir) / name, std::filesystem::path(anchor_dir) / name);
    }
    at::manual_seed(seed);
    RouterEmbedding pub;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) pub.rows.push_back(at::randn({config.hidden_size}));
    REQUIRE(WriteRouterEmbedding(anchor_dir + "/" + kRouterPubFileName, pub).ok());
    return ValueOrDie(LoadAnchor(anchor_dir));
  }

  std::string Module(const std::string& name, uint64_t seed, bool with_bias = true) {
    at::manual_seed(seed);
    ExpertTensors t;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const ExpertWeights& e = anchor.model.layers()[l].experts[0];
      t.ffn.push_back({e.gate_proj + 0.05 * at::randn_like(e.gate_proj), e.up_proj + 0.05 * at::randn_like(e.up_proj),
                       e.down_proj + 0.05 * at::randn_like(e.down_proj)});
      t.router_rows.push_back(at::randn({config.hidden_size}));
      if (with_bias) t.router_bias.push_back(at::tensor({-0.1f * static_cast<float>(seed % 7)}));
    }
    ExpertModuleMetadata m{anchor.id, ConfigHash(config), name, name, "domain of " + name, 1000, "anchor"};
    const std::string path = dir / (name + ".safetensors");
    REQUIRE(WriteExpertModule(path, t, m).ok());
    return path;
  }
};

}  // namespace flexfed::testing
