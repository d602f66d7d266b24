# LibTorch: the one inside FLEXFED_PYTHON's PyTorch (the project's .venv, pinned in
# scripts/python-requirements.txt; a GPU machine's own PyTorch), never a system copy. docs/BUILD.md.
# Included after FlexFedPython.cmake and the CUDA set-up; defines LibTorch's imported targets
# (TORCH_LIBRARIES) as its own config does, with the adjustments below.

if(FLEXFED_TORCH_VERSION VERSION_LESS 2.4)
  message(FATAL_ERROR "PyTorch ${FLEXFED_TORCH_VERSION} in ${FLEXFED_PYTHON} is older than 2.4, whose LibTorch API "
                      "FlexFed uses: install the version of scripts/python-requirements.txt (scripts/setup.sh does)")
endif()
# A CUDA build of LibTorch configures only next to a CUDA toolkit (its config looks for nvcc).
if(FLEXFED_TORCH_CUDA_VERSION AND NOT FLEXFED_CUDA_TOOLKIT)
  message(FATAL_ERROR "PyTorch ${FLEXFED_TORCH_VERSION} in ${FLEXFED_PYTHON} is a CUDA ${FLEXFED_TORCH_CUDA_VERSION} "
                      "build, whose LibTorch needs a CUDA toolkit to configure against, and none was found: run "
                      "scripts/setup.sh (its environment carries nvcc), install CUDA ${FLEXFED_TORCH_CUDA_VERSION} "
                      "(/usr/local/cuda or CUDACXX), or use a Python whose PyTorch is a CPU build (-DFLEXFED_PYTHON=...)")
endif()

# A CUDA LibTorch's config compiles CUDA for TORCH_CUDA_ARCH_LIST (every architecture it knows when
# unset) and turns CMAKE_CUDA_ARCHITECTURES off: hand it ours ("90" -> "9.0").
set(FLEXFED_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
if(FLEXFED_KERNELS AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "")
  foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
    string(REGEX REPLACE "^([0-9]+)([0-9a-z])(-real|-virtual)?$" "\\1.\\2" _arch "${_arch}")
    list(APPEND TORCH_CUDA_ARCH_LIST ${_arch})
  endforeach()
endif()

list(PREPEND CMAKE_PREFIX_PATH "${FLEXFED_TORCH_PREFIX}")
find_package(Torch REQUIRED)
message(STATUS "FlexFed: LibTorch ${FLEXFED_TORCH_VERSION} from ${FLEXFED_PYTHON}")

# LibTorch's include directory also carries the headers of the old protobuf it was built with
# (include/google/protobuf). Searched before the system's, they would replace Debian's protobuf in
# every file that includes both LibTorch and the gRPC-generated code (the owner's push, flexfedctl's
# release commands). Point LibTorch's targets at a copy of that directory made of links to
# everything but google/.
get_filename_component(_torch_include "${FLEXFED_TORCH_PREFIX}/../../include" ABSOLUTE)
set(_filtered ${CMAKE_BINARY_DIR}/torch_include)
file(REMOVE_RECURSE ${_filtered})
file(MAKE_DIRECTORY ${_filtered})
file(GLOB _entries RELATIVE ${_torch_include} ${_torch_include}/*)
foreach(_entry IN LISTS _entries)
  if(NOT _entry STREQUAL "google")
    file(CREATE_LINK ${_torch_include}/${_entry} ${_filtered}/${_entry} SYMBOLIC)
  endif()
endforeach()
foreach(_target torch torch_cpu torch_cuda c10 c10_cuda headeronly torch_cpu_library torch_cuda_library torch_library)
  if(TARGET ${_target})
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(_dirs)
      string(REPLACE "${_torch_include}" "${_filtered}" _dirs "${_dirs}")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_dirs}")
    endif()
  endif()
endforeach()
string(REPLACE "${_torch_include}" "${_filtered}" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")

# PyTorch's wheels are built with a newer GCC whose std::filesystem is partly linked into libtorch.so,
# and libtorch.so exports those copies. An executable that lists libtorch.so before libstdc++.so.6
# binds its own std::filesystem calls to them, and some crash (fs::remove_all jumps to address 0:
# every temporary directory's cleanup, the GPU train bench at exit). Listing the system libstdc++
# first makes every such call resolve to it. Added to flexfed_model's consumers (common/model/).
set(FLEXFED_TORCH_LINK_OPTIONS "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")
