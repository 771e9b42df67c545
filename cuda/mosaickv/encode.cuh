// Encode kernel: rotate each K or V vector with its stripe's rotation, keep the top `keep` rotated
// elements by magnitude in groups of g, write the packed values (ascending position) and the group
// bitmap, and (for keys) the block summaries. One launch encodes a token range of one segment for
// every KV head: a whole prompt segment, or the few tokens appended at a decode step (the caller
// passes the range from the start of the last, partial block so that its summary is recomputed).
#pragma once
#include "common.cuh"

namespace mosaickv {


template <int D>
__host__ __device__ constexpr int encode_words(int g) { return (D / g + 31) / 32; }

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
  float* energy = xin + kWarps * D;                  // [kWarps][D] group energies per warp

  const int h = blockIdx.y;
  const int stripe = p.stripe_ids[h];
  const int64_t* meta = p.stripes + (int64_t)stripe * kStripeCols;
  const int keep = (int)meta[p.which == 0 ? kColKeepK : kColKeepV];
  const int ks = round_up8(keep);
  const int g_raw = (int)meta[p.which == 0 ? kColGroupK : kColGroupV];
  const int g = (g_raw == 1 || g_raw == 2 || g_raw == 4) ? g_raw : 1;  // invalid g: reported below
  const int ngroups = D / g;
  const int kg = keep / g;
  const int W = (ngroups + 31) / 32;
  const int64_t bit_off = meta[p.which == 0 ? kColKBitOff : kColVBitOff];
  const int64_t val_off = meta[p.which == 0 ? kColKValOff : kColVValOff];

  if (threadIdx.x == 0) {
    int st = 0;
    if (g != g_raw) st |= kBadGroup;
    if (keep <= 0 || keep % g != 0 || keep > p.n_channels || p.n_channels % g != 0 || p.n_channels > D) st |= kBadKeep;
    if (p.block < 1 || p.block > 64 || p.token0 % p.block != 0) st |= kBadBlock;
    if (st) atomicOr(p.status, st);
  }
  if (g != g_raw || keep <= 0 || keep % g != 0 || keep > p.n_channels) return;

  // R into shared memory with kBatch 16-byte loads in flight per thread before any store: a
  // load-store loop waits a full memory round trip per element, which dominated the few-token
  // append launch (one CTA per head, so nothing else hides that latency).
  constexpr int kVec = D * D / 4, kBatch = 8;
  const float4* R4 = reinterpret_cast<const float4*>(p.rot + ((int64_t)stripe * 2 + p.which) * D * D);
  for (int i0 = threadIdx.x; i0 < kVec; i0 += kBatch * blockDim.x) {
    float4 r[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = i0 + u * blockDim.x;
      if (i < kVec) r[u] = R4[i];
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
  float* ew = energy + warp * D;

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
      // Energy of the g-element group containing i: adjacent positions sit in adjacent lanes.
      float e = acc * acc;
      if (g >= 2) e += __shfl_xor_sync(0xffffffffu, e, 1);
      if (g >= 4) e += __shfl_xor_sync(0xffffffffu, e, 2);
      if (i % g == 0) ew[i / g] = (i < p.n_channels) ? e : -1.f;  // truncated channels never win
    }
    __syncwarp();

    uint32_t* brow = p.bits + bit_off + (int64_t)(p.token0 + chunk0 + tau) * W;
    T* vrow = static_cast<T*>(p.vals) + val_off + (int64_t)(p.token0 + chunk0 + tau) * ks;
    int base = 0;
    for (int w = 0; w < W; ++w) {
      const int gi = lane + 32 * w;
      bool kept = false;
      if (gi < ngroups) {
        const float e = ew[gi];
        int rank = 0;
        for (int j = 0; j < ngroups; ++j) {
          const float o = ew[j];
          rank += (o > e) || (o == e && j < gi);  // ties: lower position first
        }
        kept = rank < kg && e >= 0.f;
      }
      const uint32_t word = __ballot_sync(0xffffffffu, kept);
      if (lane == 0) brow[w] = word;
      if (kept) {
        const int idx = base + __popc(word & ((1u << lane) - 1u));
        for (int e = 0; e < g; ++e) vrow[idx * g + e] = Conv<T>::from(xt[gi * g + e]);
      }
      base += __popc(word);
    }
    if (lane < ks - keep) vrow[keep + lane] = Conv<T>::from(0.f);  // padding is defined, never garbage
    __syncwarp();
  }

  if (p.summary == nullptr) return;
  __syncthreads();
  const int nb = (n_here + p.block - 1) / p.block;
  const int64_t block0 = meta[kColBlockOff] + (p.token0 + chunk0) / p.block;
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
    static_cast<T*>(p.summary)[(block0 + bl) * p.summary_width + c] = Conv<T>::from(r);
  }
}

template <int D>
inline size_t encode_smem_bytes(int tokens_per_cta) {
  return sizeof(float) * ((size_t)D * (D + 1) + (size_t)tokens_per_cta * D + 2 * kEncodeWarps * D);
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

}  // namespace mosaickv
