// A decode step's new K/V rows of a whole batch, each appended to its sequence's own dense buffer
// (mosaickv.cache.CacheManager.append_batch): one launch instead of 2 x batch x heads small copies,
// each a Python-side launch. The row counts live on the device and the kernel advances them, so a
// batch whose buffers did not change needs no upload from the host. No torch headers.
#include <cstdint>

#include "mosaickv/params.h"

namespace mosaickv {
namespace {

// CTA b appends k[b], v[b] ([batch, n_heads, D] rows of row_bytes) as row lengths[b] of sequence b's
// buffer: K head h at rows[b] + (h * cap + row) * row_bytes, V at rows[batch + b] likewise. Then
// lengths[b] += 1, once every thread has read it. A sequence marked in skip (its row went in by
// another path this step) is left alone and its mark cleared. A full buffer is never written past.
__global__ void append_dense_rows_kernel(const char* __restrict__ k, const char* __restrict__ v,
                                         const int64_t* __restrict__ rows, int32_t* lengths, int32_t* skip,
                                         int batch, int n_heads, int cap, int row_bytes) {
  const int b = blockIdx.x;
  const int skipped = skip[b], row = lengths[b];
  __syncthreads();  // every thread has read both before thread 0 changes either
  if (skipped || row >= cap) {
    if (threadIdx.x == 0) skip[b] = 0;
    return;
  }
  const int chunks = row_bytes / 16;
  for (int i = threadIdx.x; i < 2 * n_heads * chunks; i += blockDim.x) {
    const int chunk = i % chunks, h = i / chunks % n_heads, side = i / chunks / n_heads;
    const char* src = (side ? v : k) + (static_cast<int64_t>(b) * n_heads + h) * row_bytes;
    char* dst = reinterpret_cast<char*>(rows[side * batch + b]) + (static_cast<int64_t>(h) * cap + row) * row_bytes;
    reinterpret_cast<int4*>(dst)[chunk] = reinterpret_cast<const int4*>(src)[chunk];
  }
  if (threadIdx.x == 0) lengths[b] = row + 1;
}

}  // namespace

cudaError_t append_dense_rows(const void* k, const void* v, const int64_t* rows, int32_t* lengths, int32_t* skip,
                              int batch, int n_heads, int cap, int row_bytes, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  if (row_bytes <= 0 || row_bytes % 16 || n_heads <= 0 || cap <= 0) return cudaErrorInvalidValue;
  const int work = 2 * n_heads * (row_bytes / 16);
  const int threads = work < 1024 ? (work + 31) / 32 * 32 : 1024;
  append_dense_rows_kernel<<<batch, threads, 0, stream>>>(static_cast<const char*>(k), static_cast<const char*>(v),
                                                           rows, lengths, skip, batch, n_heads, cap, row_bytes);
  return cudaGetLastError();
}

}  // namespace mosaickv
