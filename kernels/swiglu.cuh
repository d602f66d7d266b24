// CUDA fused SwiGLU activation silu(gate) · up and its backward.
// Semantics: SwiGluArgs / SwiGluBackwardArgs in moe_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/moe_ops.h"

namespace flexfed::kernels {

// Device pointers; run on `stream`. Throw std::runtime_error on a CUDA error.
void SwiGlu(const SwiGluArgs& a, cudaStream_t stream);
void SwiGluBackward(const SwiGluBackwardArgs& a, cudaStream_t stream);

}  // namespace flexfed::kernels
