// A decode step's new K/V rows of a whole batch, each written into its sequence's own dense buffer
// (mosaickv.cache.CacheManager.append_batch): one launch instead of 2 x batch x heads small copies,
// each a Python-side launch. No torch headers.
#include <cstdint>

#include "mosaickv/params.h"

namespace mosaickv {
namespace {

constexpr int kThreads = 256;

// Each thread moves 16 bytes of one (target, side, head) row: k or v [batch, n_heads, D] row
// (b, h) to row r of head h of that side in the target's buffer [2, n_heads, cap, D], whose row r
// of K head 0 is at table[1, i]. Rows are row_bytes long (a multiple of 16, 16-byte aligned: the
// binding checks the tensors, the caller the addresses). A batch index out of range is skipped.
__global__ void write_dense_rows_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                        const int64_t* __restrict__ table, int n, int batch, int n_heads,
                                        int row_bytes) {
  const int chunks = row_bytes / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(n) * 2 * n_heads * chunks) return;
  const int chunk = static_cast<int>(i % chunks);
  const int64_t row = i / chunks;  // (target, side, head)
  const int h = static_cast<int>(row % n_heads), side = static_cast<int>(row / n_heads % 2);
  const int target = static_cast<int>(row / (2 * n_heads));
  const int64_t b = table[target];
  if (b < 0 || b >= batch) return;
  const int64_t cap = table[2 * n + target];
  const char* src = (side ? v : k) + (b * n_heads + h) * row_bytes;
  char* dst = reinterpret_cast<char*>(table[n + target]) + (side * n_heads + h) * cap * row_bytes;
  reinterpret_cast<int4*>(dst)[chunk] = reinterpret_cast<const int4*>(src)[chunk];
}

}  // namespace

cudaError_t write_dense_rows(const void* k, const void* v, const int64_t* table, int n, int batch, int n_heads,
                             int row_bytes, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (row_bytes <= 0 || row_bytes % 16 || n_heads <= 0) return cudaErrorInvalidValue;
  const int64_t threads = static_cast<int64_t>(n) * 2 * n_heads * (row_bytes / 16);
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  write_dense_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const char*>(k), static_cast<const char*>(v),
                                                            table, n, batch, n_heads, row_bytes);
  return cudaGetLastError();
}

}  // namespace mosaickv
