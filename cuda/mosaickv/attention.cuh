// PackedAttention decode (flash-decoding split + log-sum-exp merge) and the dense token-selection
// baseline, sharing the selection, attention and merge stages.
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

// Sequence b's sinks + window rows of KV head h, K or V: [dense_cap, D], from its own buffer when
// the caller passed their addresses (the cache manager), else from the batch's stacked tensors.
template <typename T, int D>
__device__ __forceinline__ const T* dense_rows_of(const DecodeParams& p, int b, int h, bool is_v) {
  const int64_t head = (int64_t)h * p.dense_cap * D;
  if (p.dense_rows != nullptr) return reinterpret_cast<const T*>(p.dense_rows[(is_v ? p.batch : 0) + b]) + head;
  return static_cast<const T*>(is_v ? p.dense_v : p.dense_k) + (int64_t)b * p.n_kv_heads * p.dense_cap * D + head;
}

// Start of an attention CTA (x, bh): false if its slot is unused (only the first n_pieces are
// pieces; the merge reads each stripe's range of them, stripe_pieces). A piece CTA waits for the
// select (its pieces) here; the dense CTA (x == max_pieces) needs nothing of it, so it does its work
// while the select finishes and waits only before it exits, to keep the chain of stages
// (wait_for_prior_stage) when no piece CTA runs.
__device__ __forceinline__ bool enter_attention_piece(const DecodeParams& p, int bh, int x) {
  allow_next_stage();
  if (x == p.max_pieces) return true;
  wait_for_prior_stage();
  return x < p.n_pieces[bh];
}

// ---------------------------------------------------------------------------------------------------
// The attention: tensor cores over rows in shared-memory tiles (tile_attention_kernel).
//
// Grid (max_pieces + 1, B*H) x kPaThreads. CTA x < n_pieces[bh] handles one piece (<= piece_blocks
// selected blocks of one stripe), CTA x == max_pieces the dense sinks + window, both for all G query
// heads of the KV head. Each warp runs flash-decoding over its own chunks of 16 tokens (chunks warp,
// warp + 4, ...) with an online softmax, and the CTA combines its 4 warps at the end. Per chunk:
//   1. lanes 0-15 bring the K rows of the chunk's 16 tokens, lanes 16-31 the V rows, each into one
//      row of the warp's shared tiles. MosaicKV rows (kPacked) are expanded: walk the bitmap, store
//      each kept value at its rotated position; the tiles are not zeroed: the mma operands are masked
//      by the bitmaps (flash_chunk); the next chunk's packed rows are already in flight (registers).
//      Dense rows (the sinks + window, and every piece of the dense baseline) are copied whole;
//   2. logits on tensor cores: S^T[16 x 16] = Q[16 x D] K^T with mma.m16n8k16 (f32 accumulate);
//      Q's rows hold q' split into hi + lo 16-bit halves (rows r and r + 8), so the logits keep ~16
//      bits of q' although the operands are 16-bit;
//   3. p = exp2(s - m) per head, the running max/sum updated, o'^T rescaled when a max moved;
//   4. o'^T[D x 8] += V^T P^T with mma.m16n8k16: A = V tile through ldmatrix.trans, B = p split into
//      hi + lo again (columns n and n + 4 for G <= 4; two mmas for G = 8).
// Output as before: unnormalised o' in the stripe's rotated V space (dense rows: unrotated) and
// (max, sum of exp) per head, natural-log units.
// ---------------------------------------------------------------------------------------------------
constexpr int kPaThreads = 128;
constexpr int kPaWarps = kPaThreads / 32;
constexpr int kChunk = 16;  // tokens per warp step (one mma M/N tile)

template <int D>
__host__ __device__ constexpr int pa_stride() { return D + 8; }  // elements; ldmatrix rows conflict-free

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// c += a (16x16, row) * b (16x8, col); 16-bit operands, f32 accumulators.
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two floats rounded to storage type, packed low half first (the mma fragment element order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  T e[2] = {Conv<T>::from(lo), Conv<T>::from(hi)};
  uint32_t u;
  memcpy(&u, e, 4);
  return u;
}

// x = hi + lo with hi = round(x) and lo = round(x - hi): ~16 significant bits in two 16-bit values.
template <typename T>
__device__ __forceinline__ void split2(float x, float& hi, float& lo) {
  hi = Conv<T>::to(Conv<T>::from(x));
  lo = x - hi;
}

// A fragments of Q for every k-step (16 rotated positions), written to shared memory for the whole
// CTA (dst[s * 32 + lane]: lane's fragment of k-step s; call from every warp, warp w writes k-steps
// w, w + kPaWarps, ..., so the CTA's start waits for two of them, not eight): row r < 8 holds the hi part
// of head r % G, row r + 8 the lo part of the same head; scaled by scale * log2(e) so that the logits
// come out in log2 units. q(g, d) reads head g's element d (any source type). Kept in shared memory,
// not registers: 32 registers fewer per thread lets 4 CTAs share an SM instead of 3.
template <typename T, int D, int G, typename QOf>
__device__ __forceinline__ void q_fragments(QOf q, float scale, uint4* dst) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int g = gid % G;
#pragma unroll
  for (int s = threadIdx.x >> 5; s < D / 16; s += kPaWarps) {
    const int d0 = 16 * s + 2 * tig;
    float hi[4], lo[4];
    const float v[4] = {q(g, d0) * scale, q(g, d0 + 1) * scale, q(g, d0 + 8) * scale, q(g, d0 + 9) * scale};
#pragma unroll
    for (int i = 0; i < 4; ++i) split2<T>(v[i], hi[i], lo[i]);
    dst[s * 32 + lane] = make_uint4(pack2<T>(hi[0], hi[1]),   // row gid,     cols 2 tig, 2 tig + 1
                                    pack2<T>(lo[0], lo[1]),   // row gid + 8
                                    pack2<T>(hi[2], hi[3]),   // row gid,     cols + 8
                                    pack2<T>(lo[2], lo[3]));  // row gid + 8, cols + 8
  }
}

