// attention_decode.cu — beam decode attention over the KV arena: each row (one running beam)
// reads its contiguous span — the query's prompt KV, shared by all its beams and read ONCE per
// block for all of them — then its own link entries (its ancestors' code-token KV, reached
// through the per-beam link lists, parent pointers rather than copies), all merged by one online
// softmax. Optional split-K over the shared span (grid.z chunks + attention_decode_merge).
//
// Mirrors `Backend::attention` / `cpu::attention::attention` (src/backend/cpu/attention.rs) for
// any rows (see attention.cuh for the formula): the grouping below only decides what is read
// once, never what is computed. The CPU computes one softmax over span + links; here the span
// tiles and the link tiles go through the same running (m, l) one after the other, and split
// chunks are merged as m = max m_c, l = sum l_c exp(m_c - m), o = sum o_c exp(m_c - m) / l.
//
// Symbols:
//   attention_decode_d{64,128}_{f32,bf16}(AttnParams<T> p)
//   attention_decode_merge_d{64,128}_{f32,bf16}(AttnParams<T> p)   (only when n_chunks > 1)
// Parameters (AttnParams, attention.cuh):
//   q [T, H * D] T; out [T, H * D] T; k_cache, v_cache [entries, Hkv * D] T (this layer);
//   rows [T] RowKv; links [n_links] u32;
//   groups [n_groups + 1] u32: group i is rows groups[i]..groups[i + 1] (a query's beams). The
//     group's first row's span is the shared span, kept in shared memory chunk by chunk; a row
//     of the group with another span reads its own span from global memory (correct, slower).
//   rows_per_block: rows of a group per block; row_slices = ceil(largest group / rows_per_block)
//   n_chunks: chunk c (block z = c) keeps keys c*CH..(c+1)*CH of the shared span in shared
//     memory (CH = 64 for bf16, 32 for f32); the last chunk also takes the span's keys past
//     n_chunks*CH (from global memory), the links, and any row's unshared span, so every
//     n_chunks >= 1 is correct and only speed depends on it (ceil(longest span / CH) is the
//     natural choice). With n_chunks == 1 the output is written directly; with more, each
//     chunk writes (m, l, o) partials to part_ml [n_chunks, T, H, 2] / part_o
//     [n_chunks, T, H, D] and attention_decode_merge writes out.
//   scale = 1/sqrt(D).
// Launch: attention_decode: grid (n_groups, Hkv * row_slices, n_chunks), block exactly 256 (8 warps;
//   a warp takes one (row, query head) pair at a time, the pairs of a block being its rows x the
//   G query heads of its KV head). attention_decode_merge: grid (ceil(T * H / 8)), block 256,
//   a warp per (row, head).
// Shared memory: CH x (D + 2) bf16 K + CH x D bf16 V + 8 x D f32 q = 37 KB at D = 128 (f32:
//   CH = 32, K stride D + 1: 37 KB).
// An entry >= entries (or a link index >= n_links) in a row's context gives that row NaN.
//
// Performance notes: the prompt of a GRAM query (~32 tokens) fits one chunk, so n_chunks = 1
// and no merge pass; rows_per_block trades prompt re-reads (one per block) against blocks to
// fill the SMs; the host takes floor(8 / G) by default, so that each warp has one (row, head)
// pair (batch 1, beam 10, Hkv 2, G 7: 1 row a block, 20 blocks; `GRAM_CUDA_DECODE_ROWS`). A block is a chain of latencies (chunk
// load, q·K, softmax, P·V, then the links from global memory), so every load of a step is
// issued before its results are used: the chunk as 16-byte loads, the V rows of 8 keys at once
// (on an H100 this kernel took 12 µs a layer at SmolLM2's shape before, ncu). Link keys are
// read lane-per-key from global memory (16-byte loads), V rows coalesced per key.

#include "attention.cuh"

#define DC_THREADS 256
#define DC_WARPS (DC_THREADS / 32)
// Keys whose V values one lane loads together in the P·V loops.
#define PV_GROUP 8

