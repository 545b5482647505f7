// Host side of merge_attention: tensors -> MergeParams -> run_merge_attention.
#include "merge_api.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "merge.h"

namespace flash_gla {

void merge_attention(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                     const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(out_a.is_cuda() && out_a.dim() == 4 && out_a.is_contiguous() && out_b.is_contiguous() &&
                  out.is_contiguous() && out_b.sizes() == out_a.sizes() && out.sizes() == out_a.sizes(),
              "flash_gla: merge_attention: out_a, out_b and out must be contiguous CUDA tensors of one shape");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat && lse_a.is_contiguous() && lse_b.is_contiguous() &&
                  lse.is_contiguous(),
              "flash_gla: merge_attention: lse_a, lse_b and lse must be contiguous float32");
  const c10::cuda::CUDAGuard guard(out_a.device());
  MergeParams p{};
  p.out_a = out_a.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.out_b = out_b.data_ptr();
  p.lse_b = lse_b.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.rows = out_a.size(0) * out_a.size(1) * out_a.size(2);
  p.seqlen_q = static_cast<int>(out_a.size(1));
  p.heads_q = static_cast<int>(out_a.size(2));
  p.head_dim = static_cast<int>(out_a.size(3));
  const auto dtype = out_a.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat,
                   "flash_gla: merge_attention: out_a must be bf16, fp16 or fp32");
  p.element = dtype == at::kBFloat16 ? MergeElement::kBF16
              : dtype == at::kHalf   ? MergeElement::kFP16
                                     : MergeElement::kFP32;
  run_merge_attention(p, c10::cuda::getCurrentCUDAStream());
}

}  // namespace flash_gla
