#include "common/train/distributed.h"

#include <ATen/ATen.h>
// LibTorch builds c10d with Gloo; its header declares the Gloo process group only under this macro.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// NCCL for CUDA tensors where LibTorch is a CUDA build and NCCL's header is at hand (PyTorch's CUDA
// wheels bring it, nvidia/nccl/include; common/train/CMakeLists.txt looks there).
#if FLEXFED_WITH_CUDA && __has_include(<nccl.h>)
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define FLEXFED_WITH_NCCL 1
#else
#define FLEXFED_WITH_NCCL 0
#endif

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <numeric>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace flexfed {

struct DataParallelGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> gloo;  // CPU tensors (and CUDA ones without NCCL)
  c10::intrusive_ptr<c10d::Backend> nccl;  // CUDA tensors, when built with NCCL and training on GPUs
  c10d::Backend& For(const at::Tensor& t) const { return t.is_cuda() && nccl ? *nccl : *gloo; }
};

namespace {

constexpr int64_t kBucketBytes = int64_t{64} << 20;

absl::StatusOr<int> EnvInt(const char* name, int fallback, int low) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  int value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < low) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "=", text, " is not an integer ≥ ", low));
  }
  return value;
}

}  // namespace

absl::StatusOr<std::optional<DistributedSettings>> DistributedSettings::FromEnvironment() {
  if (std::getenv("RANK") == nullptr) return std::optional<DistributedSettings>();
  DistributedSettings s;
  absl::StatusOr<int> rank = EnvInt("RANK", 0, 0), world = EnvInt("WORLD_SIZE", -1, 1);
  if (!rank.ok()) return rank.status();
  if (!world.ok()) return world.status();
  if (*world < 0) return absl::InvalidArgumentError("RANK is set but WORLD_SIZE is not: set both (or neither)");
  if (*rank >= *world) return absl::InvalidArgumentError(absl::StrCat("RANK=", *rank, " is not below WORLD_SIZE=", *world));
  absl::StatusOr<int> local = EnvInt("LOCAL_RANK", *rank, 0), local_world = EnvInt("LOCAL_WORLD_SIZE", *world, 1);
  absl::StatusOr<int> port = EnvInt("MASTER_PORT", s.master_port, 1);
  if (!local.ok()) return local.status();
  if (!local_world.ok()) return local_world.status();
  if (!port.ok()) return port.status();
  if (*port > 65535) return absl::InvalidArgumentError(absl::StrCat("MASTER_PORT=", *port, " is not a TCP port"));
  s.rank = *rank;
  s.world_size = *world;
  s.local_rank = *local;
  s.local_world_size = *local_world;
  s.master_port = *port;
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr != '\0') s.master_addr = addr;
  return std::optional<DistributedSettings>(s);
}

absl::StatusOr<std::unique_ptr<DataParallelGroup>> DataParallelGroup::Join(const DistributedSettings& settings, bool cuda) {
  std::unique_ptr<DataParallelGroup> g(new DataParallelGroup());
  g->settings_ = settings;
  g->impl_ = std::make_unique<Impl>();
  const auto timeout = std::chrono::milliseconds(int64_t{settings.timeout_seconds} * 1000);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(settings.master_port);
    so.isServer = settings.rank == 0;
    so.numWorkers = settings.world_size;
    so.waitWorkers = true;
    so.timeout = timeout;
    g->impl_->store = c10::make_intrusive<c10d::TCPStore>(settings.master_addr, so);
    // Gloo for CPU tensors; with CUDA tensors Gloo stages them through the host (LibTorch's CUDA
    // builds). The device binds to GLOO_SOCKET_IFNAME when set (PyTorch's variable), to loopback
    // for a one-machine group, else to the address this host's name resolves to.
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    const bool loopback = settings.master_addr == "127.0.0.1" || settings.master_addr == "localhost";
    options->devices.push_back(ifname != nullptr && *ifname != '\0' ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                               : loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                          : c10d::ProcessGroupGloo::createDefaultDevice());
    options->threads = 2;
    // Each backend rendezvouses under its own prefix of the one store.
    g->impl_->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", g->impl_->store), settings.rank, settings.world_size, options);
#if FLEXFED_WITH_NCCL
    if (cuda) {
      g->impl_->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl", g->impl_->store), settings.rank, settings.world_size,
          c10d::ProcessGroupNCCL::Options::create());
    }
