// Block selection: rotate the query once per stripe, score every block summary of every stripe,
// and pick the top n_select blocks of each (sequence, KV head) over the whole sequence, shared by
// the GQA group (score = max over the group's query heads). The top-k runs in one CTA per (b, h):
// it narrows a range of order-preserving score keys with linear histograms (exact, no generic sort),
// followed by an order-preserving gather so
// that the selected list is sorted by block id, hence grouped by stripe; the same kernel cuts the
// list into attention "pieces" (at most piece_blocks blocks, never across a stripe boundary).
#pragma once
#include "common.cuh"

namespace mosaickv {



constexpr int kRotRows = 16;  // rows of R per CTA of rotate_q (grid.y = D / kRotRows)

// q' = R_K q for every stripe and every query head of its GQA group. One CTA per stripe; a warp
// computes whole rows of R (coalesced loads) and reduces across lanes.
template <typename T, int D, int G>
__global__ void __launch_bounds__(256) rotate_q_kernel(DecodeParams p) {
  __shared__ float qs[G][D];
  const int s = blockIdx.x;
  const int64_t* meta = p.stripes + (int64_t)s * kStripeCols;
  const int b = (int)meta[kColSeq], h = (int)meta[kColHead];
  const T* q = static_cast<const T*>(p.q) + ((int64_t)b * p.n_kv_heads * G + (int64_t)h * G) * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qs[i / D][i % D] = Conv<T>::to(q[i]);
  __syncthreads();
  float* out = p.qrot + (int64_t)s * G * D;
  if (p.rot == nullptr) {
    if (blockIdx.y == 0)
      for (int i = threadIdx.x; i < G * D; i += blockDim.x) out[i] = qs[i / D][i % D];
    return;
  }
  const float* R = p.rot + (int64_t)s * 2 * D * D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int i0 = blockIdx.y * kRotRows + warp * (kRotRows / 8);
  float r[kRotRows / 8][D / 32];
#pragma unroll
  for (int u = 0; u < kRotRows / 8; ++u)
#pragma unroll
    for (int c = 0; c < D / 32; ++c) r[u][c] = R[(int64_t)(i0 + u) * D + lane + 32 * c];
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

// One thread per block summary; writes an order-preserving key of the GQA-max score.
template <typename T, int D, int G>
__global__ void __launch_bounds__(256) score_kernel(DecodeParams p) {
  // Blocks are sorted by stripe, so a CTA's blocks nearly always share its first block's stripe:
  // that stripe's rotated query sits in shared memory (broadcast reads); others read global memory.
  __shared__ float qsh[G * D];
  const int first = blockIdx.x * blockDim.x;
  const int blk = first + threadIdx.x;
  const bool valid = blk < p.n_blocks;
  const uint4* row = reinterpret_cast<const uint4*>(static_cast<const T*>(p.summary) + (int64_t)blk * p.summary_width);
  uint4 pre0 = make_uint4(0u, 0u, 0u, 0u), pre1 = pre0;  // first 16 summary values, in flight early
  if (valid && p.summary_kind == kSummaryMean) {
    pre0 = row[0];
    if (p.summary_width > 8) pre1 = row[1];
  }
  const int s0 = p.block_stripe[first];
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) qsh[i] = p.qrot[(int64_t)s0 * G * D + i];
  __syncthreads();
  if (!valid) return;
  const int st = p.block_stripe[blk];
  const float* q = st == s0 ? qsh : p.qrot + (int64_t)st * G * D;
  float acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g] = 0.f;
  if (p.summary_kind == kSummaryMean) {
    for (int c0 = 0; c0 < p.summary_width; c0 += 8) {
      float v[8];
      unpack8<T>(c0 == 0 ? pre0 : (c0 == 8 ? pre1 : row[c0 / 8]), v);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] = fmaf(q[g * D + c0 + e], v[e], acc[g]);
    }
  } else {
    const int m = p.summary_width / 2;  // [min | max] over the first m rotated channels (m = D: Quest)
    for (int c0 = 0; c0 < m; c0 += 8) {
      float lo[8], hi[8];
      unpack8<T>(row[c0 / 8], lo);
      unpack8<T>(row[(m + c0) / 8], hi);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float qq = q[g * D + c0 + e];
          acc[g] += fmaxf(qq * lo[e], qq * hi[e]);
        }
    }
  }
  float best = acc[0];
#pragma unroll
  for (int g = 1; g < G; ++g) best = fmaxf(best, acc[g]);
  p.keys[blk] = float_to_ordered(best);
}

// Exclusive block scan of one int per thread (blockDim.x == 1024); returns the prefix, sets *total.
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

constexpr int kSelectThreads = 1024;
constexpr int kSelectBins = 2048;   // 11-bit digits: passes over bits 31..21, 20..10, 9..0
constexpr int kChunk = 4096;        // keys per CTA in the multi-CTA select stages
constexpr int kChunkThreads = 256;  // kChunk / kChunkThreads consecutive keys per thread

