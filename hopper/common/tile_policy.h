// How many packed query rows one CTA serves: the one rule that the decode dispatch
// (csrc/decode_api.cpp) and the scheduler's part count (hopper/schedule/scheduler.cu) both follow.
#pragma once

namespace flash_gla {

// One consumer warpgroup owns 64 packed query rows: one wgmma M.
constexpr int kRowsPerWarpgroup = 64;
// Instances stack at most two row warpgroups, so that each page loaded serves 128 rows.
constexpr int kMaxRowWarpgroups = 2;

// Row warpgroups per CTA for a KV head with `rows_per_kv_head` packed query rows, where the
// variant has instances with up to `max_row_warpgroups` of them: more than 64 rows take two
// warpgroups when compiled (one page load then serves twice the rows), else 64-row CTAs.
constexpr int row_warpgroups_for(int rows_per_kv_head, int max_row_warpgroups) {
  return rows_per_kv_head > kRowsPerWarpgroup && max_row_warpgroups >= 2 ? 2 : 1;
}

constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// A KV head with at most this many packed query rows may be served by a transposed instance
// (tokens as the wgmma's M), whose CTAs are small enough that kSmallGroupCtasPerSm of them
// share an SM: one warpgroup's page loop is a serial chain, and a second CTA's runs while it
// waits.
constexpr int kSmallGroupRows = 16;
constexpr int kSmallGroupCtasPerSm = 2;

}  // namespace flash_gla
