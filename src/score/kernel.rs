//! The S_rele kernel: [`score_postings`] adds every product's S_rele terms over a posting
//! list's quantized columns. A token's query side is computed once ([`Token`]); a product's
//! term is [`Token::term`], the scalar twin, or one lane of `avx2::column`: the same
//! operations in the same order (the polynomial [`ln`], `ln(2 Pt)` read from a table of every
//! quantization level), so the results are bit-identical. Lists of at least
//! [`TERM_TABLE_MIN`] postings read each term from a table of all 65,536 levels instead.

use super::PT_SCALE;
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
/// computes it (`0.0 + x` is `x` but for `x = -0.0`, which no sum of [`Scorer`](super::scorer::Scorer)'s can tell).
pub(super) fn fill_table(isa: Isa, q: Token, table: &mut Vec<f32>) {
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
pub(super) fn lookup(isa: Isa, table: &[f32], col: &[u16], out: &mut [f32]) {
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
pub(super) fn add_direct(isa: Isa, q: Token, col: &[u16], out: &mut [f32]) {
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
pub(super) struct Token {
    pub(super) pq: f32,
    pub(super) w: f32,
    /// `ln(2 Pq)` (unused when `Pq == 0`).
    ln2pq: f32,
}

impl Token {
    pub(super) fn new(pq: f32, w: f32) -> Token {
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
    pub(super) fn term(&self, q: u16) -> f32 {
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
}

#[cfg(test)]
pub(super) mod tests {
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
    /// kernel (a gather) gives over the same levels, bit for bit, every level; and the column
    /// kernel what its scalar twin gives.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn term_table_levels_equal_the_column_kernel() {
        if !Isa::available().contains(&Isa::Avx2) {
            eprintln!("skipping the term table's levels kernel: this CPU has no AVX2");
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
        // The column kernel against its scalar twin (`Token::term`), every level, at the edges
        // of the query side (0, denormal, tiny, 1 − ε, 1, on a level) and weights of both signs.
        for pq in query_sides(11, 4, 4) {
            for w in [-1.0f32, -0.3, 0.7] {
                let q = Token::new(pq, w);
                let mut got = vec![0.25f32; 1 << 16];
                // SAFETY: as above.
                unsafe { avx2::column(q, &levels, &mut got) };
                for (l, g) in got.iter().enumerate() {
                    let want = 0.25 + q.term(l as u16);
                    assert_eq!(g.to_bits(), want.to_bits(), "pq {pq:e} w {w} level {l}");
                }
            }
        }
    }

    /// Query-side probabilities to test at: the edges (0, denormal, tiny, ½, 1), `random`
    /// ones, and `on_levels` that are quantization levels exactly.
    pub(in crate::score) fn query_sides(seed: u64, random: usize, on_levels: usize) -> Vec<f32> {
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
