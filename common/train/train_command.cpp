#include <atomic>
#include <csignal>
#include <filesystem>
#include <functional>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/core/file_util.h"
#include "common/core/processes.h"
#include "common/train/train_command.h"
#include "common/train/distributed.h"
#include "common/core/dp_accountant.h"
#include "common/train/training.h"

namespace flexfed {
namespace {

namespace fs = std::filesystem;

struct Options {
  TrainCommandKind kind = TrainCommandKind::kOwner;
  TrainConfig flags;  // values given on the command line
  std::string config_file;
  TrainInputs inputs{"", "", "", DefaultTokenCacheDir()};
  bool resume = false, dense = false, plain = false, memory_report = false, json = false;
  double memory_limit_gib = 0;  // --memory-limit: 0 = the device's free memory
  std::string pretrain;
  std::string program;  // "flexfed-owner train", "flexfedctl router-tune"
  WorkerLaunch launch;  // --nproc-per-node and friends: this process starts the data-parallel workers
  // Options the user actually gave, and how each one sets its field.
  std::vector<std::pair<CLI::Option*, std::function<void(TrainConfig&, const TrainConfig&)>>> setters;
};

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

absl::Status Run(Options& o) {
  // Data-parallel: a launcher starts the workers and waits; a worker finds its rank in the environment.
  absl::StatusOr<std::optional<DistributedSettings>> distributed = DistributedSettings::FromEnvironment();
  if (!distributed.ok()) return distributed.status();
  if (!*distributed && !o.memory_report && (o.launch.nproc_per_node > 1 || o.launch.nnodes > 1)) {
    std::string failure;
    const int code = RunWorkers(o.launch, &failure);
    if (code == 1) return absl::AbortedError(failure);
    if (code != 0) std::exit(code);  // stopped by a signal: the workers saved a checkpoint and said how to resume
    return absl::OkStatus();
  }
  // Settings: defaults, then the run's own (on --resume) or --config, then explicit flags.
  TrainConfig config;
  if (o.kind == TrainCommandKind::kRouterTuning) {  // the paper's router tuning: lr 2e-3, the release's k
    config.mode = "router";
    config.lr = 2e-3;
    config.top_k = 0;
  }
  std::string source;
  if (!o.config_file.empty()) {
    source = o.config_file;
  } else if (o.resume) {
    source = (fs::path(o.inputs.run_dir) / "train_config.json").string();
  }
  if (!source.empty()) {
    absl::StatusOr<nlohmann::json> j = ReadJson(source);
    if (!j.ok()) return j.status();
    const nlohmann::json& settings = j->contains("cadence") ? (*j)["cadence"] : *j;  // a run folder echo, or a settings file
    if (o.resume && o.config_file.empty()) {
      // The run knows its own anchor, router embedding and modules.
      if (o.inputs.anchor_dir.empty()) o.inputs.anchor_dir = j->value("anchor_dir", "");
      if (o.inputs.router_init.empty()) o.inputs.router_init = j->value("router_init", "");
      if (o.inputs.modules.empty()) o.inputs.modules = j->value("modules", std::vector<std::string>{});
    }
    absl::StatusOr<TrainConfig> c = TrainConfig::FromJson(settings, source);
    if (!c.ok()) return c.status();
    config = *c;
  }
  for (auto& [opt, set] : o.setters) {
    if (opt->count() > 0) set(config, o.flags);
  }
  if (o.kind == TrainCommandKind::kRouterTuning) config.mode = "router";
  if (o.dense) config.mode = "dense";
  if (!o.pretrain.empty()) {
    config.mode = "pretrain";
    config.preset = o.pretrain;
  }
  if (config.mode != "pretrain" && o.inputs.anchor_dir.empty()) {
    return absl::InvalidArgumentError(o.kind == TrainCommandKind::kRouterTuning ? "--anchor DIR is required: the anchor the modules were trained against"
                                                                                : "--anchor DIR is required (except with --pretrain)");
  }
  // The memory plan: printed on request; a run that cannot fit is refused before anything is allocated.
  int64_t planned_bytes = 0;
  {
    const int world = *distributed ? (*distributed)->world_size : o.launch.nproc_per_node * o.launch.nnodes;
    const int local = *distributed ? (*distributed)->local_world_size : o.launch.nproc_per_node;
    absl::StatusOr<MemoryPlan> plan = PlanRunMemory(config, o.inputs, world);
    if (!plan.ok()) return plan.status();
    absl::StatusOr<std::pair<int64_t, std::string>> capacity =
        TrainingMemoryCapacity(config, local, *distributed ? (*distributed)->local_rank : 0);
    if (!capacity.ok()) return capacity.status();
    const double gib = 1073741824.0;
    if (o.memory_limit_gib > 0) {  // --memory-limit: plan against the smaller of it and the device's
      const auto limit = static_cast<int64_t>(o.memory_limit_gib * gib);
      if (limit < capacity->first) {
        *capacity = {limit, absl::StrCat("--memory-limit (", capacity->second, ": ", FormatMemory(capacity->first), ")")};
      }
    }
    planned_bytes = plan->total();
    const bool fits = plan->total() <= capacity->first;
    absl::StatusOr<MemoryFits> fitting = fits ? MemoryFits{} : FittingSettings(config, o.inputs, world, capacity->first);
    if (!fitting.ok()) return fitting.status();
    // What to change, as one line: the settings that fit (same sequences per step), else the least any needs.
    std::vector<std::string> options;
    for (const MemoryFit& f : fitting->fits) options.push_back(absl::StrCat(f.args, " (", FormatMemory(f.total_bytes), ")"));
    const std::string advice =
        fits ? std::string()
        : !options.empty()
            ? absl::StrCat("these fit, training on the same sequences per step: ", absl::StrJoin(options, "; or "))
            : absl::StrCat(fitting->smallest.args.empty()
                               ? std::string("a smaller micro-batch, checkpointing or bf16 moments cannot shrink it")
                               : absl::StrCat("even with ", fitting->smallest.args, " it needs ",
                                              FormatMemory(fitting->smallest.total_bytes)),
                           ": lower --seq-len, shard the optimizer state over more processes (--nproc-per-node) or use "
                           "a device with more memory");
    if (o.memory_report && o.json) {
      nlohmann::json j = plan->ToJson();
      j["processes"] = world;
      j["available_bytes"] = capacity->first;
      j["available"] = capacity->second;
      j["fits"] = fits;
      if (!fits) {
        j["fitting"] = nlohmann::json::array();
        for (const MemoryFit& f : fitting->fits) j["fitting"].push_back({{"args", f.args}, {"total_bytes", f.total_bytes}});
        if (fitting->fits.empty()) j["smallest"] = {{"args", fitting->smallest.args}, {"total_bytes", fitting->smallest.total_bytes}};
      }
      std::cout << j.dump(2) << "\n";
      return absl::OkStatus();
    }
    if (o.memory_report) {
      std::cout << "memory plan (per process" << (world > 1 ? absl::StrCat(", ", world, " processes") : "") << "):\n"
                << plan->Table()
                << absl::StrFormat("  %-22s %9.2f GiB  %s\n", "available", capacity->first / gib, capacity->second)
                << (fits ? "fits\n" : absl::StrCat("does not fit; ", advice, "\n"));
      return absl::OkStatus();
    }
    if (!fits) {
      std::cerr << "memory plan:\n" << plan->Table();
      return absl::ResourceExhaustedError(absl::StrCat("the run needs about ", FormatMemory(plan->total()), " and ",
                                                       capacity->second, " has ", FormatMemory(capacity->first), "; ",
                                                       advice));
    }
    if (o.memory_limit_gib > 0) {
      absl::Status held = LimitDeviceMemory(config, *distributed ? (*distributed)->local_rank : 0, capacity->first);
      if (!held.ok()) return held;
    }
  }
  std::unique_ptr<DataParallelGroup> group;
  if (*distributed) {
    // The machine's cores are shared by its workers.
    if (config.threads == 0) {
      config.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / (*distributed)->local_world_size);
    }
    absl::StatusOr<std::unique_ptr<DataParallelGroup>> joined = DataParallelGroup::Join(**distributed, config.device != "cpu" && at::hasCUDA());
    if (!joined.ok()) return joined.status();
    group = *std::move(joined);
  }
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(config, o.inputs, o.resume, group.get());
  if (!trainer.ok()) return trainer.status();
  (*trainer)->set_planned_bytes(planned_bytes);
  if ((*trainer)->device().is_cpu()) KeepFreedMemoryForReuse();  // no page faults on every step's activations
  const std::atomic<bool>& stop = InstallStopSignals();
  std::signal(SIGPIPE, SIG_IGN);  // a closed log reader must not kill hours of training
  const bool lead = group == nullptr || group->rank() == 0;
  ProgressReporter progress(stderr, o.plain);
  if (!lead) {
    absl::StatusOr<TrainOutcome> out = (*trainer)->Run(&stop, nullptr);  // rank 0 reports for the group
    if (!out.ok()) return out.status();
    if (out->interrupted) std::exit(128 + StopSignal());
    return absl::OkStatus();
  }
  if (group != nullptr) {
    progress.Line(absl::StrCat("data-parallel: ", group->world_size(), " processes (this is rank 0 of ",
                               group->world_size(), "), each step's sequences split between them; gradients over ",
                               group->uses_nccl() ? "NCCL" : "Gloo"));
  }
  progress.Line(absl::StrCat("training on ", (*trainer)->ComputeDescription()));
  if (std::optional<DpAccount> dp = (*trainer)->Privacy()) {
    DpAccount planned = *dp;
    RdpAccountant accountant;
    accountant.Compose(planned.sampling_rate, planned.noise_multiplier, (*trainer)->total_steps());
    progress.Line(absl::StrFormat("differential privacy: clip %g, noise multiplier %.4g, Poisson rate %.4g; after %d steps "
                                  "(ε, δ) = (%.3g, %g)",
                                  planned.max_grad_norm, planned.noise_multiplier, planned.sampling_rate,
                                  (*trainer)->total_steps(), accountant.Epsilon(planned.delta).epsilon, planned.delta));
  }
  if (o.resume) progress.Line(absl::StrCat("resuming at step ", (*trainer)->step(), " of ", (*trainer)->total_steps()));
  absl::StatusOr<TrainOutcome> out = (*trainer)->Run(&stop, &progress);
  if (!out.ok()) return out.status();
  if (out->interrupted) {
    std::cerr << "stopped at step " << out->steps << " (checkpoint saved); continue with: " << o.program << " --run "
              << o.inputs.run_dir << " --resume\n";
    std::exit(128 + StopSignal());
  }
  std::cout << "trained " << out->steps << " steps (" << out->tokens << " tokens); final loss " << out->last_loss;
  if (out->last_val_loss > 0) std::cout << ", validation loss " << out->last_val_loss;
  if (std::optional<DpAccount> dp = (*trainer)->Privacy()) {
    std::cout << absl::StrFormat("; differential privacy spent: (ε, δ) = (%.4g, %g)", dp->epsilon, dp->delta);
  }
  if (config.mode == "router") {
    std::cout << "\nrouter tuning: " << (fs::path(o.inputs.run_dir) / kRouterTuningFile).string()
              << " (apply it with `flexfedctl merge --router-tuning FILE` to exactly these modules)\n";
  } else {
    std::cout << "\nmodel: " << (fs::path(o.inputs.run_dir) / "model").string() << "\n";
  }
  return absl::OkStatus();
}

}  // namespace