// One warp's flash-decoding state. acc: o'^T in the mma C layout (m-tile mt: rows = rotated positions
// 16 mt + gid (+ 8), columns 2 tig, 2 tig + 1 = (head, hi/lo part) columns of P); m: running max of
// head gid % G (log2 units); l: this lane's share of the running sum (its 4 tokens of each chunk).
template <int D>
struct WarpFlash {
  float acc[D / 16][4];
  float m, l;
};

// Byte k of the result's halves from the sign bits of byte k of lo (low half) and of hi (high half):
// 0xffff where that bit is set, else 0 (prmt's sign-replicating selectors).
__device__ __forceinline__ uint32_t half_masks(uint32_t lo, uint32_t hi, int k) {
  uint32_t m;
  const uint32_t sel = (0x8u | k) * 0x11u | (0xcu | k) * 0x1100u;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(m) : "r"(lo), "r"(hi), "r"(sel));
  return m;
}

// An mma fragment's four registers ANDed with their elements' bits: f[0], f[1] with bytes `byte`,
// `byte + 1` of (lo0, hi0), f[2], f[3] with those of (lo1, hi1) (half_masks).
__device__ __forceinline__ void mask_fragment(uint32_t (&f)[4], uint32_t lo0, uint32_t hi0, uint32_t lo1, uint32_t hi1,
                                              int byte) {
  f[0] &= half_masks(lo0, hi0, byte);
  f[1] &= half_masks(lo0, hi0, byte + 1);
  f[2] &= half_masks(lo1, hi1, byte);
  f[3] &= half_masks(lo1, hi1, byte + 1);
}

// Attends one chunk of 16 tokens whose K and V rows are in the warp's tiles (row = token, stride
// pa_stride<D>()); valid: bit t set if token t of the chunk exists; qa: this lane's Q fragments in
// shared memory (``q_fragments``' dst + lane); bits: the rows' g = 1 bitmaps (K rows 0-15, then V rows
// 0-15; all ones for rows written whole). The tiles are not zeroed between chunks: each mma operand is
// masked with the bitmap bits of its elements, so a position the row does not keep reads 0 whatever
// an earlier row left there.
template <typename T, int D, int G>
__device__ __forceinline__ void flash_chunk(const T* ktile, const T* vtile, uint32_t valid, const uint4* qa,
                                            const uint32_t (*bits)[4], WarpFlash<D>& st) {
  constexpr int kStride = pa_stride<D>();
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  // ldmatrix.x4: lanes 8m .. 8m + 7 address the rows of matrix m = (tokens 8 (m >> 1) + r, columns
  // 8 (m & 1) + 16 k of the tile); the same addressing serves K (B fragments of two 8-token n-tiles)
  // and V (.trans: the A fragment of a 16-position m-tile).
  const int row = ((lane >> 4) << 3) + (lane & 7), col = ((lane >> 3) & 1) << 3;
  const uint32_t kaddr = smem_u32(ktile + row * kStride + col);
  const uint32_t vaddr = smem_u32(vtile + row * kStride + col);
  float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
  // K fragment kb[m]: token 8 (m >> 1) + gid, positions 16 s + 8 (m & 1) + 2 tig (+1): byte
  // 2 (s & 1) + (m & 1) of bitmap word s / 2, shifted down by 2 tig; x << 7 / x << 6 bring the pair's
  // two bits to the byte's sign bit.
  uint32_t ka7 = 0u, ka6 = 0u, kb7 = 0u, kb6 = 0u;
#pragma unroll
  for (int s = 0; s < D / 16; ++s) {
    if ((s & 1) == 0) {
      const uint32_t xa = (bits[gid][s / 2] >> (2 * tig)) & 0x03030303u;
      const uint32_t xb = (bits[gid + 8][s / 2] >> (2 * tig)) & 0x03030303u;
      ka7 = xa << 7, ka6 = xa << 6, kb7 = xb << 7, kb6 = xb << 6;
    }
    uint32_t kb[4];
    ldmatrix_x4(kb, kaddr + s * 32);
    mask_fragment(kb, ka7, ka6, kb7, kb6, 2 * (s & 1));
    const uint4 qv = qa[s * 32];
    const uint32_t a[4] = {qv.x, qv.y, qv.z, qv.w};
    Mma<T>::run(c0, a, kb[0], kb[1]);  // tokens 0-7
    Mma<T>::run(c1, a, kb[2], kb[3]);  // tokens 8-15
  }
  // This lane's logits: head gid % G, tokens 2 tig, 2 tig + 1, 8 + 2 tig, 9 + 2 tig (hi + lo rows).
  float sv[4] = {c0[0] + c0[2], c0[1] + c0[3], c1[0] + c1[2], c1[1] + c1[3]};
  const int tt[4] = {2 * tig, 2 * tig + 1, 8 + 2 * tig, 9 + 2 * tig};
  float cm = -INFINITY;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (!((valid >> tt[i]) & 1u)) sv[i] = -INFINITY;
    cm = fmaxf(cm, sv[i]);
  }
  cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 1));
  cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 2));
  const float mn = fmaxf(st.m, cm);
  const float alpha = mn == -INFINITY ? 1.f : fast_exp2(st.m - mn);
  float pv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pv[i] = sv[i] == -INFINITY ? 0.f : fast_exp2(sv[i] - mn);
  st.l = st.l * alpha + ((pv[0] + pv[1]) + (pv[2] + pv[3]));
  st.m = mn;
  if (__any_sync(0xffffffffu, alpha != 1.f)) {
    // Column c of o'^T belongs to head c % G; that head's factor sits in lane 4 (c % G).
    const float a0 = __shfl_sync(0xffffffffu, alpha, 4 * ((2 * tig) % G));
    const float a1 = __shfl_sync(0xffffffffu, alpha, 4 * ((2 * tig + 1) % G));
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      st.acc[mt][0] *= a0;
      st.acc[mt][1] *= a1;
      st.acc[mt][2] *= a0;
      st.acc[mt][3] *= a1;
    }
  }
  float hi[4], lo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) split2<T>(pv[i], hi[i], lo[i]);
  // V fragment va[m] (.trans): tokens 8 (m >> 1) + 2 tig (low half) and + 1 (high half), position
  // 16 mt + 8 (m & 1) + gid: byte 2 (mt & 1) + (m & 1) of bitmap word mt / 2, shifted down by gid.
  uint32_t v07 = 0u, v17 = 0u, v87 = 0u, v97 = 0u;
  auto v_fragment = [&](uint32_t(&va)[4], int mt) {
    if ((mt & 1) == 0) {
      const auto bit7 = [&](int row) { return ((bits[16 + row][mt / 2] >> gid) & 0x01010101u) << 7; };
      v07 = bit7(2 * tig), v17 = bit7(2 * tig + 1), v87 = bit7(8 + 2 * tig), v97 = bit7(9 + 2 * tig);
    }
    ldmatrix_x4_trans(va, vaddr + mt * 32);
    mask_fragment(va, v07, v17, v87, v97, 2 * (mt & 1));
  };
  // B fragment of P^T (16 tokens x 8 columns): b0 = tokens 2 tig, 2 tig + 1, b1 = + 8, column gid.
  if constexpr (G == 8) {  // column = head; hi and lo in two mmas into the same accumulators
    const uint32_t bh0 = pack2<T>(hi[0], hi[1]), bh1 = pack2<T>(hi[2], hi[3]);
    const uint32_t bl0 = pack2<T>(lo[0], lo[1]), bl1 = pack2<T>(lo[2], lo[3]);
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      uint32_t va[4];
      v_fragment(va, mt);
      Mma<T>::run(st.acc[mt], va, bh0, bh1);
      Mma<T>::run(st.acc[mt], va, bl0, bl1);
    }
  } else {  // column gid: head gid % G, hi part for gid < 4, lo part for gid >= 4
    const bool lo_part = gid >= 4;
    const uint32_t b0 = lo_part ? pack2<T>(lo[0], lo[1]) : pack2<T>(hi[0], hi[1]);
    const uint32_t b1 = lo_part ? pack2<T>(lo[2], lo[3]) : pack2<T>(hi[2], hi[3]);
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      uint32_t va[4];
      v_fragment(va, mt);
      Mma<T>::run(st.acc[mt], va, b0, b1);
    }
  }
}

