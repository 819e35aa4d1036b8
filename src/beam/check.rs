//! What beam search takes: a query's options and prompt against the model and trie, and the
//! model's log-probabilities (finite, or the query fails).

use super::{Allowed, BeamOptions, Normalize, Query, MAX_BEAM, MAX_LENGTH_PENALTY, MAX_NEW_TOKENS};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::trie::Trie;

/// A beam width beam search takes (1..=[`MAX_BEAM`]), or the error saying why not: for callers
/// that check a width before any query is made.
pub fn check_width(beam: usize) -> Result<()> {
    if beam == 0 || beam > MAX_BEAM {
        return Err(Error::Input(format!(
            "beam width {beam} is out of range (1..={MAX_BEAM})"
        )));
    }
    Ok(())
}

impl BeamOptions {
    /// The options beam search takes, or the error saying which one it does not: for callers
    /// that check them before any query is made.
    pub fn check(&self) -> Result<()> {
        check_width(self.beam)?;
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            return Err(Error::Input(format!(
                "max_new_tokens {} is out of range (1..={MAX_NEW_TOKENS})",
                self.max_new_tokens
            )));
        }
        let lp = self.length_penalty;
        if !lp.is_finite() || lp.abs() > MAX_LENGTH_PENALTY {
            return Err(Error::Input(format!(
                "length_penalty {lp} is out of range (-{MAX_LENGTH_PENALTY}..={MAX_LENGTH_PENALTY})"
            )));
        }
        if !self.constrained && self.normalize == Normalize::Children {
            return Err(Error::Input(
                "normalizing over the allowed children needs the trie".into(),
            ));
        }
        Ok(())
    }

    /// [`BeamOptions::check`], and the length penalty against the longest sequence a score
    /// can be of here ([`check_length_penalty`]): a constrained one is a code of `trie` and its
    /// EOS.
    pub fn check_for(&self, trie: &Trie) -> Result<()> {
        self.check()?;
        let mut longest = self.max_new_tokens;
        if self.constrained {
            longest = longest.min(trie.max_len() + 1);
        }
        check_length_penalty(self.length_penalty, longest)
    }
}

/// A query's options, prompt tokens and length must suit the model.
pub fn check_query<B: Backend>(model: &Model<B>, q: &Query, trie: &Trie) -> Result<()> {
    q.options.check_for(trie)?;
    if q.prompt.is_empty() {
        return Err(Error::Input("the prompt has no tokens".into()));
    }
    let vocab = model.config.vocab_size;
    if let Some(t) = q.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Input(format!(
            "prompt token {t} is outside the vocabulary of {vocab}"
        )));
    }
    // The last new token is returned, never run: it takes no position (as in transformers).
    // A constrained beam runs at most the trie's longest code: `max_new_tokens` past it
    // reserves nothing more (as the arena's entries, [`State::entries`]).
    let mut run = q.options.max_new_tokens.saturating_sub(1);
    if q.options.constrained {
        run = run.min(trie.max_len());
    }
    if q.prompt.len() + run > model.max_positions() {
        return Err(Error::Input(format!(
            "a prompt of {} tokens plus {run} new ones run (of {} new, the last never run{}) \
             exceeds the model's {} positions",
            q.prompt.len(),
            q.options.max_new_tokens,
            if q.options.constrained {
                format!("; the longest code is {} tokens", trie.max_len())
            } else {
                String::new()
            },
            model.max_positions()
        )));
    }
    Ok(())
}

/// A negative length penalty multiplies a sum of log-probs by `len^-penalty`; for sequences of
/// up to `longest` tokens it is refused where `longest^(1 - penalty)` reaches 1e6 (a score of
/// `longest` log-probs of −1,000 at most stays above −1e9, the score transformers 5 gives its
/// empty finished slots, past which its ranking and stopping test misread real scores and its
/// codes stop being a reference; module docs). The error names the smallest penalty taken, to
/// 0.01.
pub fn check_length_penalty(penalty: f64, longest: usize) -> Result<()> {
    let fits = |p: f64| p >= 0.0 || (longest as f64).powf(1.0 - p) < 1e6;
    if fits(penalty) {
        return Ok(());
    }
    let mut taken = ((1.0 - 6.0 / (longest as f64).log10()) * 100.0).ceil() / 100.0;
    while !fits(taken) {
        taken += 0.01;
    }
    Err(Error::Input(format!(
        "length_penalty {penalty} with sequences of up to {longest} tokens: scores could pass \
         -1e9, where transformers' beam search ranks them against its empty slots; a penalty \
         of {taken:.2} or more is taken at this length"
    )))
}

/// The trie must have been built for this model's vocabulary and EOS.
pub(super) fn check_trie<B: Backend>(model: &Model<B>, trie: &Trie) -> Result<()> {
    if trie.vocab() > model.config.vocab_size {
        return Err(Error::Input(format!(
            "the trie was built for a vocabulary of {}, the model has {}",
            trie.vocab(),
            model.config.vocab_size
        )));
    }
    if !model.config.eos_token_ids.contains(&trie.eos()) {
        return Err(Error::Input(format!(
            "the trie ends codes with token {}, which is not an EOS of the model ({:?})",
            trie.eos(),
            model.config.eos_token_ids
        )));
    }
    Ok(())
}

/// A log-prob that is not finite (NaN, or -inf from a logit that overflowed to +inf and took
/// the row's log-sum-exp with it) means the model itself is broken: an error, not a token that
/// silently drops out or scores -inf (fewer codes, or none, or null scores, as if fine). A finite
/// model's log-probs are always finite: the log-sum-exp subtracts the row's maximum. (A head
/// that masks tokens with -inf logits, or such logits handed to [`search_logits`], is refused
/// too, where transformers would rank the token last: the device step refuses the same, and a
/// -inf that is the mask cannot be told from one that is an overflow without the row's
/// normalizer, which this check does not see.)
pub(super) fn finite_logprobs(lps: &[Allowed]) -> Result<()> {
    match lps.iter().flatten().find(|(_, l)| !l.is_finite()) {
        Some((t, l)) => Err(Error::Numeric(format!(
            "the model's log-probability of token {t} is {l}: its weights or activations are \
             not finite"
        ))),
        None => Ok(()),
    }
}
