// beam_step.cu — the fused trie-masked beam step, on the device: per running beam the logits of
// its allowed tokens only (trie children, plus EOS where a code ends), normalized over the full
// vocabulary or over those tokens, plus the beam score; then, per query, the top 2B candidates,
// HF's finishing rules, the next trie nodes, and the rows of the next decoder step. Nothing
// goes to the host per step but, optionally, the small per-query BeamState.
//
// Mirrors src/beam/mod.rs (`logprob_rows`, `advance`) and src/beam/select.rs (`candidates`,
// `top_k`, `offer`, `logsumexp`) for constrained search (the trie on; unconstrained search, a
// measuring tool, stays on the CPU path):
//   allowed(node)  = child_token[child_start[node]..child_start[node + 1]], then EOS if
//                    code[node] != NONE (src/trie.rs CSR layout; the order does not matter)
//   Full:     lp(t) = logit(t) - logsumexp(logits row)           (HF: log-softmax, then mask)
//   Children: lp(t) = logit(t) - logsumexp(logit(a) for a in allowed(node))   (sparse head)
//   candidate      = (score = beam score + lp, beam j, token t, lp); an lp that is not finite
//                    (NaN, or -inf beside a +inf logit) stops the query with BEAM_ERR_NUMERIC,
//                    as the CPU's `finite_logprobs` fails the search
//   order          = score descending (f32 total order), then beam, then token ascending
//   top K = 2B; a candidate of rank < B that hits (t == EOS, or the length limit) is offered to
//   the B finished slots with score / len^penalty (len^penalty in f64, as Python); the first B
//   non-hitting ones run on; the query stays open unless its B finished slots are full and the
//   best running beam's score / len^penalty is not above the worst finished score.
//
// Kernels of one step, in order (all graph-capturable: shapes fixed, per-step state in device
// memory):
//   row_logsumexp_{f32,bf16}      full normalization: lse per logits row         [Full only]
//   beam_picks_count              pick offsets of every slot                     [sparse head]
//   beam_head_picks_{f32,bf16}    logit of every pick = hidden row · LM-head row [sparse head]
//   beam_select_{f32,bf16}        candidates, top 2B, finish / run, next nodes, history
//   beam_feed                     tokens, RowKv and link lists of the next decoder step
//
// Device state (the Rust side mirrors every struct as #[repr(C)]):
//   BeamQuery [n_queries]  per query, written once by the host
//   BeamState [n_queries]  per query, updated by the kernels; the host initializes it to
//                          {running 1, finished 0, gen_len 0, open 1, error 0,
//                           logit_row0 = the logits row of the query's last prompt row}
//   per slot (S = total slots; query q owns slots slot0..slot0 + B):
//     run_node, run_score [S]       the running beams (init: slot0 ← trie root 0, score 0)
//     hist_parent, hist_token, hist_logprob [max_steps, S]
//                                   hist[s][slot0 + i]: running beam i after step s came from
//                                   beam hist_parent of step s - 1 by hist_token (parent pointers:
//                                   a beam's tokens are read back by walking them)
//     fin_score, fin_step, fin_parent, fin_token, fin_logprob, fin_node [S]
//                                   the finished slots, best first: the sequence is beam
//                                   fin_parent's history up to step fin_step - 1, then fin_token
//                                   (EOS, or any token when cut at the limit) with fin_logprob;
//                                   fin_node is the trie node before the last token (its code).
// The host reads BeamState (a few bytes) to know when every query is done, then the fin_*
// arrays and the history once, and walks the parents.

#include "common.cuh"

#define BEAM_MAX 512         // beam::MAX_BEAM
#define SELECT_THREADS 512   // beam_select: one thread per beam of the widest query
#define SORT_MAX 2048        // top-K buffer: pow2(2 * BEAM_MAX) best + staging, a power of two

// BeamState.error: why a query was stopped by the device (0: it was not).
#define BEAM_ERR_PARAMS 1  // its BeamQuery / BeamState / launch is inconsistent
#define BEAM_ERR_NODE 2    // a running beam's trie node is out of range
#define BEAM_ERR_SOURCE 3  // no logits for its normalization (Full needs logits + row_lse)
#define BEAM_ERR_ROW 4     // a logits row past logit_rows
#define BEAM_ERR_LINKS 5   // beam_feed: a link list longer than link_stride, or a row past n_rows
#define BEAM_ERR_NUMERIC 6 // an allowed token's log-prob is not finite (the model's failure)

