// PackedAttention decode (flash-decoding split + log-sum-exp merge) and the dense token-selection
// baseline, sharing the selection and merge stages.
//
// Grid of the attention stage: (max_pieces + 1, B*H). CTA x < n_pieces[bh] handles one piece (up to
// piece_blocks selected blocks of one stripe) for all G query heads of the KV head; CTA x == max_pieces
// handles the dense sinks + window. Each writes an unnormalised partial output (in the stripe's
// rotated V space) with its per-head max and sum of exponentials. The merge stage combines pieces per
// stripe, un-rotates once per stripe (o = R_V^T o'), and sums stripes.
#pragma once
#include <algorithm>

#include "select.cuh"

namespace mosaickv {

constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kUnroll = 4;  // dense rows in flight per thread: memory-level parallelism

// Per-head max and sum over the CTA's logits in one pass each; leaves p = exp(s - m) in `logits`
// ([n_tok][G]) and (m, l) in ml ([G][2]). scratch holds >= 32 * G floats.
template <int G>
__device__ __forceinline__ void softmax_phase(float* logits, int n_tok, float* ml, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  float m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.f;
  for (int t = threadIdx.x; t < n_tok; t += blockDim.x)
#pragma unroll
    for (int g = 0; g < G; ++g) m[g] = fmaxf(m[g], logits[t * G + g]);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = warp_max(m[g]);
    if (lane == 0) scratch[warp * G + g] = m[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float r = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) r = fmaxf(r, scratch[w * G + g]);
    m[g] = r;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n_tok; t += blockDim.x)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float s = logits[t * G + g];
      const float e = s == -INFINITY ? 0.f : __expf(s - m[g]);
      logits[t * G + g] = e;
      l[g] += e;
    }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    l[g] = warp_sum(l[g]);
    if (lane == 0) scratch[warp * G + g] = l[g];
  }
  __syncthreads();
  if (threadIdx.x < G) {
    float r = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) r += scratch[w * G + threadIdx.x];
    ml[threadIdx.x * 2] = m[threadIdx.x];
    ml[threadIdx.x * 2 + 1] = r;
  }
  __syncthreads();
}

// q'[pos] (all G heads, layout [D][G]) times val, accumulated into s; 16-byte shared loads.
template <int G>
__device__ __forceinline__ void fma_q(const float* qs, int pos, float val, float* s) {
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int g4 = 0; g4 < G / 4; ++g4) {
      const float4 qv = reinterpret_cast<const float4*>(qs + pos * G)[g4];
      s[g4 * 4 + 0] = fmaf(qv.x, val, s[g4 * 4 + 0]);
      s[g4 * 4 + 1] = fmaf(qv.y, val, s[g4 * 4 + 1]);
      s[g4 * 4 + 2] = fmaf(qv.z, val, s[g4 * 4 + 2]);
      s[g4 * 4 + 3] = fmaf(qv.w, val, s[g4 * 4 + 3]);
    }
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = fmaf(qs[pos * G + g], val, s[g]);
  }
}

// Sums per-thread partial outputs red[n_part][G][D] into out[G][D] (global).
template <int G, int D>
__device__ __forceinline__ void sum_parts(const float* red, int n_part, float* out) {
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    float a = 0.f;
    for (int w = 0; w < n_part; ++w) a += red[w * G * D + i];
    out[i] = a;
  }
}

// Issues kUnroll independent 16-byte loads (this thread's 8 elements of tokens t0 + slot + u*kSlots)
// before any is used, so several rows are in flight; r[u] = -1 marks a token past n_tok or padding.
template <typename T, int kSlots, typename RowOf>
__device__ __forceinline__ void load_dense_rows(const T* base, int t0, int n_tok, int slot, int sub, RowOf row_of,
                                                int64_t (&r)[kUnroll], uint4 (&x)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int t = t0 + slot + u * kSlots;
    r[u] = t < n_tok ? row_of(t) : -1;
    if (r[u] >= 0) x[u] = *reinterpret_cast<const uint4*>(base + r[u] + sub * 8);
  }
}

