#include "ctl/inference_commands.h"

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/train/loss.h"
#include "common/core/file_util.h"
#include "common/model/generation.h"
#include "common/core/identity.h"
#include "common/merge/merge.h"
#include "common/model/model.h"
#include "common/model/tokenizer.h"
#include "ctl/hf_exactness.h"
#include <nlohmann/json.hpp>

namespace flexfed::cli {

void ExitOnError(const std::string& command, const absl::Status& s) {
  if (s.ok()) return;
  std::cerr << "flexfedctl " << command << ": error: " << s.message() << "\n";
  std::exit(1);
}

namespace {

using nlohmann::json;

// A model and its tokenizer, with the routing a command's --allow/--exclude asked for.
struct LoadedModel {
  std::optional<FlexOlmoModel> model;
  std::unique_ptr<Tokenizer> tokenizer;
  Routing routing;
};

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir, const std::vector<int64_t>& exclude,
                                      const std::vector<int64_t>& allow) {
  LoadedModel m;
  absl::StatusOr<FlexOlmoModel> model = FlexOlmoModel::Load(dir);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(dir, model->config().vocab_size);
  if (!tok.ok()) return tok.status();
  absl::StatusOr<Routing> routing = Routing::FromLists(model->config().num_experts, exclude, allow);
  if (!routing.ok()) return routing.status();
  m.model = *std::move(model);
  m.tokenizer = *std::move(tok);
  m.routing = *std::move(routing);
  return m;
}

struct ExpertSet {
  std::vector<int64_t> exclude, allow;
  void AddOptions(CLI::App* cmd) {
    auto* ex = cmd->add_option("--exclude", exclude, "Experts (router indices; 0 = public) to opt out of for this call");
    cmd->add_option("--allow", allow, "Only these experts (router indices) for this call")->excludes(ex);
  }
};

// "name=path" → {name, path}; a bare path is named after itself.
std::pair<std::string, std::string> NamedPath(const std::string& arg) {
  const size_t eq = arg.find('=');
  if (eq == std::string::npos) return {arg, arg};
  return {arg.substr(0, eq), arg.substr(eq + 1)};
}

// ------------------------------------------------------------------------------------- merge

struct MergeArgs {
  std::string anchor, out;
  std::vector<std::string> modules;
  std::string router_tuning;
  int64_t top_k = 0;
  bool no_bias = false, soup = false;
  uint64_t max_shard_mib = kDefaultMaxShardBytes >> 20;
  int threads = 0;
  HeldOutText held_out{{}, 256, 32, DefaultTokenCacheDir()};
};

absl::Status RunMerge(const MergeArgs& a) {
  SetCpuThreads(a.threads);
  if (a.soup) {
    absl::StatusOr<Anchor> anchor = LoadAnchor(a.anchor);
    if (!anchor.ok()) return anchor.status();
    absl::StatusOr<std::vector<LoadedExpert>> experts = LoadExperts(*anchor, a.modules);
    if (!experts.ok()) return experts.status();
    absl::StatusOr<FlexOlmoModel> soup = SoupModel(*anchor, *experts);
    if (!soup.ok()) return soup.status();
    if (absl::Status s = WriteModelDirectory(*soup, a.anchor, a.out, a.max_shard_mib << 20, {}); !s.ok()) return s;
    std::cout << absl::StrFormat("wrote the model soup of %d experts (a dense %s model) to %s\n", a.modules.size(),
                                 soup->config().model_type, a.out);
    return absl::OkStatus();
  }
  MergeOptions options;
  options.top_k = a.top_k;
  options.with_router_bias = !a.no_bias;
  options.router_tuning = a.router_tuning;
  options.max_shard_bytes = a.max_shard_mib << 20;
  absl::StatusOr<MergedModel> merged = MergeToCheckpoint(a.anchor, a.modules, options, a.out);
  if (!merged.ok()) return merged.status();
  std::cout << absl::StrFormat("merged %d experts (public + %d) into %s, k = %d%s\n", merged->model.config().num_experts,
                               merged->experts.size(), a.out, merged->model.config().num_experts_per_tok,
                               merged->model.layers()[0].router_bias.defined() ? ", negative biases in the extras file" : "");
  for (size_t i = 0; i < merged->experts.size(); ++i) {
    const MergedExpert& e = merged->experts[i];
    std::cout << absl::StrFormat("  expert %d: %s/%s  %s  %s\n", i + 1, e.metadata.owner, e.metadata.expert_name,
                                 e.sha256.substr(0, 12), e.metadata.domain);
  }
  if (!a.router_tuning.empty()) {
    std::cout << "  routers: tuned (" << a.router_tuning << "); opting an expert out drops its row, but the others were tuned with it\n";
  }
  absl::StatusOr<std::string> exactness = HfExactnessLine(merged->model, a.out, a.held_out);
  if (!exactness.ok()) return exactness.status();
  std::cout << *exactness << "\n";
  return absl::OkStatus();
}

// -------------------------------------------------------------------------------------- eval

struct EvalArgs {
  std::string model;
  std::vector<std::string> data;  // name=path or path
  ExpertSet experts;
  int64_t seq_len = 256, batch_size = 8, max_sequences = 0;
  std::string cache_dir = DefaultTokenCacheDir(), text_field = "text";
  int threads = 0;
  bool json = false;
};

absl::Status RunEval(const EvalArgs& a) {
  SetCpuThreads(a.threads);
  absl::StatusOr<LoadedModel> m = LoadModel(a.model, a.experts.exclude, a.experts.allow);
  if (!m.ok()) return m.status();
  if (a.seq_len > m->model->config().max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrFormat("--seq-len %d exceeds the model's %d positions", a.seq_len,
                                                      m->model->config().max_position_embeddings));
  }
  json rows = json::array();
  if (!a.json) std::cout << absl::StrFormat("%-16s %10s %10s %10s\n", "DATA", "LOSS", "BPB", "TOKENS");
  for (const std::string& arg : a.data) {
    auto [name, path] = NamedPath(arg);
    absl::StatusOr<EvalText> text = LoadEvalText({path}, *m->tokenizer, a.seq_len, a.max_sequences, a.cache_dir, a.text_field);
    if (!text.ok()) return absl::Status(text.status().code(), absl::StrCat(path, ": ", text.status().message()));
    EvalResult r = Evaluate(*m->model, *text->packed, text->indices, a.batch_size, *m->tokenizer, m->routing);
    rows.push_back({{"data", name}, {"path", path}, {"loss", r.loss}, {"bits_per_byte", r.bits_per_byte}, {"tokens", r.tokens},
                    {"bytes", r.bytes}});
    if (!a.json) std::cout << absl::StrFormat("%-16s %10.4f %10.4f %10d\n", name, r.loss, r.bits_per_byte, r.tokens);
  }
  if (a.json) std::cout << json({{"model", a.model}, {"results", rows}}).dump() << "\n";
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------- generate

struct GenerateArgs {
  std::string model, prompt, prompt_file;
  ExpertSet experts;
  GenerateOptions options;
  int threads = 0;
  bool json = false;
};

// Writes the part of `text` from `*printed` that ends on a complete UTF-8 character.
void StreamText(const std::string& text, size_t* printed) {
  size_t end = text.size();
  // Hold back a trailing incomplete UTF-8 sequence (at most 3 bytes) until it completes.
  for (size_t back = 1; back <= 3 && back <= end - *printed; ++back) {
    const unsigned char c = static_cast<unsigned char>(text[end - back]);
    if ((c & 0xC0) != 0x80) {
      const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
      if (need > back) end -= back;
      break;
    }
  }
  if (end > *printed) {
    std::cout.write(text.data() + *printed, static_cast<std::streamsize>(end - *printed));
    std::cout.flush();
    *printed = end;
  }
}

absl::Status RunGenerate(const GenerateArgs& a) {
  SetCpuThreads(a.threads);
  std::string prompt = a.prompt;
  if (!a.prompt_file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(a.prompt_file);
    if (!text.ok()) return text.status();
    prompt = *text;
  }
  if (prompt.empty()) return absl::InvalidArgumentError("give a prompt: --prompt TEXT or --prompt-file FILE");
  absl::StatusOr<LoadedModel> m = LoadModel(a.model, a.experts.exclude, a.experts.allow);
  if (!m.ok()) return m.status();
  std::vector<int32_t> ids = m->tokenizer->Encode(prompt);
  std::vector<int32_t> generated;
  size_t printed = 0;
  if (!a.json) std::cout << prompt << std::flush;
  absl::StatusOr<GenerateResult> r = Generate(*m->model, *m->tokenizer, ids, a.options, m->routing, [&](int32_t token) {
    generated.push_back(token);
    if (!a.json) StreamText(m->tokenizer->Decode(generated), &printed);
  });
  if (!r.ok()) return r.status();
  const double tps = r->seconds > 0 ? static_cast<double>(r->tokens.size()) / r->seconds : 0.0;
  if (a.json) {
    std::cout << json({{"prompt", prompt},
                       {"text", m->tokenizer->Decode(r->tokens)},
                       {"tokens", r->tokens},
                       {"stopped_at_eos", r->stopped_at_eos},
                       {"tokens_per_second", tps}})
                     .dump()
              << "\n";
  } else {
    std::cout << m->tokenizer->Decode(generated).substr(printed) << "\n";
    std::cerr << absl::StrFormat("[%d tokens, %.1f tokens/s%s]\n", r->tokens.size(), tps, r->stopped_at_eos ? ", stopped at EOS" : "");
  }
  return absl::OkStatus();
}

// ----------------------------------------------------------------------------------- routing

struct RoutingArgs {
  std::string model, text, text_file;
  std::vector<std::string> domains;  // name=path
  ExpertSet experts;
  int64_t seq_len = 256, max_sequences = 32;
  std::string cache_dir = DefaultTokenCacheDir(), text_field = "text";
  int threads = 0;
  bool json = false;
};

std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20) out += absl::StrFormat("\\x%02x", c);
    else out += static_cast<char>(c);
  }
  return out;
}

