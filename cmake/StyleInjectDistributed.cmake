# styleinject::distributed: what <styleinject/distributed.h> needs besides
# the library. c10d's headers hide their Gloo and NCCL process groups unless
# USE_C10D_GLOO / USE_C10D_NCCL are defined, and neither Debian's LibTorch
# nor PyPI's wheel ships Gloo's headers (Debian: libgloo-dev). Found here
# for this build and again by StyleInjectConfig.cmake for a user's.
if(NOT TARGET styleinject::distributed)
  add_library(styleinject::distributed INTERFACE IMPORTED GLOBAL)
  target_link_libraries(styleinject::distributed INTERFACE styleinject::styleinject)
  find_path(STYLEINJECT_GLOO_INCLUDE_DIR gloo/algorithm.h)
  if(STYLEINJECT_GLOO_INCLUDE_DIR)
    target_compile_definitions(styleinject::distributed INTERFACE USE_C10D_GLOO)
    target_include_directories(styleinject::distributed SYSTEM INTERFACE
      ${STYLEINJECT_GLOO_INCLUDE_DIR})
  else()
    message(WARNING "Gloo's headers (gloo/algorithm.h) not found: "
      "styleinject::distributed will refuse CPU process groups; Debian: apt "
      "install libgloo-dev")
  endif()
  if(TARGET torch_cuda)
    # The wheel's NCCL comes as the nvidia-nccl package beside torch.
    find_path(STYLEINJECT_NCCL_INCLUDE_DIR nccl.h
      HINTS "${TORCH_INSTALL_PREFIX}/../nvidia/nccl/include")
    if(STYLEINJECT_NCCL_INCLUDE_DIR)
      target_compile_definitions(styleinject::distributed INTERFACE USE_C10D_NCCL)
      target_include_directories(styleinject::distributed SYSTEM INTERFACE
        ${STYLEINJECT_NCCL_INCLUDE_DIR})
    endif()
  endif()
endif()
