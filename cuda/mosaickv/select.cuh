// Block selection: rotate the query once per stripe, score every block summary of every stripe,
// and pick the top n_select blocks of each (sequence, KV head) over the whole sequence, shared by
// the GQA group (score = max over the group's query heads). The top-k is one launch: a cluster of
// CTAs per (b, h) narrows the order-preserving score keys with radix histograms (exact, no generic
// sort) exchanged through distributed shared memory, then gathers in index order so that the
// selected list is sorted by block id, hence grouped by stripe, and cuts it into attention "pieces"
// (at most piece_blocks blocks, never across a stripe boundary).
#pragma once
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <mutex>

#include "common.cuh"

namespace mosaickv {

constexpr int kRotRows = 32;  // rows of R per CTA of rotate_q (grid.y = D / kRotRows); 16 took 5 µs more at 1M b8

// q' = R_K q for every stripe and every query head of its GQA group. One CTA per stripe; a warp
// computes whole rows of R (coalesced loads) and reduces across lanes.
template <typename T, int D, int G>
__global__ void __launch_bounds__(256) rotate_q_kernel(DecodeParams p) {
  __shared__ float qs[G][D];
  allow_next_stage();
  wait_for_prior_stage();  // the first stage of a call: launched plainly, so this returns at once
  const int s = blockIdx.x;
  const int64_t* meta = p.stripes + (int64_t)s * kStripeCols;
  const int b = (int)meta[kColSeq], h = (int)meta[kColHead];
  const T* q = static_cast<const T*>(p.q) + ((int64_t)b * p.n_kv_heads * G + (int64_t)h * G) * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i / D][i % D] = Conv<T>::to(q[i]);
  __syncthreads();
  float* out = p.qrot + (int64_t)s * G * D;
  if (!p.rotated) {
    if (blockIdx.y == 0)
      for (int i = threadIdx.x; i < G * D; i += blockDim.x) out[i] = qs[i / D][i % D];
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int i0 = blockIdx.y * kRotRows + warp * (kRotRows / 8);
  float r[kRotRows / 8][D / 32];
#pragma unroll
  for (int u = 0; u < kRotRows / 8; ++u) {
    const float* R = rotation_row<D>(p.pages, meta, 0, i0 + u);
#pragma unroll
    for (int c = 0; c < D / 32; ++c) r[u][c] = R[lane + 32 * c];
  }
#pragma unroll
  for (int u = 0; u < kRotRows / 8; ++u)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) acc = fmaf(r[u][c], qs[g][lane + 32 * c], acc);
      acc = warp_sum(acc);
      if (lane == 0) out[g * D + i0 + u] = acc;
    }
}

// One channel's share of a block's score for one head: x mean (kind 0), or the bound max(x lo, x hi)
// (kind 1, lo and hi the channel's min and max). block_scores and fast_scores add a head's channels
// in order with this, so their keys are the same bit for bit; wide_scores sums its lanes' parts in a
// tree.
template <int kKind>
__device__ __forceinline__ float add_channel(float acc, float x, float lo, float hi) {
  if constexpr (kKind == kSummaryMean) {
    return fmaf(x, lo, acc);
  } else {
    return acc + fmaxf(x * lo, x * hi);
  }
}

// GQA scores of one block summary: acc[g] = q'_g . summary (kind 0), or the upper bound
// sum_c max(q'_g[c] lo[c], q'_g[c] hi[c]) (kind 1). q: the stripe's rotated queries [G][D], 16-byte
// aligned; read 4 floats at a time (shared memory when the caller passes it).
template <typename T, int D, int G, int kKind>
__device__ __forceinline__ void block_scores(const float* q, const uint4* row, uint4 pre0, uint4 pre1, int width,
                                             float (&acc)[G]) {
  auto q8 = [&](int g, int c0, float (&x)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(q + g * D + c0);
    const float4 b = *reinterpret_cast<const float4*>(q + g * D + c0 + 4);
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  };
  if constexpr (kKind == kSummaryMean) {
    for (int c0 = 0; c0 < width; c0 += 8) {
      uint4 u;  // a value, not a conditional lvalue: that would put pre0 and pre1 in local memory
      if (c0 == 0) {
        u = pre0;
      } else if (c0 == 8) {
        u = pre1;
      } else {
        u = row[c0 / 8];
      }
      float v[8];
      unpack8<T>(u, v);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x[8];
        q8(g, c0, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] = add_channel<kKind>(acc[g], x[e], v[e], 0.f);
      }
    }
  } else {
    const int m = summary_channels(kKind, width);  // [min | max] over the first m channels (m = D: Quest)
    for (int c0 = 0; c0 < m; c0 += 8) {
      float lo[8], hi[8];
      unpack8<T>(row[c0 / 8], lo);
      unpack8<T>(row[(m + c0) / 8], hi);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float x[8];
        q8(g, c0, x);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] = add_channel<kKind>(acc[g], x[e], lo[e], hi[e]);
      }
    }
  }
}

