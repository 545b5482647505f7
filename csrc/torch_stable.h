// What the host code uses of torch: only its stable C ABI (torch/csrc/stable, torch/headeronly),
// so that one build of flash_gla._C loads under every torch from the targeted release on.
//
// setup.py passes -DTORCH_TARGET_VERSION (from flash_gla/version.py's MIN_TORCH): the stable
// headers then hide everything newer than that release, so a call that an older torch lacks
// fails to compile here instead of failing to load there. Nothing in csrc/ may include
// torch/extension.h, ATen or c10 headers: their C++ symbols change between releases
// (tests/test_packaging.py checks the built library for them).
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#ifndef TORCH_TARGET_VERSION
#error "build flash_gla through setup.py, which sets TORCH_TARGET_VERSION (the oldest torch it must load under)"
#endif

namespace flash_gla {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// Makes the tensor's device current for the guard's lifetime (kernels launch on the current device).
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// The stream torch runs work on for `device` (what the caller's `torch.cuda.stream(...)` set).
inline cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "flash_gla: could not get the current CUDA stream of device ", device);
  return static_cast<cudaStream_t>(stream);
}

// Tensors on one device for the scratch buffers: `like`'s device, the given dtype, uninitialised.
inline Tensor empty_on(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::empty(std::vector<int64_t>(sizes), dtype, std::nullopt, like.device());
}

}  // namespace flash_gla
