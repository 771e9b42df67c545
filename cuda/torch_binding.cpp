// Thin torch binding over the MosaicKV kernels (built only on a GPU machine:
// `python -m mosaickv.ops.build`). It checks devices, dtypes and shapes with messages that name what
// is allowed, fills the parameter structs and launches on the current stream. Kernels report
// data-dependent problems through the int32 `status` tensor instead (see mosaickv/params.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "mosaickv/params.h"

namespace {

using mosaickv::DType;

DType storage_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
  if (t.scalar_type() == at::kHalf) return DType::kFloat16;
  TORCH_CHECK(false, name, " must be bfloat16 or float16 on the GPU path, got ", t.scalar_type(),
              "; use the core reference (mosaickv.core) for float32");
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (CPU tensors take the mosaickv.core path)");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the other inputs are on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_type(const at::Tensor& t, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.scalar_type() == st, name, " must be ", st, ", got ", t.scalar_type());
}

void check_head_dim(int64_t d) {
  TORCH_CHECK(d == 64 || d == 128, "head_dim must be 64 or 128 for the CUDA kernels, got ", d,
              "; other sizes run on the core reference");
}

void launch_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

void check_stripes(const at::Tensor& stripes, const at::Tensor& pages, const at::Tensor& like) {
  check_cuda(stripes, "stripes", like); check_type(stripes, "stripes", at::kLong);
  TORCH_CHECK(stripes.dim() == 2 && stripes.size(1) == mosaickv::kStripeCols, "stripes must be [n, ",
              (int)mosaickv::kStripeCols, "] int64 (mosaickv.ops.layout.STRIPE_COLS)");
  check_cuda(pages, "pages", like); check_type(pages, "pages", at::kLong);
  TORCH_CHECK(pages.dim() == 1, "pages must be a flat int64 tensor of device addresses");
}

void check_summary_width(int64_t kind, int64_t width, int64_t d) {
  TORCH_CHECK(kind == mosaickv::kSummaryMean || kind == mosaickv::kSummaryMinMax,
              "summary_kind must be 0 (mean/compact) or 1 (minmax)");
  TORCH_CHECK(width == 0 || (kind == mosaickv::kSummaryMinMax ? width % 16 == 0 && width <= 2 * d
                                                              : width % 8 == 0 && width <= d),
              "summary width must be 0, a multiple of 8 <= D for mean/compact, or 2m (m a multiple of 8, <= D) "
              "for minmax; got ", width);
}

void encode(const at::Tensor& x, int64_t token0, const at::Tensor& stripe_ids, const at::Tensor& stripes,
            const at::Tensor& pages, int64_t which, int64_t summary_kind, int64_t summary_width, int64_t n_channels,
            int64_t block, at::Tensor& status) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, "x must be a CUDA tensor [n_tokens, H, D]");
  TORCH_CHECK(x.stride(2) == 1, "x must have a contiguous last (head_dim) dimension");
  const int64_t d = x.size(2);
  check_head_dim(d);
  const DType dt = storage_dtype(x, "x");
  check_cuda(stripe_ids, "stripe_ids", x); check_type(stripe_ids, "stripe_ids", at::kInt);
  check_stripes(stripes, pages, x);
  check_cuda(status, "status", x); check_type(status, "status", at::kInt);
  TORCH_CHECK(stripe_ids.numel() == x.size(1), "stripe_ids must hold one stripe per head of x");
  check_summary_width(summary_kind, summary_width, d);
  TORCH_CHECK(which == 0 || which == 1, "which must be 0 (keys) or 1 (values)");
  TORCH_CHECK(block >= 1 && block <= 64, "block size must be in [1, 64], got ", block);
  TORCH_CHECK(token0 % block == 0, "token0 must start a block (multiple of ", block, "), got ", token0);
  TORCH_CHECK(n_channels >= 1 && n_channels <= d, "n_channels must be in [1, D]");
  mosaickv::EncodeParams p{};
  p.x = x.data_ptr();
  p.x_tok_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.n_tokens = (int)x.size(0);
  p.token0 = (int)token0;
  p.n_heads = (int)x.size(1);
  p.stripe_ids = stripe_ids.data_ptr<int32_t>();
  p.stripes = stripes.data_ptr<int64_t>();
  p.pages = pages.data_ptr<int64_t>();
  p.which = (int)which;
  p.summary_width = which == 0 ? (int)summary_width : 0;
  p.summary_kind = (int)summary_kind;
  p.n_channels = (int)n_channels;
  p.block = (int)block;
  p.tokens_per_cta = block >= 32 ? (int)block : (int)(32 / block * block);
  p.status = status.data_ptr<int32_t>();
  const c10::cuda::CUDAGuard guard(x.device());
  launch_ok(mosaickv::encode(dt, (int)d, p, at::cuda::getCurrentCUDAStream()), "encode");
}

