# Shared by .ci/demo and .ci/test: installs what is missing on a Debian 12
# machine and builds the project against one of the two LibTorch sources.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${STYLEINJECT_VENV:-$repo/.venv}
jobs=$(nproc)

# Debian's packages: the compilers (clang for libFuzzer), CMake, LibTorch
# 1.13 with OpenBLAS (Debian's LibTorch runs its GEMMs on whichever
# libblas.so.3 is installed, and the reference one it gets otherwise is some
# 40 times slower), nlohmann-json, fmt, Catch2 2, Gloo's headers (which
# neither LibTorch ships; styleinject/distributed.h's CPU process groups
# need them), and venv for the PyPI side; for the typeface example FreeType, fontconfig, libpng, CLI11, its
# fonts and matplotlib (the experiments' plots).
install_missing() {
  local wanted=(ca-certificates cmake ninja-build g++ make clang libclang-rt-dev
    libtorch-dev libopenblas0-pthread nlohmann-json3-dev libfmt-dev catch2
    libgloo-dev
    python3-venv libfreetype-dev libfontconfig-dev libpng-dev libcli11-dev
    fontconfig
    fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-lobster
    fonts-humor-sans fonts-comic-neue fonts-ebgaramond fonts-dkg-handwriting
    fonts-isabella python3-matplotlib)
  local missing=() package
  for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null |
      grep -q 'install ok installed' || missing+=("$package")
  done
  if ((${#missing[@]})); then
    echo "== installing from Debian: ${missing[*]}"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"
  fi
}

# PyPI's torch 2.x (a CUDA build; its LibTorch runs on the CPU too), and
# for the interop tests safetensors, numpy, and the peers whose LoRA files
# they exchange (peft, diffusers), in a virtual environment.
install_pypi_torch() {
  if ! "$venv/bin/python" -c 'import torch, safetensors, numpy, peft, diffusers' \
    2>/dev/null; then
    echo "== installing torch 2.x, safetensors, numpy, peft and diffusers from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'torch>=2,<3' safetensors numpy \
      'peft>=0.17,<1' 'diffusers>=0.35,<1'
  fi
}

# PyPI's torch is a CUDA build: its CMake config (Caffe2Config) refuses to
# configure without a CUDA toolkit, even to run on the CPU, and CMake's CUDA
# detection wants nvcc on PATH. Machines of this project's kind have the
# toolkit in /usr/local/cuda.
require_cuda_toolkit() {
  if ! have_cuda_toolkit; then
    echo "error: building against PyPI's torch (a CUDA build) needs a CUDA" \
      "toolkit, but found no nvcc on PATH or in /usr/local/cuda." >&2
    echo "Install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads)," \
      "then run this again." >&2
    exit 1
  fi
}

# Whether a CUDA toolkit is found (nvcc on PATH or in /usr/local/cuda),
# with PATH extended to it.
have_cuda_toolkit() {
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
  fi
  command -v nvcc >/dev/null
}

pypi_torch_prefix() {
  "$venv/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null
}

# configure_and_build NAME [CMAKE ARGS...] [-- TARGET...]: into build/NAME,
# with Ninja, at -O1: what .ci builds spends its time in LibTorch (the demo
# ran 25.2 s at -O1 against 25.6 s at -O3), and -O1 compiles in a third of
# the time (the typeface example: 37 s against 98 s). For timings, build
# with your own flags (styleinject_bench prints the ones it was built with).
configure_and_build() {
  local name=$1
  shift
  local args=() targets=()
  while (($#)) && [ "$1" != -- ]; do args+=("$1"); shift; done
  (($#)) && shift && targets=(--target "$@")
  echo "== build/$name"
  local start=$SECONDS
  if grep -qs '^CMAKE_GENERATOR:INTERNAL=Unix Makefiles' "$repo/build/$name/CMakeCache.txt"; then
    echo "== build/$name was made by an older .ci with Make: building it afresh with Ninja"
    rm -rf "${repo:?}/build/$name"
  fi
  cmake -S "$repo" -B "$repo/build/$name" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" "${args[@]}"
  cmake --build "$repo/build/$name" -j "$jobs" "${targets[@]}"
  echo "== build/$name built in $((SECONDS - start)) s"
}

# run_tests NAME [CTEST ARGS...]: CTest in build/NAME, timed.
run_tests() {
  local name=$1
  shift
  local start=$SECONDS
  ctest --test-dir "$repo/build/$name" -j "$jobs" --output-on-failure "$@"
  echo "== build/$name tested in $((SECONDS - start)) s"
}
