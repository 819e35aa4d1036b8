// attention_prefill.cu — prefill attention, flash style: causal GQA over the KV arena with an
// online softmax over key tiles held in shared memory.
//
// Mirrors `Backend::attention` / `cpu::attention::attention` (src/backend/cpu/attention.rs) for
// the rows of a prompt: see attention.cuh for the formula. Causality is the rows' own: row t
// attends to the row_context_len(rows[t]) entries of its context, and the prompt rows of one
// sequence have contexts that are prefixes of one another (`RowKv::contiguous(base, i)`, or the
// shared-prefix form: span (0, shared) + links[start..start + i + 1]). A tile of rows therefore
// shares its K/V tiles: they are read once per tile along the context of the tile's longest row.
//
// Symbols: attention_prefill_d{64,128}_{f32,bf16}(AttnParams<T> p)   (D = 64 or 128)
// Parameters (AttnParams, attention.cuh):
//   q [T, H * D] T; out [T, H * D] T; k_cache, v_cache [entries, Hkv * D] T (this layer);
//   rows [T] RowKv; links [n_links] u32;
//   groups [n_groups + 1] u32: tile i is rows groups[i]..groups[i + 1], consecutive rows of ONE
//     sequence in position order (any length: the block walks it 16 rows at a time; tiles of at
//     most 16 rows give the most blocks). Every row of a tile must attend to a prefix of the
//     context of the tile's longest row (same span_begin; links, if any, from the same
//     link_begin after a span of the same length); a row that does not gets NaN output.
//   scale = 1/sqrt(D); part_o / part_ml / rows_per_block / row_slices / n_chunks unused.
// Launch: grid (n_groups, H), block exactly 128 (4 warps x 4 rows; one key per lane of a 32-key
// tile; another block size writes nothing).
// Shared memory: 16 x D (q) + 32 x (D + 1) (K) + 32 x D (V) f32 = 41 KB at D = 128 (static).
// An entry >= entries (or a link index >= n_links) in a row's context gives that row NaN.
//
// Performance notes: CUDA cores only (the prefill of a 32-token query is a small part of a
// search); the next step is mma.sync / wgmma tiles with bf16 K/V in shared memory, and one block
// per (tile, KV head) so that the G query heads of a group share the K/V tile.

#include "attention.cuh"

#define PF_BQ 16       // rows per tile
#define PF_BK 32       // keys per K/V tile: one per lane
#define PF_THREADS 128
#define PF_RPW (PF_BQ / (PF_THREADS / 32))  // rows per warp

// Row r attends to a prefix of the reference row's context (see the header).
__device__ __forceinline__ bool prefill_compatible(const RowKv& r, const RowKv& ref) {
    if (r.span_end < r.span_begin || r.link_end < r.link_begin) return false;
    const u32 sr = row_span_len(r), sf = row_span_len(ref);
    if (sr > sf) return false;
    if (sr > 0 && r.span_begin != ref.span_begin) return false;
    if (row_link_len(r) == 0) return true;
    return sr == sf && r.link_begin == ref.link_begin;
}

