// Turns a CUDA error into a C++ exception that names what was being done (torch turns it
// into a Python RuntimeError).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flash_gla {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("flash_gla: ") + what + ": " + cudaGetErrorString(status));
  }
}

// After a kernel launch: a bad configuration or a missing kernel image shows up here.
inline void check_launch(const char* kernel) {
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess) {
    throw std::runtime_error(std::string("flash_gla: launching the ") + kernel + " kernel: " +
                             cudaGetErrorString(status));
  }
}

}  // namespace flash_gla
