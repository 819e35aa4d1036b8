// embedding.cu — row gathers: the token embedding and the activation row gather.
//
//   embed_f32 / embed_bf16(const bf16* table, const u32* ids, T* out, u32 n, u32 vocab, u32 dim)
//     Mirrors `Backend::embed` (`out[t] = table[ids[t]]`, widened). table [V, C] bf16;
//     ids [n] u32; out [n, C] T (embed_f32 starts the f32 residual stream). An id >= vocab gives
//     a NaN row (the host refuses such ids before they get here).
//
//   gather_rows_f32 / gather_rows_bf16(const T* x, const u32* rows, T* out, u32 n, u32 x_rows,
//                                      u32 dim)
//     Mirrors `Backend::gather_rows` (`out[i] = x[rows[i]]`). x [x_rows, dim]; rows [n];
//     out [n, dim]. A row index >= x_rows gives a NaN row.
//
// Launch (both): grid (n), block 128 (any size; threads stride over the row).

#include "common.cuh"

template <typename S, typename T>
__device__ __forceinline__ void gather_impl(const S* __restrict__ src, const u32* __restrict__ index,
                                            T* __restrict__ out, u32 src_rows, u32 dim) {
    const u32 r = index[blockIdx.x];
    T* o = out + (u64)blockIdx.x * dim;
    if (r >= src_rows) {
        for (u32 i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_f32<T>(gram_nan());
        return;
    }
    const S* s = src + (u64)r * dim;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_f32<T>(to_f32(s[i]));
}

extern "C" __global__ void embed_f32(const bf16* table, const u32* ids, float* out, u32 n, u32 vocab,
                                     u32 dim) {
    gram_pdl_entry();
    if (blockIdx.x < n) gather_impl<bf16, float>(table, ids, out, vocab, dim);
}
extern "C" __global__ void embed_bf16(const bf16* table, const u32* ids, bf16* out, u32 n, u32 vocab,
                                      u32 dim) {
    gram_pdl_entry();
    if (blockIdx.x < n) gather_impl<bf16, bf16>(table, ids, out, vocab, dim);
}
extern "C" __global__ void gather_rows_f32(const float* x, const u32* rows, float* out, u32 n,
                                           u32 x_rows, u32 dim) {
    gram_pdl_entry();
    if (blockIdx.x < n) gather_impl<float, float>(x, rows, out, x_rows, dim);
}
extern "C" __global__ void gather_rows_bf16(const bf16* x, const u32* rows, bf16* out, u32 n,
                                            u32 x_rows, u32 dim) {
    gram_pdl_entry();
    if (blockIdx.x < n) gather_impl<bf16, bf16>(x, rows, out, x_rows, dim);
}
