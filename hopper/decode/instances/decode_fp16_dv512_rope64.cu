// One compiled instance: fp16, dv 512, 64 RoPE dims inline (MLA).
#include "decode/launch.cuh"

namespace flash_gla::hopper {
template void run_decode<DType::kFP16, 512, 64, 1>(const DecodeParams&, cudaStream_t);
}  // namespace flash_gla::hopper