// Dense rows (sinks + window, or the dense baseline): D/8 threads per token, 16-byte loads, kUnroll
// tokens in flight per thread. row_of(t) gives the element offset of token t's row, or -1 (padding).
template <typename T, int D, int G, typename RowOf>
__device__ __forceinline__ void dense_tokens(const T* k, const T* v, int n_tok, RowOf row_of, const float* qs,
                                             float scale, float* logits, float* ml, float* scratch, float* red,
                                             float* out_o) {
  constexpr int kLanes = D / 8;
  constexpr int kSlots = kAttnThreads / kLanes;
  const int sub = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
  for (int t0 = 0; t0 < n_tok; t0 += kSlots * kUnroll) {  // uniform trip count: shuffles need every lane
    int64_t r[kUnroll];
    uint4 x[kUnroll];
    load_dense_rows<T, kSlots>(k, t0, n_tok, slot, sub, row_of, r, x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + slot + u * kSlots;
      float part[G];
#pragma unroll
      for (int g = 0; g < G; ++g) part[g] = 0.f;
      if (r[u] >= 0) {
        float f[8];
        unpack8<T>(x[u], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) fma_q<G>(qs, sub * 8 + e, f[e], part);
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int o = kLanes / 2; o > 0; o >>= 1) part[g] += __shfl_xor_sync(0xffffffffu, part[g], o);
        if (sub == 0 && t < n_tok) logits[t * G + g] = r[u] >= 0 ? part[g] * scale : -INFINITY;
      }
    }
  }
  softmax_phase<G>(logits, n_tok, ml, scratch);
  float o[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) o[g][e] = 0.f;
  for (int t0 = 0; t0 < n_tok; t0 += kSlots * kUnroll) {
    int64_t r[kUnroll];
    uint4 x[kUnroll];
    load_dense_rows<T, kSlots>(v, t0, n_tok, slot, sub, row_of, r, x);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r[u] < 0) continue;
      const int t = t0 + slot + u * kSlots;
      float f[8];
      unpack8<T>(x[u], f);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pg = logits[t * G + g];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[g][e] = fmaf(pg, f[e], o[g][e]);
      }
    }
  }
  // Slots of one warp share `sub`: fold them with shuffles, then one partial per warp.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
#pragma unroll
      for (int off = kLanes; off < 32; off <<= 1) o[g][e] += __shfl_xor_sync(0xffffffffu, o[g][e], off);
      if (lane < kLanes) red[(warp * G + g) * D + sub * 8 + e] = o[g][e];
    }
  sum_parts<G, D>(red, kAttnWarps, out_o);
}

// One packed row: bitmap words (W <= 4) and the first 4 value chunks (keep <= 32) are loaded up front
// so that a thread has all its loads in flight before the first use.
template <typename T>
struct PackedRow {
  uint32_t w[4];
  uint4 pre[4];
  const T* vrow;
  int keep, g;

  __device__ __forceinline__ void load(const uint32_t* brow, int n_words, const T* row, int keep_, int g_) {
    vrow = row, keep = keep_, g = g_;
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = i < n_words ? brow[i] : 0u;
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c * 8 < keep) pre[c] = reinterpret_cast<const uint4*>(vrow)[c];
  }

  // f(pos, raw) for each kept element in ascending position order (raw: the stored T value).
  template <typename F>
  __device__ __forceinline__ void walk(F f) const {
    uint32_t cur = w[0];
    int wi = 0;
    auto next_group = [&]() {
      while (cur == 0u) {
        ++wi;
        cur = wi == 1 ? w[1] : (wi == 2 ? w[2] : w[3]);
      }
      const int grp = wi * 32 + __ffs(cur) - 1;
      cur &= cur - 1u;
      return grp;
    };
    if (g == 1 && (keep & 7) == 0) {  // the common case: one element per bit, whole 16-byte chunks
      auto chunk = [&](const uint4& u) {
        const T* x = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) f(next_group(), x[i]);
      };
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (c * 8 < keep) chunk(pre[c]);
      for (int j0 = 32; j0 < keep; j0 += 8) chunk(reinterpret_cast<const uint4*>(vrow)[j0 / 8]);
      return;
    }
    int grp = 0, e = g;  // e == g: the next element starts a new group
    auto chunk = [&](const uint4& u, int j0) {
      const T* x = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (j0 + i < keep) {
          if (e == g) {
            grp = next_group();
            e = 0;
          }
          f(grp * g + e, x[i]);
          ++e;
        }
      }
    };
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c * 8 < keep) chunk(pre[c], c * 8);
    for (int j0 = 32; j0 < keep; j0 += 8) chunk(reinterpret_cast<const uint4*>(vrow)[j0 / 8], j0);
  }
};