// One walk over a row's kept positions (g = 1) for the fast expansion: kUp visits them lowest first,
// otherwise highest first. q0..q3 is the queue of bitmap words still to visit (bit-reversed when
// kUp, so that bfind, which finds the highest set bit, yields the lowest position); addr is the
// shared-memory byte address that bit 0 of the current word maps to (kUp: bit b of the reversed
// word is position 31 - b, at addr - 2 b). put() stores one value at the next position. Callers
// keep to the fast path's bitmaps: the non-empty words come first, so only the downward walk can
// meet an empty word, at the top, which ``from`` skips.
template <bool kUp>
struct Walk {
  uint32_t q0, q1, q2, q3, addr;

  static __device__ __forceinline__ Walk from(const uint32_t (&w)[4], uint32_t row) {
    if constexpr (kUp) {
      return Walk{__brev(w[0]), __brev(w[1]), __brev(w[2]), __brev(w[3]), row + 62};
    } else {
      Walk x{w[3], w[2], w[1], w[0], row + 3 * 64};
#pragma unroll
      for (int i = 0; i < 3; ++i) x.next_if(x.q0 == 0u);
      return x;
    }
  }

  __device__ __forceinline__ void next_if(bool z) {
    q0 = z ? q1 : q0;
    q1 = z ? q2 : q1;
    q2 = z ? q3 : q2;
    addr = z ? (kUp ? addr + 64 : addr - 64) : addr;
  }

  __device__ __forceinline__ void put(uint32_t v) {
    uint32_t b;
    asm("bfind.u32 %0, %1;" : "=r"(b) : "r"(q0));
    asm volatile("st.shared.b16 [%0], %1;" ::"r"(kUp ? addr - 2 * b : addr + 2 * b), "h"((unsigned short)v)
                 : "memory");
    q0 ^= 1u << b;
    next_if(q0 == 0u);
  }
};

// One packed row in registers: bitmap words (W <= 4) and the first 4 value chunks (keep <= 32), all
// loaded before any is used; values past the first 32 are read from global memory during the walk.
template <typename T>
struct PackedRow {
  uint32_t w[4];
  uint4 pre[4];

  // Read-only global loads (LDG through the non-coherent path; the rows were written by earlier
  // launches): the addresses come from shared memory, so plain loads would be generic ones.
  __device__ __forceinline__ void load(const uint32_t* brow, int n_words, const T* vrow, int keep) {
    if (n_words == 4) {
      const uint4 b = __ldg(reinterpret_cast<const uint4*>(brow));
      w[0] = b.x, w[1] = b.y, w[2] = b.z, w[3] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = i < n_words ? __ldg(brow + i) : 0u;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c * 8 < keep) pre[c] = __ldg(reinterpret_cast<const uint4*>(vrow) + c);
  }