// Score: score_blocks(kind) block summaries per thread (block first + threadIdx.x + u * kScoreThreads),
// each written as an order-preserving key of its GQA-max score. Reaching a summary is a chain of
// dependent loads (owning stripe, stripe table, page table, row); a thread runs the chains of its
// blocks side by side, so a CTA pays one chain for score_tile(kind) blocks, not 256. Min/max rows are
// twice as wide as means, so a thread takes half as many: all of its rows' bytes are in flight before
// the wait in 72 registers (4 min/max rows a thread took 120 registers, 2 CTAs per SM, and made the
// score 15-20 % slower; kernels-ab-score-minmax-h200-s18.json).
constexpr int kScoreThreads = 256;
__host__ __device__ constexpr int score_blocks(int kind) { return kind == kSummaryMean ? 4 : 2; }
__host__ __device__ constexpr int score_tile(int kind) { return kScoreThreads * score_blocks(kind); }

// Summaries of 16 channels (compact-16 means, width 16: the benchmark's; min/max of 16 channels, width
// 32: the core's default) have a scorer of their own when a CTA's tile lies in one stripe: whole rows
// loaded before the wait and no loop over a runtime width (score 1M batch 8 10 % faster for compact-16,
// 2.4x for min/max; kernels-ab-score-fast-h200-s18.json).
constexpr int kFastChannels = 16;

template <typename T, int D, int G, int kKind>
__device__ __forceinline__ void fast_scores(const float* q, uint4 c0, uint4 c1, uint4 hi0, uint4 hi1,
                                            float (&acc)[G]) {
  float v[kFastChannels], hi[kFastChannels] = {};
  unpack8<T>(c0, v);
  unpack8<T>(c1, v + 8);
  if constexpr (kKind != kSummaryMean) {
    unpack8<T>(hi0, hi);
    unpack8<T>(hi1, hi + 8);
  }
#pragma unroll
  for (int c = 0; c < kFastChannels; c += 4)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float4 x4 = *reinterpret_cast<const float4*>(q + g * D + c);
      const float x[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g] = add_channel<kKind>(acc[g], x[e], v[c + e], hi[c + e]);
    }
}

// Rows wider than 16 channels whose chunks split evenly over the lanes of a warp get their own scorer
// (kWide below): 32, 64, 128 or 256 channels.
__host__ __device__ constexpr bool wide_rows(int used) {
  return used > kFastChannels && used % 8 == 0 && 32 % (used / 8) == 0;
}

// Wider rows (Quest's min/max over all D channels: 512 bytes a row at D = 128) of a tile in one
// stripe, n blocks: a group of used / 8 lanes scores a block, each lane one 16-byte chunk of channels
// (and its maxima), so that a warp's loads are contiguous; the group sums its lanes' parts with
// shuffles, and its first lane stores. Read one row per lane, as block_scores does, a warp's every
// load touched 32 rows 512 bytes apart: the dense baseline's score took about 1.1 ms at 1M batch 1,
// eight times its bytes at the copy bandwidth. tile_row(d): block d's row; store(d, acc).
template <typename T, int D, int G, int kKind, typename TileRow, typename Store>
__device__ __forceinline__ void wide_scores(const float* q, int used, int n, TileRow tile_row, Store store) {
  constexpr int kRowsInFlight = 4;  // per group: 4 rows' chunks loaded before any is used
  const int lanes = used / 8, sub = threadIdx.x % lanes, group = threadIdx.x / lanes;
  const int groups = kScoreThreads / lanes;
  float qv[G][8];  // this lane's channels 8 sub .. 8 sub + 7 of every head's q'
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) qv[g][e] = q[g * D + 8 * sub + e];
  for (int d0 = 0; d0 < n; d0 += groups * kRowsInFlight) {  // the same trip count in every thread
    uint4 lo[kRowsInFlight], hi[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const int d = d0 + group + u * groups;
      lo[u] = hi[u] = make_uint4(0u, 0u, 0u, 0u);
      if (d < n) {
        const uint4* r = tile_row(d);
        lo[u] = r[sub];
        if (kKind != kSummaryMean) hi[u] = r[lanes + sub];  // [min | max]: the maxima, m / 8 chunks on
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      float v[8], h[8];
      unpack8<T>(lo[u], v);
      unpack8<T>(hi[u], h);
      float acc[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        acc[g] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] = add_channel<kKind>(acc[g], qv[g][e], v[e], h[e]);
      }
      for (int o = lanes / 2; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], o);
      const int d = d0 + group + u * groups;
      if (sub == 0 && d < n) store(d, acc);
    }
  }
}

