//! Scoring one posting list a chunk at a time against a rising floor ([`Scorer`]), for the
//! threshold passes of `Ranker`: pruned by level and by partial score, term tables built only
//! where they pay, every score the one [`score_postings`](super::score_postings) gives, bit
//! for bit. The terms themselves are `kernel`'s.

use super::kernel::{add_direct, fill_table, lookup, term_bound, Token};
use super::{Postings, PT_SCALE};
use crate::backend::cpu::simd::Isa;

/// In a [`Scorer`], lists at least this long prune token 0 by its level ([`Levels`]) and may
/// build term tables ([`TABLE_AFTER`]).
const LEVELS_MIN: usize = 1 << 16;

/// A [`Scorer`] builds token `i`'s term table once it has computed this many of its terms
/// directly: a table costs about what that many direct terms do, so a list that prunes most
/// of its postings never pays for one, and one that cannot pays at most twice.
const TABLE_AFTER: usize = 1 << 15;

/// One posting list's scores, a range of postings at a time: the prior, then each token's
/// term in token order, as [`score_postings`](super::score_postings) adds them over the whole list (the same kernel
/// per element: bit for bit the same scores, whatever the ranges). A range's scores stay in
/// the caller's small buffer while every token is added and the buffer is read, instead of
/// a pass over the whole list's scores per token (a long list's scores do not fit in L2:
/// each pass was a round trip to L3). In a list of at least [`LEVELS_MIN`] postings, a token
/// whose terms keep being computed gets a term table ([`TABLE_AFTER`]; kept by the caller in
/// `tables` across lists), and token 0 is pruned by level ([`Levels`]).
pub(super) struct Scorer<'a> {
    isa: Isa,
    tokens: Vec<Token>,
    /// Each token's [`term_bound`].
    margins: Vec<f32>,
    /// Terms not computed ([`Scorer::score`]'s pruning).
    skipped: usize,
    /// Terms computed directly so far, per token (see [`TABLE_AFTER`]).
    direct: Vec<usize>,
    /// Token 0's levels that can reach a threshold (a long list, a negative weight).
    levels: Option<Levels>,
    pt: &'a [u16],
    len: usize,
    prior: f32,
    /// The term tables' storage (none: every term computed), and which tokens' are built.
    tables: Option<&'a mut Vec<Vec<f32>>>,
    built: Vec<bool>,
}

