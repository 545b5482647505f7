// The extension's merge of partial attentions (flash_gla.merge_attention). Inputs are validated
// by flash_gla/merge.py before they get here; this only asserts what the kernel relies on.
#pragma once

#include <torch/extension.h>

namespace flash_gla {

// out, lse = the attention over the union of two disjoint key sets, from each set's (out, lse);
// out and lse may be out_a / lse_a (in place). No host synchronisation.
void merge_attention(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                     const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse);

}  // namespace flash_gla
