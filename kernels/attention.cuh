// attention.cuh — what the two attention kernels share: their parameter struct (mirrored by a
// #[repr(C)] struct on the Rust side) and the q·k dot products.
//
// Both compute, for each batch row t and query head h (KV head g = h / G, G = H / Hkv), exactly
// what `cpu::attention::attention` does:
//   out[t, h] = softmax_j(q[t, h] · K[e_j, g] * scale) · V[e_j, g]   over e_j in context(t)
// where context(t) = rows[t].span_begin..span_end, then links[link_begin..link_end]
// (`KvRows::context`), scale = 1/sqrt(D), an empty context gives 0, and the softmax is an online
// one (running max m, running sum l, output rescaled by exp(m_old - m_new)) in f32.
#pragma once

#include "common.cuh"

template <typename T>
struct AttnParams {
    const T* q;           // [T, H * D]
    T* out;               // [T, H * D]
    const T* k_cache;     // [entries, Hkv * D]: this layer's K block of the arena
    const T* v_cache;     // [entries, Hkv * D]
    const RowKv* rows;    // [T]
    const u32* links;     // [n_links]
    const u32* groups;    // [n_groups + 1]: row ranges, CSR (prefill: tiles; decode: span groups)
    float* part_o;        // decode with n_chunks > 1: [n_chunks, T, H, D] f32, else unused
    float* part_ml;       // decode with n_chunks > 1: [n_chunks, T, H, 2] f32 (m, l), else unused
    bf16* out_b;          // [T, H * D] or null: out rounded to bf16 as well (the o_proj GEMM's operand)
    u32 n_rows;           // T
    u32 n_links;
    u32 n_groups;
    u32 entries;          // rows of k_cache / v_cache
    u32 heads;            // H
    u32 kv_heads;         // Hkv (divides H)
    u32 rows_per_block;   // decode: rows of a group one block takes
    u32 row_slices;       // decode: ceil(largest group / rows_per_block); grid.y = Hkv * row_slices
    u32 n_chunks;         // decode: split of the shared span (grid.z); 1 = none
    float scale;          // 1 / sqrt(D)
};

// KV head of query head h; clamped so that a malformed (H, Hkv) cannot index out of bounds.
__device__ __forceinline__ u32 kv_head_of(u32 h, u32 heads, u32 kv_heads) {
    const u32 group = kv_heads ? heads / kv_heads : 1u;
    const u32 g = group ? h / group : 0u;
    return g < kv_heads ? g : kv_heads - 1;
}

// q (f32, shared memory, read as a broadcast) · one K row of D values.
template <int D>
__device__ __forceinline__ float dot_q(const float* q, const float* k) {
    float acc = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) acc = fmaf(q[d], k[d], acc);
    return acc;
}
template <int D>
__device__ __forceinline__ float dot_q(const float* q, const bf16* k) {
    const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(k);
    float acc = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D / 2; ++d) {
        const float2 kf = __bfloat1622float2(k2[d]);
        acc = fmaf(q[2 * d], kf.x, acc);
        acc = fmaf(q[2 * d + 1], kf.y, acc);
    }
    return acc;
}
// The same against a K row in global memory, 8 values (16 bytes for bf16) per load; `k` must be
// 16-byte aligned (D a multiple of 8, arena from cudaMalloc).
template <int D, typename T>
__device__ __forceinline__ float dot_q_global(const float* q, const T* k) {
    float acc = 0.0f;
#pragma unroll 4
    for (int d = 0; d < D; d += 8) {
        float kv[8];
        load8(k + d, kv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(q[d + i], kv[i], acc);
    }
    return acc;
}