impl<'a> Scorer<'a> {
    /// The scorer of list `l`; with `tables`, it may build term tables there (see
    /// [`TABLE_AFTER`]); without, the kernel computes every term (the same bits).
    pub(super) fn new(
        isa: Isa,
        l: &Postings<'a>,
        tables: Option<&'a mut Vec<Vec<f32>>>,
    ) -> Scorer<'a> {
        let (n, len) = (l.pq.len(), l.products.len());
        assert!(
            l.w.len() == n && l.pt.len() == n * len,
            "Scorer shapes; this is a bug"
        );
        let tokens: Vec<Token> =
            l.pq.iter()
                .zip(l.w)
                .map(|(&p, &w)| Token::new(p, w))
                .collect();
        let levels = match tokens.first() {
            Some(&q) if len >= LEVELS_MIN => Levels::new(isa, q),
            _ => None,
        };
        Scorer {
            isa,
            margins: l.w.iter().map(|&w| term_bound(w)).collect(),
            skipped: 0,
            direct: vec![0; n],
            levels,
            pt: l.pt,
            len,
            prior: l.prior,
            tables: tables.filter(|_| len >= LEVELS_MIN),
            built: vec![false; n],
            tokens,
        }
    }

    /// Each token's [`term_bound`]: the most its term adds to a score.
    pub(super) fn margins(&self) -> &[f32] {
        &self.margins
    }

    /// Terms not computed so far (a token not added to a posting).
    pub(super) fn skipped_terms(&self) -> usize {
        self.skipped
    }

    /// The scores of postings `start..start + out.len()`, pruned against `floors` (empty, or
    /// one per token and one more, rising): token `i` is added only to the postings whose
    /// partial score — the prior and tokens `0..i` — is at or above `floors[i]`, and a posting
    /// is kept to the end only if its score is at or above `floors[n]`... unless more than
    /// half are left, when a token is added to every posting. Either every score is in
    /// `out` (`None`), or the postings kept (their indices in `out`, ascending) and their
    /// scores are returned (`out` then holds nothing of use): a posting not kept has a score
    /// below `floors[n]` or a partial score below some `floors[i]`. Every score given is the
    /// one [`score_postings`](super::score_postings) gives, bit for bit. The caller picks `floors` so that a partial
    /// score below `floors[i]` cannot make a final one that matters (see `Ranker`).
    ///
    /// Pruned, a token's terms are those of the postings left, gathered into `scratch` (their
    /// indices packed branch-free, 8 at a time). With [`Levels`], token 0 is not computed at
    /// all for a posting whose level cannot bring the prior to `floors[1]`.
    pub(super) fn score<'s>(
        &mut self,
        start: usize,
        out: &mut [f32],
        floors: &[f32],
        scratch: &'s mut Scratch,
    ) -> Option<(&'s [u32], &'s [f32])> {
        let m = out.len();
        let n = self.tokens.len();
        let (pt, len) = (self.pt, self.len);
        let column = |i: usize| &pt[i * len + start..i * len + start + m];
        let floor = |i: usize| floors.get(i).copied().unwrap_or(f32::NEG_INFINITY);
        let Scratch { idx, vals, col } = scratch;
        let mut packed = false;
        let mut first = 0;
        if let Some(levels) = self
            .levels
            .as_mut()
            .filter(|_| floor(1) > f32::NEG_INFINITY)
        {
            // Token 0 by level: a posting whose level's term cannot bring the prior to
            // `floors[1]` is told by its level alone, within `lo..=hi` or not.
            let thr = super::ranker::score_floor(self.prior, &[], floor(1));
            let (lo, hi) = levels.within(thr);
            let c = column(0);
            let alive = pack_levels_within(self.isa, c, lo, hi, idx);
            idx.truncate(alive);
            vals.clear();
            vals.resize(alive, self.prior);
            col.clear();
            col.extend(idx.iter().map(|&j| c[j as usize]));
            self.add(0, col, vals, start + m);
            self.skipped += m - alive;
            (packed, first) = (true, 1);
        } else {
            out.fill(self.prior);
        }
        for i in first..n {
            let f = floor(i);
            if !packed {
                if f == f32::NEG_INFINITY {
                    self.add(i, column(i), out, start + m);
                    continue;
                }
                let alive = pack_at_or_above(self.isa, out, f, idx);
                if 2 * alive > m {
                    self.add(i, column(i), out, start + m);
                    continue;
                }
                idx.truncate(alive);
                vals.clear();
                vals.extend(idx.iter().map(|&j| out[j as usize]));
                packed = true;
            } else {
                keep_at_or_above(idx, vals, f);
            }
            self.skipped += m - idx.len();
            let c = column(i);
            col.clear();
            col.extend(idx.iter().map(|&j| c[j as usize]));
            self.add(i, col, vals, start + m);
        }
        if !packed {
            return None;
        }
        keep_at_or_above(idx, vals, floor(n));
        Some((&idx[..], &vals[..]))
    }

    /// `out[x] += term_i(col[x])` for a chunk of the postings before `end`: from token `i`'s
    /// table once it is worth one, else computed (the same bits: a table entry is `0.0 +
    /// term`, see `scores_at`). Worth one: [`TABLE_AFTER`] terms computed, and as many more
    /// to come at the rate so far over the rest of the list (the rate only falls as the
    /// floor rises).
    fn add(&mut self, i: usize, col: &[u16], out: &mut [f32], end: usize) {
        let q = self.tokens[i];
        if let Some(tables) = self.tables.as_deref_mut() {
            let done = self.direct[i] + col.len();
            let ahead = done as u64 * (self.len - end.min(self.len)) as u64 / end.max(1) as u64;
            if !self.built[i] && done > TABLE_AFTER && ahead > TABLE_AFTER as u64 {
                if tables.len() <= i {
                    tables.resize_with(i + 1, Vec::new);
                }
                fill_table(self.isa, q, &mut tables[i]);
                self.built[i] = true;
            }
            if self.built[i] {
                lookup(self.isa, &tables[i], col, out);
                return;
            }
        }
        self.direct[i] += col.len();
        add_direct(self.isa, q, col, out);
    }

    /// The scores of postings `at` (positions in the list, any order), into `out`: gathered,
    /// then the same kernel as [`Scorer::score`] without pruning or tables, so the same bits
    /// (a table entry is `0.0 + term`, which differs from the term only when that is −0.0,
    /// and adding ±0.0 to a sum that is not −0.0 gives the same sum; a sum that starts from a
    /// prior other than −0.0 never is: `x + y` is −0.0 only when both are).
    pub(super) fn scores_at(&self, at: &[u32], out: &mut Vec<f32>, col: &mut Vec<u16>) {
        out.clear();
        out.resize(at.len(), self.prior);
        for (i, q) in self.tokens.iter().enumerate() {
            let c = &self.pt[i * self.len..(i + 1) * self.len];
            col.clear();
            col.extend(at.iter().map(|&j| c[j as usize]));
            add_direct(self.isa, *q, col, out);
        }
    }
}

