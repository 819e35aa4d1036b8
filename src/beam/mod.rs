//! Trie-constrained batched beam search: queries → their most likely valid codes, each with its
//! total score and per-token log-probabilities.
//!
//! Many queries share each decoder step, each with its own beam width. A query's prompt is
//! prefilled once into the KV arena and shared by all its beams; a beam's own code tokens get one
//! KV entry each, and the beam keeps the list of those entries (its ancestry), so reordering
//! beams copies no KV at all — a new beam inherits its parent's entry list and appends one.
//!
//! Selection follows `transformers`' `generate(num_beams=B, do_sample=False,
//! prefix_allowed_tokens_fn=trie, early_stopping=False)` exactly (see [`select`]): full-vocabulary
//! log-softmax, then the trie mask; the top `2B` candidates of the query; the best `B` of them
//! that do not end the code keep running; those among the top `B` that end it (EOS, or the
//! length limit) compete for the `B` finished slots with score `sum(logprobs) / len ^ penalty`;
//! the query stops when no running beam can beat its worst finished one (HF's heuristic) or at
//! `max_new_tokens`. Beam 1 (transformers runs greedy search then) comes out the same: when the
//! best candidate ends a code, the heuristic stops, as the running one scores lower at that
//! length. One difference is left: greedy search takes the argmax of the step's logits, and
//! [`select`] ranks `score + logprob` in f32, so two allowed tokens whose sums round to the same
//! f32 (log-probs within a rounding step of the running score, ~2e-6 near −20) go to the lower
//! token id where greedy takes the larger logit. Breaking such ties on the log-prob would part
//! the CPU's order from the device beam step's (`kernels/beam_step.cu` sorts one 64-bit key of
//! score, beam and token), so it is left as it is.
//!
//! Which transformers: the `_beam_search` of 4.50 and later (the goldens of `tests/beam_hf.rs`
//! come from 5.x). The `BeamSearchScorer` before it compared the worst finished score with the
//! best of the step's 2B candidates, EOS ones included, not the best running beam: at length
//! penalties above 1 the two can stop at different steps (B 2, penalty 2, codes `a`, `b`,
//! `a x`: the newer rule stops with {a, b}, the older one goes on to {a x, a}). A negative length
//! penalty multiplies a sum of log-probs by `len^-penalty`, and past −1e9 (the score transformers
//! 5 puts in its empty finished slots) its ranking and stopping test misread real scores: so a
//! negative penalty is refused where `M^(1 - penalty)` reaches 1e6 for sequences of up to `M`
//! tokens (a constrained search's longest code and its EOS, else `max_new_tokens`; a score of
//! `M` log-probs of −1,000 at most stays above −1e9): below −3.98 at 16 tokens, −1.49 at 256
//! ([`check_length_penalty`]). At large positive penalties the same placeholders, divided by
//! `len^penalty`, can outrank a short real code (at 16 tokens and penalty 10, −1e9 / 16^10 ≈
//! −9e-4): transformers then returns placeholders where gram returns codes, so parity is
//! claimed only while `M^penalty` stays under ~5e4 (what `tools/beam_oracle.py` asserts:
//! penalty ≤ 3.9 at 16 tokens). Parity is tested over the goldens' range (−1 to 3). When a new
//! code ties the worst of B full finished slots, the newest of the tied is dropped
//! (transformers 5's `topk` leaves that order unspecified).
//!
//! [`Normalize::Children`] instead normalizes over a node's allowed tokens only, so the LM head
//! is evaluated for those rows alone (the sparse head).
//!
//! On the CPU a query's codes, scores and token log-probs are the same bits alone and in any
//! batch (`tests/beam.rs`). On the CUDA backend they are not yet: its `linear` takes a bf16
//! GEMM above 16 rows and an f32 kernel below, and the head's path is chosen per step (the
//! picks kernel when every query of the step normalizes over children, the GEMM otherwise), so
//! near-tied codes can swap with the batch (found in review, 2026-11-29; not measured: no GPU).

mod batcher;
mod check;
pub mod select;

pub use self::batcher::{Batcher, Ticket};
pub use self::check::{check_length_penalty, check_query, check_width};
use self::check::{check_trie, finite_logprobs};

use crate::backend::{Backend, KvRows, RowKv};
use crate::error::{Error, Result};
use crate::model::{Head, KvArena, Model};
use crate::trie::Trie;

