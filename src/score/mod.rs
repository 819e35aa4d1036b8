//! GRAM's query–product relevance over a posting list: for a code of `n` tokens shared by the
//! query and a product,
//!
//! ```text
//! S_rele(q, t) = Σ_i w_i [ Pq_i ln(2 Pq_i / (Pq_i + Pt_i)) + Pt_i ln(2 Pt_i / (Pq_i + Pt_i)) ]
//! ```
//!
//! (paper Eq. 7; `Pq_i` / `Pt_i` = probability of the code's i-th token generated from the query /
//! from the product; `w_i` the granularity weights, signs included, learned by the training
//! tools). A term with a zero probability contributes its limit, 0.
//!
//! The query side is one value per token; the product side is a column per token over the
//! posting list's products (structure of arrays), quantized to `u16` (`Pt = q / 65535`, error
//! ≤ 7.7e-6), so one pass scores a whole posting list with SIMD across products. The AVX2
//! kernel and its scalar twin run the same operations in the same order (the same polynomial
//! `ln`, the same fused multiply-adds), so their results are bit-identical; both are checked
//! against an f64 reference of the formula. [`rank`] scores every query code's posting list,
//! aggregates a product's scores across codes (`sum` or `max`) and keeps the top K.
//!
//! A query code may carry a **prior** ([`Postings::prior`]): a constant every product of its
//! posting list starts from before the code's S_rele terms are added,
//!
//! ```text
//! score(q, t, c) = prior(c) + S_rele(q, t, c),   prior(c) = α · log P(c | q) [/ (|c| + 1)]
//! ```
//!
//! ([`code_prior`]; `log P(c | q)` = the sum of the query-side log-probabilities of the code's
//! tokens and its EOS, divided by their count when length-normalized). S_rele alone is near 0
//! — its best value — when both sides give a code's tokens a small probability, so it ranks
//! products reached only through the query's *unlikely* codes first; the prior makes a
//! product reached through a likely code win. With `α = 0` the prior is `+0.0` and every score
//! is bit for bit what S_rele alone gives (the accumulators start from `0.0` either way).

use crate::backend::cpu::simd::Isa;

/// `Pt = q as f32 * PT_SCALE`.
pub const PT_SCALE: f32 = 1.0 / 65535.0;

/// Quantizes a probability for the store (clamped to `0..=1`, rounded to nearest).
pub fn quantize_pt(p: f32) -> u16 {
    (p.clamp(0.0, 1.0) * 65535.0).round() as u16
}

/// The f64 reference: S_rele of one product.
pub fn s_rele_f64(pq: &[f64], pt: &[f64], w: &[f64]) -> f64 {
    let term = |a: f64, m: f64| if a > 0.0 { a * (2.0 * a / m).ln() } else { 0.0 };
    pq.iter()
        .zip(pt)
        .zip(w)
        .map(|((&a, &b), &w)| w * (term(a, a + b) + term(b, a + b)))
        .sum()
}

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
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if isa.runnable() != Isa::Scalar {
            // SAFETY: `runnable` gives a non-scalar ISA only when the CPU has AVX2 + FMA +
            // F16C; `col` and `out` have the same length.
            unsafe { avx2::column(q, col, out) };
            continue;
        }
        let _ = isa;
        for (o, &t) in out.iter_mut().zip(col) {
            *o += q.term(t);
        }
    }
}

/// Posting lists at least this long score a token by lookup: its term for all 65,536
/// quantization levels first (the same kernel over `0..=65535`, so the same values), then one
/// table read per posting. The table costs about as much as 65 k postings scored directly, so
/// it pays from about twice that.
const TERM_TABLE_MIN: usize = 1 << 17;

/// `out[j] += q.term(col[j])` by way of a table of every level's term (see
/// [`TERM_TABLE_MIN`]): bit-identical to scoring the column directly.
fn term_table_column(isa: Isa, q: Token, col: &[u16], out: &mut [f32]) {
    thread_local! {
        static TABLE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    static LEVELS: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    let levels = LEVELS.get_or_init(|| (0..=u16::MAX).collect());
    TABLE.with(|t| {
        let mut table = t.borrow_mut();
        table.clear();
        table.resize(1 << 16, 0.0);
        // 0.0 + term = term exactly: the table holds each level's term as the column kernel
        // computes it.
        #[cfg(target_arch = "x86_64")]
        if isa.runnable() != Isa::Scalar {
            // SAFETY: as in `score_postings`; the table has 65,536 entries.
            unsafe { avx2::levels(q, &mut table) };
        } else {
            for (v, &l) in table.iter_mut().zip(levels.iter()) {
                *v += q.term(l);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            for (v, &l) in table.iter_mut().zip(levels.iter()) {
                *v += q.term(l);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if isa.runnable() != Isa::Scalar {
            // SAFETY: as above; every index is a u16, inside the 65,536-entry table.
            unsafe { avx2::lookup(&table, col, out) };
            return;
        }
        for (o, &c) in out.iter_mut().zip(col) {
            *o += table[c as usize];
        }
    });
}

/// The prior of a query code ([`Postings::prior`]): `alpha * Σ logprobs`, divided by
/// `logprobs.len()` when `per_token` (`logprobs`: the code's tokens and its EOS, from the
/// query). `0.0` (never `-0.0`) when `alpha` is 0 or the product is not finite (a `-inf`
/// log-probability, NaN), so that an engine without the term scores exactly as without it and
/// a bad input contributes no evidence — the same containment as S_rele's query side.
pub fn code_prior(alpha: f32, logprobs: &[f32], per_token: bool) -> f32 {
    if alpha == 0.0 || logprobs.is_empty() {
        return 0.0;
    }
    let mut lp = 0f32;
    for &l in logprobs {
        lp += l;
    }
    if per_token {
        lp /= logprobs.len() as f32;
    }
    let prior = alpha * lp;
    if prior.is_finite() && prior != 0.0 {
        prior
    } else {
        0.0
    }
}

/// How a product's scores from several codes combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Max,
}

/// One query code's posting list: the products carrying the code (ascending ids) and their
/// quantized token probabilities (`pq.len()` columns of `products.len()`).
#[derive(Debug, Clone, Copy)]
pub struct Postings<'a> {
    pub products: &'a [u32],
    pub pt: &'a [u16],
    /// Query-side probability of each of the code's tokens.
    pub pq: &'a [f32],
    /// Granularity weight of each token position.
    pub w: &'a [f32],
    /// What every product reached through this code starts from before its S_rele terms
    /// ([`code_prior`]; `0.0` for S_rele alone).
    pub prior: f32,
}

/// A ranked product: its id, aggregated score, and the query codes (indices into the lists
/// given to [`rank`]) that reached it, ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub product: u32,
    pub score: f32,
    pub codes: Vec<u32>,
}

/// Scores every posting of every query code, aggregates per product, and returns the best `k`
/// products, best first (ties: lower product id first). Postings naming a product at or past
/// `products` (a corrupt list) are ignored.
///
/// Higher is better. The bracket of Eq. 7 is a divergence (0 when `Pq = Pt`), so the weights
/// carry the sign: negative weights make the closest products rank first (the default of
/// `gram.json`).
pub fn rank(
    isa: Isa,
    lists: &[Postings],
    aggregate: Aggregate,
    k: usize,
    products: u32,
) -> Vec<Hit> {
    // (product, code, score) for every posting, then grouped by product.
    let mut all: Vec<(u32, u32, f32)> =
        Vec::with_capacity(lists.iter().map(|l| l.products.len()).sum());
    let mut scores = Vec::new();
    for (c, l) in lists.iter().enumerate() {
        scores.clear();
        scores.resize(l.products.len(), l.prior);
        score_postings(isa, l.pq, l.w, l.pt, &mut scores);
        all.extend(
            l.products
                .iter()
                .zip(&scores)
                .filter(|(&p, _)| p < products)
                .map(|(&p, &s)| (p, c as u32, s)),
        );
    }
    all.sort_unstable_by_key(|&(p, c, _)| (p, c));
    let mut hits: Vec<Hit> = Vec::new();
    for (p, c, s) in all {
        match hits.last_mut() {
            Some(h) if h.product == p => {
                h.score = match aggregate {
                    Aggregate::Sum => h.score + s,
                    Aggregate::Max => h.score.max(s),
                };
                h.codes.push(c);
            }
            _ => hits.push(Hit {
                product: p,
                score: s,
                codes: vec![c],
            }),
        }
    }
    let better = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.product.cmp(&b.product));
    if k == 0 {
        return Vec::new();
    }
    if hits.len() > k {
        hits.select_nth_unstable_by(k - 1, better);
        hits.truncate(k);
    }
    hits.sort_unstable_by(better);
    hits
}

