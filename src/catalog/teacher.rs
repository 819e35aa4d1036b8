//! Teacher forcing: the product side's probability of each token of a known code after the
//! product prompt, many products in one forward pass, and how a build packs its codes into
//! passes of bounded size.

use crate::backend::{Backend, KvRows, RowKv};
use crate::error::{Error, Result};
use crate::model::{Head, KvArena, Model};

/// The probability of each token of each code after `prompt` (full-vocabulary softmax), in one
/// forward pass: the prompt is prefilled once and every code attends to it.
pub fn teacher_force<B: Backend>(
    model: &Model<B>,
    arena: &mut Option<KvArena<B>>,
    prompt: &[u32],
    codes: &[&[u32]],
) -> Result<Vec<Vec<f32>>> {
    Ok(teacher_force_many(model, arena, &[(prompt, codes.to_vec())])?.remove(0))
}

/// [`teacher_force`] for many products in one forward pass: each prompt is prefilled into its
/// own entries and its codes attend to it. Returns, per product, per code, each token's
/// probability.
pub fn teacher_force_many<B: Backend>(
    model: &Model<B>,
    arena: &mut Option<KvArena<B>>,
    jobs: &[(&[u32], Vec<&[u32]>)],
) -> Result<Vec<Vec<Vec<f32>>>> {
    if jobs.iter().any(|(prompt, _)| prompt.is_empty()) {
        return Err(Error::Input("the product prompt has no tokens".into()));
    }
    let need: usize = jobs
        .iter()
        .map(|(p, codes)| {
            p.len()
                + codes
                    .iter()
                    .map(|c| c.len().saturating_sub(1))
                    .sum::<usize>()
        })
        .sum();
    if need > u32::MAX as usize {
        return Err(Error::Input(format!("{need} KV entries for one pass")));
    }
    if arena.as_ref().is_none_or(|a| a.entries() < need) {
        *arena = None;
        *arena = Some(model.new_arena(need.max(256))?);
    }
    let arena = arena.as_mut().expect("just made");
    let (mut tokens, mut rows, mut links) = (Vec::new(), Vec::new(), Vec::new());
    // Head rows: a prompt's last row predicts each of its codes' first token; code row i
    // predicts its token i + 1. `first[j][c]`: head row of code c's token 1 (if any).
    let mut heads = Vec::new();
    let mut prompt_head = Vec::with_capacity(jobs.len());
    let mut first: Vec<Vec<usize>> = Vec::with_capacity(jobs.len());
    let mut next = 0u32;
    for (prompt, codes) in jobs {
        let (base, p) = (next, prompt.len() as u32);
        tokens.extend_from_slice(prompt);
        rows.extend((0..p).map(|i| RowKv::contiguous(base, i)));
        prompt_head.push(heads.len());
        heads.push(rows.len() - 1);
        next += p;
        let mut firsts = Vec::with_capacity(codes.len());
        for code in codes {
            firsts.push(heads.len());
            let start = links.len() as u32;
            let own = next;
            for (i, &t) in code.iter().take(code.len().saturating_sub(1)).enumerate() {
                let i = i as u32;
                links.push(own + i);
                tokens.push(t);
                rows.push(RowKv {
                    pos: p + i,
                    entry: own + i,
                    span: (base, base + p),
                    link: (start, start + i + 1),
                });
                heads.push(rows.len() - 1);
            }
            next += code.len().saturating_sub(1) as u32;
        }
        first.push(firsts);
    }
    let batch = KvRows {
        rows: &rows,
        links: &links,
    };
    let logits = model.forward_rows(arena, &tokens, batch, Head::Full(&heads))?;
    let vocab = model.config.vocab_size;
    // Each head row's normalizer once (a prompt's last row serves all its codes).
    let lse: Vec<f32> = logits
        .chunks_exact(vocab)
        .map(crate::beam::select::logsumexp)
        .collect();
    // A finite row has a finite log-sum-exp; a NaN or +inf logit (a corrupt weight, an
    // overflow) would give probabilities of NaN or 0 that look like data.
    if let Some(h) = lse.iter().position(|l| !l.is_finite()) {
        return Err(Error::Numeric(format!(
            "teacher forcing: a logits row's log-sum-exp is {}: the model's weights or \
             activations are not finite",
            lse[h]
        )));
    }
    let prob = |h: usize, t: u32| (logits[h * vocab + t as usize] - lse[h]).exp();
    let out = jobs
        .iter()
        .zip(prompt_head.iter().zip(&first))
        .map(|((_, codes), (&ph, firsts))| {
            codes
                .iter()
                .zip(firsts)
                .map(|(code, &h)| {
                    code.iter()
                        .enumerate()
                        .map(|(i, &t)| prob(if i == 0 { ph } else { h + i - 1 }, t))
                        .collect()
                })
                .collect()
        })
        .collect();
    model.recycle(logits);
    Ok(out)
}