template <typename T, int D>
__device__ __forceinline__ void prefill_impl(const AttnParams<T>& p) {
    static_assert(D % 32 == 0 && D <= 128, "head dim: a multiple of 32, at most 128");
    constexpr int DL = D / 32;  // output dims per lane: lane + 32 * c
    __shared__ float qs[PF_BQ][D];
    __shared__ float ks[PF_BK][D + 1];  // +1: lane j reads row j, conflict-free
    __shared__ float vs[PF_BK][D];
    __shared__ u32 ent[PF_BK];
    __shared__ u32 ctx[PF_BQ];
    __shared__ u32 ok[PF_BQ];
    __shared__ RowKv ref_s;
    __shared__ u32 kv_len_s;

    const u32 tile = blockIdx.x, h = blockIdx.y;
    // Uniform in the block. The row-to-warp mapping needs exactly PF_THREADS threads.
    if (blockDim.x != PF_THREADS || tile >= p.n_groups || h >= p.heads || p.kv_heads == 0) return;
    const u32 g = kv_head_of(h, p.heads, p.kv_heads);
    const u32 r0 = p.groups[tile];
    const u32 r1 = min(p.groups[tile + 1], p.n_rows);
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u64 q_stride = (u64)p.heads * D;

    for (u32 base = r0; base < r1; base += PF_BQ) {
        const u32 nq = min((u32)PF_BQ, r1 - base);
        __syncthreads();  // the previous sub-tile is done with shared memory
        for (u32 i = threadIdx.x; i < PF_BQ * D; i += blockDim.x) {
            const u32 r = i / D, d = i % D;
            qs[r][d] = r < nq ? to_f32(p.q[(u64)(base + r) * q_stride + (u64)h * D + d]) : 0.0f;
        }
        if (threadIdx.x < PF_BQ)
            ctx[threadIdx.x] = threadIdx.x < nq ? row_context_len(p.rows[base + threadIdx.x]) : 0u;
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 best = 0;
            for (u32 r = 1; r < nq; ++r)
                if (ctx[r] > ctx[best]) best = r;
            ref_s = p.rows[base + best];
            kv_len_s = ctx[best];
        }
        __syncthreads();
        const RowKv ref = ref_s;
        const u32 kv_len = kv_len_s;
        if (threadIdx.x < PF_BQ)
            ok[threadIdx.x] = threadIdx.x < nq && prefill_compatible(p.rows[base + threadIdx.x], ref);
        __syncthreads();

        float m[PF_RPW], l[PF_RPW], o[PF_RPW][DL];
        bool bad[PF_RPW];
#pragma unroll
        for (int rr = 0; rr < PF_RPW; ++rr) {
            m[rr] = gram_neg_inf();
            l[rr] = 0.0f;
            bad[rr] = false;
#pragma unroll
            for (int c = 0; c < DL; ++c) o[rr][c] = 0.0f;
        }

        for (u32 kt = 0; kt < kv_len; kt += PF_BK) {
            __syncthreads();  // the previous key tile is done with ks / vs / ent
            if (threadIdx.x < PF_BK) {
                const u32 j = kt + threadIdx.x;
                ent[threadIdx.x] = j < kv_len ? row_context_entry(ref, p.links, p.n_links, j) : GRAM_NONE;
            }
            __syncthreads();
            for (u32 i = threadIdx.x; i < PF_BK * D; i += blockDim.x) {
                const u32 j = i / D, d = i % D, e = ent[j];
                float kv = 0.0f, vv = 0.0f;
                if (e < p.entries) {
                    const u64 off = kv_offset(e, p.kv_heads, g, D) + d;
                    kv = to_f32(p.k_cache[off]);
                    vv = to_f32(p.v_cache[off]);
                }
                ks[j][d] = kv;
                vs[j][d] = vv;
            }
            __syncthreads();
            const u32 e_lane = ent[lane];  // key kt + lane
#pragma unroll
            for (int rr = 0; rr < PF_RPW; ++rr) {
                const u32 r = warp * PF_RPW + rr;
                if (r >= nq || !ok[r]) continue;  // uniform in the warp
                const u32 n_ctx = ctx[r];
                const bool in_ctx = kt + lane < n_ctx;
                const bool bad_key = in_ctx && e_lane >= p.entries;
                bad[rr] = bad[rr] || bad_key;
                const float s = (in_ctx && !bad_key) ? dot_q<D>(qs[r], ks[lane]) * p.scale : gram_neg_inf();
                float alpha;
                const float pr = softmax_step(m[rr], l[rr], s, alpha);
#pragma unroll
                for (int c = 0; c < DL; ++c) o[rr][c] *= alpha;
                const u32 n_keys = n_ctx > kt ? min((u32)PF_BK, n_ctx - kt) : 0u;  // uniform
                for (u32 jj = 0; jj < n_keys; ++jj) {
                    const float pj = __shfl_sync(GRAM_FULL_MASK, pr, jj);
#pragma unroll
                    for (int c = 0; c < DL; ++c) o[rr][c] = fmaf(pj, vs[jj][lane + 32 * c], o[rr][c]);
                }
            }
        }

#pragma unroll
        for (int rr = 0; rr < PF_RPW; ++rr) {
            const u32 r = warp * PF_RPW + rr;
            if (r >= nq) continue;  // uniform in the warp
            const bool poisoned = !ok[r] || lane_any(bad[rr]);
            const float inv = softmax_inv(l[rr]);  // empty context: 0, as the CPU
            const u64 o_off = (u64)(base + r) * q_stride + (u64)h * D;
#pragma unroll
            for (int c = 0; c < DL; ++c) {
                const float y = poisoned ? gram_nan() : o[rr][c] * inv;
                p.out[o_off + lane + 32 * c] = from_f32<T>(y);
                if (p.out_b) p.out_b[o_off + lane + 32 * c] = __float2bfloat16_rn(y);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(PF_THREADS) attention_prefill_d64_f32(AttnParams<float> p) {
    gram_pdl_entry();
    prefill_impl<float, 64>(p);
}
extern "C" __global__ void __launch_bounds__(PF_THREADS) attention_prefill_d64_bf16(AttnParams<bf16> p) {
    gram_pdl_entry();
    prefill_impl<bf16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(PF_THREADS) attention_prefill_d128_f32(AttnParams<float> p) {
    gram_pdl_entry();
    prefill_impl<float, 128>(p);
}
extern "C" __global__ void __launch_bounds__(PF_THREADS) attention_prefill_d128_bf16(AttnParams<bf16> p) {
    gram_pdl_entry();
    prefill_impl<bf16, 128>(p);
}
