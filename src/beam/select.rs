//! One beam-search selection step: from the running beams' scores and the log-probabilities of
//! the tokens each may take, the query-wide top `k` candidates — over the trie's sparse child
//! lists (a beam at a node with 3 children contributes 3 candidates, not a vocabulary-wide
//! masked row). [`dense_top_k`] is the slow twin: the dense vocabulary-wide mask that JD's xLLM
//! writes per beam, kept for the parity test and the benchmark.

use std::cmp::Ordering;

use crate::backend::cpu::simd::{self, Isa};

/// A possible next step of a query: `beam` extended by `token`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The beam's score plus `logprob`.
    pub score: f32,
    pub beam: u32,
    pub token: u32,
    pub logprob: f32,
}

/// A sequence that left the running set: ended by EOS, or cut at the length limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Length-penalized score.
    pub score: f32,
    /// Trie node of the sequence before its last token.
    pub node: u32,
    /// Generated tokens, the last one included (EOS unless cut).
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// Best first: higher score, then lower beam, then lower token (torch.topk leaves ties
/// unspecified; this makes ours deterministic).
#[inline]
fn better(a: &Candidate, b: &Candidate) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then(a.beam.cmp(&b.beam))
        .then(a.token.cmp(&b.token))
}

/// Every `(beam, token)` candidate: `scores[j] + logprob` for each `(token, logprob)` beam `j`
/// may take.
pub fn candidates(scores: &[f32], allowed: &[Vec<(u32, f32)>]) -> Vec<Candidate> {
    let mut out = Vec::with_capacity(allowed.iter().map(Vec::len).sum());
    for (j, (&s, list)) in scores.iter().zip(allowed).enumerate() {
        // A NaN log-prob (a broken model) would rank above everything under `total_cmp`:
        // such a token is no candidate.
        out.extend(list.iter().filter(|(_, logprob)| !logprob.is_nan()).map(
            |&(token, logprob)| Candidate {
                score: s + logprob,
                beam: j as u32,
                token,
                logprob,
            },
        ));
    }
    out
}

/// The best `k` candidates, best first (all of them if fewer).
pub fn top_k(mut cands: Vec<Candidate>, k: usize) -> Vec<Candidate> {
    if k == 0 {
        return Vec::new();
    }
    if cands.len() > k {
        cands.select_nth_unstable_by(k - 1, better);
        cands.truncate(k);
    }
    cands.sort_unstable_by(better);
    cands
}

/// The slow twin of `candidates` + `top_k`: writes a vocabulary-wide mask per beam (0 where
/// allowed, -inf elsewhere), adds it and the beam score to the full log-prob rows `lp: [B, V]`,
/// and takes the top `k` finite entries of all `B × V`.
pub fn dense_top_k(
    scores: &[f32],
    lp: &[f32],
    vocab: usize,
    allowed: &[Vec<u32>],
    k: usize,
) -> Vec<Candidate> {
    let mut mask = vec![f32::NEG_INFINITY; scores.len() * vocab];
    for (j, list) in allowed.iter().enumerate() {
        for &t in list {
            mask[j * vocab + t as usize] = 0.0;
        }
    }
    let all: Vec<Candidate> = mask
        .iter()
        .zip(lp)
        .enumerate()
        .map(|(i, (&m, &l))| Candidate {
            score: scores[i / vocab] + l + m,
            beam: (i / vocab) as u32,
            token: (i % vocab) as u32,
            logprob: l,
        })
        .collect();
    top_k(all, k)
        .into_iter()
        .filter(|c| c.score.is_finite())
        .collect()
}

/// `log(sum(exp(x)))` (`-inf` for an empty row): the SIMD max and polynomial-exp sum of
/// `simd` (relative error ~1e-7 per term, f32 lanes).
pub fn logsumexp(x: &[f32]) -> f32 {
    let isa = Isa::detect();
    let max = simd::max(isa, x);
    if !max.is_finite() {
        return max;
    }
    max + simd::sum_exp(isa, x, max).ln()
}