// kKind: p.summary_kind; kWide: wide_rows of its channels. Template arguments, so that each scorer
// gets its own registers (the wide one's would take the 16-channel one's occupancy).
template <typename T, int D, int G, int kKind, bool kWide>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(DecodeParams p) {
  constexpr int kScoreBlocks = score_blocks(kKind), kScoreTile = score_tile(kKind);
  // Blocks are sorted by stripe, so a CTA's blocks nearly always share its first block's stripe:
  // that stripe's rotated query sits in shared memory (broadcast reads); others read global memory.
  __shared__ __align__(16) float qsh[G * D];
  allow_next_stage();
  const int first = blockIdx.x * kScoreTile, end = min(first + kScoreTile, p.n_blocks);
  const int s0 = p.block_stripe[first];
  int blk[kScoreBlocks], st[kScoreBlocks];
  const uint4* row[kScoreBlocks];
  uint4 pre0[kScoreBlocks], pre1[kScoreBlocks];  // first 16 summary values, in flight early
#pragma unroll
  for (int u = 0; u < kScoreBlocks; ++u) blk[u] = first + threadIdx.x + u * kScoreThreads;
  const bool one_stripe = p.block_stripe[end - 1] == s0;
  // When the whole tile lies in one stripe (blocks are sorted by stripe: nearly always), its summary
  // rows are consecutive: block first + d is row r0 + d of the stripe's paged summaries, r0 in page q0
  // at rem0, so page q0 + (rem0 + d) / P. rem0 + d < P + kScoreTile: the quotient is 0 or 1 when P >=
  // kScoreTile, else exact through a float reciprocal (rem0 + d < 2 kScoreTile). Instead of a stripe
  // row and a 32-bit division per block.
  const int64_t* meta0 = p.stripes + (int64_t)s0 * kStripeCols;
  const uint32_t per = (uint32_t)meta0[kColSumRows];
  const uint32_t r0 = (uint32_t)(meta0[kColSumFirst] + first - meta0[kColBlockOff]);
  const uint32_t q0 = r0 / per, rem0 = r0 - q0 * per;
  const float inv_per = 1.f / (float)per;
  const int64_t* pages = p.pages + meta0[kColSumPages] + q0;
  auto tile_row = [&](int d) {
    const uint32_t x = rem0 + (uint32_t)d;
    const uint32_t k = per >= (uint32_t)kScoreTile ? (uint32_t)(x >= per) : (uint32_t)(((float)x + 0.5f) * inv_per);
    const T* page = reinterpret_cast<const T*>(pages[k]);
    return reinterpret_cast<const uint4*>(page + (int64_t)(x - k * per) * p.summary_width);
  };
  if (one_stripe) {
#pragma unroll
    for (int u = 0; u < kScoreBlocks; ++u) {
      st[u] = blk[u] < end ? s0 : -1;
      row[u] = st[u] >= 0 ? tile_row(blk[u] - first) : nullptr;
    }
  } else {
#pragma unroll
    for (int u = 0; u < kScoreBlocks; ++u) st[u] = blk[u] < p.n_blocks ? p.block_stripe[blk[u]] : -1;
#pragma unroll
    for (int u = 0; u < kScoreBlocks; ++u) {
      const int64_t* meta = p.stripes + (int64_t)max(st[u], 0) * kStripeCols;
      row[u] = st[u] >= 0 ? reinterpret_cast<const uint4*>(
                                summary_row<T>(p.pages, meta, blk[u] - meta[kColBlockOff], p.summary_width))
                          : nullptr;
    }
  }
  const int used = summary_channels(kKind, p.summary_width);  // channels of q' the rows cover
  const bool fast = !kWide && one_stripe && used == kFastChannels;  // fast_scores
  uint4 pre2[kScoreBlocks], pre3[kScoreBlocks];  // fast_scores' min/max rows: the maxima
  // Rows loaded before the wait: block_scores' means take their first 16 values so, fast_scores its
  // rows whole; the wide rows' scorer loads its own.
  const bool preload = fast || (kKind == kSummaryMean && !(kWide && one_stripe));
#pragma unroll
  for (int u = 0; u < kScoreBlocks; ++u) {
    pre0[u] = pre1[u] = pre2[u] = pre3[u] = make_uint4(0u, 0u, 0u, 0u);
    if (row[u] != nullptr && preload) {
      pre0[u] = row[u][0];
      if (p.summary_width > 8) pre1[u] = row[u][1];
      if (kKind != kSummaryMean && fast) pre2[u] = row[u][2], pre3[u] = row[u][3];
    }
  }
  wait_for_prior_stage();  // the rotated queries (the summaries above were written before the call)
  // Only the channels the summaries cover (16 of 128 for compact-16): the copy is paid by every CTA.
  for (int i = threadIdx.x; i < G * used; i += blockDim.x) {
    const int at = (i / used) * D + i % used;
    qsh[at] = p.qrot[(int64_t)s0 * G * D + at];
  }
  __syncthreads();
  auto store_key = [&](int block, const float (&acc)[G]) {
    float best = acc[0];
#pragma unroll
    for (int g = 1; g < G; ++g) best = fmaxf(best, acc[g]);
    p.keys[block] = float_to_ordered(best);
  };
  if (fast) {
#pragma unroll
    for (int u = 0; u < kScoreBlocks; ++u) {
      if (row[u] == nullptr) continue;
      float acc[G] = {};
      fast_scores<T, D, G, kKind>(qsh, pre0[u], pre1[u], pre2[u], pre3[u], acc);
      store_key(blk[u], acc);
    }
    return;
  }
  if (kWide && one_stripe) {
    wide_scores<T, D, G, kKind>(qsh, used, end - first, tile_row, [&](int d, const float (&acc)[G]) {
      store_key(first + d, acc);
    });
    return;
  }
#pragma unroll
  for (int u = 0; u < kScoreBlocks; ++u) {
    if (row[u] == nullptr) continue;
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.f;
    // Two calls rather than one through a pointer that may be either: the first reads shared memory
    // with shared loads, not generic ones.
    if (st[u] == s0) {
      block_scores<T, D, G, kKind>(qsh, row[u], pre0[u], pre1[u], p.summary_width, acc);
    } else {
      block_scores<T, D, G, kKind>(p.qrot + (int64_t)st[u] * G * D, row[u], pre0[u], pre1[u], p.summary_width,
                                   acc);
    }
    store_key(blk[u], acc);
  }
}