// Selection state per (b, h), int32 [4]: prefix bits so far, remaining count, k, flags (1 = take all).
enum SelState : int { kStPrefix = 0, kStRemaining, kStK, kStFlags };

__device__ __forceinline__ int digit_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ uint32_t digit_mask_above(int pass) {  // bits fixed by earlier passes
  return pass == 0 ? 0u : (pass == 1 ? 0xffe00000u : 0xfffffc00u);
}

// Radix-select pass `pass`, stage 1 (grid: chunks x B*H): histogram of this pass's digit over the
// chunk's keys that match the prefix so far; bins added to the (b, h) global histogram.
template <int kUnused = 0>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(kChunkThreads) select_hist_kernel(DecodeParams p, int pass) {
  __shared__ int hist[kSelectBins];
  const int bh = blockIdx.y;
  const int b0 = p.block_ptr[bh], n = p.block_ptr[bh + 1] - b0;
  const int c0 = blockIdx.x * kChunk;
  if (c0 >= n) return;
  const int32_t* st = p.sel_state + bh * 4;
  if (pass > 0 && (st[kStFlags] != 0 || st[kStK] == 0)) return;  // nothing to resolve
  const uint32_t prefix = pass > 0 ? (uint32_t)st[kStPrefix] : 0u, mask = digit_mask_above(pass);
  const int shift = digit_shift(pass), bins = pass == 2 ? 1024 : kSelectBins;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const uint32_t* keys = p.keys + b0;
  const int c1 = min(n, c0 + kChunk);
  for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const uint32_t key = keys[i];
    if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (uint32_t)(bins - 1)], 1);
  }
  __syncthreads();
  int* g = p.ghist + (int64_t)bh * kSelectBins;
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (hist[i]) atomicAdd(&g[i], hist[i]);
}

// Stage 2 (grid: B*H, one warp): find the digit holding the remaining-th largest key, update the
// state, and zero the global histogram for the next pass (and the next call).
template <int kUnused = 0>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(32) select_find_kernel(DecodeParams p, int pass) {
  const int bh = blockIdx.x, lane = threadIdx.x;
  int32_t* st = p.sel_state + bh * 4;
  int* g = p.ghist + (int64_t)bh * kSelectBins;
  const int n = p.block_ptr[bh + 1] - p.block_ptr[bh];
  if (pass == 0) {
    int k = min(p.n_select[bh], n);
    if (k > p.max_select) {
      if (lane == 0) atomicOr(p.status, kBadSelection);
      k = p.max_select;
    }
    if (lane == 0) {
      st[kStPrefix] = 0;
      st[kStRemaining] = k;
      st[kStK] = k;
      st[kStFlags] = k >= n ? 1 : 0;
    }
    __syncwarp();
  }
  const bool active = st[kStFlags] == 0 && st[kStK] > 0;
  const int bins = pass == 2 ? 1024 : kSelectBins, per = bins / 32, shift = digit_shift(pass);
  if (active) {
    const int remaining = st[kStRemaining];
    int local = 0;
    for (int e = 0; e < per; ++e) local += g[bins - 1 - per * lane - e];
    int incl = local;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const int excl = incl - local;
    if (excl < remaining && incl >= remaining) {
      int cum = excl;
      for (int e = 0; e < per; ++e) {
        const int d = bins - 1 - per * lane - e;
        if (cum + g[d] >= remaining) {
          st[kStPrefix] = (int)((uint32_t)st[kStPrefix] | ((uint32_t)d << shift));
          st[kStRemaining] = remaining - cum;
          break;
        }
        cum += g[d];
      }
    }
  }
  __syncwarp();
  for (int i = lane; i < kSelectBins; i += 32) g[i] = 0;
}

// Gather, stage 1 (grid: chunks x B*H): per chunk, keys above the threshold and keys equal to it.
// Final rule: select key > thresh, plus the first `remaining` keys == thresh in index order.
template <int kUnused = 0>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(kChunkThreads) select_count_kernel(DecodeParams p) {
  __shared__ int scratch[32];
  const int bh = blockIdx.y;
  const int b0 = p.block_ptr[bh], n = p.block_ptr[bh + 1] - b0;
  const int c0 = blockIdx.x * kChunk;
  if (c0 >= n) return;
  const int32_t* st = p.sel_state + bh * 4;
  const bool all = st[kStFlags] != 0;
  const uint32_t thresh = (uint32_t)st[kStPrefix];
  const uint32_t* keys = p.keys + b0;
  const int c1 = min(n, c0 + kChunk);
  int gt = 0, eq = 0;
  for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const uint32_t key = keys[i];
    gt += all || key > thresh;
    eq += !all && key == thresh;
  }
  int tot_gt, tot_eq;
  block_exclusive_scan(gt, scratch, &tot_gt);
  block_exclusive_scan(eq, scratch, &tot_eq);
  if (threadIdx.x == 0) {
    int32_t* c = p.chunk_counts + ((int64_t)bh * p.max_chunks + blockIdx.x) * 2;
    c[0] = tot_gt;
    c[1] = tot_eq;
  }
}

