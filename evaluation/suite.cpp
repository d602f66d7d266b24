#include "evaluation/suite.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <random>

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
  std::string kind;  // anchor | two_expert | dense_expert | soup | btm | merged | ablation | opt_out
  std::map<std::string, double> bpb;
  std::map<std::string, SequenceTotals> totals;  // per domain, per sequence: what the intervals resample
  double average = 0;                            // over the single-domain domains
};

SequenceTotals Totals(const TokenScores& s) {
  const at::Tensor nll = s.nll.sum(1).contiguous(), bytes = s.bytes.sum(1).to(at::kDouble).contiguous();
  return {std::vector<double>(nll.data_ptr<double>(), nll.data_ptr<double>() + nll.numel()),
          std::vector<double>(bytes.data_ptr<double>(), bytes.data_ptr<double>() + bytes.numel())};
}

// A markdown table's first two lines.
std::string Header(const std::string& first, const std::vector<std::string>& columns) {
  std::string names = absl::StrCat("| ", first, " |"), rule = "|---|";
  for (const std::string& c : columns) {
    names += absl::StrCat(" ", c, " |");
    rule += "---:|";
  }
  return absl::StrCat(names, "\n", rule, "\n");
}

// The interval of |x| from that of x (0 at the low end when the interval holds 0).
Interval Magnitude(const Interval& i) {
  const bool spans_zero = i.low <= 0 && i.high >= 0;
  return {std::abs(i.estimate), spans_zero ? 0.0 : std::min(std::abs(i.low), std::abs(i.high)),
          std::max(std::abs(i.low), std::abs(i.high))};
}