/// Levels sampled by [`Levels`]: every 16th, and the last.
const LEVEL_STRIDE: usize = 16;
const LEVEL_SAMPLES: usize = (1 << 16) / LEVEL_STRIDE + 1;

fn sample_level(k: usize) -> usize {
    (k * LEVEL_STRIDE).min(u16::MAX as usize)
}

/// The quantization levels whose term, for a token of negative weight, can reach a rising
/// threshold: a range `lo..=hi` found from the terms of every 16th level, without a table of
/// all 65,536 (which cost about as much as a long list's pruned scoring).
///
/// Why a range, and why the samples suffice. In exact arithmetic the term `w · bracket` has
/// its largest value (0) where `Pt = Pq`, and falls on either side: the bracket, a
/// divergence, grows as `Pt` moves away from `Pq`. The kernel's rounding makes the computed
/// terms wiggle around that shape by at most ~2.2e-7 |w| (measured over 20,000 query sides;
/// `levels_are_unimodal_within_slack` checks every level for hundreds of them, with
/// [`Levels::slack`] = 2e-6 |w|): below
/// the peak's levels (`p_lo`), a level's term is never more than `slack` above any later
/// level's up to `p_lo`, and above them (`p_hi`) never more than `slack` above any earlier
/// one's. So once a sample `s ≤ p_lo` has `term(s) + slack < thr`, every level up to `s` is
/// below `thr` (and from the top, likewise), and the range between is a superset of the
/// levels at or above `thr`: the postings outside it score below and need not be read. A
/// threshold only rises while a list is scanned, so the samples are walked once each.
struct Levels {
    /// The term at each `sample_level(k)`, as the kernel computes it.
    terms: Vec<f32>,
    /// See above: 2e-6 |w|, plus 1e-30 for denormal weights.
    slack: f64,
    /// Samples `0..rise_max` lie below the peak (`≤ p_lo`), `fall_min..` above (`≥ p_hi`).
    rise_max: usize,
    fall_min: usize,
    /// Samples `0..rise` and `fall..` are below the last threshold by `slack`.
    rise: usize,
    fall: usize,
    last: f32,
}