/// The fast twin of [`rank`], for serving: the same hits, bit for bit, on valid posting lists
/// (strictly ascending; tested against `rank` and [`Ranker::rank_blocks`]). Every list is
/// scored first (sequentially, SIMD); then, for `k` up to [`THRESHOLD_MAX_K`] and ordinary
/// scores (`ordinary`: finite, never `-0.0`), a **threshold pass** replaces the merge.
///
/// - **max**: the lists are scanned in code order against a running top `k` of distinct
///   products (`TopK`); a posting below the `k`-th best score kept so far (the floor) cannot
///   enter it (nor raise a product kept, whose score is already above), and a branch-free
///   compare of 16 scores at a time skips nearly all of them. The postings at the floor
///   (1,024 scanned against one floor, their product ids prefetched a chunk ahead: the kernel
///   never read them) raise their product's best score or enter; every `k` entries the best
///   `k` are selected and the floor rises. A product's best posting is never skipped while it
///   could be among the `k` best (the floor is the `k`-th of `k` distinct products' real
///   scores), so the `k` kept at the end are the `k` best: ~2,300 offers a query at the
///   median instead of a merge of every posting.
/// - **sum**: a product's total is at most its score in any one list plus every other list's
///   best positive score (rounded additions are monotone, so this holds in f32 too). The max
///   pass gives `2k` products; the `k`-th best of their exact totals is a floor `t` at or
///   below the final `k`-th total; every posting of every product that reaches `t` then
///   passes a per-list score floor (the bound inverted by bisection, `score_floor`), so the
///   postings that pass name every product of the answer. Only those few are aggregated.
///
/// Either way the final products are then looked up in every list (`Ranker::gather`: both
/// sides ascend, the shorter is searched for in the longer) and their scores recomputed by
/// `rank`'s own chain — the first score, then `max` or `+` in code order over all their
/// postings — with the codes that reached them. The rest (`k` past [`THRESHOLD_MAX_K`],
/// non-finite or `-0.0` scores, where `f32::max` and the skipping would tell `±0` or NaN apart
/// differently) goes to the block merge, [`Ranker::rank_blocks`], the path before these.
///
/// The block merge: the lists are merged one block of product ids at a time: each posting of
/// the block aggregates into a block-local slot (32 Ki of them, 256 KiB, reused for every block and so
/// always in cache — a posting list jumps across millions of products, and a slot per product
/// would make nearly every posting a cache miss), and when the block is done its products are
/// offered to a running top-`k` heap, most turned away by one comparison. Only the final `k`
/// look up which codes reached them (binary search in the ascending lists). No tuple per
/// posting, no sort of them, no per-product memory.
///
/// Within a block the lists go in code order, so every product's aggregate is summed in the
/// same order as `rank` sums it.
#[derive(Debug, Default)]
pub struct Ranker {
    slots: Vec<Slot>,
    /// Stamps `slots` for the current block: nothing is cleared between blocks or queries.
    epoch: u32,
    touched: Vec<u32>,
    /// Every list's scores, list after list; list `c`'s start at `at[c]`.
    scores: Vec<f32>,
    at: Vec<usize>,
    top: std::collections::BinaryHeap<Worst>,
    /// The threshold passes' running top `k`, and the sum pass's candidates.
    best: TopK,
    candidates: Vec<u32>,
    /// One chunk's postings at the floor (positions in their list) and their products.
    hits: Vec<u32>,
    hit_ids: Vec<u32>,
}

/// The largest `k` the threshold passes take (a product kept is found by a scan of the up to
/// `2k` kept); past it, [`Ranker::rank_blocks`].
pub const THRESHOLD_MAX_K: usize = 4096;

/// Whether every score of these lists, and every sum of them, is finite and never `-0.0`:
/// every prior finite and not `-0.0`, and the priors plus a bound of every S_rele term far
/// from overflow. A term is `w (a + b)` with `|a + b| < 512` even for denormal `Pq` (each `ln`
/// here is above −90, times a probability ≤ 1), and a non-finite `w` scores 0
/// ([`Token::new`]). A sum starts from the prior, and `x + y` is `-0.0` only when both are,
/// so no score is `-0.0`. On such scores `f32::max` and `>` agree with the real order and
/// equal scores have equal bits, which the threshold passes rely on.
fn ordinary(lists: &[Postings]) -> bool {
    let mut bound = 0f64;
    for l in lists {
        if !l.prior.is_finite() || l.prior.to_bits() == (-0f32).to_bits() {
            return false;
        }
        let w: f64 =
            l.w.iter()
                .filter(|w| w.is_finite())
                .map(|&w| w.abs() as f64)
                .sum();
        bound += l.prior.abs() as f64 + 512.0 * w;
    }
    bound < 1e37
}

/// Product ids aggregated together by [`Ranker`]: 32 Ki slots, 256 KiB, an L2's share.
const RANK_BLOCK: u32 = 1 << 15;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// The block that last wrote `score`.
    epoch: u32,
    score: f32,
}

