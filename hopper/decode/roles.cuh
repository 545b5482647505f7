// Who does what in the decode kernel: the named barriers between its roles, and the share of
// the CTA's tile that one consumer warpgroup owns.
#pragma once

namespace flash_gla::hopper {

// Among the consumer threads; kQIssued also holds the producer's first warp. The values are the
// hardware barrier ids (0 is __syncthreads'; there are 16): they are used as they are, not
// shifted past CUTLASS's reserved ids, which would push the last two past 15.
enum class ConsumerBarrier : int {
  kQFree = 1,         // every consumer is done reading the previous piece's Q tile
  kQReady = 2,        // the new Q tile is in shared memory
  kPageMasked = 3,    // rows past the sequence end of a page are zeroed
  kScoresMax = 4,     // shared P: the scoring warpgroup's final row maxima are in shared memory
  kPReady = 5,        // shared P: the page's probabilities and rescale factors are in shared memory
  kRowSums = 6,       // shared P, page turns: each warpgroup's final row sums are in shared memory
  kOutputStage = 7,   // every consumer is done with the piece's Q tile: O may be staged there
  kOutputStaged = 8,  // the piece's O tiles are in shared memory
  kQIssued = 9,       // the first Q tile's loads are issued (consumers arrive, producer waits)
  kTurnChunkWritten = 10,  // page turns: a chunk of the second warpgroup's O is in shared memory
  kTurnChunkRead = 11,     // page turns: the first warpgroup has added it to its own
  kPFree = 12,             // shared P: every warpgroup's P V of the previous page is done
  kPageLanded = 13         // page turns: the piece's last, cut-short page has landed (both warpgroups sync)
};

static_assert(static_cast<int>(ConsumerBarrier::kPageLanded) < 16, "sm_90 has 16 named barriers");

__device__ __forceinline__ void consumer_sync(int num_threads, ConsumerBarrier id) {
  asm volatile("bar.sync %0, %1;" ::"r"(static_cast<int>(id)), "r"(num_threads));
}

// consumer_sync that also returns whether `pred` held in any of the threads (bar.red orders the
// participants' shared-memory accesses across it as bar.sync does).
__device__ __forceinline__ bool consumer_sync_any(int num_threads, ConsumerBarrier id, bool pred) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(uint32_t(pred)), "r"(static_cast<int>(id)), "r"(num_threads)
      : "memory");
  return any != 0;
}

__device__ __forceinline__ void barrier_arrive(int num_threads, ConsumerBarrier id) {
  asm volatile("bar.arrive %0, %1;" ::"r"(static_cast<int>(id)), "r"(num_threads));
}

// threadIdx.x, read anew where it is called (the compiler cannot keep values derived from it
// through a loop in registers instead).
__device__ __forceinline__ int thread_index() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  return tid;
}

// One consumer warpgroup's share: 64 of the CTA's packed query rows (row_wg), up to 256 of the
// output columns and the matching share of each page's tokens (col_wg), and with page turns
// every other page (page_wg); each index is a compile-time 0 where the traits have only one
// warpgroup along it.
struct WarpgroupRole {
  int row_wg, col_wg, page_wg;
  int row_base;  // the warpgroup's first packed query row of the KV head
  int wg_tid;    // thread index within the warpgroup
};

}  // namespace flash_gla::hopper
