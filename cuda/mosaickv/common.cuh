// Shared definitions for MosaicKV kernels: storage-type conversions, the flat packed-cache layout
// the kernels read (docs/KERNELS.md "GPU layout"), and the status codes kernels report.
// No torch headers: this compiles with plain nvcc (scripts/check-cuda.mjs).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "params.h"

namespace mosaickv {

// Programmatic dependent launch (sm_90 and newer). The stages of a decode call after the first are
// launched with programmatic stream serialization (``launch_stage``): a stage's CTAs may start while
// the stage before it finishes, do work that needs nothing of it (addresses, data written before the
// call), and call wait_for_prior_stage() before they touch what it writes. That wait returns once the
// previous stage has completed with its writes visible; since every stage makes it (in at least one
// CTA), the previous stage completed only after the one before it did, and so on. A stage calls
// allow_next_stage() at its start, so that the next stage's CTAs are placed as soon as this one's
// last CTAs are (the select later: see there). Without the launch attribute, or before sm_90, both
// are no-ops.
// The launch attribute that makes a stage a programmatic dependent launch of the one before it.
inline cudaLaunchAttribute after_stage_attribute() {
  cudaLaunchAttribute a;
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

__device__ __forceinline__ void wait_for_prior_stage() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_stage() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Asynchronous copies global -> shared memory (cp.async): no registers held while they are in flight;
// cp_async_wait_all() waits for the thread's own, a barrier after it for the CTA's.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem_dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem_dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_u32(smem_dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// A shared-memory word load and atomic add at 32-bit shared-window addresses (smem_u32). Hot loops
// keep one base address in a register: indexing a shared array in a cluster kernel, the compiler
// recomputed the CTA's window base (S2R SR_CgaCtaId and three more instructions) at every access.
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void red_add_shared(uint32_t addr, uint32_t v) {
  asm volatile("red.shared.add.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}

// Row r of a paged array (StripeCol in params.h): entry `first` of the page table holds rows
// [0, per_page), the next one [per_page, 2 per_page), ... Indices fit 32 bits (unsigned division).
__host__ __device__ __forceinline__ char* paged_row(const int64_t* pages, int64_t entry, int64_t per_page,
                                                    int64_t r, int64_t row_bytes) {
  const uint32_t q = (uint32_t)r / (uint32_t)per_page, rem = (uint32_t)r - q * (uint32_t)per_page;
  return reinterpret_cast<char*>(pages[entry + q]) + (int64_t)rem * row_bytes;
}

// Row i of a stripe's rotation R_K (side 0) or R_V (side 1): D floats.
template <int D>
__device__ __forceinline__ const float* rotation_row(const int64_t* pages, const int64_t* meta, int side, int i) {
  const int64_t r = meta[side == 0 ? kColRotFirstK : kColRotFirstV] + i;
  return reinterpret_cast<const float*>(paged_row(pages, meta[kColRotPages], meta[kColRotRows], r, D * 4));
}

// Summary row of the stripe's block j (width storage elements).
template <typename T>
__device__ __forceinline__ T* summary_row(const int64_t* pages, const int64_t* meta, int64_t j, int width) {
  return reinterpret_cast<T*>(paged_row(pages, meta[kColSumPages], meta[kColSumRows], meta[kColSumFirst] + j,
                                        (int64_t)width * sizeof(T)));
}

template <typename T> struct Conv;
template <> struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};
template <> struct Conv<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half(x); }
};

// 2 storage elements held in one 32-bit word, unpacked to float.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t u, float2& out) {
  const T* e = reinterpret_cast<const T*>(&u);
  out.x = Conv<T>::to(e[0]);
  out.y = Conv<T>::to(e[1]);
}

// 8 storage elements held in one 16-byte load, unpacked to float.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& u, float* out) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = Conv<T>::to(e[i]);
}

__device__ __forceinline__ uint32_t float_to_ordered(float f) {
  // Monotone map float -> uint32 so that larger scores compare larger as unsigned integers.
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction of one float per thread; `scratch` holds >= 32 floats. All threads get the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  r = kMax ? warp_max(r) : warp_sum(r);
  return r;
}

}  // namespace mosaickv