// Rows and tables follow mosaickv.ops.kernels.append_encode_ (Python); shapes are checked here, each
// row against its stripe's capacity by the kernel (status bit kBadAppendRow).
void append_encode(const at::Tensor& x_k, const at::Tensor& x_v, const at::Tensor& rows, const at::Tensor& stripes,
                   const at::Tensor& pages, const std::optional<at::Tensor>& block_sum, int64_t summary_kind,
                   int64_t summary_width, int64_t head_dim, int64_t n_channels, int64_t block, at::Tensor& status,
                   int64_t max_tokens) {
  TORCH_CHECK(x_k.is_cuda(), "x_k must be a CUDA tensor (CPU tensors take the torch reference path)");
  const DType dt = storage_dtype(x_k, "x_k");
  const int64_t d = head_dim;
  check_head_dim(d);
  check_cuda(x_k, "x_k", x_k);
  check_cuda(x_v, "x_v", x_k);
  TORCH_CHECK(x_v.scalar_type() == x_k.scalar_type() && x_v.numel() == x_k.numel(), "x_v must match x_k's dtype and size");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x_k.data_ptr()) % 8 == 0 && reinterpret_cast<uintptr_t>(x_v.data_ptr()) % 8 == 0,
              "x_k and x_v must start on an 8-byte boundary (4 elements are read at once)");
  check_cuda(rows, "rows", x_k); check_type(rows, "rows", at::kLong);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == mosaickv::kAppendCols, "rows must be [n_rows, ",
              (int)mosaickv::kAppendCols, "] int64");
  check_stripes(stripes, pages, x_k);
  check_cuda(status, "status", x_k); check_type(status, "status", at::kInt);
  check_summary_width(summary_kind, summary_width, d);
  TORCH_CHECK(block >= 1 && block <= 64, "block size must be in [1, 64], got ", block);
  TORCH_CHECK(n_channels >= 1 && n_channels <= d, "n_channels must be in [1, D]");
  mosaickv::AppendParams p{};
  p.xk = x_k.data_ptr();
  p.xv = x_v.data_ptr();
  p.x_numel = x_k.numel();
  p.rows = rows.data_ptr<int64_t>();
  p.n_rows = (int)rows.size(0);
  p.stripes = stripes.data_ptr<int64_t>();
  p.n_stripes = (int)stripes.size(0);
  p.pages = pages.data_ptr<int64_t>();
  p.summary_width = (int)summary_width;
  if (summary_width && summary_kind == mosaickv::kSummaryMean) {
    TORCH_CHECK(block_sum.has_value(), "mean/compact summaries need block_sum [n_stripes, width] float32");
    check_cuda(*block_sum, "block_sum", x_k); check_type(*block_sum, "block_sum", at::kFloat);
    TORCH_CHECK(block_sum->dim() == 2 && block_sum->size(0) == stripes.size(0) && block_sum->size(1) == summary_width,
                "block_sum must be [n_stripes, summary width] float32");
    p.block_sum = block_sum->data_ptr<float>();
  }
  p.summary_kind = (int)summary_kind;
  p.n_channels = (int)n_channels;
  p.block = (int)block;
  TORCH_CHECK(max_tokens >= 0, "max_tokens must be >= 0 (0: rows are not split), got ", max_tokens);
  p.max_tokens = max_tokens;
  p.status = status.data_ptr<int32_t>();
  const c10::cuda::CUDAGuard guard(x_k.device());
  launch_ok(mosaickv::append_encode(dt, (int)d, p, at::cuda::getCurrentCUDAStream()), "append_encode");
}

