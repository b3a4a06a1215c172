#pragma once

/// Kernels compiled at run time, so that the library stays header-only and
/// needs no nvcc: NVRTC turns a kernel's CUDA source into a device binary
/// at its first use on a device, and the CUDA driver loads it. Both are
/// opened with dlopen, so that a program links neither. Compiling needs no
/// device: the tests compile every kernel on machines without one.
///
/// NVRTC is looked for under its usual names, then beside the CUDA runtime
/// that LibTorch loaded (PyPI's torch keeps it in nvidia/cu13/lib); the
/// environment variable STYLEINJECT_NVRTC names another file.

#include <torch/torch.h>

#include <dlfcn.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace styleinject {
namespace cuda {
namespace detail {

/// The handle of the first of `paths` that dlopen opens; null if none.
inline void* open_first(const std::vector<std::string>& paths) {
  for (const auto& path : paths) {
    if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      return handle;
    }
  }
  return nullptr;
}

/// The folder of the loaded shared library that defines `symbol`, with a
/// trailing '/'; empty if none does.
inline std::string folder_of(const char* symbol) {
  Dl_info info{};
  void* address = dlsym(RTLD_DEFAULT, symbol);
  if (address == nullptr || dladdr(address, &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  const std::string path = info.dli_fname;
  return path.substr(0, path.rfind('/') + 1);
}

/// Sets `function` to the function `name` of the library `handle`;
/// `library` names the library in the error if it has none.
template <typename Function>
void load_function(
    void* handle,
    const char* name,
    Function& function,
    const char* library) {
  function = reinterpret_cast<Function>(dlsym(handle, name));
  TORCH_CHECK(
      function != nullptr,
      "styleinject: expected ",
      name,
      " in ",
      library,
      ", but it has none (CUDA 11.2 or newer has every one used here)");
}

/// Where NVRTC may be, in the order tried.
inline std::vector<std::string> nvrtc_paths() {
  if (const char* chosen = std::getenv("STYLEINJECT_NVRTC")) {
    return {chosen};
  }
  const std::vector<std::string> names = {
      "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
  auto paths = names;
  const auto runtime_folder = folder_of("cudaRuntimeGetVersion");
  if (!runtime_folder.empty()) {
    for (const auto& name : names) {
      paths.push_back(runtime_folder + name);
    }
  }
  return paths;
}

/// NVRTC's entry points that compiling a kernel needs. Its handles and
/// results are opaque here (no nvrtc.h): a program is a pointer, a result
/// an int, 0 for success.
struct Nvrtc {
  using Program = void*;
  int (*create_program)(
      Program*,
      const char* source,
      const char* name,
      int headers,
      const char* const* header_sources,
      const char* const* header_names);
  int (*compile_program)(Program, int options, const char* const* values);
  int (*cubin_size)(Program, size_t*);
  int (*cubin)(Program, char*);
  int (*ptx_size)(Program, size_t*);
  int (*ptx)(Program, char*);
  int (*log_size)(Program, size_t*);
  int (*log)(Program, char*);
  int (*destroy_program)(Program*);
  const char* (*error_string)(int);
  int (*supported_arch_count)(int*);
  int (*supported_archs)(int*);

  /// NVRTC, opened once per process; an error names where it looked.
  static const Nvrtc& get() {
    static const Nvrtc nvrtc = open();
    return nvrtc;
  }

 private:
  static Nvrtc open() {
    const auto paths = nvrtc_paths();
    void* handle = open_first(paths);
    TORCH_CHECK(
        handle != nullptr,
        "styleinject: expected NVRTC (libnvrtc) to compile the library's CUDA "
        "kernels, but found none at ",
        c10::Join(", ", paths),
        "; set STYLEINJECT_NVRTC to its path");
    Nvrtc n{};
    load_function(handle, "nvrtcCreateProgram", n.create_program, "NVRTC");
    load_function(handle, "nvrtcCompileProgram", n.compile_program, "NVRTC");
    load_function(handle, "nvrtcGetCUBINSize", n.cubin_size, "NVRTC");
    load_function(handle, "nvrtcGetCUBIN", n.cubin, "NVRTC");
    load_function(handle, "nvrtcGetPTXSize", n.ptx_size, "NVRTC");
    load_function(handle, "nvrtcGetPTX", n.ptx, "NVRTC");
    load_function(handle, "nvrtcGetProgramLogSize", n.log_size, "NVRTC");
    load_function(handle, "nvrtcGetProgramLog", n.log, "NVRTC");
    load_function(handle, "nvrtcDestroyProgram", n.destroy_program, "NVRTC");
    load_function(handle, "nvrtcGetErrorString", n.error_string, "NVRTC");
    load_function(
        handle, "nvrtcGetNumSupportedArchs", n.supported_arch_count, "NVRTC");
    load_function(handle, "nvrtcGetSupportedArchs", n.supported_archs, "NVRTC");
    return n;
  }
};

/// The architectures (major * 10 + minor) that NVRTC compiles for.
inline std::vector<int> supported_archs() {
  const auto& nvrtc = Nvrtc::get();
  int count = 0;
  nvrtc.supported_arch_count(&count);
  std::vector<int> archs(count);
  nvrtc.supported_archs(archs.data());
  return archs;
}

/// A compiled kernel: a cubin for one architecture, or PTX (text) that the
/// driver compiles for its device when NVRTC cannot target the device.
struct DeviceCode {
  std::string image;
  bool ptx;
};

/// Compiles `source` for a device of architecture `arch` (e.g. 90 for
/// sm_90): a cubin where NVRTC knows the architecture, else PTX for the
/// newest one it knows below it. `name` names the source in errors.
inline DeviceCode compile(
    const std::string& source,
    const std::string& name,
    int arch) {
  const auto& nvrtc = Nvrtc::get();
  const auto archs = supported_archs();
  TORCH_CHECK(
      !archs.empty() && archs.front() <= arch,
      "styleinject: NVRTC compiles for sm_",
      archs.empty() ? 0 : archs.front(),
      " or newer, but the device is sm_",
      arch);
  int target = archs.front();
  for (int a : archs) {
    target = a <= arch ? a : target;
  }
  const bool ptx = target != arch;
  const auto option =
      (ptx ? "--gpu-architecture=compute_" : "--gpu-architecture=sm_") +
      std::to_string(target);
  const std::vector<const char*> options = {option.c_str(), "--std=c++17"};
  Nvrtc::Program program = nullptr;
  TORCH_CHECK(
      nvrtc.create_program(
          &program, source.c_str(), name.c_str(), 0, nullptr, nullptr) == 0,
      "styleinject: NVRTC could not create a program for ",
      name);
  const int status = nvrtc.compile_program(
      program, static_cast<int>(options.size()), options.data());
  size_t size = 0;
  std::string text;
  if (status != 0) {
    nvrtc.log_size(program, &size);
    text.resize(size);
    nvrtc.log(program, &text[0]);
    nvrtc.destroy_program(&program);
    TORCH_CHECK(
        false,
        "styleinject: NVRTC failed to compile ",
        name,
        " for ",
        option,
        ": ",
        nvrtc.error_string(status),
        "\n",
        text);
  }
  (ptx ? nvrtc.ptx_size : nvrtc.cubin_size)(program, &size);
  text.resize(size);
  (ptx ? nvrtc.ptx : nvrtc.cubin)(program, &text[0]);
  nvrtc.destroy_program(&program);
  return {text, ptx};
}

} // namespace detail
} // namespace cuda
} // namespace styleinject
