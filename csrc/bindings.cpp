// The Python module flash_gla._C; nothing else lives here.
#include <torch/extension.h>

#include "cache_writer_api.h"
#include "decode_api.h"
#include "merge_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flash_gla: Hopper decode kernels for MLA, GLA and GTA (see flash_gla/ops.py)";
  m.def("get_metadata", &flash_gla::get_metadata, "Scheduler metadata for one decode step",
        py::arg("cache_seqlens"), py::arg("num_q_tokens_per_head_k"), py::arg("num_heads_k"));
  m.def("num_sm_parts", &flash_gla::get_num_sm_parts, "Scheduler parts on the current device",
        py::arg("num_q_tokens_per_head_k"), py::arg("num_heads_k"));
  m.def("decode", &flash_gla::decode, "Paged decode attention (inputs validated by flash_gla.ops)",
        py::arg("q"), py::arg("kv_cache"), py::arg("rope_cache"), py::arg("block_table"),
        py::arg("cache_seqlens"), py::arg("head_dim_v"), py::arg("tile_scheduler_metadata"),
        py::arg("num_splits"), py::arg("softmax_scale"), py::arg("causal"), py::arg("out"),
        py::arg("attn_sink"));
  m.def("write_kvcache", &flash_gla::write_kvcache,
        "Write new tokens into a paged KV cache (inputs validated by flash_gla.cache_writer)",
        py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("kv"), py::arg("rope"), py::arg("rope_cache"));
  m.def("merge_attention", &flash_gla::merge_attention,
        "Attention over the union of two disjoint key sets (inputs validated by flash_gla.merge)",
        py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"), py::arg("lse"));
}
