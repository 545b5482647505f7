// Host-side entry to the SM90 decode kernel family. Host code sees only this header:
// one explicitly instantiated run_decode per traits instance in hopper/decode/instances/.
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"

namespace flash_gla::hopper {

// Where the key's RoPE dims are cached: after V in every KV head's row (MLA, GLA), or once
// per token in a separate rope cache shared by all KV heads (GLA with shared RoPE, GTA).
enum class RopeCache { kInline, kShared };

// What the KV cache holds: q's dtype, or e4m3 values with a float32 scale per 128 of them
// (params.kv_scale), which the kernel dequantises to q's dtype in shared memory.
enum class KVCache { kSameAsQ, kE4M3 };

// Launches the decode kernel for params.batch requests on `stream`; throws on launch failure.
// The key is [row[:kHeadDimNope], RoPE (kHeadDimRope)], the value row[:kHeadDimV].
// kRowWGs: consumer warpgroups stacked along the packed query rows (64 rows each).
// kQueryCols: 0, or the transposed consumer for up to that many packed query rows.
template <DType kDType, int kHeadDimV, int kHeadDimNope, int kHeadDimRope, RopeCache kRope,
          int kRowWGs, KVCache kCache, int kQueryCols>
void run_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace flash_gla::hopper

namespace flash_gla {

// One compiled instance, as the host's dispatch sees it: the shapes it serves and its launcher
// (csrc/decode_instances.h lists them all, generated from hopper/decode/instances/generate.py).
struct DecodeInstance {
  DType dtype;
  int head_dim_v, head_dim_nope, head_dim_rope;
  bool shared_rope;
  int row_warpgroups;
  bool kv_fp8;  // e4m3 cache + float32 scales
  int query_cols;  // 0, or the transposed consumer for up to this many packed query rows
  void (*run)(const DecodeParams&, cudaStream_t);
};

}  // namespace flash_gla
