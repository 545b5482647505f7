// Host side of the decode ops: plan -> allocate -> fill params -> launch decode -> combine.
#include "decode_api.h"

#include <algorithm>
#include <cmath>

#include "combine/run_combine.h"
#include "common/cuda_check.h"
#include "common/params.h"
#include "common/tile_policy.h"
#include "decode_instances.h"
#include "schedule/run_scheduler.h"

namespace flash_gla {

namespace {

// Multiprocessors of a device (cached per device: the attribute query is not free).
int device_num_sms(int device) {
  static int cached[64] = {0};
  STD_TORCH_CHECK(device >= 0 && device < 64, "flash_gla: CUDA device index ", device, " out of range");
  int& sms = cached[device];
  if (sms == 0) {
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "reading the SM count");
  }
  return sms;
}

// The compiled instance for these shapes (csrc/decode_instances.h, generated from the one list
// in hopper/decode/instances/generate.py), with the rows per CTA that the tile policy picks.
const DecodeInstance& find_instance(const DecodeParams& params, DType dtype) {
  const int d_nope = params.head_dim_qk - params.head_dim_rope;
  const bool shared_rope = params.rope != nullptr;
  const bool kv_fp8 = params.kv_scale != nullptr;
  auto same_variant = [&](const DecodeInstance& inst) {
    return inst.dtype == dtype && inst.head_dim_v == params.head_dim_v && inst.head_dim_nope == d_nope &&
           inst.head_dim_rope == params.head_dim_rope && inst.shared_rope == shared_rope && inst.kv_fp8 == kv_fp8;
  };
  // A transposed instance (tokens as the wgmma's M) where one serves these rows, the one with
  // the fewest query columns; else the row warpgroups that the tile policy picks.
  const DecodeInstance* found = nullptr;
  for (const DecodeInstance& inst : kDecodeInstances) {
    if (same_variant(inst) && inst.query_cols >= params.rows_per_kv_head &&
        (found == nullptr || inst.query_cols < found->query_cols)) {
      found = &inst;
    }
  }
  if (found != nullptr) { return *found; }
  int max_row_warpgroups = 0;
  for (const DecodeInstance& inst : kDecodeInstances) {
    if (same_variant(inst) && inst.query_cols == 0) {
      max_row_warpgroups = std::max(max_row_warpgroups, inst.row_warpgroups);
    }
  }
  const int row_warpgroups = row_warpgroups_for(params.rows_per_kv_head, max_row_warpgroups);
  for (const DecodeInstance& inst : kDecodeInstances) {
    if (same_variant(inst) && inst.query_cols == 0 && inst.row_warpgroups == row_warpgroups) { found = &inst; }
  }
  STD_TORCH_CHECK(found != nullptr, "flash_gla: no compiled decode kernel for head_dim_v=",
                    params.head_dim_v, ", d_nope=", d_nope, ", d_rope=", params.head_dim_rope,
                    shared_rope ? " (shared rope cache)" : " (inline RoPE)", kv_fp8 ? ", FP8 cache" : "");
  return *found;
}

}  // namespace

int64_t get_num_sm_parts(int64_t device, int64_t num_q_tokens_per_head_k, int64_t num_heads_k) {
  return num_sm_parts(device_num_sms(static_cast<int>(device)), static_cast<int>(num_q_tokens_per_head_k),
                      static_cast<int>(num_heads_k));
}

std::tuple<Tensor, Tensor> get_metadata(const Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                                        int64_t num_heads_k, bool batch_invariant) {
  STD_TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.scalar_type() == ScalarType::Int &&
                      cache_seqlens.dim() == 1 && cache_seqlens.is_contiguous(),
                  "flash_gla: cache_seqlens must be a contiguous int32 CUDA vector");
  const int32_t device = cache_seqlens.get_device_index();
  const DeviceGuard guard(device);
  const int batch = static_cast<int>(cache_seqlens.size(0));
  const int parts = static_cast<int>(get_num_sm_parts(device, num_q_tokens_per_head_k, num_heads_k));
  Tensor meta = empty_on(cache_seqlens, {parts + (batch_invariant ? 1 : 0), kMetaFields}, ScalarType::Int);
  Tensor num_splits = empty_on(cache_seqlens, {batch + 1}, ScalarType::Int);
  run_scheduler(cache_seqlens.const_data_ptr<int>(), batch, parts,
                reinterpret_cast<PartPlan*>(meta.mutable_data_ptr<int>()),
                num_splits.mutable_data_ptr<int>(), current_stream(device), batch_invariant);
  return {meta, num_splits};
}

