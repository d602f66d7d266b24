# The dependency rule of docs/ARCHITECTURE.md §2, enforced by the build: common/core/, common/client/
# and coordinator/ are torch-free.
#
# flexfed_torch_free(TARGET) marks a target torch-free:
#  - its sources see cmake/torch_free/ first, whose LibTorch entry headers (<ATen/ATen.h>,
#    <torch/torch.h>, <c10/...>) are #error lines naming the rule: including one fails to compile
#    with that message, whatever LibTorch the machine has installed elsewhere;
#  - flexfed_check_torch_free(), called once at the end of the top-level CMakeLists.txt, fails the
#    configure step if anything it links, directly or not, is LibTorch (which would also bring
#    LibTorch's include directories and make every other ATen header reachable).

function(flexfed_torch_free target)
  target_include_directories(${target} BEFORE PRIVATE ${PROJECT_SOURCE_DIR}/cmake/torch_free)
  set_property(GLOBAL APPEND PROPERTY FLEXFED_TORCH_FREE_TARGETS ${target})
endfunction()

# Appends to ${out} every library `item` links, recursively (targets by name, files by path).
function(_flexfed_link_closure item out)
  set(seen ${${out}})
  if(item IN_LIST seen)
    return()
  endif()
  list(APPEND seen ${item})
  if(TARGET ${item})
    get_target_property(type ${item} TYPE)
    set(deps "")
    if(NOT type STREQUAL "INTERFACE_LIBRARY")
      get_target_property(direct ${item} LINK_LIBRARIES)
      if(direct)
        list(APPEND deps ${direct})
      endif()
    endif()
    get_target_property(interface ${item} INTERFACE_LINK_LIBRARIES)
    if(interface)
      list(APPEND deps ${interface})
    endif()
    foreach(dep IN LISTS deps)
      string(REGEX REPLACE "^\\$<LINK_ONLY:(.*)>$" "\\1" dep "${dep}")
      if(NOT dep MATCHES "^\\$<")
        _flexfed_link_closure(${dep} seen)
      endif()
    endforeach()
  endif()
  set(${out} ${seen} PARENT_SCOPE)
endfunction()

function(flexfed_check_torch_free)
  get_property(targets GLOBAL PROPERTY FLEXFED_TORCH_FREE_TARGETS)
  foreach(target IN LISTS targets)
    set(closure "")
    _flexfed_link_closure(${target} closure)
    foreach(lib IN LISTS closure)
      if(lib MATCHES "^(torch|torch_cpu|torch_cuda|c10|c10_cuda|Caffe2::.*)$" OR lib MATCHES "/lib(torch|c10)[^/]*\\.so")
        message(FATAL_ERROR "${target} is torch-free (docs/ARCHITECTURE.md §2) but links ${lib}: "
                            "move the code that needs tensors to common/model/ or a library above it")
      endif()
    endforeach()
  endforeach()
endfunction()
