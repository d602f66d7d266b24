// Checked CUDA calls: every runtime call and every launch goes through FLEXFED_CUDA_CHECK, which
// throws std::runtime_error naming the file, line, call and CUDA's error, with a hint at the fix.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flexfed::kernels {

[[noreturn]] inline void ThrowCudaError(cudaError_t err, const char* call, const char* file, int line) {
  std::string hint;
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    hint = " (no usable GPU: check nvidia-smi and that the driver supports this CUDA version)";
  } else if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorUnsupportedPtxVersion) {
    hint = " (the kernels were built for another GPU: rebuild with -DCMAKE_CUDA_ARCHITECTURES=<this card's>)";
  } else if (err == cudaErrorMemoryAllocation) {
    hint = " (out of GPU memory: lower the batch size or sequence length)";
  }
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " +
                           cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + hint);
}

}  // namespace flexfed::kernels

#define FLEXFED_CUDA_CHECK(call)                                                               \
  do {                                                                                         \
    const cudaError_t flexfed_cuda_err_ = (call);                                              \
    if (flexfed_cuda_err_ != cudaSuccess) {                                                    \
      ::flexfed::kernels::ThrowCudaError(flexfed_cuda_err_, #call, __FILE__, __LINE__);        \
    }                                                                                          \
  } while (0)

// After a <<<...>>> launch: reports a bad configuration at once (execution errors surface at the
// next synchronising call, which is checked too).
#define FLEXFED_CUDA_CHECK_LAUNCH() FLEXFED_CUDA_CHECK(cudaGetLastError())