#endif
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("rank ", settings.rank, " of ", settings.world_size, " could not join the group at ",
                                               settings.master_addr, ":", settings.master_port, ": ", e.what(),
                                               " (is rank 0 running, the port free and reachable?)"));
  }
  (void)cuda;
  return g;
}

bool DataParallelGroup::uses_nccl() const {
  return static_cast<bool>(impl_->nccl);
}

DataParallelGroup::~DataParallelGroup() = default;

void DataParallelGroup::SumInPlace(const std::vector<at::Tensor>& tensors) {
  size_t begin = 0;
  while (begin < tensors.size()) {
    size_t end = begin;
    int64_t bytes = 0;
    while (end < tensors.size() && (end == begin || bytes + tensors[end].nbytes() <= static_cast<size_t>(kBucketBytes))) {
      bytes += static_cast<int64_t>(tensors[end].nbytes());
      ++end;
    }
    std::vector<at::Tensor> bucket;
    if (end - begin == 1) {
      bucket = {tensors[begin]};
    } else {
      std::vector<at::Tensor> flat;
      for (size_t i = begin; i < end; ++i) flat.push_back(tensors[i].reshape({-1}));
      bucket = {at::cat(flat)};
    }
    impl_->For(bucket[0]).allreduce(bucket)->wait();
    if (end - begin > 1) {
      int64_t offset = 0;
      for (size_t i = begin; i < end; ++i) {
        const int64_t n = tensors[i].numel();
        tensors[i].view({-1}).copy_(bucket[0].narrow(0, offset, n));
        offset += n;
      }
    }
    begin = end;
  }
}

void DataParallelGroup::Broadcast(const at::Tensor& tensor, int root) {
  std::vector<at::Tensor> one = {tensor};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  impl_->For(tensor).broadcast(one, o)->wait();
}

void DataParallelGroup::Barrier() { impl_->gloo->barrier()->wait(); }

struct OverlappedGradientSum::State {
  struct Bucket {
    std::vector<size_t> members;  // indices into params
    size_t ready = 0;             // members whose gradient is final for the step
    at::Tensor flat;              // the members' gradients in one buffer (several members only)
    c10::intrusive_ptr<c10d::Work> work;
  };
  DataParallelGroup* group = nullptr;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;  // per param
  std::vector<bool> arrived;      // per param, this step
  std::vector<Bucket> buckets;
  size_t next = 0;                // the first bucket not started
  bool armed = false;
  std::mutex mutex;  // a GPU's backward calls the hooks from the autograd engine's device thread

  // Runs after the engine has accumulated a trained tensor's gradient for this backward.
  struct Hook : torch::autograd::PostAccumulateGradHook {
    Hook(State* state, size_t index) : state(state), index(index) {}
    void operator()(const torch::autograd::Variable&) override { state->Arrive(index); }
    State* state;
    size_t index;
  };

  void Arrive(size_t i) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!armed) return;
    Bucket& b = buckets[bucket_of[i]];
    TORCH_CHECK(!b.work, "data-parallel: the gradient of trained tensor ", i, " changed after its all-reduce started");
    if (arrived[i]) return;
    arrived[i] = true;
    ++b.ready;
    StartReady();
  }

  void StartReady() {
    while (next < buckets.size() && buckets[next].ready == buckets[next].members.size()) Start(buckets[next++]);
  }

  void Start(Bucket& b) {
    std::vector<at::Tensor> grads;
    for (size_t i : b.members) {
      at::Tensor& g = params[i].mutable_grad();
      if (!g.defined()) {
        g = at::zeros_like(params[i]);
      } else if (!g.is_contiguous()) {
        g = g.contiguous();
      }
      grads.push_back(g.view({-1}));
    }
    std::vector<at::Tensor> one = {grads.size() == 1 ? grads[0] : at::cat(grads)};
    if (grads.size() > 1) b.flat = one[0];
    b.work = group->impl_->For(one[0]).allreduce(one);
  }
};

namespace {

constexpr int64_t kOverlapBucketBytes = int64_t{1} << 20;

}  // namespace