// Keys of the shared span per chunk, and the K row stride in shared memory: the stride makes
// lane j's reads of row j fall in distinct banks (odd number of 32-bit words per row).
template <typename T> struct DecodeTile;
template <> struct DecodeTile<bf16> {
    static constexpr u32 CH = 64;
    template <int D> __host__ __device__ static constexpr u32 kstride() { return D + 2; }
};
template <> struct DecodeTile<float> {
    static constexpr u32 CH = 32;
    template <int D> __host__ __device__ static constexpr u32 kstride() { return D + 1; }
};

// One warp's running softmax state for a (row, head) pair; lane holds dims lane + 32 * c.
template <int D>
struct WarpState {
    float m, l;
    float o[D / 32];
    bool bad;
};

// Keys from the shared-memory chunk: ks [CH][KS] and vs [CH][D], keys 0..n.
template <typename T, int D, u32 KS>
__device__ __forceinline__ void attend_shared(WarpState<D>& st, const float* q, const T* ks, const T* vs,
                                              u32 n, float scale) {
    const u32 lane = threadIdx.x & 31;
    for (u32 jt = 0; jt < n; jt += 32) {
        const u32 j = jt + lane;
        const float s = j < n ? dot_q<D>(q, ks + j * KS) * scale : gram_neg_inf();
        float alpha;
        const float pr = softmax_step(st.m, st.l, s, alpha);
#pragma unroll
        for (int c = 0; c < D / 32; ++c) st.o[c] *= alpha;
        const u32 cnt = min(32u, n - jt);  // uniform
        // PV_GROUP keys at a time: their V values are all loaded before the FMAs (in key order).
        for (u32 j0 = 0; j0 < cnt; j0 += PV_GROUP) {
            float pv[PV_GROUP], vv[PV_GROUP][D / 32];
#pragma unroll
            for (int i = 0; i < PV_GROUP; ++i) {
                const u32 jj = j0 + i;
                const float pj = __shfl_sync(GRAM_FULL_MASK, pr, jj & 31);
                pv[i] = jj < cnt ? pj : 0.0f;
                const T* v = vs + (jt + (jj < cnt ? jj : 0u)) * D;
#pragma unroll
                for (int c = 0; c < D / 32; ++c) vv[i][c] = jj < cnt ? to_f32(v[lane + 32 * c]) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < PV_GROUP; ++i) {
#pragma unroll
                for (int c = 0; c < D / 32; ++c) st.o[c] = fmaf(pv[i], vv[i][c], st.o[c]);
            }
        }
    }
}

