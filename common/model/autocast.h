// Mixed precision (autocast) in one place, over LibTorch's per-device autocast API (2.4 and later).
// Owner training on CUDA runs its forward inside an AutocastScope (bf16): matrix products run in bf16
// from fp32 master weights, while the router, the norms, the softmax and the loss stay in fp32.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

namespace flexfed {

// Enables autocast to `dtype` for `device` (kCUDA or kCPU) until destroyed; nests like
// torch.autocast (the cast cache is cleared when the outermost scope ends). One thread.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType device, at::ScalarType dtype);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_;
  bool was_enabled_;
  at::ScalarType old_dtype_;
};

// The dtype autocast computes matrix products in on `device`, or nullopt when it is off there.
std::optional<at::ScalarType> AutocastDtype(at::DeviceType device);

// Autocast's cast cache off until destroyed (then as it was): every use of an fp32 leaf casts it
// anew, and nothing outlives the op that needed it. One thread.
class NoAutocastCache {
 public:
  NoAutocastCache();
  ~NoAutocastCache();
  NoAutocastCache(const NoAutocastCache&) = delete;
  NoAutocastCache& operator=(const NoAutocastCache&) = delete;

 private:
  bool was_enabled_;
};

// Ops under this guard run in the dtypes they are given, whatever the autocast state (the router
// logits must be fp32, docs/METHOD.md §2).
class NoAutocast {
 public:
  NoAutocast() = default;
  NoAutocast(const NoAutocast&) = delete;
  NoAutocast& operator=(const NoAutocast&) = delete;

 private:
  c10::impl::ExcludeDispatchKeyGuard guard_{c10::autocast_dispatch_keyset};
};

}  // namespace flexfed