void AddTrainCommand(CLI::App& app, TrainCommandKind kind,
                     const std::function<void(const std::string&, const absl::Status&)>& exit_on_error) {
  auto o = std::make_shared<Options>();
  o->kind = kind;
  const bool router = kind == TrainCommandKind::kRouterTuning;
  const std::string name = router ? "router-tune" : "train";
  o->program = router ? "flexfedctl router-tune" : "flexfed-owner train";
  CLI::App* cmd = router ? app.add_subcommand(name, "Tune the merged model's routers on public proxy data (optional; resumable)")
                         : app.add_subcommand(name, "Train your expert against the frozen anchor (resumable)");
  cmd->footer(router ? "Router tuning (docs/METHOD.md §4): the modules are merged as for a release and only the routers — every\n"
                       "layer's rows and biases — train on the proxy text; RUN/router_tuning.safetensors holds them, for exactly\n"
                       "these modules in this order. Settings come from the defaults, then --config FILE or, with --resume, the run's\n"
                       "own, then the flags given. Ctrl-C saves a checkpoint and stops."
                     : "Settings come from the defaults, then --config FILE (JSON, keys as in RUN/train_config.json) or, with\n"
                       "--resume, the run's own settings, then the flags given. Ctrl-C saves a checkpoint and stops.");
  cmd->add_option("--anchor", o->inputs.anchor_dir, router ? "The anchor the modules were trained against" : "Anchor directory (from `pull`)")
      ->check(CLI::ExistingDirectory);
  if (router) {
    cmd->add_option("--module", o->inputs.modules, "An expert module, once per expert, in router order (as for `merge`)")
        ->check(CLI::ExistingFile);
  } else {
    cmd->add_option("--router-init", o->inputs.router_init, "Your router embedding (from `router-init`)")->check(CLI::ExistingFile);
  }
  cmd->add_option("--run", o->inputs.run_dir, "Run folder: settings, checkpoints, metrics, the result")->required();
  cmd->add_option("--config", o->config_file, "Settings file (JSON)")->check(CLI::ExistingFile);
  cmd->add_option("--cache-dir", o->inputs.cache_dir, "Token cache folder");
  cmd->add_flag("--resume", o->resume, "Continue the run in --run from its latest checkpoint");
  if (!router) {
    cmd->add_flag("--dense", o->dense, "Ablation 'no coordination': train a dense copy of the anchor's FFNs, no public expert");
    cmd->add_option("--pretrain", o->pretrain, "Pretrain a fresh model of this size (test, mini, tiny, small, 1b, 7b) from scratch");
  }
  cmd->add_flag("--plain", o->plain, "Plain log lines even on a terminal");

  auto bind = [&](const std::string& name, auto member, const std::string& help) {
    CLI::Option* opt = cmd->add_option(name, o->flags.*member, help);
    o->setters.push_back({opt, [member](TrainConfig& c, const TrainConfig& f) { c.*member = f.*member; }});
    return opt;
  };
  bind("--data", &TrainConfig::data, router ? "Public proxy text: text files, .jsonl files or folders"
                                            : "Your training text: text files, .jsonl files or folders");
  bind("--text-field", &TrainConfig::text_field, "JSONL field holding the text");
  bind("--validation-fraction", &TrainConfig::validation_fraction, "Share of documents held out for validation");
  bind("--seq-len", &TrainConfig::seq_len, "Tokens per sequence");
  bind("--batch-size", &TrainConfig::batch_size, "Sequences per micro-batch");
  bind("--grad-accum", &TrainConfig::grad_accum, "Micro-batches per optimizer step");
  bind("--steps", &TrainConfig::max_steps, "Optimizer steps");
  bind("--tokens", &TrainConfig::token_budget, "Token budget (when --steps is not given)");
  bind("--lr", &TrainConfig::lr, router ? "Peak learning rate (paper: 2e-3)" : "Peak learning rate (paper: 9e-4)");
  bind("--min-lr-ratio", &TrainConfig::min_lr_ratio, "Cosine schedule ends at lr × this");
  bind("--warmup", &TrainConfig::warmup_steps, "Linear warm-up steps");
  bind("--beta1", &TrainConfig::beta1, "AdamW beta1 (paper: 0.9)");
  bind("--beta2", &TrainConfig::beta2, "AdamW beta2 (paper: 0.95)");
  bind("--adam-eps", &TrainConfig::eps, "AdamW epsilon");
  bind("--weight-decay", &TrainConfig::weight_decay, "AdamW decoupled weight decay (paper: 0)");
  bind("--grad-clip", &TrainConfig::grad_clip, "Clip the global gradient norm (0 = off; paper: 1.0)");
  bind("--z-loss", &TrainConfig::z_loss, "Router z-loss coefficient (0 = off; paper: 1e-3)");
  if (!router) bind("--router-bias", &TrainConfig::router_bias, "Learn a negative router bias for your expert (true/false)");
  bind("--top-k", &TrainConfig::top_k, router ? "Experts per token, as the release will use (0 = every expert)"
                                              : "Experts per token while training (of 2)");
  bind("--val-every", &TrainConfig::val_every, "Validate every N steps (0 = only at the end)");
  bind("--val-batches", &TrainConfig::val_batches, "Validation batches");
  bind("--checkpoint-every", &TrainConfig::checkpoint_every, "Checkpoint every N steps");
  bind("--keep-checkpoints", &TrainConfig::keep_checkpoints, "Checkpoints kept");
  bind("--log-every", &TrainConfig::log_every, "Log metrics every N steps");
  bind("--seed", &TrainConfig::seed, "Seed for the data split, order and fresh weights");
  bind("--device", &TrainConfig::device, "auto, cpu or cuda")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  bind("--precision", &TrainConfig::precision,
       "auto (bf16 autocast on a GPU, fp32 on the CPU), fp32 or bf16 (autocast; master weights stay fp32)")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}));
  bind("--threads", &TrainConfig::threads, "CPU threads (default: all cores)");
  bind("--optimizer-moments", &TrainConfig::optimizer_moments,
       "fp32 or bf16: the dtype of AdamW's two moments (bf16 halves the optimizer state; master weights and "
       "gradients stay fp32)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  {
    CLI::Option* opt = cmd->add_flag("--activation-checkpointing", o->flags.activation_checkpointing,
                                     "Keep only each layer's input for the backward and recompute the layer there: "
                                     "activation memory of one layer instead of all, for one more forward per step");
    o->setters.push_back({opt, [](TrainConfig& c, const TrainConfig& f) { c.activation_checkpointing = f.activation_checkpointing; }});
  }
  if (!router) {
    bind("--tokenizer", &TrainConfig::tokenizer,
         "With --pretrain: a folder holding the tokenizer.json (and tokenizer_config.json) to train with; the model "
         "takes its vocabulary (padded to a multiple of 64) and carries the files (default: bytes)")
        ->check(CLI::ExistingDirectory);
    bind("--dp-max-grad-norm", &TrainConfig::dp_max_grad_norm,
         "Differential privacy (DP-SGD, docs/PRIVACY.md): clip each sequence's gradient to this norm C; batches are "
         "Poisson samples of --batch-size × --grad-accum sequences on average; --grad-clip does not apply");
    bind("--dp-noise-multiplier", &TrainConfig::dp_noise_multiplier, "DP-SGD: Gaussian noise of std σ·C on the clipped sum");
    bind("--dp-epsilon", &TrainConfig::dp_epsilon, "DP-SGD: instead of σ, the ε the whole run may spend (σ is solved for)");
    bind("--dp-delta", &TrainConfig::dp_delta, "DP-SGD: the δ of (ε, δ) (default 1e-5; keep it below 1 / sequences)");
  }
  cmd->add_flag("--memory-report", o->memory_report,
                "Print the run's memory plan (weights, gradients, optimizer state, activations, loss) against what the "
                "device has, and exit without training");
  cmd->add_flag("--json", o->json, "With --memory-report: the plan as JSON (parts in bytes, available, fits)");
  cmd->add_option("--memory-limit", o->memory_limit_gib,
                  "GiB this process may use (default: the GPU's free memory, or this machine's available memory): the "
                  "plan is held to it, and on a GPU so is PyTorch's allocator — leave room for other work")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--nproc-per-node", o->launch.nproc_per_node,
                  "Data-parallel: train with this many processes on this machine (one per GPU; on a CPU they share the "
                  "cores); each step's sequences are split between them")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--nnodes", o->launch.nnodes, "Data-parallel across machines: how many machines run this command")
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--node-rank", o->launch.node_rank, "Data-parallel across machines: this machine's index (0 = the one at --master-addr)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--master-addr", o->launch.master_addr, "Data-parallel: the address of machine 0, which serves the rendezvous");
  cmd->add_option("--master-port", o->launch.master_port, "Data-parallel: its TCP port (default: a free one, one machine only)")
      ->check(CLI::Range(0, 65535));
  cmd->callback([o, name, exit_on_error] {
    if (o->launch.node_rank >= o->launch.nnodes) {
      exit_on_error(name, absl::InvalidArgumentError(absl::StrCat("--node-rank ", o->launch.node_rank,
                                                                  " is not below --nnodes ", o->launch.nnodes)));
    }
    exit_on_error(name, Run(*o));
  });
}

}  // namespace flexfed
