// swiglu.cu — the MLP's gated activation, `silu(gate) * up`.
//
// Mirrors `Backend::silu_mul` (src/backend/cpu/mod.rs): `gate = gate / (1 + exp(-gate)) * up`,
// in f32, same order of operations. Symbols carry the CPU name and the activation dtype:
//
//   silu_mul_f32(float* gate, const float* up, u64 n, bf16* out_b)
//   silu_mul_bf16(bf16* gate, const bf16* up, u64 n)
//     gate [n] T  in place; up [n] T (gate and up may not overlap)
//     out_b [n] bf16 or null (f32 only): the result rounded to bf16 as well, the operand of the
//     down projection's GEMM (saves its cast)
//     launch: grid-stride, e.g. grid (min(ceil(n / 256), 8 * SMs)), block 256
//
//   silu_mul_pair_f32(const float* gate, const float* up, float* out, bf16* out_b, u64 n)
//     out [n] = silu(gate) * up, and its bf16 rounding into out_b (null: none); gate and up
//     are the two halves of one batched GEMM's output (`Backend::gate_up_silu`)
//     launch: as silu_mul_f32
//
//   silu_mul_packed_f32 / silu_mul_packed_bf16(const T* gate_up, T* out, u32 rows, u32 inter)
//     gate_up [rows, 2 * I] T  one GEMM's output for the concatenated [gate_proj; up_proj]
//                              weight: row r holds gate[r, 0..I] then up[r, 0..I]
//     out     [rows, I]     T  silu(gate) * up
//     launch: grid-stride over rows * I, e.g. grid (min(ceil(rows * I / 256), 8 * SMs)), block 256
//
// Memory-bound and tiny next to the GEMMs; a later version may load 8 bf16 per thread.

#include "common.cuh"

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

template <typename T>
__device__ __forceinline__ void silu_mul_impl(T* __restrict__ gate, const T* __restrict__ up, u64 n,
                                              bf16* __restrict__ out_b) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float y = silu_mul(to_f32(gate[i]), to_f32(up[i]));
        gate[i] = from_f32<T>(y);
        if (out_b) out_b[i] = __float2bfloat16_rn(y);
    }
}

template <typename T>
__device__ __forceinline__ void silu_mul_packed_impl(const T* __restrict__ gate_up, T* __restrict__ out,
                                                     u32 rows, u32 inter) {
    const u64 n = (u64)rows * inter;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 r = i / inter, c = i % inter;
        const T* row = gate_up + r * 2 * inter;
        out[i] = from_f32<T>(silu_mul(to_f32(row[c]), to_f32(row[inter + c])));
    }
}

extern "C" __global__ void silu_mul_f32(float* gate, const float* up, u64 n, bf16* out_b) {
    gram_pdl_entry();
    silu_mul_impl<float>(gate, up, n, out_b);
}
extern "C" __global__ void silu_mul_bf16(bf16* gate, const bf16* up, u64 n) {
    gram_pdl_entry();
    silu_mul_impl<bf16>(gate, up, n, nullptr);
}
extern "C" __global__ void silu_mul_pair_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                             float* __restrict__ out, bf16* __restrict__ out_b, u64 n) {
    gram_pdl_entry();
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float y = silu_mul(gate[i], up[i]);
        out[i] = y;
        if (out_b) out_b[i] = __float2bfloat16_rn(y);
    }
}
extern "C" __global__ void silu_mul_packed_f32(const float* gate_up, float* out, u32 rows, u32 inter) {
    gram_pdl_entry();
    silu_mul_packed_impl<float>(gate_up, out, rows, inter);
}
extern "C" __global__ void silu_mul_packed_bf16(const bf16* gate_up, bf16* out, u32 rows, u32 inter) {
    gram_pdl_entry();
    silu_mul_packed_impl<bf16>(gate_up, out, rows, inter);
}
