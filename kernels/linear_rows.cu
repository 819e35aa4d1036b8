// linear_rows.cu — products of a few rows (a decode step's beams) with a weight, memory-bound:
// every weight value is read once, as 16-byte loads, and the bf16 activation operand (the same
// one the cuBLAS path reads: a norm's, SwiGLU's or attention's bf16 copy, or a cast) comes from
// L1/L2. Optionally the SwiGLU of two products at once (gate and up).
//
// Mirrors `Backend::linear` with the activation rounded to bf16 (the cuBLAS path's numerics:
// bf16 × bf16 products, f32 sums; only the summation order differs) and, in pair mode,
// `Backend::gate_up_silu`.
//
//   linear_rows_bf16(const bf16* x, const bf16* w0, const bf16* w1, const bf16* bias,
//                    float* out, bf16* out_b, u32 rows, u32 n, u32 k)
//     x     [rows, k] bf16   rows <= ROWS_MAX (16); k a multiple of 8, rows 16-byte aligned
//     w0    [n, k]    bf16   (16-byte aligned rows: the host checks k % 8 == 0)
//     w1    [n, k]    bf16   or null. Set: pair mode, out = silu(x w0^T) * (x w1^T)
//     bias  [n]       bf16   or null (single mode only): added after the sum, as the CPU does
//     out   [rows, n] f32
//     out_b [rows, n] bf16   or null: out rounded to bf16 (the next GEMM's operand)
//   Launch: grid (ceil(n / 4)), block 128: warp w of block b computes column 4b + w for every
//   row. Lane l reads the weight row's 16-byte chunks l, l + 32, ... eight at a time (the loads
//   are issued together; the first eight before the programmatic-launch wait, so with
//   `GRAM_CUDA_PDL` a row of up to 2,048 values streams in while the kernel before still runs),
//   keeps one partial sum per row, and the warp reduces them.
//
// A column past n does nothing (uniform across the warp). rows > ROWS_MAX computes only the
// first ROWS_MAX rows (the host never launches it so).

#include "common.cuh"

#define ROWS_MAX 16
#define ROWS_UNROLL 8

__device__ __forceinline__ float dot8(const uint4 a, const uint4 b) {
    float fa[8], fb[8];
    const u32 wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // bf16 -> f32 is exact: the 16 bits are the top half of the f32.
        fa[2 * i] = __uint_as_float(wa[i] << 16);
        fa[2 * i + 1] = __uint_as_float(wa[i] & 0xffff0000u);
        fb[2 * i] = __uint_as_float(wb[i] << 16);
        fb[2 * i + 1] = __uint_as_float(wb[i] & 0xffff0000u);
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(fa[i], fb[i], s);
    return s;
}

template <bool PAIR>
__device__ __forceinline__ void linear_rows_impl(const bf16* __restrict__ x, const bf16* __restrict__ w0,
                                                 const bf16* __restrict__ w1, const bf16* __restrict__ bias,
                                                 float* __restrict__ out, bf16* __restrict__ out_b, u32 rows,
                                                 u32 n, u32 k) {
    const u32 lane = threadIdx.x & 31;
    const u32 col = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (col >= n) return;  // whole warp
    const u32 r_n = rows < ROWS_MAX ? rows : ROWS_MAX;
    const u32 chunks = k / 8;
    const uint4* a_row = reinterpret_cast<const uint4*>(w0 + (u64)col * k);
    const uint4* b_row = PAIR ? reinterpret_cast<const uint4*>(w1 + (u64)col * k) : nullptr;
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    float acc_a[ROWS_MAX], acc_b[ROWS_MAX];
#pragma unroll
    for (int r = 0; r < ROWS_MAX; ++r) {
        acc_a[r] = 0.0f;
        acc_b[r] = 0.0f;
    }
    const uint4 zero = make_uint4(0, 0, 0, 0);
    uint4 wa[ROWS_UNROLL], wb[ROWS_UNROLL];
    // One round of this lane's weight chunks: c0, c0 + 32, ... (zeros past the row).
    auto load_round = [&](u32 c0) {
#pragma unroll
        for (int u = 0; u < ROWS_UNROLL; ++u) {
            const u32 c = c0 + 32 * u;
            wa[u] = c < chunks ? a_row[c] : zero;
            wb[u] = PAIR && c < chunks ? b_row[c] : zero;
        }
    };
    // The weights were written at load time, not by the kernel before: the first round (the
    // whole row up to k = 32 * 8 * ROWS_UNROLL) is in flight while that kernel finishes.
    load_round(lane);
    gram_pdl_wait();
    gram_pdl_trigger();
    for (u32 c0 = lane; c0 < chunks; c0 += 32 * ROWS_UNROLL) {
        if (c0 != lane) load_round(c0);
#pragma unroll
        for (int u = 0; u < ROWS_UNROLL; ++u) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) break;
#pragma unroll
            for (int r = 0; r < ROWS_MAX; ++r) {
                if ((u32)r < r_n) {
                    const uint4 xv = xs[(u64)r * chunks + c];
                    acc_a[r] += dot8(wa[u], xv);
                    if (PAIR) acc_b[r] += dot8(wb[u], xv);
                }
            }
        }
    }
    const float b = !PAIR && bias ? __bfloat162float(bias[col]) : 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS_MAX; ++r) {
        if ((u32)r < r_n) {  // uniform across the warp
            const float sa = warp_sum(acc_a[r]);
            const float sb = PAIR ? warp_sum(acc_b[r]) : 0.0f;
            if (lane == 0) {
                const float y = PAIR ? sa / (1.0f + expf(-sa)) * sb : sa + b;
                out[(u64)r * n + col] = y;
                if (out_b) out_b[(u64)r * n + col] = __float2bfloat16_rn(y);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    linear_rows_bf16(const bf16* x, const bf16* w0, const bf16* w1, const bf16* bias, float* out, bf16* out_b,
                     u32 rows, u32 n, u32 k) {
    if (w1)
        linear_rows_impl<true>(x, w0, w1, nullptr, out, out_b, rows, n, k);
    else
        linear_rows_impl<false>(x, w0, nullptr, bias, out, out_b, rows, n, k);
}