Tensor decode(const Tensor& q, const Tensor& kv_cache, const std::optional<Tensor>& rope_cache,
              const Tensor& block_table, const Tensor& cache_seqlens, int64_t head_dim_v,
              const Tensor& tile_scheduler_metadata, const Tensor& num_splits, double softmax_scale,
              bool causal, const Tensor& out, const std::optional<Tensor>& attn_sink, bool batch_invariant,
              const std::optional<Tensor>& kv_scale) {
  STD_TORCH_CHECK(q.is_cuda() && q.dim() == 4 && q.stride(3) == 1 && kv_cache.dim() == 4 && kv_cache.stride(3) == 1,
                  "flash_gla: q and kv_cache must be 4-d CUDA tensors with a contiguous last dim");
  STD_TORCH_CHECK(!attn_sink.has_value() ||
                      (attn_sink->is_cuda() && attn_sink->scalar_type() == ScalarType::Float &&
                       attn_sink->is_contiguous() && attn_sink->numel() == q.size(2)),
                  "flash_gla: attn_sink must be a contiguous float32 CUDA tensor (h_q,)");
  STD_TORCH_CHECK(!rope_cache.has_value() || (rope_cache->is_cuda() && rope_cache->dim() == 4 &&
                                              rope_cache->stride(3) == 1 && rope_cache->size(2) == 1),
                  "flash_gla: rope_cache must be a CUDA tensor (num_blocks, 64, 1, d_rope), last dim contiguous");
  STD_TORCH_CHECK(out.dim() == 4 && out.scalar_type() == q.scalar_type() && out.size(3) == head_dim_v &&
                      out.stride(3) == 1,
                  "flash_gla: out must be (b, s_q, h_q, head_dim_v) of q's dtype, last dim contiguous");
  // An e4m3 cache comes with its scales and keeps its RoPE keys in the rope cache.
  const bool kv_fp8 = kv_cache.scalar_type() == ScalarType::Float8_e4m3fn;
  STD_TORCH_CHECK(kv_fp8 ? kv_scale.has_value() && rope_cache.has_value() : !kv_scale.has_value(),
                  "flash_gla: a float8_e4m3fn kv_cache needs kv_scale and rope_cache; another kv_cache takes no kv_scale");
  STD_TORCH_CHECK(kv_fp8 || kv_cache.scalar_type() == q.scalar_type(), "flash_gla: kv_cache must have q's dtype or be float8_e4m3fn");
  if (kv_scale.has_value()) {
    STD_TORCH_CHECK(kv_scale->is_cuda() && kv_scale->scalar_type() == ScalarType::Float && kv_scale->dim() == 4 &&
                        kv_scale->size(0) == kv_cache.size(0) && kv_scale->size(1) == kv_cache.size(1) &&
                        kv_scale->size(2) == kv_cache.size(2) && kv_scale->size(3) == (kv_cache.size(3) + kScaleGroup - 1) / kScaleGroup,
                    "flash_gla: kv_scale must be a float32 CUDA tensor (num_blocks, 64, h_kv, ceil(d / 128))");
  }
  const int32_t device = q.get_device_index();
  const DeviceGuard guard(device);
  const auto batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), dim_qk = q.size(3);
  const auto heads_kv = kv_cache.size(2);
  const auto group = heads_q / heads_kv;
  const auto rows = seqlen_q * group;
  // The batch-invariant plan has one header row after the parts' rows. The row count is the
  // one thing that tells the plans apart on the host: check it here too, so that a compiled
  // call (which skips the Python check) cannot read one plan as the other.
  const auto num_parts = tile_scheduler_metadata.size(0) - (batch_invariant ? 1 : 0);
  STD_TORCH_CHECK(num_parts == get_num_sm_parts(device, rows, heads_kv),
                  "flash_gla: tile_scheduler_metadata has ", tile_scheduler_metadata.size(0),
                  " rows, not the scheduler parts of this call's shape", batch_invariant ? " plus one" : "",
                  ": plan with get_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, enable_batch_invariant=",
                  batch_invariant ? "True" : "False", ")");
  STD_TORCH_CHECK(num_parts <= kMaxSplitsPerRequest, "flash_gla: too many scheduler parts");

  Tensor lse = empty_on(q, {batch, heads_q, seqlen_q}, ScalarType::Float);
  // One slot per request piece: a part boundary splits at most one request, so there are
  // at most batch + num_parts pieces; the batch-invariant plan cuts a request into at most
  // kInvariantMaxChunks pieces, whatever its length.
  const auto slots = batch_invariant ? batch * kInvariantMaxChunks : batch + num_parts;
  // The partial O (slots, h_kv, rows, dv) and LSE (slots, h_kv, rows) in one allocation (one
  // allocator call less per decode call: host time); the LSE part starts at a multiple of dv
  // floats, so it keeps 16-byte alignment.
  const int64_t o_accum_size = slots * heads_kv * rows * head_dim_v;
  Tensor accum = empty_on(q, {o_accum_size + slots * heads_kv * rows}, ScalarType::Float);

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
  // The transposed consumer takes its column maxima over unscaled scores: a positive scale
  // keeps their order.
  STD_TORCH_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale),
                  "flash_gla: softmax_scale must be positive and finite, got ", softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);

  p.q = q.const_data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.kv = kv_cache.const_data_ptr();
  p.kv_page_stride = kv_cache.stride(0);
  p.kv_token_stride = kv_cache.stride(1);
  p.kv_head_stride = kv_cache.stride(2);
  if (kv_scale.has_value()) {
    p.kv_scale = kv_scale->const_data_ptr<float>();
    p.kv_scale_page_stride = kv_scale->stride(0);
    p.kv_scale_token_stride = kv_scale->stride(1);
    p.kv_scale_head_stride = kv_scale->stride(2);
    p.kv_scale_group_stride = kv_scale->stride(3);
  }
  if (rope_cache.has_value()) {
    p.rope = rope_cache->const_data_ptr();
    p.rope_page_stride = rope_cache->stride(0);
    p.rope_token_stride = rope_cache->stride(1);
  }
  p.block_table = block_table.const_data_ptr<int>();
  p.block_table_batch_stride = block_table.stride(0);
  p.cache_seqlens = cache_seqlens.const_data_ptr<int>();
  p.attn_sink = attn_sink.has_value() ? attn_sink->const_data_ptr<float>() : nullptr;

  p.out = out.mutable_data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_seq_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse = lse.mutable_data_ptr<float>();
  p.o_accum = accum.mutable_data_ptr<float>();
  p.lse_accum = p.o_accum + o_accum_size;

  p.sched_meta = reinterpret_cast<const PartPlan*>(tile_scheduler_metadata.const_data_ptr<int>());
  p.num_splits = num_splits.const_data_ptr<int>();
  p.num_parts = static_cast<int>(num_parts);
  p.batch_invariant = batch_invariant;
  p.num_sms = device_num_sms(device);

  const bool bf16 = q.scalar_type() == ScalarType::BFloat16;
  STD_TORCH_CHECK(bf16 || q.scalar_type() == ScalarType::Half, "flash_gla: q must be bf16 or fp16");
  const DType dtype = bf16 ? DType::kBF16 : DType::kFP16;
  const cudaStream_t stream = current_stream(device);
  find_instance(p, dtype).run(p, stream);
  run_combine(p, dtype, stream);
  return lse;
}

}  // namespace flash_gla