OverlappedGradientSum::OverlappedGradientSum(DataParallelGroup& group, std::vector<at::Tensor> params)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.group = &group;
  s.params = std::move(params);
  s.bucket_of.assign(s.params.size(), 0);
  s.arrived.assign(s.params.size(), false);
  int64_t open_bytes = 0;  // of the last bucket, while it takes small tensors
  for (size_t k = s.params.size(); k-- > 0;) {
    const int64_t bytes = static_cast<int64_t>(s.params[k].nbytes());
    const bool alone = bytes >= kOverlapBucketBytes;
    if (alone || s.buckets.empty() || open_bytes < 0 || open_bytes + bytes > kOverlapBucketBytes ||
        s.params[k].scalar_type() != s.params[s.buckets.back().members[0]].scalar_type() ||
        s.params[k].device() != s.params[s.buckets.back().members[0]].device()) {
      s.buckets.emplace_back();
      open_bytes = 0;
    }
    s.buckets.back().members.push_back(k);
    s.bucket_of[k] = s.buckets.size() - 1;
    open_bytes = alone ? -1 : open_bytes + bytes;  // a large tensor's bucket takes nothing more
  }
  for (size_t i = 0; i < s.params.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(s.params[i], std::make_unique<State::Hook>(&s, i));
  }
}

OverlappedGradientSum::~OverlappedGradientSum() {
  for (const at::Tensor& p : state_->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

size_t OverlappedGradientSum::buckets() const { return state_->buckets.size(); }

size_t OverlappedGradientSum::started() const {
  const std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->next;
}

void OverlappedGradientSum::Arm() {
  const std::lock_guard<std::mutex> lock(state_->mutex);
  state_->armed = true;
}

void OverlappedGradientSum::Finish() {
  State& s = *state_;
  at::NoGradGuard no_grad;
  // Whether each tensor had a gradient here: summed over the ranks below, after the buckets (every
  // rank issues the buckets' all-reduces first, then this one).
  at::Tensor had = at::zeros({static_cast<int64_t>(s.params.size())}, at::kFloat);
  {
    const std::lock_guard<std::mutex> lock(s.mutex);
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (s.params[i].grad().defined()) had[static_cast<int64_t>(i)] = 1.0f;
    }
    // The buckets not started yet (this rank had no backward, or it did not reach one of their
    // tensors in the last micro-batch): their gradients as they are, zeros where undefined.
    for (State::Bucket& b : s.buckets) b.ready = b.members.size();
    s.StartReady();
    s.armed = false;
  }
  for (State::Bucket& b : s.buckets) {
    b.work->wait();
    b.work.reset();
    if (b.flat.defined()) {
      int64_t offset = 0;
      for (size_t i : b.members) {
        const int64_t n = s.params[i].numel();
        s.params[i].mutable_grad().view({-1}).copy_(b.flat.narrow(0, offset, n));
        offset += n;
      }
      b.flat = at::Tensor();
    }
    b.ready = 0;
  }
  s.next = 0;
  std::fill(s.arrived.begin(), s.arrived.end(), false);
  s.group->SumInPlace({had});
  const float* any = had.data_ptr<float>();
  for (size_t i = 0; i < s.params.size(); ++i) {
    if (any[i] == 0.0f) s.params[i].mutable_grad() = at::Tensor();
  }
}

std::vector<int> ShardOptimizerState(const std::vector<int64_t>& numels, int world_size) {
  std::vector<size_t> order(numels.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> load(static_cast<size_t>(std::max(1, world_size)), 0);
  std::vector<int> owner(numels.size(), 0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[static_cast<size_t>(r)] += numels[i];
  }
  return owner;
}

std::vector<int64_t> ShareOfStep(const std::vector<int64_t>& sequences, int rank, int world_size) {
  const int64_t n = static_cast<int64_t>(sequences.size()), w = world_size, r = rank;
  const int64_t base = n / w, extra = n % w;
  const int64_t begin = r * base + std::min(r, extra), size = base + (r < extra ? 1 : 0);
  return std::vector<int64_t>(sequences.begin() + begin, sequences.begin() + begin + size);
}

}  // namespace flexfed
