//! The catalog indexer: a JSONL catalog (`id`, `title`, optional `attributes`, optional `codes`)
//! → the code → posting index, with every (code, product) pair's product-side token
//! probabilities `Pt` obtained by teacher forcing the code after the product prompt.
//!
//! Today the codes come from the catalog (`codes`); generating them with the model from the
//! product template (beam search, threshold) is the next step of issue 4.

use std::path::Path;
use std::time::Instant;

use serde::Deserialize;

use crate::backend::{Backend, KvRows, RowKv};
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
    pub seconds: f64,
}

/// Builds the index at `out` from `items`: the distinct catalog codes, their trie, and for every
/// product and each of its codes the teacher-forced `Pt` of the code's tokens.
pub fn build<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    settings: &Settings,
    items: &[Item],
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
    texts.sort_unstable();
    texts.dedup();
    if texts.is_empty() {
        return Err(Error::Input(
            "no product carries a code (the catalog's `codes` lists are empty)".into(),
        ));
    }
    let set = CodeSet::from_texts(texts, tokenizer, eos)?;
    let trie = Trie::build(&set, model.config.vocab_size, eos)?;
    let mut postings: Vec<CodePostings> = (0..set.len())
        .map(|_| CodePostings {
            products: Vec::new(),
            pt: Vec::new(),
        })
        .collect();
    let mut arena = None;
    for (pi, item) in items.iter().enumerate() {
        let prompt = tokenizer.encode(&settings.product_prompt(&item.title))?;
        let mut ids: Vec<u32> = item
            .codes
            .iter()
            .map(|c| {
                set.texts
                    .binary_search(c)
                    .expect("every catalog code is in the set") as u32
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let codes: Vec<&[u32]> = ids.iter().map(|&c| set.code_tokens(c as usize)).collect();
        let pts = teacher_force(model, &mut arena, &prompt, &codes).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("product {:?}: {m}", item.id)),
            e => e,
        })?;
        for (&c, pt) in ids.iter().zip(pts) {
            postings[c as usize].products.push(pi as u32);
            postings[c as usize].pt.push(pt);
        }
        if (pi + 1) % 1000 == 0 {
            let rate = (pi + 1) as f64 / t0.elapsed().as_secs_f64();
            eprintln!(
                "[index] {}/{} products, {rate:.0}/s, ETA {:.0} s",
                pi + 1,
                items.len(),
                (items.len() - pi - 1) as f64 / rate
            );
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
    Ok(Report {
        products: items.len(),
        codes: set.len(),
        postings: postings.iter().map(|p| p.products.len()).sum(),
        seconds: t0.elapsed().as_secs_f64(),
    })
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
    let prob = |h: usize, t: u32| {
        let row = &logits[h * vocab..(h + 1) * vocab];
        (row[t as usize] - crate::beam::select::logsumexp(row)).exp()
    };
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
