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
    /// A zeroed cache; `None` when the allocator refuses its memory (a cache too large for the
    /// machine must be an error, not an abort).
    pub fn new(layers: usize, entries: usize, kv_heads: usize, head_dim: usize) -> Option<CpuKv> {
        let n = layers
            .checked_mul(kv_heads)?
            .checked_mul(entries)?
            .checked_mul(head_dim)?;
        Some(CpuKv {
            layers,
            kv_heads,
            entries,
            head_dim,
            k: zeroed(n)?,
            v: zeroed(n)?,
        })
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

/// `n` zeros, or `None` when the allocator refuses. Zeroed by the allocator, as `vec![0.0; n]`
/// is (pages are touched only when written), where `try_reserve` and a fill would write every
/// byte of a cache that a batch may use only a corner of.
fn zeroed(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: the layout's size is not zero (n > 0).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` comes from the global allocator with the layout of `n` f32 (a `Vec<f32>`'s
    // of capacity `n`), and its `n` elements are initialized (zero bits are 0.0).
    Some(unsafe { Vec::from_raw_parts(p, n, n) })
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
    debug_assert!(
        shape.kv_heads == kv.kv_heads && shape.head_dim == kv.head_dim,
        "attention shape against the cache's; this is a bug"
    );
    // Query heads per work item: a KV head's whole group, unless that leaves too few items to
    // keep every thread busy (decode of one row: Hkv items), then one head each.
    let per = if rows.rows.len() * shape.kv_heads >= 4 * super::team::threads() {
        shape.heads / shape.kv_heads
    } else {
        1
    };
    let context: usize = rows.rows.iter().map(|r| r.context_len()).sum();
    let work_units = context * shape.heads * shape.head_dim;
    let split = Split {
        per,
        parallel: work_units >= 1 << 16,
    };
    attention_split(isa, q, kv, layer, rows, shape, out, split);
}

/// How [`attention`] splits its work: `per` query heads (1, or a KV head's whole group) a work
/// item, the items on the team's threads or in order. Every split gives the same bits.
#[derive(Debug, Clone, Copy)]
struct Split {
    per: usize,
    parallel: bool,
}

/// [`attention`] with its split given (the tests run every split, whatever the machine's
/// thread count would pick).
#[allow(clippy::too_many_arguments)]
fn attention_split(
    isa: Isa,
    q: &[f32],
    kv: &CpuKv,
    layer: usize,
    rows: KvRows,
    shape: AttnShape,
    out: &mut [f32],
    Split { per, parallel }: Split,
) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let group = heads / kv_heads;
    debug_assert!(
        per == 1 || per == group,
        "a split of {per} heads; this is a bug"
    );
    let scale = shape.scale();
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
                let m = simd::max(isa, sh);
                // A NaN score, or an infinite one (q·k past f32), makes the row NaN, as HF's
                // softmax does: `exp_shift` clamps `x - m` from below, which would turn the
                // NaNs of `x - NaN` (or `inf - inf`) into equal weights and a plain average of
                // V, finite and wrong, that no later check could see.
                *sum = if m.is_finite() {
                    simd::exp_shift(isa, sh, m)
                } else {
                    sh.fill(f32::NAN);
                    f32::NAN
                };
            }
            // Each row's numerators divided by their sum at once (the quotients `p / sum` are
            // the same one at a time or vectorized), then the weighted values.
            for (sh, &sum) in scores.chunks_exact_mut(n.max(1)).zip(sums.iter()) {
                sh.iter_mut().for_each(|p| *p /= sum);
            }
            simd::attn_pv(isa, scores, &kv.v, offs, d, o);
        });
    };
    let out = &mut out[..rows.rows.len() * heads * d];
    if parallel {
        super::team::for_each_chunk(out, per * d, |i, o| work((i, o)));
    } else {
        out.chunks_mut(per * d).enumerate().for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::{signed_unit, xorshift};

    /// `attention` under every split, inside a team of 3 threads: one head or a KV head's whole
    /// group a work item, in order or on the team (the split `attention` picks depends on the
    /// machine's thread count and the batch, so a test of it alone covers one or two of the
    /// four). Each split's output is checked to have the bits of the first, and of
    /// `attention` itself; returns it.
    fn every_split(
        isa: Isa,
        q: &[f32],
        kv: &CpuKv,
        layer: usize,
        rows: KvRows,
        shape: AttnShape,
    ) -> Vec<f32> {
        let team = crate::backend::cpu::team::Team::new(3, "attn-test").unwrap();
        let n = rows.rows.len() * shape.heads * shape.head_dim;
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut plain = vec![0f32; n];
        team.enter(|| attention(isa, q, kv, layer, rows, shape, &mut plain));
        for per in [1, shape.heads / shape.kv_heads] {
            for parallel in [false, true] {
                let mut out = vec![0f32; n];
                let split = Split { per, parallel };
                team.enter(|| attention_split(isa, q, kv, layer, rows, shape, &mut out, split));
                assert!(bits(&out) == bits(&plain), "{isa:?} {split:?}: other bits");
            }
        }
        plain
    }

    /// A NaN in a cached key (a corrupt projection) or a score past f32 makes NaN the output
    /// of exactly the heads whose context holds it, on every ISA, as HF's softmax gives: it
    /// used to be a plain average of V, finite, so no check downstream saw the fault.
    #[test]
    fn a_nan_or_infinite_score_makes_its_heads_nan() {
        let (entries, kv_heads, heads, d) = (8, 2, 4, 32);
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        };
        let mut next = xorshift(0xa77e_0bad);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| signed_unit(next())).collect() };
        let rows: Vec<RowKv> = (0..entries as u32)
            .map(|e| RowKv::contiguous(0, e))
            .collect();
        let batch = KvRows {
            rows: &rows,
            links: &[],
        };
        for poison in [f32::NAN, f32::MAX] {
            let mut kv = CpuKv::new(1, entries, kv_heads, d).unwrap();
            let mut k = rand(entries * kv_heads * d);
            let v = rand(entries * kv_heads * d);
            // Entry 5, KV head 1: a NaN, or a key whose dot with q overflows.
            let at = 5 * kv_heads * d + d;
            k[at..at + d].iter_mut().for_each(|x| *x = poison);
            kv.store(0, &k, &v, &rows);
            // Positive queries: the poisoned key's score is NaN, or +inf (f32::MAX · q past
            // f32; a -inf score is a weight of 0, as in HF, and stays finite).
            let q: Vec<f32> = rand(entries * heads * d).iter().map(|x| x.abs()).collect();
            for isa in Isa::available() {
                let out = every_split(isa, &q, &kv, 0, batch, shape);
                for (t, row) in rows.iter().enumerate() {
                    for h in 0..heads {
                        let o = &out[(t * heads + h) * d..][..d];
                        // Row t attends to entries 0..=t (causal): entry 5 from row 5 on.
                        let hit = h / (heads / kv_heads) == 1 && row.pos >= 5;
                        assert!(
                            if hit {
                                o.iter().all(|x| x.is_nan())
                            } else {
                                o.iter().all(|x| x.is_finite())
                            },
                            "{isa:?} {poison} row {t} head {h}: {:?}",
                            &o[..4]
                        );
                    }
                }
            }
        }
    }

    /// Store then attention on the CPU cache against an f64 reference that reads K and V from
    /// what was stored, by (layer, KV head, entry): two layers, 2 KV heads of 3 query heads
    /// each, rows with a contiguous span and scattered links (as beams read a shared prompt),
    /// random inputs, every output element, on every ISA; AVX2 and AVX-512 agree bit for bit
    /// (the scalar twin sums in another order). Storing one KV head's rows under another
    /// fails it.
    #[test]
    #[allow(clippy::needless_range_loop)] // `layer` indexes the cache and the truth alike
    fn stored_rows_attend_by_kv_head_as_the_f64_reference() {
        let (layers, entries, kv_heads, heads, d) = (2, 40, 2, 6, 32);
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        };
        let mut next = xorshift(0x5eed_a77e);
        let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| signed_unit(next())).collect() };
        // Every entry of both layers written, one token a call (as decode does) or several.
        let mut kv = CpuKv::new(layers, entries, kv_heads, d).unwrap();
        let mut truth =
            vec![vec![(vec![0f32; kv_heads * d], vec![0f32; kv_heads * d]); entries]; layers];
        for (layer, truth) in truth.iter_mut().enumerate() {
            for e0 in (0..entries).step_by(8) {
                let rows: Vec<RowKv> = (e0..e0 + 8)
                    .map(|e| RowKv::contiguous(0, e as u32))
                    .collect();
                let (k, v) = (rand(8 * kv_heads * d), rand(8 * kv_heads * d));
                kv.store(layer, &k, &v, &rows);
                for (t, e) in (e0..e0 + 8).enumerate() {
                    let r = t * kv_heads * d..(t + 1) * kv_heads * d;
                    truth[e] = (k[r.clone()].to_vec(), v[r].to_vec());
                }
            }
        }
        // Three rows: a prompt span alone, a span plus links, links from far apart.
        let links = [30u32, 17, 39, 5, 22, 23];
        let rows = [
            RowKv {
                pos: 9,
                entry: 9,
                span: (0, 10),
                link: (0, 0),
            },
            RowKv {
                pos: 12,
                entry: 30,
                span: (0, 10),
                link: (0, 3),
            },
            RowKv {
                pos: 6,
                entry: 23,
                span: (11, 14),
                link: (3, 6),
            },
        ];
        let batch = KvRows {
            rows: &rows,
            links: &links,
        };
        let q = rand(rows.len() * heads * d);
        let mut bits: Option<Vec<u32>> = None;
        for isa in Isa::available() {
            for layer in 0..layers {
                let out = every_split(isa, &q, &kv, layer, batch, shape);
                // Each row's context written out (not `batch.context`, the code under test):
                // its span's entries, then its links'.
                let contexts: [Vec<usize>; 3] = [
                    (0..10).collect(),
                    (0..10).chain([30, 17, 39]).collect(),
                    (11..14).chain([5, 22, 23]).collect(),
                ];
                for (t, row) in rows.iter().enumerate() {
                    let ctx = &contexts[t];
                    assert_eq!(batch.context(row).collect::<Vec<_>>(), *ctx, "row {t}");
                    for h in 0..heads {
                        let g = h / (heads / kv_heads);
                        let qh = &q[(t * heads + h) * d..][..d];
                        let kv_of = |e: usize, which: usize| {
                            let (k, v) = &truth[layer][e];
                            let s = if which == 0 { k } else { v };
                            s[g * d..(g + 1) * d].to_vec()
                        };
                        let scores: Vec<f64> = ctx
                            .iter()
                            .map(|&e| {
                                let k = kv_of(e, 0);
                                qh.iter()
                                    .zip(&k)
                                    .map(|(&a, &b)| a as f64 * b as f64)
                                    .sum::<f64>()
                                    * shape.scale() as f64
                            })
                            .collect();
                        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                        let z: f64 = w.iter().sum();
                        for i in 0..d {
                            let want: f64 = ctx
                                .iter()
                                .zip(&w)
                                .map(|(&e, &w)| w / z * kv_of(e, 1)[i] as f64)
                                .sum();
                            let got = out[(t * heads + h) * d + i] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{isa:?} layer {layer} row {t} head {h} [{i}]: {got} vs {want}"
                            );
                        }
                    }
                }
                if layer == 1 && isa != Isa::Scalar {
                    let b: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
                    match &bits {
                        Some(first) => assert_eq!(first, &b, "{isa:?} against the first ISA"),
                        None => bits = Some(b),
                    }
                }
            }
        }
    }
}