struct BeamQuery {
    u32 beam;            // B, 1..=BEAM_MAX
    u32 slot0;           // the query's slots are slot0..slot0 + B (disjoint between queries)
    u32 max_new_tokens;  // 1..=max_steps
    u32 normalize;       // 0: full vocabulary (HF), 1: over the allowed tokens
    // Used by beam_feed only:
    u32 prompt_len;      // rotary position of the first generated token
    u32 span_begin;      // the span every beam row attends first (the prompt, or the shared
    u32 span_end;        //   prefix: the query's own prompt entries are then its first links)
    u32 entry0;          // arena entry of beam j's token fed after step s: entry0 + s * B + j
    u32 pre_len;         // links at the head of every beam's list (own prompt entries, or 0);
                         //   the host writes them once into both link buffers
    u32 feed_row0;       // decoder batch row (and logits row) of slot j in decode steps:
                         //   feed_row0 + j (disjoint between queries)
};

struct BeamState {
    u32 running;     // running beams (0: done)
    u32 finished;    // finished slots taken (<= B)
    u32 gen_len;     // tokens generated by the running beams = steps done
    u32 open;        // HF's early-stop heuristic not yet satisfied
    u32 error;       // BEAM_ERR_* (0 none)
    u32 logit_row0;  // logits / hidden row of running beam 0 (beam j: + j)
};

// The trie's CSR arrays (src/trie.rs), uploaded as they are mapped.
struct BeamTrie {
    const u32* child_start;  // [nodes + 1]
    const u32* child_token;  // [edges], sorted within a node
    const u32* child_node;   // [edges]
    const u32* code;         // [nodes], GRAM_NONE where no code ends
    u32 nodes;
    u32 edges;
    u32 eos;
    u32 _pad;
};

struct BeamSlots {
    u32* run_node;        // [S]
    float* run_score;     // [S]
    u32* hist_parent;     // [max_steps, S]
    u32* hist_token;      // [max_steps, S]
    float* hist_logprob;  // [max_steps, S]
    float* fin_score;     // [S]
    u32* fin_step;        // [S]
    u32* fin_parent;      // [S]
    u32* fin_token;       // [S]
    float* fin_logprob;   // [S]
    u32* fin_node;        // [S]
    u32 total_slots;      // S
    u32 max_steps;        // rows of the history
};

// ---- trie helpers ------------------------------------------------------------------------------

// Children range of `node`; false when the node or its range is out of bounds.
__device__ __forceinline__ bool trie_range(const BeamTrie& t, u32 node, u32& begin, u32& end) {
    if (node >= t.nodes) return false;
    begin = t.child_start[node];
    end = t.child_start[node + 1];
    return begin <= end && end <= t.edges;
}
// Tokens a beam at `node` may take: its children, then EOS where a code ends.
__device__ __forceinline__ u32 allowed_count(const BeamTrie& t, u32 node) {
    u32 b, e;
    if (!trie_range(t, node, b, e)) return 0;
    return e - b + (t.code[node] != GRAM_NONE ? 1u : 0u);
}
// The k-th allowed token (k < allowed_count, node valid).
__device__ __forceinline__ u32 allowed_token(const BeamTrie& t, u32 node, u32 k) {
    const u32 b = t.child_start[node], n = t.child_start[node + 1] - b;
    return k < n ? t.child_token[b + k] : t.eos;
}
// `Trie::child`: the child of `node` along `token` (binary search), or GRAM_NONE.
__device__ __forceinline__ u32 trie_child(const BeamTrie& t, u32 node, u32 token) {
    u32 lo, hi;
    if (!trie_range(t, node, lo, hi)) return GRAM_NONE;
    while (lo < hi) {
        const u32 mid = lo + (hi - lo) / 2;
        const u32 v = t.child_token[mid];
        if (v == token) return t.child_node[mid];
        if (v < token) lo = mid + 1;
        else hi = mid;
    }
    return GRAM_NONE;
}

// ---- log-sum-exp -------------------------------------------------------------------------------

// Running (m, sum of exp(x - m)) of a log-sum-exp. A NaN anywhere makes `s` NaN for good, and
// the value NaN, as the CPU's `select::logsumexp` (its max lets NaN win): pushes and merges
// never drop it, whatever the order, and a row that also holds +inf stays NaN. Without NaN: -inf
// for nothing (or only -inf), +inf when +inf is there, else m + log(s).
struct Lse {
    float m, s;
};
__device__ __forceinline__ Lse lse_empty() { return {gram_neg_inf(), 0.0f}; }
__device__ __forceinline__ void lse_push(Lse& a, float x) {
    if (a.s != a.s) return;
    if (x != x) {
        a.s = gram_nan();
    } else if (x > a.m) {
        a.s = (a.m == gram_neg_inf() ? 0.0f : a.s * expf(a.m - x)) + 1.0f;
        a.m = x;
    } else if (x != gram_neg_inf() && a.m != -gram_neg_inf()) {
        a.s += expf(x - a.m);
    }
}
__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    const float m = fmaxf(a.m, b.m);
    if (a.s != a.s || b.s != b.s) return {m, gram_nan()};
    if (m == gram_neg_inf() || m == -gram_neg_inf()) return {m, 1.0f};
    const float sa = a.m == gram_neg_inf() ? 0.0f : a.s * expf(a.m - m);
    const float sb = b.m == gram_neg_inf() ? 0.0f : b.s * expf(b.m - m);
    return {m, sa + sb};
}
__device__ __forceinline__ Lse lse_warp(Lse a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Lse b;
        b.m = __shfl_xor_sync(GRAM_FULL_MASK, a.m, o);
        b.s = __shfl_xor_sync(GRAM_FULL_MASK, a.s, o);
        a = lse_merge(a, b);
    }
    return a;
}
// `select::logsumexp`: NaN when a NaN was pushed, -inf for nothing, the max itself when it is
// +inf.
__device__ __forceinline__ float lse_value(Lse a) {
    if (a.s != a.s) return gram_nan();
    if (a.m == gram_neg_inf() || a.m == -gram_neg_inf()) return a.m;
    return a.m + logf(a.s);
}