  // Fast path (g = 1, keep a multiple of 8, no empty bitmap word before the last non-empty one): one
  // walk per row, lowest position first (``Walk``).
  __device__ __forceinline__ void scatter_fast(const T* vrow, int keep, uint32_t dst) const {
    Walk<true> up = Walk<true>::from(w, dst);
    auto chunk = [&](const uint4& u) {
      up.put(u.x), up.put(u.x >> 16), up.put(u.y), up.put(u.y >> 16);
      up.put(u.z), up.put(u.z >> 16), up.put(u.w), up.put(u.w >> 16);
    };
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c * 8 < keep) chunk(pre[c]);
    for (int j0 = 32; j0 < keep; j0 += 8) chunk(__ldg(reinterpret_cast<const uint4*>(vrow) + j0 / 8));
  }

  // Fast path for keep 16 or 32 (the values all in registers): two independent walks, the lowest
  // keep / 2 kept positions upwards and the highest keep / 2 downwards, interleaved, so each lane's
  // serial chain (bfind, clear, next word) is half as long as one walk's.
  __device__ __forceinline__ void scatter_two_walks(int keep, uint32_t dst) const {
    Walk<true> up = Walk<true>::from(w, dst);
    Walk<false> down = Walk<false>::from(w, dst);
    auto pair = [&](const uint4& lo, const uint4& hi) {  // values 0-7 of lo upwards, 7-0 of hi downwards
      up.put(lo.x), down.put(hi.w >> 16), up.put(lo.x >> 16), down.put(hi.w);
      up.put(lo.y), down.put(hi.z >> 16), up.put(lo.y >> 16), down.put(hi.z);
      up.put(lo.z), down.put(hi.y >> 16), up.put(lo.z >> 16), down.put(hi.y);
      up.put(lo.w), down.put(hi.x >> 16), up.put(lo.w >> 16), down.put(hi.x);
    };
    if (keep == 32) {
      pair(pre[0], pre[3]);
      pair(pre[1], pre[2]);
    } else {
      pair(pre[0], pre[1]);
    }
  }

  // General path: any g, any keep. Writes every kept value to dst[position]. kG: elements per bitmap
  // bit (g); kExact: keep is a multiple of 8 (no per-element bound check).
  template <int kG, bool kExact>
  __device__ __forceinline__ void scatter(const T* vrow, int keep, T* dst) const {
    uint32_t cur = w[0], n1 = w[1], n2 = w[2], n3 = w[3];
    int base = 0, grp = 0;
    // Next kept group in ascending order; empty words are skipped by shifting the word queue.
    auto next = [&]() {
      while (cur == 0u && base < 96) {
        cur = n1, n1 = n2, n2 = n3, n3 = 0u;
        base += 32;
      }
      const int b = base + __ffs(cur) - 1;
      cur &= cur - 1u;
      return b;
    };
    auto chunk = [&](const uint4& u, int j0) {
      const T* xv = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (kExact || j0 + i < keep) {
          if (i % kG == 0) grp = next() * kG;
          dst[grp + i % kG] = xv[i];
        }
      }
    };
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (c * 8 < keep) chunk(pre[c], c * 8);
    for (int j0 = 32; j0 < keep; j0 += 8) chunk(__ldg(reinterpret_cast<const uint4*>(vrow) + j0 / 8), j0);
  }

  // dst: a row of D elements in shared memory (positions not kept are zeroed before, or masked after).
  __device__ __forceinline__ void expand(const T* vrow, int keep, int g, T* dst) const {
    const uint32_t nz = (w[0] != 0u) | (w[1] != 0u) << 1 | (w[2] != 0u) << 2 | (w[3] != 0u) << 3;
    if (g == 1 && (keep == 32 || keep == 16) && (nz & (nz + 1)) == 0) {
      scatter_two_walks(keep, smem_u32(dst));
    } else if (g == 1 && (keep & 7) == 0 && (nz & (nz + 1)) == 0) {
      scatter_fast(vrow, keep, smem_u32(dst));
    } else if (g == 1) {
      scatter<1, false>(vrow, keep, dst);
    } else if (g == 2) {
      scatter<2, false>(vrow, keep, dst);
    } else {
      scatter<4, false>(vrow, keep, dst);
    }
  }
};

template <typename T, int D>
__device__ __forceinline__ void zero_row(T* dst) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) reinterpret_cast<uint4*>(dst)[i] = make_uint4(0u, 0u, 0u, 0u);
}

