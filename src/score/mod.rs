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
//! score(q, t, c) = prior(c) + S_rele(q, t, c),   prior(c) = α · log P(c | q) [/ (L + 1)] − β · ln n(c)
//! ```
//!
//! ([`code_prior`]: `log P(c | q)` = the sum of the query-side log-probabilities of the code's
//! `L` tokens and its EOS, divided by their count when length-normalized; [`size_prior`]:
//! `n(c)` = the number of products of the code's posting list). S_rele alone is near 0 — its
//! best value — when both sides give a code's tokens a small probability, so it ranks
//! products reached only through the query's *unlikely* codes first; the likelihood term
//! makes a product reached through a likely code win, and the size term one reached through a
//! specific code (few products) over one among the thousands of a coarse code. With `α = 0`
//! and `β = 0` the prior is `+0.0` and every score is bit for bit what S_rele alone gives (the
//! accumulators start from `0.0` either way).
//!
//! The stages, one module each: this file holds what every path shares (the quantization, the
//! f64 reference [`s_rele_f64`], [`code_prior`], the types) and [`rank`], the reference
//! ranking; `kernel` the S_rele kernel, [`score_postings`] (the `ln` approximation, the term
//! tables, the AVX2 kernel and its scalar twin); `scorer` one posting list a chunk at a time
//! against a rising floor, for the threshold passes; `ranker` [`Ranker`], `rank`'s fast twin
//! for serving (the threshold passes and the block merge).

mod kernel;
mod ranker;
mod scorer;

pub use kernel::score_postings;
pub use ranker::{Ranker, THRESHOLD_MAX_K};

use crate::backend::cpu::simd::Isa;

/// `Pt = q as f32 * PT_SCALE`.
pub const PT_SCALE: f32 = 1.0 / 65535.0;

/// Quantizes a probability for the store (clamped to `0..=1`, rounded to nearest). NaN gives 0:
/// the index writer refuses non-finite probabilities before they get here.
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

/// The floor of each log-probability [`code_prior`] sums: `ln 1e-30`, as the fit reads them
/// (`tools/train/weights.py`, `code_loglik`: `log(max(p, 1e-30))`), so that the engine scores
/// the code-likelihood term as its weight was fitted. A `-inf` or NaN log-probability counts
/// as the floor: the least likely a token can be, not "no evidence".
pub const MIN_CODE_LOGPROB: f32 = -69.077_55;

/// The prior of a query code ([`Postings::prior`]): `alpha * Σ logprobs`, divided by
/// `logprobs.len()` when `per_token` (`logprobs`: the code's tokens and its EOS, from the
/// query), each log-probability no lower than [`MIN_CODE_LOGPROB`]. `0.0` (never `-0.0`) when
/// `alpha` is 0 or the product is not finite, so that an engine without the term scores
/// exactly as without it.
pub fn code_prior(alpha: f32, logprobs: &[f32], per_token: bool) -> f32 {
    if alpha == 0.0 || logprobs.is_empty() {
        return 0.0;
    }
    let mut lp = 0f32;
    for &l in logprobs {
        // `max` takes the floor for NaN as well.
        lp += l.max(MIN_CODE_LOGPROB);
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

/// The specificity term of a query code with `len` products ([`Postings::prior`] adds it to
/// [`code_prior`]): `-beta * ln len`, the log-probability of one product among the code's if
/// each were as likely as the others, so that a product reached through a code of a few
/// products outranks one among thousands of the same code likelihood. `0.0` (never `-0.0`)
/// when `beta` is 0, `len` is 0 or 1, or the product is not finite: an engine without the term
/// scores exactly as without it.
pub fn size_prior(beta: f32, len: usize) -> f32 {
    if beta == 0.0 || len <= 1 {
        return 0.0;
    }
    let prior = -beta * (len as f32).ln();
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
    /// ([`code_prior`] plus [`size_prior`]; `0.0` for S_rele alone).
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

#[cfg(test)]
mod tests {
    /// The floor is `ln 1e-30` in f32, as the fit's `log(max(p, 1e-30))`; a token below it,
    /// `-inf` or NaN counts as the floor (the prior was 0.0, the best there is, for `-inf`);
    /// above it nothing changes.
    #[test]
    fn code_prior_floors_each_token_as_the_fit_does() {
        use super::{code_prior, MIN_CODE_LOGPROB};
        assert_eq!(MIN_CODE_LOGPROB, (1e-30f64).ln() as f32);
        let floor = MIN_CODE_LOGPROB;
        assert_eq!(code_prior(1.0, &[-80.0, -0.5], false), floor - 0.5);
        assert_eq!(
            code_prior(1.0, &[f32::NEG_INFINITY, -0.5], false),
            floor - 0.5
        );
        assert_eq!(
            code_prior(0.5, &[f32::NAN, -1.0], true),
            0.5 * (floor - 1.0) / 2.0
        );
        assert_eq!(code_prior(2.0, &[-1.0, -2.0], false), -6.0);
        assert_eq!(code_prior(0.0, &[f32::NEG_INFINITY], false).to_bits(), 0);
    }

    use super::*;

    pub(super) fn rng(seed: u64) -> impl FnMut() -> u64 {
        crate::test_rng::xorshift(seed | 1)
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
                assert_eq!(fast.len(), slow.len());
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

    /// The code-size term by hand: `-β ln n`, and `+0.0` where it must not move a score.
    #[test]
    fn size_prior_by_hand() {
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * b.abs();
        assert!(close(size_prior(0.25, 100), -0.25 * 100f64.ln()));
        assert!(close(size_prior(0.5, 3), -0.5 * 3f64.ln()));
        // A negative weight rewards large codes (a fit may choose it).
        assert!(close(size_prior(-0.1, 1000), 0.1 * 1000f64.ln()));
        for (beta, n) in [
            (0.0, 100),
            (0.25, 1),
            (0.25, 0),
            (f32::NAN, 100),
            (f32::INFINITY, 5),
        ] {
            assert_eq!(size_prior(beta, n).to_bits(), 0f32.to_bits(), "{beta} {n}");
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
        // No term, no tokens, or a weight that is not finite: +0.0 exactly (a `-inf`
        // log-prob is the floor, `code_prior_floors_each_token_as_the_fit_does`).
        for p in [
            code_prior(0.0, &unlikely, false),
            code_prior(1.0, &[], true),
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
    /// ranks first; postings past the product table are dropped; a NaN query side counts as
    /// probability 0 and an infinite weight as 0, alike on every ISA.
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
            // A NaN query side is probability 0 and a non-finite weight 0 (`Token::new`):
            // each product's score is then `1 · S_rele(0, Pt0)`, the same bits on every ISA.
            let mut out = vec![0f32; 4];
            score_postings(isa, &[f32::NAN, 0.5], &[1.0, f32::INFINITY], &pt, &mut out);
            let mut scalar = vec![0f32; 4];
            score_postings(
                Isa::Scalar,
                &[f32::NAN, 0.5],
                &[1.0, f32::INFINITY],
                &pt,
                &mut scalar,
            );
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{isa:?}"
            );
            for (j, &got) in out.iter().enumerate() {
                let pt = [
                    pt[j] as f64 * PT_SCALE as f64,
                    pt[4 + j] as f64 * PT_SCALE as f64,
                ];
                let want = s_rele_f64(&[0.0, 0.5], &pt, &[1.0, 0.0]);
                assert!(
                    (got as f64 - want).abs() < 1e-6,
                    "{isa:?} {j}: {got} vs {want}"
                );
            }
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