// Tensor order follows mosaickv.ops.layout.DecodeLayout / DecodeWorkspace (Python).
void decode(const at::Tensor& q, at::Tensor& out, double scale, bool packed, int64_t stages,
            const at::Tensor& stripes, const at::Tensor& stripe_ptr, const at::Tensor& block_ptr,
            const at::Tensor& block_stripe, const at::Tensor& pages, const at::Tensor& kdense,
            const at::Tensor& vdense, int64_t summary_kind, int64_t summary_width, int64_t block, const at::Tensor& n_select, const at::Tensor& dense_k,
            const at::Tensor& dense_v, const at::Tensor& dense_len, const std::optional<at::Tensor>& dense_rows,
            at::Tensor& qrot, at::Tensor& keys,
            at::Tensor& sel, at::Tensor& pieces, at::Tensor& n_pieces, at::Tensor& stripe_first,
            at::Tensor& stripe_pieces, at::Tensor& arrivals, int64_t piece_blocks, at::Tensor& part_o,
            at::Tensor& part_ml, at::Tensor& stripe_out, at::Tensor& stripe_ml, at::Tensor& status) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "q must be a contiguous CUDA tensor [B, H_q, D]");
  const DType dt = storage_dtype(q, "q");
  const int64_t d = q.size(2);
  check_head_dim(d);
  TORCH_CHECK(dense_k.dim() == 4, "dense_k must be [B, H_kv, cap, D]");
  const int64_t batch = q.size(0), h_kv = dense_k.size(1);
  TORCH_CHECK(h_kv > 0 && q.size(1) % h_kv == 0, "query heads (", q.size(1), ") must be a multiple of KV heads (", h_kv, ")");
  const int64_t g = q.size(1) / h_kv;
  TORCH_CHECK(g == 1 || g == 4 || g == 8, "GQA group (query heads per KV head) must be 1, 4 or 8 for the CUDA kernels, got ", g);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{out, "out"}, {kdense, "kdense"},
                                {vdense, "vdense"}, {dense_k, "dense_k"}, {dense_v, "dense_v"}}) {
    // with dense_rows, dense_k/v only give the dense rows' shape and dtype (a view, e.g. expanded)
    if (!dense_rows.has_value() || (&t != &dense_k && &t != &dense_v)) check_cuda(t, name, q);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{stripe_ptr, "stripe_ptr"}, {block_ptr, "block_ptr"},
                                {block_stripe, "block_stripe"}, {n_select, "n_select"}, {dense_len, "dense_len"},
                                {sel, "sel"}, {pieces, "pieces"},
                                {n_pieces, "n_pieces"}, {stripe_first, "stripe_first"},
                                {stripe_pieces, "stripe_pieces"}, {arrivals, "arrivals"}, {status, "status"},
                                {keys, "keys"}}) {
    check_cuda(t, name, q);
    check_type(t, name, at::kInt);
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{qrot, "qrot"}, {part_o, "part_o"},
                                {part_ml, "part_ml"}, {stripe_out, "stripe_out"}, {stripe_ml, "stripe_ml"}}) {
    check_cuda(t, name, q);
    check_type(t, name, at::kFloat);
  }
  check_stripes(stripes, pages, q);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  check_summary_width(summary_kind, summary_width, d);
  TORCH_CHECK(summary_width > 0, "the decode path scores block summaries: summary_width must be > 0");
  const int64_t bh = batch * h_kv;
  TORCH_CHECK(stripe_ptr.numel() == bh + 1 && block_ptr.numel() == bh + 1, "stripe_ptr and block_ptr must have B*H_kv + 1 entries");
  TORCH_CHECK(sel.dim() == 2 && sel.size(0) == bh, "sel must be [B*H_kv, max_select]");
  TORCH_CHECK(pieces.dim() == 3 && pieces.size(0) == bh && pieces.size(2) == 3, "pieces must be [B*H_kv, max_pieces, 3]");
  TORCH_CHECK(part_o.dim() == 4 && part_o.size(1) == pieces.size(1) + 1, "part_o must be [B*H_kv, max_pieces + 1, G, D]");
  TORCH_CHECK(stripe_out.dim() == 4 && stripe_out.size(0) == bh, "stripe_out must be [B*H_kv, max_stripes + 1, G, D]");
  TORCH_CHECK(stripe_first.numel() >= stripes.size(0), "stripe_first must have an entry per stripe");
  TORCH_CHECK(stripe_pieces.numel() >= 2 * stripes.size(0), "stripe_pieces must be [n_stripes, 2] (or more rows)");
  TORCH_CHECK(arrivals.numel() == bh, "arrivals must have B*H_kv entries");
  TORCH_CHECK(stripe_ml.dim() == 4 && stripe_ml.size(0) == bh && stripe_ml.size(1) == stripe_out.size(1) &&
                  stripe_ml.size(3) == 2,
              "stripe_ml must be [B*H_kv, max_stripes + 1, G, 2]");
  TORCH_CHECK(piece_blocks >= 1 && piece_blocks <= mosaickv::kMaxPieceBlocks, "piece_blocks must be in [1, ",
              mosaickv::kMaxPieceBlocks, "], got ", piece_blocks);
  mosaickv::DecodeParams p{};
  p.batch = (int)batch;
  p.n_kv_heads = (int)h_kv;
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.scale = (float)scale;
  p.stripes = stripes.data_ptr<int64_t>();
  p.n_stripes = (int)stripes.size(0);
  p.stripe_ptr = stripe_ptr.data_ptr<int32_t>();
  p.block_ptr = block_ptr.data_ptr<int32_t>();
  p.block_stripe = block_stripe.data_ptr<int32_t>();
  p.n_blocks = (int)block_stripe.numel();
  p.pages = pages.data_ptr<int64_t>();
  p.rotated = packed ? 1 : 0;
  p.kdense = kdense.data_ptr();
  p.vdense = vdense.data_ptr();
  p.summary_kind = (int)summary_kind;
  p.summary_width = (int)summary_width;
  p.block = (int)block;
  p.n_select = n_select.data_ptr<int32_t>();
  p.dense_k = dense_k.data_ptr();
  p.dense_v = dense_v.data_ptr();
  p.dense_cap = (int)dense_k.size(2);
  p.dense_len = dense_len.data_ptr<int32_t>();
  if (dense_rows.has_value()) {  // each sequence's own buffer [2, H_kv, cap, D]; dense_k gives the shape
    check_cuda(*dense_rows, "dense_rows", q);
    check_type(*dense_rows, "dense_rows", at::kLong);
    TORCH_CHECK(dense_rows->numel() == 2 * batch && dense_rows->is_contiguous(),
                "dense_rows must be [2, B] int64 (K and V row addresses of each sequence)");
    p.dense_rows = dense_rows->data_ptr<int64_t>();
  }
  p.qrot = qrot.data_ptr<float>();
  p.keys = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  p.sel = sel.data_ptr<int32_t>();
  p.max_select = (int)sel.size(1);
  p.pieces = pieces.data_ptr<int32_t>();
  p.n_pieces = n_pieces.data_ptr<int32_t>();
  p.stripe_first = stripe_first.data_ptr<int32_t>();
  p.stripe_pieces = stripe_pieces.data_ptr<int32_t>();
  p.arrivals = arrivals.data_ptr<int32_t>();
  p.max_pieces = (int)pieces.size(1);
  p.piece_blocks = (int)piece_blocks;
  p.part_o = part_o.data_ptr<float>();
  p.part_ml = part_ml.data_ptr<float>();
  p.stripe_out = stripe_out.data_ptr<float>();
  p.stripe_ml = stripe_ml.data_ptr<float>();
  p.max_stripes = (int)stripe_out.size(1) - 1;
  p.status = status.data_ptr<int32_t>();
  p.stages = (int)stages;
  const c10::cuda::CUDAGuard guard(q.device());
  launch_ok(mosaickv::decode(dt, (int)d, (int)g, packed, p, at::cuda::getCurrentCUDAStream()), "decode");
}

