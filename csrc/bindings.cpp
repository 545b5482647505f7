// The library flash_gla._C: the ops torch.ops.flash_gla.* (registered with torch's stable C
// ABI, so one build serves every torch from the targeted release on) and an empty Python module
// on Python's limited API (so one build serves every CPython >= 3.10), whose only job is that
// `import flash_gla._C` loads this library and runs the registrations below.
//
// The Python side (flash_gla/_library.py) adds a fake implementation to each op for
// torch.compile; flash_gla/ops.py, cache_writer.py and merge.py validate every input before
// calling an op. Each schema declares what the op writes (Tensor(a!)).
#include <Python.h>

#include <tuple>

#include "cache_writer_api.h"
#include "decode_api.h"
#include "merge_api.h"
#include "torch_stable.h"

namespace flash_gla {
namespace {

// A CPU op that takes and returns every kind of value the real ops do (a written tensor, an
// optional tensor, int, float, bool; a new tensor and an int back), so that a machine without a
// GPU can check that torch passes them through the stable ABI as this build expects
// (tests/test_library.py). Writes (i, f, b, maybe.numel() or -1) into out (4,) float64 and
// returns (a (2, 3) int32 tensor filled with i, i + 1).
std::tuple<Tensor, int64_t> abi_probe(const Tensor& out, const std::optional<Tensor>& maybe, int64_t i,
                                      double f, bool b) {
  STD_TORCH_CHECK(out.is_cpu() && out.scalar_type() == ScalarType::Double && out.numel() == 4 && out.is_contiguous(),
                  "flash_gla: _abi_probe: out must be a contiguous (4,) float64 CPU tensor");
  double* values = out.mutable_data_ptr<double>();
  values[0] = static_cast<double>(i);
  values[1] = f;
  values[2] = b ? 1.0 : 0.0;
  values[3] = maybe.has_value() ? static_cast<double>(maybe->numel()) : -1.0;
  Tensor filled = empty_on(out, {2, 3}, ScalarType::Int);
  int32_t* cells = filled.mutable_data_ptr<int32_t>();
  for (int k = 0; k < 6; ++k) { cells[k] = static_cast<int32_t>(i); }
  return {filled, i + 1};
}

}  // namespace
}  // namespace flash_gla

STABLE_TORCH_LIBRARY(flash_gla, m) {
  m.def(
      "get_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, bool batch_invariant) -> "
      "(Tensor, Tensor)");
  m.def("num_sm_parts(int device, int num_q_tokens_per_head_k, int num_heads_k) -> int");
  m.def(
      "decode(Tensor q, Tensor kv_cache, Tensor? rope_cache, Tensor block_table, Tensor cache_seqlens, "
      "int head_dim_v, Tensor tile_scheduler_metadata, Tensor num_splits, float softmax_scale, bool causal, "
      "Tensor(a!) out, Tensor? attn_sink, bool batch_invariant, Tensor? kv_scale=None) -> Tensor");
  m.def(
      "write_kvcache(Tensor(a!) kv_cache, Tensor slot_mapping, Tensor kv, Tensor? rope, Tensor(b!)? rope_cache, "
      "Tensor(c!)? kv_scale=None) -> ()");
  m.def(
      "merge_attention(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, Tensor(a!) out, Tensor(b!) lse) "
      "-> ()");
  m.def("_abi_probe(Tensor(a!) out, Tensor? maybe, int i, float f, bool b) -> (Tensor, int)");
}

STABLE_TORCH_LIBRARY_IMPL(flash_gla, CUDA, m) {
  m.impl("get_metadata", TORCH_BOX(&flash_gla::get_metadata));
  m.impl("decode", TORCH_BOX(&flash_gla::decode));
  m.impl("write_kvcache", TORCH_BOX(&flash_gla::write_kvcache));
  m.impl("merge_attention", TORCH_BOX(&flash_gla::merge_attention));
}

// No tensor argument: one kernel for every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(flash_gla, CompositeExplicitAutograd, m) {
  m.impl("num_sm_parts", TORCH_BOX(&flash_gla::get_num_sm_parts));
}

STABLE_TORCH_LIBRARY_IMPL(flash_gla, CPU, m) {
  m.impl("_abi_probe", TORCH_BOX(&flash_gla::abi_probe));
}

// The Python module: empty. Importing it loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "flash_gla's compiled ops, registered as torch.ops.flash_gla.* on import (see flash_gla/_library.py)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