use self::select::{Candidate, Finished};
use crate::trie::NONE;

/// Widest beam a query may ask for.
pub const MAX_BEAM: usize = 512;
/// `len ^ length_penalty` as transformers computes it (`len ** penalty` in Python doubles,
/// the penalty never rounded to f32; with 0.6 rounded first, 246 of the lengths 1..=256 gave
/// another f32 factor), then rounded to the f32 the scores are in.
pub fn length_factor(len: usize, length_penalty: f64) -> f32 {
    (len as f64).powf(length_penalty) as f32
}

/// Most new tokens a query may ask for.
pub const MAX_NEW_TOKENS: usize = 256;
/// The largest `|length_penalty|` taken: a score is a sum of log-probs times `len^-penalty`, in
/// f32, and at 256 tokens a penalty of ±10 keeps both factor and score finite and nonzero
/// (±20 would send them to inf or 0, every score tying at -0.0 or -inf).
pub const MAX_LENGTH_PENALTY: f64 = 10.0;

/// How a step's log-probabilities are normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// Over the whole vocabulary, then masked (HF semantics).
    Full,
    /// Over the tokens the trie allows at the beam's node only (sparse head).
    Children,
}

/// Options of one query.
#[derive(Debug, Clone, Copy)]
pub struct BeamOptions {
    pub beam: usize,
    pub max_new_tokens: usize,
    pub length_penalty: f64,
    pub normalize: Normalize,
    /// Restrict beams to the trie (on by default; off only to measure what it prevents).
    /// Unconstrained beams end only at the trie's EOS (HF would also stop at a model's other
    /// EOS ids, and keep `(1 + n_eos)·B` candidates).
    pub constrained: bool,
}

impl Default for BeamOptions {
    fn default() -> Self {
        BeamOptions {
            beam: 10,
            max_new_tokens: 16,
            length_penalty: 1.0,
            normalize: Normalize::Full,
            constrained: true,
        }
    }
}

/// One query: its prompt tokens and options.
#[derive(Debug, Clone)]
pub struct Query {
    pub prompt: Vec<u32>,
    pub options: BeamOptions,
}

/// One returned code.
#[derive(Debug, Clone, PartialEq)]
pub struct Code {
    /// The code's id in the trie; `None` only in unconstrained mode, for a sequence that is not
    /// a code (counted in [`Output::invalid`]).
    pub code: Option<u32>,
    /// Its tokens, without the EOS.
    pub tokens: Vec<u32>,
    /// `sum(token_logprobs) / token_logprobs.len() ^ length_penalty`.
    pub score: f32,
    /// Log-probability of each generated token, the EOS included.
    pub token_logprobs: Vec<f32>,
}

/// What a query returned.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Up to `beam` codes, best first.
    pub codes: Vec<Code>,
    /// Unconstrained mode: how many of `codes` are not codes of the set.
    pub invalid: usize,
    /// Finished slots held by sequences cut at `max_new_tokens` without an EOS (HF returns
    /// them; a constrained search leaves them out of `codes`, being no codes).
    pub truncated: usize,
    /// Decoder steps the query took part in (the prefill counts as one).
    pub steps: usize,
    /// Rows the query put through the decoder (its prompt, then one per running beam a step).
    pub rows: usize,
    /// LM-head outputs computed for it: `V` per head row, or one per allowed token with the
    /// sparse head.
    pub head_logits: usize,
    /// Wall time of the decoder steps it took part in: the one that prefilled its prompt, and
    /// the others (shared with the queries batched with it).
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// A running beam.
#[derive(Debug, Clone)]
struct Beam {
    node: u32,
    score: f32,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// KV entries of this beam's code tokens fed so far, oldest first.
    entries: Vec<u32>,
}

