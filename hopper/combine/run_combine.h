// Merges the fp32 partial outputs of requests that the scheduler split over several parts.
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace flash_gla {

// For every request with more than one piece, writes params.out and params.lse from
// params.o_accum / params.lse_accum. Requests with one piece were written by the decode
// kernel and are left alone. Throws on launch failure.
void run_combine(const DecodeParams& params, DType dtype, cudaStream_t stream);

}  // namespace flash_gla