std::string Percent(const Interval& i) {
  return absl::StrFormat("%+.1f%% [%+.1f, %+.1f]", 100 * i.estimate, 100 * i.low, 100 * i.high);
}

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

    const std::map<std::string, TokenScores> anchor_scores = Score("Public anchor", "anchor", anchor_->model);
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
    // Each owner's dense expert (`train --dense`: the anchor continued on the owner's data, its FFN
    // trained alone) — the paper's individual experts, and the members of its BTM.
    std::map<std::string, std::vector<TokenScores>> dense_scores;  // domain → public, then per owner
    bool all_dense = true;
    for (const SuiteOwner& o : spec_.owners) all_dense = all_dense && !o.dense_module.empty();
    if (all_dense) {
      for (const SuiteDomain& d : spec_.domains) dense_scores[d.name].push_back(anchor_scores.at(d.name));
      for (const SuiteOwner& o : spec_.owners) {
        absl::StatusOr<std::vector<LoadedExpert>> dense = Load({o.dense_module});
        if (!dense.ok()) return dense.status();
        absl::StatusOr<FlexOlmoModel> model = SoupModel(*anchor_, *dense);  // one expert: its FFN, dense
        if (!model.ok()) return model.status();
        for (auto& [domain, s] : Score(absl::StrCat("Dense expert: ", o.name), "dense_expert", *model)) {
          dense_scores[domain].push_back(std::move(s));
        }
      }
    }
    absl::StatusOr<FlexOlmoModel> soup = SoupModel(*anchor_, *modules);
    if (!soup.ok()) return soup.status();
    Score("Model soup (mean of the experts' FFNs)", "soup", *soup);
    if (all_dense) {
      Ensemble(absl::StrFormat("BTM (public + dense experts, top-%d, prefix %d)", spec_.btm_top_k, spec_.btm_prefix),
               dense_scores, spec_.btm_top_k);
    }
    Ensemble(absl::StrFormat("BTM of the two-expert models (prefix %d, tau %g)", spec_.btm_prefix, spec_.btm_tau),
             two_expert_scores, 0);

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
      if (!spec_.router_tuning.empty()) {  // the paper's optional router tuning (RT)
        MergeOptions tuned = options;
        tuned.router_tuning = spec_.router_tuning;
        absl::StatusOr<MergedModel> rt = MergeExperts(*anchor_, *modules, tuned);
        if (!rt.ok()) return rt.status();
        Score("FlexOlmo with router tuning", "merged_rt", rt->model);
      }
      // The paper's ablations are trainings: without the bias, with random router rows, dense.
      for (auto [field, label] : {std::pair{&SuiteOwner::no_bias_module, "FlexOlmo trained without the negative bias"},
                                  std::pair{&SuiteOwner::random_init_module, "FlexOlmo with random router init"},
                                  std::pair{&SuiteOwner::encoder_init_module, "FlexOlmo with sentence-encoder router init"},
                                  std::pair{&SuiteOwner::dense_module, "No coordination (dense experts merged)"}}) {
        std::vector<std::string> alt;
        for (const SuiteOwner& o : spec_.owners) {
          if (!(o.*field).empty()) alt.push_back(o.*field);
        }
        if (alt.empty()) continue;
        if (alt.size() != spec_.owners.size()) return absl::InvalidArgumentError(absl::StrCat(label, ": give it for every owner or none"));
        absl::StatusOr<std::vector<LoadedExpert>> loaded = Load(alt);
        if (!loaded.ok()) return loaded.status();
        absl::StatusOr<MergedModel> m = MergeExperts(*anchor_, *loaded, options);
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

  // Ablation and dense modules, each file hashed, validated and mapped once however many rows use
  // it (the dense experts are rows of their own and the "no coordination" merge).
  absl::StatusOr<std::vector<LoadedExpert>> Load(const std::vector<std::string>& paths) {
    std::vector<LoadedExpert> out;
    for (const std::string& p : paths) {
      auto it = loaded_.find(p);
      if (it == loaded_.end()) {
        absl::StatusOr<std::vector<LoadedExpert>> one = LoadExperts(*anchor_, {p});
        if (!one.ok()) return one.status();
        it = loaded_.emplace(p, std::move(one->front())).first;
      }
      out.push_back(it->second);
    }
    return out;
  }

  // A BTM row: per domain, the members' token scores mixed by their prefix likelihood (causal).
  void Ensemble(const std::string& name, const std::map<std::string, std::vector<TokenScores>>& members, int64_t top_k) {
    Row row{name, "btm", {}, {}};
    for (const SuiteDomain& d : spec_.domains) {
      const TokenScores mixed = EnsembleScores(members.at(d.name), spec_.btm_prefix, spec_.btm_tau, top_k);
      row.bpb[d.name] = Summarize(mixed).bits_per_byte;
      row.totals[d.name] = Totals(mixed);
    }
    AddRow(std::move(row));
  }

  std::map<std::string, TokenScores> Score(const std::string& name, const std::string& kind, const FlexOlmoModel& model,
                                           const Routing& routing = {}, json* routing_out = nullptr) {
    const auto start = std::chrono::steady_clock::now();
    Row row{name, kind, {}, {}};
    std::map<std::string, TokenScores> scores;
    for (const SuiteDomain& d : spec_.domains) {
      const EvalText& text = texts_.at(d.name);
      RoutingStats stats;
      TokenScores s = ScoreTokens(model, *text.packed, text.indices, spec_.batch_size, *tokenizer_, routing,
                                  routing_out != nullptr ? &stats : nullptr);
      row.bpb[d.name] = Summarize(s).bits_per_byte;
      row.totals[d.name] = Totals(s);
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
    for (const std::string& d : Single()) sum += row.bpb[d];
    row.average = sum / static_cast<double>(Single().size());
    rows_.push_back(std::move(row));
  }

  // The single-domain domains (what the average is over) and the mixed ones.
  std::vector<std::string> Single() const { return Names(false); }
  std::vector<std::string> Mixed() const { return Names(true); }
  std::vector<std::string> Names(bool mixed) const {
    std::vector<std::string> out;
    for (const SuiteDomain& d : spec_.domains) {
      if (d.mixed == mixed) out.push_back(d.name);
    }
    return out;
  }

  // A / B − 1 on these domains' mean bits per byte, with its paired bootstrap interval.
  Interval Compare(const Row& a, const Row& b, const std::vector<std::string>& domains) const {
    std::vector<SequenceTotals> ta, tb;
    for (const std::string& d : domains) {
      ta.push_back(a.totals.at(d));
      tb.push_back(b.totals.at(d));
    }
    return PairedBootstrap(ta, tb, spec_.bootstrap, spec_.bootstrap_seed);
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
    out["mixed_domains"] = Mixed();
    json rows = json::array();
    for (const Row& r : rows_) rows.push_back({{"name", r.name}, {"kind", r.kind}, {"bits_per_byte", r.bpb}, {"average", r.average}});
    out["rows"] = rows;
    out["routing"] = routing_;
    json experts = json::array({"public"});
    for (const SuiteOwner& o : spec_.owners) experts.push_back(o.name);
    out["experts"] = experts;
    out["settings"] = {{"seq_len", spec_.seq_len}, {"max_sequences", spec_.max_sequences}, {"btm_prefix", spec_.btm_prefix},
                       {"btm_tau", spec_.btm_tau}, {"btm_top_k", spec_.btm_top_k}, {"top_k", spec_.top_k},
                       {"bootstrap", spec_.bootstrap}, {"bootstrap_seed", spec_.bootstrap_seed}};

    // The paper's claims (issue #14), each with the relative difference it rests on and that
    // difference's 95% interval: "holds" on the point estimate, "confident" when the whole
    // interval is on the claimed side.
    json checks = json::array();
    auto check = [&](const std::string& claim, const Interval& i, double limit, bool below, const std::string& detail) {
      const bool holds = below ? i.estimate < limit : i.estimate > limit;
      const bool confident = below ? i.high < limit : i.low > limit;
      checks.push_back({{"claim", claim}, {"holds", holds}, {"confident", confident}, {"estimate", i.estimate},
                        {"low", i.low}, {"high", i.high}, {"detail", absl::StrCat(detail, ": ", Percent(i))}});
    };
    const Row& anchor = Find("Public anchor");
    const Row& merged = Find(main_row);
    const std::string& pub = spec_.public_domain;
    auto bpb = [](const Row& r, const std::string& d) { return absl::StrFormat("%.4f", r.bpb.at(d)); };
    for (const SuiteOwner& o : spec_.owners) {
      check(absl::StrFormat("merged beats the public model on %s", o.domain), Compare(merged, anchor, {o.domain}), 0, true,
            absl::StrCat(bpb(merged, o.domain), " vs ", bpb(anchor, o.domain)));
    }
    for (const std::string& d : Mixed()) {
      check(absl::StrFormat("merged beats the public model on %s", d), Compare(merged, anchor, {d}), 0, true,
            absl::StrCat(bpb(merged, d), " vs ", bpb(anchor, d)));
    }
    if (merged.bpb.count(pub)) {
      check("merged stays within 3% of the public model on public text", Compare(merged, anchor, {pub}), 0.03, true,
            absl::StrCat(bpb(merged, pub), " vs ", bpb(anchor, pub)));
    }
    // Against soup and against the paper's BTM when the dense experts are there (else ours).
    const Row* btm = nullptr;
    for (const Row& r : rows_) {
      if (r.kind == "btm" && btm == nullptr) btm = &r;
    }
    for (const Row* r : {&Find("Model soup (mean of the experts' FFNs)"), btm}) {
      if (r == nullptr) continue;
      check(absl::StrCat("merged beats ", r->kind == "soup" ? "model soup" : r->name, " on average"), Compare(merged, *r, Single()),
            0, true, absl::StrFormat("%.4f vs %.4f", merged.average, r->average));
    }
    for (const SuiteOwner& o : spec_.owners) {
      const Row& opted = Find(absl::StrFormat("FlexOlmo, %s opted out", o.name));
      check(absl::StrFormat("opting out %s returns %s to the public model's level (within 3%%)", o.name, o.domain),
            Magnitude(Compare(opted, anchor, {o.domain})), 0.03,
            true, absl::StrFormat("opted out %s, public model %s, merged %s; |difference| from the public model", bpb(opted, o.domain),
                                  bpb(anchor, o.domain), bpb(merged, o.domain)));
      // The other single domains: the one that moves most.
      Interval worst{-1, 0, 0};
      std::string worst_domain;
      for (const std::string& d : Single()) {
        if (d == o.domain) continue;
        const Interval a = Magnitude(Compare(opted, merged, {d}));
        if (a.estimate > worst.estimate) {
          worst = a;
          worst_domain = d;
        }
      }
      if (!worst_domain.empty()) {
        check(absl::StrFormat("opting out %s moves every other domain by at most 3%%", o.name), worst, 0.03, true,
              absl::StrFormat("largest: %s, %s → %s; |change|", worst_domain, bpb(merged, worst_domain), bpb(opted, worst_domain)));
      }
    }
    out["checks"] = checks;

    // Every row against the merged model: per domain and on average.
    json differences = json::array();
    std::vector<std::string> columns = Single();
    columns.push_back("average");
    for (const std::string& d : Mixed()) columns.push_back(d);
    std::string diff_table = Header(absl::StrCat(main_row, " vs"), columns);
    for (const Row& r : rows_) {
      if (&r == &merged) continue;
      json per = json::object();
      diff_table += absl::StrCat("| ", r.name, " |");
      for (const std::string& c : columns) {
        const Interval i = c == "average" ? Compare(merged, r, Single()) : Compare(merged, r, {c});
        per[c] = {{"estimate", i.estimate}, {"low", i.low}, {"high", i.high}};
        diff_table += absl::StrCat(" ", Percent(i), " |");
      }
      diff_table += "\n";
      differences.push_back({{"row", r.name}, {"merged_vs_row", per}});
    }
    out["differences"] = differences;
    out["differences_table"] = diff_table;

    std::string table = Header("model", columns);
    for (const Row& r : rows_) {
      table += absl::StrCat("| ", r.name, " |");
      for (const std::string& c : columns) table += absl::StrFormat(" %.4f |", c == "average" ? r.average : r.bpb.at(c));
      table += "\n";
    }
    out["table"] = table;

    // Routing of the merged model: per domain and layer, the share of tokens whose first choice is
    // each expert.
    std::vector<std::string> expert_names;
    for (const auto& e : experts) expert_names.push_back(e.get<std::string>());
    std::string routing_table = Header("domain, layer", expert_names);
    for (const SuiteDomain& d : spec_.domains) {
      if (!routing_.contains(d.name)) continue;
      const json& layers = routing_[d.name];
      for (size_t l = 0; l < layers.size(); ++l) {
        routing_table += absl::StrFormat("| %s, %d |", d.name, l);
        for (const auto& share : layers[l]) routing_table += absl::StrFormat(" %.0f%% |", 100 * share.get<double>());
        routing_table += "\n";
      }
    }
    out["routing_table"] = routing_table;
    return out;
  }

  const SuiteSpec& spec_;
  std::function<void(const std::string&)> log_;
  std::unique_ptr<Anchor> anchor_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::map<std::string, EvalText> texts_;
  std::vector<Row> rows_;
  std::map<std::string, LoadedExpert> loaded_;  // Load(): by path
  json routing_ = json::object();
};

}  // namespace

