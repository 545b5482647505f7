// Host side of the paged-cache writer: tensors -> CacheWriteParams -> run_write_kvcache.
#include "cache_writer_api.h"

#include "cache/run_cache_writer.h"

namespace flash_gla {

void write_kvcache(const Tensor& kv_cache, const Tensor& slot_mapping, const Tensor& kv,
                   const std::optional<Tensor>& rope, const std::optional<Tensor>& rope_cache,
                   const std::optional<Tensor>& kv_scale) {
  const bool fp8 = kv_cache.scalar_type() == ScalarType::Float8_e4m3fn;
  const ScalarType dtype = kv.scalar_type();  // of kv, rope, rope_cache (and kv_cache unless FP8)
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half,
                  "flash_gla: write_kvcache: kv must be bf16 or fp16");
  STD_TORCH_CHECK((fp8 || kv_cache.scalar_type() == dtype) && (!rope || rope->scalar_type() == dtype) &&
                      (!rope_cache || rope_cache->scalar_type() == dtype),
                  "flash_gla: write_kvcache: kv_cache (unless float8_e4m3fn), rope and rope_cache must have kv's dtype");
  STD_TORCH_CHECK(fp8 == kv_scale.has_value() && (!fp8 || rope_cache),
                  "flash_gla: write_kvcache: a float8_e4m3fn kv_cache needs kv_scale and rope_cache; another needs no "
                  "kv_scale");
  STD_TORCH_CHECK(slot_mapping.scalar_type() == ScalarType::Long, "flash_gla: write_kvcache: slot_mapping must be int64");
  STD_TORCH_CHECK(kv_cache.is_cuda() && kv_cache.dim() == 4 && kv_cache.size(1) == kPageSize && kv_cache.stride(3) == 1,
                  "flash_gla: write_kvcache: kv_cache must be a CUDA tensor (num_blocks, 64, h_kv, d), last dim contiguous");
  STD_TORCH_CHECK(slot_mapping.dim() == 1 && kv.dim() == 3 && kv.size(0) == slot_mapping.size(0) &&
                      kv.size(1) == kv_cache.size(2) && kv.stride(2) == 1,
                  "flash_gla: write_kvcache: kv must be (T, h_kv, d_kv) with T = slot_mapping.shape[0], last dim contiguous");
  STD_TORCH_CHECK(!rope_cache || rope, "flash_gla: write_kvcache: a rope_cache needs rope");
  const int64_t rope_dim = rope ? rope->size(1) : 0;
  if (rope) {
    STD_TORCH_CHECK(rope->dim() == 2 && rope->size(0) == kv.size(0) && rope->stride(1) == 1,
                    "flash_gla: write_kvcache: rope must be (T, d_rope), last dim contiguous");
  }
  if (rope_cache) {
    STD_TORCH_CHECK(rope_cache->dim() == 4 && rope_cache->size(0) == kv_cache.size(0) &&
                        rope_cache->size(1) == kPageSize && rope_cache->size(2) == 1 && rope_cache->size(3) == rope_dim &&
                        rope_cache->stride(3) == 1 && kv_cache.size(3) == kv.size(2),
                    "flash_gla: write_kvcache: rope_cache must be (num_blocks, 64, 1, d_rope), last dim contiguous, "
                    "and kv_cache.shape[3] == kv.shape[2]");
  } else {
    STD_TORCH_CHECK(kv_cache.size(3) == kv.size(2) + rope_dim,
                    "flash_gla: write_kvcache: kv_cache.shape[3] must be kv.shape[2] + rope.shape[1]");
  }
  const int32_t device = kv_cache.get_device_index();
  if (kv_scale) {
    const int64_t groups = (kv.size(2) + kScaleGroup - 1) / kScaleGroup;
    STD_TORCH_CHECK(kv_scale->scalar_type() == ScalarType::Float && kv_scale->dim() == 4 &&
                        kv_scale->size(0) == kv_cache.size(0) && kv_scale->size(1) == kPageSize &&
                        kv_scale->size(2) == kv_cache.size(2) && kv_scale->size(3) == groups,
                    "flash_gla: write_kvcache: kv_scale must be float32 (num_blocks, 64, h_kv, ceil(d / 128))");
  }
  for (const Tensor* t : {&slot_mapping, &kv, rope ? &*rope : nullptr, rope_cache ? &*rope_cache : nullptr,
                          kv_scale ? &*kv_scale : nullptr}) {
    STD_TORCH_CHECK(t == nullptr || (t->is_cuda() && t->get_device_index() == device),
                    "flash_gla: write_kvcache: all tensors on one device");
  }
  const DeviceGuard guard(device);

  CacheWriteParams p{};
  p.num_tokens = kv.size(0);
  p.num_slots = kv_cache.size(0) * kPageSize;
  p.num_heads = static_cast<int>(kv.size(1));
  p.kv_dim = static_cast<int>(kv.size(2));
  p.rope_dim = static_cast<int>(rope_dim);

  p.kv = kv.const_data_ptr();
  p.kv_token_stride = kv.stride(0);
  p.kv_head_stride = kv.stride(1);
  if (rope) {
    p.rope = rope->const_data_ptr();
    p.rope_token_stride = rope->stride(0);
  }
  p.slot_mapping = slot_mapping.const_data_ptr<int64_t>();
  p.slot_stride = slot_mapping.stride(0);

  p.kv_cache = kv_cache.mutable_data_ptr();
  p.cache_block_stride = kv_cache.stride(0);
  p.cache_row_stride = kv_cache.stride(1);
  p.cache_head_stride = kv_cache.stride(2);
  if (rope_cache) {
    p.rope_cache = rope_cache->mutable_data_ptr();
    p.rope_cache_block_stride = rope_cache->stride(0);
    p.rope_cache_row_stride = rope_cache->stride(1);
  }
  if (kv_scale) {
    p.kv_scale = kv_scale->mutable_data_ptr<float>();
    p.scale_block_stride = kv_scale->stride(0);
    p.scale_row_stride = kv_scale->stride(1);
    p.scale_head_stride = kv_scale->stride(2);
    p.scale_group_stride = kv_scale->stride(3);
  }
  p.dtype = dtype == ScalarType::BFloat16 ? DType::kBF16 : DType::kFP16;
  p.cache = fp8 ? CacheElem::kE4M3 : CacheElem::kTokens;
  run_write_kvcache(p, current_stream(device));
}

}  // namespace flash_gla
