// Host side of merge_attention: tensors -> MergeParams -> run_merge_attention.
#include "merge_api.h"

#include "combine/run_merge.h"

namespace flash_gla {

namespace {

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) { return false; }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) { return false; }
  }
  return true;
}

}  // namespace

void merge_attention(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b, const Tensor& lse_b,
                     const Tensor& out, const Tensor& lse) {
  STD_TORCH_CHECK(out_a.is_cuda() && out_a.dim() == 4 && out_a.is_contiguous() && out_b.is_contiguous() &&
                      out.is_contiguous() && same_shape(out_b, out_a) && same_shape(out, out_a),
                  "flash_gla: merge_attention: out_a, out_b and out must be contiguous CUDA tensors of one shape");
  STD_TORCH_CHECK(lse_a.scalar_type() == ScalarType::Float && lse_b.scalar_type() == ScalarType::Float &&
                      lse.scalar_type() == ScalarType::Float && lse_a.is_contiguous() && lse_b.is_contiguous() &&
                      lse.is_contiguous(),
                  "flash_gla: merge_attention: lse_a, lse_b and lse must be contiguous float32");
  const int32_t device = out_a.get_device_index();
  const DeviceGuard guard(device);
  MergeParams p{};
  p.out_a = out_a.const_data_ptr();
  p.lse_a = lse_a.const_data_ptr<float>();
  p.out_b = out_b.const_data_ptr();
  p.lse_b = lse_b.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.rows = out_a.size(0) * out_a.size(1) * out_a.size(2);
  p.seqlen_q = static_cast<int>(out_a.size(1));
  p.heads_q = static_cast<int>(out_a.size(2));
  p.head_dim = static_cast<int>(out_a.size(3));
  const ScalarType dtype = out_a.scalar_type();
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half || dtype == ScalarType::Float,
                  "flash_gla: merge_attention: out_a must be bf16, fp16 or fp32");
  p.element = dtype == ScalarType::BFloat16 ? MergeElement::kBF16
              : dtype == ScalarType::Half   ? MergeElement::kFP16
                                            : MergeElement::kFP32;
  run_merge_attention(p, current_stream(device));
}

}  // namespace flash_gla