Interval PairedBootstrap(const std::vector<SequenceTotals>& a, const std::vector<SequenceTotals>& b, int64_t resamples,
                         uint64_t seed) {
  // Mean over domains of bits per byte, for sequence counts drawn `counts[d][s]` times each.
  auto mean_bpb = [](const std::vector<SequenceTotals>& t, const std::vector<std::vector<int>>* counts) {
    double sum = 0;
    for (size_t d = 0; d < t.size(); ++d) {
      double nll = 0, bytes = 0;
      for (size_t s = 0; s < t[d].nll.size(); ++s) {
        const double c = counts == nullptr ? 1.0 : (*counts)[d][s];
        nll += c * t[d].nll[s];
        bytes += c * t[d].bytes[s];
      }
      sum += bytes > 0 ? nll / bytes / std::log(2.0) : 0;
    }
    return sum / static_cast<double>(t.size());
  };
  Interval out;
  out.estimate = mean_bpb(a, nullptr) / mean_bpb(b, nullptr) - 1;
  if (resamples <= 0) {
    out.low = out.high = out.estimate;
    return out;
  }
  std::mt19937_64 rng(seed);
  std::vector<double> draws;
  draws.reserve(resamples);
  std::vector<std::vector<int>> counts(a.size());
  for (int64_t r = 0; r < resamples; ++r) {
    for (size_t d = 0; d < a.size(); ++d) {
      const size_t n = a[d].nll.size();
      counts[d].assign(n, 0);
      std::uniform_int_distribution<size_t> pick(0, n == 0 ? 0 : n - 1);
      for (size_t s = 0; s < n; ++s) ++counts[d][pick(rng)];
    }
    draws.push_back(mean_bpb(a, &counts) / mean_bpb(b, &counts) - 1);
  }
  std::sort(draws.begin(), draws.end());
  auto at = [&](double q) { return draws[std::min<size_t>(draws.size() - 1, static_cast<size_t>(q * (draws.size() - 1) + 0.5))]; };
  out.low = at(0.025);
  out.high = at(0.975);
  return out;
}

