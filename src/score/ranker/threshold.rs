//! The threshold passes of [`Ranker::rank`]: the lists in order of their score bound
//! (`list_bound`), scored a chunk at a time with pruning against the floor (`prune_floors`)
//! and scanned (`scan`) against the running top `k`; under `max` that top is the answer, under
//! `sum` the candidates, completed through per-list score floors (`score_floor`).

use super::Ranker;
use crate::backend::cpu::simd::Isa;
use crate::index::prefetch;
use crate::score::scorer::Scorer;
use crate::score::{Aggregate, Hit, Postings};

/// Candidates the sum pass gathers however few postings the lists hold: below it, gathering
/// costs less than a block merge whatever the overlap.
const SUM_GATHER_MIN: usize = 4096;

/// An upper bound of every score of list `l`, for `ordinary` lists: the prior plus, per token,
/// the most its term can add. A term is `w (a + b)` with `a + b` the bracket of Eq. 7, between
/// 0 and `2 ln 2` in exact arithmetic; the kernel's `ln` and roundings move it by far less
/// than the margin kept here (1e-3 of the magnitudes involved, plus 1e-3), so a negative
/// weight adds at most its share of the margin and a positive one at most `1.5 w`.
fn list_bound(l: &Postings) -> f32 {
    if l.pq.iter().any(|p| !(0.0..=1.0).contains(p)) {
        return f32::INFINITY; // not probabilities: no bound claimed
    }
    let mut up = l.prior as f64;
    let mut mag = 1.0 + l.prior.abs() as f64;
    for &w in l.w.iter().filter(|w| w.is_finite()) {
        if w > 0.0 {
            up += 1.5 * w as f64;
        }
        mag += 1.5 * w.abs() as f64;
    }
    (up + 1e-3 * mag) as f32
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

/// The lowest score `s` a posting of list `c` may have when its product totals `t` or more
/// under `sum`: the least `s` with `((prefix + s) + after[0]) + after[1] + … >= t` (`prefix`:
/// the earlier lists' best positive scores summed in order, `after`: the later ones'; all
/// `>= +0.0`, so the bound is `prefix + s` rounded, then monotone). Rounded addition is
/// monotone in both operands, so the bound is monotone in `s` and found by bisection over the
/// ordered finite floats; +∞ when no finite score reaches `t`.
pub(crate) fn score_floor(prefix: f32, after: &[f32], t: f32) -> f32 {
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

/// Per token `i`, into `out`, the least partial score (the prior and tokens `0..i`) that may
/// still reach `floor` once tokens `i..` are added, each term at most its `margins` entry
/// ([`term_bound`](crate::score::kernel::term_bound), `>= +0.0`): rounded additions are monotone, so
/// the final score is at most `((s + m_i) + m_{i+1}) + …`, and the least `s` whose bound
/// reaches `floor` is [`score_floor`]`(0, m_{i..}, floor)` (`0 + s` is `s`); `i` runs to
/// `n` (no token left: `floor` itself). Token 0 is added to every posting (−∞), and every
/// token when there is no floor yet (all −∞). The entries rise with `i` (fewer margins).
fn prune_floors(margins: &[f32], floor: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend((0..=margins.len()).map(|i| {
        if i == 0 || floor == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            score_floor(0.0, &margins[i..], floor)
        }
    }));
}

impl Ranker {
    /// The threshold pass: leaves in `best` the `k` products (fewer when the lists hold
    /// fewer) of the best single scores, each with its best score, ties to the lower id. The
    /// lists go in order of their score bound ([`list_bound`], the prior when every weight is
    /// negative: the shipped model's case). Under `max` (`!sum`), a list whose bound is below
    /// the floor is not scored, since a list whose every score is below the `k`-th best kept
    /// cannot enter the top nor raise a product in it (its scores are below theirs; `gather`
    /// still finds its code). For `sum`, every list is scored, and the postings offered and a
    /// bound of each list's best score are recorded (`offered`, `tops`).
    pub(super) fn threshold_pass(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        k: usize,
        products: u32,
        sum: bool,
    ) {
        let bounds: Vec<f32> = lists.iter().map(list_bound).collect();
        let mut order: Vec<usize> = (0..lists.len()).collect();
        order.sort_by(|&a, &b| bounds[b].total_cmp(&bounds[a]).then(a.cmp(&b)));
        self.tops.clear();
        self.tops.resize(lists.len(), f32::NEG_INFINITY);
        self.offered.clear();
        self.best.reset(k);
        for c in order {
            if !sum && bounds[c] < self.best.floor() {
                self.skipped += 1;
                continue;
            }
            self.scan_list(isa, c, &lists[c], products, sum);
        }
    }

    /// List `c` scored a chunk at a time ([`Scorer`]: the chunk's scores stay in L1 while
    /// every token is added and while they are scanned) and scanned against the running top:
    /// those at the floor are offered (and with `record`, kept in `offered`, and a bound of
    /// the list's best score in `tops`). The scoring is pruned against the floor
    /// (`prune_floors`): a posting whose partial score cannot reach it is not scored further,
    /// and its partial score, below that floor, is not offered; every posting that can reach
    /// it is scored whole. A chunk's postings at the floor are offered once the next chunk is
    /// scored: the scoring never reads the product ids, and theirs, scattered, are one cache
    /// miss each (~60 ns) unless prefetched meanwhile. (The scan's floor, taken after the
    /// last offers, is at or above the one the chunk was pruned against.)
    fn scan_list(&mut self, isa: Isa, c: usize, l: &Postings, products: u32, record: bool) {
        /// Postings scored and scanned against one floor: the floor rises between chunks.
        const CHUNK: usize = 1024;
        let mut scorer = Scorer::new(isa, l, Some(&mut self.tables));
        let best = &mut self.best;
        let (hits, hit_scores) = (&mut self.hits, &mut self.hit_scores);
        hits.clear();
        hit_scores.clear();
        self.chunk.resize(CHUNK, 0.0);
        let mut top = f32::NEG_INFINITY;
        let mut last = None;
        let len = l.products.len();
        let mut base = 0;
        loop {
            let scores = &mut self.chunk[..CHUNK.min(len - base.min(len))];
            let mut kept = None;
            if base < len {
                let floor = best.floor();
                if last != Some(floor) {
                    prune_floors(scorer.margins(), floor, &mut self.floors);
                    last = Some(floor);
                }
                let skipped = scorer.skipped_terms();
                kept = scorer.score(base, scores, &self.floors, &mut self.scratch);
                if record {
                    // A posting pruned or not kept scores below `floor`.
                    if kept.is_some() || scorer.skipped_terms() > skipped {
                        top = top.max(floor);
                    }
                    let all: &[f32] = kept.map_or(&scores[..], |(_, v)| v);
                    top = all.iter().fold(top, |t, &s| if s > t { s } else { t });
                }
            }
            for (&j, &s) in hits.iter().zip(hit_scores.iter()) {
                let p = l.products[j as usize];
                if p < products {
                    best.offer_max(p, s);
                    if record {
                        self.offered.push((c as u32, j, s));
                    }
                }
            }
            hits.clear();
            hit_scores.clear();
            if base >= len {
                break;
            }
            let now = best.floor();
            match kept {
                None => scan(scores, now, |x| {
                    prefetch(&l.products[base + x]);
                    hits.push((base + x) as u32);
                    hit_scores.push(scores[x]);
                }),
                Some((idx, vals)) => scan(vals, now, |x| {
                    let j = base + idx[x] as usize;
                    prefetch(&l.products[j]);
                    hits.push(j as u32);
                    hit_scores.push(vals[x]);
                }),
            }
            base += CHUNK;
        }
        self.tops[c] = top;
        self.pruned += scorer.skipped_terms();
    }

    /// The products (below `products`) of list `l`'s postings scoring `floor` or more, into
    /// `candidates`: the list scored again, a chunk at a time, pruned against `floor`.
    fn scan_floor(&mut self, isa: Isa, l: &Postings, floor: f32, products: u32) {
        const CHUNK: usize = 1024;
        let mut scorer = Scorer::new(isa, l, Some(&mut self.tables));
        prune_floors(scorer.margins(), floor, &mut self.floors);
        self.chunk.resize(CHUNK, 0.0);
        let len = l.products.len();
        for base in (0..len).step_by(CHUNK) {
            let scores = &mut self.chunk[..CHUNK.min(len - base)];
            let candidates = &mut self.candidates;
            let mut push = |j: usize| {
                let p = l.products[base + j];
                if p < products {
                    candidates.push(p);
                }
            };
            match scorer.score(base, scores, &self.floors, &mut self.scratch) {
                None => scan(scores, floor, push),
                Some((idx, vals)) => scan(vals, floor, |x| push(idx[x] as usize)),
            }
        }
        self.pruned += scorer.skipped_terms();
    }

    /// The sum threshold pass (see [`Ranker`]): the candidates' hits with their exact totals,
    /// a superset of the best `k`.
    pub(super) fn sum_pass(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        k: usize,
        products: u32,
    ) -> Vec<Hit> {
        // 1. `k + k/4` products, likely among the best totals: the best single scores. (More
        // than `k`: a few of them total far less — another of their postings is poor — and
        // the floor below is the `k`-th best of these totals; with `k` alone that floor fell
        // to the poorest, and the lists were scanned again (p99 ~50 ms at paper scale). With
        // `2k`, the pass's own floor was the `2k`-th best: ~30 % slower at p50, ~15 % at p99.)
        let kk = k + k.div_ceil(4);
        self.threshold_pass(isa, lists, kk, products, true);
        // Every posting scoring at or above the pass's last floor was offered (the floor only
        // rose), and so is in `offered`.
        let last = self.best.floor();
        let mut found = std::mem::take(&mut self.candidates);
        found.clear();
        found.extend(self.best.products());
        let full = found.len() == kk;
        self.best.clear();
        found.sort_unstable();
        let mut first = self.gather(isa, lists, &found, None);
        if !full {
            // The lists hold fewer than `kk` products: these are all of them.
            self.candidates = found;
            return first;
        }
        // 2. The floor: `k` products total at least `t`, so the `k`-th best total does too.
        let mut totals: Vec<f32> = first.iter().map(|h| h.score).collect();
        let (_, &mut t, _) = totals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        // 3. Each list's best positive score `u_c` (else +0.0): a product's total is at most
        // `u_0 + .. + s + .. + u_n` (its score `s` in list `c`, the sum in code order), and
        // every posting of a product totalling `t` or more scores at least that bound's
        // inverse at `t`.
        let ups: Vec<f32> = self
            .tops
            .iter()
            .map(|&m| if m > 0.0 { m } else { 0.0 })
            .collect();
        let mut floors = Vec::with_capacity(lists.len());
        let mut prefix = 0f32;
        for (c, &u) in ups.iter().enumerate() {
            floors.push(score_floor(prefix, &ups[c + 1..], t));
            prefix += u;
        }
        // 4. The postings that pass: those offered, where the list's floor is at or above
        // the last one; the others' lists are scored again.
        found.clear();
        for &(c, j, s) in &self.offered {
            let f = floors[c as usize];
            if f >= last && s >= f {
                found.push(lists[c as usize].products[j as usize]);
            }
        }
        // A list none of whose scores reaches its floor (its best, bounded in step 1, is
        // below) holds no posting to find.
        self.candidates = found;
        for (c, (l, &f)) in lists.iter().zip(&floors).enumerate() {
            if f < last && self.tops[c] >= f {
                self.scan_floor(isa, l, f, products);
            }
        }
        // 5. Their exact totals: the products of step 1 have theirs in `first` (a product's
        // hit does not depend on the others gathered with it), the rest are gathered. `first`
        // may hold products below `t` besides: exact totals, so the top `k` is unchanged.
        let mut found = std::mem::take(&mut self.candidates);
        found.sort_unstable();
        found.dedup();
        // Lists that share most of their products (nested codes: `notebook`, `notebook | hp`,
        // …) put `t` far below any one list's scores, so nearly every posting passes, and
        // gathering each (a search per list per product) costs several times the block merge
        // over the same postings: 60–113 ms against 14–30 ms, 135k products, K 300. Past an
        // eighth of the postings (and `SUM_GATHER_MIN`), the block merge, which gives the same
        // hits.
        let postings: usize = lists.iter().map(|l| l.products.len()).sum();
        if found.len() > SUM_GATHER_MIN.max(postings / 8) {
            self.candidates = found;
            return self.rank_blocks(isa, lists, Aggregate::Sum, k, products);
        }
        let mut i = 0;
        found.retain(|&p| {
            // `first` ascends by product, as `found` does.
            while i < first.len() && first[i].product < p {
                i += 1;
            }
            i == first.len() || first[i].product != p
        });
        first.extend(self.gather(isa, lists, &found, None));
        self.candidates = found;
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::kernel::TERM_TABLE_MIN;
    use crate::score::scorer::Scratch;
    use crate::score::{score_postings, tests::rng};

    /// The pruned kernel, against the whole scores: for random lists (short, and past
    /// `LEVELS_MIN`: token 0 pruned by level, term tables built once the whole chunks
    /// without a floor have computed `TABLE_AFTER` terms), priors, weights of both signs,
    /// rising floors (none, and the 50 %, 5 % and 0.1 % best scores),
    /// and chunks of any size, `Scorer::score` gives every score bit for bit (`None`), or
    /// exactly the postings scoring at or above the floor, with their scores bit for bit.
    /// Some chunks are pruned, by either path.
    #[test]
    fn pruned_scoring_keeps_exactly_the_postings_at_the_floor() {
        let mut next = rng(31);
        let mut pruned = 0;
        let mut packed = 0;
        let mut scratch = Scratch::default();
        let mut tables = Vec::new();
        for (case, len) in [300, 5_000, (1 << 16) + 77, TERM_TABLE_MIN + 5]
            .into_iter()
            .cycle()
            .take(12)
            .enumerate()
        {
            let n = 1 + (next() % 4) as usize;
            let products: Vec<u32> = (0..len as u32).collect();
            let pt: Vec<u16> = (0..n * len).map(|_| next() as u16).collect();
            let pq: Vec<f32> = (0..n).map(|_| (next() % 1000) as f32 / 1000.0).collect();
            let w: Vec<f32> = (0..n)
                .map(|_| {
                    let m = (next() % 200) as f32 / 100.0;
                    if case % 3 == 2 && next().is_multiple_of(2) {
                        m
                    } else {
                        -m
                    }
                })
                .collect();
            let prior = [0.0, -0.5, (next() % 3000) as f32 / 1000.0 - 2.0][case % 3];
            let l = Postings {
                products: &products,
                pt: &pt,
                pq: &pq,
                w: &w,
                prior,
            };
            let isa = Isa::available()[case % Isa::available().len()];
            let mut full = vec![prior; len];
            score_postings(isa, &pq, &w, &pt, &mut full);
            let mut sorted = full.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let mut scorer = Scorer::new(isa, &l, Some(&mut tables));
            let mut floors = Vec::new();
            let mut out = vec![0f32; 2048];
            for q in [None, Some(0.5), Some(0.05), Some(0.001)] {
                let floor = q.map_or(f32::NEG_INFINITY, |q| {
                    sorted[((len as f64 * q) as usize).min(len - 1)]
                });
                prune_floors(scorer.margins(), floor, &mut floors);
                let mut start = 0;
                while start < len {
                    let m = [1024, 1, 7, 1500][(next() % 4) as usize].min(len - start);
                    let want: Vec<(u32, u32)> = (0..m)
                        .filter(|&x| full[start + x] >= floor)
                        .map(|x| (x as u32, full[start + x].to_bits()))
                        .collect();
                    let before = scorer.skipped_terms();
                    match scorer.score(start, &mut out[..m], &floors, &mut scratch) {
                        None => {
                            let got: Vec<u32> = out[..m].iter().map(|v| v.to_bits()).collect();
                            let all: Vec<u32> =
                                full[start..start + m].iter().map(|v| v.to_bits()).collect();
                            assert_eq!(got, all, "case {case} start {start}: every score");
                        }
                        Some((idx, vals)) => {
                            let got: Vec<(u32, u32)> = idx
                                .iter()
                                .zip(vals)
                                .map(|(&x, v)| (x, v.to_bits()))
                                .collect();
                            assert_eq!(got, want, "case {case} start {start} floor {floor}");
                            packed += 1;
                        }
                    }
                    pruned += scorer.skipped_terms() - before;
                    start += m;
                }
            }
        }
        assert!(
            packed > 100 && pruned > 100_000,
            "{packed} chunks, {pruned} terms pruned"
        );
    }
}