impl Levels {
    /// For a token of negative weight (the others: `None`, no pruning by level; `Token::new`
    /// made the weight finite).
    fn new(isa: Isa, q: Token) -> Option<Levels> {
        if q.w >= 0.0 {
            return None;
        }
        static SAMPLES: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
        let samples =
            SAMPLES.get_or_init(|| (0..LEVEL_SAMPLES).map(|k| sample_level(k) as u16).collect());
        let mut terms = vec![0f32; LEVEL_SAMPLES];
        add_direct(isa, q, samples, &mut terms);
        let (p_lo, p_hi) = Levels::peak(q.pq);
        Some(Levels {
            terms,
            slack: 2e-6 * -(q.w as f64) + 1e-30,
            rise_max: if p_lo < 0 {
                0
            } else {
                p_lo as usize / LEVEL_STRIDE + 1
            },
            fall_min: if p_hi > u16::MAX as i64 {
                LEVEL_SAMPLES
            } else {
                (p_hi as usize)
                    .div_ceil(LEVEL_STRIDE)
                    .min(LEVEL_SAMPLES - 1)
            },
            rise: 0,
            fall: LEVEL_SAMPLES,
            last: f32::NEG_INFINITY,
        })
    }

    /// The levels around the peak, `p_lo + 1..=p_hi - 1`: those next to `Pq / PT_SCALE`.
    fn peak(pq: f32) -> (i64, i64) {
        let c = pq as f64 / PT_SCALE as f64;
        (c.floor() as i64 - 1, c.ceil() as i64 + 1)
    }

    /// `lo..=hi`: every level whose term is at or above `thr` lies within (never empty).
    fn within(&mut self, thr: f32) -> (usize, usize) {
        if thr.is_nan() || thr < self.last {
            (self.rise, self.fall) = (0, LEVEL_SAMPLES);
        }
        self.last = thr;
        let (t, slack) = (thr as f64, self.slack);
        let below = |v: f32| (v as f64) + slack < t;
        while self.rise < self.rise_max && below(self.terms[self.rise]) {
            self.rise += 1;
        }
        while self.fall > self.fall_min && below(self.terms[self.fall - 1]) {
            self.fall -= 1;
        }
        let lo = match self.rise {
            0 => 0,
            r => sample_level(r - 1) + 1,
        };
        let hi = match self.fall {
            LEVEL_SAMPLES => u16::MAX as usize,
            f => sample_level(f) - 1,
        };
        (lo, hi)
    }
}

/// [`Scorer::score`]'s buffers, kept by the caller: the postings left and their partial
/// scores, and one token's quantized probabilities of theirs.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    idx: Vec<u32>,
    vals: Vec<f32>,
    col: Vec<u16>,
}

/// Into `idx`, the `x` with `out[x] >= floor`, ascending; their count. (`idx` may be left
/// longer: the count is what holds.)
fn pack_at_or_above(isa: Isa, out: &[f32], floor: f32, idx: &mut Vec<u32>) -> usize {
    idx.clear();
    idx.resize(out.len() + 8, 0);
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: AVX2 (as in `score_postings`); `idx` has 8 slots past `out.len()`.
        return unsafe { avx2::pack_at_or_above(out, floor, idx) };
    }
    let _ = isa;
    let mut n = 0;
    for (x, &v) in out.iter().enumerate() {
        idx[n] = x as u32;
        n += (v >= floor) as usize;
    }
    n
}

/// Keeps the `(idx, vals)` pairs with `vals >= floor`, in order (branch-free).
fn keep_at_or_above(idx: &mut Vec<u32>, vals: &mut Vec<f32>, floor: f32) {
    let mut n = 0;
    for x in 0..idx.len() {
        let (j, v) = (idx[x], vals[x]);
        idx[n] = j;
        vals[n] = v;
        n += (v >= floor) as usize;
    }
    idx.truncate(n);
    vals.truncate(n);
}

/// Into `idx`, the `x` with `lo <= col[x] <= hi`, ascending; their count (`idx` may be left
/// longer). Nothing when `lo > hi`.
fn pack_levels_within(isa: Isa, col: &[u16], lo: usize, hi: usize, idx: &mut Vec<u32>) -> usize {
    idx.clear();
    idx.resize(col.len() + 8, 0);
    if lo > hi {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: AVX2 (as in `score_postings`); `idx` has 8 slots past `col.len()`.
        return unsafe { avx2::pack_levels_within(col, lo as i32, hi as i32, idx) };
    }
    let _ = isa;
    let mut n = 0;
    for (x, &c) in col.iter().enumerate() {
        idx[n] = x as u32;
        n += (lo <= c as usize && c as usize <= hi) as usize;
    }
    n
}

