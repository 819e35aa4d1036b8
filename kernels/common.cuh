// common.cuh — what every gram kernel shares: scalar types, dtype conversion, 8-wide loads,
// warp/block reductions, the online-softmax update, and the KV-arena row descriptor (`RowKv`,
// mirror of `backend::RowKv`). Included by every `kernels/*.cu`; the host passes it to NVRTC as
// a named header (NVRTC needs `-I <CUDA include dir>` for `cuda_bf16.h`).
//
// Conventions of all kernels (see kernels/README.md):
// - Short names: T rows of a batch, C hidden, H / Hkv query / KV heads, D head dim, G = H / Hkv,
//   I MLP width, V vocab, B beams of a query, S beam slots of a batch.
// - Activations are `float` (f32 twin, for parity tests) or `bf16`; weights are always bf16;
//   every accumulation is f32. Symbols carry the activation dtype: `rmsnorm_f32`, `rmsnorm_bf16`.
// - Index arithmetic in 64 bits (`u64`) wherever a product of two sizes can pass 2^32.
// - A value the host should have refused (an id past the vocabulary, a position past the rotary
//   table, a KV entry past the arena) makes the affected outputs NaN: never an out-of-bounds
//   access, and a parity test sees it at once.
#pragma once

#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

#define GRAM_FULL_MASK 0xffffffffu
// "No node" / "no code" of the trie, and "no entry": mirrors `trie::NONE` (u32::MAX).
#define GRAM_NONE 0xffffffffu

__device__ __forceinline__ float gram_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float gram_nan() { return __int_as_float(0x7fc00000); }

// ---- programmatic dependent launch (Hopper and later) ------------------------------------------

// The host may launch a kernel while the kernel before it on the stream still runs (launch
// attribute "programmatic stream serialization", `GRAM_CUDA_PDL`): its blocks get scheduled
// early, and `griddepcontrol.wait` holds them until the previous grid has completed and its
// writes are visible. So every kernel calls `gram_pdl_wait` before it touches memory another
// kernel writes (the weights, written once at load, may be read before it), and
// `gram_pdl_trigger` lets the next kernel's blocks start as soon as every block of this one
// has passed the wait. Both are no-ops below sm_90 and for a kernel launched without the
// attribute.
__device__ __forceinline__ void gram_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void gram_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
// The entry of a kernel that reads nothing before the wait.
__device__ __forceinline__ void gram_pdl_entry() {
    gram_pdl_wait();
    gram_pdl_trigger();
}

// ---- dtype conversion -------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Eight consecutive values as f32. `p` must be 16-byte aligned (an element index that is a
// multiple of 8 in a buffer from cudaMalloc).
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float (&out)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // bf16 -> f32 is exact: the 16 bits are the top half of the f32.
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// ---- reductions (every lane of the warp / every thread of the block must call) ----------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(GRAM_FULL_MASK, v, o);
    return v;
}

// Max that propagates NaN (fmaxf drops it): a NaN score must poison the row, as on the CPU.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(GRAM_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ bool lane_any(bool p) { return __any_sync(GRAM_FULL_MASK, p); }

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32, at most
// 1024. `scratch` is 32 floats of shared memory, reusable right after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Exclusive prefix sum of one u32 per thread over the block; `total` gets the block's sum.
// blockDim.x a multiple of 32; `scratch` is 33 u32 of shared memory.
__device__ __forceinline__ u32 block_exclusive_scan(u32 v, u32* scratch, u32& total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(GRAM_FULL_MASK, x, o);
        if (lane >= (u32)o) x += y;
    }
    __syncthreads();  // a previous call's readers are done with scratch
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        const u32 t = lane < warps ? scratch[lane] : 0u;
        u32 incl = t;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(GRAM_FULL_MASK, incl, o);
            if (lane >= (u32)o) incl += y;
        }
        if (lane < warps) scratch[lane] = incl - t;
        if (lane == 31) scratch[32] = incl;
    }
    __syncthreads();
    total = scratch[32];
    return scratch[warp] + x - v;
}

// ---- online softmax ---------------------------------------------------------------------------

// One tile step of an online softmax held by a warp (m: running max, l: running sum of
// exp(score - m)); `s` is this lane's score (-inf for no key). Returns this lane's weight
// exp(s - m_new) and sets `alpha`, the factor the running output must be scaled by. While no
// key has been seen (m stays -inf) the weight is 0 and alpha 1.
__device__ __forceinline__ float softmax_step(float& m, float& l, float s, float& alpha) {
    const float m_new = max_nan(m, warp_max_nan(s));
    if (m_new == gram_neg_inf()) {  // uniform across the warp
        alpha = 1.0f;
        return 0.0f;
    }
    alpha = (m == gram_neg_inf()) ? 0.0f : expf(m - m_new);
    const float p = (s == gram_neg_inf()) ? 0.0f : expf(s - m_new);
    l = l * alpha + warp_sum(p);
    m = m_new;
    return p;
}

// 1 / l for the final normalization of an online softmax, 0 for an empty one (no key: the CPU
// writes zeros). Once a key is seen l >= 1 (the max key adds exp(0)), so the fast reciprocal
// (<= 2 ulp, exact IEEE division would call a slow path and make ptxas spill around it) is
// inside its range; a NaN l stays NaN.
__device__ __forceinline__ float softmax_inv(float l) { return l == 0.0f ? 0.0f : __fdividef(1.0f, l); }

// ---- the KV arena -----------------------------------------------------------------------------

// One batch row as the KV arena sees it: mirror of `backend::RowKv` (the Rust side must pass a
// `#[repr(C)]` struct with these six u32 in this order; Rust tuples have no fixed layout). The
// row writes its K/V at `entry` and attends to the entries `span_begin..span_end` followed by
// `links[link_begin..link_end]`; `pos` is its rotary position.
struct RowKv {
    u32 pos;
    u32 entry;
    u32 span_begin;
    u32 span_end;
    u32 link_begin;
    u32 link_end;
};

__device__ __forceinline__ u32 row_span_len(const RowKv& r) {
    return r.span_end > r.span_begin ? r.span_end - r.span_begin : 0u;
}
__device__ __forceinline__ u32 row_link_len(const RowKv& r) {
    return r.link_end > r.link_begin ? r.link_end - r.link_begin : 0u;
}
// Entries the row attends to (`RowKv::context_len`).
__device__ __forceinline__ u32 row_context_len(const RowKv& r) {
    return row_span_len(r) + row_link_len(r);
}
// The `j`-th entry of the row's context (`KvRows::context`), or GRAM_NONE when a link index
// falls outside the link table (the caller treats it as a bad entry).
__device__ __forceinline__ u32 row_context_entry(const RowKv& r, const u32* links, u32 n_links,
                                                 u32 j) {
    const u32 span = row_span_len(r);
    if (j < span) return r.span_begin + j;
    const u64 li = (u64)r.link_begin + (j - span);
    return li < n_links ? links[li] : GRAM_NONE;
}

// Offset of head `kv_head` of `entry` in one layer's K or V block `[entries, Hkv * D]`.
__device__ __forceinline__ u64 kv_offset(u32 entry, u32 kv_heads, u32 kv_head, u32 head_dim) {
    return ((u64)entry * kv_heads + kv_head) * head_dim;
}
