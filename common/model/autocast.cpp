#include "common/model/autocast.h"

#include <ATen/autocast_mode.h>

namespace flexfed {

AutocastScope::AutocastScope(at::DeviceType device, at::ScalarType dtype)
    : device_(device),
      was_enabled_(at::autocast::is_autocast_enabled(device)),
      old_dtype_(at::autocast::get_autocast_dtype(device)) {
  TORCH_CHECK(device == at::kCUDA || device == at::kCPU, "AutocastScope: only CUDA and CPU are supported");
  at::autocast::set_autocast_dtype(device, dtype);
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_, was_enabled_);
  at::autocast::set_autocast_dtype(device_, old_dtype_);
}

std::optional<at::ScalarType> AutocastDtype(at::DeviceType device) {
  if (device != at::kCUDA && device != at::kCPU) return std::nullopt;
  if (!at::autocast::is_autocast_enabled(device)) return std::nullopt;
  return at::autocast::get_autocast_dtype(device);
}

NoAutocastCache::NoAutocastCache() : was_enabled_(at::autocast::is_autocast_cache_enabled()) {
  at::autocast::set_autocast_cache_enabled(false);
}

NoAutocastCache::~NoAutocastCache() { at::autocast::set_autocast_cache_enabled(was_enabled_); }

}  // namespace flexfed
