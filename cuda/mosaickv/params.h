// Parameters and host entry points of the MosaicKV kernels. Host-only C++ (no device code, no
// torch): included by the kernels' headers, the explicit-instantiation .cu files and the torch binding.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace mosaickv {

// Status bits a kernel ORs into the caller's int32 status word. Kernels never trap; the binding
// (or a test) reads the word after a run and turns set bits into an exception with the meaning below.
enum Status : int {
  kOk = 0,
  kBadKeep = 1,        // keep count not a positive multiple of g, or larger than the kept channels
  kBadGroup = 2,       // g not in {1, 2, 4}
  kBadBlock = 4,       // token block size outside [1, 64]
  kBadRowStride = 8,   // packed row stride not round_up(keep, 8)
  kBadSelection = 16,  // selection count larger than the workspace planned for it
  kBadPieces = 32,     // more attention pieces than the workspace planned for
  kBadAppendRow = 64,  // append row: stripe id, token count, alignment or an offset outside its tensor
};

// One row of the stripe table (int64 [n_stripes, kStripeCols]): a stripe is one compressed segment
// of one (sequence, KV head). Every array a stripe reads lives in *pages*: the int64 table `pages`
// holds absolute device byte addresses, and a column gives where a stripe's entries start. Row r of
// a paged array with P rows per page is at pages[entry + r / P] + (r % P) * row_bytes, so a row
// never straddles a page (the cache manager's pages, docs/CACHE.md); a flat pool is one page per
// stripe (P >= its rows) or one page for all (P >= every row, `first` = the stripe's first row).
//   bitmaps  uint32  row t at pages[KBits + t / KRows] + (t % KRows) * W * 4,  W = ceil(D / g / 32)
//   values   T       row t at pages[KVals + t / KRows] + (t % KRows) * ks * sizeof(T), ks = round_up(keep, 8)
//                    (V alike with VBits, VVals, VRows; K and V rows per page may differ)
//   summary  T       block j: r = SumFirst + j at pages[SumPages + r / SumRows] + (r % SumRows) * width * sizeof(T)
//   rotation f32     row i of R_K: r = RotFirstK + i at pages[RotPages + r / RotRows] + (r % RotRows) * D * 4,
//                    R_V from RotFirstV (rows are eigenvectors, x' = R x)
//   dense    T       [n_rows, D] row = row_off + token (dense token-selection baseline only)
// Rows per page are multiples of the token block size (or cover the whole stripe), so the rows of a
// selection block are contiguous. Indices r fit in 32 bits. g may differ per stripe and per side
// (strategy search); keep is a multiple of g.
enum StripeCol : int {
  kColSeq = 0, kColHead, kColTokens, kColKeepK, kColKeepV, kColGroupK, kColGroupV,
  kColKBits, kColKVals, kColKRows, kColVBits, kColVVals, kColVRows,
  kColSumPages, kColSumFirst, kColSumRows,
  kColRotPages, kColRotFirstK, kColRotFirstV, kColRotRows,
  kColBlockOff, kColRowOff, kStripeCols
};

// One row of an append table (int64 [n_rows, kAppendCols]): new tokens of one stripe (one (layer,
// request, KV head), K and V alike). The tokens' unrotated vectors are x[x_off + j * x_stride + 0..D)
// for j < tokens, in x_k and x_v at the same offsets; they become the stripe's tokens pos .. pos+tokens,
// which must lie within the stripe's capacity (its kColTokens entry in the append's stripe table).
enum AppendCol : int { kAppStripe = 0, kAppXOff, kAppXStride, kAppTokens, kAppPos, kAppendCols };

enum SummaryKind : int {
  kSummaryMean = 0,    // first m rotated channels of the block mean; score = q'[:m] . mean[:m]
  kSummaryMinMax = 1,  // Quest bound over the first m channels (m = D or compact): [min | max], width 2m;
                       // score = sum_j max(q_j min_j, q_j max_j)
};

enum Stage : int { kStageRotate = 1, kStageScore = 2, kStageSelect = 4, kStageAttend = 8, kStageMerge = 16, kStageAll = 31 };

constexpr int round_up8(int k) { return (k + 7) & ~7; }

// Most selected blocks in one attention piece (DecodeWorkspace.piece_blocks): the attention CTA stages
// this many block ids in shared memory.
constexpr int kMaxPieceBlocks = 128;

// Rotated channels a summary of this kind and width covers (m above).
constexpr int summary_channels(int kind, int width) { return kind == kSummaryMean ? width : width / 2; }

// Storage-typed pointers are void* so that one struct serves bf16 and fp16 and the torch binding
// needs no device headers; kernels cast them to the storage type T.
struct EncodeParams {
  const void* x;               // [n_tokens, H, D]-like, strides below (elements); dense, unrotated
  int64_t x_tok_stride;
  int64_t x_head_stride;
  int n_tokens;              // tokens to encode
  int token0;                // stripe-relative index of the first token; multiple of `block`
  int n_heads;               // H: blockIdx.y, stripe = stripe_ids[h]
  const int32_t* stripe_ids; // [H]
  const int64_t* stripes;    // [n_stripes, kStripeCols]
  const int64_t* pages;      // page addresses (StripeCol): rows, summaries and rotations are written/read there
  int which;                 // 0 = keys, 1 = values
  int summary_width;         // 0: no summaries (values never have them); m for kSummaryMean (<= D), 2m for kSummaryMinMax (m <= D)
  int summary_kind;          // SummaryKind
  int n_channels;            // rotated channels eligible (channel truncation); multiple of g, <= D
  int block;                 // token block size B
  int tokens_per_cta;        // multiple of `block`
  int* status;               // int32 status word (Status bits)
};

