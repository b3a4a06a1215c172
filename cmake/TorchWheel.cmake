# Linking against the LibTorch inside PyPI's CUDA `torch` wheel.
#
# libtorch_cuda.so needs the CUDA libraries of the wheel's own nvidia-*
# packages (site-packages/nvidia/*/lib), which it finds at run time through
# its RPATH. The linker does not expand that RPATH's $ORIGIN, and where the
# machine has an older CUDA toolkit in ld.so.conf it resolves libnccl.so.2
# there and fails on undefined nccl* symbols. Pointing -rpath-link at the
# wheel's folders makes link time see what run time sees. Included only by
# top-level builds (tests, examples); the flags are also handed to the
# packaging tests' consumer projects.
file(GLOB _wheel_cuda_lib_dirs LIST_DIRECTORIES true
     "${TORCH_INSTALL_PREFIX}/../nvidia/*/lib")
if(_wheel_cuda_lib_dirs)
  list(JOIN _wheel_cuda_lib_dirs ":" _wheel_rpath_link)
  string(APPEND CMAKE_EXE_LINKER_FLAGS " -Wl,-rpath-link,${_wheel_rpath_link}")
endif()
