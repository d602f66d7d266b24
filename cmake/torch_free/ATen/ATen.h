// Shadows LibTorch's <ATen/ATen.h> in the torch-free libraries (cmake/FlexFedGuards.cmake).
#error "LibTorch included from a torch-free library (common/core, common/client, coordinator: docs/ARCHITECTURE.md §2); move the code that needs tensors to common/model/ or above"