absl::StatusOr<SuiteSpec> SuiteSpec::FromJson(const json& j, const std::string& source) {
  SuiteSpec s;
  try {
    s.anchor = j.at("anchor").get<std::string>();
    for (const json& d : j.at("domains")) {
      s.domains.push_back({d.at("name").get<std::string>(), d.at("heldout").get<std::string>(), d.value("mixed", false)});
    }
    s.public_domain = j.value("public_domain", s.public_domain);
    for (const json& o : j.at("owners")) {
      s.owners.push_back({o.at("name").get<std::string>(), o.at("domain").get<std::string>(), o.at("module").get<std::string>(),
                          o.value("random_init_module", ""), o.value("dense_module", ""), o.value("no_bias_module", ""),
                          o.value("encoder_init_module", "")});
    }
    s.top_k = j.value("top_k", s.top_k);
    s.router_tuning = j.value("router_tuning", s.router_tuning);
    s.seq_len = j.value("seq_len", s.seq_len);
    s.max_sequences = j.value("max_sequences", s.max_sequences);
    s.batch_size = j.value("batch_size", s.batch_size);
    s.btm_prefix = j.value("btm_prefix", s.btm_prefix);
    s.btm_tau = j.value("btm_tau", s.btm_tau);
    s.btm_top_k = j.value("btm_top_k", s.btm_top_k);
    s.bootstrap = j.value("bootstrap", s.bootstrap);
    s.bootstrap_seed = j.value("bootstrap_seed", s.bootstrap_seed);
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
  if (s.btm_tau <= 0 || s.btm_prefix < 0 || s.btm_top_k < 0 || s.bootstrap < 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": btm_tau must be > 0; btm_prefix, btm_top_k and bootstrap ≥ 0"));
  }
  bool single = false;
  for (const SuiteDomain& d : s.domains) single = single || !d.mixed;
  if (!single) return absl::InvalidArgumentError(absl::StrCat(source, ": needs at least one domain that is not mixed"));
  for (const SuiteOwner& o : s.owners) {
    for (const SuiteDomain& d : s.domains) {
      if (d.name == o.domain && d.mixed) return absl::InvalidArgumentError(absl::StrCat(source, ": owner ", o.name, "'s domain '", d.name, "' is mixed; an owner's domain is a single one"));
    }
  }
  return s;
}

absl::StatusOr<json> RunSuite(const SuiteSpec& spec, const std::function<void(const std::string&)>& log) {
  SetCpuThreads(spec.threads);
  return Suite(spec, log).Run();
}

}  // namespace flexfed
