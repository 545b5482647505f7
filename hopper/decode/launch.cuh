// Host launcher shared by every instance: builds the TMA descriptor of the paged cache and
// launches decode_kernel<Traits>. Included only by the instance files.
#pragma once

#include <algorithm>

#include <cute/tensor.hpp>

#include "common/cuda_check.h"
#include "common/tile_policy.h"
#include "decode/kernel.cuh"
#include "decode/run_decode.h"
#include "decode/traits.h"

namespace flash_gla::hopper {

template <DType kDType, int kHeadDimV, int kHeadDimNope, int kHeadDimRope, RopeCache kRope,
          int kRowWGs, KVCache kCache, int kQueryCols>
void run_decode(const DecodeParams& p, cudaStream_t stream) {
  using Traits = DecodeTraits<kDType, kHeadDimV, kHeadDimNope, kHeadDimRope, kRope, kRowWGs, kCache, kQueryCols>;
  using Element = typename Traits::Element;
  using CacheElement = typename Traits::CacheElement;

  // (token in page, dim, kv head, page): the TMA box is one page of one KV head.
  auto kv_layout = make_layout(
      make_shape(Int<Traits::kBlockN>{}, Int<Traits::kKVWidth>{}, p.num_heads_kv, p.num_pages),
      make_stride(p.kv_token_stride, _1{}, p.kv_head_stride, p.kv_page_stride));
  Tensor kv = make_tensor(make_gmem_ptr(static_cast<CacheElement const*>(p.kv)), kv_layout);
  typename Traits::TmaKV tma_kv = make_tma_copy(SM90_TMA_LOAD{}, kv, typename Traits::SmemLayoutCachePage{});
  // (token in page, dim, page) of the shared rope cache. Inline RoPE needs no descriptor: the
  // kernel never touches it, so a default one is passed and no encoding is paid per call.
  typename Traits::TmaRope tma_rope{};
  if constexpr (Traits::kSharedRope) {
    auto rope_layout = make_layout(make_shape(Int<Traits::kBlockN>{}, Int<kHeadDimRope>{}, p.num_pages),
                                   make_stride(p.rope_token_stride, _1{}, p.rope_page_stride));
    tma_rope = make_tma_copy(
        SM90_TMA_LOAD{},
        make_tensor(make_gmem_ptr(static_cast<Element const*>(p.rope)), rope_layout),
        typename Traits::SmemLayoutRopePage{});
  }

  auto kernel = decode_kernel<Traits>;
  constexpr int kSmemBytes = sizeof(typename Traits::SharedStorage);
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  check_cuda(attr_status, "raising the decode kernel's shared-memory limit");
  // All of the SM's unified L1 as shared memory, so that kCtasPerSm CTAs fit beside each other.
  static const cudaError_t carveout_status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared));
  check_cuda(carveout_status, "preferring shared memory for the decode kernel");

  const int num_m_blocks = ceil_div(p.rows_per_kv_head, Traits::kBlockM);
  // About kCtasPerSm CTAs per SM; a CTA walks scheduler parts blockIdx.z, + gridDim.z, ... so
  // that the metadata's part count need not match this instance's rows per CTA. Where the
  // parts do not divide evenly over the CTAs that fit (small groups, planned for the transposed
  // instances' CTAs), each part gets its own CTA and the SMs take them in waves instead, which
  // no CTA outlasts by a whole part.
  const int ctas_per_part = num_m_blocks * p.num_heads_kv;
  int grid_parts = std::max(1, std::min(p.num_parts, Traits::kCtasPerSm * p.num_sms / ctas_per_part));
  if (p.num_parts % grid_parts != 0) { grid_parts = p.num_parts; }
  dim3 grid(num_m_blocks, p.num_heads_kv, grid_parts);
  kernel<<<grid, Traits::kNumThreads, kSmemBytes, stream>>>(p, tma_kv, tma_rope);
  check_launch("decode");
}

}  // namespace flash_gla::hopper