__host__ __device__ constexpr int round_up4(int n) { return (n + 3) & ~3; }

constexpr int kTileRows = 16;  // packed V rows staged per warp

template <int D>
__host__ __device__ constexpr int tile_stride() { return D + 8; }  // elements; 16-byte rows, no bank conflicts

template <typename T, int D, int G, bool kPacked>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(DecodeParams p) {
  extern __shared__ __align__(16) float smem[];
  const int piece_tokens = max(p.piece_blocks * p.block, p.dense_cap);
  float* qs = smem;                                          // [D][G]
  float* ml = qs + D * G;                                    // [G][2]
  float* scratch = ml + round_up4(2 * G);                    // [32 * G]
  int* s_sel = reinterpret_cast<int*>(scratch + 32 * G);     // [64] selected blocks of the piece
  float* logits = reinterpret_cast<float*>(s_sel + 64);      // [piece tokens][G]
  float* region = logits + round_up4(piece_tokens * G);      // V tiles, then partial-sum reduction (16B aligned)

  const int bh = blockIdx.y, b = bh / p.n_kv_heads, h = bh % p.n_kv_heads;
  const int x = blockIdx.x;
  float* out_o = p.part_o + ((int64_t)bh * (p.max_pieces + 1) + x) * G * D;
  float* out_ml = p.part_ml + ((int64_t)bh * (p.max_pieces + 1) + x) * G * 2;
  const int np = p.n_pieces[bh];
  if (x < p.max_pieces && x >= np) return;  // unused slot: the merge reads only the first n_pieces

  if (x == p.max_pieces) {
    // Sinks + recent window: dense, unrotated.
    const T* q = static_cast<const T*>(p.q) + ((int64_t)b * p.n_kv_heads * G + (int64_t)h * G) * D;
    for (int i = threadIdx.x; i < D * G; i += blockDim.x) qs[(i % D) * G + i / D] = Conv<T>::to(q[i]);
    __syncthreads();
    const int64_t base = (int64_t)bh * p.dense_cap * D;
    dense_tokens<T, D, G>(static_cast<const T*>(p.dense_k), static_cast<const T*>(p.dense_v), p.dense_len[b],
                          [&](int t) { return base + (int64_t)t * D; }, qs, p.scale, logits, ml, scratch, region,
                          out_o);
  } else {
    const int32_t* pc = p.pieces + ((int64_t)bh * p.max_pieces + x) * 3;
    const int first = pc[0], last = pc[1], stripe = pc[2];
    const int64_t* meta = p.stripes + (int64_t)stripe * kStripeCols;
    const int S = (int)meta[kColTokens];
    const int64_t block_off = meta[kColBlockOff];
    const int n_tok = (last - first) * p.block;
    const float* qr = p.qrot + (int64_t)stripe * G * D;
    for (int i = threadIdx.x; i < D * G; i += blockDim.x) qs[(i % D) * G + i / D] = qr[i];
    for (int i = threadIdx.x; i < last - first; i += blockDim.x)
      s_sel[i] = (int)(p.sel[(int64_t)bh * p.max_select + first + i] - block_off);
    __syncthreads();
    // Stripe-relative token index of piece token t, or -1 past the end of a partial last block.
    auto tok_of = [&](int t) -> int {
      const int tok = s_sel[t / p.block] * p.block + t % p.block;
      return tok < S ? tok : -1;
    };
    if constexpr (kPacked) {
      const int kK = (int)meta[kColKeepK], kV = (int)meta[kColKeepV];
      const int ksK = round_up8(kK), ksV = round_up8(kV);
      const int gK = (int)meta[kColGroupK], gV = (int)meta[kColGroupV];
      const int WK = (D / gK + 31) / 32, WV = (D / gV + 31) / 32;
      const uint32_t* kb = p.kbits + meta[kColKBitOff];
      const uint32_t* vb = p.vbits + meta[kColVBitOff];
      const T* kv = static_cast<const T*>(p.kvals) + meta[kColKValOff];
      const T* vv = static_cast<const T*>(p.vvals) + meta[kColVValOff];
      // K: one thread per token, logits straight from the packed row (q' gathered at kept positions).
      for (int t0 = 0; t0 < n_tok; t0 += 2 * kAttnThreads) {
        PackedRow<T> row[2];
        int tok[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int t = t0 + threadIdx.x + u * kAttnThreads;
          tok[u] = t < n_tok ? tok_of(t) : -1;
          if (tok[u] >= 0) row[u].load(kb + (int64_t)tok[u] * WK, WK, kv + (int64_t)tok[u] * ksK, kK, gK);
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int t = t0 + threadIdx.x + u * kAttnThreads;
          if (t >= n_tok) continue;
          float s[G];
#pragma unroll
          for (int g = 0; g < G; ++g) s[g] = 0.f;
          if (tok[u] >= 0) row[u].walk([&](int pos, T raw) { fma_q<G>(qs, pos, Conv<T>::to(raw), s); });
#pragma unroll
          for (int g = 0; g < G; ++g) logits[t * G + g] = tok[u] >= 0 ? s[g] * p.scale : -INFINITY;
        }
      }
      softmax_phase<G>(logits, n_tok, ml, scratch);
      // V: each of 16 lanes scatters its token's kept values into a zeroed on-chip row (no atomics: a
      // row belongs to one lane), then the warp accumulates p * row with lane l owning positions 2l, 2l+1
      // (+64 per pair): o' stays in registers, in the stripe's rotated V space.
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      T* tile = reinterpret_cast<T*>(region) + warp * kTileRows * tile_stride<D>();
      float acc[G][D / 32];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int c = 0; c < D / 32; ++c) acc[g][c] = 0.f;
      const int my_row = lane % kTileRows, half = lane / kTileRows;
      for (int t0 = 0; t0 < n_tok; t0 += kAttnWarps * kTileRows) {
        const int base = t0 + warp * kTileRows;
        const int t = base + my_row;
        const int tk = half == 0 && t < n_tok ? tok_of(t) : -1;
        PackedRow<T> row;
        if (tk >= 0) row.load(vb + (int64_t)tk * WV, WV, vv + (int64_t)tk * ksV, kV, gV);  // in flight while zeroing
        T* mine = tile + my_row * tile_stride<D>();
#pragma unroll
        for (int i = 0; i < D / 16; ++i) reinterpret_cast<uint4*>(mine)[half * (D / 16) + i] = make_uint4(0u, 0u, 0u, 0u);
        __syncwarp();
        if (tk >= 0) row.walk([&](int pos, T raw) { mine[pos] = raw; });
        __syncwarp();
        const int n_here = min(kTileRows, n_tok - base);
        for (int tt = 0; tt < n_here; ++tt) {
          const T* r = tile + tt * tile_stride<D>();
          float pg[G];
          if constexpr (G % 4 == 0) {
#pragma unroll
            for (int g4 = 0; g4 < G / 4; ++g4) {
              const float4 v4 = reinterpret_cast<const float4*>(logits + (base + tt) * G)[g4];
              pg[4 * g4] = v4.x, pg[4 * g4 + 1] = v4.y, pg[4 * g4 + 2] = v4.z, pg[4 * g4 + 3] = v4.w;
            }
          } else {
#pragma unroll
            for (int g = 0; g < G; ++g) pg[g] = logits[(base + tt) * G + g];
          }
#pragma unroll
          for (int c = 0; c < D / 64; ++c) {
            float2 f;
            unpack2<T>(*reinterpret_cast<const uint32_t*>(r + 64 * c + 2 * lane), f);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              acc[g][2 * c] = fmaf(pg[g], f.x, acc[g][2 * c]);
              acc[g][2 * c + 1] = fmaf(pg[g], f.y, acc[g][2 * c + 1]);
            }
          }
        }
        __syncwarp();
      }
      __syncthreads();  // tiles are dead; the region now holds per-warp partial sums
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int c = 0; c < D / 64; ++c) {
          region[(warp * G + g) * D + 64 * c + 2 * lane] = acc[g][2 * c];
          region[(warp * G + g) * D + 64 * c + 2 * lane + 1] = acc[g][2 * c + 1];
        }
      sum_parts<G, D>(region, kAttnWarps, out_o);
    } else {
      const int64_t row_off = meta[kColRowOff];
      dense_tokens<T, D, G>(static_cast<const T*>(p.kdense), static_cast<const T*>(p.vdense), n_tok,
                            [&](int t) -> int64_t {
                              const int tok = tok_of(t);
                              return tok >= 0 ? (row_off + tok) * D : -1;
                            },
                            qs, p.scale, logits, ml, scratch, region, out_o);
    }
  }
  if (threadIdx.x < 2 * G) out_ml[threadIdx.x] = ml[threadIdx.x];
}