/// The packing kernels: indices of the lanes that pass, 8 at a time, through a lookup table.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The packing LUT: for each 8-bit mask, the lanes set, first to last, then zeros.
    const fn pack_lut() -> [[u32; 8]; 256] {
        let mut lut = [[0u32; 8]; 256];
        let mut mask = 0;
        while mask < 256 {
            let (mut lane, mut n) = (0, 0);
            while lane < 8 {
                if mask & (1 << lane) != 0 {
                    lut[mask][n] = lane as u32;
                    n += 1;
                }
                lane += 1;
            }
            mask += 1;
        }
        lut
    }
    static PACK: [[u32; 8]; 256] = pack_lut();

    /// `super::pack_levels_within`, 8 at a time, as [`pack_at_or_above`] packs.
    ///
    /// # Safety
    /// AVX2; `idx.len() >= col.len() + 8`; `0 <= lo <= hi <= 65535`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_levels_within(col: &[u16], lo: i32, hi: i32, idx: &mut [u32]) -> usize {
        assert!(
            idx.len() >= col.len() + 8,
            "pack_levels_within room; this is a bug"
        );
        let (below, above) = (_mm256_set1_epi32(lo - 1), _mm256_set1_epi32(hi + 1));
        let mut lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let eight = _mm256_set1_epi32(8);
        let mut n = 0;
        let mut groups = col.chunks_exact(8);
        for g in &mut groups {
            let c = _mm256_cvtepu16_epi32(_mm_loadu_si128(g.as_ptr() as *const __m128i));
            let within =
                _mm256_and_si256(_mm256_cmpgt_epi32(c, below), _mm256_cmpgt_epi32(above, c));
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(within)) as usize;
            let perm = _mm256_loadu_si256(PACK[mask].as_ptr() as *const __m256i);
            let packed = _mm256_permutevar8x32_epi32(lanes, perm);
            _mm256_storeu_si256(idx.as_mut_ptr().add(n) as *mut __m256i, packed);
            n += mask.count_ones() as usize;
            lanes = _mm256_add_epi32(lanes, eight);
        }
        let base = col.len() - groups.remainder().len();
        for (x, &c) in groups.remainder().iter().enumerate() {
            idx[n] = (base + x) as u32;
            n += (lo <= c as i32 && c as i32 <= hi) as usize;
        }
        n
    }

    /// `super::pack_at_or_above`, 8 at a time: the lanes at or above `floor` (`>=`, ordered:
    /// as the scalar `>=` on numbers) packed to the front by a permutation from a table, all
    /// 8 stored, and the count advanced by their number: no branch per lane.
    ///
    /// # Safety
    /// AVX2; `idx.len() >= out.len() + 8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pack_at_or_above(out: &[f32], floor: f32, idx: &mut [u32]) -> usize {
        assert!(
            idx.len() >= out.len() + 8,
            "pack_at_or_above room; this is a bug"
        );
        let f = _mm256_set1_ps(floor);
        let mut lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let eight = _mm256_set1_epi32(8);
        let mut n = 0;
        let mut groups = out.chunks_exact(8);
        for g in &mut groups {
            let ge = _mm256_cmp_ps(_mm256_loadu_ps(g.as_ptr()), f, _CMP_GE_OQ);
            let mask = _mm256_movemask_ps(ge) as usize;
            let perm = _mm256_loadu_si256(PACK[mask].as_ptr() as *const __m256i);
            let packed = _mm256_permutevar8x32_epi32(lanes, perm);
            // `n <= x` for the group's first index `x`, so `n + 8 <= out.len() + 8`.
            _mm256_storeu_si256(idx.as_mut_ptr().add(n) as *mut __m256i, packed);
            n += mask.count_ones() as usize;
            lanes = _mm256_add_epi32(lanes, eight);
        }
        let base = out.len() - groups.remainder().len();
        for (x, &v) in groups.remainder().iter().enumerate() {
            idx[n] = (base + x) as u32;
            n += (v >= floor) as usize;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::kernel::tests::query_sides;
    use crate::score::tests::rng;

    /// What [`Levels`] stands on, at every level: for query sides at the edges and random
    /// ones (on and between levels) and negative weights of several sizes, no level below the
    /// peak's (`p_lo`) has a term more than [`Levels::slack`] above a later level's up to
    /// `p_lo`, nor above `p_hi` more than that above an earlier one's. The largest such
    /// excess stays 10× inside the slack.
    #[test]
    fn levels_are_unimodal_within_slack() {
        let mut worst = 0f64;
        for pq in query_sides(23, 120, 30) {
            for w in [-1.0f32, -0.37, -2.0, -1e-3, -50.0] {
                let q = Token::new(pq, w);
                let slack = Levels::new(Isa::Scalar, q).unwrap().slack;
                let (p_lo, p_hi) = Levels::peak(q.pq);
                let term = |l: i64| q.term(l as u16) as f64;
                let mut check = |levels: &mut dyn Iterator<Item = i64>| {
                    let mut m = f64::NEG_INFINITY;
                    for s in levels {
                        let f = term(s);
                        assert!(
                            m <= f + slack,
                            "pq {pq} w {w} level {s}: {m} > {f} + {slack}"
                        );
                        worst = worst.max((m - f) / -(w as f64));
                        m = m.max(f);
                    }
                };
                check(&mut (0..=p_lo));
                check(&mut (p_hi..=u16::MAX as i64).rev());
            }
        }
        eprintln!("largest wiggle: {worst:e} |w|");
        assert!(worst < 2e-7, "the terms wiggled by {worst} |w|");
    }

    /// [`Levels::within`] against every level: for rising thresholds (then a lower one,
    /// which starts over), every level whose term is at or above the threshold lies in the
    /// range, on every ISA; and the range is narrow (pruning happens).
    #[test]
    fn levels_cover_every_level_at_the_threshold() {
        let mut next = rng(41);
        for case in 0..40 {
            let pq = match case {
                0 => 0.0,
                1 => 1.0,
                2 => 1e-30,
                _ => (next() % 1_000_000) as f32 / 1e6,
            };
            let w = -((1 + next() % 300) as f32 / 100.0);
            let q = Token::new(pq, w);
            let terms: Vec<f32> = (0..=u16::MAX).map(|l| q.term(l)).collect();
            let mut sorted = terms.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let at = |frac: f64| sorted[((sorted.len() - 1) as f64 * frac) as usize];
            let thresholds = [
                f32::NEG_INFINITY,
                at(0.5),
                at(0.1),
                at(0.01),
                at(0.001),
                sorted[0],
                sorted[0] + 1.0,
                at(0.2),
                at(0.02),
            ];
            for isa in Isa::available() {
                let mut levels = Levels::new(isa, q).unwrap();
                for &thr in &thresholds {
                    let (lo, hi) = levels.within(thr);
                    assert!(lo <= hi, "case {case}: empty range");
                    let inside = terms.iter().filter(|&&t| t >= thr).count();
                    for (l, &t) in terms.iter().enumerate() {
                        assert!(
                            t < thr || (lo <= l && l <= hi),
                            "case {case} {isa:?} thr {thr}: level {l} ({t}) outside {lo}..={hi}"
                        );
                    }
                    // Narrow, but for thresholds within the slack of the peak's terms.
                    assert!(
                        thr > at(0.01) || hi - lo < 2 * inside + 4 * LEVEL_STRIDE,
                        "case {case} {isa:?} thr {thr}: {lo}..={hi} for {inside} levels"
                    );
                }
            }
        }
    }
}
