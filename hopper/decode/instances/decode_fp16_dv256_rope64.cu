// One compiled instance: fp16, dv 256, 64 RoPE dims inline (GLA).
#include "decode/launch.cuh"

namespace flash_gla::hopper {
template void run_decode<DType::kFP16, 256, 64, 1>(const DecodeParams&, cudaStream_t);
}  // namespace flash_gla::hopper
