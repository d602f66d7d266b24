// A small federation made in process for the merge and release tests: a `test` anchor with r_pub,
// and owners' modules that differ from it and from each other (seeded).
#pragma once

#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <string>

#include "common/core/expert_module.h"
#include "common/merge/expert_export.h"
#include "common/model/anchor.h"
#include "common/model/model.h"
#include "common/model/router_embedding.h"
#include "tests/temp_dir.h"
#include "tests/test_util.h"

namespace flexfed::testing {

// `anchor_seed` draws the anchor's weights and r_pub: two federations with different seeds have
// different anchors.
struct Federation {
  explicit Federation(uint64_t anchor_seed = 11) : anchor(MakeAnchor(anchor_dir, config, anchor_seed)) {}

  TempDir dir;
  ModelConfig config = ValueOrDie(ModelConfig::Preset("test"));
  std::string anchor_dir = dir / "anchor";
  Anchor anchor;

  static Anchor MakeAnchor(const std::string& anchor_dir, const ModelConfig& config, uint64_t seed) {
    REQUIRE(ValueOrDie(FlexOlmoModel::Create(config, at::kFloat, seed)).Save(anchor_dir).ok());
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
