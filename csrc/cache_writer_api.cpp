// Host side of the paged-cache writer: tensors -> CacheWriteParams -> run_write_kvcache.
#include "cache_writer_api.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cache_writer.h"

namespace flash_gla {

void write_kvcache(const at::Tensor& kv_cache, const at::Tensor& slot_mapping, const at::Tensor& kv,
                   const std::optional<at::Tensor>& rope, const std::optional<at::Tensor>& rope_cache) {
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf, "flash_gla: write_kvcache: kv_cache must be bf16 or fp16");
  TORCH_CHECK_TYPE(kv.scalar_type() == dtype && (!rope || rope->scalar_type() == dtype) &&
                       (!rope_cache || rope_cache->scalar_type() == dtype),
                   "flash_gla: write_kvcache: kv, rope and rope_cache must have kv_cache's dtype");
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "flash_gla: write_kvcache: slot_mapping must be int64");
  TORCH_CHECK(kv_cache.is_cuda() && kv_cache.dim() == 4 && kv_cache.size(1) == kPageSize && kv_cache.stride(3) == 1,
              "flash_gla: write_kvcache: kv_cache must be a CUDA tensor (num_blocks, 64, h_kv, d), last dim contiguous");
  TORCH_CHECK(slot_mapping.dim() == 1 && kv.dim() == 3 && kv.size(0) == slot_mapping.size(0) &&
                  kv.size(1) == kv_cache.size(2) && kv.stride(2) == 1,
              "flash_gla: write_kvcache: kv must be (T, h_kv, d_kv) with T = slot_mapping.shape[0], last dim contiguous");
  TORCH_CHECK(!rope_cache || rope, "flash_gla: write_kvcache: a rope_cache needs rope");
  const int64_t rope_dim = rope ? rope->size(1) : 0;
  if (rope) {
    TORCH_CHECK(rope->dim() == 2 && rope->size(0) == kv.size(0) && rope->stride(1) == 1,
                "flash_gla: write_kvcache: rope must be (T, d_rope), last dim contiguous");
  }
  if (rope_cache) {
    TORCH_CHECK(rope_cache->dim() == 4 && rope_cache->size(0) == kv_cache.size(0) &&
                    rope_cache->size(1) == kPageSize && rope_cache->size(2) == 1 && rope_cache->size(3) == rope_dim &&
                    rope_cache->stride(3) == 1 && kv_cache.size(3) == kv.size(2),
                "flash_gla: write_kvcache: rope_cache must be (num_blocks, 64, 1, d_rope), last dim contiguous, "
                "and kv_cache.shape[3] == kv.shape[2]");
  } else {
    TORCH_CHECK(kv_cache.size(3) == kv.size(2) + rope_dim,
                "flash_gla: write_kvcache: kv_cache.shape[3] must be kv.shape[2] + rope.shape[1]");
  }
  for (const at::Tensor* t : {&slot_mapping, &kv, rope ? &*rope : nullptr, rope_cache ? &*rope_cache : nullptr}) {
    TORCH_CHECK(t == nullptr || t->device() == kv_cache.device(), "flash_gla: write_kvcache: all tensors on one device");
  }
  const c10::cuda::CUDAGuard guard(kv_cache.device());

  CacheWriteParams p{};
  p.num_tokens = kv.size(0);
  p.num_slots = kv_cache.size(0) * kPageSize;
  p.num_heads = static_cast<int>(kv.size(1));
  p.kv_dim = static_cast<int>(kv.size(2));
  p.rope_dim = static_cast<int>(rope_dim);

  p.kv = kv.data_ptr();
  p.kv_token_stride = kv.stride(0);
  p.kv_head_stride = kv.stride(1);
  if (rope) {
    p.rope = rope->data_ptr();
    p.rope_token_stride = rope->stride(0);
  }
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.slot_stride = slot_mapping.stride(0);

  p.kv_cache = kv_cache.data_ptr();
  p.cache_block_stride = kv_cache.stride(0);
  p.cache_row_stride = kv_cache.stride(1);
  p.cache_head_stride = kv_cache.stride(2);
  if (rope_cache) {
    p.rope_cache = rope_cache->data_ptr();
    p.rope_cache_block_stride = rope_cache->stride(0);
    p.rope_cache_row_stride = rope_cache->stride(1);
  }
  p.dtype = dtype == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
  run_write_kvcache(p, c10::cuda::getCurrentCUDAStream());
}

}  // namespace flash_gla
