// CUDA router: softmax over the allowed experts with the negative bias, top-k and weights, one pass
// per token; and its backward. Semantics: RouterArgs / RouterBackwardArgs in moe_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/moe_ops.h"

namespace flexfed::kernels {

// Device pointers; runs on `stream`. Throws std::invalid_argument on a broken precondition it can
// see from the host (shape, K), std::runtime_error on a CUDA error.
void Router(const RouterArgs& a, cudaStream_t stream);
void RouterBackward(const RouterBackwardArgs& a, cudaStream_t stream);

}  // namespace flexfed::kernels
