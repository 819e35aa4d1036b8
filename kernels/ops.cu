// ops.cu — the small element-wise ops of the CUDA backend's `Backend` implementation
// (src/backend/cuda/mod.rs) that the fused kernels do not cover: the residual add, the f32 → bf16
// cast in front of a cuBLAS GEMM, the bias add behind it, the KV store, and the two LM-head
// pick gathers. Memory-bound one-liners: each mirrors a CPU function line by line.
//
//   add_f32(float* acc, const float* x, u64 n)
//     `Backend::add`: acc[i] += x[i].                          grid-stride, block 256
//   cast_f32_bf16(const float* x, bf16* out, u64 n)
//     out[i] = bf16(x[i]), round to nearest even (the GEMM's activation operand).
//                                                              grid-stride, block 256
//   bias_add_f32(float* out, const bf16* bias, u32 rows, u32 n)
//     out [rows, n] += bias [n] (`Linear::bias`; the CPU adds it after the dot product, too).
//                                                              grid-stride, block 256
//   kv_store_f32(float* k_cache, float* v_cache, const float* k, const float* v,
//                const RowKv* rows, u32 n_rows, u32 kv_dim, u32 entries)
//     `Backend::kv_store` for one layer: k_cache[rows[t].entry] = k[t] (same for v); caches
//     [entries, kv_dim], k / v [n_rows, kv_dim]. An entry >= entries is skipped (the host
//     refuses it before launch).                               grid (n_rows), block 128
//   gather_picks_f32(const float* logits, const u32* picks, float* out, u32 n, u32 rows, u32 vocab)
//     out[i] = logits[picks[2i], picks[2i + 1]] (the full-normalization head: pick logits out of
//     the full `[rows, V]` logits, next to `row_logsumexp`). Out-of-range picks give NaN.
//                                                              grid-stride, block 256
//   linear_picks_f32(const float* x, const bf16* w, const u32* picks, float* out, u32 n,
//                    u32 rows, u32 vocab, u32 dim)
//     `Backend::linear_picks`: out[i] = x[picks[2i]] · w[picks[2i + 1]], x [rows, dim] f32,
//     w [vocab, dim] bf16, f32 accumulation. Out-of-range picks give NaN.
//                                                              one warp per pick, block 256

#include "common.cuh"

extern "C" __global__ void add_f32(float* __restrict__ acc, const float* __restrict__ x, u64 n) {
    gram_pdl_entry();
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) acc[i] += x[i];
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ out, u64 n) {
    gram_pdl_entry();
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void bias_add_f32(float* __restrict__ out, const bf16* __restrict__ bias, u32 rows,
                                        u32 n) {
    gram_pdl_entry();
    const u64 total = (u64)rows * n;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride)
        out[i] += __bfloat162float(bias[i % n]);
}

extern "C" __global__ void kv_store_f32(float* __restrict__ k_cache, float* __restrict__ v_cache,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const RowKv* __restrict__ rows, u32 n_rows, u32 kv_dim,
                                        u32 entries) {
    gram_pdl_entry();
    const u32 t = blockIdx.x;
    if (t >= n_rows) return;
    const u32 e = rows[t].entry;
    if (e >= entries) return;
    const u64 dst = (u64)e * kv_dim, src = (u64)t * kv_dim;
    for (u32 i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
    }
}

extern "C" __global__ void gather_picks_f32(const float* __restrict__ logits, const u32* __restrict__ picks,
                                            float* __restrict__ out, u32 n, u32 rows, u32 vocab) {
    gram_pdl_entry();
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u32 r = picks[2 * i], v = picks[2 * i + 1];
        out[i] = (r < rows && v < vocab) ? logits[(u64)r * vocab + v] : gram_nan();
    }
}

extern "C" __global__ void linear_picks_f32(const float* __restrict__ x, const bf16* __restrict__ w,
                                            const u32* __restrict__ picks, float* __restrict__ out, u32 n,
                                            u32 rows, u32 vocab, u32 dim) {
    gram_pdl_entry();
    const u32 lane = threadIdx.x & 31;
    const u64 i = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (i >= n) return;  // whole warp: lanes share i
    const u32 r = picks[2 * i], v = picks[2 * i + 1];
    if (r >= rows || v >= vocab) {  // uniform across the warp
        if (lane == 0) out[i] = gram_nan();
        return;
    }
    const float* xr = x + (u64)r * dim;
    const bf16* wr = w + (u64)v * dim;
    float acc = 0.0f;
    for (u32 d = lane; d < dim; d += 32) acc = fmaf(xr[d], __bfloat162float(wr[d]), acc);
    acc = warp_sum(acc);
    if (lane == 0) out[i] = acc;
}
