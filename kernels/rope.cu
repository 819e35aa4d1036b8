// rope.cu — rotary positions on Q and K in place (HF rotate-half layout), one position per row;
// optionally Qwen3's per-head RMSNorm before the rotation, and the KV-arena store after it.
//
// Mirrors, in order (src/model/forward.rs):
//   Qwen3 only: `Backend::rmsnorm(q, q_norm, eps, D)` and the same for k   (q_norm / k_norm)
//   `Backend::rope(q, H, rows, table)` and `Backend::rope(k, Hkv, rows, table)`
//   optionally `Backend::kv_store(kv, layer, k, v, rows)`                 (k_cache / v_cache)
// For head vector x of row t (pos = rows[t].pos, half = D / 2, i < half), with the host's
// `RopeTable` (src/model/rope.rs) uploaded as is:
//   x'[i]        = x[i] * cos[pos, i] - x[i + half] * sin[pos, i]
//   x'[i + half] = x[i + half] * cos[pos, i] + x[i] * sin[pos, i]
//
// Symbols: rope_f32(RopeParams<float>), rope_bf16(RopeParams<bf16>).
// Parameters (RopeParams; the Rust side mirrors it as a #[repr(C)] struct, field for field):
//   q        [T, H * D]   T     rotated in place
//   k        [T, Hkv * D] T     rotated in place
//   rows     [T]          RowKv pos: rotary position; entry: where the KV store writes
//   cos, sin [max_pos, D/2] f32 the host's RopeTable
//   q_norm, k_norm [D]    bf16  Qwen3 q_norm / k_norm weights, or null (no norm)
//   v        [T, Hkv * D] T     values to store, or null (no store)
//   k_cache, v_cache [entries, Hkv * D] T  this layer's K and V blocks of the arena, or null
//   q_out    [T, H * D]   T     where rotated q heads go, or null (in place)
//   n_rows (T), heads (H), kv_heads (Hkv), head_dim (D: even, <= 1024), max_pos, entries, eps
//   row_stride            u32   0: q, k, v are separate [T, heads * D] buffers; else the values
//                               between rows of all three: one GEMM's packed [T, (H + 2 Hkv) D]
//                               output for the concatenated [q_proj; k_proj; v_proj] weight,
//                               with q, k, v pointing at its three column blocks
// Launch: one warp per (row, head) over the H + Hkv heads of each row:
//   grid (ceil(T * (H + Hkv) / 4)), block 128.
// A position >= max_pos turns that head (and its stored K/V) into NaN; an entry >= entries skips
// the store (the host refuses both before they get here).

#include "common.cuh"

template <typename T>
struct RopeParams {
    T* q;
    T* k;
    const RowKv* rows;
    const float* cos;
    const float* sin;
    const bf16* q_norm;
    const bf16* k_norm;
    const T* v;
    T* k_cache;
    T* v_cache;
    T* q_out;
    u32 n_rows;
    u32 heads;
    u32 kv_heads;
    u32 head_dim;
    u32 max_pos;
    u32 entries;
    float eps;
    u32 row_stride;
};

template <typename T>
__device__ __forceinline__ void rope_impl(const RopeParams<T>& p) {
    const u32 lane = threadIdx.x & 31;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u32 per_row = p.heads + p.kv_heads;
    if (warp >= (u64)p.n_rows * per_row) return;  // whole warp: lanes share `warp`
    const u32 t = (u32)(warp / per_row), h = (u32)(warp % per_row);
    const bool is_q = h < p.heads;
    const u32 D = p.head_dim, half = D / 2;
    const u64 q_row = p.row_stride ? p.row_stride : (u64)p.heads * D;
    const u64 kv_row = p.row_stride ? p.row_stride : (u64)p.kv_heads * D;
    T* x = is_q ? p.q + (u64)t * q_row + (u64)h * D : p.k + (u64)t * kv_row + (u64)(h - p.heads) * D;
    // Where the rotated head goes: q_out for q heads when given, else in place.
    T* xo = is_q && p.q_out ? p.q_out + ((u64)t * p.heads + h) * D : x;
    const bf16* norm = is_q ? p.q_norm : p.k_norm;
    const RowKv row = p.rows[t];

    // The KV store, for K heads when asked for and the entry is inside the arena.
    const bool store = !is_q && p.k_cache && p.v_cache && p.v && row.entry < p.entries;
    T* kc = nullptr;
    T* vc = nullptr;
    const T* vs = nullptr;
    if (store) {
        const u32 g = h - p.heads;
        kc = p.k_cache + kv_offset(row.entry, p.kv_heads, g, D);
        vc = p.v_cache + kv_offset(row.entry, p.kv_heads, g, D);
        vs = p.v + (u64)t * kv_row + (u64)g * D;
        for (u32 i = lane; i < D; i += 32) vc[i] = vs[i];
    }

    if (row.pos >= p.max_pos) {
        const T bad = from_f32<T>(gram_nan());
        for (u32 i = lane; i < D; i += 32) {
            xo[i] = bad;
            if (store) kc[i] = bad;
        }
        return;
    }

    // Qwen3: RMSNorm over the head (HF: weight * (x * rsqrt(mean(x^2) + eps)), f32).
    float inv = 1.0f;
    if (norm) {
        float ss = 0.0f;
        for (u32 i = lane; i < D; i += 32) {
            const float v = to_f32(x[i]);
            ss += v * v;
        }
        inv = 1.0f / sqrtf(warp_sum(ss) / (float)D + p.eps);
    }

    const float* c = p.cos + (u64)row.pos * half;
    const float* s = p.sin + (u64)row.pos * half;
    for (u32 i = lane; i < half; i += 32) {
        float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
        if (norm) {
            x1 = to_f32(norm[i]) * (x1 * inv);
            x2 = to_f32(norm[i + half]) * (x2 * inv);
        }
        const T r1 = from_f32<T>(x1 * c[i] - x2 * s[i]);
        const T r2 = from_f32<T>(x2 * c[i] + x1 * s[i]);
        // Each lane reads and writes only its own pairs (i, i + half): no hazard in place.
        xo[i] = r1;
        xo[i + half] = r2;
        if (store) {
            kc[i] = r1;
            kc[i + half] = r2;
        }
    }
}

extern "C" __global__ void rope_f32(RopeParams<float> p) { gram_pdl_entry(); rope_impl<float>(p); }
extern "C" __global__ void rope_bf16(RopeParams<bf16> p) { gram_pdl_entry(); rope_impl<bf16>(p); }
