#include "evaluation/suite.h"

#include <chrono>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/model/anchor.h"
#include "common/train/data.h"
#include "common/train/loss.h"
#include "common/merge/merge.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"

namespace flexfed {
namespace {

using nlohmann::json;

struct Row {
  std::string name;
  std::string kind;  // anchor | two_expert | soup | btm | merged | ablation | opt_out
  std::map<std::string, double> bpb;
  double average = 0;
};

class Suite {
 public:
  Suite(const SuiteSpec& spec, const std::function<void(const std::string&)>& log) : spec_(spec), log_(log) {}

  absl::StatusOr<json> Run() {
    absl::StatusOr<Anchor> anchor = LoadAnchor(spec_.anchor);
    if (!anchor.ok()) return anchor.status();
    anchor_ = std::make_unique<Anchor>(*std::move(anchor));
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(spec_.anchor, anchor_->model.config().vocab_size);
    if (!tok.ok()) return tok.status();
    tokenizer_ = *std::move(tok);
    for (const SuiteDomain& d : spec_.domains) {
      absl::StatusOr<EvalText> text = LoadEvalText({d.heldout}, *tokenizer_, spec_.seq_len, spec_.max_sequences, spec_.cache_dir);
      if (!text.ok()) return absl::Status(text.status().code(), absl::StrCat("domain ", d.name, ": ", text.status().message()));
      texts_.emplace(d.name, *std::move(text));
    }

    Score("Public anchor", "anchor", anchor_->model);
    // Each module set is hashed, validated and mapped once; every row below reuses it.
    std::vector<std::string> paths;
    for (const SuiteOwner& o : spec_.owners) paths.push_back(o.module);
    absl::StatusOr<std::vector<LoadedExpert>> modules = LoadExperts(*anchor_, paths);
    if (!modules.ok()) return modules.status();
    std::map<std::string, std::vector<TokenScores>> two_expert_scores;  // domain → per owner
    for (size_t i = 0; i < spec_.owners.size(); ++i) {
      const SuiteOwner& o = spec_.owners[i];
      absl::StatusOr<MergedModel> two = MergeExperts(*anchor_, {(*modules)[i]}, TopK(2));
      if (!two.ok()) return two.status();
      std::map<std::string, TokenScores> scores = Score(absl::StrCat("Two-expert model: ", o.name), "two_expert", two->model);
      for (auto& [domain, s] : scores) two_expert_scores[domain].push_back(std::move(s));
    }
    absl::StatusOr<FlexOlmoModel> soup = SoupModel(*anchor_, *modules);
    if (!soup.ok()) return soup.status();
    Score("Model soup (mean of the experts' FFNs)", "soup", *soup);
    {
      Row btm{absl::StrFormat("BTM (ensemble of the two-expert models, prefix %d, tau %g)", spec_.btm_prefix, spec_.btm_tau), "btm", {}};
      for (const SuiteDomain& d : spec_.domains) {
        btm.bpb[d.name] = Summarize(EnsembleScores(two_expert_scores[d.name], spec_.btm_prefix, spec_.btm_tau)).bits_per_byte;
      }
      AddRow(std::move(btm));
    }

    std::string main_row;
    for (size_t i = 0; i < spec_.top_k.size(); ++i) {
      const int64_t k = spec_.top_k[i];
      MergeOptions options;
      options.top_k = k;
      absl::StatusOr<MergedModel> merged = MergeExperts(*anchor_, *modules, options);
      if (!merged.ok()) return merged.status();
      const std::string name = absl::StrFormat("FlexOlmo merged (%d experts, k = %d)", merged->model.config().num_experts,
                                               merged->model.config().num_experts_per_tok);
      Score(name, "merged", merged->model, {}, i == 0 ? &routing_ : nullptr);
      if (i > 0) continue;
      main_row = name;
      MergeOptions no_bias = options;
      no_bias.with_router_bias = false;
      absl::StatusOr<MergedModel> nb = MergeExperts(*anchor_, *modules, no_bias);
      if (!nb.ok()) return nb.status();
      Score("FlexOlmo without the negative bias", "ablation", nb->model);
      // The paper's ablations are trainings: without the bias, with random router rows, dense.
      for (auto [field, label] : {std::pair{&SuiteOwner::no_bias_module, "FlexOlmo trained without the negative bias"},
                                  std::pair{&SuiteOwner::random_init_module, "FlexOlmo with random router init"},
                                  std::pair{&SuiteOwner::dense_module, "No coordination (dense experts merged)"}}) {
        std::vector<std::string> alt;
        for (const SuiteOwner& o : spec_.owners) {
          if (!(o.*field).empty()) alt.push_back(o.*field);
        }
        if (alt.empty()) continue;
        if (alt.size() != spec_.owners.size()) return absl::InvalidArgumentError(absl::StrCat(label, ": give it for every owner or none"));
        absl::StatusOr<MergedModel> m = MergeExperts(*anchor_, alt, options);
        if (!m.ok()) return m.status();
        Score(label, "ablation", m->model);
      }
      for (size_t j = 0; j < spec_.owners.size(); ++j) {
        const int64_t expert = static_cast<int64_t>(j) + 1;
        Score(absl::StrFormat("FlexOlmo, %s opted out", spec_.owners[j].name), "opt_out", merged->model,
              Routing::Excluding(merged->model.config().num_experts, {expert}));
      }
    }
    return Result(main_row);
  }

