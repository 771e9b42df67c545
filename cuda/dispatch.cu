// Entry points declared in mosaickv/params.h, routing on the storage dtype. No torch headers.
#include "mosaickv/attention.cuh"

namespace mosaickv {

cudaError_t decode_bf16(int head_dim, int gqa_group, bool packed, const DecodeParams& p, cudaStream_t stream);
cudaError_t decode_fp16(int head_dim, int gqa_group, bool packed, const DecodeParams& p, cudaStream_t stream);

cudaError_t decode(DType dtype, int head_dim, int gqa_group, bool packed, const DecodeParams& p, cudaStream_t stream) {
  return dtype == DType::kBFloat16 ? decode_bf16(head_dim, gqa_group, packed, p, stream)
                                   : decode_fp16(head_dim, gqa_group, packed, p, stream);
}

}  // namespace mosaickv
