// Explicit instantiations of the encode kernels (head_dim 64/128 x bf16/fp16). No torch headers.
#include "mosaickv/encode.cuh"

namespace mosaickv {

cudaError_t encode(DType dtype, int head_dim, const EncodeParams& p, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (head_dim == 128) return bf16 ? launch_encode<__nv_bfloat16, 128>(p, stream) : launch_encode<__half, 128>(p, stream);
  if (head_dim == 64) return bf16 ? launch_encode<__nv_bfloat16, 64>(p, stream) : launch_encode<__half, 64>(p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t append_encode(DType dtype, int head_dim, const AppendParams& p, cudaStream_t stream) {
  const bool bf16 = dtype == DType::kBFloat16;
  if (head_dim == 128)
    return bf16 ? launch_append_encode<__nv_bfloat16, 128>(p, stream) : launch_append_encode<__half, 128>(p, stream);
  if (head_dim == 64)
    return bf16 ? launch_append_encode<__nv_bfloat16, 64>(p, stream) : launch_append_encode<__half, 64>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace mosaickv