// Merge, stage 1: grid (max_stripes + 1, B*H). CTA x < n_stripes(bh) combines the pieces of stripe x
// (scaled to the global max and normalised by the global sum) and un-rotates: o = R_V^T o'. CTA
// x == max_stripes does the dense piece. Others write zeros so that stage 2 can sum blindly.
template <typename T, int D, int G>
__global__ void __launch_bounds__(128) merge_kernel(DecodeParams p) {
  __shared__ float os[G][D];
  __shared__ float gm[G], gl[G];
  __shared__ float scratch[32];
  const int bh = blockIdx.y, x = blockIdx.x;
  const int np = p.n_pieces[bh];
  const float* ml = p.part_ml + (int64_t)bh * (p.max_pieces + 1) * G * 2;
  const float* po = p.part_o + (int64_t)bh * (p.max_pieces + 1) * G * D;
  auto slot_of = [&](int i) { return i < np ? i : p.max_pieces; };  // i == np: the dense piece
  for (int g = 0; g < G; ++g) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i <= np; i += blockDim.x) m = fmaxf(m, ml[(slot_of(i) * G + g) * 2]);
    m = block_reduce<true>(m, scratch);
    float l = 0.f;
    for (int i = threadIdx.x; i <= np; i += blockDim.x) {
      const float mi = ml[(slot_of(i) * G + g) * 2];
      if (mi != -INFINITY) l += __expf(mi - m) * ml[(slot_of(i) * G + g) * 2 + 1];
    }
    l = block_reduce<false>(l, scratch);
    if (threadIdx.x == 0) { gm[g] = m; gl[g] = l > 0.f ? 1.f / l : 0.f; }
  }
  __syncthreads();
  float* dst = p.stripe_out + ((int64_t)bh * (p.max_stripes + 1) + x) * G * D;
  const int s0 = p.stripe_ptr[bh], ns = p.stripe_ptr[bh + 1] - s0;
  if (x == p.max_stripes || x < ns) {
    const int stripe = s0 + x;
    // Pieces are sorted by stripe: this stripe's pieces are one contiguous range [lo, hi).
    __shared__ int range[2];
    if (threadIdx.x == 0) { range[0] = np; range[1] = np; }
    __syncthreads();
    if (x == p.max_stripes) {
      if (threadIdx.x == 0) range[1] = np + 1;  // the dense piece, slot max_pieces
    } else {
      for (int j = threadIdx.x; j < np; j += blockDim.x) {
        const int sj = p.pieces[((int64_t)bh * p.max_pieces + j) * 3 + 2];
        const int prev = j > 0 ? p.pieces[((int64_t)bh * p.max_pieces + j - 1) * 3 + 2] : -1;
        const int next = j + 1 < np ? p.pieces[((int64_t)bh * p.max_pieces + j + 1) * 3 + 2] : -1;
        if (sj == stripe && prev != stripe) range[0] = j;
        if (sj == stripe && next != stripe) range[1] = j + 1;
      }
    }
    __syncthreads();
    const int lo = range[0], hi = range[1];
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
      const int g = i / D;
      float a = 0.f;
      for (int j = lo; j < hi; ++j) {
        const int slot = slot_of(j);
        const float mj = ml[(slot * G + g) * 2];
        if (mj != -INFINITY) a += __expf(mj - gm[g]) * po[(int64_t)slot * G * D + i];
      }
      os[g][i % D] = a * gl[g];
    }
    __syncthreads();
    const float* R = (x == p.max_stripes || p.rot == nullptr) ? nullptr : p.rot + ((int64_t)stripe * 2 + 1) * D * D;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
      const int g = i / D, d = i % D;
      float a;
      if (R == nullptr) {
        a = os[g][d];
      } else {
        a = 0.f;
        for (int j = 0; j < D; ++j) a = fmaf(R[(int64_t)j * D + d], os[g][j], a);
      }
      dst[i] = a;
    }
  } else {
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) dst[i] = 0.f;
  }
}