/// One query in flight.
struct State {
    options: BeamOptions,
    /// First arena entry of the query; its prompt fills `base..base + prompt.len()`, then one
    /// entry per (step, beam) slot.
    base: u32,
    /// Entries it holds from `base`.
    len: u32,
    prompt: Vec<u32>,
    /// Leading prompt tokens whose KV is the searcher's shared prefix (arena entries
    /// `0..shared`); the query's own entries hold the rest of its prompt.
    shared: usize,
    /// The prompt's KV is in the arena (the first step ran).
    prefilled: bool,
    beams: Vec<Beam>,
    finished: Vec<Finished>,
    /// HF's `is_early_stop_heuristic_unsatisfied`: some running beam may still beat the worst
    /// finished one.
    open: bool,
    steps: usize,
    rows: usize,
    head_logits: usize,
    /// Wall time of the steps it prefilled in, and of the others.
    prefill_s: f64,
    decode_s: f64,
    /// Its rows of the decode step it finished at, kept when the batch holds finished queries'
    /// rows ([`Batcher::set_hold_finished`]).
    last: Option<StepRows>,
    /// Why it stopped without codes: a log-probability of its rows was not finite. The other
    /// queries of the step go on.
    failed: Option<String>,
}

/// One query's rows of a decode step, as the batch ran them: its tokens, rows (link ranges
/// relative to `links`) and link entries.
#[derive(Debug, Clone, Default)]
struct StepRows {
    tokens: Vec<u32>,
    rows: Vec<RowKv>,
    links: Vec<u32>,
}

impl State {
    /// A query not yet started: one beam at the trie's root; `len` arena entries from `base`,
    /// the first `shared` prompt tokens in the shared prefix.
    fn new(query: Query, base: u32, len: u32, shared: usize) -> State {
        State {
            options: query.options,
            base,
            len,
            prompt: query.prompt,
            shared,
            prefilled: false,
            beams: vec![Beam {
                node: Trie::ROOT,
                score: 0.0,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                entries: Vec::new(),
            }],
            finished: Vec::new(),
            open: true,
            steps: 0,
            rows: 0,
            head_logits: 0,
            prefill_s: 0.0,
            decode_s: 0.0,
            last: None,
            failed: None,
        }
    }

    fn active(&self) -> bool {
        self.open && !self.beams.is_empty() && self.failed.is_none()
    }

    /// Arena entries the query needs: its prompt past the shared prefix and one per beam for
    /// every fed code token (the last generated token is never fed). A constrained beam feeds at
    /// most `trie.max_len()` tokens (the code's EOS is its last), so a `max_new_tokens` past
    /// that reserves nothing more: beam 512 with 256 new tokens would otherwise ask for tens of
    /// GB that no step can touch.
    fn entries(q: &Query, shared: usize, trie: &Trie) -> usize {
        // Saturating: callers may ask before the query is checked (`max_new_tokens` 0).
        let mut fed = q.options.max_new_tokens.saturating_sub(1);
        if q.options.constrained {
            fed = fed.min(trie.max_len());
        }
        (q.prompt.len() - shared).saturating_add(q.options.beam.saturating_mul(fed))
    }
}

/// Arena entries `q` holds while it runs over `trie` when no prompt prefix is shared: the most
/// it can need (what a batch's arena is sized by).
pub fn arena_entries(q: &Query, trie: &Trie) -> usize {
    State::entries(q, 0, trie)
}

/// Runs beam search; reuses its KV arena across calls (grown as needed, and made anew when a
/// call brings another model).
pub struct BeamSearch<B: Backend> {
    arena: Option<KvArena<B>>,
    /// A prompt prefix most queries share (a template), prefilled once into arena entries
    /// `0..prefix.len()`.
    prefix: Vec<u32>,
    /// The model (`Model::id`) the arena was made for: another model gets a new arena.
    arena_model: u64,
    /// The arena holds the KV of `prefix`.
    prefix_ready: bool,
    /// Pad decode rows to the beam width (see [`BeamSearch::set_stable_rows`]); `None`: as the
    /// backend prefers.
    stable_rows: Option<bool>,
}

impl<B: Backend> Default for BeamSearch<B> {
    fn default() -> Self {
        BeamSearch::new()
    }
}

impl<B: Backend> BeamSearch<B> {
    pub fn new() -> Self {
        BeamSearch {
            arena: None,
            prefix: Vec::new(),
            arena_model: 0,
            prefix_ready: false,
            stable_rows: None,
        }
    }

    /// Whether each query's decode step runs a row for every one of its `beam` slots, even when
    /// fewer beams are running (a trie that leaves fewer live continuations): the extra rows
    /// repeat a running beam, write only their own KV slot and are never read, so results are
    /// the same, and a batch keeps one pass shape while its queries run (the CUDA backend then
    /// replays one graph instead of planning, capturing or walking a new shape). `None` (the
    /// default): as the backend prefers ([`Backend::stable_beam_rows`]: CUDA up to 1,024 rows a
    /// step, CPU never, where a row costs its FLOPs).
    pub fn set_stable_rows(&mut self, on: Option<bool>) {
        self.stable_rows = on;
    }

