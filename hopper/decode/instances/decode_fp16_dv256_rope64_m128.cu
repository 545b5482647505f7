// One compiled instance: fp16, dv 256, 64 RoPE dims inline (GLA), two row warpgroups
// (128 packed query rows per CTA), for s_q * h_q / h_kv > 64.
#include "decode/launch.cuh"

namespace flash_gla::hopper {
template void run_decode<DType::kFP16, 256, 64, 2>(const DecodeParams&, cudaStream_t);
}  // namespace flash_gla::hopper