absl::Status RunRouting(const RoutingArgs& a) {
  SetCpuThreads(a.threads);
  absl::StatusOr<LoadedModel> m = LoadModel(a.model, a.experts.exclude, a.experts.allow);
  if (!m.ok()) return m.status();
  const ModelConfig& c = m->model->config();
  if (!c.is_moe()) return absl::InvalidArgumentError(absl::StrCat(a.model, " is a dense model: every token goes to its one FFN"));
  const int64_t layers = c.num_hidden_layers, experts = c.num_experts;

  if (!a.domains.empty()) {  // per-domain fractions per layer
    json out = json::object();
    for (const std::string& arg : a.domains) {
      auto [name, path] = NamedPath(arg);
      absl::StatusOr<EvalText> text = LoadEvalText({path}, *m->tokenizer, a.seq_len, a.max_sequences, a.cache_dir, a.text_field);
      if (!text.ok()) return absl::Status(text.status().code(), absl::StrCat(path, ": ", text.status().message()));
      RoutingStats stats;
      ScoreTokens(*m->model, *text->packed, text->indices, 8, *m->tokenizer, m->routing, &stats);
      json top1 = json::array(), selected = json::array();
      for (int64_t l = 0; l < layers; ++l) {
        json t1 = json::array(), sel = json::array();
        for (int64_t e = 0; e < experts; ++e) {
          t1.push_back(static_cast<double>(stats.top1[l][e]) / static_cast<double>(stats.tokens));
          sel.push_back(static_cast<double>(stats.selected[l][e]) / static_cast<double>(stats.tokens));
        }
        top1.push_back(t1);
        selected.push_back(sel);
      }
      out[name] = {{"tokens", stats.tokens}, {"top1_fraction", top1}, {"selected_fraction", selected}};
    }
    if (a.json) {
      std::cout << out.dump() << "\n";
      return absl::OkStatus();
    }
    std::cout << "Share of tokens whose highest-weighted expert is e, per layer (expert 0 = public):\n";
    std::string head = absl::StrFormat("%-14s %5s", "DATA", "LAYER");
    for (int64_t e = 0; e < experts; ++e) head += absl::StrFormat(" %7s", absl::StrCat("e", e));
    std::cout << head << "\n";
    for (const auto& [name, d] : out.items()) {
      for (int64_t l = 0; l < layers; ++l) {
        std::string line = absl::StrFormat("%-14s %5d", name, l);
        for (int64_t e = 0; e < experts; ++e) line += absl::StrFormat(" %6.1f%%", 100.0 * d["top1_fraction"][l][e].get<double>());
        std::cout << line << "\n";
      }
    }
    return absl::OkStatus();
  }

  std::string text = a.text;
  if (!a.text_file.empty()) {
    absl::StatusOr<std::string> t = ReadFile(a.text_file);
    if (!t.ok()) return t.status();
    text = *t;
  }
  if (text.empty()) return absl::InvalidArgumentError("give --text, --text-file, or --domain NAME=FILE to route");
  std::vector<int32_t> ids = m->tokenizer->Encode(text);
  if (static_cast<int64_t>(ids.size()) > c.max_position_embeddings) ids.resize(c.max_position_embeddings);
  c10::InferenceMode inference;
  ForwardTrace trace;
  m->model->Forward(at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).unsqueeze(0), m->routing, nullptr, &trace);
  json tokens = json::array();
  for (size_t i = 0; i < ids.size(); ++i) {
    json per_layer = json::array();
    for (int64_t l = 0; l < layers; ++l) {
      at::Tensor probs = at::softmax(trace.router_logits[l][i], -1);
      at::Tensor chosen = trace.expert_indices[l][i];
      json sel = json::array();
      for (int64_t j = 0; j < chosen.size(0); ++j) {
        const int64_t e = chosen[j].item<int64_t>();
        sel.push_back({{"expert", e}, {"weight", probs[e].item<double>()}});
      }
      per_layer.push_back(sel);
    }
    tokens.push_back({{"id", ids[i]}, {"text", m->tokenizer->Decode({ids[i]})}, {"layers", per_layer}});
  }
  if (a.json) {
    std::cout << json({{"model", a.model}, {"tokens", tokens}}).dump() << "\n";
    return absl::OkStatus();
  }
  std::string head = absl::StrFormat("%-6s %-8s", "POS", "TOKEN");
  for (int64_t l = 0; l < layers; ++l) head += absl::StrFormat(" %-14s", absl::StrCat("layer ", l));
  std::cout << head << "   (expert:weight of the chosen experts, highest first)\n";
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string line = absl::StrFormat("%-6d %-8s", i, absl::StrCat("'", Printable(tokens[i]["text"].get<std::string>()), "'"));
    for (int64_t l = 0; l < layers; ++l) {
      std::string cell;
      for (const json& s : tokens[i]["layers"][l]) {
        if (!cell.empty()) cell += " ";
        cell += absl::StrFormat("%d:%.2f", s["expert"].get<int64_t>(), s["weight"].get<double>());
      }
      line += absl::StrFormat(" %-14s", cell);
    }
    std::cout << line << "\n";
  }
  return absl::OkStatus();
}

}  // namespace

