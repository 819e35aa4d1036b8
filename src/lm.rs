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

/// `log_softmax(logits)`, computed with an f64 sum.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// The `n` most likely entries of `logprobs`, most likely first (ties: lower id first).
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
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
            logprob: logprobs[id as usize],
        })
        .collect()
}

/// What a prompt leads to: the next-token distribution and, if asked, a greedy continuation.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// Log-probabilities of the next token after the prompt, `[V]`.
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
    let need = prompt.len().saturating_add(greedy);
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
    let logprobs = log_softmax(&logits);
    let mut out = Vec::with_capacity(greedy);
    let mut next = argmax(&logits);
    for step in 0..greedy {
        out.push(next);
        if model.config.eos_token_ids.contains(&next) || step + 1 == greedy {
            break;
        }
        let logits = model.forward(&mut cache, &[next], &[0], &[0])?;
        next = argmax(&logits);
    }
    Ok(LmOutput {
        logprobs,
        greedy: out,
    })
}

/// Index of the largest value; the first one on ties.
pub fn argmax(x: &[f32]) -> u32 {
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

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, -3.0, 0.5]);
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp[1] - lp[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_n_orders_and_breaks_ties_by_id() {
        let top = top_n(&[0.1, 0.9, 0.5, 0.9, -1.0], 3);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert_eq!(top_n(&[0.3, 0.2], 10).len(), 2);
        assert_eq!(argmax(&[0.2, 0.7, 0.7]), 1);
    }
}
