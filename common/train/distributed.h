// Data-parallel owner training over PyTorch's distributed runtime (c10d): Gloo between CPU processes,
// NCCL between GPUs. docs/OWNER_GUIDE.md ("Training on several processes or machines").
//
// Every rank holds the whole model and reads the same data in the same order; each optimizer step's
// sequences are split between the ranks, the gradients summed across them, and the optimizer state
// sharded (ZeRO stage 1): each trained tensor's AdamW moments live on one rank, which updates it and
// broadcasts the new values. A step is the same step as on one process, to rounding. Checkpoints are
// written by rank 0 in the one-process format (the optimizer state gathered first), so a run resumes
// at any number of processes.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flexfed {

struct DistributedSettings {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        // this process's index on its machine (its GPU)
  int local_world_size = 1;  // processes on this machine (they share its cores)
  std::string master_addr = "127.0.0.1";  // where rank 0 serves the rendezvous store
  int master_port = 29500;
  int timeout_seconds = 1800;  // a collective that waits longer fails (a rank died or hangs)

  // The settings a launcher put in the environment — torchrun's names: RANK, WORLD_SIZE,
  // LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT — or nullopt when RANK is not set.
  // Malformed or inconsistent values are an error naming the variable.
  static absl::StatusOr<std::optional<DistributedSettings>> FromEnvironment();
};

// One rank's membership of the data-parallel group.
class DataParallelGroup {
 public:
  // Joins the group (rank 0 serves the rendezvous store at master_addr:master_port): Gloo for
  // CPU tensors; with `cuda`, NCCL for CUDA tensors when FlexFed was built against a CUDA LibTorch
  // with NCCL's header (else Gloo, staging them through the host). Blocks until every rank has
  // joined or the timeout passes.
  static absl::StatusOr<std::unique_ptr<DataParallelGroup>> Join(const DistributedSettings& settings, bool cuda);
  ~DataParallelGroup();

  int rank() const { return settings_.rank; }
  int world_size() const { return settings_.world_size; }
  const DistributedSettings& settings() const { return settings_; }
  bool uses_nccl() const;  // CUDA tensors go through NCCL (else Gloo stages them through the host)

  // Sums each tensor across ranks, in place (flattened into buckets of at most 64 MiB per call).
  // The tensors must be contiguous, of one dtype and device, with the same shapes on every rank.
  void SumInPlace(const std::vector<at::Tensor>& tensors);
  // Every rank gets root's values, in place.
  void Broadcast(const at::Tensor& tensor, int root);
  void Barrier();

 private:
  friend class OverlappedGradientSum;
  DataParallelGroup() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  DistributedSettings settings_;
};

// Sums the gradients of `params` (trained leaves) across the ranks while the backward runs, so
// that the exchange overlaps the backward's compute (data-parallel training without DP-SGD). The
// tensors, in reverse order — about the order a backward finishes their gradients — form buckets:
// one per tensor of 1 MiB or more (summed in place), smaller neighbours grouped up to that. Once every tensor of a
// bucket has its gradient for the step, the bucket's all-reduce starts, the buckets strictly in
// order, so every rank issues the same collectives in the same order whenever its gradients
// arrive. Finish() starts the rest (a tensor this rank has no gradient for adds zeros), waits,
// and leaves each sum in its tensor's gradient; a tensor no rank had a gradient for is left
// without one. The gradients that arrive before Arm() (earlier micro-batches) are left alone.
class OverlappedGradientSum {
 public:
  OverlappedGradientSum(DataParallelGroup& group, std::vector<at::Tensor> params);
  ~OverlappedGradientSum();  // removes the hooks
  OverlappedGradientSum(const OverlappedGradientSum&) = delete;
  OverlappedGradientSum& operator=(const OverlappedGradientSum&) = delete;

  void Arm();     // the next backward is the step's last: start each bucket as it fills
  void Finish();  // after that backward (or when this rank had none): every gradient summed
  size_t buckets() const;
  size_t started() const;  // buckets whose all-reduce has started this step (before Finish: overlapped)

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// ZeRO-1's sharding: the rank that keeps the optimizer state of each of the tensors with these
// element counts — largest first, each to the rank with the fewest elements so far (ties: the
// lowest rank). Deterministic, so every rank computes the same plan.
std::vector<int> ShardOptimizerState(const std::vector<int64_t>& numels, int world_size);

// Rank `rank`'s share of a step's sequences: a contiguous slice, the first (size % world) ranks
// taking one more.
std::vector<int64_t> ShareOfStep(const std::vector<int64_t>& sequences, int rank, int world_size);

}  // namespace flexfed
