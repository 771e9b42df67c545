// Encode kernels: rotate each K or V vector with its stripe's rotation, keep the top `keep` rotated
// elements by magnitude in groups of g, write the packed values (ascending position) and the group
// bitmap, and (for keys) the block summaries.
// - encode_kernel: a token range of one segment for every KV head (a whole prompt segment, or the few
//   tokens of a decode step; the caller passes the range from the start of the last, partial block so
//   that its summary is recomputed). R is staged in shared memory: it serves up to 64 tokens per CTA.
// - append_encode_kernel: the new tokens of many stripes (any layers, requests, heads), K and V, in one
//   launch; R is read straight from global memory into registers (one or a few tokens per stripe do
//   not amortise a shared-memory copy) and summaries are updated from the new tokens alone.
// Both pack with pack_rotated_tokens.
#pragma once
#include "common.cuh"

namespace mosaickv {

// How one side (K or V) of one stripe is packed, from its stripe-table row.
struct SideShape {
  int keep, ks, g, ngroups, kg, words;
  int64_t bits_entry, vals_entry, per_page;  // the side's page tables (StripeCol)
  int status;  // kBadGroup / kBadKeep when (keep, g, channels) cannot be encoded: then nothing is written
};

template <int D>
__device__ __forceinline__ SideShape side_shape(const int64_t* meta, int which, int n_channels) {
  SideShape s;
  s.keep = (int)meta[which == 0 ? kColKeepK : kColKeepV];
  const int g_raw = (int)meta[which == 0 ? kColGroupK : kColGroupV];
  s.g = (g_raw == 1 || g_raw == 2 || g_raw == 4) ? g_raw : 1;
  s.ks = round_up8(s.keep);
  s.ngroups = D / s.g;
  s.kg = s.keep / s.g;
  s.words = (s.ngroups + 31) / 32;
  s.bits_entry = meta[which == 0 ? kColKBits : kColVBits];
  s.vals_entry = meta[which == 0 ? kColKVals : kColVVals];
  s.per_page = meta[which == 0 ? kColKRows : kColVRows];
  const bool bad_keep = s.keep <= 0 || s.keep % s.g != 0 || s.keep > n_channels || n_channels % s.g != 0 || n_channels > D;
  s.status = (s.g != g_raw ? kBadGroup : 0) | (bad_keep ? kBadKeep : 0);
  return s;
}

// Packs n_tok rotated tokens (xr: [n_tok][D] floats in shared memory) into rows first_row,
// first_row + 1, ... of one stripe side: each token keeps its kg highest-energy groups (ties to the
// lower position, like topk on distinct values; groups past the channel truncation never win), the
// bitmap words by ballot and the kept values in ascending position, zero padded to ks. energy
// ([n_tok][D] floats) and kept ([n_tok][D] bytes) are shared scratch. Every thread of the CTA calls
// it: ranks are counted by one thread per (token, group), so a single token still spreads over
// D / g threads instead of one warp's serial loop.
template <typename T, int D>
__device__ void pack_rotated_tokens(const float* xr, int n_tok, float* energy, uint8_t* kept, const SideShape& s,
                                    int n_channels, int64_t first_row, const int64_t* pages) {
  const int n_pairs = n_tok * s.ngroups;
  for (int idx = threadIdx.x; idx < n_pairs; idx += blockDim.x) {
    const int tau = idx / s.ngroups, gi = idx - tau * s.ngroups;
    const float* x = xr + tau * D + gi * s.g;
    float e = x[0] * x[0];
    if (s.g >= 2) e += x[1] * x[1];
    if (s.g == 4) e += x[2] * x[2] + x[3] * x[3];
    energy[tau * D + gi] = gi * s.g < n_channels ? e : -1.f;  // truncated channels never win
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < n_pairs; idx += blockDim.x) {
    const int tau = idx / s.ngroups, gi = idx - tau * s.ngroups;
    const float* et = energy + tau * D;
    const float e = et[gi];
    int rank = 0;
#pragma unroll 8
    for (int j = 0; j < s.ngroups; ++j) {
      const float o = et[j];
      rank += (o > e) || (o == e && j < gi);
    }
    kept[tau * D + gi] = rank < s.kg && e >= 0.f;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
  for (int tau = threadIdx.x >> 5; tau < n_tok; tau += n_warps) {
    uint32_t* brow = reinterpret_cast<uint32_t*>(paged_row(pages, s.bits_entry, s.per_page, first_row + tau, 4 * s.words));
    T* vrow = reinterpret_cast<T*>(paged_row(pages, s.vals_entry, s.per_page, first_row + tau, s.ks * (int64_t)sizeof(T)));
    const float* xt = xr + tau * D;
    int base = 0;
    for (int w = 0; w < s.words; ++w) {
      const int gi = lane + 32 * w;
      const bool is_kept = gi < s.ngroups && kept[tau * D + gi];
      const uint32_t word = __ballot_sync(0xffffffffu, is_kept);
      if (lane == 0) brow[w] = word;
      if (is_kept) {
        const int idx = base + __popc(word & ((1u << lane) - 1u));
        for (int e = 0; e < s.g; ++e) vrow[idx * s.g + e] = Conv<T>::from(xt[gi * s.g + e]);
      }
      base += __popc(word);
    }
    if (lane < s.ks - s.keep) vrow[s.keep + lane] = Conv<T>::from(0.f);  // padding is defined, never garbage
  }
}

// A warp per token: 8 warps so that an append (<= 8 tokens, one CTA per head) encodes its tokens in
// parallel rather than two after another per warp.
constexpr int kEncodeWarps = 8;

template <typename T, int D>
__global__ void __launch_bounds__(kEncodeWarps * 32) encode_kernel(EncodeParams p) {
  constexpr int kWarps = kEncodeWarps;
  extern __shared__ float smem[];
  float* rs = smem;                                  // [D][D + 1] rotation, padded: no bank conflicts
  float* xr = rs + D * (D + 1);                      // [tokens_per_cta][D] rotated tokens
  float* xin = xr + p.tokens_per_cta * D;            // [kWarps][D] input vector per warp
  float* energy = xin + kWarps * D;                  // [tokens_per_cta][D] group energies
  uint8_t* kept = reinterpret_cast<uint8_t*>(energy + p.tokens_per_cta * D);  // [tokens_per_cta][D]

  const int h = blockIdx.y;
  const int stripe = p.stripe_ids[h];
  const int64_t* meta = p.stripes + (int64_t)stripe * kStripeCols;
  const SideShape s = side_shape<D>(meta, p.which, p.n_channels);
  if (threadIdx.x == 0) {
    int st = s.status;
    if (p.block < 1 || p.block > 64 || p.token0 % p.block != 0) st |= kBadBlock;
    if (st) atomicOr(p.status, st);
  }
  if (s.status) return;

  // R into shared memory with kBatch 16-byte loads in flight per thread before any store: a
  // load-store loop waits a full memory round trip per element, which dominated the few-token
  // append launch (one CTA per head, so nothing else hides that latency).
  constexpr int kVec = D * D / 4, kBatch = 8;
  for (int i0 = threadIdx.x; i0 < kVec; i0 += kBatch * blockDim.x) {
    float4 r[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < kVec) r[u] = reinterpret_cast<const float4*>(rotation_row<D>(p.pages, meta, p.which, i / (D / 4)))[i % (D / 4)];
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < kVec) {
        float* dst = rs + (4 * i / D) * (D + 1) + (4 * i) % D;  // 4 | D: a float4 never crosses a row
        dst[0] = r[u].x, dst[1] = r[u].y, dst[2] = r[u].z, dst[3] = r[u].w;
      }
    }
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk0 = blockIdx.x * p.tokens_per_cta;
  const int n_here = min(p.tokens_per_cta, p.n_tokens - chunk0);
  float* xw = xin + warp * D;

  for (int tau = warp; tau < n_here; tau += kWarps) {
    const T* src = static_cast<const T*>(p.x) + (int64_t)(chunk0 + tau) * p.x_tok_stride + (int64_t)h * p.x_head_stride;
    for (int j = lane; j < D; j += 32) xw[j] = Conv<T>::to(src[j]);
    __syncwarp();
    float* xt = xr + tau * D;
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const int i = lane + 32 * c;
      const float* row = rs + i * (D + 1);
      float acc = 0.f;
#pragma unroll 8
      for (int j = 0; j < D; ++j) acc = fmaf(row[j], xw[j], acc);
      xt[i] = acc;
    }
    __syncwarp();  // xw is overwritten by this warp's next token
  }
  __syncthreads();
  pack_rotated_tokens<T, D>(xr, n_here, energy, kept, s, p.n_channels, p.token0 + chunk0, p.pages);

