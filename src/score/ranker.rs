//! [`Ranker`], the fast twin of [`rank`](super::rank) for serving: the same hits, bit for bit,
//! from threshold passes over the scored lists (a running top `k` with a rising floor, `TopK`;
//! a branch-free `scan` against it; for `sum`, a per-list `score_floor`) or, where those do
//! not apply, the block merge ([`Ranker::rank_blocks`]). [`Ranker`]'s doc tells how and why.
//!
//! This file holds [`Ranker`] and its entry points ([`Ranker::rank`], the counters), the check
//! that routes a query (`ordinary`) and the final look-up both threshold passes share
//! (`Ranker::gather`, `lower_bound`); `threshold` the threshold passes (max and sum), `top_k`
//! their running top `k`, `blocks` the block merge.

mod blocks;
mod threshold;
mod top_k;

pub(super) use threshold::score_floor;

use super::scorer::{Scorer, Scratch};
use super::{Aggregate, Hit, Postings};
use crate::backend::cpu::simd::Isa;
use blocks::{Slot, Worst};
use top_k::TopK;

/// The fast twin of [`rank`], for serving: the same hits, bit for bit, on valid posting lists
/// (strictly ascending; tested against `rank` and [`Ranker::rank_blocks`]). For `k` up to
/// [`THRESHOLD_MAX_K`] and ordinary scores (`ordinary`: finite, never `-0.0`), a **threshold
/// pass** replaces the merge: each list is scored 1,024 postings at a time ([`Scorer`]: SIMD,
/// the chunk's scores in L1 while every token is added and while they are scanned) and the
/// chunk scanned against a running top `k`.
///
/// - **max**: a running top `k` of distinct products (`TopK`); a posting below the `k`-th
///   best score kept so far (the floor) cannot enter it (nor raise a product kept, whose
///   score is already above), and a branch-free compare of 16 scores at a time skips nearly
///   all of them. The postings at the floor raise their product's best score or enter (their
///   product ids, which the scoring never read, prefetched while the next chunk is scored);
///   every `k` entries the best `k` are selected and the floor rises. A product's best
///   posting is never skipped while it could be among the `k` best (the floor is the `k`-th
///   of `k` distinct products' real scores), so the `k` kept at the end are the `k` best,
///   each with its best score: ~2,300–4,000 offers a query instead of a merge of every
///   posting. The lists go in order of an upper bound of their scores (`list_bound`: the
///   prior, when every weight is negative), and one whose bound is below the floor is not
///   even scored: with the code-likelihood prior, a query's unlikely codes, long lists
///   included, cost nothing once its likely ones fill the top.
/// - **pruning**: a posting that cannot reach the floor is not scored to the end. Each term is
///   at most its token's margin (`term_bound`: ~0 for a negative weight), so a partial score
///   bounds the final one (`prune_floors`); a posting below the bound's inverse at the floor
///   gets no further token, and is not offered (its score is below the floor). In a list of
///   ≥ 65,536 postings, the levels whose token-0 term can bring the prior that far are a
///   range (the term peaks where `Pt = Pq`; found from every 16th level's term), and a
///   posting outside it is dropped on its level alone; the few left are gathered and scored
///   on (a token's terms from a table of all 65,536 levels once that pays). Every posting
///   that can reach the floor is scored whole, so the offers are those of the whole scores.
/// - **sum**: a product's total is at most its score in any one list plus every other list's
///   best positive score (rounded additions are monotone, so this holds in f32 too). The
///   max pass gives `k + k/4` products; the `k`-th best of their exact totals is a floor `t`
///   at or below the final `k`-th total; every posting of every product that reaches `t` then
///   passes a per-list score floor (the bound inverted by bisection, `score_floor`), so the
///   postings that pass name every product of the answer: those the max pass offered, unless
///   a list's floor is below the pass's last one (that list is scanned again). Only those
///   few are aggregated.
///
/// Either way the final products are then looked up in every list (`Ranker::gather`: both
/// sides ascend, the shorter is searched for in the longer) for the codes that reached them;
/// under `sum` their scores are recomputed and added by `rank`'s own chain — the first
/// score, then `+` in code order — and under `max` each product's best score is the one the
/// pass kept (`rank`'s chain of `f32::max` gives the greatest). The rest (`k` past
/// [`THRESHOLD_MAX_K`], non-finite or `-0.0` scores, where `f32::max` and the skipping would
/// tell `±0` or NaN apart differently) goes to the block merge, [`Ranker::rank_blocks`], the
/// path before these.
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
///
/// [`rank`]: super::rank
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
    /// One chunk's postings at the floor (positions in their list) and their scores.
    hits: Vec<u32>,
    hit_scores: Vec<f32>,
    /// Lists the last max pass skipped whole ([`Ranker::skipped_lists`]).
    skipped: usize,
    /// Whether the block merge answered the last query ([`Ranker::block_merged`]).
    merged: bool,
    /// Per list, a bound of its best score (recorded by the sum pass).
    tops: Vec<f32>,
    /// The sum pass's offered postings: list, position, score.
    offered: Vec<(u32, u32, f32)>,
    /// One chunk's scores, and the term tables of a long list ([`Scorer`]).
    chunk: Vec<f32>,
    tables: Vec<Vec<f32>>,
    /// Per token, the least partial score worth adding it to (`prune_floors`).
    floors: Vec<f32>,
    /// Terms the last query did not compute ([`Ranker::pruned_terms`]).
    pruned: usize,
    scratch: Scratch,
}