/// A `(product, score)` ordered so that the heap's top is the worst kept: lowest score, and
/// among equal scores the highest product id (`rank`'s tie-break).
#[derive(Debug, Clone, Copy)]
struct Worst(u32, f32);

impl Worst {
    fn key(&self, other: &Worst) -> std::cmp::Ordering {
        other.1.total_cmp(&self.1).then(self.0.cmp(&other.0))
    }
}

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.key(other).is_eq()
    }
}

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key(other)
    }
}

/// The best `k` distinct products offered so far ([`Ranker`]'s threshold passes), as
/// [`TopK::key`]s in no order: the best `k` as of the last compaction (all at or above
/// `floor`) and those that entered since; at `2k` kept, a selection (`select_nth_unstable`)
/// keeps the best `k` and raises the floor. No heap: an entry costs a push, and the selection
/// a few nanoseconds an entry (a heap's sift was ~30 ns of mispredicted branches). A count per
/// hash bucket of the products kept tells a product not kept — nearly every one offered — in
/// one read; a kept one is found by a scan.
#[derive(Debug, Default)]
struct TopK {
    k: usize,
    kept: Vec<u64>,
    /// The `k`-th best key at the last compaction; 0 (below every finite score's key) before.
    floor: u64,
    /// Kept products per bucket of [`TopK::bucket`] (`2k ≤ 4 THRESHOLD_MAX_K` fits a `u16`).
    held: Vec<u16>,
}

impl TopK {
    /// 16 Ki buckets (32 KiB): at `k` = 300 (300–600 kept) a product not kept is sent to
    /// the scan 2–4 % of the time.
    const BUCKETS: u32 = 1 << 14;

    fn bucket(product: u32) -> usize {
        (product.wrapping_mul(0x9e37_79b1) >> (32 - Self::BUCKETS.trailing_zeros())) as usize
    }

    /// `(score, product)` as one integer in `rank`'s order, greater = better: the score's bits
    /// made monotone (the order of `f32::total_cmp`), then the product id inverted (ties to the
    /// lower id). One integer compare instead of two branchy ones.
    fn key(product: u32, score: f32) -> u64 {
        let b = score.to_bits();
        let ordered = if b >> 31 == 1 { !b } else { b | 1 << 31 };
        (ordered as u64) << 32 | !product as u64
    }

    fn product(key: u64) -> u32 {
        !(key as u32)
    }

    fn score(key: u64) -> f32 {
        let o = (key >> 32) as u32;
        f32::from_bits(if o >> 31 == 1 { o & !(1 << 31) } else { !o })
    }

    fn reset(&mut self, k: usize) {
        debug_assert!(k <= 2 * THRESHOLD_MAX_K, "counts fit a u16");
        if self.held.is_empty() {
            self.held = vec![0; Self::BUCKETS as usize];
        }
        self.clear();
        self.k = k;
    }

    /// Empties the top (and only its buckets).
    fn clear(&mut self) {
        for &key in &self.kept {
            self.held[Self::bucket(Self::product(key))] = 0;
        }
        self.kept.clear();
        self.floor = 0;
    }

    /// The best `k` products kept (fewer when fewer were offered), in no order.
    fn products(&mut self) -> impl Iterator<Item = u32> + '_ {
        if self.kept.len() > self.k {
            self.compact();
        }
        self.kept.iter().map(|&key| Self::product(key))
    }

    /// The lowest score an offer may enter or change the top with (an equal score enters
    /// only with a lower product id): the `k`-th best at the last compaction, else −∞.
    fn floor(&self) -> f32 {
        if self.floor == 0 {
            f32::NEG_INFINITY
        } else {
            Self::score(self.floor)
        }
    }

    /// Offers a posting under `max`: a product kept keeps its better score; a new one enters
    /// if it is at or above the floor.
    fn offer_max(&mut self, product: u32, score: f32) {
        let key = Self::key(product, score);
        if key < self.floor {
            return; // below the `k` best kept: it neither enters nor betters one of them
        }
        let b = Self::bucket(product);
        if self.held[b] != 0 {
            let id = !product;
            if let Some(kept) = self.kept.iter_mut().find(|h| **h as u32 == id) {
                *kept = (*kept).max(key);
                return;
            }
        }
        self.kept.push(key);
        self.held[b] += 1;
        if self.kept.len() >= 2 * self.k {
            self.compact();
        }
    }

    /// Keeps the best `k` and makes the `k`-th of them the floor.
    fn compact(&mut self) {
        let k = self.k;
        self.kept.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        for &key in &self.kept[k..] {
            self.held[Self::bucket(Self::product(key))] -= 1;
        }
        self.kept.truncate(k);
        self.floor = self.kept[k - 1];
    }
}

/// Asks the CPU to bring `x`'s cache line in, without waiting for it.
#[inline(always)]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it cannot fault and changes nothing the program reads.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(x as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Calls `hit(j)` for each `j` with `scores[j] >= floor`, in order. Sixteen scores are
/// compared at once, branch-free (the compiler's SIMD), and only a group with a score at the
/// floor is looked at one by one: past the first few thousand postings of a query nearly
/// every group is skipped whole.
#[inline]
fn scan(scores: &[f32], floor: f32, mut hit: impl FnMut(usize)) {
    const GROUP: usize = 16;
    let mut groups = scores.chunks_exact(GROUP);
    let mut base = 0;
    for g in &mut groups {
        let g: &[f32; GROUP] = g.try_into().expect("chunks_exact");
        if g.iter().fold(false, |any, &s| any | (s >= floor)) {
            for (i, &s) in g.iter().enumerate() {
                if s >= floor {
                    hit(base + i);
                }
            }
        }
        base += GROUP;
    }
    for (i, &s) in groups.remainder().iter().enumerate() {
        if s >= floor {
            hit(base + i);
        }
    }
}

/// The first index of the ascending `ids` at or past `p`: exponential search from where `p`
/// would lie were the ids spread evenly between the first and the last (product ids nearly
/// are, so the guess is usually a cache line or two off), then a binary search in the last
/// step. (Any index, without a panic, on an unsorted list.)
fn lower_bound(ids: &[u32], p: u32) -> usize {
    let n = ids.len();
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return 0;
    };
    let guess = if p <= first {
        0
    } else if p > last || last <= first {
        n
    } else {
        ((p - first) as u64 * (n - 1) as u64 / (last - first) as u64) as usize
    };
    if guess < n && ids[guess] < p {
        // Forward: `ids[lo] < p`; the answer lies in `lo + 1..=lo + step`.
        let (mut lo, mut step) = (guess, 1);
        while lo + step < n && ids[lo + step] < p {
            lo += step;
            step *= 2;
        }
        let end = (lo + step + 1).min(n);
        lo + ids[lo..end].partition_point(|&x| x < p)
    } else {
        // Backward: `ids[hi] >= p` or `hi == n`; the answer lies in `hi - step..=hi`.
        let (mut hi, mut step) = (guess, 1);
        while hi >= step && ids[hi - step] >= p {
            hi -= step;
            step *= 2;
        }
        let start = hi.saturating_sub(step);
        start + ids[start..hi].partition_point(|&x| x < p)
    }
}