// Keys from global memory: key j is entry `span_first + j` for j < span_n (a span), then
// links[link_first + j - span_n] for the next link_n keys (an index >= n_links is a bad entry).
template <typename T, int D>
__device__ __forceinline__ void attend_global(WarpState<D>& st, const float* q, const AttnParams<T>& p,
                                              u32 g, u32 span_first, u32 span_n, u32 link_first,
                                              u32 link_n) {
    const u32 lane = threadIdx.x & 31;
    const u32 n = span_n + link_n;
    for (u32 jt = 0; jt < n; jt += 32) {
        const u32 j = jt + lane;
        u32 e = GRAM_NONE;
        if (j < span_n) {
            e = span_first + j;  // the caller keeps span_first + span_n inside u32
        } else if (j < n) {
            const u64 li = (u64)link_first + (j - span_n);
            e = li < p.n_links ? p.links[li] : GRAM_NONE;
        }
        const bool bad_key = j < n && e >= p.entries;
        st.bad = st.bad || bad_key;
        const bool use = j < n && !bad_key;
        const float s = use ? dot_q_global<D>(q, p.k_cache + kv_offset(use ? e : 0u, p.kv_heads, g, D)) * p.scale
                            : gram_neg_inf();
        float alpha;
        const float pr = softmax_step(st.m, st.l, s, alpha);
#pragma unroll
        for (int c = 0; c < D / 32; ++c) st.o[c] *= alpha;
        const u32 cnt = min(32u, n - jt);  // uniform
        // PV_GROUP keys at a time: their V loads are in flight together (one latency, not
        // PV_GROUP), then the FMAs in key order.
        for (u32 j0 = 0; j0 < cnt; j0 += PV_GROUP) {
            float pv[PV_GROUP], vv[PV_GROUP][D / 32];
#pragma unroll
            for (int i = 0; i < PV_GROUP; ++i) {
                const u32 jj = j0 + i;
                const float pj = __shfl_sync(GRAM_FULL_MASK, pr, jj & 31);
                const u32 ej = __shfl_sync(GRAM_FULL_MASK, e, jj & 31);
                // A bad key has pj == 0 exactly: its V row (maybe past the arena) is never read.
                const bool live = jj < cnt && pj != 0.0f;
                pv[i] = live ? pj : 0.0f;
                const T* v = p.v_cache + kv_offset(live ? ej : 0u, p.kv_heads, g, D);
#pragma unroll
                for (int c = 0; c < D / 32; ++c) vv[i][c] = live ? to_f32(v[lane + 32 * c]) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < PV_GROUP; ++i) {
#pragma unroll
                for (int c = 0; c < D / 32; ++c) st.o[c] = fmaf(pv[i], vv[i][c], st.o[c]);
            }
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void decode_impl(const AttnParams<T>& p) {
    static_assert(D % 32 == 0 && D <= 128, "head dim: a multiple of 32, at most 128");
    constexpr u32 CH = DecodeTile<T>::CH;
    constexpr u32 KS = DecodeTile<T>::template kstride<D>();
    __shared__ __align__(16) T ks[CH * KS];
    __shared__ __align__(16) T vs[CH * D];
    __shared__ float qw[DC_WARPS][D];
    __shared__ u32 pair_s[DC_WARPS];

    // Uniform in the block. qw has one row per warp of DC_THREADS.
    if (blockDim.x != DC_THREADS || p.kv_heads == 0 || p.heads < p.kv_heads || p.row_slices == 0 ||
        p.rows_per_block == 0 || p.n_chunks == 0)
        return;
    const u32 group = blockIdx.x, slice = blockIdx.y % p.row_slices, kvh = blockIdx.y / p.row_slices;
    const u32 chunk = blockIdx.z;
    if (group >= p.n_groups || kvh >= p.kv_heads || chunk >= p.n_chunks) return;  // uniform
    const u32 g0 = p.groups[group], g1 = min(p.groups[group + 1], p.n_rows);
    const u64 b0_wide = (u64)g0 + (u64)slice * p.rows_per_block;
    if (b0_wide >= g1) return;  // an empty slice: uniform
    const u32 b0 = (u32)b0_wide, b1 = (u32)min((u64)g1, b0_wide + p.rows_per_block);
    const bool last = chunk + 1 == p.n_chunks;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 G = p.heads / p.kv_heads;

    // This block's chunk of the shared span, into shared memory (zeros past its end).
    const RowKv lead = p.rows[g0];
    const u32 span_len = row_span_len(lead);
    const u64 c0 = (u64)chunk * CH;
    const u32 c_len = c0 < span_len ? (u32)min((u64)CH, span_len - c0) : 0u;
    // A chunk wholly past a shorter span reads nothing and is not bad (its end may pass the
    // arena's when the span ends near it).
    const bool chunk_bad = c_len > 0 && (u64)lead.span_begin + c0 + c_len > p.entries;
    // 16-byte loads, all of a thread's issued before any is stored (one latency, not eight).
    constexpr u32 E = 16 / sizeof(T);                  // values per load
    constexpr u32 PER = CH * D / E / DC_THREADS;       // loads per thread, of K and of V each
    static_assert(CH * D % (E * DC_THREADS) == 0, "the chunk splits evenly over the block");
    uint4 kr[PER], vr[PER];
#pragma unroll
    for (u32 i = 0; i < PER; ++i) {
        const u32 u = i * DC_THREADS + threadIdx.x, j = u / (D / E), d = u % (D / E) * E;
        const bool in = j < c_len && !chunk_bad;
        const u64 off = kv_offset(lead.span_begin + (u32)c0 + (in ? j : 0u), p.kv_heads, kvh, D) + d;
        kr[i] = in ? *reinterpret_cast<const uint4*>(p.k_cache + off) : make_uint4(0, 0, 0, 0);
        vr[i] = in ? *reinterpret_cast<const uint4*>(p.v_cache + off) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (u32 i = 0; i < PER; ++i) {
        const u32 u = i * DC_THREADS + threadIdx.x, j = u / (D / E), d = u % (D / E) * E;
        const T* kt = reinterpret_cast<const T*>(&kr[i]);
        const T* vt = reinterpret_cast<const T*>(&vr[i]);
#pragma unroll
        for (u32 e = 0; e < E; ++e) {
            ks[j * KS + d + e] = kt[e];
            vs[j * D + d + e] = vt[e];
        }
    }
    __syncthreads();

    const u64 q_stride = (u64)p.heads * D;
    const u32 n_pairs = (b1 - b0) * G;
    for (u32 pair = warp; pair < n_pairs; pair += DC_WARPS) {
        const u32 t = b0 + pair / G, h = kvh * G + pair % G;
        const RowKv row = p.rows[t];
        __syncwarp();  // the previous pair is done reading qw[warp] and pair_s[warp]
        if (lane == 0) pair_s[warp] = pair;
        for (u32 d = lane; d < D; d += 32) qw[warp][d] = to_f32(p.q[(u64)t * q_stride + (u64)h * D + d]);
        __syncwarp();

        WarpState<D> st;
        st.m = gram_neg_inf();
        st.l = 0.0f;
        st.bad = false;
#pragma unroll
        for (int c = 0; c < D / 32; ++c) st.o[c] = 0.0f;

        // What this (row, chunk) reads: its part of the shared span from shared memory; in the
        // last chunk, the span's keys past the chunks (or the row's own span, when it is not
        // the group's) and its links from global memory. Straight-line calls (n = 0 reads
        // nothing) keep the control flow simple around the warp shuffles.
        const bool shared_span = row.span_begin == lead.span_begin && row.span_end == lead.span_end;
        const u64 covered = (u64)p.n_chunks * CH;
        u32 smem_n = 0, span_first = 0, span_n = 0;
        if (shared_span) {
            st.bad = chunk_bad;
            smem_n = chunk_bad ? 0u : c_len;
            if (last && span_len > covered) {
                span_first = lead.span_begin + (u32)covered;
                span_n = span_len - (u32)covered;
            }
        } else if (last) {
            span_first = row.span_begin;
            span_n = row_span_len(row);
        }
        const u32 link_n = last ? row_link_len(row) : 0u;
        attend_shared<T, D, KS>(st, qw[warp], ks, vs, smem_n, p.scale);
        attend_global<T, D>(st, qw[warp], p, kvh, span_first, span_n, row.link_begin, link_n);

        const bool poisoned = lane_any(st.bad);
        // (t, h) again, from shared memory: keeping them (and the q offset) in registers across
        // the attention loops makes ptxas spill them at D = 128.
        const u32 pair_again = *reinterpret_cast<volatile const u32*>(&pair_s[warp]);
        const u32 t_out = b0 + pair_again / G, h_out = kvh * G + pair_again % G;
        if (p.n_chunks == 1) {
            const float inv = softmax_inv(st.l);  // empty context: 0, as the CPU
            const u64 o_off = (u64)t_out * q_stride + (u64)h_out * D;
#pragma unroll
            for (int c = 0; c < D / 32; ++c) {
                const float y = poisoned ? gram_nan() : st.o[c] * inv;
                p.out[o_off + lane + 32 * c] = from_f32<T>(y);
                if (p.out_b) p.out_b[o_off + lane + 32 * c] = __float2bfloat16_rn(y);
            }
        } else {
            const u64 pi = ((u64)chunk * p.n_rows + t_out) * p.heads + h_out;
            if (lane == 0) {
                p.part_ml[2 * pi] = st.m;
                p.part_ml[2 * pi + 1] = poisoned ? gram_nan() : st.l;
            }
#pragma unroll
            for (int c = 0; c < D / 32; ++c) p.part_o[pi * D + lane + 32 * c] = st.o[c];
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void decode_merge_impl(const AttnParams<T>& p) {
    const u32 lane = threadIdx.x & 31;
    const u64 pair = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 pairs = (u64)p.n_rows * p.heads;
    if (pair >= pairs) return;  // whole warp
    float m = gram_neg_inf();
    bool bad = false;  // a chunk read a bad entry: NaN out, even when no chunk has a key
    for (u32 c = 0; c < p.n_chunks; ++c) {
        const u64 pi = c * pairs + pair;
        m = max_nan(m, p.part_ml[2 * pi]);
        bad |= isnan(p.part_ml[2 * pi + 1]);
    }
    float l = 0.0f, o[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; ++i) o[i] = 0.0f;
    if (m != gram_neg_inf()) {
        for (u32 c = 0; c < p.n_chunks; ++c) {
            const u64 pi = c * pairs + pair;
            const float mc = p.part_ml[2 * pi], lc = p.part_ml[2 * pi + 1];
            const float w = mc == gram_neg_inf() ? 0.0f : expf(mc - m);
            l = fmaf(lc, w, l);  // a NaN l (a bad entry) stays NaN
            if (w != 0.0f) {
#pragma unroll
                for (int i = 0; i < D / 32; ++i) o[i] = fmaf(p.part_o[pi * D + lane + 32 * i], w, o[i]);
            }
        }
    }
    const float inv = softmax_inv(l);
    const u64 o_off = pair * D;  // [T, H, D] row-major: (t * H + h) * D
#pragma unroll
    for (int i = 0; i < D / 32; ++i) {
        const float y = bad ? gram_nan() : o[i] * inv;
        p.out[o_off + lane + 32 * i] = from_f32<T>(y);
        if (p.out_b) p.out_b[o_off + lane + 32 * i] = __float2bfloat16_rn(y);
    }
}

extern "C" __global__ void __launch_bounds__(DC_THREADS) attention_decode_d64_f32(AttnParams<float> p) {
    gram_pdl_entry();
    decode_impl<float, 64>(p);
}
extern "C" __global__ void __launch_bounds__(DC_THREADS) attention_decode_d64_bf16(AttnParams<bf16> p) {
    gram_pdl_entry();
    decode_impl<bf16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(DC_THREADS) attention_decode_d128_f32(AttnParams<float> p) {
    gram_pdl_entry();
    decode_impl<float, 128>(p);
}
extern "C" __global__ void __launch_bounds__(DC_THREADS) attention_decode_d128_bf16(AttnParams<bf16> p) {
    gram_pdl_entry();
    decode_impl<bf16, 128>(p);
}
extern "C" __global__ void attention_decode_merge_d64_f32(AttnParams<float> p) { gram_pdl_entry(); decode_merge_impl<float, 64>(p); }
extern "C" __global__ void attention_decode_merge_d64_bf16(AttnParams<bf16> p) { gram_pdl_entry(); decode_merge_impl<bf16, 64>(p); }
extern "C" __global__ void attention_decode_merge_d128_f32(AttnParams<float> p) { gram_pdl_entry(); decode_merge_impl<float, 128>(p); }
extern "C" __global__ void attention_decode_merge_d128_bf16(AttnParams<bf16> p) { gram_pdl_entry(); decode_merge_impl<bf16, 128>(p); }
