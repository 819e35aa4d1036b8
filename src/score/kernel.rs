//! The S_rele kernel: [`score_postings`] adds every product's S_rele terms over a posting
//! list's quantized columns. A token's query side is computed once ([`Token`]); a product's
//! term is [`Token::term`], the scalar twin, or one lane of `avx2::column`: the same
//! operations in the same order (the polynomial [`ln`], `ln(2 Pt)` read from a table of every
//! quantization level), so the results are bit-identical. Lists of at least
//! [`TERM_TABLE_MIN`] postings read each term from a table of all 65,536 levels instead.

use super::{Postings, PT_SCALE};
use crate::backend::cpu::simd::Isa;

/// `out[j] += S_rele(q, product j)` for every product of a posting list. `pq`, `w`: one value
/// per code token (`n`); `pt`: `n` columns of `out.len()` quantized probabilities, column `i`
/// at `pt[i * P..(i + 1) * P]`. Adding into `out` aggregates codes by `sum`.
pub fn score_postings(isa: Isa, pq: &[f32], w: &[f32], pt: &[u16], out: &mut [f32]) {
    let (n, p) = (pq.len(), out.len());
    assert!(
        w.len() == n && pt.len() == n * p,
        "score_postings shapes; this is a bug"
    );
    for i in 0..n {
        let q = Token::new(pq[i], w[i]);
        let col = &pt[i * p..(i + 1) * p];
        if p >= TERM_TABLE_MIN {
            term_table_column(isa, q, col, out);
        } else {
            add_direct(isa, q, col, out);
        }
    }
}

/// Posting lists at least this long score a token by lookup: its term for all 65,536
/// quantization levels first (the same kernel over `0..=65535`, so the same values), then one
/// table read per posting. The table costs about as much as 65 k postings scored directly, so
/// it pays from about twice that.
pub(super) const TERM_TABLE_MIN: usize = 1 << 17;

/// In a [`Scorer`], lists at least this long prune token 0 by its level ([`Levels`]) and may
/// build term tables ([`TABLE_AFTER`]).
const LEVELS_MIN: usize = 1 << 16;

/// A [`Scorer`] builds token `i`'s term table once it has computed this many of its terms
/// directly: a table costs about what that many direct terms do, so a list that prunes most
/// of its postings never pays for one, and one that cannot pays at most twice.
const TABLE_AFTER: usize = 1 << 15;

/// `out[j] += q.term(col[j])` by way of a table of every level's term (see
/// [`TERM_TABLE_MIN`]): bit-identical to scoring the column directly.
fn term_table_column(isa: Isa, q: Token, col: &[u16], out: &mut [f32]) {
    thread_local! {
        static TABLE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TABLE.with(|t| {
        let mut table = t.borrow_mut();
        fill_table(isa, q, &mut table);
        lookup(isa, &table, col, out);
    });
}

/// `table[l]` = `0.0 + q.term(l)` for every level `l`: each level's term as the column kernel
/// computes it (`0.0 + x` is `x` but for `x = -0.0`, which no sum of [`Scorer`]'s can tell).
fn fill_table(isa: Isa, q: Token, table: &mut Vec<f32>) {
    table.clear();
    table.resize(1 << 16, 0.0);
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: as in `score_postings`; the table has 65,536 entries.
        unsafe { avx2::levels(q, table) };
        return;
    }
    let _ = isa;
    for (l, v) in table.iter_mut().enumerate() {
        *v += q.term(l as u16);
    }
}

/// `out[j] += table[col[j]]` (`table`: 65,536 entries).
fn lookup(isa: Isa, table: &[f32], col: &[u16], out: &mut [f32]) {
    assert_eq!(table.len(), 1 << 16, "a term table has a slot per level");
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: as in `score_postings`; every index is a u16, inside the 65,536-entry table.
        unsafe { avx2::lookup(table, col, out) };
        return;
    }
    let _ = isa;
    for (o, &c) in out.iter_mut().zip(col) {
        *o += table[c as usize];
    }
}

/// `out[j] += q.term(col[j])`, computed (the SIMD kernel or its scalar twin: the same bits).
fn add_direct(isa: Isa, q: Token, col: &[u16], out: &mut [f32]) {
    assert_eq!(col.len(), out.len(), "a term per score");
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: `runnable` gives a non-scalar ISA only when the CPU has AVX2 + FMA + F16C;
        // `col` and `out` have the same length.
        unsafe { avx2::column(q, col, out) };
        return;
    }
    let _ = isa;
    for (o, &t) in out.iter_mut().zip(col) {
        *o += q.term(t);
    }
}