// Append encode: many stripes' new tokens, K and V, in one launch (docs/KERNELS.md "Append encode").
// The stripes may belong to any layers and requests: one stripe table and one page table serve all
// rows. The kernel checks each row against its stripe's capacity (kColTokens); the page table's
// addresses are the caller's contract (they cannot be checked on the device).
// Summaries are updated from the new tokens alone: min/max combine with the stored (rounded) row,
// which is exact because rounding is monotone; means keep the open block's fp32 running sum in
// block_sum (one row per stripe), so nothing before `pos` is read again.
struct AppendParams {
  const void* xk;              // new tokens' keys, storage dtype, addressed by the rows' x_off / x_stride
  const void* xv;              // values, same addressing
  int64_t x_numel;             // elements of x_k (= of x_v)
  const int64_t* rows;         // [n_rows, kAppendCols]; blockIdx.x = row, blockIdx.y = side (0 K, 1 V)
  int n_rows;
  const int64_t* stripes;      // [n_stripes, kStripeCols]
  int n_stripes;
  const int64_t* pages;        // page addresses (StripeCol); an append writes rows and key summaries there
  int summary_width;           // 0: no summaries
  int summary_kind;            // SummaryKind
  float* block_sum;            // [n_stripes, summary_width] f32 open-block sums (kSummaryMean), else nullptr
  int n_channels;              // as in EncodeParams
  int block;                   // token block size B
  int64_t max_tokens;          // the most tokens a row appends (sizes the split of long rows; 0: unknown)
  int* status;
};

// Storage-typed pointers (q, out, values, summaries, dense rows) are void*: one struct for bf16
// and fp16, usable from a host-only translation unit; kernels cast them to T.
struct DecodeParams {
  int batch, n_kv_heads;
  const void* q;                   // [batch, n_kv_heads * G, D]
  void* out;                       // [batch, n_kv_heads * G, D]
  float scale;
  // Compressed part (flat pools; docs/KERNELS.md "GPU layout").
  const int64_t* stripes;        // [n_stripes, kStripeCols]
  int n_stripes;
  const int32_t* stripe_ptr;     // [B*H + 1] stripes of (b, h) are stripe_ptr[bh] .. stripe_ptr[bh+1]
  const int32_t* block_ptr;      // [B*H + 1] blocks of (b, h), contiguous, stripe order
  const int32_t* block_stripe;   // [n_blocks] owning stripe of each block
  int n_blocks;
  const int64_t* pages;          // page addresses (StripeCol): packed rows, summaries, rotations
  int rotated;                   // 0: no rotations (dense baseline: identity)
  const void* kdense;              // [n_rows, D]   (dense baseline path)
  const void* vdense;
  int summary_kind, summary_width, block;
  const int32_t* n_select;       // [B*H] blocks to attend per (b, h)
  // Dense sinks + recent window, always attended.
  const void* dense_k;             // [batch, n_kv_heads, dense_cap, D]
  const void* dense_v;
  int dense_cap;
  const int32_t* dense_len;      // [batch]
  const int64_t* dense_rows;     // [2, batch] or nullptr: addresses of sequence b's own K and V rows
                                 // [n_kv_heads, dense_cap, D] (no stacked copy); then dense_k/v unused
  // Workspaces, owned by the caller (plan once, run many; CUDA-graph capturable).
  float* qrot;                   // [n_stripes, G, D]
  uint32_t* keys;                // [n_blocks]
  int32_t* sel;                  // [B*H, max_select]
  int max_select;
  int32_t* pieces;               // [B*H, max_pieces, 3]: first sel index, end sel index, stripe
  int32_t* n_pieces;             // [B*H]
  int32_t* stripe_first;         // [n_stripes] the select's scratch: selected blocks before each stripe's first
  int32_t* stripe_pieces;        // [n_stripes, 2] each stripe's first piece slot and number of pieces (the select)
  int32_t* arrivals;             // [B*H] the merge's count of (b, h)'s stripes done (zeroed by the select,
                                 // and by the merge CTA that completes it)
  int max_pieces, piece_blocks;
  float* part_o;                 // [B*H, max_pieces + 1, G, D] unnormalised, rotated V space
  float* part_ml;                // [B*H, max_pieces + 1, G, 2] running max, sum of exp
  float* stripe_out;             // [B*H, max_stripes + 1, G, D] unnormalised (to the stripe's max), un-rotated
  float* stripe_ml;              // [B*H, max_stripes + 1, G, 2] the stripe's max and sum of exp
  int max_stripes;
  int* status;
  int stages;                    // bit mask of Stage, for timing one stage at a time
};

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

// Dispatch over the compiled variants (head_dim 64/128, bf16/fp16, GQA group 1/4/8). They return
// cudaErrorInvalidValue for a combination that was not compiled; the binding checks first and names
// the supported values.
cudaError_t encode(DType dtype, int head_dim, const EncodeParams& p, cudaStream_t stream);
cudaError_t append_encode(DType dtype, int head_dim, const AppendParams& p, cudaStream_t stream);
cudaError_t decode(DType dtype, int head_dim, int gqa_group, bool packed, const DecodeParams& p, cudaStream_t stream);
// Appends k[b], v[b] ([batch, n_heads, D] rows of row_bytes, a multiple of 16) as row lengths[b] of
// sequence b's dense K rows at rows[b] and V rows at rows[batch + b] (device addresses of
// [n_heads, cap, D], 16-byte aligned), then advances lengths[b]; a sequence with skip[b] set is
// left alone and skip[b] cleared. All arrays on the device.
cudaError_t append_dense_rows(const void* k, const void* v, const int64_t* rows, int32_t* lengths, int32_t* skip,
                              int batch, int n_heads, int cap, int row_bytes, cudaStream_t stream);

}  // namespace mosaickv
