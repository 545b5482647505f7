// The split-KV combine kernel: a warp merges packed query rows of one request.
//
// Grid (row blocks, requests). Most requests are usually not split (their rows were written by the
// decode kernel), and a block of such a request returns at once, but even empty blocks cost
// launch time. So each request gets only as many blocks as keep every SM busy when all
// requests are split, and a warp walks rows blockIdx.x * kWarps + warp, + gridDim.x * kWarps, ...
//
// Each piece s of a split request holds O_s (normalised over its own keys) and lse_s; the
// merge is O = sum_s exp(lse_s - lse) O_s with lse = log sum_s exp(lse_s). Pieces that saw
// no key have lse_s = -inf and weight 0; a row that no piece saw gets O = 0, lse = +inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "combine/run_combine.h"
#include "common/cuda_check.h"
#include "common/packed_rows.h"

namespace flash_gla {

namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) { x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o)); }
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) { x += __shfl_xor_sync(0xffffffff, x, o); }
  return x;
}

template <class T>
__device__ __forceinline__ void store4(T* dst, float4 v);
template <>
__device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
  uint2 packed = make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
  *reinterpret_cast<uint2*>(dst) = packed;
}
template <>
__device__ __forceinline__ void store4(__half* dst, float4 v) {
  __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
  uint2 packed = make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
  *reinterpret_cast<uint2*>(dst) = packed;
}

// Merges the n pieces of one packed query row (kv head, m) of request `request`.
template <class T>
__device__ __forceinline__ void combine_row(const DecodeParams& p, int request, int first, int n,
                                            int row, float* weights, int lane) {
  const int kv_head = row / p.rows_per_kv_head;
  const int m = row % p.rows_per_kv_head;
  // Piece s of this request, row (kv_head, m): index into lse_accum / rows of o_accum.
  auto slot_row = [&](int s) { return accum_row(p, first + s, kv_head, m); };

  float max_lse = -INFINITY;
  // Not unrolled: n is rarely above 32, and unrolled copies of these loops had their lane
  // offsets hoisted out of the row loop and spilled (ptxas with --use_fast_math).
#pragma unroll 1
  for (int s = lane; s < n; s += 32) { max_lse = fmaxf(max_lse, p.lse_accum[slot_row(s)]); }
  max_lse = warp_max(max_lse);
  const float ref = max_lse == -INFINITY ? 0.f : max_lse;
  float sum = 0.f;
#pragma unroll 1
  for (int s = lane; s < n; s += 32) { sum += expf(p.lse_accum[slot_row(s)] - ref); }
  sum = warp_sum(sum);
  const float lse = sum == 0.f ? INFINITY : ref + logf(sum);
  const PackedRows rows(p.group_size, kv_head);
  int token, head;
  rows.query(m, token, head);
  // The row's share after its attention sink; 0 for a row that saw no key (O is 0 there).
  const float keep = sum == 0.f              ? 0.f
                     : p.attn_sink == nullptr ? 1.f
                                              : sink_factor(lse, p.attn_sink[head]);
#pragma unroll 1
  for (int s = lane; s < n; s += 32) {
    weights[s] = keep * expf(p.lse_accum[slot_row(s)] - lse);
  }
  __syncwarp();

  T* out = static_cast<T*>(p.out) + request * p.o_batch_stride +
           rows.offset(m, p.o_seq_stride, p.o_head_stride);
  for (int col = lane * 4; col < p.head_dim_v; col += 32 * 4) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < n; ++s) {
      const float w = weights[s];
      const float4 o = *reinterpret_cast<const float4*>(p.o_accum + slot_row(s) * p.head_dim_v + col);
      acc.x += w * o.x;
      acc.y += w * o.y;
      acc.z += w * o.z;
      acc.w += w * o.w;
    }
    store4(out + col, acc);
  }
  if (lane == 0) { p.lse[lse_index(p, request, head, token)] = lse; }
  __syncwarp();  // the weights are rewritten for the warp's next row
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32) combine_kernel(const DecodeParams p) {
  __shared__ float weights[kWarps][kMaxSplitsPerRequest];
  const int request = blockIdx.y;
  const int first = p.num_splits[request];
  const int n = p.num_splits[request + 1] - first;
  if (n <= 1) { return; }  // written directly by the decode kernel

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = blockIdx.x * kWarps + warp; row < p.num_heads_kv * p.rows_per_kv_head;
       row += gridDim.x * kWarps) {  // over (kv head, packed row)
    combine_row<T>(p, request, first, n, row, weights[warp], lane);
  }
}

}  // namespace

void run_combine(const DecodeParams& params, DType dtype, cudaStream_t stream) {
  const int rows = params.num_heads_kv * params.rows_per_kv_head;
  // Enough blocks to fill every SM (16 blocks of 4 warps each) if every request were split,
  // and no more than one per kWarps rows.
  const int row_blocks = (rows + kWarps - 1) / kWarps;
  const int wanted = (16 * params.num_sms + params.batch - 1) / params.batch;
  dim3 grid(std::max(1, std::min(row_blocks, wanted)), params.batch);
  if (dtype == DType::kBF16) {
    combine_kernel<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(params);
  } else {
    combine_kernel<__half><<<grid, kWarps * 32, 0, stream>>>(params);
  }
  check_launch("combine");
}

}  // namespace flash_gla