/// The largest `k` the threshold passes take (a product kept is found by a scan of the up to
/// `2k` kept); past it, [`Ranker::rank_blocks`]. At 4,096 that scan made the threshold pass
/// 4–7× slower than the block merge on 135k products (78–93 ms against 12–23 ms); at 2,048
/// the two cost about the same (14 ms), at 1,024 the threshold pass is ahead (7–8 ms).
pub const THRESHOLD_MAX_K: usize = 2048;

/// Whether every score of these lists, and every sum of them, is finite and never `-0.0`:
/// every prior finite and not `-0.0`, and the priors plus a bound of every S_rele term far
/// from overflow. A term is `w (a + b)` with `|a + b| < 512` even for denormal `Pq` (each `ln`
/// here is above −90, times a probability ≤ 1), and a non-finite `w` scores 0
/// (`kernel::Token::new`). A sum starts from the prior, and `x + y` is `-0.0` only when both
/// are, so no score is `-0.0`. On such scores `f32::max` and `>` agree with the real order and
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

impl Ranker {
    pub fn new() -> Ranker {
        Ranker::default()
    }

    /// As [`rank`](super::rank).
    pub fn rank(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        aggregate: Aggregate,
        k: usize,
        products: u32,
    ) -> Vec<Hit> {
        self.skipped = 0;
        self.pruned = 0;
        self.merged = false;
        if k == 0 {
            return Vec::new();
        }
        if k > THRESHOLD_MAX_K || !ordinary(lists) {
            return self.rank_blocks(isa, lists, aggregate, k, products);
        }
        let mut hits = match aggregate {
            Aggregate::Max => {
                self.threshold_pass(isa, lists, k, products, false);
                let mut best: Vec<(u32, f32)> = self.best.entries().collect();
                self.best.clear();
                best.sort_unstable_by_key(|&(p, _)| p);
                let mut found = std::mem::take(&mut self.candidates);
                found.clear();
                found.extend(best.iter().map(|&(p, _)| p));
                let scores: Vec<f32> = best.iter().map(|&(_, s)| s).collect();
                let hits = self.gather(isa, lists, &found, Some(&scores));
                self.candidates = found;
                hits
            }
            Aggregate::Sum => self.sum_pass(isa, lists, k, products),
        };
        let better = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.product.cmp(&b.product));
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, better);
            hits.truncate(k);
        }
        hits.sort_unstable_by(better);
        hits
    }

    /// Whether the block merge gave the last [`Ranker::rank`]'s hits: `k` past
    /// [`THRESHOLD_MAX_K`], scores that are not ordinary, or a sum pass whose candidates were
    /// too many to gather.
    pub fn block_merged(&self) -> bool {
        self.merged
    }

    /// Lists the last [`Ranker::rank`] did not score (its max pass skipped them whole; 0 for
    /// `sum` and the block merge).
    pub fn skipped_lists(&self) -> usize {
        self.skipped
    }

    /// Terms (a token of a posting) that the last [`Ranker::rank`] did not compute: the
    /// posting could not reach the floor (0 for the block merge).
    pub fn pruned_terms(&self) -> usize {
        self.pruned
    }

    /// The hits of `found` (ascending product ids), with the codes that reached each: every
    /// list searched (both sides ascend: each search starts where the last one ended, and the
    /// shorter side is searched for in the longer; most of a query's lists are a few
    /// postings). Under `max`, `best` gives each product's score: its best posting's, which
    /// the threshold pass offered (at or above every floor, it was neither pruned nor left
    /// unscanned), and which is `rank`'s chain of `f32::max` over its postings (on ordinary
    /// scores, the greatest). Under `sum` (`None`), each total is aggregated as `rank`
    /// aggregates it, in code order — the first score, then `+` the next — the scores
    /// recomputed, a list's at a time ([`Scorer::scores_at`]).
    fn gather(
        &self,
        isa: Isa,
        lists: &[Postings],
        found: &[u32],
        best: Option<&[f32]>,
    ) -> Vec<Hit> {
        let mut hits: Vec<Hit> = found
            .iter()
            .enumerate()
            .map(|(i, &product)| Hit {
                product,
                score: best.map_or(0.0, |b| b[i]),
                codes: Vec::new(),
            })
            .collect();
        // One list's matches: hit index, posting position.
        let (mut pairs, mut at, mut scores, mut col) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (c, l) in lists.iter().enumerate() {
            let ids = l.products;
            pairs.clear();
            let mut from = 0;
            if ids.len() < found.len() {
                for (j, &p) in ids.iter().enumerate() {
                    let i = from + lower_bound(&found[from..], p);
                    if i < found.len() && found[i] == p {
                        pairs.push((i, j as u32));
                        from = i + 1;
                    } else {
                        from = i;
                    }
                }
            } else {
                for (i, h) in hits.iter().enumerate() {
                    let j = from + lower_bound(&ids[from..], h.product);
                    if j < ids.len() && ids[j] == h.product {
                        pairs.push((i, j as u32));
                        from = j + 1;
                    } else {
                        from = j;
                    }
                }
            }
            if best.is_none() {
                at.clear();
                at.extend(pairs.iter().map(|&(_, j)| j));
                Scorer::new(isa, l, None).scores_at(&at, &mut scores, &mut col);
                for (&(i, _), &s) in pairs.iter().zip(&scores) {
                    let h = &mut hits[i];
                    h.score = if h.codes.is_empty() { s } else { h.score + s };
                }
            }
            for &(i, _) in &pairs {
                hits[i].codes.push(c as u32);
            }
        }
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{kernel::TERM_TABLE_MIN, rank, score_postings, tests::rng};

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
        let mut skipped = 0;
        let mut sum_merged = 0;
        let mut pruned = [0usize; 2];
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
                        skipped += ranker.skipped_lists();
                        if aggregate == Aggregate::Sum && k <= THRESHOLD_MAX_K {
                            sum_merged += ranker.block_merged() as usize;
                        }
                        pruned[(aggregate == Aggregate::Sum) as usize] += ranker.pruned_terms();
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
                        // `rank` sends these to the block merge: check it against the
                        // reference too, not only against itself.
                        let slow = rank(Isa::Scalar, &lists, aggregate, 20, u32::MAX);
                        assert_eq!(
                            bits(&fast),
                            bits(&slow),
                            "case {case} prior {prior}: vs rank"
                        );
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
        // The max pass skipped whole lists in some cases, and both passes left terms
        // uncomputed (and still matched both twins).
        assert!(skipped > 100, "{skipped} lists skipped");
        // Some sum passes handed their too many candidates to the block merge (and matched).
        assert!(
            sum_merged > 10,
            "{sum_merged} sum passes answered by the block merge"
        );
        assert!(
            pruned.iter().all(|&n| n > 100_000),
            "{pruned:?} terms pruned"
        );
    }

    /// A list scored through the term table (≥ TERM_TABLE_MIN products) and a short one
    /// sharing some of its products, through every path.
    /// Under `max`, a list whose every score is below the `k`-th best so far is not scored:
    /// here a long list with a low prior after short likely ones; the hits are `rank`'s, and
    /// the skipped list's code still reaches the products it holds.
    #[test]
    fn max_skips_a_list_that_cannot_reach_the_floor() {
        let mut next = rng(5);
        let likely: Vec<u32> = (0..600).map(|i| 3 * i).collect();
        let unlikely: Vec<u32> = (0..50_000).collect();
        let pt = |n: usize, next: &mut dyn FnMut() -> u64| -> Vec<u16> {
            (0..2 * n).map(|_| next() as u16).collect()
        };
        let (pt_a, pt_b) = (pt(likely.len(), &mut next), pt(unlikely.len(), &mut next));
        let (pq, w) = (vec![0.3f32, 0.8], vec![-1.0f32, -1.0]);
        let lists = [
            Postings {
                products: &unlikely,
                pt: &pt_b,
                pq: &pq,
                w: &w,
                prior: -9.0,
            },
            Postings {
                products: &likely,
                pt: &pt_a,
                pq: &pq,
                w: &w,
                prior: -0.1,
            },
        ];
        let mut ranker = Ranker::new();
        for isa in Isa::available() {
            let fast = ranker.rank(isa, &lists, Aggregate::Max, 300, u32::MAX);
            assert_eq!(ranker.skipped_lists(), 1);
            let slow = rank(isa, &lists, Aggregate::Max, 300, u32::MAX);
            assert_eq!(bits(&fast), bits(&slow));
            assert!(
                fast.iter().any(|h| h.codes == [0, 1]),
                "codes of both lists"
            );
        }
        // With fewer products than k, nothing is skipped.
        ranker.rank(Isa::Scalar, &lists[1..], Aggregate::Max, 1000, u32::MAX);
        assert_eq!(ranker.skipped_lists(), 0);
    }

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
                    if k <= 300 {
                        // The long list was pruned (by level, its token 0 tabled).
                        assert!(ranker.pruned_terms() > TERM_TABLE_MIN / 2, "{k}");
                    }
                }
            }
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
}