/// Offers a finished sequence to a query's `b` finished slots (kept best first; a newcomer
/// goes after equal scores, and the worst falls off when full).
pub fn offer(finished: &mut Vec<Finished>, b: usize, f: Finished) {
    let at = finished.partition_point(|g| g.score >= f.score);
    if at < b {
        finished.insert(at, f);
        finished.truncate(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::xorshift as rng;

    #[test]
    fn sparse_top_k_matches_the_dense_mask() {
        let mut next = rng(99);
        for &(beams, vocab, k) in &[(1, 50, 2), (4, 300, 8), (16, 1000, 32), (64, 500, 128)] {
            let scores: Vec<f32> = (0..beams)
                .map(|_| -((next() % 1000) as f32) / 100.0)
                .collect();
            let lp: Vec<f32> = (0..beams * vocab)
                .map(|_| -((next() % 100_000) as f32) / 7919.0)
                .collect();
            let allowed: Vec<Vec<u32>> = (0..beams)
                .map(|_| {
                    let mut l: Vec<u32> = (0..next() % 12)
                        .map(|_| (next() % vocab as u64) as u32)
                        .collect();
                    l.sort_unstable();
                    l.dedup();
                    l
                })
                .collect();
            let lists: Vec<Vec<(u32, f32)>> = allowed
                .iter()
                .enumerate()
                .map(|(j, l)| l.iter().map(|&t| (t, lp[j * vocab + t as usize])).collect())
                .collect();
            let sparse = top_k(candidates(&scores, &lists), k);
            let dense = dense_top_k(&scores, &lp, vocab, &allowed, k);
            assert_eq!(sparse, dense, "beams {beams} vocab {vocab} k {k}");
            assert!(sparse.len() <= k);
            // Both share `top_k`: against a full sort of every allowed (beam, token) too, so
            // a wrong selection in `top_k` cannot pass.
            let mut all: Vec<Candidate> = allowed
                .iter()
                .enumerate()
                .flat_map(|(j, l)| l.iter().map(move |&t| (j, t)))
                .map(|(j, t)| {
                    let l = lp[j * vocab + t as usize];
                    Candidate {
                        score: scores[j] + l,
                        beam: j as u32,
                        token: t,
                        logprob: l,
                    }
                })
                .collect();
            all.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then(a.beam.cmp(&b.beam))
                    .then(a.token.cmp(&b.token))
            });
            all.truncate(k);
            assert_eq!(
                sparse, all,
                "beams {beams} vocab {vocab} k {k}: a full sort"
            );
        }
    }

    /// Equal scores: the lower beam first, then the lower token (the dense-mask twin shares
    /// `better`, so only fixed cases pin the order down).
    #[test]
    fn ties_go_to_the_lower_beam_then_the_lower_token() {
        let c = candidates(&[0.0, 0.0], &[vec![(7, -1.0)], vec![(3, -1.0)]]);
        let top = top_k(c, 1);
        assert_eq!((top[0].beam, top[0].token), (0, 7));
        let c = candidates(&[0.0], &[vec![(9, -1.0), (4, -1.0), (6, -2.0)]]);
        let order: Vec<u32> = top_k(c, 3).iter().map(|c| c.token).collect();
        assert_eq!(order, [4, 9, 6]);
    }

    #[test]
    fn nan_logprobs_are_no_candidates() {
        let c = candidates(&[0.0], &[vec![(3, -1.0), (4, f32::NAN), (5, -2.0)]]);
        assert_eq!(c.iter().map(|c| c.token).collect::<Vec<_>>(), vec![3, 5]);
    }

    #[test]
    fn logsumexp_matches_f64() {
        let mut next = rng(7);
        let x: Vec<f32> = (0..4097)
            .map(|_| (next() % 20_000) as f32 / 1000.0 - 10.0)
            .collect();
        let want = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((logsumexp(&x) as f64 - want).abs() < 1e-5);
        assert_eq!(logsumexp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn finished_slots_stay_sorted_and_bounded() {
        let mut f = Vec::new();
        for (i, s) in [-3.0f32, -1.0, -2.0, -5.0, -1.0, -0.5]
            .into_iter()
            .enumerate()
        {
            offer(
                &mut f,
                3,
                Finished {
                    score: s,
                    node: i as u32,
                    tokens: vec![],
                    logprobs: vec![],
                },
            );
        }
        let got: Vec<(f32, u32)> = f.iter().map(|g| (g.score, g.node)).collect();
        assert_eq!(got, vec![(-0.5, 5), (-1.0, 1), (-1.0, 4)]);
    }
}
