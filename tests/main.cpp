// The test runner: Catch2's session, plus the CUDA skip rule.

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <torch/cuda.h>

#include <cstring>
#include <iostream>

int main(int argc, char* argv[]) {
  // CTest runs the [cuda] cases on their own. Without a CUDA device they
  // exit with 77, which CTest reports as skipped (SKIP_RETURN_CODE), never
  // as passed.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "[cuda]") == 0 && !torch::cuda::is_available()) {
      std::cout << "No CUDA device: the [cuda] tests are skipped.\n";
      return 77;
    }
  }
  return Catch::Session().run(argc, argv);
}