    /// Declares a prompt prefix shared by most queries (the prompt template's head). Its KV is
    /// computed once and every query whose prompt tokens start with it (and go on past it)
    /// attends to that copy instead of prefilling its own: exact, since a causal prefix's KV does
    /// not depend on what follows.
    /// Refused when it leaves no room for a query after it in the model's context, or holds a
    /// token outside the vocabulary.
    pub fn set_prefix(&mut self, model: &Model<B>, tokens: Vec<u32>) -> Result<()> {
        let vocab = model.config.vocab_size;
        if tokens.len() >= model.max_positions() {
            return Err(Error::Input(format!(
                "a shared prefix of {} tokens leaves no room in the model's {} positions",
                tokens.len(),
                model.max_positions()
            )));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "shared prefix token {t} is outside the vocabulary of {vocab}"
            )));
        }
        self.prefix = tokens;
        self.prefix_ready = false;
        Ok(())
    }

    /// Tokens of `prompt` covered by the shared prefix.
    fn shared(&self, prompt: &[u32]) -> usize {
        let p = &self.prefix;
        if !p.is_empty() && prompt.len() > p.len() && prompt.starts_with(p) {
            p.len()
        } else {
            0
        }
    }

    /// Runs all `queries` together (their steps batched into shared forward passes) and
    /// returns one [`Output`] per query, in order.
    pub fn run(&mut self, model: &Model<B>, trie: &Trie, queries: &[Query]) -> Result<Vec<Output>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        check_trie(model, trie)?;
        for (i, q) in queries.iter().enumerate() {
            check_query(model, q, trie).map_err(|e| match e {
                Error::Input(msg) => Error::Input(format!("query {i}: {msg}")),
                e => e,
            })?;
        }
        let entries: usize = queries
            .iter()
            .map(|q| State::entries(q, self.shared(&q.prompt), trie))
            .sum();
        let mut batch = Batcher::new(self, model, trie, entries)?;
        let slots: usize = queries.iter().map(|q| q.options.beam).sum();
        batch.set_hold_finished(slots <= model.backend.hold_finished_rows());
        let tickets = queries
            .iter()
            .map(|q| {
                batch.admit(q.clone())?.ok_or_else(|| {
                    Error::Internal(
                        "a query found no room in an arena sized for the whole batch".into(),
                    )
                })
            })
            .collect::<Result<Vec<Ticket>>>()?;
        let mut done = Vec::with_capacity(queries.len());
        while batch.in_flight() > 0 {
            done.extend(batch.step()?);
        }
        done.sort_by_key(|(t, _)| *t);
        debug_assert!(done.iter().map(|d| d.0).eq(tickets.iter().copied()));
        // A query that failed fails the call (the others ran to their end).
        done.into_iter()
            .enumerate()
            .map(|(i, (_, out))| {
                out.map_err(|e| match e {
                    Error::Numeric(msg) => Error::Numeric(format!("query {i}: {msg}")),
                    e => e,
                })
            })
            .collect()
    }
}

