// CUDA align/permute: per-expert counts, offsets and the stable permutation that makes each expert's
// slots contiguous; the gather of hidden states into that order and its adjoint.
// Semantics: AlignArgs, GatherArgs, GatherBackwardArgs in moe_ops.h.
#pragma once

#include <cuda_runtime.h>

#include "kernels/moe_ops.h"

namespace flexfed::kernels {

// Bytes of device scratch AlignArgs::workspace must point to.
size_t AlignWorkspaceBytes(int64_t slots, int experts);

// Device pointers; run on `stream`. Throw std::invalid_argument on a broken precondition the host
// can see, std::runtime_error on a CUDA error.
void Align(const AlignArgs& a, cudaStream_t stream);
void Gather(const GatherArgs& a, cudaStream_t stream);
void GatherBackward(const GatherBackwardArgs& a, cudaStream_t stream);

}  // namespace flexfed::kernels