// Gather, stage 2 (grid: chunks x B*H): ordered write of the chunk's selected block ids.
template <int kUnused = 0>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(kChunkThreads) select_write_kernel(DecodeParams p) {
  constexpr int kPer = kChunk / kChunkThreads;  // consecutive keys per thread
  __shared__ int scratch[32];
  const int bh = blockIdx.y;
  const int b0 = p.block_ptr[bh], n = p.block_ptr[bh + 1] - b0;
  const int c0 = blockIdx.x * kChunk;
  if (c0 >= n) return;
  const int32_t* st = p.sel_state + bh * 4;
  if (st[kStK] == 0) return;
  const bool all = st[kStFlags] != 0;
  const uint32_t thresh = (uint32_t)st[kStPrefix];
  const int need_eq = st[kStRemaining];
  int gt_run = 0, eq_run = 0;  // counts of earlier chunks
  const int32_t* cc = p.chunk_counts + (int64_t)bh * p.max_chunks * 2;
  for (int c = 0; c < (int)blockIdx.x; ++c) gt_run += cc[2 * c], eq_run += cc[2 * c + 1];
  const uint32_t* keys = p.keys + b0;
  const int i0 = c0 + threadIdx.x * kPer, i1 = min(n, i0 + kPer);
  uint32_t key[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) key[u] = i0 + u < i1 ? keys[i0 + u] : 0u;
  int gt = 0, eq = 0;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    if (i0 + u < i1) {
      gt += all || key[u] > thresh;
      eq += !all && key[u] == thresh;
    }
  }
  int tot;
  int gt_before = gt_run + block_exclusive_scan(gt, scratch, &tot);
  int eq_before = eq_run + block_exclusive_scan(eq, scratch, &tot);
  int32_t* sel = p.sel + (int64_t)bh * p.max_select;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    if (i0 + u >= i1) continue;
    if (all || key[u] > thresh) {
      sel[gt_before + min(eq_before, need_eq)] = b0 + i0 + u;
      ++gt_before;
    } else if (key[u] == thresh) {
      if (eq_before < need_eq) sel[gt_before + eq_before] = b0 + i0 + u;
      ++eq_before;
    }
  }
}

// Cut the sorted selected list of each (b, h) into attention pieces (grid: B*H).
template <int kThreads = kSelectThreads>  // a template: the header is included by several .cu files
__global__ void __launch_bounds__(kThreads) select_pieces_kernel(DecodeParams p) {
  __shared__ int scratch[32];
  const int bh = blockIdx.x;
  const int k = p.sel_state[bh * 4 + kStK];
  const int32_t* sel = p.sel + (int64_t)bh * p.max_select;
  // Pieces: per stripe, its selected range is [lower_bound(block_off_s), lower_bound(block_off_s+1)).
  const int s0 = p.stripe_ptr[bh], ns = p.stripe_ptr[bh + 1] - s0;
  int32_t* pc = p.pieces + (int64_t)bh * p.max_pieces * 3;
  int piece_run = 0;
  for (int t0 = 0; t0 < ns; t0 += blockDim.x) {
    const int j = t0 + threadIdx.x;
    int first = 0, last = 0;
    if (j < ns) {
      const int64_t* meta = p.stripes + (int64_t)(s0 + j) * kStripeCols;
      const int64_t lo_blk = meta[kColBlockOff];
      const int64_t hi_blk = lo_blk + (meta[kColTokens] + p.block - 1) / p.block;
      int lo = 0, hi = k;
      while (lo < hi) { const int mid = (lo + hi) >> 1; if (sel[mid] < lo_blk) lo = mid + 1; else hi = mid; }
      first = lo;
      hi = k;
      while (lo < hi) { const int mid = (lo + hi) >> 1; if (sel[mid] < hi_blk) lo = mid + 1; else hi = mid; }
      last = lo;
    }
    const int np = (last - first + p.piece_blocks - 1) / p.piece_blocks;
    int tot;
    const int before = piece_run + block_exclusive_scan(np, scratch, &tot);
    for (int q = 0; q < np; ++q) {
      const int slot = before + q;
      if (slot < p.max_pieces) {
        pc[slot * 3 + 0] = first + q * p.piece_blocks;
        pc[slot * 3 + 1] = min(last, first + (q + 1) * p.piece_blocks);
        pc[slot * 3 + 2] = s0 + j;
      }
    }
    piece_run += tot;
  }
  if (threadIdx.x == 0) {
    if (piece_run > p.max_pieces) atomicOr(p.status, kBadPieces);
    p.n_pieces[bh] = min(piece_run, p.max_pieces);
  }
}

}  // namespace mosaickv