// Merge, stage 2: out[b, h*G + g, :] = sum over stripes (and the dense piece).
template <typename T, int D, int G>
__global__ void __launch_bounds__(256) final_kernel(DecodeParams p) {
  const int bh = blockIdx.x;
  const float* src = p.stripe_out + (int64_t)bh * (p.max_stripes + 1) * G * D;
  T* out = static_cast<T*>(p.out) + (int64_t)bh * G * D;  // [b][h*G + g][d] == bh * G * D + g * D + d
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    float a = 0.f;
    for (int x = 0; x <= p.max_stripes; ++x) a += src[(int64_t)x * G * D + i];
    out[i] = Conv<T>::from(a);
  }
}

inline size_t attention_smem_bytes(int D, int G, int piece_tokens, bool packed) {
  const size_t head = (size_t)D * G + round_up4(2 * G) + 32 * G + 64 + round_up4(piece_tokens * G);
  const size_t red = (size_t)kAttnWarps * G * D;                                          // per-warp partials
  const size_t tiles = packed ? (size_t)kAttnWarps * kTileRows * (D + 8) * 2 / sizeof(float) : 0;  // 16-bit rows
  return sizeof(float) * (head + std::max(tiles, red));
}

// Runs the stages selected in p.stages on `stream`. No host synchronisation, no allocation.
template <typename T, int D, int G, bool kPacked>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const int bh = p.batch * p.n_kv_heads;
  if ((p.stages & kStageRotate) && p.n_stripes > 0) rotate_q_kernel<T, D, G><<<dim3(p.n_stripes, D / kRotRows), 256, 0, stream>>>(p);
  if ((p.stages & kStageScore) && p.n_blocks > 0) score_kernel<T, D, G><<<(p.n_blocks + 255) / 256, 256, 0, stream>>>(p);
  if (p.stages & kStageSelect) {
    const cudaError_t err = launch_select(p, bh, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.stages & kStageAttend) {
    const int piece_tokens = max(p.piece_blocks * p.block, p.dense_cap);
    const size_t smem = attention_smem_bytes(D, G, piece_tokens, kPacked);
    cudaError_t err = cudaFuncSetAttribute(attention_kernel<T, D, G, kPacked>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    attention_kernel<T, D, G, kPacked><<<dim3(p.max_pieces + 1, bh), kAttnThreads, smem, stream>>>(p);
  }
  if (p.stages & kStageMerge) {
    merge_kernel<T, D, G><<<dim3(p.max_stripes + 1, bh), 128, 0, stream>>>(p);
    final_kernel<T, D, G><<<bh, 256, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace mosaickv