/// One posting list's scores, a range of postings at a time: the prior, then each token's
/// term in token order, as [`score_postings`] adds them over the whole list (the same kernel
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
    /// one [`score_postings`] gives, bit for bit. The caller picks `floors` so that a partial
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
/// terms wiggle around that shape by at most ~1.6e-7 |w| (`levels_are_unimodal_within_slack`
/// checks every level for hundreds of query sides, with [`Levels::slack`] = 2e-6 |w|): below
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

/// An upper bound of every term the kernel computes for a token of weight `w` (any `Pq`,
/// any level), rounding included. A term is `w (a + b)` with `a + b` the bracket of Eq. 7,
/// between 0 and `2 ln 2` in exact arithmetic (`Pq` is clamped to `[0, 1]`, `Pt ≤ 1`); the
/// kernel's `ln` (~2e-7 relative) and roundings move the bracket by ~1e-6 at most (tested at
/// every level: `term_bound_holds_at_every_level`), inside the margin kept here, `1e-5 |w|`.
/// So a negative weight's term is at most that margin, a positive one's at most `1.5 w` plus
/// `1.5e-3 w`; a zero or non-finite weight's (scored 0) nothing. The margin is what pruning
/// gives away: a posting is scored on while its partial score is within the later tokens'
/// margins of the floor, and the best scores of a long list lie within ~1e-4 |w| of each
/// other. With `1.5e-3 |w|` (the margin `list_bound` keeps), 11 % of the long lists'
/// postings passed token 0 at paper scale; with `1e-5 |w|`, 6 %. What is left is geometry:
/// the best postings of a two-token code lie in an ellipse of the two terms, and its shadow
/// on token 0's levels holds about the square root of its share.
pub(super) fn term_bound(w: f32) -> f32 {
    if !w.is_finite() || w == 0.0 {
        0.0
    } else if w < 0.0 {
        1e-5 * -w
    } else {
        1.5 * w + 1.5e-3 * w
    }
}

/// The query side of one token, with what every product's term reuses.
#[derive(Clone, Copy)]
struct Token {
    pq: f32,
    w: f32,
    /// `ln(2 Pq)` (unused when `Pq == 0`).
    ln2pq: f32,
}

impl Token {
    fn new(pq: f32, w: f32) -> Token {
        // Not a probability (NaN, ±inf): no evidence, 0 — the same on every ISA.
        let pq = if pq.is_finite() {
            pq.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let w = if w.is_finite() { w } else { 0.0 };
        Token {
            pq,
            w,
            ln2pq: if pq > 0.0 { ln(2.0 * pq) } else { 0.0 },
        }
    }

    /// `w [Pq ln(2Pq/m) + Pt ln(2Pt/m)]`, `m = Pq + Pt`, for the stored probability `q`
    /// (`Pt = q · PT_SCALE`): the scalar twin of `avx2::column`'s lanes, operation for
    /// operation. `ln(2 Pt)` comes from [`ln2pt_table`] (the same `ln`, computed once per
    /// quantization level).
    #[inline]
    fn term(&self, q: u16) -> f32 {
        let pt = q as f32 * PT_SCALE;
        let m = self.pq + pt;
        if m <= 0.0 {
            return 0.0;
        }
        let ln_m = ln(m);
        let a = self.pq * (self.ln2pq - ln_m);
        let b = if pt > 0.0 {
            pt * (ln2pt_table()[q as usize] - ln_m)
        } else {
            0.0
        };
        self.w * (a + b)
    }
}

/// `ln(2 · q · PT_SCALE)` for every quantization level `q` (0 for `q = 0`, never read): one of
/// the two logarithms of a term becomes a lookup (256 KiB, L2-resident), and the value is the
/// very `ln` the kernel computed before, so scores are unchanged bit for bit.
fn ln2pt_table() -> &'static [f32; 1 << 16] {
    static TABLE: std::sync::OnceLock<Box<[f32; 1 << 16]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 1 << 16]);
        for (q, v) in t.iter_mut().enumerate().skip(1) {
            let pt = q as f32 * PT_SCALE;
            *v = ln(pt + pt);
        }
        t
    })
}

