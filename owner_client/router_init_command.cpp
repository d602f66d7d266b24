#include <filesystem>
#include <iostream>

#include "common/model/anchor.h"
#include "common/train/router_init.h"
#include "common/model/tokenizer.h"
#include "owner_client/commands.h"

namespace flexfed::owner {
namespace {

struct Options {
  std::string anchor, out, cache_dir = DefaultTokenCacheDir(), text_field = "text";
  std::vector<std::string> data, public_data;
  RouterInitOptions init;
  int threads = 0;
  bool public_row = false;
};

absl::Status Run(const Options& o) {
  SetCpuThreads(o.threads);
  // r_pub itself is made with this command before the anchor has one: do not require it.
  absl::StatusOr<Anchor> anchor = LoadAnchor(o.anchor, /*require_router_pub=*/false);
  if (!anchor.ok()) return anchor.status();
  std::optional<TokenCorpus> corpus, public_corpus;
  RouterInitOptions init = o.init;
  if (!o.public_data.empty() && (o.init.mode == "random" || o.public_row)) {
    return absl::InvalidArgumentError("--public-data calibrates an owner's bias (anchor or vectors mode); leave it out with --public or --mode random");
  }
  if (o.init.mode == "anchor" || !o.public_data.empty()) {
    if (o.init.mode == "anchor" && o.data.empty()) return absl::InvalidArgumentError("anchor mode samples your documents: pass --data FILE_OR_FOLDER");
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = TokenizerForModel(o.anchor, anchor->model.config().vocab_size);
    if (!tok.ok()) return tok.status();
    CorpusOptions copts;
    copts.text_field = o.text_field;
    if (!o.data.empty()) {
      absl::StatusOr<TokenCorpus> c = TokenCorpus::Build(o.data, **tok, copts, o.cache_dir);
      if (!c.ok()) return c.status();
      corpus = *std::move(c);
    }
    if (!o.public_data.empty()) {
      absl::StatusOr<TokenCorpus> p = TokenCorpus::Build(o.public_data, **tok, copts, o.cache_dir);
      if (!p.ok()) return p.status();
      public_corpus = *std::move(p);
      init.public_corpus = &*public_corpus;
    }
  }
  const RouterEmbedding* router_pub = nullptr;
  if (o.init.mode == "vectors" && !o.public_data.empty()) {
    router_pub = &anchor->router_pub;  // the bias is calibrated on the gap to the public expert
  } else if (o.init.mode == "anchor" && !o.public_row) {
    if (anchor->router_pub.centers.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          o.anchor, ": has no router_pub.safetensors with centers, which anchor-mode rows are measured from; pull the "
                    "published anchor (operators make r_pub with `router-init --public` on the public data)"));
    }
    router_pub = &anchor->router_pub;
  }
  ProgressReporter progress;
  absl::StatusOr<RouterEmbedding> e = InitRouterEmbedding(anchor->model, corpus ? &*corpus : nullptr, init, &progress, router_pub);
  if (!e.ok()) return e.status();
  e->metadata["anchor_sha256"] = anchor->id;
  if (absl::Status s = WriteRouterEmbedding(o.out, *e); !s.ok()) return s;
  std::cout << "wrote router embedding (" << o.init.mode << ", " << e->rows.size() << " layers × "
            << anchor->model.config().hidden_size << ") to " << o.out << "\n";
  return absl::OkStatus();
}

}  // namespace

void AddRouterInitCommand(CLI::App& app) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("router-init", "Compute your expert's router embedding (r_i) from a sample of your documents");
  cmd->add_option("--anchor", o->anchor, "Anchor directory (from `pull`)")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--data", o->data, "Your documents: text files, .jsonl files or folders");
  cmd->add_option("--out,-o", o->out, "Output safetensors file")->required();
  cmd->add_option("--mode", o->init.mode, "anchor (mean hidden states of the anchor, default), vectors, random (ablation)")
      ->check(CLI::IsMember({"anchor", "vectors", "random"}));
  cmd->add_option("--vectors", o->init.vectors, "vectors mode: .npy or .safetensors of shape [H] or [layers, H]")
      ->check(CLI::ExistingFile);
  cmd->add_option("--samples", o->init.samples, "Documents to sample (anchor mode)")->check(CLI::PositiveNumber);
  cmd->add_option("--max-tokens", o->init.max_tokens, "Tokens used per document (anchor mode)")->check(CLI::PositiveNumber);
  cmd->add_option("--margin", o->init.margin, "anchor mode: router logit margin between your data and the public data")->check(CLI::PositiveNumber);
  cmd->add_option("--boundary", o->init.boundary, "anchor mode: where routing flips, 0 = at the public mean, 1 = at yours")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", o->init.seed, "Sampling seed");
  cmd->add_option("--text-field", o->text_field, "JSONL field holding the text");
  cmd->add_option("--cache-dir", o->cache_dir, "Token cache folder");
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  cmd->add_option("--public-data", o->public_data,
                  "anchor or vectors mode: public text (files, .jsonl or folders) to calibrate the negative bias on: a --public-share "
                  "of its tokens go to your expert at the start (instead of --boundary)");
  cmd->add_option("--public-share", o->init.public_share, "With --public-data: the share of public tokens routed to your expert")
      ->check(CLI::Range(1e-4, 0.5));
  cmd->add_flag("--public", o->public_row, "Operators: make the anchor's own r_pub (and centers) from the public data");
  cmd->callback([o] { ExitOnError("router-init", Run(*o)); });
}

}  // namespace flexfed::owner