// ---- row_logsumexp -----------------------------------------------------------------------------
//
// row_logsumexp_{f32,bf16}(const T* logits, float* lse, u32 rows, u32 vocab)
//   logits [rows, V] T; lse [rows] f32 = log(sum(exp(logits[r]))) (`select::logsumexp`).
//   Launch: grid (rows), block 256 (a multiple of 32, at most 1024).

template <typename T>
__device__ __forceinline__ void row_logsumexp_impl(const T* __restrict__ logits, float* __restrict__ lse,
                                                   u32 rows, u32 vocab) {
    __shared__ float sm[32], ss[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const T* x = logits + (u64)r * vocab;
    Lse a = lse_empty();
    if (vocab % 8 == 0) {  // rows start 16-byte aligned: 8 values per load
        for (u32 i = threadIdx.x * 8; i < vocab; i += blockDim.x * 8) {
            float v[8];
            load8(x + i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) lse_push(a, v[k]);
        }
    } else {
        for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) lse_push(a, to_f32(x[i]));
    }
    a = lse_warp(a);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = a.m;
        ss[warp] = a.s;
    }
    __syncthreads();
    if (warp == 0) {
        Lse b = lane < warps ? Lse{sm[lane], ss[lane]} : lse_empty();
        b = lse_warp(b);
        if (lane == 0) lse[r] = lse_value(b);
    }
}

extern "C" __global__ void row_logsumexp_f32(const float* logits, float* lse, u32 rows, u32 vocab) {
    gram_pdl_entry();
    row_logsumexp_impl<float>(logits, lse, rows, vocab);
}
extern "C" __global__ void row_logsumexp_bf16(const bf16* logits, float* lse, u32 rows, u32 vocab) {
    gram_pdl_entry();
    row_logsumexp_impl<bf16>(logits, lse, rows, vocab);
}

// ---- beam_picks_count --------------------------------------------------------------------------
//
// beam_picks_count(BeamPicksParams p)
//   For the sparse head: pick_off [S + 1] = exclusive offsets of the allowed tokens of every
//   slot (0 for a slot with no running beam), pick_row [S] = its logits / hidden row (GRAM_NONE
//   for none). The query's slot ranges must not overlap.
//   Launch: grid (1), block 1024.

struct BeamPicksParams {
    const BeamQuery* queries;
    const BeamState* state;
    BeamTrie trie;
    const u32* run_node;  // [S]
    u32* pick_off;        // [S + 1]
    u32* pick_row;        // [S]
    u32 n_queries;
    u32 total_slots;
};

extern "C" __global__ void __launch_bounds__(1024) beam_picks_count(BeamPicksParams p) {
    gram_pdl_entry();
    __shared__ u32 scratch[33];
    const u32 S = p.total_slots;
    for (u32 i = threadIdx.x; i < S; i += blockDim.x) {
        p.pick_off[i + 1] = 0;
        p.pick_row[i] = GRAM_NONE;
    }
    __syncthreads();
    for (u32 q = 0; q < p.n_queries; ++q) {
        const BeamQuery Q = p.queries[q];
        const BeamState st = p.state[q];
        const bool active = st.open && st.error == 0 && st.running <= Q.beam && (u64)Q.slot0 + Q.beam <= S;
        if (!active) continue;  // uniform in the block
        for (u32 j = threadIdx.x; j < st.running; j += blockDim.x) {
            const u32 slot = Q.slot0 + j;
            p.pick_off[slot + 1] = allowed_count(p.trie, p.run_node[slot]);
            p.pick_row[slot] = st.logit_row0 + j;
        }
    }
    __syncthreads();
    // In-place inclusive scan of pick_off[1..=S], a block-wide chunk at a time.
    u32 carry = 0;
    for (u32 base = 0; base < S; base += blockDim.x) {
        const u32 i = base + threadIdx.x;
        const u32 v = i < S ? p.pick_off[i + 1] : 0u;
        u32 total;
        const u32 ex = block_exclusive_scan(v, scratch, total);
        if (i < S) p.pick_off[i + 1] = carry + ex + v;
        carry += total;
    }
    if (threadIdx.x == 0) p.pick_off[0] = 0;
}

