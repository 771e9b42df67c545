// Explicit instantiations of the decode pipeline for bf16 storage: head_dim 64/128 x GQA group 1/4/8 x
// {packed (MosaicKV), dense (token-selection baseline)}. No torch headers.
#include "mosaickv/attention.cuh"

namespace mosaickv {

template <int D, int G>
static cudaError_t decode_variant_bf16(bool packed, const DecodeParams& p, cudaStream_t stream) {
  return packed ? launch_decode<__nv_bfloat16, D, G, true>(p, stream) : launch_decode<__nv_bfloat16, D, G, false>(p, stream);
}

cudaError_t decode_bf16(int head_dim, int gqa_group, bool packed, const DecodeParams& p, cudaStream_t stream) {
  switch (head_dim * 16 + gqa_group) {
    case 64 * 16 + 1: return decode_variant_bf16<64, 1>(packed, p, stream);
    case 64 * 16 + 4: return decode_variant_bf16<64, 4>(packed, p, stream);
    case 64 * 16 + 8: return decode_variant_bf16<64, 8>(packed, p, stream);
    case 128 * 16 + 1: return decode_variant_bf16<128, 1>(packed, p, stream);
    case 128 * 16 + 4: return decode_variant_bf16<128, 4>(packed, p, stream);
    case 128 * 16 + 8: return decode_variant_bf16<128, 8>(packed, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mosaickv
