//! Next-token distributions and greedy continuation: what `gram lm` prints. Log-probabilities
//! are natural logs from a full-vocabulary log-softmax.

use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Model;

/// One candidate next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// `log_softmax(logits)`, computed with an f64 sum. (Finite logits far apart, ±3e38, would
/// give a log-prob past f32: it is kept at `f32::MIN`, never `-inf`, which JSON cannot hold.)
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits
        .iter()
        .map(|&l| (l as f64 - lse).max(f32::MIN as f64) as f32)
        .collect()
}

/// The `n` most likely entries of `logprobs`, most likely first (ties: lower id first).
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    top_by(logprobs, logprobs, n)
}

/// The `n` entries of `values` whose `keys` are largest, largest first (ties: lower id first).
fn top_by(keys: &[f32], values: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<u32> = (0..keys.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        keys[*b as usize]
            .total_cmp(&keys[*a as usize])
            .then(a.cmp(b))
    };
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, cmp);
    }
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: values[id as usize],
        })
        .collect()
}

/// What a prompt leads to: the next-token distribution and, if asked, a greedy continuation.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// The next token's logits after the prompt, `[V]`.
    pub logits: Vec<f32>,
    /// Their log-probabilities, `[V]`.
    pub logprobs: Vec<f32>,
    /// Greedy continuation ids (stops after an EOS id, which is included).
    pub greedy: Vec<u32>,
}

/// Prefills `prompt` and decodes `greedy` tokens greedily (argmax, ties to the lower id, as
/// `torch.argmax`), stopping at the model's EOS.
pub fn run<B: Backend>(model: &Model<B>, prompt: &[u32], greedy: usize) -> Result<LmOutput> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt has no tokens".into()));
    }
    // The last greedy token is printed, never run: it takes no position.
    let need = prompt.len().saturating_add(greedy.saturating_sub(1));
    if need > model.max_positions() {
        return Err(Error::Input(format!(
            "prompt ({} tokens) + {greedy} new tokens exceeds the model's {} positions",
            prompt.len(),
            model.max_positions()
        )));
    }
    let mut cache = model.new_cache(1, need.max(1))?;
    let logits = model.forward(
        &mut cache,
        prompt,
        &vec![0; prompt.len()],
        &[prompt.len() - 1],
    )?;
    finite(&logits)?;
    let logprobs = log_softmax(&logits);
    let mut out = Vec::with_capacity(greedy);
    let mut next = argmax(&logits);
    for step in 0..greedy {
        out.push(next);
        if model.config.eos_token_ids.contains(&next) || step + 1 == greedy {
            break;
        }
        let logits = model.forward(&mut cache, &[next], &[0], &[0])?;
        finite(&logits)?;
        next = argmax(&logits);
    }
    Ok(LmOutput {
        logits,
        logprobs,
        greedy: out,
    })
}

impl LmOutput {
    /// The `n` most likely next tokens with their log-probs, ranked by logit (ties: lower id
    /// first), so that the first is the greedy token: two logits whose log-probs round to one
    /// f32 (a flat distribution) keep their order.
    pub fn top(&self, n: usize) -> Vec<TokenLogprob> {
        top_by(&self.logits, &self.logprobs, n)
    }
}