// k, v: [B, H_kv, D] rows of a decode step; rows [2, B] int64, lengths and skip [B] int32: a
// mosaickv.cache.dense_batch.DenseBatch (the addresses of live buffers, 16-byte aligned).
void append_dense_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows, at::Tensor& lengths,
                       at::Tensor& skip, int64_t cap) {
  TORCH_CHECK(k.is_cuda() && k.dim() == 3 && k.is_contiguous(), "k must be a contiguous CUDA tensor [B, H_kv, D]");
  check_cuda(v, "v", k);
  TORCH_CHECK(v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(), "v must have k's shape and dtype");
  const int64_t batch = k.size(0);
  check_cuda(rows, "rows", k);
  check_type(rows, "rows", at::kLong);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == 2 && rows.size(1) == batch, "rows must be [2, B] int64");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lengths, "lengths"}, {skip, "skip"}}) {
    check_cuda(t, name, k);
    check_type(t, name, at::kInt);
    TORCH_CHECK(t.numel() == batch, name, " must have one entry per sequence (", batch, "), got ", t.numel());
  }
  const int64_t row_bytes = k.size(2) * k.element_size();
  TORCH_CHECK(row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v.data_ptr()) % 16 == 0,
              "rows must be multiples of 16 bytes at 16-byte aligned addresses, got ", row_bytes, " bytes");
  TORCH_CHECK(cap > 0, "cap must be positive, got ", cap);
  const c10::cuda::CUDAGuard guard(k.device());
  launch_ok(mosaickv::append_dense_rows(k.data_ptr(), v.data_ptr(), rows.data_ptr<int64_t>(),
                                        lengths.data_ptr<int32_t>(), skip.data_ptr<int32_t>(), (int)batch,
                                        (int)k.size(1), (int)cap, (int)row_bytes, at::cuda::getCurrentCUDAStream()),
            "append_dense_rows");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MosaicKV CUDA kernels (see docs/KERNELS.md)";
  m.def("encode", &encode, "Rotate, top-r select in groups, pack values + bitmaps, block summaries");
  m.def("append_encode", &append_encode, "Encode new tokens of many stripes (K and V), updating block summaries");
  m.def("append_dense_rows", &append_dense_rows, "Append a decode step's K/V rows to each sequence's dense rows");
  m.def("decode", &decode, "Block scoring + selection + PackedAttention (or dense token-selection) decode");
}