// The score kernel for p's summaries: their kind, and wide rows or not.
using StageKernel = void (*)(DecodeParams);
template <typename T, int D, int G>
inline StageKernel score_kernel_for(const DecodeParams& p) {
  const bool wide = wide_rows(summary_channels(p.summary_kind, p.summary_width));
  if (p.summary_kind == kSummaryMean) {
    return wide ? score_kernel<T, D, G, kSummaryMean, true> : score_kernel<T, D, G, kSummaryMean, false>;
  }
  return wide ? score_kernel<T, D, G, kSummaryMinMax, true> : score_kernel<T, D, G, kSummaryMinMax, false>;
}

// Exclusive block scan of one int per thread (blockDim.x a multiple of 32); returns the prefix, sets *total.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    scratch[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const int before = warp > 0 ? scratch[warp - 1] : 0;
  *total = scratch[(blockDim.x >> 5) - 1];
  return before + x - v;
}

constexpr int kSelectThreads = 1024;  // block_exclusive_scan and the 2-bins-per-thread digit search need 1024
constexpr int kSelectBins = 2048;     // 11-bit digits: passes over bits 31..21, 20..10, 9..0
constexpr int kSelectCluster = 8;     // most CTAs per (b, h) on sm_90 (the portable cluster size); 1 before
constexpr int kSelectKeysPerCta = 4096;  // keys per CTA below which a larger cluster is not chosen (launch_select)

__device__ __forceinline__ int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ uint32_t digit_mask_above(int pass) {  // bits fixed by earlier passes
  return pass == 0 ? 0u : (pass == 1 ? 0xffe00000u : 0xfffffc00u);
}

// Calls f(i, load(i - first)) for i = first .. end - 1, in that order, with kKeyLoads reads in flight
// at a time: the keys were just written by the score kernel and sit in L2 (or in shared memory), and
// one load at a time would pay a round trip per key (the select's passes are latency-bound). Whole
// groups of kKeyLoads carry no bound checks; the rest go one at a time.
constexpr int kKeyLoads = 8;
template <typename Load, typename F>
__device__ __forceinline__ void for_run(Load load, int first, int end, F f) {
  int j0 = first;
  for (; j0 + kKeyLoads <= end; j0 += kKeyLoads) {
    uint32_t kv[kKeyLoads];
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u) kv[u] = load(j0 - first + u);
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u) f(j0 + u, kv[u]);
  }
  for (; j0 < end; ++j0) f(j0, load(j0 - first));
}

// Calls f(key_at(i)) for i = first, first + kSelectThreads, ... < end (a thread's share of a range
// that the CTA reads coalesced), kKeyLoads reads in flight.
template <typename KeyAt, typename F>
__device__ __forceinline__ void for_strided(KeyAt key_at, int first, int end, F f) {
  constexpr int kStep = kSelectThreads;
  for (int j0 = first; j0 < end; j0 += kKeyLoads * kStep) {
    uint32_t kv[kKeyLoads];
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u)
      if (j0 + u * kStep < end) kv[u] = key_at(j0 + u * kStep);
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u)
      if (j0 + u * kStep < end) f(kv[u]);
  }
}

// The select keeps its CTA's slice of keys in dynamic shared memory (read once from L2, then by every
// pass and the gather). Each thread reads only its own run of `per` consecutive keys, in the passes
// as in the gather, and thread t's run sits at words t * run_words(per) onwards: runs an odd number
// of words apart put a warp's 32 runs on 32 distinct banks, and a thread walks its run from one base
// address with immediate offsets. Runs that do not fit are read from L2.
constexpr int kMaxDevices = 64;  // devices whose launch facts (cache allowance, cluster fit) are kept
constexpr int kSelectCacheKeys = 40960;  // 164 KB in runs of 40 keys (41 words); 1 CTA per SM either way
__host__ __device__ constexpr int run_words(int per) { return per | 1; }
__host__ __device__ constexpr int run_keys(int slice) { return (slice + kSelectThreads - 1) / kSelectThreads; }
__host__ __device__ constexpr size_t select_cache_bytes(int slice) {  // a whole slice of `slice` keys
  return slice > 0 ? sizeof(uint32_t) * kSelectThreads * (size_t)run_words(run_keys(slice)) : 0;
}