// ---- beam_head_picks ---------------------------------------------------------------------------
//
// beam_head_picks_{f32,bf16}(BeamHeadParams<T> p)
//   The sparse LM head (`Backend::linear_picks`): pick_logits[k] = hidden[row] · weight[token]
//   for every pick k of every slot (row = pick_row[slot], token = the slot's k-th allowed
//   token), f32 accumulation. hidden [hidden_rows, C] T (the final-normed rows); weight [V, C]
//   bf16 (the LM head, or the tied embedding). A row or token out of range gives NaN.
//   Launch: a warp per pick, grid-stride: grid (8 x SMs), block 256 (the pick count is read on
//   the device, so the grid does not depend on it).

template <typename T>
struct BeamHeadParams {
    const T* hidden;
    const bf16* weight;
    const u32* pick_off;  // [S + 1]
    const u32* pick_row;  // [S]
    const u32* run_node;  // [S]
    BeamTrie trie;
    float* pick_logits;   // [pick_off[S]]
    u32 total_slots;
    u32 hidden_rows;
    u32 hidden_dim;       // C
    u32 vocab;
};

template <typename T>
__device__ __forceinline__ void head_picks_impl(const BeamHeadParams<T>& p) {
    const u32 lane = threadIdx.x & 31;
    const u32 S = p.total_slots, C = p.hidden_dim;
    const u32 n = p.pick_off[S];
    const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 k = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; k < n; k += warps) {
        // The slot of pick k: the last slot whose offset is <= k.
        u32 lo = 0, hi = S;  // pick_off[lo] <= k < pick_off[hi]
        while (hi - lo > 1) {
            const u32 mid = lo + (hi - lo) / 2;
            if (p.pick_off[mid] <= k) lo = mid;
            else hi = mid;
        }
        const u32 slot = lo, row = p.pick_row[slot], node = p.run_node[slot];
        const u32 kk = (u32)k - p.pick_off[slot];
        const bool ok = row < p.hidden_rows && kk < allowed_count(p.trie, node);  // uniform
        const u32 token = ok ? allowed_token(p.trie, node, kk) : GRAM_NONE;
        float acc = 0.0f;
        if (ok && token < p.vocab) {
            const T* x = p.hidden + (u64)row * C;
            const bf16* w = p.weight + (u64)token * C;
            if (C % 8 == 0) {  // rows 16-byte aligned
                for (u32 i = lane * 8; i < C; i += 256) {
                    float xv[8], wv[8];
                    load8(x + i, xv);
                    load8(w + i, wv);
#pragma unroll
                    for (int q = 0; q < 8; ++q) acc = fmaf(xv[q], wv[q], acc);
                }
            } else {
                for (u32 i = lane; i < C; i += 32) acc = fmaf(to_f32(x[i]), to_f32(w[i]), acc);
            }
            acc = warp_sum(acc);
        } else {
            acc = gram_nan();
        }
        if (lane == 0) p.pick_logits[k] = acc;
    }
}

extern "C" __global__ void beam_head_picks_f32(BeamHeadParams<float> p) { gram_pdl_entry(); head_picks_impl<float>(p); }
extern "C" __global__ void beam_head_picks_bf16(BeamHeadParams<bf16> p) { gram_pdl_entry(); head_picks_impl<bf16>(p); }

// ---- beam_select -------------------------------------------------------------------------------
//
// beam_select_{f32,bf16}(BeamStepParams<T> p)
//   One block per query: the whole `logprob_rows` + `candidates` + `top_k` + `advance` of that
//   query for one step. Logits come from pick_logits (sparse head; pick_off from
//   beam_picks_count of this step) when given, else from logits rows logit_row0 + j
//   (T = their dtype; Full also needs row_lse). A query that is not open, or has no running
//   beam, is left as it is.
//   Launch: grid (n_queries), block SELECT_THREADS (512). Shared memory ~32 KB (static).
//
// Top K: candidates are streamed a block-width at a time; one that beats the K-th best so far
// is staged; a full stage (or the end) is merged by a bitonic sort of [best | staged] in shared
// memory. A candidate is one u64 key — ordered score bits, then ~(j * V + t) — so that a
// descending sort is exactly `select::better`, and the key gives back score, beam and token.

template <typename T>
struct BeamStepParams {
    const BeamQuery* queries;
    BeamState* state;
    BeamTrie trie;
    BeamSlots slots;
    const T* logits;           // [logit_rows, vocab], or null
    const float* row_lse;      // [logit_rows], or null
    const float* pick_logits;  // [picks], or null
    const u32* pick_off;       // [S + 1] (with pick_logits)
    const float* penalty;      // [n_queries, max_steps]: len^length_penalty for len = s + 1,
                               //   the host's `beam::length_factor(s + 1, length_penalty)`
    u32 n_queries;
    u32 logit_rows;
    u32 vocab;                 // V, the model's (j * V + t must fit u32: V <= 8M)
};

