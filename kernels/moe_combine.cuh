// CUDA combine: the weighted un-permute of the experts' outputs back to token order, and its
// backward. Semantics: CombineArgs / CombineBackwardArgs in moe_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/moe_ops.h"

namespace flexfed::kernels {

// Device pointers; run on `stream`. Throw std::invalid_argument on a broken precondition the host
// can see, std::runtime_error on a CUDA error.
void Combine(const CombineArgs& a, cudaStream_t stream);
void CombineBackward(const CombineBackwardArgs& a, cudaStream_t stream);

}  // namespace flexfed::kernels