/// Teacher-forcing passes over codes sorted by product (`(product, tokens)` each), in order: each
/// pass a list of jobs, a job one product's consecutive codes (a range of `codes`). A pass takes
/// up to `limit` head rows (a job's prompt row, and each code's tokens but its first), so its
/// logits stay bounded: a product with more codes than one pass holds is split over passes,
/// each repeating its prompt (before, one catalog line of 3,000 codes took one pass of 800 MB
/// of logits with the default model, ~10 GB with SmolLM2's vocabulary). A pass also takes up
/// to `max_tokens` tokens run (each job's prompt, `prompt(product)` tokens, and its codes'
/// tokens), so that long prompts cannot make one pass's KV unbounded (128 products of 8,000
/// title tokens were one pass). Only a job of one code past either limit goes past it.
pub(super) fn tf_passes(
    codes: &[(usize, usize)],
    limit: usize,
    prompt: impl Fn(usize) -> usize,
    max_tokens: usize,
) -> Vec<Vec<std::ops::Range<usize>>> {
    let mut passes = Vec::new();
    let (mut pass, mut heads, mut tokens, mut at): (
        Vec<std::ops::Range<usize>>,
        usize,
        usize,
        usize,
    ) = (Vec::new(), 0, 0, 0);
    while at < codes.len() {
        let product = codes[at].0;
        let mut job = at..at;
        let (mut rows, mut run) = (1, prompt(product));
        while job.end < codes.len() && codes[job.end].0 == product {
            let len = codes[job.end].1;
            let more = len.saturating_sub(1);
            let over = heads + rows + more > limit || tokens + run + len > max_tokens;
            if over && !(pass.is_empty() && job.is_empty()) {
                break;
            }
            rows += more;
            run += len;
            job.end += 1;
        }
        if job.is_empty() {
            // No room left in this pass for even one of the product's codes.
            passes.push(std::mem::take(&mut pass));
            (heads, tokens) = (0, 0);
            continue;
        }
        heads += rows;
        tokens += run;
        at = job.end;
        pass.push(job);
        if heads >= limit || tokens >= max_tokens || (at < codes.len() && codes[at].0 == product) {
            passes.push(std::mem::take(&mut pass));
            (heads, tokens) = (0, 0);
        }
    }
    if !pass.is_empty() {
        passes.push(pass);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::tf_passes;

    /// Every code in exactly one job, in order; a job one product's; no pass over the limit
    /// but for a single code longer than it; a product of many codes split over passes.
    #[test]
    fn teacher_forcing_passes_stay_within_their_head_rows() {
        let mut next = crate::test_rng::xorshift(0x7f4a_7c15_9e37_79b9);
        for case in 0..200 {
            let mut codes = Vec::new();
            let products = 1 + next() as usize % 12;
            for p in 0..products {
                // Now and then a product with hundreds of codes, or one very long code.
                let n = match next() % 10 {
                    0 => 300 + next() as usize % 300,
                    _ => 1 + next() as usize % 8,
                };
                for _ in 0..n {
                    let len = if next().is_multiple_of(50) {
                        400
                    } else {
                        1 + next() as usize % 6
                    };
                    codes.push((p, len));
                }
            }
            let limit = 64 + next() as usize % 200;
            // Prompts of a few tokens, now and then of thousands.
            let prompts: Vec<usize> = (0..products)
                .map(|_| match next() % 6 {
                    0 => 1000 + next() as usize % 3000,
                    _ => 1 + next() as usize % 40,
                })
                .collect();
            let max_tokens = 2000 + next() as usize % 6000;
            let passes = tf_passes(&codes, limit, |p| prompts[p], max_tokens);
            let mut at = 0;
            for pass in &passes {
                assert!(!pass.is_empty(), "case {case}: an empty pass");
                let (mut heads, mut tokens) = (0, 0);
                for job in pass {
                    assert_eq!(job.start, at, "case {case}: codes in order, each once");
                    assert!(!job.is_empty(), "case {case}");
                    let product = codes[job.start].0;
                    assert!(codes[job.clone()].iter().all(|c| c.0 == product));
                    heads += 1 + codes[job.clone()].iter().map(|c| c.1 - 1).sum::<usize>();
                    tokens +=
                        prompts[product] + codes[job.clone()].iter().map(|c| c.1).sum::<usize>();
                    at = job.end;
                }
                let one_long = pass.len() == 1 && pass[0].len() == 1;
                assert!(
                    heads <= limit || one_long,
                    "case {case}: {heads} rows > {limit}"
                );
                assert!(
                    tokens <= max_tokens || one_long,
                    "case {case}: {tokens} tokens > {max_tokens}"
                );
            }
            assert_eq!(at, codes.len(), "case {case}: every code");
        }
        // 600 codes of 3 tokens of one product: 3 rows each, 64 a pass at most.
        let one: Vec<(usize, usize)> = vec![(0, 3); 600];
        let passes = tf_passes(&one, 64, |_| 5, usize::MAX);
        assert!(passes.len() >= 600 * 2 / 64);
        assert!(passes.iter().all(|p| p.len() == 1));
    }
}