/// One decoder pass for every active query: a query not yet started prefills its prompt (its
/// last row gives the first code token), a started one feeds each running beam's last token
/// (and with `pad`, a filler row for each beam slot no beam runs in, see
/// [`BeamSearch::set_stable_rows`]). Then each query selects its next beams from its rows'
/// log-probabilities.
#[allow(clippy::too_many_arguments)]
fn step<B: Backend>(
    model: &Model<B>,
    arena: &mut KvArena<B>,
    trie: &Trie,
    states: &mut [State],
    pad: bool,
    record: bool,
    held: &[&StepRows],
) -> Result<usize> {
    let (mut tokens, mut rows, mut links) = (Vec::new(), Vec::new(), Vec::new());
    // One head row per parent beam: `(query, beam)`, and the batch row it reads.
    let (mut parents, mut head_rows) = (Vec::new(), Vec::new());
    // Head rows of filler rows: after every parent's, so that parent `i` is head row `i`.
    let mut filler_heads = Vec::new();
    // With `record`: each decoding query's rows and links in this step's arrays.
    type Span = std::ops::Range<usize>;
    let mut decoded: Vec<Option<(Span, Span)>> = vec![None; states.len()];
    for (qi, s) in states.iter_mut().enumerate() {
        if !s.active() {
            continue;
        }
        // The prompt's KV: its own entries from `base`, after the shared prefix's `0..shared`
        // when it has one (then its own entries are links, the prefix the span).
        let (shared, own) = (s.shared as u32, (s.prompt.len() - s.shared) as u32);
        let own_entries = s.base..s.base + own;
        let span = if shared > 0 {
            (0, shared)
        } else {
            (s.base, s.base + own)
        };
        if !s.prefilled {
            // Row i of the own prompt links to own entries 0..=i: one copy of them serves all.
            let start = links.len() as u32;
            if shared > 0 {
                links.extend(own_entries.clone());
            }
            for (i, &t) in s.prompt[s.shared..].iter().enumerate() {
                tokens.push(t);
                let i = i as u32;
                rows.push(if shared == 0 {
                    RowKv::contiguous(s.base, i)
                } else {
                    RowKv {
                        pos: shared + i,
                        entry: s.base + i,
                        span,
                        link: (start, start + i + 1),
                    }
                });
            }
            s.prefilled = true;
            s.rows += own as usize;
            parents.push((qi, 0));
            head_rows.push(rows.len() - 1);
            continue;
        }
        // Beam j's token of step `fed` goes to entry `base + own + (fed - 1) * B + j`.
        let (rows_at, links_at) = (rows.len(), links.len());
        let fed = s.beams[0].tokens.len(); // all running beams have the same length
        let slot0 = own_entries.end + (fed as u32 - 1) * s.options.beam as u32;
        for (j, beam) in s.beams.iter_mut().enumerate() {
            let entry = slot0 + j as u32;
            beam.entries.push(entry);
            let start = links.len() as u32;
            if shared > 0 {
                links.extend(own_entries.clone());
            }
            links.extend_from_slice(&beam.entries);
            tokens.push(*beam.tokens.last().expect("a running beam has a token"));
            rows.push(RowKv {
                pos: (s.prompt.len() + fed - 1) as u32,
                entry,
                span,
                link: (start, links.len() as u32),
            });
            parents.push((qi, j));
            head_rows.push(rows.len() - 1);
        }
        s.rows += s.beams.len();
        if pad {
            // Slot j of this step is reserved for the query's beam j, so a filler writes its
            // own entry; it repeats beam 0 (its token, position and ancestry), so its row has
            // the shape of a running beam's, and nothing ever links to its entry.
            let b0 = &s.beams[0];
            let ancestry = &b0.entries[..b0.entries.len() - 1];
            let token = *b0.tokens.last().expect("a running beam has a token");
            for j in s.beams.len()..s.options.beam {
                let entry = slot0 + j as u32;
                let start = links.len() as u32;
                if shared > 0 {
                    links.extend(own_entries.clone());
                }
                links.extend_from_slice(ancestry);
                links.push(entry);
                tokens.push(token);
                rows.push(RowKv {
                    pos: (s.prompt.len() + fed - 1) as u32,
                    entry,
                    span,
                    link: (start, links.len() as u32),
                });
                filler_heads.push(rows.len() - 1);
            }
        }
        if record {
            decoded[qi] = Some((rows_at..rows.len(), links_at..links.len()));
        }
    }
    head_rows.extend(filler_heads);
    // Finished queries' held rows: run again, each with a head row as a filler has (nothing
    // reads their logits; the pass's shape counts head rows).
    for h in held {
        let base = links.len() as u32;
        links.extend_from_slice(&h.links);
        tokens.extend_from_slice(&h.tokens);
        for r in &h.rows {
            rows.push(RowKv {
                link: (r.link.0 + base, r.link.1 + base),
                ..*r
            });
            head_rows.push(rows.len() - 1);
        }
    }
    // Link offsets are `u32`: a step of more links would have wrapped them (unreachable
    // under the arena's cap, about 7 M links at the widest batch; refused, not wrapped).
    if u32::try_from(links.len()).is_err() {
        return Err(Error::Input(format!(
            "a step of {} KV links, over u32: fewer queries or narrower beams a step",
            links.len()
        )));
    }
    let parent_beams: Vec<(usize, &Beam)> = parents
        .iter()
        .map(|&(qi, j)| (qi, &states[qi].beams[j]))
        .collect();
    let (lps, sparse) = logprob_rows(
        model,
        arena,
        trie,
        states,
        &tokens,
        &rows,
        &links,
        &head_rows,
        &parent_beams,
    )?;
    let vocab = model.config.vocab_size;
    let mut at = 0;
    for (s, decoded) in states.iter_mut().zip(decoded) {
        if !s.active() {
            continue;
        }
        let n = s.beams.len();
        let lps = &lps[at..at + n];
        at += n;
        // A log-probability that is not finite is the model's failure on this query's rows,
        // not a candidate to drop or rank last: the query stops with the error; the others'
        // rows are their own (each row's logits depend on its own sequence alone), so they go
        // on.
        if let Err(e) = finite_logprobs(lps) {
            s.failed = Some(match e {
                Error::Numeric(msg) => msg,
                e => e.to_string(),
            });
            s.beams.clear();
            s.last = None;
            continue;
        }
        s.head_logits += lps
            .iter()
            .map(|l| if sparse { l.len() } else { vocab })
            .sum::<usize>();
        let beams = std::mem::take(&mut s.beams);
        let scores: Vec<f32> = beams.iter().map(|b| b.score).collect();
        advance(trie, s, &beams, select::candidates(&scores, lps));
        // A query that finished at this step keeps this step's rows, to run again.
        if let (false, Some((r, l))) = (s.active(), decoded) {
            let base = l.start as u32;
            s.last = Some(StepRows {
                tokens: tokens[r.clone()].to_vec(),
                rows: rows[r]
                    .iter()
                    .map(|x| RowKv {
                        link: (x.link.0 - base, x.link.1 - base),
                        ..*x
                    })
                    .collect(),
                links: links[l].to_vec(),
            });
        }
    }
    Ok(rows.len())
}