// One warp's chunks of dense rows, copied whole into the tiles (rows written whole: their bitmaps
// stay all ones): the sinks + window, and the dense baseline's selected rows. row_of(t): the address
// of chunk token t's row on this lane's side (K for lanes 0-15, V for 16-31), nullptr past the end.
// The copies are asynchronous (cp.async holds no registers). kRowPerLane: each lane copies its own
// token's row, so one copy instruction reads 16 bytes of each of 32 rows; otherwise the side's 16
// lanes copy each row together and one instruction reads whole rows (two cache lines per row at
// D = 128): the dense baseline's whole call at 1M tokens, batch 8, 3186 -> 2535 us. The packed
// kernel keeps the row per lane for its sinks + window (one CTA per (b, h), off the critical path):
// with the shared copy its piece loop was scheduled differently and MosaicKV's call ran about 1 %
// slower (`kernels-ab-dense-rows-h200-s19.json`).
template <typename T, int D, int G, bool kRowPerLane, typename RowOf>
__device__ __forceinline__ void dense_chunks(RowOf row_of, int n_chunks, T* my_row, T* ktile, T* vtile,
                                             const uint4* qa, const uint32_t (*bits)[4], WarpFlash<D>& st) {
  constexpr int kStride = pa_stride<D>();
  constexpr int kPieces = D / 8;              // 16-byte pieces of a row
  constexpr int kRowsPerStep = 16 / kPieces;  // rows one shared copy instruction takes per side (1 at D = 128)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int side = lane & 16, piece = (lane & 15) % kPieces, sub = (lane & 15) / kPieces;
  for (int c = warp; c < n_chunks; c += kPaWarps) {
    const T* mine = row_of(c * kChunk + (lane & 15));
    if constexpr (kRowPerLane) {
      if (mine != nullptr) {
#pragma unroll
        for (int i = 0; i < kPieces; ++i) cp_async16(my_row + 8 * i, mine + 8 * i);
      } else {
        zero_row<T, D>(my_row);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kChunk; i += kRowsPerStep) {
        const int r = i + sub;
        const T* src = reinterpret_cast<const T*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(mine), side | r));
        T* dst = (side ? vtile : ktile) + r * kStride + 8 * piece;
        if (src != nullptr) {
          cp_async16(dst, src + 8 * piece);
        } else {
          *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    cp_async_wait_all();
    const uint32_t valid = __ballot_sync(0xffffffffu, mine != nullptr) & 0xffffu;  // lanes 0-15 = tokens 0-15
    __syncwarp();
    flash_chunk<T, D, G>(ktile, vtile, valid, qa, bits, st);
    __syncwarp();
  }
}

// kPacked: the pieces' rows are MosaicKV's packed rows (expanded), or the dense baseline's (copied).
template <typename T, int D, int G, bool kPacked>
__global__ void __launch_bounds__(kPaThreads, 4) tile_attention_kernel(DecodeParams p) {
  constexpr int kStride = pa_stride<D>();
  __shared__ __align__(16) T s_tile[kPaWarps][2][kChunk * kStride];  // per warp: K rows, V rows
  __shared__ float s_m[kPaWarps][G], s_l[kPaWarps][G];
  __shared__ uint4 s_qa[D / 16 * 32];  // Q fragments (``q_fragments``)
  __shared__ __align__(16) uint32_t s_bits[kPaWarps][32][4];  // per warp: the chunk's bitmaps (flash_chunk)
  __shared__ int s_sel[kMaxPieceBlocks];
  // First rows of each selected block, per side (K, V): bitmap and values side by side, one 16-byte
  // load; indexed by side, not through a pointer chosen by side (a generic pointer, which cost the
  // chunk loop a shared-window base and address arithmetic).
  __shared__ ulonglong2 s_rows[2][kMaxPieceBlocks];
  static_assert(sizeof(s_tile) >= sizeof(float) * kPaWarps * G * D, "the warp partials reuse the tiles");

  const int bh = blockIdx.y, b = bh / p.n_kv_heads, h = bh % p.n_kv_heads;
  const int x = blockIdx.x;
  if (!enter_attention_piece(p, bh, x)) return;
  float* out_o = p.part_o + ((int64_t)bh * (p.max_pieces + 1) + x) * G * D;
  float* out_ml = p.part_ml + ((int64_t)bh * (p.max_pieces + 1) + x) * G * 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const float qscale = p.scale * 1.4426950408889634f;  // logits in log2 units
  const bool is_v = lane >= 16;                          // lanes 0-15 fill K rows, 16-31 V rows
  const int my = lane & 15;                              // this lane's token (row) in the chunk
  T* ktile = s_tile[warp][0];
  T* vtile = s_tile[warp][1];
  T* my_row = s_tile[warp][is_v ? 1 : 0] + my * kStride;
  uint4* my_bits = reinterpret_cast<uint4*>(s_bits[warp][lane]);
  *my_bits = make_uint4(~0u, ~0u, ~0u, ~0u);  // rows written whole (dense, or zeroed then expanded)

  WarpFlash<D> st;
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j) st.acc[mt][j] = 0.f;
  st.m = -INFINITY;
  st.l = 0.f;

  if (x == p.max_pieces) {
    // Sinks + recent window: dense, unrotated rows copied into the tiles.
    const T* q = static_cast<const T*>(p.q) + ((int64_t)b * p.n_kv_heads * G + (int64_t)h * G) * D;
    q_fragments<T, D, G>([&](int g, int d) { return Conv<T>::to(q[g * D + d]); }, qscale, s_qa);
    __syncthreads();
    const int n_tok = p.dense_len[b];
    const T* rows = dense_rows_of<T, D>(p, b, h, is_v);
    dense_chunks<T, D, G, kPacked>([&](int t) { return t < n_tok ? rows + (int64_t)t * D : nullptr; },
                          (n_tok + kChunk - 1) / kChunk, my_row, ktile, vtile, s_qa + lane, s_bits[warp], st);
  } else {
    const int32_t* pc = p.pieces + ((int64_t)bh * p.max_pieces + x) * 3;
    const int first = pc[0], last = pc[1], stripe = pc[2];
    const int64_t* meta = p.stripes + (int64_t)stripe * kStripeCols;
    const int S = (int)meta[kColTokens];
    const int64_t block_off = meta[kColBlockOff];
    const int B = p.block;
    // Each selected block's id in the stripe and, for packed rows, its rows resolved through the page
    // tables once: a block never straddles a page, so its rows are consecutive from the block's first
    // row (bitmaps and values, K and V).
    {
      const int kw = (D / (int)meta[kColGroupK] + 31) / 32, vw = (D / (int)meta[kColGroupV] + 31) / 32;
      const int64_t kvb = round_up8((int)meta[kColKeepK]) * (int64_t)sizeof(T);
      const int64_t vvb = round_up8((int)meta[kColKeepV]) * (int64_t)sizeof(T);
      for (int i = threadIdx.x; i < last - first; i += blockDim.x) {
        const int j = (int)(p.sel[(int64_t)bh * p.max_select + first + i] - block_off);
        s_sel[i] = j;
        if constexpr (kPacked) {
          const int64_t r = (int64_t)j * B;
          auto row_at = [&](int entry_col, int rows_col, int64_t row_bytes) {
            return (unsigned long long)paged_row(p.pages, meta[entry_col], meta[rows_col], r, row_bytes);
          };
          s_rows[0][i] = make_ulonglong2(row_at(kColKBits, kColKRows, 4 * kw), row_at(kColKVals, kColKRows, kvb));
          s_rows[1][i] = make_ulonglong2(row_at(kColVBits, kColVRows, 4 * vw), row_at(kColVVals, kColVRows, vvb));
        }
      }
    }
    const float* qr = p.qrot + (int64_t)stripe * G * D;  // dense rows: q itself (the rotate stage copies it)
    q_fragments<T, D, G>([&](int g, int d) { return qr[g * D + d]; }, qscale, s_qa);
    // This lane's side (K or V) of the stripe.
    const int keep = (int)meta[is_v ? kColKeepV : kColKeepK];
    const int grp = (int)meta[is_v ? kColGroupV : kColGroupK];
    const int n_words = (D / grp + 31) / 32, stride = round_up8(keep);
    // Bitmap bits are positions only for g = 1 on both sides; otherwise the rows are zeroed first.
    const bool masked = meta[kColGroupK] == 1 && meta[kColGroupV] == 1;
    const int n_tok = (last - first) * B;
    const int n_chunks = (n_tok + kChunk - 1) / kChunk;
    const float inv_b = 1.f / (float)B;
    __syncthreads();  // s_sel, the block rows and the Q fragments
    // Piece token t -> (its block in the piece, row within the block), or blk = -1 (past the piece,
    // or past a partial last block). t / B through a float reciprocal: exact while t / B stays
    // far below 2^22 / B (piece tokens <= 128 blocks x 64).
    struct Row {
      int blk, in;
    };
    auto row_of = [&](int t) -> Row {
      if (t >= n_tok) return {-1, 0};
      const int blk = (int)(((float)t + 0.5f) * inv_b);
      const int in = t - blk * B;
      return s_sel[blk] * B + in < S ? Row{blk, in} : Row{-1, 0};
    };
    if constexpr (!kPacked) {  // the dense baseline: the selected rows, dense and unrotated, copied whole
      const T* rows = static_cast<const T*>(is_v ? p.vdense : p.kdense) + meta[kColRowOff] * D;
      dense_chunks<T, D, G, false>(
          [&](int t) -> const T* {
            const Row r = row_of(t);
            return r.blk >= 0 ? rows + (int64_t)(s_sel[r.blk] * B + r.in) * D : nullptr;
          },
          n_chunks, my_row, ktile, vtile, s_qa + lane, s_bits[warp], st);
    } else {
      auto bits_of = [&](Row r) {
        return reinterpret_cast<const uint32_t*>(s_rows[is_v][r.blk].x) + (int64_t)r.in * n_words;
      };
      auto vals_of = [&](Row r) { return reinterpret_cast<const T*>(s_rows[is_v][r.blk].y) + (int64_t)r.in * stride; };
      PackedRow<T> cur{}, nxt{};  // nxt stays defined when a lane has no next row (it is copied to cur)
      Row rc = warp < n_chunks ? row_of(warp * kChunk + my) : Row{-1, 0};
      if (rc.blk >= 0) cur.load(bits_of(rc), n_words, vals_of(rc), keep);
      for (int c = warp; c < n_chunks; c += kPaWarps) {
        const int cn = c + kPaWarps;
        const Row rn = cn < n_chunks ? row_of(cn * kChunk + my) : Row{-1, 0};
        if (rn.blk >= 0) nxt.load(bits_of(rn), n_words, vals_of(rn), keep);
        if (masked) {
          *my_bits = rc.blk >= 0 ? make_uint4(cur.w[0], cur.w[1], cur.w[2], cur.w[3]) : make_uint4(0u, 0u, 0u, 0u);
        } else {
          zero_row<T, D>(my_row);
        }
        if (rc.blk >= 0) cur.expand(vals_of(rc), keep, grp, my_row);
        const uint32_t valid = __ballot_sync(0xffffffffu, rc.blk >= 0) & 0xffffu;  // lanes 0-15 = tokens 0-15
        __syncwarp();
        flash_chunk<T, D, G>(ktile, vtile, valid, s_qa + lane, s_bits[warp], st);
        __syncwarp();
        cur = nxt;
        rc = rn;
      }
    }
  }

  // Combine the warps: each warp's (m, l, o') to shared memory, then rescale to the CTA max.
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 1);
  st.l += __shfl_xor_sync(0xffffffffu, st.l, 2);
  if constexpr (G != 8) {  // column c (hi part) + column c + 4 (lo part), held by lane tig ^ 2
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) st.acc[mt][j] += __shfl_xor_sync(0xffffffffu, st.acc[mt][j], 2);
  }
  __syncthreads();  // every warp is done with its tiles: they now hold the warps' partial outputs
  float* wo = reinterpret_cast<float*>(&s_tile[0][0][0]);  // [kPaWarps][G][D]
  if (tig == 0 && gid < G) {
    s_m[warp][gid] = st.m;
    s_l[warp][gid] = st.l;
  }
  if (G == 8 || tig == 0 || (G == 4 && tig == 1)) {
    const int h0 = (2 * tig) % G, h1 = (2 * tig + 1) % G;
    float* w0 = wo + (warp * G + h0) * D;
    float* w1 = wo + (warp * G + h1) * D;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      w0[16 * mt + gid] = st.acc[mt][0];
      w0[16 * mt + gid + 8] = st.acc[mt][2];
      if (G != 1) {
        w1[16 * mt + gid] = st.acc[mt][1];
        w1[16 * mt + gid + 8] = st.acc[mt][3];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int g = i / D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kPaWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < kPaWarps; ++w)
      if (s_m[w][g] != -INFINITY) a += fast_exp2(s_m[w][g] - mx) * wo[(w * G + g) * D + i % D];
    out_o[i] = a;
  }
  if (threadIdx.x < G) {
    const int g = threadIdx.x;
    float mx = -INFINITY, l = 0.f;
#pragma unroll
    for (int w = 0; w < kPaWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
#pragma unroll
    for (int w = 0; w < kPaWarps; ++w)
      if (s_m[w][g] != -INFINITY) l += fast_exp2(s_m[w][g] - mx) * s_l[w][g];
    out_ml[2 * g] = mx * 0.6931471805599453f;  // back to natural-log units (the merge's); -inf stays -inf
    out_ml[2 * g + 1] = l;
  }
  if (x == p.max_pieces) wait_for_prior_stage();  // see enter_attention_piece
}

