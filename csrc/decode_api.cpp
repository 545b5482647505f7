// Host side of the decode ops: plan -> allocate -> fill params -> launch decode -> combine.
#include "decode_api.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "combine.h"
#include "common/params.h"
#include "common/tile_policy.h"
#include "decode_instances.h"
#include "scheduler.h"

namespace flash_gla {

namespace {

// Multiprocessors of the current device (cached per device: the attribute query is not free).
int device_num_sms() {
  static int cached[64] = {0};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int& sms = cached[device % 64];
  if (sms == 0) { C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)); }
  return sms;
}

// The compiled instance for these shapes (csrc/decode_instances.h, generated from the one list
// in hopper/decode/instances/generate.py), with the rows per CTA that the tile policy picks.
const DecodeInstance& find_instance(const DecodeParams& params, DType dtype) {
  const int d_nope = params.head_dim_qk - params.head_dim_rope;
  const bool shared_rope = params.rope != nullptr;
  auto same_variant = [&](const DecodeInstance& inst) {
    return inst.dtype == dtype && inst.head_dim_v == params.head_dim_v && inst.head_dim_nope == d_nope &&
           inst.head_dim_rope == params.head_dim_rope && inst.shared_rope == shared_rope;
  };
  int max_row_warpgroups = 0;
  for (const DecodeInstance& inst : kDecodeInstances) {
    if (same_variant(inst)) { max_row_warpgroups = std::max(max_row_warpgroups, inst.row_warpgroups); }
  }
  const int row_warpgroups = row_warpgroups_for(params.rows_per_kv_head, max_row_warpgroups);
  const DecodeInstance* found = nullptr;
  for (const DecodeInstance& inst : kDecodeInstances) {
    if (same_variant(inst) && inst.row_warpgroups == row_warpgroups) { found = &inst; }
  }
  TORCH_CHECK_VALUE(found != nullptr, "flash_gla: no compiled decode kernel for head_dim_v=",
                    params.head_dim_v, ", d_nope=", d_nope, ", d_rope=", params.head_dim_rope,
                    shared_rope ? " (shared rope cache)" : " (inline RoPE)");
  return *found;
}

}  // namespace

int64_t get_num_sm_parts(int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  return num_sm_parts(device_num_sms(), static_cast<int>(num_q_tokens_per_head_k),
                      static_cast<int>(num_heads_k));
}

std::vector<at::Tensor> get_metadata(const at::Tensor& cache_seqlens,
                                     int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.scalar_type() == at::kInt &&
                  cache_seqlens.dim() == 1 && cache_seqlens.is_contiguous(),
              "flash_gla: cache_seqlens must be a contiguous int32 CUDA vector");
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int batch = static_cast<int>(cache_seqlens.size(0));
  const int parts = static_cast<int>(get_num_sm_parts(num_q_tokens_per_head_k, num_heads_k));
  auto opts = cache_seqlens.options();
  at::Tensor meta = at::empty({parts, kMetaFields}, opts);
  at::Tensor num_splits = at::empty({batch + 1}, opts);
  run_scheduler(cache_seqlens.data_ptr<int>(), batch, parts, meta.data_ptr<int>(),
                num_splits.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
  return {meta, num_splits};
}

std::vector<at::Tensor> decode(const at::Tensor& q, const at::Tensor& kv_cache,
                               const std::optional<at::Tensor>& rope_cache,
                               const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                               int64_t head_dim_v, const at::Tensor& tile_scheduler_metadata,
                               const at::Tensor& num_splits, double softmax_scale, bool causal,
                               const std::optional<at::Tensor>& out_opt,
                               const std::optional<at::Tensor>& attn_sink) {
  TORCH_CHECK(q.is_cuda() && q.stride(-1) == 1 && kv_cache.stride(-1) == 1,
              "flash_gla: q and kv_cache must be CUDA tensors with a contiguous last dim");
  TORCH_CHECK(!attn_sink.has_value() || (attn_sink->is_cuda() && attn_sink->scalar_type() == at::kFloat &&
                                         attn_sink->is_contiguous() && attn_sink->numel() == q.size(2)),
              "flash_gla: attn_sink must be a contiguous float32 CUDA tensor (h_q,)");
  TORCH_CHECK(!rope_cache.has_value() || (rope_cache->is_cuda() && rope_cache->stride(-1) == 1 &&
                                          rope_cache->size(2) == 1),
              "flash_gla: rope_cache must be a CUDA tensor (num_blocks, 64, 1, d_rope), last dim contiguous");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), dim_qk = q.size(3);
  const auto heads_kv = kv_cache.size(2);
  const auto group = heads_q / heads_kv;
  const auto rows = seqlen_q * group;
  const auto num_parts = tile_scheduler_metadata.size(0);
  TORCH_CHECK(num_parts <= kMaxSplitsPerRequest, "flash_gla: too many scheduler parts");

  at::Tensor out = out_opt.has_value() ? *out_opt
                                       : at::empty({batch, seqlen_q, heads_q, head_dim_v}, q.options());
  at::Tensor lse = at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));
  // One slot per request piece: a part boundary splits at most one request, so there are
  // at most batch + num_parts pieces.
  const auto slots = batch + num_parts;
  at::Tensor o_accum = at::empty({slots, heads_kv, rows, head_dim_v}, q.options().dtype(at::kFloat));
  at::Tensor lse_accum = at::empty({slots, heads_kv, rows}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.group_size = static_cast<int>(group);
  p.rows_per_kv_head = static_cast<int>(rows);
  p.head_dim_qk = static_cast<int>(dim_qk);
  p.head_dim_v = static_cast<int>(head_dim_v);
  // Inline, the RoPE dims follow V in every row (d_qk = dv + d_rope).
  p.head_dim_rope = static_cast<int>(rope_cache.has_value() ? rope_cache->size(3) : dim_qk - head_dim_v);
  p.num_pages = static_cast<int>(kv_cache.size(0));
  p.max_pages_per_seq = static_cast<int>(block_table.size(1));
  p.causal = causal;
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);

  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.kv = kv_cache.data_ptr();
  p.kv_page_stride = kv_cache.stride(0);
  p.kv_token_stride = kv_cache.stride(1);
  p.kv_head_stride = kv_cache.stride(2);
  if (rope_cache.has_value()) {
    p.rope = rope_cache->data_ptr();
    p.rope_page_stride = rope_cache->stride(0);
    p.rope_token_stride = rope_cache->stride(1);
  }
  p.block_table = block_table.data_ptr<int>();
  p.block_table_batch_stride = block_table.stride(0);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.attn_sink = attn_sink.has_value() ? attn_sink->data_ptr<float>() : nullptr;

  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_seq_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.o_accum = o_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();

  p.sched_meta = tile_scheduler_metadata.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.num_parts = static_cast<int>(num_parts);
  p.num_sms = device_num_sms();

  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(bf16 || q.scalar_type() == at::kHalf, "flash_gla: q must be bf16 or fp16");
  const DType dtype = bf16 ? DType::kBF16 : DType::kFP16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  find_instance(p, dtype).run(p, stream);
  run_combine(p, dtype, stream);
  return {out, lse};
}

}  // namespace flash_gla
