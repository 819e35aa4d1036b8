//! The CPU KV cache and causal GQA attention over it.
//!
//! Cache layout: `k`, `v: [layers, slots, capacity, Hkv * D]` f32. A slot is one sequence; a
//! batch row `(slot, pos)` writes its K/V at `pos` and attends to positions `0..=pos` of that
//! slot. Query head `h` reads KV head `h / (H / Hkv)`. Scores are scaled by `1/sqrt(D)`, the
//! softmax is in f32 as HF's eager attention computes it.

use rayon::prelude::*;

use super::simd::{self, Isa};
use crate::backend::{AttnShape, RowPos};

pub struct CpuKv {
    layers: usize,
    slots: usize,
    capacity: usize,
    kv_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKv {
    pub fn new(layers: usize, slots: usize, capacity: usize, kv_dim: usize) -> CpuKv {
        let n = layers * slots * capacity * kv_dim;
        CpuKv {
            layers,
            slots,
            capacity,
            kv_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Offset of `(layer, slot, pos)`.
    #[inline]
    fn at(&self, layer: usize, slot: usize, pos: usize) -> usize {
        debug_assert!(layer < self.layers && slot < self.slots && pos < self.capacity);
        ((layer * self.slots + slot) * self.capacity + pos) * self.kv_dim
    }

    pub(super) fn store(&mut self, layer: usize, k: &[f32], v: &[f32], rows: &[RowPos]) {
        let d = self.kv_dim;
        for (t, row) in rows.iter().enumerate() {
            let o = self.at(layer, row.slot, row.pos);
            self.k[o..o + d].copy_from_slice(&k[t * d..(t + 1) * d]);
            self.v[o..o + d].copy_from_slice(&v[t * d..(t + 1) * d]);
        }
    }
}

/// `out[t, h] = softmax(q[t, h] · K[slot, 0..=pos, g] / sqrt(D)) V[slot, 0..=pos, g]`.
pub fn attention(
    isa: Isa,
    q: &[f32],
    kv: &CpuKv,
    layer: usize,
    rows: &[RowPos],
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let work = |(i, o): (usize, &mut [f32])| {
        let (t, h) = (i / heads, i % heads);
        let row = rows[t];
        let g = h / group;
        let qh = &q[i * d..(i + 1) * d];
        let mut scores: Vec<f32> = (0..=row.pos)
            .map(|j| {
                let o = kv.at(layer, row.slot, j) + g * d;
                simd::dot(isa, qh, &kv.k[o..o + d]) * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let off = kv.at(layer, row.slot, j) + g * d;
            simd::axpy(isa, p / sum, &kv.v[off..off + d], o);
        }
    };
    let work_units: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * heads * d;
    let out = &mut out[..rows.len() * heads * d];
    if work_units >= 1 << 16 {
        out.par_chunks_mut(d).enumerate().for_each(work);
    } else {
        out.chunks_mut(d).enumerate().for_each(work);
    }
}