// Words the launch gave the cache.
__device__ __forceinline__ int key_cache_words() {
  uint32_t bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return (int)(bytes / sizeof(uint32_t));
}

// The CTAs of one (b, h) form a thread-block cluster on sm_90: histograms and counts are exchanged
// through distributed shared memory, so the whole selection is one launch with no global scratch.
// Before sm_90 the launcher uses clusters of one CTA and these collapse to the CTA itself.
struct SelectCluster {
  static __device__ __forceinline__ int rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return (int)cooperative_groups::this_cluster().block_rank();
#else
    return 0;
#endif
  }
  static __device__ __forceinline__ int size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return (int)cooperative_groups::this_cluster().num_blocks();
#else
    return 1;
#endif
  }
  // Barrier over the cluster; orders shared and global memory accesses across its CTAs.
  static __device__ __forceinline__ void sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();
#else
    __syncthreads();
#endif
  }
  template <typename U>
  static __device__ __forceinline__ U* map(U* local, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return cooperative_groups::this_cluster().map_shared_rank(local, (unsigned)r);
#else
    (void)r;
    return local;
#endif
  }
};

// Exact top-k per (b, h) over the whole sequence, then the order-preserving gather and the pieces,
// in one launch. Grid (cluster size, B*H), kSelectThreads threads; CTA r of the cluster owns the r-th
// contiguous slice of the (b, h)'s block keys, read once into shared memory. Up to three radix passes
// (11/11/10-bit digits; fewer once the threshold's bucket is taken whole) find the k-th largest key
// (threshold) and how many keys equal to it to take; every CTA sums the cluster's histograms itself
// (no broadcast step). Selected = key > threshold, plus the first `remaining` keys == threshold in
// index order; each thread owns a run of consecutive keys, so a scan of counts gives every selected
// block its slot and the list comes out sorted by block id, hence grouped by stripe. While writing
// it, the thread that owns a stripe's first block records how many blocks are selected before it
// (stripe_first); rank 0 then cuts each stripe's run of the list into attention pieces of
// <= piece_blocks blocks.
template <int kUnused = 0>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(kSelectThreads) select_kernel(DecodeParams p) {
  extern __shared__ uint32_t s_keys[];           // the slice's keys, thread t's run at t * run_words(per)
  // One histogram per pass, zeroed before the keys arrive: other CTAs of the cluster read pass p's
  // between its cluster barrier and the next, so a buffer shared by two passes would need zeroing,
  // and a barrier, in between.
  __shared__ __align__(8) int hist[3][kSelectBins];
  __shared__ int scratch[32];
  __shared__ int found[3];   // digit, remaining after this pass, keys in the digit's bucket
  __shared__ int counts[2];  // this CTA's keys above / equal to the threshold
  const int tid = threadIdx.x, rank = SelectCluster::rank(), csize = SelectCluster::size();
  const int bh = blockIdx.y;
  const int b0 = p.block_ptr[bh], n = p.block_ptr[bh + 1] - b0;
  const int s0 = p.stripe_ptr[bh], ns = p.stripe_ptr[bh + 1] - s0;
  const int slice = (n + csize - 1) / csize;
  const int c0 = min(n, rank * slice), c1 = min(n, c0 + slice);
  int k = min(p.n_select[bh], n);
  if (k > p.max_select) {
    if (rank == 0 && tid == 0) atomicOr(p.status, kBadSelection);
    k = p.max_select;
  }
  const bool all = k >= n;
  // This thread's run of keys, [i0, i1) (indices within the (b, h)), and the first stripe that starts
  // at or after i0: its number q_next among the (b, h)'s stripes and its first block. Read before
  // waiting for the keys (the tables were written before the call).
  const int per = run_keys(c1 - c0);
  const int i0 = c0 + tid * per, i1 = min(c1, i0 + per);
  auto start_of = [&](int q) { return (int)(p.stripes[(int64_t)(s0 + q) * kStripeCols + kColBlockOff] - b0); };
  int q_next = ns, next_start = INT_MAX;
  if (i0 < i1) {
    const int q = p.block_stripe[b0 + i0] - s0;  // the stripe of this thread's first block
    if (start_of(q) == i0) {
      q_next = q;
      while (q_next > 0 && start_of(q_next - 1) == i0) --q_next;  // stripes without blocks start here too
      next_start = i0;
    } else {
      q_next = q + 1;
      next_start = q_next < ns ? start_of(q_next) : INT_MAX;
    }
  }
  for (int i = tid; i < 3 * kSelectBins; i += blockDim.x) (&hist[0][0])[i] = 0;
  wait_for_prior_stage();  // the keys
  const uint32_t* keys = p.keys + b0;
  // Runs 0 .. cached_runs - 1 sit in the cache; the keys of the others, [tail, c1), are read from L2.
  const int stride = run_words(per);
  const int cached_runs = min(kSelectThreads, key_cache_words() / stride);
  const int tail = min(c1, c0 + cached_runs * per);
  const bool mine_cached = tid < cached_runs;
  {  // Coalesced: key c0 + j goes to word (j / per) * stride + j % per; all in flight at once (cp.async
     // holds no registers). j / per through a float reciprocal: exact, j < 2^16.
    const float inv_per = 1.f / (float)max(per, 1);
    for (int j = tid; j < tail - c0; j += kSelectThreads) {
      const int t = (int)(((float)j + 0.5f) * inv_per);
      cp_async4(s_keys + t * stride + (j - t * per), keys + c0 + j);
    }
    cp_async_wait_all();
    __syncthreads();
  }
  // This thread's keys [i0, i1), in order (the gather): its run in the cache, or L2 when the run does
  // not fit. The base address is a 32-bit shared one (lds_u32): the cached loop is a load with an
  // immediate offset per key.
  const uint32_t run = smem_u32(s_keys + tid * stride);
  auto for_my_keys = [&](auto f) {
    if (mine_cached) {
      for_run([&](int u) { return lds_u32(run + 4u * (uint32_t)u); }, i0, i1, f);
    } else {
      for_run([&](int u) { return keys[i0 + u]; }, i0, i1, f);
    }
  };
  // Every key of the slice once, in any order (the passes): this thread's cached run, then its strided
  // share of the keys past the cached runs (coalesced reads from L2, which runs read one per thread
  // were not: 1M tokens, batch 8, select 87 -> 121 µs).
  auto for_slice_keys = [&](auto f) {
    if (mine_cached) for_my_keys([&](int, uint32_t key) { f(key); });
    for_strided([&](int i) { return keys[i]; }, tail + tid, c1, f);
  };
  uint32_t thresh = 0u;
  int remaining = k;
  if (!all && k > 0) {
    for (int pass = 0; pass < 3; ++pass) {
      int* hl = hist[pass];  // zeroed at the start; the barrier after the key cache orders that
      const uint32_t hl_at = smem_u32(hl);
      const int shift = digit_shift(pass), bins = pass == 2 ? 1024 : kSelectBins;
      const uint32_t mask = digit_mask_above(pass);
      for_slice_keys([&](uint32_t key) {
        if ((key & mask) == thresh) red_add_shared(hl_at + 4u * ((key >> shift) & (uint32_t)(bins - 1)), 1u);
      });
      SelectCluster::sync();
      // Thread i owns digits d0 = bins-1-2i and d1 = d0-1: a scan in descending digit order finds the
      // digit where the count of larger keys crosses `remaining`. Both bins come in one 8-byte read per
      // CTA of the cluster, all of them in flight at once (each is a round trip to another SM).
      const int d0 = bins - 1 - 2 * tid, d1 = d0 - 1;
      int2 rd[kSelectCluster];
#pragma unroll
      for (int r = 0; r < kSelectCluster; ++r) {
        const int* hr = SelectCluster::map(hl, r < csize ? r : 0);
        rd[r] = r < csize && d1 >= 0 ? *reinterpret_cast<const int2*>(hr + d1) : make_int2(0, 0);
      }
      int h0 = 0, h1 = 0;
#pragma unroll
      for (int r = 0; r < kSelectCluster; ++r) h0 += rd[r].y, h1 += rd[r].x;
      int total;
      const int above = block_exclusive_scan(h0 + h1, scratch, &total);
      if (above < remaining && above + h0 + h1 >= remaining) {
        const bool first = above + h0 >= remaining;
        found[0] = first ? d0 : d1;
        found[1] = remaining - above - (first ? 0 : h0);
        found[2] = first ? h0 : h1;
      }
      __syncthreads();
      thresh |= (uint32_t)found[0] << shift;
      remaining = found[1];
      // The bucket is taken whole (usually after the second pass, whose 22 fixed bits leave about one
      // key in it): every key from the bucket's lowest up is selected, and the passes left would only
      // narrow a threshold that no longer matters. Key >= thresh is key > thresh - 1 with no ties taken
      // (thresh > 0 here: a bucket 0 taken whole would mean k = n). Every CTA of the cluster reads the
      // same summed histograms, so all leave at the same pass and meet the same cluster barriers.
      if (remaining == found[2]) {
        thresh -= 1u;
        remaining = 0;
        break;
      }
    }
  }
  // Gather: count, exchange the per-CTA counts, then write in index order.
  auto taken = [&](uint32_t key) { return all || (k > 0 && key > thresh); };  // above the threshold
  auto tied = [&](uint32_t key) { return !all && k > 0 && key == thresh; };   // taken while `remaining` lasts
  int gt = 0, eq = 0;
  for_my_keys([&](int, uint32_t key) {
    gt += taken(key);
    eq += tied(key);
  });
  int tot_gt, tot_eq;
  int gt_before = block_exclusive_scan(gt, scratch, &tot_gt);
  int eq_before = block_exclusive_scan(eq, scratch, &tot_eq);
  if (tid == 0) counts[0] = tot_gt, counts[1] = tot_eq;
  SelectCluster::sync();
  int cg[kSelectCluster], ce[kSelectCluster];  // earlier ranks' counts, all remote reads in flight at once
#pragma unroll
  for (int r = 0; r < kSelectCluster; ++r) {
    const int* cr = SelectCluster::map(counts, r < rank ? r : 0);
    cg[r] = r < rank ? cr[0] : 0;
    ce[r] = r < rank ? cr[1] : 0;
  }
#pragma unroll
  for (int r = 0; r < kSelectCluster; ++r) gt_before += cg[r], eq_before += ce[r];
  int32_t* sel = p.sel + (int64_t)bh * p.max_select;
  for_my_keys([&](int i, uint32_t key) {
    while (i == next_start) {  // stripe q_next begins here: the blocks selected before it
      p.stripe_first[s0 + q_next] = gt_before + min(eq_before, remaining);
      ++q_next;
      next_start = q_next < ns ? start_of(q_next) : INT_MAX;
    }
    if (taken(key)) {
      sel[gt_before + min(eq_before, remaining)] = b0 + i;
      ++gt_before;
    } else if (tied(key)) {
      if (eq_before < remaining) sel[gt_before + eq_before] = b0 + i;
      ++eq_before;
    }
  });
  __threadfence();
  SelectCluster::sync();  // the list and stripe_first are written (no CTA reads another's shared memory after this)
  // Only now, not at the start: the attention's CTAs are placed once every select CTA has passed this,
  // and placed earlier they would crowd onto the SMs the select leaves free (at small batch the
  // attention is less than a wave, and would run on half the SMs).
  allow_next_stage();
  if (rank != 0) return;
  // Pieces: stripe q's run of the list is [first_q, first_{q+1}) (the last one ends at k); a stripe
  // whose first block lies past the (b, h)'s blocks (no blocks at the end) has no block of any slice
  // to mark it, and starts at k.
  auto first_of = [&](int q) { return q >= ns || start_of(q) >= n ? k : p.stripe_first[s0 + q]; };
  // Each stripe's pieces (first slot, count) for the merge, which also counts on arrivals[bh].
  int32_t* pc = p.pieces + (int64_t)bh * p.max_pieces * 3;
  int piece_run = 0;
  for (int t0 = 0; t0 < ns; t0 += blockDim.x) {
    const int q = t0 + tid;
    const int first = q < ns ? first_of(q) : 0, last = q < ns ? first_of(q + 1) : 0;
    const int np = (last - first + p.piece_blocks - 1) / p.piece_blocks;
    int tot;
    const int before = piece_run + block_exclusive_scan(np, scratch, &tot);
    for (int j = 0; j < np; ++j) {
      const int slot = before + j;
      if (slot < p.max_pieces) {
        pc[slot * 3 + 0] = first + j * p.piece_blocks;
        pc[slot * 3 + 1] = min(last, first + (j + 1) * p.piece_blocks);
        pc[slot * 3 + 2] = s0 + q;
      }
    }
    if (q < ns) {
      p.stripe_pieces[(s0 + q) * 2] = before;
      p.stripe_pieces[(s0 + q) * 2 + 1] = max(0, min(np, p.max_pieces - before));  // past max_pieces: dropped
    }
    piece_run += tot;
  }
  if (tid == 0) {
    if (piece_run > p.max_pieces) atomicOr(p.status, kBadPieces);
    p.n_pieces[bh] = min(piece_run, p.max_pieces);
    p.arrivals[bh] = 0;
  }
}