// ---------------------------------------------------------------------------------------------------
// Merge: one launch, grid (max_stripes + 1, B*H) x kMergeThreads. CTA x < ns (the (b, h)'s stripes)
// combines the pieces of stripe x, scaled to their max, and un-rotates them once, o = R_V^T o' (R_V
// is copied into shared memory, asynchronously, before the CTA waits for the attention: the cache was
// written before the call); CTA x == max_stripes takes the dense piece. Each writes its stripe's
// unnormalised output and (max, sum of exp) and counts itself on the (b, h); the CTA that completes
// the count sums the stripes, scaled to the global max and normalised, into the output. The select
// zeroes the count each call, and the completing CTA too, so that the merge stage can also be run
// alone, again and again.
// ---------------------------------------------------------------------------------------------------
constexpr int kMergeThreads = 512;

// True in every thread of the CTA whose arrival brings *counter to `total`. The barrier orders the
// CTA's writes before thread 0's arrival, which releases them; the last CTA's arrival acquires every
// earlier one's, and it reads their outputs through L2 (__ldcg: L1 is not coherent across SMs).
__device__ __forceinline__ bool arrive_last(int* counter, int total) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    int before;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
    last = before == total - 1;
  }
  __syncthreads();
  return last;
}

// Where combine_partials' thread groups meet: each group's float4s of the output and (max, sum) per head.
template <int G>
struct CombineScratch {
  static constexpr int kMaxGroups = 32;  // kMergeThreads / (G D / 4) with G = 1, D = 64
  float4 o[kMergeThreads];
  float m[kMaxGroups * G], l[kMaxGroups * G];
};

