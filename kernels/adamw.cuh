// CUDA AdamW update of one parameter: fp32 weights and gradients, fp32 or bf16 moments.
// Semantics: AdamWArgs in kernels/adamw_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/adamw_ops.h"

namespace flexfed::kernels {

// Device pointers; runs on `stream`. Throws std::runtime_error on a CUDA error.
void AdamW(const AdamWArgs& a, cudaStream_t stream);

}  // namespace flexfed::kernels
