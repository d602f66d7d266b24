# FLEXFED_PYTHON: the Python whose PyTorch provides LibTorch and which runs the test oracles; by
# default the project's .venv (scripts/setup.sh, pinned in scripts/python-requirements.txt), on a GPU
# machine its own (scripts/gpu_build.sh). docs/BUILD.md.
#
# Sets FLEXFED_TORCH_PREFIX (LibTorch's CMake prefix), FLEXFED_TORCH_VERSION, FLEXFED_TORCH_CUDA_VERSION
# (empty for a CPU build) and FLEXFED_PYTHON_CUDA_ROOT: the CUDA toolkit the environment carries as
# NVIDIA's wheels (nvidia/cuXY with bin/nvcc, and the lib64 link scripts/setup.sh adds, without
# which nvcc cannot link), empty when it has none.

set(FLEXFED_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python3" CACHE FILEPATH
    "Python whose PyTorch provides LibTorch and runs the test oracles")
execute_process(
  COMMAND ${FLEXFED_PYTHON} -c [=[
import os, sysconfig, torch
cuda = torch.version.cuda or ""
root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu" + cuda.split(".")[0]) if cuda else ""
print(torch.utils.cmake_prefix_path, torch.__version__, cuda or "-",
      root if root and all(os.path.exists(os.path.join(root, p)) for p in ("bin/nvcc", "lib64")) else "-", sep="\n")
]=]
  RESULT_VARIABLE _python_failed OUTPUT_VARIABLE _python_out ERROR_VARIABLE _python_error
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(_python_failed)
  message(FATAL_ERROR "${FLEXFED_PYTHON} cannot import torch: run scripts/setup.sh (makes .venv with the pinned "
                      "PyTorch) or pass -DFLEXFED_PYTHON=/path/to/python3 of an environment with PyTorch")
endif()
string(REPLACE "\n" ";" _python_out "${_python_out}")
list(GET _python_out 0 FLEXFED_TORCH_PREFIX)
list(GET _python_out 1 FLEXFED_TORCH_VERSION)
list(GET _python_out 2 FLEXFED_TORCH_CUDA_VERSION)
list(GET _python_out 3 FLEXFED_PYTHON_CUDA_ROOT)
foreach(_var FLEXFED_TORCH_CUDA_VERSION FLEXFED_PYTHON_CUDA_ROOT)
  if(${_var} STREQUAL "-")
    set(${_var} "")
  endif()
endforeach()
