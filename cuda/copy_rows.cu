// Row copies between arbitrary device addresses, many in one launch: the decode step's new K/V rows
// of a whole batch into each sequence's own dense buffer (mosaickv.cache.CacheManager.append_batch).
// One launch replaces 2 x batch x heads small copies, each a Python-side launch. No torch headers.
#include <cstdint>

#include "mosaickv/params.h"

namespace mosaickv {
namespace {

constexpr int kThreads = 256;

// table: [2, n_rows] int64: source addresses, then destination addresses. Each thread moves 16 bytes
// of one row; rows are row_bytes long (a multiple of 16, every address 16-byte aligned: the binding
// checks the size, the caller the addresses).
__global__ void copy_rows_kernel(const int64_t* __restrict__ table, int n_rows, int row_bytes) {
  const int chunks = row_bytes / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= static_cast<int64_t>(n_rows) * chunks) return;
  const int row = static_cast<int>(i / chunks), chunk = static_cast<int>(i % chunks);
  const auto* src = reinterpret_cast<const int4*>(table[row]);
  auto* dst = reinterpret_cast<int4*>(table[n_rows + row]);
  dst[chunk] = src[chunk];
}

}  // namespace

cudaError_t copy_rows(const int64_t* table, int n_rows, int row_bytes, cudaStream_t stream) {
  if (n_rows <= 0) return cudaSuccess;
  if (row_bytes <= 0 || row_bytes % 16) return cudaErrorInvalidValue;
  const int64_t threads = static_cast<int64_t>(n_rows) * (row_bytes / 16);
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  copy_rows_kernel<<<blocks, kThreads, 0, stream>>>(table, n_rows, row_bytes);
  return cudaGetLastError();
}

}  // namespace mosaickv