 private:
  static MergeOptions TopK(int64_t k) {
    MergeOptions o;
    o.top_k = k;
    return o;
  }

  std::map<std::string, TokenScores> Score(const std::string& name, const std::string& kind, const FlexOlmoModel& model,
                                           const Routing& routing = {}, json* routing_out = nullptr) {
    const auto start = std::chrono::steady_clock::now();
    Row row{name, kind, {}};
    std::map<std::string, TokenScores> scores;
    for (const SuiteDomain& d : spec_.domains) {
      const EvalText& text = texts_.at(d.name);
      RoutingStats stats;
      TokenScores s = ScoreTokens(model, *text.packed, text.indices, spec_.batch_size, *tokenizer_, routing,
                                  routing_out != nullptr ? &stats : nullptr);
      row.bpb[d.name] = Summarize(s).bits_per_byte;
      if (routing_out != nullptr) {
        json layers = json::array();
        for (const auto& per_expert : stats.top1) {
          json shares = json::array();
          for (int64_t count : per_expert) shares.push_back(static_cast<double>(count) / static_cast<double>(stats.tokens));
          layers.push_back(shares);
        }
        (*routing_out)[d.name] = layers;
      }
      scores.emplace(d.name, std::move(s));
    }
    if (log_) {
      std::string line = absl::StrFormat("%-56s", name);
      for (const SuiteDomain& d : spec_.domains) line += absl::StrFormat(" %s %.4f", d.name, row.bpb[d.name]);
      log_(absl::StrCat(line, absl::StrFormat("  (%.1f s)", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count())));
    }
    AddRow(std::move(row));
    return scores;
  }

  void AddRow(Row row) {
    double sum = 0;
    for (const SuiteDomain& d : spec_.domains) sum += row.bpb[d.name];
    row.average = sum / static_cast<double>(spec_.domains.size());
    rows_.push_back(std::move(row));
  }

  const Row& Find(const std::string& name) const {
    for (const Row& r : rows_) {
      if (r.name == name) return r;
    }
    throw std::logic_error("no row " + name);
  }

