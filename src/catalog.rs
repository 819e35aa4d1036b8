//! The catalog indexer: a JSONL catalog (`id`, `title`, optional `attributes`, optional `codes`)
//! → the code → posting index, with every (code, product) pair's product-side token
//! probabilities `Pt` obtained by teacher forcing the code after the product prompt.
//!
//! Product codes come from the catalog (`codes`) and, given a code list, from the model: beam
//! search over the list's trie from the product template, keeping codes above a probability
//! threshold (the beams' token log-probabilities are the product-side `Pt` then).

use std::path::Path;
use std::time::Instant;

use serde::Deserialize;

use crate::backend::{Backend, KvRows, RowKv};
use crate::beam::{BeamOptions, BeamSearch, Query, MAX_NEW_TOKENS};
use crate::error::{Error, Result};
use crate::index::{self, CodePostings, Product};
use crate::model::{Head, KvArena, Model};
use crate::settings::Settings;
use crate::tokenizer::Tokenizer;
use crate::trie::{CodeSet, Trie};

/// One catalog line.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub codes: Vec<String>,
}

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Stop,
    Skip,
}

/// Reads a JSONL catalog. Blank lines are ignored; a malformed line stops the read with its
/// line number, or is skipped and counted.
pub fn read(path: &Path, on_error: OnError) -> Result<(Vec<Item>, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut items, mut skipped) = (Vec::new(), 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Item>(line) {
            Ok(item) if !item.id.is_empty() => items.push(item),
            Ok(_) if on_error == OnError::Skip => skipped += 1,
            Err(_) if on_error == OnError::Skip => skipped += 1,
            Ok(_) => {
                return Err(Error::Input(format!(
                    "{} line {}: empty product id",
                    path.display(),
                    i + 1
                )))
            }
            Err(e) => {
                return Err(Error::Input(format!(
                    "{} line {}: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    if items.is_empty() {
        return Err(Error::Input(format!(
            "{}: no products ({skipped} lines skipped)",
            path.display()
        )));
    }
    Ok((items, skipped))
}

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub products: usize,
    pub codes: usize,
    pub postings: usize,
    /// Postings whose code the model generated for the product (the rest came from the
    /// catalog).
    pub generated: usize,
    pub seconds: f64,
    pub products_per_s: f64,
}

/// How product codes are generated with the model (besides those the catalog gives).
#[derive(Debug, Clone)]
pub struct Generate {
    /// The code list generation is constrained to (its codes join the index's).
    pub codes: Vec<String>,
    /// Beam width per product.
    pub beam: usize,
    /// Keep a generated code when its sequence probability (EOS included) is at least this.
    pub threshold: f32,
    /// Products per batch of shared beam-search steps.
    pub batch: usize,
}

/// Builds the index at `out` from `items`. Codes: every catalog code, plus (with `generate`)
/// the codes of a list that beam search over it finds for each product from the product
/// template. For every (code, product) pair the stored `Pt` is the probability of each code
/// token after the product prompt: from the beams for generated codes, by teacher forcing for
/// the catalog's own.
pub fn build<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    settings: &Settings,
    items: &[Item],
    generate: Option<&Generate>,
    out: &Path,
    meta: &serde_json::Value,
) -> Result<Report> {
    let t0 = Instant::now();
    let eos = *model
        .config
        .eos_token_ids
        .first()
        .ok_or_else(|| Error::Input("the model's config names no eos_token_id".into()))?;
    let mut texts: Vec<String> = items.iter().flat_map(|p| p.codes.iter().cloned()).collect();
    if let Some(g) = generate {
        texts.extend(g.codes.iter().cloned());
    }
    texts.sort_unstable();
    texts.dedup();
    if texts.is_empty() {
        return Err(Error::Input(
            "no codes: the catalog's `codes` lists are empty and no code list was given".into(),
        ));
    }
    let set = CodeSet::from_texts(texts, tokenizer, eos)?;
    // Search generates up to `max_len + 1` tokens: a longer code could never come back.
    if let Some(i) = (0..set.len()).find(|&i| set.code_tokens(i).len() >= MAX_NEW_TOKENS) {
        return Err(Error::Input(format!(
            "code {:?} is {} tokens; codes may have at most {}",
            set.texts[i],
            set.code_tokens(i).len(),
            MAX_NEW_TOKENS - 1
        )));
    }
    let trie = Trie::build(&set, model.config.vocab_size, eos)?;
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|item| tokenizer.encode(&settings.product_prompt(&item.title)))
        .collect::<Result<_>>()?;
    // Per product: code id → Pt, generated ones first.
    let mut found: Vec<Vec<(u32, Vec<f32>)>> = vec![Vec::new(); items.len()];
    let mut generated = 0;
    if let Some(g) = generate {
        let options = BeamOptions {
            beam: g.beam,
            max_new_tokens: trie.max_len() + 1,
            ..Default::default()
        };
        let mut search = BeamSearch::new();
        for (b, chunk) in prompts.chunks(g.batch.max(1)).enumerate() {
            let queries: Vec<Query> = chunk
                .iter()
                .map(|p| Query {
                    prompt: p.clone(),
                    options,
                })
                .collect();
            for (i, out) in search.run(model, &trie, &queries)?.into_iter().enumerate() {
                let pi = b * g.batch.max(1) + i;
                for c in out.codes {
                    let p: f32 = c.token_logprobs.iter().sum::<f32>().exp();
                    if let (Some(id), true) = (c.code, p >= g.threshold) {
                        let n = c.tokens.len();
                        found[pi]
                            .push((id, c.token_logprobs[..n].iter().map(|l| l.exp()).collect()));
                        generated += 1;
                    }
                }
            }
            progress(
                t0,
                (b + 1) * g.batch.max(1),
                items.len(),
                "generated codes for",
            );
        }
    }
    let mut arena = None;
    for (pi, item) in items.iter().enumerate() {
        let mut ids: Vec<u32> = item
            .codes
            .iter()
            .map(|c| {
                set.texts
                    .binary_search(c)
                    .expect("every catalog code is in the set") as u32
            })
            .filter(|id| !found[pi].iter().any(|(g, _)| g == id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            let codes: Vec<&[u32]> = ids.iter().map(|&c| set.code_tokens(c as usize)).collect();
            let pts =
                teacher_force(model, &mut arena, &prompts[pi], &codes).map_err(|e| match e {
                    Error::Input(m) => Error::Input(format!("product {:?}: {m}", item.id)),
                    e => e,
                })?;
            found[pi].extend(ids.into_iter().zip(pts));
        }
        if (pi + 1) % 1000 == 0 {
            progress(t0, pi + 1, items.len(), "scored the catalog codes of");
        }
    }
    let mut postings: Vec<CodePostings> = (0..set.len())
        .map(|_| CodePostings {
            products: Vec::new(),
            pt: Vec::new(),
        })
        .collect();
    for (pi, codes) in found.into_iter().enumerate() {
        for (c, pt) in codes {
            postings[c as usize].products.push(pi as u32);
            postings[c as usize].pt.push(pt);
        }
    }
    let products: Vec<Product> = items
        .iter()
        .map(|p| Product {
            id: p.id.clone(),
            title: p.title.clone(),
        })
        .collect();
    index::write(
        out,
        &set,
        &trie,
        &postings,
        &products,
        &settings.delimiter,
        meta,
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Report {
        products: items.len(),
        codes: set.len(),
        postings: postings.iter().map(|p| p.products.len()).sum(),
        generated,
        seconds,
        products_per_s: items.len() as f64 / seconds,
    })
}

/// One progress line on stderr: count, rate, ETA.
fn progress(t0: Instant, done: usize, total: usize, what: &str) {
    let done = done.min(total);
    let rate = done as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "[index] {what} {done}/{total} products, {rate:.1}/s, ETA {:.0} s",
        (total - done) as f64 / rate.max(1e-9)
    );
}

/// The probability of each token of each code after `prompt` (full-vocabulary softmax), in one
/// forward pass: the prompt is prefilled once and every code attends to it.
pub fn teacher_force<B: Backend>(
    model: &Model<B>,
    arena: &mut Option<KvArena<B>>,
    prompt: &[u32],
    codes: &[&[u32]],
) -> Result<Vec<Vec<f32>>> {
    if prompt.is_empty() {
        return Err(Error::Input("the product prompt has no tokens".into()));
    }
    let p = prompt.len() as u32;
    let fed: usize = codes.iter().map(|c| c.len().saturating_sub(1)).sum();
    let need = prompt.len() + fed;
    if arena.as_ref().is_none_or(|a| a.entries() < need) {
        *arena = None;
        *arena = Some(model.new_arena(need.max(256))?);
    }
    let arena = arena.as_mut().expect("just made");
    let mut tokens = prompt.to_vec();
    let mut rows: Vec<RowKv> = (0..p).map(|i| RowKv::contiguous(0, i)).collect();
    let mut links = Vec::new();
    // Head rows: the last prompt row predicts every code's first token; code row i predicts
    // its token i + 1.
    let mut heads = vec![prompt.len() - 1];
    let mut first_head = Vec::with_capacity(codes.len());
    let mut next = p;
    for code in codes {
        first_head.push(heads.len());
        let start = links.len() as u32;
        let own = next;
        for (i, &t) in code.iter().take(code.len().saturating_sub(1)).enumerate() {
            let i = i as u32;
            links.push(own + i);
            tokens.push(t);
            rows.push(RowKv {
                pos: p + i,
                entry: own + i,
                span: (0, p),
                link: (start, start + i + 1),
            });
            heads.push(rows.len() - 1);
        }
        next += code.len().saturating_sub(1) as u32;
    }
    let batch = KvRows {
        rows: &rows,
        links: &links,
    };
    let logits = model.forward_rows(arena, &tokens, batch, Head::Full(&heads))?;
    let vocab = model.config.vocab_size;
    // Each head row's normalizer once (the first row serves every code's first token).
    let lse: Vec<f32> = logits
        .chunks_exact(vocab)
        .map(crate::beam::select::logsumexp)
        .collect();
    let prob = |h: usize, t: u32| (logits[h * vocab + t as usize] - lse[h]).exp();
    let out = codes
        .iter()
        .zip(&first_head)
        .map(|(code, &h)| {
            code.iter()
                .enumerate()
                .map(|(i, &t)| prob(if i == 0 { 0 } else { h + i - 1 }, t))
                .collect()
        })
        .collect();
    model.recycle(logits);
    Ok(out)
}