  if (p.summary_width == 0) return;
  const int nb = (n_here + p.block - 1) / p.block;
  const int64_t block0 = (p.token0 + chunk0) / p.block;  // stripe-relative
  for (int idx = threadIdx.x; idx < nb * p.summary_width; idx += blockDim.x) {
    const int bl = idx / p.summary_width, c = idx % p.summary_width;
    const int t0 = bl * p.block, t1 = min(t0 + p.block, n_here);
    float r;
    if (p.summary_kind == kSummaryMean) {
      r = 0.f;
      for (int t = t0; t < t1; ++t) r += xr[t * D + c];
      r /= (float)(t1 - t0);
    } else {
      const int m = p.summary_width / 2;  // [min | max] over the first m rotated channels
      const bool is_max = c >= m;
      const int ch = is_max ? c - m : c;
      r = xr[t0 * D + ch];
      for (int t = t0 + 1; t < t1; ++t) r = is_max ? fmaxf(r, xr[t * D + ch]) : fminf(r, xr[t * D + ch]);
    }
    summary_row<T>(p.pages, meta, block0 + bl, p.summary_width)[c] = Conv<T>::from(r);
  }
}

template <int D>
inline size_t encode_smem_bytes(int tokens_per_cta) {
  // R, rotated tokens, per-warp inputs, energies (floats), then the kept flags (bytes)
  return sizeof(float) * ((size_t)D * (D + 1) + 2 * (size_t)tokens_per_cta * D + kEncodeWarps * D) +
         (size_t)tokens_per_cta * D;
}

