// linear_rows.cu — products of a few rows (a decode step's beams) with a weight on the tensor
// cores: every weight value is read once, as 16-byte loads, and the bf16 activation operand (the
// same one the cuBLAS path reads: a norm's, SwiGLU's or attention's bf16 copy, or a cast) comes
// from L1/L2. Optionally the SwiGLU of two products at once (gate and up).
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
//   Launch: grid (ceil(n / 8)), block 32 * W with W in 1..=16 warps: block b computes columns
//   8b .. 8b + 8 for every row, its warps splitting k (warp w takes the 32-value blocks w,
//   w + W, ...); the warps' partial sums meet in shared memory. The host takes
//   W = min(16, ceil(ceil(k / 32) / PREFETCH)): each warp's blocks fit one round of loads up to
//   k = 16 * 6 * 32 = 3,072.
//
// One `mma.m16n8k16` (bf16 in, f32 accumulate) multiplies the 16 rows (those past `rows` read
// as zeros) by 16 of k for the block's 8 columns. A 32-value block of k is two of them, and
// lane (g = lane / 4, t = lane % 4) loads one 16-byte piece of each operand row it needs: the
// weight of column g and the activations of rows g and g + 8, all at k = 32 i + 8 t. The mma's
// own k order is a permutation of that (its lane t holds the k pairs 2t and 2t + 8); a sum over
// k does not depend on which k the hardware calls which, as long as the activation and the
// weight of one term sit in the same place, and they do: both are indexed by (t, word).
// A warp loads its weight blocks in rounds of PREFETCH, the first before the programmatic-launch
// wait: with `GRAM_CUDA_PDL` they stream in while the kernel before still runs.
//
// A column past n or a row past `rows` is computed on zeros and not written. rows > ROWS_MAX
// computes only the first ROWS_MAX rows (the host never launches it so).

#include "common.cuh"

#define ROWS_MAX 16
#define MAX_WARPS 16
#define PREFETCH 6

// D += A B for one m16n8k16 tile: a = 4 words of bf16 pairs (rows g, g + 8; k pairs 2t, 2t + 8),
// b = 2 words (column g; k pairs 2t, 2t + 8), d = rows g, g + 8 × columns 2t, 2t + 1.
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// The two mmas of one 32-value block of k: lane's weight piece w (column g, k 32i + 8t ..
// + 8) and activation pieces xg (row g), xh (row g + 8) at the same k.
__device__ __forceinline__ void mma_block(float (&d)[4], const uint4& xg, const uint4& xh, const uint4& w) {
    mma_bf16(d, xg.x, xh.x, xg.y, xh.y, w.x, w.y);
    mma_bf16(d, xg.z, xh.z, xg.w, xh.w, w.z, w.w);
}

template <bool PAIR>
__device__ __forceinline__ void linear_rows_impl(const bf16* __restrict__ x, const bf16* __restrict__ w0,
                                                 const bf16* __restrict__ w1, const bf16* __restrict__ bias,
                                                 float* __restrict__ out, bf16* __restrict__ out_b, u32 rows,
                                                 u32 n, u32 k) {
    __shared__ float partial[MAX_WARPS][PAIR ? 2 : 1][4][32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 warps = min(blockDim.x >> 5, (u32)MAX_WARPS);
    const u32 g = lane >> 2, t = lane & 3;
    const u32 col = blockIdx.x * 8 + g;
    const u32 r_n = rows < ROWS_MAX ? rows : ROWS_MAX;
    const u32 blocks = (k + 31) / 32;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    // This lane's piece of block i of a weight row (zeros past the row or past n).
    auto wpiece = [&](const bf16* w, u32 i) -> uint4 {
        const u32 kk = i * 32 + t * 8;
        return col < n && kk < k ? *reinterpret_cast<const uint4*>(w + (u64)col * k + kk) : zero;
    };
    auto xpiece = [&](u32 r, u32 i) -> uint4 {
        const u32 kk = i * 32 + t * 8;
        return r < r_n && kk < k ? *reinterpret_cast<const uint4*>(x + (u64)r * k + kk) : zero;
    };
    float da[4] = {0.0f, 0.0f, 0.0f, 0.0f}, db[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Rounds of PREFETCH blocks per warp: the weight loads of a round are issued together,
    // then its activation loads and mmas.
    uint4 pa[PREFETCH], pb[PREFETCH];
    auto load_round = [&](u32 base) {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            const u32 i = warp + (base + j) * warps;
            pa[j] = i < blocks ? wpiece(w0, i) : zero;
            pb[j] = PAIR && i < blocks ? wpiece(w1, i) : zero;
        }
    };
    auto compute_round = [&](u32 base) {
#pragma unroll
        for (int j = 0; j < PREFETCH; ++j) {
            const u32 i = warp + (base + j) * warps;
            if (i < blocks) {  // uniform across the warp
                const uint4 xg = xpiece(g, i), xh = xpiece(g + 8, i);
                mma_block(da, xg, xh, pa[j]);
                if (PAIR) mma_block(db, xg, xh, pb[j]);
            }
        }
    };
    // The weights were written at load time, not by the kernel before: the first round is in
    // flight while that kernel finishes.
    load_round(0);
    gram_pdl_wait();
    gram_pdl_trigger();
    compute_round(0);
    for (u32 base = PREFETCH; warp + base * warps < blocks; base += PREFETCH) {
        load_round(base);
        compute_round(base);
    }
    // The warps' partial sums, summed in warp order by warp 0.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        partial[warp][0][e][lane] = da[e];
        if (PAIR) partial[warp][PAIR ? 1 : 0][e][lane] = db[e];
    }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float sa = partial[0][0][e][lane], sb = PAIR ? partial[0][PAIR ? 1 : 0][e][lane] : 0.0f;
        for (u32 v = 1; v < warps; ++v) {
            sa += partial[v][0][e][lane];
            if (PAIR) sb += partial[v][PAIR ? 1 : 0][e][lane];
        }
        // d[e]: row g (e < 2) or g + 8, column 2t + (e & 1) of the block's 8.
        const u32 r = g + (e >= 2 ? 8 : 0);
        const u32 c = blockIdx.x * 8 + 2 * t + (e & 1);
        if (r < r_n && c < n) {
            const float y = PAIR ? sa / (1.0f + expf(-sa)) * sb : sa + (bias ? __bfloat162float(bias[c]) : 0.0f);
            out[(u64)r * n + c] = y;
            if (out_b) out_b[(u64)r * n + c] = __float2bfloat16_rn(y);
        }
    }
}

extern "C" __global__ void __launch_bounds__(512)
    linear_rows_bf16(const bf16* x, const bf16* w0, const bf16* w1, const bf16* bias, float* out, bf16* out_b,
                     u32 rows, u32 n, u32 k) {
    if (w1)
        linear_rows_impl<true>(x, w0, w1, nullptr, out, out_b, rows, n, k);
    else
        linear_rows_impl<false>(x, w0, nullptr, bias, out, out_b, rows, n, k);
}