void AddInferenceCommands(CLI::App& app) {
  {
    auto a = std::make_shared<MergeArgs>();
    CLI::App* cmd = app.add_subcommand("merge", "Merge the anchor and expert modules into an HF flex_olmo checkpoint (locally)");
    cmd->add_option("modules", a->modules, "Expert modules (.safetensors), in router order (expert 1, 2, ...)")->required()
        ->check(CLI::ExistingFile);
    cmd->add_option("--anchor", a->anchor, "The anchor the modules were trained against")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--out,-o", a->out, "Output directory (must not exist)")->required();
    cmd->add_option("--k", a->top_k, "Experts per token (num_experts_per_tok); default: every expert")->check(CLI::NonNegativeNumber);
    cmd->add_flag("--no-bias", a->no_bias, "Leave the owners' negative router biases out (ablation)");
    cmd->add_option("--router-tuning", a->router_tuning,
                    "Routers tuned for exactly these modules (`router-tune`'s RUN/router_tuning.safetensors)")
        ->check(CLI::ExistingFile);
    cmd->add_flag("--soup", a->soup, "Write the model soup instead: one dense FFN, the mean of the modules' (baseline)");
    cmd->add_option("--max-shard-mib", a->max_shard_mib, "Shard the safetensors past this size")->check(CLI::PositiveNumber);
    AddHeldOutOptions(cmd, &a->held_out);
    cmd->add_option("--threads", a->threads, "CPU threads (default: all cores)");
    cmd->callback([a] { ExitOnError("merge", RunMerge(*a)); });
  }
  {
    auto a = std::make_shared<EvalArgs>();
    CLI::App* cmd = app.add_subcommand("eval", "Loss and bits per byte of a model on text sets, with per-call expert opt-out");
    cmd->add_option("model", a->model, "Model directory (merged release, anchor, any checkpoint)")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--data", a->data, "Text to score: FILE or NAME=FILE (text, .jsonl or folder); repeat for a table")->required();
    a->experts.AddOptions(cmd);
    cmd->add_option("--seq-len", a->seq_len, "Tokens per sequence")->check(CLI::PositiveNumber);
    cmd->add_option("--batch-size", a->batch_size, "Sequences per batch")->check(CLI::PositiveNumber);
    cmd->add_option("--max-sequences", a->max_sequences, "At most this many sequences per text set (0 = all)");
    cmd->add_option("--text-field", a->text_field, "JSONL field holding the text");
    cmd->add_option("--cache-dir", a->cache_dir, "Token cache folder");
    cmd->add_option("--threads", a->threads, "CPU threads (default: all cores)");
    cmd->add_flag("--json", a->json, "Print JSON");
    cmd->callback([a] { ExitOnError("eval", RunEval(*a)); });
  }
  {
    auto a = std::make_shared<GenerateArgs>();
    CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt, streaming tokens as they come (KV cache)");
    cmd->add_option("model", a->model, "Model directory")->required()->check(CLI::ExistingDirectory);
    auto* p = cmd->add_option("--prompt", a->prompt, "Prompt text");
    cmd->add_option("--prompt-file", a->prompt_file, "Read the prompt from a file")->check(CLI::ExistingFile)->excludes(p);
    a->experts.AddOptions(cmd);
    cmd->add_option("--max-new-tokens", a->options.max_new_tokens, "Tokens to generate at most")->check(CLI::PositiveNumber);
    cmd->add_option("--temperature", a->options.temperature, "Sampling temperature (0 = greedy, the default)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--top-k", a->options.top_k, "Sample among the k most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--top-p", a->options.top_p, "Nucleus sampling: the smallest set with this probability (1 = off)");
    cmd->add_option("--seed", a->options.seed, "Sampling seed (same seed, same text)");
    cmd->add_flag("!--no-stop", a->options.stop_at_eos, "Keep going past the end-of-text token");
    cmd->add_option("--threads", a->threads, "CPU threads (default: all cores)");
    cmd->add_flag("--json", a->json, "Print JSON (the text, token ids, speed) at the end instead of streaming");
    cmd->callback([a] { ExitOnError("generate", RunGenerate(*a)); });
  }
  {
    auto a = std::make_shared<RoutingArgs>();
    CLI::App* cmd = app.add_subcommand("routing", "Routing analysis: the experts each token goes to per layer, or per-domain routing fractions");
    cmd->add_option("model", a->model, "A MoE model directory (e.g. an exported release)")->required()->check(CLI::ExistingDirectory);
    auto* t = cmd->add_option("--text", a->text, "Text to route token by token");
    auto* f = cmd->add_option("--text-file", a->text_file, "File to route token by token")->check(CLI::ExistingFile)->excludes(t);
    cmd->add_option("--domain", a->domains, "NAME=FILE: per-layer share of each expert on this text (repeat per domain)")
        ->excludes(t)->excludes(f);
    a->experts.AddOptions(cmd);
    cmd->add_option("--seq-len", a->seq_len, "--domain: tokens per sequence")->check(CLI::PositiveNumber);
    cmd->add_option("--max-sequences", a->max_sequences, "--domain: sequences per domain (0 = all)");
    cmd->add_option("--text-field", a->text_field, "JSONL field holding the text");
    cmd->add_option("--cache-dir", a->cache_dir, "Token cache folder");
    cmd->add_option("--threads", a->threads, "CPU threads (default: all cores)");
    cmd->add_flag("--json", a->json, "Print JSON");
    cmd->callback([a] { ExitOnError("routing", RunRouting(*a)); });
  }
}

}  // namespace flexfed::cli