// Log-sum-exp combine of n partials (ml: [slot][G][2] max and sum of exp, natural log; o: [slot][G][D]
// unnormalised), partial j at slot slot_of(j): os[G][D] = sum_j exp(m_j - M) o_j, s_m = M and
// s_l = sum_j exp(m_j - M) l_j per head (shared memory). The CTA's threads form groups of G D / 4,
// one float4 of the output per thread; group q takes partials q, q + groups, ... and folds each in
// with a running max, rescaling what it has when the max grows (flash-style): the threads of a head
// in a group read the same partials in the same order, so they reach the same max with no reduction,
// and a partial's (max, sum) comes in the same round of loads as its output, kLoads partials in
// flight per thread. Then group 0 sums the groups (one barrier). (A max, then a sum, then the
// weighted outputs took three rounds of L2 loads and five barriers.) A partial without tokens (max
// -inf) adds nothing.
template <int D, int G, typename SlotOf>
__device__ void combine_partials(const float* ml, const float* o, int n, SlotOf slot_of, CombineScratch<G>& sc,
                                 float* os, float* s_m, float* s_l) {
  constexpr int kLoads = 4;  // 8 in flight spilled at the merge's 64 registers
  constexpr int kOwners = G * D / 4, kGroups = kMergeThreads / kOwners;
  static_assert(kMergeThreads % kOwners == 0 && kGroups <= CombineScratch<G>::kMaxGroups, "groups of G D / 4");
  const int i4 = threadIdx.x % kOwners, grp = threadIdx.x / kOwners, gi = 4 * i4 / D;
  float m = -INFINITY, l = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int j0 = grp; j0 < n; j0 += kLoads * kGroups) {
    float2 x[kLoads];
    float4 v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (j0 + u * kGroups < n) {
        const int64_t slot = slot_of(j0 + u * kGroups);
        x[u] = __ldcg(reinterpret_cast<const float2*>(ml + (slot * G + gi) * 2));
        v[u] = __ldcg(reinterpret_cast<const float4*>(o + slot * G * D) + i4);
      }
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (j0 + u * kGroups < n && x[u].x != -INFINITY) {
        const float mn = fmaxf(m, x[u].x);
        const float a = __expf(m - mn), w = __expf(x[u].x - mn);  // a = 0 for the first (m = -inf)
        acc = make_float4(fmaf(w, v[u].x, a * acc.x), fmaf(w, v[u].y, a * acc.y), fmaf(w, v[u].z, a * acc.z),
                          fmaf(w, v[u].w, a * acc.w));
        l = fmaf(w, x[u].y, a * l);
        m = mn;
      }
    }
  }
  sc.o[threadIdx.x] = acc;
  if (4 * i4 % D == 0) sc.m[grp * G + gi] = m, sc.l[grp * G + gi] = l;
  __syncthreads();
  if (grp == 0) {
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < kGroups; ++q) mx = fmaxf(mx, sc.m[q * G + gi]);
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    float ls = 0.f;
#pragma unroll
    for (int q = 0; q < kGroups; ++q) {
      const float mq = sc.m[q * G + gi];
      if (mq == -INFINITY) continue;
      const float w = __expf(mq - mx);
      const float4 oq = sc.o[q * kOwners + i4];
      sum = make_float4(fmaf(w, oq.x, sum.x), fmaf(w, oq.y, sum.y), fmaf(w, oq.z, sum.z), fmaf(w, oq.w, sum.w));
      ls = fmaf(w, sc.l[q * G + gi], ls);
    }
    reinterpret_cast<float4*>(os)[i4] = sum;
    if (4 * i4 % D == 0) s_m[gi] = mx, s_l[gi] = ls;
  }
  __syncthreads();
}

// Dynamic shared memory of merge_kernel: the stripe's R_V (rotated stripes only).
inline size_t merge_smem_bytes(int D, bool rotated) { return rotated ? sizeof(float) * D * D : 0; }

