#include "common/model/autocast.h"

#include <ATen/autocast_mode.h>
#include <torch/version.h>

// LibTorch 2.4 replaced the per-device autocast functions with ones taking the device type.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define FLEXFED_AUTOCAST_BY_DEVICE 1
#else
#define FLEXFED_AUTOCAST_BY_DEVICE 0
#endif

namespace flexfed {
namespace {

bool Enabled(at::DeviceType device) {
#if FLEXFED_AUTOCAST_BY_DEVICE
  return at::autocast::is_autocast_enabled(device);
#else
  return device == at::kCUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

void SetEnabled(at::DeviceType device, bool on) {
#if FLEXFED_AUTOCAST_BY_DEVICE
  at::autocast::set_autocast_enabled(device, on);
#else
  if (device == at::kCUDA) {
    at::autocast::set_enabled(on);
  } else {
    at::autocast::set_cpu_enabled(on);
  }
#endif
}

at::ScalarType Dtype(at::DeviceType device) {
#if FLEXFED_AUTOCAST_BY_DEVICE
  return at::autocast::get_autocast_dtype(device);
#else
  return device == at::kCUDA ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
#endif
}

void SetDtype(at::DeviceType device, at::ScalarType dtype) {
#if FLEXFED_AUTOCAST_BY_DEVICE
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == at::kCUDA) {
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

}  // namespace

AutocastScope::AutocastScope(at::DeviceType device, at::ScalarType dtype)
    : device_(device), was_enabled_(Enabled(device)), old_dtype_(Dtype(device)) {
  TORCH_CHECK(device == at::kCUDA || device == at::kCPU, "AutocastScope: only CUDA and CPU are supported");
  SetDtype(device, dtype);
  SetEnabled(device, true);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  SetEnabled(device_, was_enabled_);
  SetDtype(device_, old_dtype_);
}

std::optional<at::ScalarType> AutocastDtype(at::DeviceType device) {
  if (device != at::kCUDA && device != at::kCPU) return std::nullopt;
  if (!Enabled(device)) return std::nullopt;
  return Dtype(device);
}

}  // namespace flexfed
