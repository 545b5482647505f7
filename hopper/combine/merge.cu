// The merge kernel: out = (w_a out_a + w_b out_b) / (w_a + w_b) with w = exp(lse - max), and
// lse = max + log(w_a + w_b); a part whose lse is +inf saw no key and weighs 0; two empty parts
// give out = 0, lse = +inf. One warp per (request, query token, head) row, 16-byte vectors when
// the row allows them: a streaming kernel, two reads and one write per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common/cuda_check.h"
#include "combine/run_merge.h"

namespace flash_gla {

namespace {

constexpr int kWarps = 4;

// kVec elements at a time: 16 bytes when the rows allow it, else one.
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <class T, int kVec>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(const MergeParams p) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) { return; }
  const int head = row % p.heads_q;
  const int64_t token_row = row / p.heads_q;  // b * s_q + s
  const int64_t lse_at = (token_row / p.seqlen_q * p.heads_q + head) * p.seqlen_q + token_row % p.seqlen_q;
  // +inf marks a part without keys: it takes no part in the maximum or the sum.
  const float la = p.lse_a[lse_at], lb = p.lse_b[lse_at];
  const float a = la == INFINITY ? -INFINITY : la, b = lb == INFINITY ? -INFINITY : lb;
  const float m = fmaxf(a, b);
  const bool empty = m == -INFINITY;
  const float wa = empty ? 0.f : expf(a - m), wb = empty ? 0.f : expf(b - m);
  const float inv = empty ? 0.f : 1.f / (wa + wb);
  const float ka = wa * inv, kb = wb * inv;

  using V = Vec<T, kVec>;
  const V* src_a = reinterpret_cast<const V*>(static_cast<const T*>(p.out_a) + row * p.head_dim);
  const V* src_b = reinterpret_cast<const V*>(static_cast<const T*>(p.out_b) + row * p.head_dim);
  V* dst = reinterpret_cast<V*>(static_cast<T*>(p.out) + row * p.head_dim);
  for (int i = lane; i < p.head_dim / kVec; i += 32) {
    const V va = src_a[i], vb = src_b[i];
    V r;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      // An empty part's O is 0 by convention; do not let anything else in it through (0 * NaN).
      const float x = (ka > 0.f ? ka * static_cast<float>(va.v[j]) : 0.f) +
                      (kb > 0.f ? kb * static_cast<float>(vb.v[j]) : 0.f);
      r.v[j] = static_cast<T>(x);  // round to nearest
    }
    dst[i] = r;
  }
  __syncwarp();  // every lane has read lse_a / lse_b: lse may be one of them
  if (lane == 0) { p.lse[lse_at] = empty ? INFINITY : m + logf(wa + wb); }
}

template <class T>
void launch(const MergeParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((p.rows + kWarps - 1) / kWarps));
  const bool aligned = p.head_dim % kVec == 0 &&
                       ((reinterpret_cast<uintptr_t>(p.out_a) | reinterpret_cast<uintptr_t>(p.out_b) |
                         reinterpret_cast<uintptr_t>(p.out)) % 16) == 0;
  if (aligned) {
    merge_kernel<T, kVec><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    merge_kernel<T, 1><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  check_launch("merge_attention");
}

}  // namespace

void run_merge_attention(const MergeParams& params, cudaStream_t stream) {
  if (params.rows == 0) { return; }
  switch (params.element) {
    case MergeElement::kBF16: return launch<__nv_bfloat16>(params, stream);
    case MergeElement::kFP16: return launch<__half>(params, stream);
    case MergeElement::kFP32: return launch<float>(params, stream);
  }
}

}  // namespace flash_gla