/// Beam search for `queries` with a fresh arena.
pub fn search<B: Backend>(model: &Model<B>, trie: &Trie, queries: &[Query]) -> Result<Vec<Output>> {
    BeamSearch::new().run(model, trie, queries)
}

/// Constrained beam search over logits the caller supplies: `logits(step, j, tokens)` is the
/// full `[V]` logits row of running beam `j` at `step` (the model's vocabulary, at least the
/// trie's), whose generated tokens so far are `tokens` (step 0: the prompt's last row, beam 0,
/// no tokens). `Output::rows` counts the rows asked for (1 for the first step), and no
/// timings or head counts are kept.
/// The same normalization, candidates, top `2B`, finishing rules and stopping heuristic as
/// [`search`], with no model: the slow twin of the device beam step (`kernels/beam_step.cu`,
/// `backend::cuda::beam_step`), which selects from logits already on the GPU.
pub fn search_logits(
    trie: &Trie,
    options: BeamOptions,
    mut logits: impl FnMut(usize, usize, &[u32]) -> Vec<f32>,
) -> Result<Output> {
    options.check_for(trie)?;
    if !options.constrained {
        return Err(Error::Input(
            "search_logits is the constrained search's twin: the trie must be on".into(),
        ));
    }
    let query = Query {
        prompt: Vec::new(),
        options,
    };
    let mut s = State::new(query, 0, 0, 0);
    s.prefilled = true;
    while s.active() {
        let step = s.steps;
        let mut lps = Vec::with_capacity(s.beams.len());
        for (j, beam) in s.beams.iter().enumerate() {
            let row = logits(step, j, &beam.tokens);
            if row.len() < trie.vocab() {
                return Err(Error::Input(format!(
                    "a logits row of {} values for a trie of vocabulary {}",
                    row.len(),
                    trie.vocab()
                )));
            }
            lps.push(allowed_logprobs(trie, beam.node, &row, options.normalize));
        }
        // As `search`: a log-probability that is not finite is the model's failure, not a
        // candidate to drop or to rank last.
        finite_logprobs(&lps)?;
        s.rows += s.beams.len();
        let beams = std::mem::take(&mut s.beams);
        let scores: Vec<f32> = beams.iter().map(|b| b.score).collect();
        advance(trie, &mut s, &beams, select::candidates(&scores, &lps));
    }
    Ok(finish(trie, s))
}

/// `(token, logprob)` of every token one beam may take next.
type Allowed = Vec<(u32, f32)>;