  json Result(const std::string& main_row) const {
    json out;
    json domains = json::array();
    for (const SuiteDomain& d : spec_.domains) domains.push_back(d.name);
    out["domains"] = domains;
    json rows = json::array();
    for (const Row& r : rows_) rows.push_back({{"name", r.name}, {"kind", r.kind}, {"bits_per_byte", r.bpb}, {"average", r.average}});
    out["rows"] = rows;
    out["routing"] = routing_;
    json experts = json::array({"public"});
    for (const SuiteOwner& o : spec_.owners) experts.push_back(o.name);
    out["experts"] = experts;
    out["settings"] = {{"seq_len", spec_.seq_len}, {"max_sequences", spec_.max_sequences}, {"btm_prefix", spec_.btm_prefix},
                       {"btm_tau", spec_.btm_tau}, {"top_k", spec_.top_k}};

    // The expected results (issue #5), each with its numbers.
    json checks = json::array();
    auto check = [&](const std::string& claim, bool ok, const std::string& detail) {
      checks.push_back({{"claim", claim}, {"holds", ok}, {"detail", detail}});
    };
    const Row& anchor = Find("Public anchor");
    const Row& merged = Find(main_row);
    const std::string& pub = spec_.public_domain;
    for (const SuiteOwner& o : spec_.owners) {
      const Row& two = Find(absl::StrCat("Two-expert model: ", o.name));
      const double m = merged.bpb.at(o.domain), a = anchor.bpb.at(o.domain), t = two.bpb.at(o.domain);
      check(absl::StrFormat("merged beats the anchor on %s", o.domain), m < a, absl::StrFormat("%.4f vs %.4f bits/byte", m, a));
      check(absl::StrFormat("merged within 5%% of the %s two-expert model on %s", o.name, o.domain), m <= 1.05 * t,
            absl::StrFormat("%.4f vs %.4f (%+.1f%%)", m, t, 100.0 * (m / t - 1)));
    }
    if (merged.bpb.count(pub)) {
      const double m = merged.bpb.at(pub), a = anchor.bpb.at(pub);
      check("merged loses at most 2% on the public domain", m <= 1.02 * a, absl::StrFormat("%.4f vs anchor %.4f (%+.1f%%)", m, a, 100.0 * (m / a - 1)));
    }
    for (const char* kind : {"soup", "btm"}) {
      for (const Row& r : rows_) {
        if (r.kind != kind) continue;
        check(absl::StrFormat("merged beats %s on the average over domains", kind == std::string("soup") ? "model soup" : "BTM"),
              merged.average < r.average, absl::StrFormat("%.4f vs %.4f", merged.average, r.average));
      }
    }
    for (const SuiteOwner& o : spec_.owners) {
      const Row& out_j = Find(absl::StrFormat("FlexOlmo, %s opted out", o.name));
      const double gap = anchor.bpb.at(o.domain) - merged.bpb.at(o.domain);
      const double left = anchor.bpb.at(o.domain) - out_j.bpb.at(o.domain);  // of the gap, what the opt-out keeps
      check(absl::StrFormat("opting out %s brings %s back to within 10%% of the gap to the anchor", o.name, o.domain),
            gap > 0 && std::abs(left) <= 0.1 * gap,
            absl::StrFormat("anchor %.4f, merged %.4f, opted out %.4f: keeps %.0f%% of the gap", anchor.bpb.at(o.domain),
                            merged.bpb.at(o.domain), out_j.bpb.at(o.domain), gap > 0 ? 100.0 * left / gap : 0.0));
      double worst = 0;
      std::string worst_domain;
      for (const SuiteDomain& d : spec_.domains) {
        if (d.name == o.domain) continue;
        const double change = std::abs(out_j.bpb.at(d.name) / merged.bpb.at(d.name) - 1);
        if (change >= worst) {
          worst = change;
          worst_domain = d.name;
        }
      }
      check(absl::StrFormat("opting out %s moves every other domain by less than 2%%", o.name), worst < 0.02,
            absl::StrFormat("largest change %.2f%% (%s)", 100.0 * worst, worst_domain));
    }
    out["checks"] = checks;

    std::string table = "| model |";
    std::string rule = "|---|";
    for (const SuiteDomain& d : spec_.domains) {
      table += absl::StrCat(" ", d.name, " |");
      rule += "---:|";
    }
    table += " average |\n" + rule + "---:|\n";
    for (const Row& r : rows_) {
      table += absl::StrCat("| ", r.name, " |");
      for (const SuiteDomain& d : spec_.domains) table += absl::StrFormat(" %.4f |", r.bpb.at(d.name));
      table += absl::StrFormat(" %.4f |\n", r.average);
    }
    out["table"] = table;
    return out;
  }

  const SuiteSpec& spec_;
  std::function<void(const std::string&)> log_;
  std::unique_ptr<Anchor> anchor_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::map<std::string, EvalText> texts_;
  std::vector<Row> rows_;
  json routing_ = json::object();
};

}  // namespace

absl::StatusOr<SuiteSpec> SuiteSpec::FromJson(const json& j, const std::string& source) {
  SuiteSpec s;
  try {
    s.anchor = j.at("anchor").get<std::string>();
    for (const json& d : j.at("domains")) s.domains.push_back({d.at("name").get<std::string>(), d.at("heldout").get<std::string>()});
    s.public_domain = j.value("public_domain", s.public_domain);
    for (const json& o : j.at("owners")) {
      s.owners.push_back({o.at("name").get<std::string>(), o.at("domain").get<std::string>(), o.at("module").get<std::string>(),
                          o.value("random_init_module", ""), o.value("dense_module", ""), o.value("no_bias_module", "")});
    }
    s.top_k = j.value("top_k", s.top_k);
    s.seq_len = j.value("seq_len", s.seq_len);
    s.max_sequences = j.value("max_sequences", s.max_sequences);
    s.batch_size = j.value("batch_size", s.batch_size);
    s.btm_prefix = j.value("btm_prefix", s.btm_prefix);
    s.btm_tau = j.value("btm_tau", s.btm_tau);
    s.cache_dir = j.value("cache_dir", DefaultTokenCacheDir());
    s.threads = j.value("threads", s.threads);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
  if (s.domains.empty() || s.owners.empty() || s.top_k.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": needs at least one domain, one owner and one top_k"));
  }
  for (const SuiteOwner& o : s.owners) {
    bool found = false;
    for (const SuiteDomain& d : s.domains) found = found || d.name == o.domain;
    if (!found) return absl::InvalidArgumentError(absl::StrCat(source, ": owner ", o.name, " names domain '", o.domain, "', which is not listed"));
  }
  if (s.btm_tau <= 0 || s.btm_prefix < 0) return absl::InvalidArgumentError(absl::StrCat(source, ": btm_tau must be > 0, btm_prefix ≥ 0"));
  return s;
}

absl::StatusOr<json> RunSuite(const SuiteSpec& spec, const std::function<void(const std::string&)>& log) {
  SetCpuThreads(spec.threads);
  return Suite(spec, log).Run();
}

}  // namespace flexfed