// f32 → u32 whose unsigned order is f32::total_cmp's (-0.0 below +0.0), and back.
__device__ __forceinline__ u32 ordered_bits(float x) {
    const u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(u32 o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ u64 candidate_key(float score, u32 id) {
    return ((u64)ordered_bits(score) << 32) | (u64)(0xffffffffu - id);
}

// a / b correctly rounded, as the CPU's f32 division: the f64 quotient is rounded once to 53
// bits, then to 24 — innocuous for division (53 >= 2 * 24 + 2). The f32 `/` (which NVVM would
// also make of a plain (double)a / (double)b) is as exact, but its slow-path call made ptxas
// spill the kernel's live state; the f64 one's does not.
__device__ __forceinline__ float div_exact(float a, float b) { return __double2float_rn(__ddiv_rn((double)a, (double)b)); }

__device__ __forceinline__ u32 pow2_ceil(u32 x) {
    u32 p = 1;
    while (p < x) p <<= 1;
    return p;
}

// Sorts key[0..n) (n a power of two) descending, klp alongside. All threads call.
__device__ __forceinline__ void bitonic_sort_desc(u64* key, float* klp, u32 n) {
    for (u32 size = 2; size <= n; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
                const u32 l = i ^ stride;
                if (l > i) {  // each pair once
                    const u64 a = key[i], b = key[l];
                    const bool desc = (i & size) == 0;
                    if (desc ? a < b : a > b) {
                        key[i] = b;
                        key[l] = a;
                        const float t = klp[i];
                        klp[i] = klp[l];
                        klp[l] = t;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// Number of leading entries of a non-increasing array that are > x (strict) or >= x.
__device__ __forceinline__ u32 count_above(const float* a, u32 n, float x, bool or_equal) {
    u32 lo = 0, hi = n;
    while (lo < hi) {
        const u32 mid = lo + (hi - lo) / 2;
        if (a[mid] > x || (or_equal && a[mid] == x)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

template <typename T>
__device__ __forceinline__ float beam_logit(const BeamStepParams<T>& p, u32 slot, u32 row, u32 k, u32 token) {
    if (token >= p.vocab) return gram_nan();
    if (p.pick_logits) return p.pick_logits[p.pick_off[slot] + k];
    return to_f32(p.logits[(u64)row * p.vocab + token]);
}

template <typename T>
__device__ __forceinline__ void select_impl(const BeamStepParams<T>& p) {
    __shared__ u64 key[SORT_MAX];        // [best K2 | staged], 0 = empty
    __shared__ float klp[SORT_MAX];      // the candidates' log-probs
    __shared__ u32 s_node[BEAM_MAX];     // running beams' nodes
    __shared__ float s_score[BEAM_MAX];  // running beams' scores; later the old finished scores
    __shared__ float s_lse[BEAM_MAX];    // per-beam normalizer; later the new finished scores
    __shared__ u32 s_off[BEAM_MAX + 1];  // candidate offsets per beam
    __shared__ u32 scratch[33];
    __shared__ u32 s_staged, s_err;
    __shared__ u64 s_thresh;
    __shared__ float s_best, s_worst;

    const u32 q = blockIdx.x, tid = threadIdx.x;
    if (q >= p.n_queries) return;
    const BeamQuery Q = p.queries[q];
    BeamState* stp = p.state + q;
    const BeamState st = *stp;
    __syncthreads();  // every thread has read the state before any thread writes it
    if (!st.open || st.running == 0 || st.error) return;  // uniform: every thread read the same
    const u32 B = Q.beam, nb = st.running, s = st.gen_len, K = 2 * B;
    const u32 S = p.slots.total_slots;

    u32 err = 0;
    if (blockDim.x != SELECT_THREADS || B == 0 || B > BEAM_MAX || nb > B || st.finished > B ||
        (u64)Q.slot0 + B > S || s >= Q.max_new_tokens || s >= p.slots.max_steps || p.vocab == 0 ||
        (u64)p.vocab * BEAM_MAX > 0xffffffffull)
        err = BEAM_ERR_PARAMS;
    else if (!p.penalty)
        err = BEAM_ERR_PARAMS;
    else if (p.pick_logits ? (!p.pick_off || Q.normalize == 0) : (!p.logits || (Q.normalize == 0 && !p.row_lse)))
        err = BEAM_ERR_SOURCE;
    else if (!p.pick_logits && (u64)st.logit_row0 + nb > p.logit_rows)
        err = BEAM_ERR_ROW;
    if (err) {  // uniform
        if (tid == 0) {
            stp->error = err;
            stp->open = 0;
            stp->running = 0;
        }
        return;
    }

    // ---- the running beams, and how many tokens each may take
    if (tid == 0) {
        s_staged = 0;
        s_err = 0;
        s_thresh = 0;
    }
    for (u32 i = tid; i < SORT_MAX; i += blockDim.x) key[i] = 0;
    __syncthreads();
    u32 cnt = 0;
    if (tid < nb) {
        const u32 node = p.slots.run_node[Q.slot0 + tid];
        s_node[tid] = node;
        s_score[tid] = p.slots.run_score[Q.slot0 + tid];
        u32 b, e;
        if (!trie_range(p.trie, node, b, e)) atomicOr(&s_err, 1u);
        cnt = allowed_count(p.trie, node);
    }
    u32 total;
    const u32 off = block_exclusive_scan(cnt, scratch, total);  // has barriers: s_* visible after
    if (tid < nb) s_off[tid] = off;
    if (tid == 0) s_off[nb] = total;
    if (s_err) {  // uniform (read after the scan's barriers)
        if (tid == 0) {
            stp->error = BEAM_ERR_NODE;
            stp->open = 0;
            stp->running = 0;
        }
        return;
    }

    // ---- the normalizer of each beam
    const u32 lane = tid & 31, warp = tid >> 5;
    if (Q.normalize == 0) {
        for (u32 j = tid; j < nb; j += blockDim.x) s_lse[j] = p.row_lse[st.logit_row0 + j];
    } else {
        // A warp per beam: logsumexp over its allowed tokens' logits (`children_only`).
        for (u32 j = warp; j < nb; j += blockDim.x >> 5) {
            const u32 node = s_node[j], n = allowed_count(p.trie, node);
            Lse a = lse_empty();
            for (u32 k = lane; k < n; k += 32)
                lse_push(a, beam_logit(p, Q.slot0 + j, st.logit_row0 + j, k, allowed_token(p.trie, node, k)));
            a = lse_warp(a);
            if (lane == 0) s_lse[j] = lse_value(a);
        }
    }
    __syncthreads();

    // ---- candidates, top K
    const u32 K2 = pow2_ceil(K);      // <= 1024
    const u32 cap = SORT_MAX - K2;    // staging room, >= 1024 >= a round
    u32 n_valid = 0;                  // candidates with a non-NaN log-prob so far (uniform)
    auto flush = [&]() {              // all threads; uniform condition at the call
        const u32 n = pow2_ceil(K2 + s_staged);
        bitonic_sort_desc(key, klp, n);
        for (u32 i = K2 + tid; i < n; i += blockDim.x) key[i] = 0;  // drop all but the best K2
        __syncthreads();
        if (tid == 0) {
            s_staged = 0;
            s_thresh = n_valid >= K ? key[K - 1] : 0ull;  // the K-th best: a new one must beat it
        }
        __syncthreads();
    };
    for (u32 base = 0; base < total; base += blockDim.x) {
        if (s_staged + min(blockDim.x, total - base) > cap) flush();  // uniform (after a barrier)
        const u32 c = base + tid;
        bool valid = false;
        u64 k = 0;
        float lp = 0.0f;
        if (c < total) {
            u32 lo = 0, hi = nb;  // the beam of candidate c: s_off[lo] <= c < s_off[lo + 1]
            while (hi - lo > 1) {
                const u32 mid = lo + (hi - lo) / 2;
                if (s_off[mid] <= c) lo = mid;
                else hi = mid;
            }
            const u32 j = lo, kk = c - s_off[j], node = s_node[j];
            const u32 token = allowed_token(p.trie, node, kk);
            lp = beam_logit(p, Q.slot0 + j, st.logit_row0 + j, kk, token) - s_lse[j];
            if (!(fabsf(lp) <= 3.402823466e+38f)) atomicOr(&s_err, 1u);  // NaN or +-inf
            if (lp == lp) {  // a NaN stops the query below; it is never a candidate
                valid = true;
                k = candidate_key(s_score[j] + lp, j * p.vocab + token);
            }
        }
        n_valid += __syncthreads_count(valid);  // also the barrier that orders s_thresh reads
        if (valid && k > s_thresh) {
            const u32 at = atomicAdd(&s_staged, 1u);
            key[K2 + at] = k;
            klp[K2 + at] = lp;
        }
        __syncthreads();
    }
    if (s_err) {  // uniform (read after the loop's last barrier; 0 when it did not run)
        if (tid == 0) {
            stp->error = BEAM_ERR_NUMERIC;
            stp->open = 0;
            stp->running = 0;
        }
        return;
    }
    if (s_staged > 0) flush();  // uniform
    const u32 nk = min(K, n_valid);  // the top nk are key[0..nk), best first

    // ---- advance (`advance`): who finishes, who runs on
    const bool at_limit = s + 1 >= Q.max_new_tokens;
    const float penalty = p.penalty[(u64)q * p.slots.max_steps + s];  // the CPU's f64 pow, cast
    const u32 eos = p.trie.eos;
    u32 r_rank[2], r_j[2], r_token[2], r_run[2], r_fin[2];
    float r_score[2], r_lp[2];
    bool r_in[2], r_hit[2];
    u32 carry_run = 0, carry_fin = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // ranks tid and tid + 512 (K <= 1024)
        const u32 r = h * SELECT_THREADS + tid;
        r_rank[h] = r;
        r_in[h] = r < nk;
        r_j[h] = r_token[h] = 0;
        r_score[h] = r_lp[h] = 0.0f;
        r_hit[h] = false;
        if (r_in[h]) {
            const u64 kv = key[r];
            const u32 id = 0xffffffffu - (u32)kv;
            r_score[h] = from_ordered_bits((u32)(kv >> 32));
            r_j[h] = id / p.vocab;
            r_token[h] = id % p.vocab;
            r_lp[h] = klp[r];
            r_hit[h] = r_token[h] == eos || at_limit;
        }
        u32 t_run, t_fin;
        r_run[h] = carry_run + block_exclusive_scan(r_in[h] && !r_hit[h], scratch, t_run);
        r_fin[h] = carry_fin + block_exclusive_scan(r_in[h] && r_hit[h] && r < B, scratch, t_fin);
        carry_run += t_run;
        carry_fin += t_fin;
    }
    const u32 new_running = min(B, carry_run), nn = carry_fin, nf = st.finished;

    // Phase A: read the old finished slots; stage the new finished scores; write the running.
    float f_score = 0.0f, f_lp = 0.0f;
    u32 f_step = 0, f_parent = 0, f_token = 0, f_node = 0;
    if (tid < nf) {
        const u32 slot = Q.slot0 + tid;
        f_score = p.slots.fin_score[slot];
        f_step = p.slots.fin_step[slot];
        f_parent = p.slots.fin_parent[slot];
        f_token = p.slots.fin_token[slot];
        f_lp = p.slots.fin_logprob[slot];
        f_node = p.slots.fin_node[slot];
        s_score[tid] = f_score;  // the old finished scores, best first
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!r_in[h]) continue;
        if (r_hit[h]) {
            if (r_rank[h] < B) s_lse[r_fin[h]] = div_exact(r_score[h], penalty);  // only the top B finish
        } else if (r_run[h] < B) {
            const u32 i = r_run[h], slot = Q.slot0 + i;
            const u64 hi = (u64)s * S + slot;
            p.slots.run_node[slot] = trie_child(p.trie, s_node[r_j[h]], r_token[h]);
            p.slots.run_score[slot] = r_score[h];
            p.slots.hist_parent[hi] = r_j[h];
            p.slots.hist_token[hi] = r_token[h];
            p.slots.hist_logprob[hi] = r_lp[h];
            if (i == 0) s_best = r_score[h];
        }
    }
    __syncthreads();

    // Phase B: merge old and new finished (new ones after equal old ones, as `offer` inserts),
    // keep the best B.
    if (tid < nf) {
        const u32 pos = tid + count_above(s_lse, nn, f_score, false);
        if (pos < B) {
            const u32 slot = Q.slot0 + pos;
            p.slots.fin_score[slot] = f_score;
            p.slots.fin_step[slot] = f_step;
            p.slots.fin_parent[slot] = f_parent;
            p.slots.fin_token[slot] = f_token;
            p.slots.fin_logprob[slot] = f_lp;
            p.slots.fin_node[slot] = f_node;
            if (pos == B - 1) s_worst = f_score;
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (!r_in[h] || !r_hit[h] || r_rank[h] >= B) continue;
        const float score = s_lse[r_fin[h]];
        const u32 pos = r_fin[h] + count_above(s_score, nf, score, true);
        if (pos < B) {
            const u32 slot = Q.slot0 + pos;
            p.slots.fin_score[slot] = score;
            p.slots.fin_step[slot] = s;
            p.slots.fin_parent[slot] = r_j[h];
            p.slots.fin_token[slot] = r_token[h];
            p.slots.fin_logprob[slot] = r_lp[h];
            p.slots.fin_node[slot] = s_node[r_j[h]];
            if (pos == B - 1) s_worst = score;
        }
    }
    __syncthreads();

    if (tid == 0) {
        const u32 finished = min(B, nf + nn);
        const u32 running = at_limit ? 0u : new_running;
        u32 open = 1;
        // HF's heuristic: with every finished slot taken, go on only while the best running
        // beam, at its current length, beats the worst finished score.
        if (running > 0 && finished == B) open = div_exact(s_best, penalty) > s_worst ? 1u : 0u;
        stp->running = running;
        stp->finished = finished;
        stp->gen_len = s + 1;
        stp->open = open;
    }
}

extern "C" __global__ void __launch_bounds__(SELECT_THREADS) beam_select_f32(BeamStepParams<float> p) {
    gram_pdl_entry();
    select_impl<float>(p);
}
extern "C" __global__ void __launch_bounds__(SELECT_THREADS) beam_select_bf16(BeamStepParams<bf16> p) {
    gram_pdl_entry();
    select_impl<bf16>(p);
}

// ---- beam_feed ---------------------------------------------------------------------------------
//
// beam_feed(BeamFeedParams p)
//   After beam_select: the next decoder step's inputs, at fixed rows (CUDA-graph friendly).
//   For query q after step g - 1 (gen_len = g), slot j's batch row is feed_row0 + j:
//   - a running beam i (< running): token hist_token[g - 1][slot], RowKv {pos prompt_len + g - 1,
//     entry entry0 + (g - 1) * B + i, span (span_begin, span_end), link: its list}, where its
//     list, in link buffer g % 2, is [pre_len prompt links | its parent's g - 1 entries, from
//     buffer (g - 1) % 2 | its own new entry] — the parent-pointer walk of `Beam::entries`;
//   - any other slot (fewer running beams, or the query done): a dummy row the host ignores:
//     token 0, pos 0, entry scratch0 + slot (the host reserves S scratch entries, so dummy rows
//     never write into real KV), the query's span, no links.
//   Also sets the query's logit_row0 to feed_row0 (decode steps read logits at the batch rows).
//   links [2, S, link_stride] u32: the two link buffers, one list of link_stride per slot; the
//     RowKv link ranges index this whole array (pass it as the attention's `links`).
//   Launch: grid (n_queries), block 256.

struct BeamFeedParams {
    const BeamQuery* queries;
    BeamState* state;
    const u32* hist_parent;  // [max_steps, S]
    const u32* hist_token;   // [max_steps, S]
    u32* links;              // [2, S, link_stride]
    u32* tokens;             // [n_rows]
    RowKv* rows;             // [n_rows]
    u32 n_queries;
    u32 total_slots;         // S
    u32 max_steps;
    u32 link_stride;
    u32 n_rows;
    u32 scratch0;            // first of S scratch entries
};

extern "C" __global__ void beam_feed(BeamFeedParams p) {
    gram_pdl_entry();
    const u32 q = blockIdx.x;
    if (q >= p.n_queries) return;
    const BeamQuery Q = p.queries[q];
    BeamState* stp = p.state + q;
    const BeamState st = *stp;
    __syncthreads();  // every thread has read the state before thread 0 writes it
    const u32 S = p.total_slots, B = Q.beam, g = st.gen_len;
    const u64 buf = (u64)S * p.link_stride;
    const bool params_ok = B > 0 && B <= BEAM_MAX && (u64)Q.slot0 + B <= S && 2 * buf <= 0xffffffffull;
    if (!params_ok || (u64)Q.feed_row0 + B > p.n_rows) {  // uniform
        if (threadIdx.x == 0 && st.error == 0) {
            stp->error = params_ok ? BEAM_ERR_LINKS : BEAM_ERR_PARAMS;
            stp->open = 0;
            stp->running = 0;
        }
        return;
    }
    const bool runs = st.open && st.error == 0 && st.running > 0 && g > 0;
    const bool fits = g <= p.max_steps && st.running <= B && (u64)Q.pre_len + g <= p.link_stride;
    const u32 n_run = runs && fits ? st.running : 0u;
    for (u32 j = threadIdx.x; j < B; j += blockDim.x) {
        const u32 slot = Q.slot0 + j, row = Q.feed_row0 + j;
        RowKv r;
        r.span_begin = Q.span_begin;
        r.span_end = Q.span_end;
        if (j < n_run) {
            const u64 hi = (u64)(g - 1) * S + slot;
            const u32 parent = p.hist_parent[hi];
            const u32 entry = Q.entry0 + (g - 1) * B + j;
            u32* dst = p.links + (g % 2) * buf + (u64)slot * p.link_stride + Q.pre_len;
            if (parent < B) {
                const u32* src = p.links + ((g - 1) % 2) * buf + (u64)(Q.slot0 + parent) * p.link_stride + Q.pre_len;
                for (u32 k = 0; k + 1 < g; ++k) dst[k] = src[k];
            }
            dst[g - 1] = entry;
            p.tokens[row] = p.hist_token[hi];
            r.pos = Q.prompt_len + g - 1;
            r.entry = entry;
            r.link_begin = (u32)((g % 2) * buf + (u64)slot * p.link_stride);
            r.link_end = r.link_begin + Q.pre_len + g;
        } else {
            p.tokens[row] = 0;
            r.pos = 0;
            r.entry = p.scratch0 + slot;
            r.link_begin = r.link_end = 0;
        }
        p.rows[row] = r;
    }
    if (threadIdx.x == 0) {
        if (runs && !fits) {  // a list would overflow its stride
            stp->error = BEAM_ERR_LINKS;
            stp->open = 0;
            stp->running = 0;
        }
        stp->logit_row0 = Q.feed_row0;
    }
}
