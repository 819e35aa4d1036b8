//! The CPU KV cache and GQA attention over it.
//!
//! Cache layout: `k`, `v: [layers, Hkv, entries, D]` f32 — an arena of token entries, each KV
//! head's rows side by side. A batch row writes its K/V at its entry and attends to the entries
//! of its context (a contiguous span, then scattered links: see [`RowKv`]), so a work item (one
//! row, one KV head) streams a span's keys as one run of memory; with the entry's heads side by
//! side instead (`[layers, entries, Hkv * D]`) it read a third of every 768-byte entry
//! (SmolLM2) and skipped the rest. Query head `h` reads KV head `h / (H / Hkv)`. Scores are
//! scaled by `1/sqrt(D)`, the softmax is in f32 as HF's eager attention computes it.

use super::simd::{self, Isa};
use crate::backend::{AttnShape, KvRows, RowKv};

pub struct CpuKv {
    layers: usize,
    kv_heads: usize,
    entries: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKv {
    pub fn new(layers: usize, entries: usize, kv_heads: usize, head_dim: usize) -> CpuKv {
        let n = layers * kv_heads * entries * head_dim;
        CpuKv {
            layers,
            kv_heads,
            entries,
            head_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Offset of `(layer, KV head, entry)`.
    #[inline]
    fn at(&self, layer: usize, head: usize, entry: usize) -> usize {
        debug_assert!(layer < self.layers && head < self.kv_heads && entry < self.entries);
        ((layer * self.kv_heads + head) * self.entries + entry) * self.head_dim
    }

    /// Writes `k`, `v: [T, Hkv * D]` (row `t` at `rows[t]`'s entry) into the cache.
    pub(super) fn store(&mut self, layer: usize, k: &[f32], v: &[f32], rows: &[RowKv]) {
        let d = self.head_dim;
        let kv_dim = self.kv_heads * d;
        for (t, row) in rows.iter().enumerate() {
            for g in 0..self.kv_heads {
                let o = self.at(layer, g, row.entry as usize);
                let i = t * kv_dim + g * d;
                self.k[o..o + d].copy_from_slice(&k[i..i + d]);
                self.v[o..o + d].copy_from_slice(&v[i..i + d]);
            }
        }
    }
}

/// One work item's buffers, kept per thread: a decode step has rows × KV heads × layers items
/// (900 for SmolLM2 at beam 10), each of which would otherwise allocate three.
#[derive(Default)]
struct Scratch {
    offs: Vec<usize>,
    scores: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `out[t, h] = softmax(q[t, h] · K[ctx(t), g] / sqrt(D)) V[ctx(t), g]`. One work item per
/// (row, KV head) when there are enough: its `H / Hkv` query heads read each K and V row of the
/// context once; else one per (row, head). Each head's arithmetic is the same, in the same order.
pub fn attention(
    isa: Isa,
    q: &[f32],
    kv: &CpuKv,
    layer: usize,
    rows: KvRows,
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let group = heads / kv_heads;
    let scale = shape.scale();
    // Query heads per work item: a KV head's whole group, unless that leaves too few items to
    // keep every thread busy (decode of one row: Hkv items), then one head each.
    let per = if rows.rows.len() * kv_heads >= 4 * super::team::threads() {
        group
    } else {
        1
    };
    let items = heads / per;
    let work = |(i, o): (usize, &mut [f32])| {
        let (t, h0) = (i / items, (i % items) * per);
        let g = h0 / group;
        let row = &rows.rows[t];
        let n = row.context_len();
        // Query heads `h0..h0 + per` (all of KV head `g`), consecutive in `q` and in `out`.
        let qg = &q[(t * heads + h0) * d..(t * heads + h0 + per) * d];
        SCRATCH.with_borrow_mut(|Scratch { offs, scores, sums }| {
            // The context's K/V rows of this layer and KV head, read by both kernels.
            let base = kv.at(layer, g, 0);
            offs.clear();
            offs.extend(rows.context(row).map(|e| base + e * d));
            scores.clear();
            scores.resize(per * n, 0.0);
            simd::attn_scores(isa, qg, &kv.k, offs, d, scale, scores);
            sums.clear();
            sums.resize(per, 0.0);
            for (sh, sum) in scores.chunks_exact_mut(n.max(1)).zip(sums.iter_mut()) {
                *sum = simd::exp_shift(isa, sh, simd::max(isa, sh));
            }
            simd::attn_pv(isa, scores, sums, &kv.v, offs, d, o);
        });
    };
    let work_units: usize = rows.rows.iter().map(|r| r.context_len()).sum::<usize>() * heads * d;
    let out = &mut out[..rows.rows.len() * heads * d];
    if work_units >= 1 << 16 {
        super::team::for_each_chunk(out, per * d, |i, o| work((i, o)));
    } else {
        out.chunks_mut(per * d).enumerate().for_each(work);
    }
}
