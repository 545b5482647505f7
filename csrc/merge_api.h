// The extension's merge of partial attentions (flash_gla.merge_attention). Inputs are validated
// by flash_gla/merge.py before they get here; this only asserts what the kernel relies on.
#pragma once

#include "torch_stable.h"

namespace flash_gla {

// out, lse = the attention over the union of two disjoint key sets, from each set's (out, lse);
// out and lse may be out_a / lse_a (in place). No host synchronisation.
void merge_attention(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b, const Tensor& lse_b,
                     const Tensor& out, const Tensor& lse);

}  // namespace flash_gla