/// The lowest score `s` a posting of list `c` may have when its product totals `t` or more
/// under `sum`: the least `s` with `((prefix + s) + after[0]) + after[1] + … >= t` (`prefix`:
/// the earlier lists' best positive scores summed in order, `after`: the later ones'; all
/// `>= +0.0`, so the bound is `prefix + s` rounded, then monotone). Rounded addition is
/// monotone in both operands, so the bound is monotone in `s` and found by bisection over the
/// ordered finite floats; +∞ when no finite score reaches `t`.
fn score_floor(prefix: f32, after: &[f32], t: f32) -> f32 {
    let bound = |s: f32| after.iter().fold(prefix + s, |v, &u| v + u);
    // Finite floats in order as integers (IEEE 754 total order, as `f32::total_cmp`).
    let key = |x: f32| {
        let b = x.to_bits() as i32;
        b ^ (((b >> 31) as u32) >> 1) as i32
    };
    let float = |k: i32| f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32);
    let (mut lo, mut hi) = (key(-f32::MAX), key(f32::MAX));
    if bound(f32::MAX) < t {
        return f32::INFINITY;
    }
    // bound(float(hi)) >= t; find the least such key.
    while lo < hi {
        let mid = lo + ((hi as i64 - lo as i64) / 2) as i32;
        if bound(float(mid)) >= t {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    float(lo)
}

impl Ranker {
    pub fn new() -> Ranker {
        Ranker::default()
    }

    /// As [`rank`].
    pub fn rank(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        aggregate: Aggregate,
        k: usize,
        products: u32,
    ) -> Vec<Hit> {
        if k == 0 {
            return Vec::new();
        }
        if k > THRESHOLD_MAX_K || !ordinary(lists) {
            return self.rank_blocks(isa, lists, aggregate, k, products);
        }
        self.score_lists(isa, lists);
        let mut hits = match aggregate {
            Aggregate::Max => {
                self.max_pass(lists, k, products);
                let mut found = std::mem::take(&mut self.candidates);
                found.clear();
                found.extend(self.best.products());
                self.best.clear();
                found.sort_unstable();
                let hits = self.gather(lists, &found, Aggregate::Max);
                self.candidates = found;
                hits
            }
            Aggregate::Sum => self.sum_pass(lists, k, products),
        };
        let better = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.product.cmp(&b.product));
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, better);
            hits.truncate(k);
        }
        hits.sort_unstable_by(better);
        hits
    }

    /// Every list's scores into `scores` (list `c`'s from `at[c]`).
    fn score_lists(&mut self, isa: Isa, lists: &[Postings]) {
        self.scores.clear();
        self.at.clear();
        for l in lists {
            let from = self.scores.len();
            self.at.push(from);
            self.scores.resize(from + l.products.len(), l.prior);
            score_postings(isa, l.pq, l.w, l.pt, &mut self.scores[from..]);
        }
    }

    /// The max threshold pass: leaves in `best` the `k` products (fewer when the lists hold
    /// fewer) of the best single scores, each with its best score, ties to the lower id.
    fn max_pass(&mut self, lists: &[Postings], k: usize, products: u32) {
        /// Postings scanned against one floor: the floor rises between chunks.
        const CHUNK: usize = 1024;
        let best = &mut self.best;
        best.reset(k);
        let (hits, ids) = (&mut self.hits, &mut self.hit_ids);
        for (c, l) in lists.iter().enumerate() {
            let scores = &self.scores[self.at[c]..self.at[c] + l.products.len()];
            for (n, chunk) in scores.chunks(CHUNK).enumerate() {
                let base = n * CHUNK;
                // The scoring never read the product ids, and those of the postings at the
                // floor are scattered: one cache miss each (~60 ns). Streaming the next
                // chunk's ids in (64 lines, 4 bytes a posting) makes them hits for far less.
                for line in l.products.iter().skip(base + CHUNK).take(CHUNK).step_by(16) {
                    prefetch(line);
                }
                hits.clear();
                scan(chunk, best.floor(), |j| hits.push((base + j) as u32));
                ids.clear();
                ids.extend(hits.iter().map(|&j| l.products[j as usize]));
                for (&j, &p) in hits.iter().zip(ids.iter()) {
                    if p < products {
                        best.offer_max(p, scores[j as usize]);
                    }
                }
            }
        }
    }

    /// The sum threshold pass (see [`Ranker`]): the candidates' hits with their exact totals,
    /// a superset of the best `k`.
    fn sum_pass(&mut self, lists: &[Postings], k: usize, products: u32) -> Vec<Hit> {
        // 1. `2k` products, likely among the best totals: the best single scores. (Twice `k`:
        // a few of them total far less — another of their postings is poor — and the floor
        // below is the `k`-th best of these totals.)
        let kk = 2 * k;
        self.max_pass(lists, kk, products);
        let mut found = std::mem::take(&mut self.candidates);
        found.clear();
        found.extend(self.best.products());
        let full = found.len() == kk;
        self.best.clear();
        found.sort_unstable();
        let mut first = self.gather(lists, &found, Aggregate::Sum);
        if !full {
            // The lists hold fewer than `2k` products: these are all of them.
            self.candidates = found;
            return first;
        }
        // 2. The floor: `k` products total at least `t`, so the `k`-th best total does too.
        let (_, kth, _) = first.select_nth_unstable_by(k - 1, |a, b| b.score.total_cmp(&a.score));
        let t = kth.score;
        // 3. Each list's best positive score `u_c` (else +0.0): a product's total is at most
        // `u_0 + .. + s + .. + u_n` (its score `s` in list `c`, the sum in code order), and
        // every posting of a product totalling `t` or more scores at least that bound's
        // inverse at `t`.
        let ups: Vec<f32> = lists
            .iter()
            .enumerate()
            .map(|(c, l)| {
                let scores = &self.scores[self.at[c]..self.at[c] + l.products.len()];
                let m = scores.iter().fold(0f32, |m, &s| if s > m { s } else { m });
                if m > 0.0 {
                    m
                } else {
                    0.0
                }
            })
            .collect();
        found.clear();
        let mut prefix = 0f32;
        for (c, l) in lists.iter().enumerate() {
            let floor = score_floor(prefix, &ups[c + 1..], t);
            prefix += ups[c];
            let scores = &self.scores[self.at[c]..self.at[c] + l.products.len()];
            scan(scores, floor, |j| {
                let p = l.products[j];
                if p < products {
                    found.push(p);
                }
            });
        }
        found.sort_unstable();
        found.dedup();
        let hits = self.gather(lists, &found, Aggregate::Sum);
        self.candidates = found;
        hits
    }

    /// The hits of `found` (ascending product ids): each product looked up in every list, its
    /// score aggregated over all its postings as `rank` aggregates it (in code order: the first
    /// score, then `+` or `f32::max` of the next), and the codes that reached it.
    fn gather(&self, lists: &[Postings], found: &[u32], aggregate: Aggregate) -> Vec<Hit> {
        let mut hits: Vec<Hit> = found
            .iter()
            .map(|&product| Hit {
                product,
                score: 0.0,
                codes: Vec::new(),
            })
            .collect();
        let add = |h: &mut Hit, c: usize, s: f32| {
            h.score = match (h.codes.is_empty(), aggregate) {
                (true, _) => s,
                (false, Aggregate::Sum) => h.score + s,
                (false, Aggregate::Max) => h.score.max(s),
            };
            h.codes.push(c as u32);
        };
        for (c, l) in lists.iter().enumerate() {
            let ids = l.products;
            let scores = &self.scores[self.at[c]..self.at[c] + ids.len()];
            // Both sides ascend: each search starts where the last one ended, and the shorter
            // side is searched for in the longer (most of a query's lists are a few postings).
            let mut from = 0;
            if ids.len() < found.len() {
                for (&p, &s) in ids.iter().zip(scores) {
                    let i = from + lower_bound(&found[from..], p);
                    if i < found.len() && found[i] == p {
                        add(&mut hits[i], c, s);
                        from = i + 1;
                    } else {
                        from = i;
                    }
                }
                continue;
            }
            for h in hits.iter_mut() {
                let j = from + lower_bound(&ids[from..], h.product);
                if j < ids.len() && ids[j] == h.product {
                    add(h, c, scores[j]);
                    from = j + 1;
                } else {
                    from = j;
                }
            }
        }
        hits
    }

    /// The block merge described on [`Ranker`]: as [`rank`].
    pub fn rank_blocks(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        aggregate: Aggregate,
        k: usize,
        products: u32,
    ) -> Vec<Hit> {
        if k == 0 {
            return Vec::new();
        }
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); RANK_BLOCK as usize];
        }
        self.score_lists(isa, lists);
        let at = &self.at;
        self.top.clear();
        let mut cursor: Vec<usize> = vec![0; lists.len()];
        loop {
            let next = lists
                .iter()
                .zip(&cursor)
                .filter_map(|(l, &c)| l.products.get(c))
                .min();
            let Some(&next) = next.filter(|&&p| p < products) else {
                break; // every list is done (or only stray postings are left)
            };
            let start = next - next % RANK_BLOCK;
            let end = start.saturating_add(RANK_BLOCK).min(products);
            if self.epoch == u32::MAX {
                self.slots.fill(Slot::default());
                self.epoch = 0;
            }
            self.epoch += 1;
            let epoch = self.epoch;
            for (i, l) in lists.iter().enumerate() {
                let c = cursor[i];
                // A scan, not a binary search: it makes progress on a corrupt (unsorted) list
                // too, and these postings are read next anyway.
                let n = l.products[c..].iter().take_while(|&&p| p < end).count();
                let scores = &self.scores[at[i] + c..at[i] + c + n];
                for (&p, &v) in l.products[c..c + n].iter().zip(scores) {
                    // `start <= p` holds on sorted lists; an unsorted one may step back.
                    let Some(slot) = self.slots.get_mut(p.wrapping_sub(start) as usize) else {
                        continue;
                    };
                    if slot.epoch != epoch {
                        *slot = Slot { epoch, score: v };
                        self.touched.push(p);
                    } else {
                        slot.score = match aggregate {
                            Aggregate::Sum => slot.score + v,
                            Aggregate::Max => slot.score.max(v),
                        };
                    }
                }
                cursor[i] = c + n;
            }
            for &p in &self.touched {
                let w = Worst(p, self.slots[(p - start) as usize].score);
                if self.top.len() < k {
                    self.top.push(w);
                } else if self.top.peek().is_some_and(|worst| w < *worst) {
                    self.top.pop();
                    self.top.push(w);
                }
            }
            self.touched.clear();
        }
        // Best first: ascending in `Worst`'s order is best to worst.
        let best = std::mem::take(&mut self.top).into_sorted_vec();
        best.iter()
            .map(|&Worst(product, score)| Hit {
                product,
                score,
                codes: (0..lists.len() as u32)
                    .filter(|&c| lists[c as usize].products.binary_search(&product).is_ok())
                    .collect(),
            })
            .collect()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

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

    /// `rank` against a naive reference: every posting scored with the scalar twin,
    /// aggregated in a map, fully sorted; top-K must equal the sorted list's head.
    #[test]
    fn rank_equals_a_full_sort_of_the_aggregates() {
        use std::collections::BTreeMap;
        let mut next = rng(23);
        for aggregate in [Aggregate::Sum, Aggregate::Max] {
            let n_lists = 6;
            let mut owned = Vec::new();
            for _ in 0..n_lists {
                let n = 1 + (next() % 5) as usize;
                let mut products: Vec<u32> =
                    (0..next() % 300).map(|_| (next() % 500) as u32).collect();
                products.sort_unstable();
                products.dedup();
                let p = products.len();
                let pt: Vec<u16> = (0..n * p).map(|_| next() as u16).collect();
                let pq: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect();
                let w: Vec<f32> = (0..n)
                    .map(|_| (next() % 200) as f32 / 100.0 - 0.5)
                    .collect();
                owned.push((products, pt, pq, w));
            }
            // S_rele alone (prior 0), then with a random prior a code (the code-likelihood
            // term), some of them 0.
            for with_prior in [false, true] {
                let lists: Vec<Postings> = owned
                    .iter()
                    .map(|(products, pt, pq, w)| Postings {
                        products,
                        pt,
                        pq,
                        w,
                        prior: if with_prior && !next().is_multiple_of(4) {
                            -((next() % 5000) as f32) / 1000.0
                        } else {
                            0.0
                        },
                    })
                    .collect();
                let mut want: BTreeMap<u32, (f32, Vec<u32>)> = BTreeMap::new();
                for (c, l) in lists.iter().enumerate() {
                    let mut s = vec![l.prior; l.products.len()];
                    score_postings(Isa::Scalar, l.pq, l.w, l.pt, &mut s);
                    for (&p, &v) in l.products.iter().zip(&s) {
                        let e = want.entry(p).or_insert((v, vec![]));
                        if !e.1.is_empty() {
                            e.0 = if aggregate == Aggregate::Sum {
                                e.0 + v
                            } else {
                                e.0.max(v)
                            };
                        }
                        e.1.push(c as u32);
                    }
                }
                let mut full: Vec<Hit> = want
                    .into_iter()
                    .map(|(product, (score, codes))| Hit {
                        product,
                        score,
                        codes,
                    })
                    .collect();
                full.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.product.cmp(&b.product)));
                let mut ranker = Ranker::new();
                for isa in Isa::available() {
                    for k in [0, 1, 10, 300, 10_000] {
                        let got = rank(isa, &lists, aggregate, k, u32::MAX);
                        let want = &full[..k.min(full.len())];
                        assert_eq!(got, want, "{isa:?} {aggregate:?} k={k}");
                        // The fast twin, bit for bit, reused across queries (epochs).
                        let fast = ranker.rank(isa, &lists, aggregate, k, u32::MAX);
                        assert_eq!(fast, want, "Ranker {isa:?} {aggregate:?} k={k}");
                        for (a, b) in fast.iter().zip(want) {
                            assert_eq!(a.score.to_bits(), b.score.to_bits());
                        }
                    }
                }
                // Products past the table are dropped by both; a wrapped epoch starts clean.
                for limit in [0, 1, 250, 499] {
                    let slow = rank(Isa::Scalar, &lists, aggregate, 50, limit);
                    assert_eq!(ranker.rank(Isa::Scalar, &lists, aggregate, 50, limit), slow);
                }
                ranker.epoch = u32::MAX - 1;
                for _ in 0..3 {
                    let slow = rank(Isa::Scalar, &lists, aggregate, 40, u32::MAX);
                    assert_eq!(
                        ranker.rank(Isa::Scalar, &lists, aggregate, 40, u32::MAX),
                        slow
                    );
                }
            }
        }
    }

    /// `(product, score bits, codes)` of every hit: `Hit`'s `==` would take −0.0 for +0.0.
    fn bits(hits: &[Hit]) -> Vec<(u32, u32, Vec<u32>)> {
        hits.iter()
            .map(|h| (h.product, h.score.to_bits(), h.codes.clone()))
            .collect()
    }

    /// A posting list's columns: products, `Pt`, `Pq`, weights.
    type Owned = (Vec<u32>, Vec<u16>, Vec<f32>, Vec<f32>);

    /// The threshold passes against the block merge and `rank`, every returned element bit for
    /// bit: random queries of 0–9 lists (empty ones, long ones, products shared across lists,
    /// a list repeated under another code, scores tied through a few `Pt` levels and shared
    /// query sides), priors off and on, weights all negative or mixed (positive scores, which
    /// loosen the sum bound), `k` from 1 past the union and past [`THRESHOLD_MAX_K`], products
    /// cut off by the table size; and non-ordinary inputs (−0.0, NaN, ±∞ priors, weights near
    /// overflow), which go to the block merge.
    #[test]
    fn threshold_passes_equal_the_block_merge_and_rank() {
        let mut next = rng(77);
        let mut ranker = Ranker::new();
        let mut checked = [0usize; 2];
        for case in 0..400 {
            let range = [16u64, 300, 5_000, 100_000][case % 4];
            let n_lists = (next() % 10) as usize;
            let tied = next().is_multiple_of(3); // Pt from 3 levels, one query side for every list
            let mixed = next().is_multiple_of(3);
            let shared_pq: Vec<f32> = (0..4).map(|_| (next() % 1000) as f32 / 1000.0).collect();
            let mut owned: Vec<Owned> = Vec::new();
            for _ in 0..n_lists {
                if !owned.is_empty() && next().is_multiple_of(6) {
                    let again = owned[(next() % owned.len() as u64) as usize].clone();
                    owned.push(again);
                    continue;
                }
                let len = match next() % 8 {
                    0 => 0,
                    1 => 2_000 + next() % 6_000,
                    _ => next() % 300,
                };
                let mut products: Vec<u32> = (0..len).map(|_| (next() % range) as u32).collect();
                products.sort_unstable();
                products.dedup();
                let n = if tied { 3 } else { (next() % 5) as usize };
                let pt: Vec<u16> = (0..n * products.len())
                    .map(|_| {
                        if tied {
                            [0, 30_000, 65_535][(next() % 3) as usize]
                        } else {
                            next() as u16
                        }
                    })
                    .collect();
                let pq: Vec<f32> = if tied {
                    shared_pq[..n].to_vec()
                } else {
                    (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect()
                };
                let w: Vec<f32> = (0..n)
                    .map(|_| {
                        let m = (next() % 200) as f32 / 100.0;
                        if mixed && next().is_multiple_of(2) {
                            m
                        } else {
                            -m
                        }
                    })
                    .collect();
                owned.push((products, pt, pq, w));
            }
            let union: std::collections::BTreeSet<u32> =
                owned.iter().flat_map(|o| o.0.iter().copied()).collect();
            for with_prior in [false, true] {
                let priors: Vec<f32> = (0..owned.len())
                    .map(|_| match next() % 4 {
                        _ if !with_prior => 0.0,
                        0 => 0.0,
                        1 => -0.5, // a prior several codes share: ties across lists
                        _ => (next() % 5000) as f32 / 1000.0 - 4.0,
                    })
                    .collect();
                let lists: Vec<Postings> = owned
                    .iter()
                    .zip(&priors)
                    .map(|((products, pt, pq, w), &prior)| Postings {
                        products,
                        pt,
                        pq,
                        w,
                        prior,
                    })
                    .collect();
                let limit = if next().is_multiple_of(4) {
                    (next() % range) as u32
                } else {
                    u32::MAX
                };
                let u = union.len();
                for k in [1, 2, 7, 50, 300, u.max(1), u + 5, THRESHOLD_MAX_K + 1] {
                    for aggregate in [Aggregate::Max, Aggregate::Sum] {
                        let isa =
                            Isa::available()[(next() % Isa::available().len() as u64) as usize];
                        let fast = ranker.rank(isa, &lists, aggregate, k, limit);
                        let blocks = ranker.rank_blocks(isa, &lists, aggregate, k, limit);
                        let slow = rank(isa, &lists, aggregate, k, limit);
                        let what = format!(
                            "case {case} {aggregate:?} k={k} limit={limit} prior={with_prior}"
                        );
                        assert_eq!(bits(&fast), bits(&blocks), "{what}: rank vs rank_blocks");
                        assert_eq!(bits(&fast), bits(&slow), "{what}: Ranker vs rank");
                        checked[(aggregate == Aggregate::Sum) as usize] += fast.len();
                    }
                }
            }
            // Not ordinary: the block merge answers (and so the same as before).
            if let Some((products, pt, pq, w)) = owned.first() {
                for prior in [-0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38] {
                    let mut lists: Vec<Postings> = owned
                        .iter()
                        .map(|(products, pt, pq, w)| Postings {
                            products,
                            pt,
                            pq,
                            w,
                            prior: 0.0,
                        })
                        .collect();
                    lists[0].prior = prior;
                    assert!(!ordinary(&lists));
                    for aggregate in [Aggregate::Max, Aggregate::Sum] {
                        let fast = ranker.rank(Isa::Scalar, &lists, aggregate, 20, u32::MAX);
                        let blocks =
                            ranker.rank_blocks(Isa::Scalar, &lists, aggregate, 20, u32::MAX);
                        assert_eq!(bits(&fast), bits(&blocks), "case {case} prior {prior}");
                    }
                }
                let huge = vec![1e36f32; pq.len()];
                let l = Postings {
                    products,
                    pt,
                    pq,
                    w: &huge,
                    prior: 0.0,
                };
                assert_eq!(ordinary(&[l]), pq.is_empty());
                let _ = w;
            }
        }
        // Enough of both paths ran.
        assert!(checked.iter().all(|&n| n > 100_000), "{checked:?}");
    }

    /// A list scored through the term table (≥ TERM_TABLE_MIN products) and a short one
    /// sharing some of its products, through every path.
    #[test]
    fn threshold_passes_on_a_term_table_list() {
        let mut next = rng(5);
        let long: Vec<u32> = (0..(TERM_TABLE_MIN as u32 + 999)).map(|i| i * 3).collect();
        let short: Vec<u32> = (0..500).map(|i| i * 7 + 1).collect();
        let pt_long: Vec<u16> = (0..2 * long.len()).map(|_| next() as u16).collect();
        let pt_short: Vec<u16> = (0..2 * short.len()).map(|_| next() as u16).collect();
        let (pq, w) = ([0.3f32, 0.8], [-1.0f32, -0.5]);
        let lists = [
            Postings {
                products: &short,
                pt: &pt_short,
                pq: &pq,
                w: &w,
                prior: -0.25,
            },
            Postings {
                products: &long,
                pt: &pt_long,
                pq: &pq,
                w: &w,
                prior: 0.0,
            },
        ];
        let mut ranker = Ranker::new();
        for isa in Isa::available() {
            for aggregate in [Aggregate::Max, Aggregate::Sum] {
                for k in [1, 300, 4096] {
                    let fast = ranker.rank(isa, &lists, aggregate, k, u32::MAX);
                    assert_eq!(
                        bits(&fast),
                        bits(&rank(isa, &lists, aggregate, k, u32::MAX))
                    );
                    assert_eq!(fast.len(), k);
                }
            }
        }
    }

    /// `TopK::key` orders as `rank` does (score by `total_cmp`, then the lower product) and
    /// decodes back, ±0 and infinities included.
    #[test]
    fn top_k_keys_order_as_rank() {
        let mut next = rng(12);
        let pick = |r: u64| match r % 6 {
            0 => [0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY][(r / 6 % 6) as usize],
            _ => f32::from_bits(r as u32 >> 1) * if r & 1 << 40 == 0 { 1.0 } else { -1.0 },
        };
        for _ in 0..10_000 {
            let (a, b) = ((next() % 5) as u32, (next() % 5) as u32);
            let (sa, sb) = (pick(next()), pick(next()));
            let (ka, kb) = (TopK::key(a, sa), TopK::key(b, sb));
            assert_eq!(
                kb.cmp(&ka),
                sb.total_cmp(&sa).then(a.cmp(&b)),
                "({a}, {sa}) vs ({b}, {sb})"
            );
            assert_eq!(
                (TopK::product(ka), TopK::score(ka).to_bits()),
                (a, sa.to_bits())
            );
        }
    }

    /// The helpers: the exponential search is `partition_point`; the score floor is the least
    /// score whose rounded bound reaches `t`.
    #[test]
    fn lower_bound_and_score_floor() {
        let mut next = rng(8);
        for _ in 0..2000 {
            let spread = [3, 200, 1 << 20][(next() % 3) as usize];
            let mut ids: Vec<u32> = (0..next() % 100)
                .map(|_| (next() % spread) as u32)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let p = (next() % (spread + 10)) as u32;
            assert_eq!(lower_bound(&ids, p), ids.partition_point(|&x| x < p));
            // Clustered ids: the guess far off.
            let skewed: Vec<u32> = (0..300u32)
                .map(|i| if i < 290 { i } else { i << 20 })
                .collect();
            let p = (next() % (300 << 20)) as u32;
            assert_eq!(lower_bound(&skewed, p), skewed.partition_point(|&x| x < p));
        }
        let float = |r: u64| match r % 4 {
            0 => 0.0,
            1 => (r % 1000) as f32 * 1e-9,
            _ => (r % 10_000) as f32 / 1000.0,
        };
        for _ in 0..2000 {
            let prefix = (0..next() % 4).fold(0f32, |a, _| a + float(next()));
            let after: Vec<f32> = (0..next() % 5).map(|_| float(next())).collect();
            let t = (next() % 20_000) as f32 / 1000.0 - 10.0 + float(next());
            let bound = |s: f32| after.iter().fold(prefix + s, |v, &u| v + u);
            let f = score_floor(prefix, &after, t);
            assert!(bound(f) >= t, "{prefix} {after:?} {t}: {f}");
            let below = f32::from_bits(if f > 0.0 {
                f.to_bits() - 1
            } else {
                f.to_bits() + 1
            });
            let below = if f == 0.0 { -f32::from_bits(1) } else { below };
            assert!(
                bound(below) < t,
                "{prefix} {after:?} {t}: {f} not the least"
            );
        }
        // No finite score reaches +∞ alone.
        assert_eq!(score_floor(0.0, &[], f32::INFINITY), f32::INFINITY);
    }

    /// The code prior, every element: random posting lists with random priors, each product's
    /// score against the f64 formula `agg_c (prior_c + S_rele(q, t, c))` over the codes that
    /// reach it, from `rank` and `Ranker` on every ISA (bit-identical to each other).
    #[test]
    fn priors_add_to_every_posting_before_aggregation() {
        let mut next = rng(41);
        for aggregate in [Aggregate::Sum, Aggregate::Max] {
            let mut owned = Vec::new();
            for _ in 0..5 {
                let n = 1 + (next() % 4) as usize;
                let mut products: Vec<u32> =
                    (0..next() % 200).map(|_| (next() % 300) as u32).collect();
                products.sort_unstable();
                products.dedup();
                let pt: Vec<u16> = (0..n * products.len()).map(|_| next() as u16).collect();
                let pq: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect();
                let w: Vec<f32> = (0..n).map(|_| -((next() % 150) as f32) / 100.0).collect();
                let logprobs: Vec<f32> = (0..=n)
                    .map(|_| -((next() % 3000) as f32) / 1000.0)
                    .collect();
                let alpha = (next() % 300) as f32 / 100.0;
                let per_token = next().is_multiple_of(2);
                let prior = code_prior(alpha, &logprobs, per_token);
                let sum: f64 = logprobs.iter().map(|&l| l as f64).sum();
                let want = alpha as f64
                    * if per_token {
                        sum / logprobs.len() as f64
                    } else {
                        sum
                    };
                assert!(
                    (prior as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{prior} vs {want}"
                );
                owned.push((products, pt, pq, w, prior));
            }
            let lists: Vec<Postings> = owned
                .iter()
                .map(|(products, pt, pq, w, prior)| Postings {
                    products,
                    pt,
                    pq,
                    w,
                    prior: *prior,
                })
                .collect();
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let mut want: std::collections::BTreeMap<u32, f64> = Default::default();
            for l in &lists {
                let p = l.products.len();
                for (j, &product) in l.products.iter().enumerate() {
                    let col: Vec<f64> = (0..l.pq.len())
                        .map(|i| (l.pt[i * p + j] as f32 * PT_SCALE) as f64)
                        .collect();
                    let v = l.prior as f64 + s_rele_f64(&f64s(l.pq), &col, &f64s(l.w));
                    want.entry(product)
                        .and_modify(|a| {
                            *a = match aggregate {
                                Aggregate::Sum => *a + v,
                                Aggregate::Max => a.max(v),
                            }
                        })
                        .or_insert(v);
                }
            }
            let mut ranker = Ranker::new();
            let mut first: Option<Vec<Hit>> = None;
            for isa in Isa::available() {
                let slow = rank(isa, &lists, aggregate, usize::MAX, u32::MAX);
                let fast = ranker.rank(isa, &lists, aggregate, usize::MAX, u32::MAX);
                assert_eq!(slow.len(), want.len());
                for (a, b) in slow.iter().zip(&fast) {
                    assert_eq!(
                        (a.product, a.score.to_bits(), &a.codes),
                        (b.product, b.score.to_bits(), &b.codes)
                    );
                }
                for h in &slow {
                    let w = want[&h.product];
                    assert!(
                        (h.score as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{isa:?} {aggregate:?} product {}: {} vs {w}",
                        h.product,
                        h.score
                    );
                }
                if let Some(f) = &first {
                    assert_eq!(f, &slow, "ISAs disagree");
                }
                first = Some(slow);
            }
        }
    }

    /// A hand-computed case: one product at S_rele 0 through an unlikely code, one at
    /// −0.0424750 through a likely one. S_rele alone ranks the unlikely one first; the prior
    /// turns them round.
    #[test]
    fn prior_ranks_the_likely_code_first_by_hand() {
        // Code 0 (likely): product 1, Pt 0.25 against Pq 0.5, weight −1:
        // −[0.5 ln(1/0.75) + 0.25 ln(0.5/0.75)] = −(0.1438410 − 0.1013663) = −0.0424747.
        // Code 1 (unlikely): product 0, Pt = Pq = 0.5: S_rele 0.
        let (pq, w) = ([0.5f32], [-1.0f32]);
        let (pt0, pt1) = ([quantize_pt(0.25)], [quantize_pt(0.5)]);
        let likely = [-0.05f32, -0.05]; // the code token and the EOS: log P = −0.1
        let unlikely = [-2.0f32, -1.0]; // log P = −3
                                        // Length-normalized, α = 2: −0.1 and −3.0; summed, α = 1: the same.
        assert_eq!(code_prior(2.0, &likely, true), -0.1);
        assert_eq!(code_prior(2.0, &unlikely, true), -3.0);
        assert_eq!(code_prior(1.0, &likely, false), -0.1);
        assert_eq!(code_prior(1.0, &unlikely, false), -3.0);
        // No term, or nothing finite: +0.0 exactly.
        for p in [
            code_prior(0.0, &unlikely, false),
            code_prior(1.0, &[], true),
            code_prior(1.0, &[f32::NEG_INFINITY], false),
            code_prior(f32::NAN, &likely, false),
        ] {
            assert_eq!(p.to_bits(), 0f32.to_bits());
        }
        let lists = |a: f32| {
            [
                Postings {
                    products: &[1],
                    pt: &pt0,
                    pq: &pq,
                    w: &w,
                    prior: code_prior(a, &likely, false),
                },
                Postings {
                    products: &[0],
                    pt: &pt1,
                    pq: &pq,
                    w: &w,
                    prior: code_prior(a, &unlikely, false),
                },
            ]
        };
        for isa in Isa::available() {
            for aggregate in [Aggregate::Sum, Aggregate::Max] {
                let plain = rank(isa, &lists(0.0), aggregate, 10, 2);
                assert_eq!(plain.iter().map(|h| h.product).collect::<Vec<_>>(), [0, 1]);
                assert!(plain[0].score.abs() < 1e-6, "{plain:?}");
                assert!((plain[1].score + 0.042_474_7).abs() < 1e-5, "{plain:?}");
                let hits = rank(isa, &lists(1.0), aggregate, 10, 2);
                assert_eq!(hits.iter().map(|h| h.product).collect::<Vec<_>>(), [1, 0]);
                assert!((hits[0].score + 0.142_474_7).abs() < 1e-5, "{hits:?}");
                assert!((hits[1].score + 3.0).abs() < 1e-5, "{hits:?}");
                assert_eq!(Ranker::new().rank(isa, &lists(1.0), aggregate, 10, 2), hits);
            }
        }
    }

    /// With the default (negative) weights, the product whose probabilities equal the query's
    /// ranks first; postings past the product table are dropped; NaN query sides score 0 on
    /// every ISA.
    #[test]
    fn closest_product_ranks_first_and_bad_inputs_are_contained() {
        let pq = [0.9f32, 0.5];
        let w = [-1.0f32, -1.0];
        let products = [0u32, 1, 2, 7];
        // Token columns over products 0, 1, 2, 7: product 1 is exactly the query side; 2 is off
        // a little on both tokens; 0 far on the first; 7 lies past the product table.
        let pt: Vec<u16> = [0.1f32, 0.9, 0.5, 0.9, 0.5, 0.5, 0.9, 0.5]
            .iter()
            .map(|&p| quantize_pt(p))
            .collect();
        let list = Postings {
            products: &products,
            pt: &pt,
            pq: &pq,
            w: &w,
            prior: 0.0,
        };
        for isa in Isa::available() {
            let hits = rank(isa, &[list], Aggregate::Max, 10, 3);
            assert_eq!(
                hits.iter().map(|h| h.product).collect::<Vec<_>>(),
                vec![1, 2, 0],
                "{isa:?}"
            );
            let mut out = vec![0f32; 4];
            score_postings(isa, &[f32::NAN, 0.5], &[1.0, f32::INFINITY], &pt, &mut out);
            assert!(out.iter().all(|v| v.is_finite()), "{isa:?}: {out:?}");
        }
    }

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        for i in 0..=1000 {
            let p = i as f32 / 1000.0;
            let back = quantize_pt(p) as f32 * PT_SCALE;
            assert!((back - p).abs() <= 0.5 / 65535.0 + 1e-7);
        }
        assert_eq!(quantize_pt(-1.0), 0);
        assert_eq!(quantize_pt(2.0), 65535);
    }
}
