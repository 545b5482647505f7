// Host-side entry to the SM90 decode kernel family. Host code sees only this header:
// one explicitly instantiated run_decode per (dtype, dv, d_rope, row warpgroups) in
// hopper/decode/instances/.
#pragma once

#include <cuda_runtime.h>

#include "params.h"

namespace flash_gla::hopper {

enum class DType { kBF16, kFP16 };

// Launches the decode kernel for params.batch requests on `stream`; throws on launch failure.
// kRowWGs: consumer warpgroups stacked along the packed query rows (64 rows each).
template <DType kDType, int kHeadDimV, int kHeadDimRope, int kRowWGs>
void run_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace flash_gla::hopper