template <typename T, int D, int G>
__global__ void __launch_bounds__(kMergeThreads, 2) merge_kernel(DecodeParams p) {
  constexpr int kParts = kMergeThreads / D;  // thread groups of the un-rotation
  constexpr int kRows = D / kParts;          // rows of R_V per group
  extern __shared__ __align__(16) float s_rv[];  // [D][D] R_V (merge_smem_bytes)
  __shared__ __align__(16) float os[G * D];
  __shared__ float red[kParts][G][D];
  __shared__ float s_m[G], s_l[G];
  __shared__ CombineScratch<G> sc;
  allow_next_stage();
  const int bh = blockIdx.y, x = blockIdx.x, tid = threadIdx.x;
  const int s0 = p.stripe_ptr[bh], ns = p.stripe_ptr[bh + 1] - s0;
  if (x >= ns && x != p.max_stripes) return;
  const bool rotate = x != p.max_stripes && p.rotated;
  if (rotate) {
    const int64_t* meta = p.stripes + (int64_t)(s0 + x) * kStripeCols;
    for (int i = tid; i < D * D / 4; i += kMergeThreads)  // row i / (D/4), floats 4 (i % (D/4)) .. + 3
      cp_async16(s_rv + 4 * i, rotation_row<D>(p.pages, meta, 1, i / (D / 4)) + 4 * (i % (D / 4)));
  }
  wait_for_prior_stage();  // the attention's partials (and, before it, the select's pieces)
  const int first = x == p.max_stripes ? p.max_pieces : p.stripe_pieces[(s0 + x) * 2];
  const int n = x == p.max_stripes ? 1 : p.stripe_pieces[(s0 + x) * 2 + 1];
  combine_partials<D, G>(p.part_ml + (int64_t)bh * (p.max_pieces + 1) * G * 2,
                         p.part_o + (int64_t)bh * (p.max_pieces + 1) * G * D, n, [&](int j) { return first + j; },
                         sc, os, s_m, s_l);
  float* stripe_o = p.stripe_out + (int64_t)bh * (p.max_stripes + 1) * G * D;
  float* stripe_ml = p.stripe_ml + (int64_t)bh * (p.max_stripes + 1) * G * 2;
  if (rotate) {  // o[g][d] = sum_j R_V[j][d] o'[g][j], group `part` over its kRows rows j
    cp_async_wait_all();
    __syncthreads();
    const int d = tid % D, part = tid / D;
    float a[G];
#pragma unroll
    for (int g = 0; g < G; ++g) a[g] = 0.f;
#pragma unroll 8
    for (int u = part * kRows; u < (part + 1) * kRows; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) a[g] = fmaf(s_rv[u * D + d], os[g * D + u], a[g]);
#pragma unroll
    for (int g = 0; g < G; ++g) red[part][g][d] = a[g];
    __syncthreads();
    for (int i = tid; i < G * D; i += kMergeThreads) {
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < kParts; ++q) s += red[q][i / D][i % D];
      stripe_o[x * G * D + i] = s;
    }
  } else {
    for (int i = tid; i < G * D; i += kMergeThreads) stripe_o[x * G * D + i] = os[i];
  }
  if (tid < G) {
    stripe_ml[(x * G + tid) * 2] = s_m[tid];
    stripe_ml[(x * G + tid) * 2 + 1] = s_l[tid];
  }
  if (!arrive_last(p.arrivals + bh, ns + 1)) return;
  if (tid == 0) p.arrivals[bh] = 0;
  combine_partials<D, G>(stripe_ml, stripe_o, ns + 1, [&](int j) { return j == ns ? p.max_stripes : j; }, sc, os,
                         s_m, s_l);
  T* out = static_cast<T*>(p.out) + (int64_t)bh * G * D;  // [b][h*G + g][d] == bh * G * D + g * D + d
  for (int i = tid; i < G * D; i += kMergeThreads) {
    const float l = s_l[i / D];
    out[i] = Conv<T>::from(l > 0.f ? os[i] / l : 0.f);
  }
}

// Launches one decode stage, `after_stage`: as a programmatic dependent launch behind the stage
// launched just before it (wait_for_prior_stage). The first stage of a call is launched plainly, so
// it starts only when everything before the call (the writes of q, of the cache) has completed.
inline cudaError_t launch_stage(StageKernel kernel, dim3 grid, int threads, size_t smem,
                                cudaStream_t stream, bool after_stage, const DecodeParams& p) {
  cudaLaunchAttribute attr = after_stage_attribute();
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3((unsigned)threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = after_stage ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

// Runs the stages selected in p.stages on `stream`. No host synchronisation, no allocation. On sm_90
// and newer each stage after the first overlaps the end of the one before (launch_stage).
template <typename T, int D, int G, bool kPacked>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const int bh = p.batch * p.n_kv_heads;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  // Overlap needs sm_90, and a runtime that keeps programmatic dependencies in captured graphs (12.3).
  const bool can_overlap = major >= 9 && CUDART_VERSION >= 12030;
  bool launched = false;  // a stage of this call is already in the stream
  auto stage = [&](StageKernel kernel, dim3 grid, int threads, size_t smem) {
    if (err == cudaSuccess) err = launch_stage(kernel, grid, threads, smem, stream, launched && can_overlap, p);
    launched = true;
  };
  if ((p.stages & kStageRotate) && p.n_stripes > 0)
    stage(rotate_q_kernel<T, D, G>, dim3(p.n_stripes, D / kRotRows), 256, 0);
  if ((p.stages & kStageScore) && p.n_blocks > 0) {
    const int tile = score_tile(p.summary_kind);
    stage(score_kernel_for<T, D, G>(p), dim3((p.n_blocks + tile - 1) / tile), kScoreThreads, 0);
  }
  if ((p.stages & kStageSelect) && err == cudaSuccess) {
    err = launch_select(p, bh, stream, dev, major, launched && can_overlap);
    launched = true;
  }
  if (p.stages & kStageAttend)
    stage(tile_attention_kernel<T, D, G, kPacked>, dim3(p.max_pieces + 1, bh), kPaThreads, 0);
  if (p.stages & kStageMerge) {
    const size_t smem = merge_smem_bytes(D, p.rotated);
    if (err == cudaSuccess) err = allow_dynamic_smem<merge_kernel<T, D, G>>(dev, merge_smem_bytes(D, true));
    stage(merge_kernel<T, D, G>, dim3(p.max_stripes + 1, bh), kMergeThreads, smem);
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace mosaickv