// The launch of select_kernel over a grid (csize, bh), as clusters of csize CTAs when `clustered`
// (sm_90 and newer) and as a programmatic dependent launch when `after_stage` (launch_stage in
// attention.cuh); attrs is the storage the configuration points to.
inline cudaLaunchConfig_t select_config(int csize, int bh, size_t cache_bytes, cudaStream_t stream, bool clustered,
                                        bool after_stage, cudaLaunchAttribute (&attrs)[2]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)csize, (unsigned)bh);
  cfg.blockDim = dim3(kSelectThreads);
  cfg.dynamicSmemBytes = cache_bytes;
  cfg.stream = stream;
  cfg.attrs = attrs;
  if (clustered) {
    cudaLaunchAttribute& a = attrs[cfg.numAttrs++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = (unsigned)csize;
    a.val.clusterDim.y = 1;
    a.val.clusterDim.z = 1;
  }
  if (after_stage) attrs[cfg.numAttrs++] = after_stage_attribute();
  return cfg;
}

// Lets kKernel take `bytes` of dynamic shared memory on device `dev` (above the default 48 KB); once
// per device and kernel, not per launch (each call costs host time on the decode path).
template <void (*kKernel)(DecodeParams)>
inline cudaError_t allow_dynamic_smem(int dev, size_t bytes) {
  static std::atomic<bool> allowed[kMaxDevices] = {};
  if (dev < kMaxDevices && allowed[dev].load(std::memory_order_acquire)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (err == cudaSuccess && dev < kMaxDevices) allowed[dev].store(true, std::memory_order_release);
  return err;
}

// How many clusters of select_kernel CTAs device `dev` (sm_90 or newer) runs at once, for cluster
// sizes 1, 2, 4 and 8. A cluster's CTAs share a GPC, so this can be fewer than SMs / size. Asked
// once per device (the answer depends on the device and the kernel only; the launch sits on every
// decode call's host path); nullptr when not asked yet and may_ask is false (inside a graph
// capture, where no device queries are made).
constexpr int kClusterSizes = 4;  // 1, 2, 4, 8

inline const int* select_cluster_fit(int dev, bool may_ask) {
  static int fit[kMaxDevices][kClusterSizes];
  static std::atomic<bool> asked[kMaxDevices] = {};  // fit[dev] is written once, before asked[dev]
  static std::mutex asking;
  if (!asked[dev].load(std::memory_order_acquire)) {
    if (!may_ask) return nullptr;
    const std::lock_guard<std::mutex> lock(asking);
    if (!asked[dev].load(std::memory_order_relaxed)) {
      for (int i = 0; i < kClusterSizes; ++i) {
        cudaLaunchAttribute attrs[2];
        const cudaLaunchConfig_t cfg =
            select_config(1 << i, 1, select_cache_bytes(kSelectCacheKeys), nullptr, true, false, attrs);
        if (cudaOccupancyMaxActiveClusters(&fit[dev][i], select_kernel<>, &cfg) != cudaSuccess) fit[dev][i] = 0;
      }
      (void)cudaGetLastError();  // a refused query is an answer here, not an error for the next launch
      asked[dev].store(true, std::memory_order_release);
    }
  }
  return fit[dev];
}

// Launches select_kernel with one cluster of CTAs per (b, h) on sm_90 and newer (device `dev` of
// compute capability `major`), one CTA per (b, h) before (the kernel's cluster helpers then act on
// the CTA alone). The cluster is the smallest whose CTAs hold at most kSelectKeysPerCta keys each,
// among the sizes for which all B*H clusters run at once (a second wave would pay every pass's
// latency again); if none is that large, the largest of them. Below that many keys per CTA a larger
// cluster shortens nothing but adds the cost of its barriers and remote reads: at 32K and 128K
// tokens, batch 1, clusters of 1 and 4 instead of 8 took 2.9 and 3.4 µs off the select and 4.1 and
// 4.4 µs off the whole call (kernels-ab-select-cluster-h200-s15.json, s1 against s2).
inline cudaError_t launch_select(const DecodeParams& p, int bh, cudaStream_t stream, int dev, int major,
                                 bool after_stage) {
  static_assert(kSelectCluster == 1 << (kClusterSizes - 1), "cluster sizes 1 .. kSelectCluster");
  // The largest key cache the launcher gives a CTA.
  cudaError_t err = allow_dynamic_smem<select_kernel<>>(dev, select_cache_bytes(kSelectCacheKeys));
  if (err != cudaSuccess) return err;
  int csize = 1;
  if (major >= 9 && dev < kMaxDevices) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    err = cudaStreamIsCapturing(stream, &capture);
    if (err != cudaSuccess) return err;
    // Clusters wanted for kSelectKeysPerCta keys per CTA, the (b, h)s taken as equal.
    const int want = (p.n_blocks / std::max(bh, 1) + kSelectKeysPerCta - 1) / kSelectKeysPerCta;
    if (const int* fit = select_cluster_fit(dev, capture == cudaStreamCaptureStatusNone)) {
      for (int i = 1; i < kClusterSizes && fit[i] >= bh; ++i)
        if (csize < want) csize = 1 << i;
    } else {  // first launch inside a graph capture: one CTA per SM; any size selects the same blocks
      int n_sm = 0;
      err = cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev);
      if (err != cudaSuccess) return err;
      // The graph keeps this choice for every replay, so it takes the same cap as the rule above.
      int cap = 1;
      while (cap < want && cap < kSelectCluster) cap *= 2;
      csize = std::max(1, std::min({kSelectCluster, cap, n_sm / std::max(bh, 1)}));
    }
  }
  // A CTA's slice is at most ceil(n_blocks / csize) keys (all blocks in one (b, h)).
  const int slice = (p.n_blocks + csize - 1) / csize;
  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t cfg = select_config(csize, bh, select_cache_bytes(std::min(slice, kSelectCacheKeys)),
                                               stream, major >= 9, after_stage, attrs);
  return cudaLaunchKernelEx(&cfg, select_kernel<>, p);
}

}  // namespace mosaickv
