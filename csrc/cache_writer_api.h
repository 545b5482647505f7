// The extension's paged-cache writer (flash_gla.write_kvcache). Inputs are validated by
// flash_gla/cache_writer.py before they get here; this only asserts what the kernel relies on.
#pragma once

#include <optional>

#include "torch_stable.h"

namespace flash_gla {

// kv_cache[slot_mapping[t], j] = concat(kv[t, j], rope[t]) (inline RoPE, rope_cache absent; with
// rope absent too, kv holds whole rows), or kv_cache[slot, j] = kv[t, j] and
// rope_cache[slot, 0] = rope[t] (RoPE stored once). A float8_e4m3fn kv_cache (RoPE stored once
// only) gets kv[t, j] quantised per 128 values, their scales going to kv_scale[slot, j]. Slots
// outside [0, num_blocks * 64) are skipped. In place, no host synchronisation.
void write_kvcache(const Tensor& kv_cache, const Tensor& slot_mapping, const Tensor& kv,
                   const std::optional<Tensor>& rope, const std::optional<Tensor>& rope_cache,
                   const std::optional<Tensor>& kv_scale);

}  // namespace flash_gla
