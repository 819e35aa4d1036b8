// rmsnorm.cu — RMSNorm fused with the residual add that precedes it.
//
// Mirrors `Backend::add` followed by `Backend::rmsnorm` (src/backend/cpu/mod.rs), as
// src/model/forward.rs calls them: `x += delta; out = rmsnorm(x) * weight`, HF's
// `weight * (x * rsqrt(mean(x^2) + eps))` with x in f32. The CPU sums squares in f64; here in
// f32 (the bf16 parity tolerance covers it).
//
// Symbols (T = activation dtype of `delta` and `out`; the residual stream `x` is always f32):
//   rmsnorm_f32(float* x, const float* delta, const bf16* weight, float* out, ..., bf16* out_b)
//   rmsnorm_bf16(float* x, const bf16* delta, const bf16* weight, bf16* out, ...)
// Parameters:
//   x          [x_rows, dim] f32  residual stream; read, and written back (x += delta) when
//                                  `row_index` is null and `delta` is not
//   delta      [x_rows, dim] T    added to x first (the o_proj / down_proj output), or null
//   weight     [dim]         bf16 the norm's weight
//   out        [rows, dim]   T    normed rows
//   row_index  [rows]        u32  or null: out row i is made from x row row_index[i] (the final
//                                  norm on the rows whose logits are wanted, `gather_rows` +
//                                  `rmsnorm`); x is then NOT written back (the sum is used, and
//                                  repeated indices are safe). An index >= x_rows gives a NaN row.
//   x_rows, dim, eps
//   out_b      [rows, dim]   bf16 or null (rmsnorm_f32 only): out rounded to bf16 as well, the
//                                  operand of the GEMM that reads out next (saves its cast)
// Launch: grid (rows), block 256 (any multiple of 32 up to 1024). The first layer's input norm
// passes delta = null; later ones fuse the previous block's residual add.
// Qwen3's per-head q/k norm is fused into rope.cu instead.

#include "common.cuh"

#define RN 8

template <typename T>
__device__ __forceinline__ void rmsnorm_impl(float* x, const T* delta, const bf16* __restrict__ weight,
                                             T* __restrict__ out, const u32* __restrict__ row_index,
                                             u32 x_rows, u32 dim, float eps, bf16* __restrict__ out_b) {
    __shared__ float scratch[32];
    const u32 nt = blockDim.x;
    // Rows of up to RN values a thread (dim <= 2,048 at 256 threads) are held in registers,
    // every load issued before its value is used, and the norm's weight is loaded before the
    // programmatic-launch wait (written at load time, not by the kernel before). Same sums in
    // the same order as the loop below.
    const bool regs = dim <= RN * nt;  // uniform
    float w[RN];
#pragma unroll
    for (int j = 0; j < RN; ++j) {
        const u32 i = threadIdx.x + j * nt;
        w[j] = regs && i < dim ? to_f32(weight[i]) : 0.0f;
    }
    gram_pdl_wait();
    gram_pdl_trigger();
    const u32 row = blockIdx.x;
    const u32 src = row_index ? row_index[row] : row;
    T* o = out + (u64)row * dim;
    bf16* ob = out_b ? out_b + (u64)row * dim : nullptr;
    if (src >= x_rows) {  // uniform across the block: no barrier is skipped by some threads only
        for (u32 i = threadIdx.x; i < dim; i += nt) {
            o[i] = from_f32<T>(gram_nan());
            if (ob) ob[i] = __float2bfloat16_rn(gram_nan());
        }
        return;
    }
    float* xr = x + (u64)src * dim;
    const T* dr = delta ? delta + (u64)src * dim : nullptr;
    const bool write_back = dr != nullptr && row_index == nullptr;

    float ss = 0.0f;
    if (regs) {
        float v[RN];
#pragma unroll
        for (int j = 0; j < RN; ++j) {
            const u32 i = threadIdx.x + j * nt;
            v[j] = i < dim ? xr[i] + (dr ? to_f32(dr[i]) : 0.0f) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < RN; ++j) {
            const u32 i = threadIdx.x + j * nt;
            if (i < dim) {
                if (write_back) xr[i] = v[j];
                ss += v[j] * v[j];
            }
        }
        ss = block_sum(ss, scratch);
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma unroll
        for (int j = 0; j < RN; ++j) {
            const u32 i = threadIdx.x + j * nt;
            if (i < dim) {
                const float y = w[j] * (v[j] * inv);
                o[i] = from_f32<T>(y);
                if (ob) ob[i] = __float2bfloat16_rn(y);
            }
        }
        return;
    }
    for (u32 i = threadIdx.x; i < dim; i += nt) {
        float v = xr[i];
        if (dr) v += to_f32(dr[i]);
        if (write_back) xr[i] = v;  // the same thread reads it back below
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (u32 i = threadIdx.x; i < dim; i += nt) {
        float v = xr[i];
        if (dr && !write_back) v += to_f32(dr[i]);
        const float y = to_f32(weight[i]) * (v * inv);
        o[i] = from_f32<T>(y);
        if (ob) ob[i] = __float2bfloat16_rn(y);  // what cast_f32_bf16 would make of o[i]
    }
}

extern "C" __global__ void rmsnorm_f32(float* x, const float* delta, const bf16* weight, float* out,
                                       const u32* row_index, u32 x_rows, u32 dim, float eps, bf16* out_b) {
    rmsnorm_impl<float>(x, delta, weight, out, row_index, x_rows, dim, eps, out_b);
}

extern "C" __global__ void rmsnorm_bf16(float* x, const bf16* delta, const bf16* weight, bf16* out,
                                        const u32* row_index, u32 x_rows, u32 dim, float eps) {
    rmsnorm_impl<bf16>(x, delta, weight, out, row_index, x_rows, dim, eps, nullptr);
}
