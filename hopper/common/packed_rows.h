// Packed query rows, the one index map that the decode and combine kernels share.
//
// A KV head's query rows are packed "s_q-major", as FlashMLA reshapes them: row m of KV head j
// is query token m / group_size of query head j * group_size + m % group_size, so that
// rows_per_kv_head = s_q * group_size rows fill the 64-row wgmma tiles of one KV head.
#pragma once

#include <cstdint>

#include <cutlass/fast_math.h>

#include "common/params.h"

namespace flash_gla {

struct PackedRows {
  // The division by the group size is a precomputed multiply-high and shift: an integer
  // division by a runtime value is ~20 dependent instructions, and it runs for every 16-byte
  // vector of the Q load and the output store.
  cutlass::FastDivmod group;
  int kv_head;

  CUTLASS_HOST_DEVICE PackedRows(int group_size, int kv_head_) : group(group_size), kv_head(kv_head_) {}

  CUTLASS_HOST_DEVICE void query(int m, int& token, int& head) const {
    int h;
    group(token, h, m);
    head = kv_head * group.divisor + h;
  }
  // Element offset of row m in a (token, head, dim) tensor with the given strides.
  CUTLASS_HOST_DEVICE int64_t offset(int m, int64_t token_stride, int64_t head_stride) const {
    int token, head;
    query(m, token, head);
    return token * token_stride + head * head_stride;
  }
};

// Row (slot, kv_head, m) of the split-KV partials: an index of lse_accum, a row of o_accum.
CUTLASS_HOST_DEVICE int64_t accum_row(const DecodeParams& p, int slot, int kv_head, int m) {
  return (int64_t(slot) * p.num_heads_kv + kv_head) * p.rows_per_kv_head + m;
}

// exp(lse) / (exp(lse) + exp(sink)): what an attention sink leaves of a row's output, given
// the row's natural-log LSE over its keys. A row that saw no key (lse -inf) has O = 0 anyway.
CUTLASS_HOST_DEVICE float sink_factor(float lse, float sink) {
  return lse == -INFINITY ? 0.f : 1.f / (1.f + expf(sink - lse));
}

// Index of (request, query head, query token) in lse (b, h_q, s_q).
CUTLASS_HOST_DEVICE int64_t lse_index(const DecodeParams& p, int request, int head, int token) {
  return (int64_t(request) * p.num_heads_q + head) * p.seqlen_q + token;
}

}  // namespace flash_gla