// Host launcher (no torch). Returns the CUDA launch error, if any.
template <typename T, int D>
cudaError_t launch_encode(const EncodeParams& p, cudaStream_t stream) {
  if (p.n_tokens <= 0) return cudaSuccess;
  const size_t smem = encode_smem_bytes<D>(p.tokens_per_cta);
  cudaError_t err = cudaFuncSetAttribute(encode_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  dim3 grid((p.n_tokens + p.tokens_per_cta - 1) / p.tokens_per_cta, p.n_heads);
  encode_kernel<T, D><<<grid, kEncodeWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

// Append encode: a CTA per (row, side, part). 8 warps split the D rows of R (each lane holds its share
// as float4 registers, all loads in flight at once: one memory round trip per CTA); a row's dot
// products are reduced over the D / 4 lanes holding it. New tokens go through in chunks of
// kAppendChunk (a decode step appends one per stripe; a deferred flush a few). A long row (an
// eviction of hundreds of tokens) is split over gridDim.z parts (append_parts): part 0 takes the
// partial blocks at both ends, whose running summary continues from and into block_sum, and parts
// 1.. the whole blocks between them, kAppendSpan tokens (rounded up to whole blocks) each, so that no
// two CTAs touch one block's summary or block_sum. One part: the whole row in one CTA.
constexpr int kAppendWarps = 8;
constexpr int kAppendChunk = 8;
constexpr int kAppendSpan = 16;

// Tokens of whole blocks that one part z >= 1 of a split row encodes.
__host__ __device__ inline int64_t append_span(int block) { return (kAppendSpan + block - 1) / block * block; }

// CTAs per row along z for rows of at most max_tokens tokens (0: unknown, one CTA per row).
inline int append_parts(int64_t max_tokens, int block) {
  const int64_t span = append_span(block);
  const int64_t parts = max_tokens > span ? 1 + (max_tokens + span - 1) / span : 1;
  return parts < 1024 ? (int)parts : 1024;
}

template <typename T, int D>
__global__ void __launch_bounds__(kAppendWarps * 32, 2) append_encode_kernel(AppendParams p) {
  constexpr int kLanesPerRow = D / 4;                 // float4s per row of R
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;     // rows of R one warp-wide load covers
  constexpr int kRowsPerWarp = D / kAppendWarps;
  constexpr int kLoads = kRowsPerWarp / kRowsPerLoad;  // float4 registers per lane
  static_assert(kLoads * kRowsPerLoad * kAppendWarps == D, "D must split evenly over the warps");
  __shared__ float xr[kAppendChunk * D];       // rotated new tokens of the current chunk
  __shared__ float energy[kAppendChunk * D];   // pack_rotated_tokens scratch
  __shared__ uint8_t kept[kAppendChunk * D];

  const int side = blockIdx.y;  // 0 keys (with summaries), 1 values
  const int64_t* row = p.rows + (int64_t)blockIdx.x * kAppendCols;
  const int64_t stripe = row[kAppStripe], x_off = row[kAppXOff], x_stride = row[kAppXStride];
  const int64_t n = row[kAppTokens], pos = row[kAppPos], end = pos + n;
  int bad = 0;
  if (stripe < 0 || stripe >= p.n_stripes || n < 1 || pos < 0 || x_off < 0 || x_stride < 0 || x_off % 4 != 0 ||
      x_stride % 4 != 0 || x_off + (n - 1) * x_stride + D > p.x_numel)
    bad = kBadAppendRow;
  if (p.block < 1 || p.block > 64) bad |= kBadBlock;
  if (bad) {
    if (threadIdx.x == 0) atomicOr(p.status, bad);
    return;
  }
  // R's loads go out as soon as the stripe row's rotation columns are read.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col4 = lane % kLanesPerRow, sub = lane / kLanesPerRow;
  const int64_t* meta = p.stripes + stripe * kStripeCols;
  float4 r[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u)
    r[u] = reinterpret_cast<const float4*>(
        rotation_row<D>(p.pages, meta, side, warp * kRowsPerWarp + u * kRowsPerLoad + sub))[col4];

  const SideShape s = side_shape<D>(meta, side, p.n_channels);
  const bool summarise = side == 0 && p.summary_width > 0;
  if (end > meta[kColTokens]) bad = kBadAppendRow;
  if (s.status | bad) {
    if (threadIdx.x == 0) atomicOr(p.status, s.status | bad);
    return;
  }

  // Running summary of the open block, one channel per thread: the mean's fp32 sum (carried between
  // steps in block_sum) or [min, max] (the stored rounded row: min/max commute with rounding).
  const int m = summary_channels(p.summary_kind, p.summary_width);
  const int c = threadIdx.x;
  float run_lo = 0.f, run_hi = 0.f;
  const int z = blockIdx.z;  // the part of a split row (append_parts)
  if (summarise && c < m && pos % p.block != 0 && z == 0) {  // the head's block continues
    if (p.summary_kind == kSummaryMean) {
      run_lo = p.block_sum[stripe * p.summary_width + c];
    } else {
      const T* row = summary_row<T>(p.pages, meta, pos / p.block, p.summary_width);
      run_lo = Conv<T>::to(row[c]);
      run_hi = Conv<T>::to(row[m + c]);
    }
  }

  // This part's token ranges [a, b) (positions in the stripe): everything with one part; else part 0
  // the head [pos, head) and the tail [tail, end) (partial blocks), part z >= 1 its span of the whole
  // blocks in [head, tail) (the last part also whatever the grid did not cover).
  const int64_t head = min(end, (pos + p.block - 1) / p.block * p.block);
  const int64_t tail = max(head, end / p.block * p.block);
  const int64_t span = append_span(p.block);
  int64_t ranges[2][2] = {{pos, end}, {end, end}};
  if (gridDim.z > 1) {
    if (z == 0) {
      ranges[0][1] = head;
      ranges[1][0] = tail;
    } else {
      ranges[0][0] = min(tail, head + (z - 1) * span);
      ranges[0][1] = z == (int)gridDim.z - 1 ? tail : min(tail, ranges[0][0] + span);
    }
  }
  const T* x = static_cast<const T*>(side == 0 ? p.xk : p.xv) + x_off + 4 * col4;  // token pos's vector
  for (const auto& range : ranges) {
    for (int64_t c0 = range[0]; c0 < range[1]; c0 += kAppendChunk) {  // c0: the chunk's first position
      const int nc = (int)min((int64_t)kAppendChunk, range[1] - c0);
      for (int tau = 0; tau < nc; ++tau) {
        const uint2 u2 = *reinterpret_cast<const uint2*>(x + (c0 - pos + tau) * x_stride);  // x[4 col4 .. +3]
        float2 x01, x23;
        unpack2<T>(u2.x, x01);
        unpack2<T>(u2.y, x23);
#pragma unroll
        for (int u = 0; u < kLoads; ++u) {
          float acc = r[u].x * x01.x + r[u].y * x01.y + r[u].z * x23.x + r[u].w * x23.y;
#pragma unroll
          for (int o = kLanesPerRow / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
          if (col4 == 0) xr[tau * D + warp * kRowsPerWarp + u * kRowsPerLoad + sub] = acc;
        }
      }
      __syncthreads();
      pack_rotated_tokens<T, D>(xr, nc, energy, kept, s, p.n_channels, c0, p.pages);
      if (summarise && c < m) {
        for (int tau = 0; tau < nc; ++tau) {
          const int64_t t = c0 + tau;
          const int i = (int)(t % p.block);
          const float v = xr[tau * D + c];
          if (p.summary_kind == kSummaryMean) {
            run_lo = (i == 0 ? 0.f : run_lo) + v;
          } else {
            run_lo = i == 0 ? v : fminf(run_lo, v);
            run_hi = i == 0 ? v : fmaxf(run_hi, v);
          }
          if (i == p.block - 1 || t == end - 1) {  // the block is complete, or this is its state after the append
            T* row = summary_row<T>(p.pages, meta, t / p.block, p.summary_width);
            if (p.summary_kind == kSummaryMean) {
              row[c] = Conv<T>::from(run_lo / (float)(i + 1));
            } else {
              row[c] = Conv<T>::from(run_lo);
              row[m + c] = Conv<T>::from(run_hi);
            }
          }
        }
      }
      __syncthreads();  // xr is overwritten by the next chunk
    }
  }
  // the open block's sum for the next append (read only when that starts mid-block, i.e. when this
  // one ended mid-block: then part 0 took the tail)
  if (z == 0 && summarise && c < m && p.summary_kind == kSummaryMean)
    p.block_sum[stripe * p.summary_width + c] = run_lo;
}

template <typename T, int D>
cudaError_t launch_append_encode(const AppendParams& p, cudaStream_t stream) {
  if (p.n_rows <= 0) return cudaSuccess;
  const dim3 grid(p.n_rows, 2, append_parts(p.max_tokens, p.block));
  append_encode_kernel<T, D><<<grid, kAppendWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mosaickv