/// The tokens a beam at `node` may take next: its children, then EOS where a code ends there.
fn allowed(trie: &Trie, node: u32) -> impl Iterator<Item = u32> + '_ {
    let (tokens, _) = trie.children(node);
    tokens
        .iter()
        .copied()
        .chain(trie.code(node).map(|_| trie.eos()))
}

/// The `(token, logprob)` of every token a beam at `node` may take, from its full logits `row`,
/// normalized over the vocabulary or over those tokens.
fn allowed_logprobs(trie: &Trie, node: u32, row: &[f32], normalize: Normalize) -> Allowed {
    let picked = allowed(trie, node).map(|t| (t, row[t as usize]));
    match normalize {
        Normalize::Full => {
            let lse = select::logsumexp(row);
            picked.map(|(t, l)| (t, l - lse)).collect()
        }
        Normalize::Children => {
            let list: Allowed = picked.collect();
            let lse = select::logsumexp(&list.iter().map(|p| p.1).collect::<Vec<_>>());
            list.into_iter().map(|(t, l)| (t, l - lse)).collect()
        }
    }
}

/// Runs the batch and returns, for each parent beam (one per row of `logits_rows`), the
/// `(token, logprob)` of every token it may take, normalized as its query asks. When every query
/// of the batch normalizes over children, only those logits are computed (the sparse head), and
/// the flag returned is set.
#[allow(clippy::too_many_arguments)]
fn logprob_rows<B: Backend>(
    model: &Model<B>,
    arena: &mut KvArena<B>,
    trie: &Trie,
    states: &[State],
    tokens: &[u32],
    rows: &[RowKv],
    links: &[u32],
    logits_rows: &[usize],
    parents: &[(usize, &Beam)],
) -> Result<(Vec<Allowed>, bool)> {
    let batch = KvRows { rows, links };
    let opts = |qi: usize| states[qi].options;
    let children_only = |pairs: &mut dyn Iterator<Item = (u32, f32)>| {
        let list: Vec<(u32, f32)> = pairs.collect();
        let lse = select::logsumexp(&list.iter().map(|p| p.1).collect::<Vec<_>>());
        list.into_iter().map(|(t, l)| (t, l - lse)).collect()
    };
    if parents
        .iter()
        .all(|&(qi, _)| opts(qi).normalize == Normalize::Children)
    {
        let mut picks: Vec<(u32, u32)> = Vec::new();
        for (i, &(_, beam)) in parents.iter().enumerate() {
            picks.extend(allowed(trie, beam.node).map(|t| (i as u32, t)));
        }
        let logits = model.forward_rows(arena, tokens, batch, Head::Picks(logits_rows, &picks))?;
        let mut at = 0;
        let lps = parents
            .iter()
            .map(|&(_, beam)| {
                let mut it = allowed(trie, beam.node).map(|t| {
                    at += 1;
                    (t, logits[at - 1])
                });
                children_only(&mut it)
            })
            .collect();
        return Ok((lps, true));
    }
    if parents.iter().all(|&(qi, _)| opts(qi).constrained) {
        // Full normalization (some rows): the allowed tokens' logits and each row's
        // log-sum-exp, so that the `[R, V]` logits stay in the backend.
        let mut picks: Vec<(u32, u32)> = Vec::new();
        for (i, &(_, beam)) in parents.iter().enumerate() {
            picks.extend(allowed(trie, beam.node).map(|t| (i as u32, t)));
        }
        let out = model.forward_rows(arena, tokens, batch, Head::PicksLse(logits_rows, &picks))?;
        let (logits, lse) = out.split_at(picks.len());
        let mut at = 0;
        let lps = parents
            .iter()
            .enumerate()
            .map(|(i, &(qi, beam))| {
                let mut it = allowed(trie, beam.node).map(|t| {
                    at += 1;
                    (t, logits[at - 1])
                });
                match opts(qi).normalize {
                    Normalize::Children => children_only(&mut it),
                    Normalize::Full => it.map(|(t, l)| (t, l - lse[i])).collect(),
                }
            })
            .collect();
        return Ok((lps, false));
    }
    let vocab = model.config.vocab_size;
    let logits = model.forward_rows(arena, tokens, batch, Head::Full(logits_rows))?;
    let lps = parents
        .iter()
        .zip(logits.chunks_exact(vocab))
        .map(|(&(qi, beam), row)| {
            let o = opts(qi);
            match (o.constrained, o.normalize) {
                (true, normalize) => allowed_logprobs(trie, beam.node, row, normalize),
                // Only a row's 2B best tokens can be among its query's 2B best candidates.
                (false, _) => {
                    let lse = select::logsumexp(row);
                    crate::lm::top_n(row, 2 * o.beam)
                        .into_iter()
                        .map(|t| (t.id, t.logprob - lse))
                        .collect()
                }
            }
        })
        .collect();
    model.recycle(logits);
    Ok((lps, false))
}