/// Logits that are all finite: a NaN or an infinity (a corrupt weight, an overflow) would print
/// as null log-probs or steer greedy decoding, as if the model were fine.
fn finite(logits: &[f32]) -> Result<()> {
    match logits.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::Numeric(format!(
            "the logit of token {i} is {}: the model's weights or activations are not finite",
            logits[i]
        ))),
        None => Ok(()),
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`); NaNs never win, and
/// a NaN first value is kept ([`argmax_twin`]'s rule). Two passes the compiler vectorizes: the
/// largest value in 16 independent lanes, then the first chunk of 16 that holds it.
pub fn argmax(x: &[f32]) -> u32 {
    const L: usize = 16;
    if x.first().is_none_or(|v| v.is_nan()) {
        return 0;
    }
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let m = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    // `m` is a value of `x` (or -inf, which x[0] then is): its first occurrence.
    let at = x
        .chunks(L)
        .position(|c| c.iter().fold(false, |a, &v| a | (v == m)))
        .unwrap_or(0);
    let i = x[at * L..].iter().position(|&v| v == m).unwrap_or(0);
    (at * L + i) as u32
}

/// [`argmax`]'s slow twin: one comparison chain, `v > x[best]`.
pub fn argmax_twin(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of a vocabulary-sized random row (logits spread over ±30) against an f64
    /// log-sum-exp, within f32 rounding of each value.
    #[test]
    fn log_softmax_matches_f64_on_every_element() {
        let mut bits = crate::test_rng::xorshift(0x5eed_1095);
        let logits: Vec<f32> = (0..49152)
            .map(|_| crate::test_rng::signed_unit(bits()) * 30.0)
            .collect();
        let m = logits
            .iter()
            .fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let lse = m + logits
            .iter()
            .map(|&v| (v as f64 - m).exp())
            .sum::<f64>()
            .ln();
        let lp = log_softmax(&logits);
        assert_eq!(lp.len(), logits.len());
        for (i, (&got, &x)) in lp.iter().zip(&logits).enumerate() {
            let want = x as f64 - lse;
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "element {i}: {got} vs {want}"
            );
        }
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }

    /// Two logits a float apart whose log-probs round to one f32 (near −ln V the f32 step is
    /// ~1e-6): `top` ranks them as argmax does, the larger first, where ranking the log-probs
    /// put the lower id first.
    #[test]
    fn top_follows_the_logits_where_log_probs_tie() {
        let mut bits = crate::test_rng::xorshift(0x7071);
        let mut logits: Vec<f32> = (0..49152)
            .map(|_| crate::test_rng::signed_unit(bits()) * 0.05)
            .collect();
        logits[50] = 0.1;
        logits[100] = f32::from_bits(0.1f32.to_bits() + 1);
        let logprobs = log_softmax(&logits);
        assert_eq!(logprobs[50], logprobs[100], "the log-probs tie");
        assert_eq!(top_n(&logprobs, 1)[0].id, 50);
        let out = LmOutput {
            logits: logits.clone(),
            logprobs,
            greedy: Vec::new(),
        };
        let top = out.top(3);
        assert_eq!((top[0].id, top[1].id), (100, 50));
        assert_eq!(top[0].id, argmax(&logits));
        assert_eq!(top[0].logprob, out.logprobs[100]);
        // Far-apart finite logits: a log-prob past f32 is f32::MIN, not -inf.
        let lp = log_softmax(&[3e38, -3e38]);
        assert_eq!(lp, [0.0, f32::MIN]);
    }

    #[test]
    fn top_n_orders_and_breaks_ties_by_id() {
        let top = top_n(&[0.1, 0.9, 0.5, 0.9, -1.0], 3);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert_eq!(top_n(&[0.3, 0.2], 10).len(), 2);
        assert_eq!(argmax(&[0.2, 0.7, 0.7]), 1);
    }

    /// `argmax` against its twin on random rows (lengths around the lane width and a vocabulary)
    /// and on the edge cases: ties, ±0, infinities, NaNs first, last and everywhere, empty.
    #[test]
    fn argmax_matches_its_twin() {
        let mut bits = crate::test_rng::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut next = move || crate::test_rng::signed_unit(bits());
        let mut rows: Vec<Vec<f32>> = [1, 15, 16, 17, 31, 33, 1000, 49152]
            .iter()
            .map(|&n| (0..n).map(|_| next()).collect())
            .collect();
        // Coarse values: many ties of the maximum, at any place.
        rows.extend((0..20).map(|n| (0..40 + n).map(|_| (next() * 3.0).round()).collect()));
        let nan = f32::NAN;
        let (inf, ninf) = (f32::INFINITY, f32::NEG_INFINITY);
        rows.extend([
            vec![],
            vec![nan, 1.0, 2.0],
            vec![1.0, nan, 2.0],
            vec![3.0, nan, 2.0],
            vec![nan; 40],
            [vec![-1.0; 20], vec![nan; 20]].concat(),
            vec![ninf; 33],
            [vec![ninf; 17], vec![nan; 5]].concat(),
            [vec![-0.0, 0.0], vec![-1.0; 30], vec![0.0]].concat(),
            [vec![0.0, -0.0], vec![-1.0; 30]].concat(),
            [vec![1.0; 17], vec![inf], vec![1.0; 17], vec![inf]].concat(),
        ]);
        for x in &rows {
            assert_eq!(argmax(x), argmax_twin(x), "{x:?}");
        }
    }
}
