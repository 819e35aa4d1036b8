// linear_small.cu — `out = x W^T (+ b)` for a few rows (a decode step of one query's beams),
// memory-bound: every weight is read once, as 16-byte loads.
//
// Mirrors `Backend::linear` (src/backend/cpu/matmul.rs: f32 activations times bf16 weights,
// f32 accumulation, then the bias). Unlike the cuBLAS path it does not round the activations
// to bf16, so it matches the CPU to f32 summation order.
//
//   linear_small_f32(const float* x, const bf16* w, const bf16* bias, float* out,
//                    u32 rows, u32 n, u32 k)
//     x    [rows, k] f32      rows <= SMALL_ROWS (16)
//     w    [n, k]    bf16     k a multiple of 8 (16-byte rows: the host checks)
//     bias [n]       bf16     or null
//     out  [rows, n] f32
//   Launch: grid (ceil(n / 8)), block 256: warp w of block b computes column 8b + w for every
//   row; lane l reads weights l*8.. of the row, 256 values per pass, and keeps one partial sum
//   per row; the warp then reduces them.
//
// A column past n does nothing (uniform across the warp). rows > SMALL_ROWS computes only the
// first SMALL_ROWS rows (the host never launches it so).

#include "common.cuh"

#define SMALL_ROWS 16

extern "C" __global__ void __launch_bounds__(256) linear_small_f32(const float* __restrict__ x,
                                                                  const bf16* __restrict__ w,
                                                                  const bf16* __restrict__ bias,
                                                                  float* __restrict__ out, u32 rows,
                                                                  u32 n, u32 k) {
    gram_pdl_entry();
    const u32 lane = threadIdx.x & 31;
    const u32 col = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (col >= n) return;  // whole warp
    const u32 r_n = rows < SMALL_ROWS ? rows : SMALL_ROWS;
    const bf16* wr = w + (u64)col * k;
    float acc[SMALL_ROWS];
#pragma unroll
    for (int r = 0; r < SMALL_ROWS; ++r) acc[r] = 0.0f;
    for (u32 kk = lane * 8; kk < k; kk += 256) {
        float wv[8];
        load8(wr + kk, wv);
#pragma unroll
        for (int r = 0; r < SMALL_ROWS; ++r) {
            if ((u32)r < r_n) {
                float xv[8];
                load8(x + (u64)r * k + kk, xv);
                float s = acc[r];
#pragma unroll
                for (int i = 0; i < 8; ++i) s = fmaf(xv[i], wv[i], s);
                acc[r] = s;
            }
        }
    }
    const float b = bias ? __bfloat162float(bias[col]) : 0.0f;
#pragma unroll
    for (int r = 0; r < SMALL_ROWS; ++r) {
        if ((u32)r < r_n) {  // uniform across the warp
            const float s = warp_sum(acc[r]);
            if (lane == 0) out[(u64)r * n + col] = s + b;
        }
    }
}