/// HF's update of one query after a step: running beams, finished slots, stopping heuristic.
fn advance(trie: &Trie, s: &mut State, parents: &[Beam], cands: Vec<Candidate>) {
    s.steps += 1;
    let b = s.options.beam;
    let gen_len = parents[0].tokens.len() + 1;
    let at_limit = gen_len >= s.options.max_new_tokens;
    let top = select::top_k(cands, 2 * b);
    let eos = trie.eos();
    let child = |parent: &Beam, token: u32| {
        if s.options.constrained {
            trie.child(parent.node, token).unwrap_or(NONE)
        } else {
            Trie::ROOT
        }
    };
    // As Python's `len ** penalty`: in f64, rounded once.
    let penalty = length_factor(gen_len, s.options.length_penalty);
    let mut running = Vec::with_capacity(b);
    for (rank, c) in top.iter().enumerate() {
        let parent = &parents[c.beam as usize];
        let hits = c.token == eos || at_limit;
        if hits {
            // Only the top B candidates may finish (HF's `top_num_beam_mask`).
            if rank < b {
                let mut tokens = parent.tokens.clone();
                tokens.push(c.token);
                let mut logprobs = parent.logprobs.clone();
                logprobs.push(c.logprob);
                select::offer(
                    &mut s.finished,
                    b,
                    Finished {
                        score: c.score / penalty,
                        node: parent.node,
                        tokens,
                        logprobs,
                    },
                );
            }
        } else if running.len() < b {
            let mut tokens = parent.tokens.clone();
            tokens.push(c.token);
            let mut logprobs = parent.logprobs.clone();
            logprobs.push(c.logprob);
            running.push(Beam {
                node: child(parent, c.token),
                score: c.score,
                tokens,
                logprobs,
                entries: parent.entries.clone(),
            });
        }
    }
    s.beams = if at_limit { Vec::new() } else { running };
    // HF's heuristic: once every finished slot is taken, stop when the best running beam, at
    // its current length, cannot beat the worst finished score.
    if let Some(best) = s.beams.first() {
        if s.finished.len() == b {
            let worst = s.finished.last().expect("full").score;
            s.open &= may_improve(best.score, penalty, worst);
        }
    }
}

/// Whether a running beam of `score` (its length's `penalty` dividing it) can still beat the
/// worst finished score: HF's `BeamHypotheses.is_done` is `worst_score >= highest attainable`,
/// so a tie is done.
fn may_improve(score: f32, penalty: f32, worst: f32) -> bool {
    score / penalty > worst
}

/// The query's result, best first. Constrained: the finished slots that end in EOS (all codes
/// by construction). Unconstrained: every finished slot, `invalid` counting those that are not
/// codes of the set (cut at the length limit, or off the trie).
fn finish(trie: &Trie, s: State) -> Output {
    let eos = trie.eos();
    let mut out = Output {
        steps: s.steps,
        rows: s.rows,
        head_logits: s.head_logits,
        prefill_s: s.prefill_s,
        decode_s: s.decode_s,
        ..Output::default()
    };
    for f in s.finished {
        let ended = f.tokens.last() == Some(&eos);
        let body = if ended {
            &f.tokens[..f.tokens.len() - 1]
        } else {
            &f.tokens[..]
        };
        let code = match (ended, s.options.constrained) {
            (false, _) => None,
            (true, true) => trie.code(f.node),
            (true, false) => trie.walk(body).and_then(|n| trie.code(n)),
        };
        if !ended {
            out.truncated += 1;
        }
        if code.is_none() {
            if s.options.constrained {
                continue;
            }
            out.invalid += 1;
        }
        out.codes.push(Code {
            code,
            tokens: body.to_vec(),
            score: f.score,
            token_logprobs: f.logprobs,
        });
    }
    out
}

#[cfg(test)]
mod tests;