/// Cephes' `logf` polynomial (relative error ~1e-7) for `x > 0` normal: `x = 2^e · m`,
/// `m` in `[√½, √2)`, `ln x = e ln 2 + ln m`. The AVX2 kernel computes the same operations.
#[inline]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let mut m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000); // [0.5, 1)
    if m < SQRT_HALF {
        e -= 1;
        m = m + m - 1.0;
    } else {
        m -= 1.0;
    }
    let e = e as f32;
    let z = m * m;
    let mut y = LN_C[0];
    for &c in &LN_C[1..] {
        y = y.mul_add(m, c);
    }
    y = y * m * z;
    y = e.mul_add(LN2_LO, y);
    y = (-0.5f32).mul_add(z, y);
    let r = m + y;
    e.mul_add(LN2_HI, r)
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `logf` coefficients, highest degree first.
#[allow(clippy::excessive_precision)]
const LN_C: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461_0e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_5e-1,
    -2.499_999_4e-1,
    3.333_333_1e-1,
];

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ln2pt_table, Token, LN2_HI, LN2_LO, LN_C, PT_SCALE, SQRT_HALF};

    /// `ln` of 8 lanes, operation for operation as `super::ln`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ln8(x: __m256) -> __m256 {
        let bits = _mm256_castps_si256(x);
        let mut e = _mm256_sub_epi32(
            _mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
            _mm256_set1_epi32(126),
        );
        let mut m = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x807f_ffffu32 as i32)),
            _mm256_set1_epi32(0x3f00_0000),
        ));
        let small = _mm256_cmp_ps(m, _mm256_set1_ps(SQRT_HALF), _CMP_LT_OQ);
        // small: e -= 1, m = m + m - 1; else m = m - 1.
        e = _mm256_add_epi32(e, _mm256_castps_si256(small)); // mask lanes are -1
        let doubled = _mm256_sub_ps(_mm256_add_ps(m, m), _mm256_set1_ps(1.0));
        m = _mm256_blendv_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0)), doubled, small);
        let e = _mm256_cvtepi32_ps(e);
        let z = _mm256_mul_ps(m, m);
        let mut y = _mm256_set1_ps(LN_C[0]);
        for &c in &LN_C[1..] {
            y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(c));
        }
        y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
        y = _mm256_fmadd_ps(e, _mm256_set1_ps(LN2_LO), y);
        y = _mm256_fmadd_ps(_mm256_set1_ps(-0.5), z, y);
        let r = _mm256_add_ps(m, y);
        _mm256_fmadd_ps(e, _mm256_set1_ps(LN2_HI), r)
    }

    /// `out[j] += table[col[j]]`, 8 products at a time (a gather); `table` has 65,536 entries.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lookup(table: &[f32], col: &[u16], out: &mut [f32]) {
        debug_assert_eq!(table.len(), 1 << 16);
        let mut cols = col.chunks_exact(8);
        let mut outs = out.chunks_exact_mut(8);
        for (c, o) in (&mut cols).zip(&mut outs) {
            let qi = _mm256_cvtepu16_epi32(_mm_loadu_si128(c.as_ptr() as *const __m128i));
            let v = _mm256_i32gather_ps::<4>(table.as_ptr(), qi);
            let acc = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), v);
            _mm256_storeu_ps(o.as_mut_ptr(), acc);
        }
        for (o, &c) in outs.into_remainder().iter_mut().zip(cols.remainder()) {
            *o += table[c as usize];
        }
    }

    /// `table[l] += q.term(l)` for every level `l` in `0..=65535`: [`column`] over the levels
    /// in order, whose `ln(2 Pt)` are then consecutive entries of [`ln2pt_table`], read by a
    /// load instead of a gather (the same values, so the same terms bit for bit).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn levels(q: Token, table: &mut [f32]) {
        assert_eq!(table.len(), 1 << 16, "a term table has a slot per level");
        let (pq, w, ln2pq) = (
            _mm256_set1_ps(q.pq),
            _mm256_set1_ps(q.w),
            _mm256_set1_ps(q.ln2pq),
        );
        let zero = _mm256_setzero_ps();
        let ln2pts = ln2pt_table();
        let step = _mm256_set1_epi32(8);
        let mut qi = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (l, o) in (0..).step_by(8).zip(table.chunks_exact_mut(8)) {
            let pt = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), _mm256_set1_ps(PT_SCALE));
            let m = _mm256_add_ps(pq, pt);
            let ln_m = ln8(m);
            let a = _mm256_mul_ps(pq, _mm256_sub_ps(ln2pq, ln_m));
            let ln2pt = _mm256_loadu_ps(ln2pts[l..l + 8].as_ptr());
            let b = _mm256_mul_ps(pt, _mm256_sub_ps(ln2pt, ln_m));
            let b = _mm256_and_ps(b, _mm256_cmp_ps(pt, zero, _CMP_GT_OQ));
            let term = _mm256_mul_ps(w, _mm256_add_ps(a, b));
            let term = _mm256_and_ps(term, _mm256_cmp_ps(m, zero, _CMP_GT_OQ));
            let acc = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), term);
            _mm256_storeu_ps(o.as_mut_ptr(), acc);
            qi = _mm256_add_epi32(qi, step);
        }
    }

    /// `out[j] += q.term(col[j])`, 8 products at a time; the tail as the scalar
    /// twin.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn column(q: Token, col: &[u16], out: &mut [f32]) {
        let (pq, w, ln2pq) = (
            _mm256_set1_ps(q.pq),
            _mm256_set1_ps(q.w),
            _mm256_set1_ps(q.ln2pq),
        );
        let zero = _mm256_setzero_ps();
        let table = ln2pt_table().as_ptr();
        let mut cols = col.chunks_exact(8);
        let mut outs = out.chunks_exact_mut(8);
        for (c, o) in (&mut cols).zip(&mut outs) {
            let qi = _mm256_cvtepu16_epi32(_mm_loadu_si128(c.as_ptr() as *const __m128i));
            let pt = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), _mm256_set1_ps(PT_SCALE));
            let m = _mm256_add_ps(pq, pt);
            let ln_m = ln8(m);
            let a = _mm256_mul_ps(pq, _mm256_sub_ps(ln2pq, ln_m));
            // ln(2 Pt) by lookup: every index is a u16, inside the 65,536-entry table.
            let ln2pt = _mm256_i32gather_ps::<4>(table, qi);
            let b = _mm256_mul_ps(pt, _mm256_sub_ps(ln2pt, ln_m));
            let b = _mm256_and_ps(b, _mm256_cmp_ps(pt, zero, _CMP_GT_OQ));
            let term = _mm256_mul_ps(w, _mm256_add_ps(a, b));
            let term = _mm256_and_ps(term, _mm256_cmp_ps(m, zero, _CMP_GT_OQ));
            let acc = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), term);
            _mm256_storeu_ps(o.as_mut_ptr(), acc);
        }
        for (o, &t) in outs.into_remainder().iter_mut().zip(cols.remainder()) {
            *o += q.term(t);
        }
    }

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
    use crate::score::{s_rele_f64, tests::rng};

    /// A list long enough to be scored through the per-token table gives bit for bit what
    /// scoring each posting directly gives, on every ISA.
    #[test]
    fn long_lists_by_table_equal_direct_terms() {
        let mut next = rng(99);
        let p = TERM_TABLE_MIN + 13;
        let n = 3;
        let pq: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect();
        let w: Vec<f32> = (0..n).map(|i| -0.5 - i as f32 * 0.25).collect();
        let pt: Vec<u16> = (0..n * p).map(|_| next() as u16).collect();
        let mut want = vec![0.25f32; p];
        for i in 0..n {
            let q = Token::new(pq[i], w[i]);
            for (o, &c) in want.iter_mut().zip(&pt[i * p..(i + 1) * p]) {
                *o += q.term(c);
            }
        }
        for isa in Isa::available() {
            let mut got = vec![0.25f32; p];
            score_postings(isa, &pq, &w, &pt, &mut got);
            for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "{isa:?} product {j}: {g} vs {e}");
            }
        }
    }

    /// The term table's levels kernel (consecutive `ln(2 Pt)` loads) gives what the column
    /// kernel (a gather) gives over the same levels, bit for bit, every level.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn term_table_levels_equal_the_column_kernel() {
        if !Isa::available().contains(&Isa::Avx2) {
            return;
        }
        let levels: Vec<u16> = (0..=u16::MAX).collect();
        for (pq, w) in [
            (0.0, -1.0),
            (0.3, -1.0),
            (1.0, 0.5),
            (1e-30, -2.0),
            (0.77, 1.25),
        ] {
            let q = Token::new(pq, w);
            let (mut a, mut b) = (vec![0.5f32; 1 << 16], vec![0.5f32; 1 << 16]);
            // SAFETY: AVX2 + FMA + F16C are there (checked above); equal lengths.
            unsafe {
                avx2::levels(q, &mut a);
                avx2::column(q, &levels, &mut b);
            }
            for l in 0..1 << 16 {
                assert_eq!(a[l].to_bits(), b[l].to_bits(), "pq {pq} w {w} level {l}");
            }
        }
    }

    /// Query-side probabilities to test at: the edges (0, denormal, tiny, ½, 1), `random`
    /// ones, and `on_levels` that are quantization levels exactly.
    fn query_sides(seed: u64, random: usize, on_levels: usize) -> Vec<f32> {
        let mut next = rng(seed);
        let mut pqs = vec![
            0.0,
            f32::from_bits(1),
            1e-30,
            1e-7,
            0.5,
            1.0,
            1.0 - f32::EPSILON,
        ];
        pqs.extend((0..random).map(|_| (next() % 1_000_000) as f32 / 1e6));
        pqs.extend((0..on_levels).map(|_| (next() % 65536) as f32 * PT_SCALE));
        pqs
    }

    /// [`term_bound`] holds at every quantization level, with room: query sides at the edges
    /// (0, denormal, tiny, ½, 1) and random ones, weights of both signs; a negative weight's
    /// largest term is below 1e-6 |w| (the margin is 1e-5 |w|).
    #[test]
    fn term_bound_holds_at_every_level() {
        let mut worst = 0f32;
        for pq in query_sides(17, 60, 20) {
            for w in [-1.0f32, -0.37, -2.0, 1.0, 0.5] {
                let q = Token::new(pq, w);
                let bound = term_bound(w);
                for l in 0..=u16::MAX {
                    let t = q.term(l);
                    assert!(t <= bound, "pq {pq} w {w} level {l}: {t} > {bound}");
                    if w < 0.0 {
                        worst = worst.max(t / -w);
                    }
                }
            }
        }
        assert!(worst < 1e-6, "a negative weight's term reached {worst} |w|");
    }

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

    #[test]
    fn ln_matches_f64() {
        let mut next = rng(3);
        for _ in 0..100_000 {
            let x = f32::from_bits((next() as u32 % 0x3f80_0000).max(0x0080_0000)) * 2.0;
            let (got, want) = (ln(x) as f64, (x as f64).ln());
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1.0),
                "ln({x}) = {got}, want {want}"
            );
        }
    }

    /// Every product of random posting lists (zeros included, odd lengths for the tails), on
    /// every ISA: bit-identical across ISAs and within 1e-5 of the f64 formula.
    #[test]
    fn postings_match_the_f64_formula_and_each_other() {
        let mut next = rng(11);
        for (n, p) in [(1, 1), (3, 7), (5, 8), (6, 33), (10, 1000)] {
            let pq: Vec<f32> = (0..n)
                .map(|i| {
                    if i == 1 {
                        0.0
                    } else {
                        (next() % 10_000) as f32 / 10_000.0
                    }
                })
                .collect();
            let w: Vec<f32> = (0..n)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let pt: Vec<u16> = (0..n * p)
                .map(|k| if k % 7 == 0 { 0 } else { next() as u16 })
                .collect();
            let mut results = Vec::new();
            for isa in Isa::available() {
                let mut out = vec![0.25f32; p]; // accumulates onto what is there
                score_postings(isa, &pq, &w, &pt, &mut out);
                for j in 0..p {
                    let col: Vec<f64> = (0..n)
                        .map(|i| (pt[i * p + j] as f32 * PT_SCALE) as f64)
                        .collect();
                    let want = 0.25
                        + s_rele_f64(
                            &pq.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                            &col,
                            &w.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                        );
                    assert!(
                        (out[j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{isa:?} n={n} p={p} j={j}: {} vs {want}",
                        out[j]
                    );
                }
                results.push(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
            assert!(
                results.windows(2).all(|r| r[0] == r[1]),
                "ISAs disagree for n={n} p={p}"
            );
        }
    }
}
