//! The catalog indexer: a JSONL catalog (`id`, `title`, optional `attributes`, optional `codes`)
//! → the code → posting index, with every (code, product) pair's product-side token
//! probabilities `Pt` obtained by teacher forcing the code after the product prompt.
//!
//! Product codes come from the catalog (`codes`) and, with [`Generate`], from the model: beam
//! search from the product template over a code list's trie, or unconstrained (any token
//! sequence the model ends with its EOS), keeping codes above a probability threshold (the
//! beams' token log-probabilities are the product-side `Pt` then). Codes no indexed product
//! carries are not indexed.

use std::path::Path;
use std::time::Instant;

use crate::backend::Backend;
use crate::beam::{BeamOptions, BeamSearch, Query};
use crate::error::{Error, Result};
use crate::index::{self, Product};
use crate::model::Model;
use crate::settings::Settings;
use crate::tokenizer::Tokenizer;
use crate::trie::{stopped_inside, CodeName, CodeSet, Trie};

mod collect;
mod read;
mod shard;
mod teacher;
mod work_lock;

use self::teacher::tf_passes;
pub use self::teacher::{teacher_force, teacher_force_many};
use collect::Collected;
pub use read::{read, Attributes, CodeFile, Item, OnError};
use shard::{read_shard, write_shard, SHARD_VERSION};
use work_lock::lock_work_dir;

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub products: usize,
    pub codes: usize,
    pub postings: usize,
    /// Postings whose code the model generated for the product (the rest came from the
    /// catalog).
    pub generated: usize,
    /// Shards a restarted build took from its earlier run.
    pub reused_shards: usize,
    /// Products indexed under no code at all (neither the catalog's nor generated ones):
    /// no search can return them.
    pub products_without_codes: usize,
    /// The first few of those products' ids, for a warning (not in the JSON report).
    #[serde(skip)]
    pub without_codes_sample: Vec<String>,
    /// Codes merged into another that tokenizes alike (the model cannot tell them apart, so
    /// they share one posting list, under the text more products list).
    pub merged_codes: usize,
    /// The first few of those, as `"text" → "the text kept"`, for a warning.
    #[serde(skip)]
    pub merged_sample: Vec<String>,
    /// Codes known to the build (the catalog's, the generation list's) that no indexed
    /// product carries: left out of the index, as a search could only spend a beam on them.
    pub unused_codes: usize,
    /// Products left out of the index under `OnError::Skip` because their prompt and codes do
    /// not fit the model's positions, or a catalog code of theirs is one the model cannot emit
    /// (not in `products`).
    pub skipped_products: usize,
    /// The first few of those products, named with their catalog lines (and the code, for one
    /// with a code the model cannot emit), for a warning.
    #[serde(skip)]
    pub skipped_sample: Vec<String>,
    /// The index's codes by granularity (attributes between `gram.json`'s delimiters), which
    /// picks each one's scoring weight.
    pub granularity: Granularity,
    pub seconds: f64,
    pub products_per_s: f64,
}

/// Codes by granularity: coarse (1–2 attributes), medium (3), fine (4 or more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Granularity {
    /// Of the coarse, those of one attribute (no delimiter in them).
    pub single: usize,
    pub coarse: usize,
    pub medium: usize,
    pub fine: usize,
}

impl Granularity {
    /// Counts `texts`, each cut at `delimiter`.
    pub fn of<'a>(texts: impl IntoIterator<Item = &'a String>, delimiter: &str) -> Granularity {
        let mut g = Granularity::default();
        for t in texts {
            let parts = crate::settings::granularity(t, delimiter);
            g.single += (parts <= 1) as usize;
            match crate::settings::Grain::of(parts) {
                crate::settings::Grain::Coarse => g.coarse += 1,
                crate::settings::Grain::Medium => g.medium += 1,
                crate::settings::Grain::Fine => g.fine += 1,
            }
        }
        g
    }
}

/// How many ids [`Report::without_codes_sample`] keeps.
pub const SAMPLE_IDS: usize = 10;

/// How product codes are generated with the model (besides those the catalog gives).
#[derive(Debug, Clone)]
pub struct Generate {
    /// The code list generation is constrained to (the codes found for some product join the
    /// index's). Empty: unconstrained generation — any token sequence the model ends with EOS,
    /// decoded to text, becomes a code.
    pub codes: Vec<String>,
    /// Beam width per product.
    pub beam: usize,
    /// Keep a generated code when its sequence probability (EOS included) is at least this.
    pub threshold: f32,
    /// Products per batch of shared beam-search steps.
    pub batch: usize,
    /// Unconstrained generation: most tokens a code may take, its EOS included.
    pub max_new_tokens: usize,
}

/// How a build runs (what it produces is set by the catalog, the model and [`Generate`]).
#[derive(Debug, Clone)]
pub struct BuildOptions<'a> {
    pub generate: Option<&'a Generate>,
    /// Products per shard: the unit of progress that a restarted build does not redo.
    pub shard_size: usize,
    /// Where finished shards are kept until the index is written (default: `<index>.shards/`
    /// beside the index file). A restarted build reuses every shard whose inputs are unchanged.
    pub work_dir: Option<std::path::PathBuf>,
    /// Draw a progress bar (rate, ETA) on a terminal; plain lines otherwise.
    pub progress: bool,
    /// Where the generation code list came from, so that errors name its lines (without one
    /// they are numbered by position in the list).
    pub code_file: Option<CodeFile>,
    /// What a product that does not fit the model (its prompt plus its longest code, or plus
    /// the tokens generation may add, past the model's positions), or that lists a catalog code
    /// the model cannot emit, does: stop the build naming it, or be left out of the index and
    /// counted.
    pub on_error: OnError,
}

impl Default for BuildOptions<'_> {
    fn default() -> Self {
        BuildOptions {
            generate: None,
            shard_size: 1000,
            work_dir: None,
            progress: false,
            code_file: None,
            on_error: OnError::Stop,
        }
    }
}

/// Builds the index at `out` from `items` (see [`build_with`]).
pub fn build<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    settings: &Settings,
    items: &[Item],
    generate: Option<&Generate>,
    out: &Path,
    meta: &serde_json::Value,
) -> Result<Report> {
    let options = BuildOptions {
        generate,
        ..Default::default()
    };
    build_with(model, tokenizer, settings, items, &options, out, meta)
}

/// Per product: each code's text and the probability of each of its tokens after the product
/// prompt.
type Found = Vec<Vec<(String, Vec<f32>)>>;

/// Builds the index at `out` from `items`. Codes: every catalog code, plus (with `generate`)
/// the codes beam search finds for each product from the product template, over a code list
/// or unconstrained. For every (code, product) pair the stored `Pt` is the probability of each
/// code token after the product prompt: from the beams for generated codes (when the code's
/// own tokenization is the generated one), by teacher forcing otherwise, batched across
/// products. The work goes shard by shard; each finished shard is saved, so a build that is
/// stopped and run again with the same inputs picks up where it was.
///
/// `meta` is stored in the index as it is; it must name the model's fingerprint
/// (`{"model": {"fingerprint": ...}}`, [`crate::search::model_fingerprint`]), which keys the
/// saved shards.
pub fn build_with<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    settings: &Settings,
    items: &[Item],
    options: &BuildOptions,
    out: &Path,
    meta: &serde_json::Value,
) -> Result<Report> {
    let t0 = Instant::now();
    // A saved shard is taken only by a build of the same model: without the model's
    // fingerprint in `meta`, a build in the same work directory with another model would
    // take this one's probabilities.
    let fingerprint = meta["model"]["fingerprint"].as_str().ok_or_else(|| {
        Error::Input(
            "the index's metadata names no model.fingerprint (search::model_fingerprint of \
             the model directory): a build's saved shards are keyed by it"
                .into(),
        )
    })?;
    let eos = *model
        .config
        .eos_token_ids
        .first()
        .ok_or_else(|| Error::Input("the model's config names no eos_token_id".into()))?;
    let generate = options.generate;
    // Most tokens a code may take, its EOS included.
    let limit = settings.code_token_limit();
    // The model's other EOS tokens: a code holding one could not be emitted whole.
    let stops = &model.config.eos_token_ids[1..];
    if let Some(g) = generate {
        crate::beam::check_width(g.beam)?;
        if g.batch == 0 {
            return Err(Error::Input(
                "generation needs a batch of at least 1 product".into(),
            ));
        }
        if !(0.0..=1.0).contains(&g.threshold) {
            return Err(Error::Input(format!(
                "generation threshold {} is out of range (0..=1)",
                g.threshold
            )));
        }
        if g.max_new_tokens == 0 || g.max_new_tokens > limit {
            return Err(Error::Input(format!(
                "generation of up to {} tokens a code: expected 1..={limit} (gram.json's \
                 max_code_tokens, else beam search's limit)",
                g.max_new_tokens
            )));
        }
    }
    let unconstrained = generate.is_some_and(|g| g.codes.is_empty());
    // Errors name a code by where it came from: the list's by its file's line, the others (the
    // catalog's and the list's, sorted into one set) by the first product that lists it, else
    // by the list's line (searched only for an error's message).
    let list_name = |i: usize, _: &str| match &options.code_file {
        Some(f) => f.name(i),
        None => format!("code list line {}", i + 1),
    };
    // The codes known before generation: the catalog's and the list's, checked up front.
    // Distinct first: a catalog lists each code on many products.
    let mut texts: Vec<String> = items
        .iter()
        .flat_map(|p| p.codes.iter().map(String::as_str))
        .collect::<std::collections::HashSet<&str>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let list = match generate {
        Some(g) if !g.codes.is_empty() => {
            let list = CodeSet::from_texts_named(g.codes.clone(), tokenizer, eos, &list_name)?;
            check_codes(&list, limit, stops, &list_name)?;
            texts.extend(g.codes.iter().cloned());
            let trie = Trie::build_named(&list, model.config.vocab_size, eos, &list_name)?;
            Some((list, trie))
        }
        _ => None,
    };
    texts.sort_unstable();
    texts.dedup();
    if texts.is_empty() && !unconstrained {
        return Err(Error::Input(
            "no codes: the catalog's `codes` lists are empty and no code list was given".into(),
        ));
    }
    // Tokenized once; a catalog code this model cannot emit (the tokenizer refuses it, it is
    // no tokens, it holds the EOS token, it is too long) is set aside with why. (The list's
    // codes were checked above: none is.)
    // A blank code is no code (`read` refuses one under `Stop`; under `Skip` its product is
    // left out here, with the others that list a code this model cannot emit).
    let blank: Vec<(String, String)> = texts
        .iter()
        .filter(|t| t.trim().is_empty())
        .map(|t| (t.clone(), "is blank".to_string()))
        .collect();
    texts.retain(|t| !t.trim().is_empty());
    let (known, mut bad) = if texts.is_empty() {
        (None, Vec::new())
    } else {
        let (set, mut bad) = CodeSet::from_texts_lenient(texts, tokenizer, eos)?;
        let long: Vec<Option<String>> = (0..set.len())
            .map(|i| {
                too_long(set.code_tokens(i).len(), limit)
                    .or_else(|| stopped_inside(set.code_tokens(i), stops))
            })
            .collect();
        let set = if long.iter().any(Option::is_some) {
            let keep: Vec<bool> = long.iter().map(Option::is_none).collect();
            for (i, why) in long.into_iter().enumerate() {
                bad.extend(why.map(|w| (set.texts[i].clone(), w)));
            }
            bad.sort_unstable();
            set.retain(&keep).0
        } else {
            set
        };
        (Some(set).filter(|s| !s.is_empty()), bad)
    };
    if !blank.is_empty() {
        bad.extend(blank);
        bad.sort_unstable();
    }
    // The products with such a code, in catalog order: under `Stop` the first is the error,
    // under `Skip` they are left out before any work, and reported with the products that do
    // not fit.
    let unfit: Vec<(usize, String)> = if bad.is_empty() {
        Vec::new()
    } else {
        items
            .iter()
            .enumerate()
            .filter_map(|(pi, item)| {
                item.codes.iter().find_map(|c| {
                    let at = bad.binary_search_by(|(t, _)| t.as_str().cmp(c)).ok()?;
                    Some((pi, format!("{}: code {c:?} {}", item.name(), bad[at].1)))
                })
            })
            .collect()
    };
    if let (OnError::Stop, Some((_, why))) = (options.on_error, unfit.first()) {
        return Err(Error::Input(why.clone()));
    }
    // Every product the build leaves out, by id: recorded in the index, so that `gram eval`
    // counts a judged product among them as a miss rather than dropping it.
    let mut left_out_ids: Vec<String> = unfit.iter().map(|&(pi, _)| items[pi].id.clone()).collect();
    let fit: Vec<Item>;
    let items: &[Item] = if unfit.is_empty() {
        items
    } else {
        let mut out = unfit.iter().map(|&(pi, _)| pi).peekable();
        fit = (0..items.len())
            .filter(|&pi| out.next_if_eq(&pi).is_none())
            .map(|pi| items[pi].clone())
            .collect();
        if fit.is_empty() {
            return Err(Error::Input(format!(
                "no product fits the model: all {} were left out (the first: {})",
                items.len(),
                unfit[0].1
            )));
        }
        &fit
    };
    let source = |_: usize, text: &str| {
        if let Some(item) = items.iter().find(|p| p.codes.iter().any(|c| c == text)) {
            return item.name();
        }
        match generate.and_then(|g| g.codes.iter().position(|c| c == text)) {
            Some(i) => list_name(i, text),
            None => "a generated code".into(),
        }
    };
    let shard_size = options.shard_size.max(1);
    let work = options
        .work_dir
        .clone()
        .unwrap_or_else(|| out.with_extension("shards"));
    // One build a work directory: two at once overwrote each other's shards, and the first to
    // finish removed the other's. Released when the build returns (the lock is the open file's).
    let lock = lock_work_dir(&work)?;
    let ctx = Ctx {
        model,
        tokenizer,
        settings,
        generate,
        list: list.as_ref(),
        known: known.as_ref(),
        eos,
        on_error: options.on_error,
    };
    // A shard made under `Skip` may leave products out, one made under `Stop` never: a build
    // under `Stop` must not take the former's.
    let key_base = serde_json::json!({
        "model": fingerprint,
        // The settings the build runs with (the product template makes every shard's
        // probabilities), not those `meta` records.
        "settings": crate::search::build_settings(settings),
        "generate": generate.map(|g| format!("{g:?}")),
        "version": SHARD_VERSION,
        "skip": options.on_error == OnError::Skip,
        // The probabilities a shard holds are the backend's (bf16 on a GPU): a build on
        // another takes none of its shards.
        "backend": model.backend.numerics(),
        // The fingerprint hashes config.json, not generation_config.json, which may give the
        // EOS ids: the codes a shard generated end at the first, and hold none of them.
        "eos": model.config.eos_token_ids,
        "positions": model.max_positions(),
        // gram.json's `max_code_tokens`: the generated codes a shard kept are those within it.
        "code_tokens": settings.code_token_limit(),
    });
    // Hashed once: with a code list it is the list's whole text (tens of MB for millions of
    // codes), which each shard's key re-serialized.
    let base_key = crate::container::checksum(
        serde_json::to_string(&key_base)
            .map_err(|e| Error::Input(e.to_string()))?
            .as_bytes(),
    );
    let mut bar = Progress::new(items.len(), options.progress);
    let (mut found, mut generated, mut reused) = (Collected::new(), 0, 0);
    let mut skipped: Vec<bool> = Vec::with_capacity(items.len());
    let shard_path = |si: usize| work.join(format!("shard-{si:06}.bin"));
    for (si, shard) in items.chunks(shard_size).enumerate() {
        let path = shard_path(si);
        let mut keyed = base_key.to_le_bytes().to_vec();
        keyed.extend(
            serde_json::to_string(shard)
                .map_err(|e| Error::Input(e.to_string()))?
                .as_bytes(),
        );
        let key = crate::container::checksum(&keyed);
        let (part, left_out) = match read_shard(&path, key, shard.len()) {
            Some((part, left_out, g)) => {
                reused += 1;
                generated += g;
                (part, left_out)
            }
            None => {
                let (part, left_out, g) = encode_shard(&ctx, shard)?;
                generated += g;
                write_shard(&path, key, &part, &left_out, g)?;
                (part, left_out)
            }
        };
        found.push(part);
        skipped.extend(left_out);
        bar.advance(shard.len());
    }
    bar.finish();

    // The index's codes: the known ones (already tokenized), plus whatever unconstrained
    // generation found.
    let set = match known {
        Some(set) if !unconstrained => set,
        known => {
            let mut texts: Vec<String> = known.map(|s| s.texts).unwrap_or_default();
            texts.extend(found.names().iter().cloned());
            texts.sort_unstable();
            texts.dedup();
            if texts.is_empty() {
                return Err(Error::Input(match (unconstrained, unfit.first()) {
                    (true, _) => format!(
                        "unconstrained generation found no codes: no beam ended with EOS within \
                         {} tokens above the threshold",
                        generate.map_or(0, |g| g.max_new_tokens)
                    ),
                    (false, Some((_, why))) => format!(
                        "no codes: every code of the catalog was refused ({} products left out; \
                         the first: {why})",
                        unfit.len()
                    ),
                    (false, None) => "no codes: the catalog lists none".into(),
                }));
            }
            let set = CodeSet::from_texts_named(texts, tokenizer, eos, &source)?;
            check_codes(&set, limit, stops, &source)?;
            set
        }
    };
    // Products left out are not in the index: the others are numbered anew, in order.
    let kept: Vec<usize> = (0..items.len()).filter(|&pi| !skipped[pi]).collect();
    let left_out: Vec<usize> = (0..items.len()).filter(|&pi| skipped[pi]).collect();
    if kept.is_empty() {
        return Err(Error::Input(format!(
            "no product fits the model: all {} were left out (the first: {})",
            items.len(),
            items[0].name()
        )));
    }
    let without_codes: Vec<usize> = kept
        .iter()
        .copied()
        .filter(|&pi| found.product(pi).next().is_none())
        .collect();
    // Each kept product's codes as ids of `set`, checked against it; how many products list
    // each code.
    let (set_id, listed) = found.resolve(&set, &kept, &work)?;
    // A code no indexed product carries (a generation-list code no product was found to
    // have, or a catalog code of products left out) is not indexed: a search could spend a
    // beam on it and find nothing.
    let keep: Vec<bool> = listed.iter().map(|&n| n > 0).collect();
    let unused_codes = keep.iter().filter(|&&k| !k).count();
    let (set, kept_id) = set.retain(&keep);
    if set.is_empty() {
        return Err(Error::Input(
            "no codes: no product indexed carries a code (the catalog's or a generated one)".into(),
        ));
    }
    let listed: Vec<usize> = (0..keep.len())
        .filter(|&c| keep[c])
        .map(|c| listed[c])
        .collect();
    // Codes that tokenize alike are one code to the model (a lowercasing tokenizer and "HP",
    // "hp"): one posting list, under the text most products list.
    let (set, merged_id, merged) = set.merge_alike(&listed);
    let id_of = |c: usize| merged_id[kept_id[c].expect("a listed code is kept") as usize];
    let trie = Trie::build_named(&set, model.config.vocab_size, eos, &source)?;
    let postings = found.columns(&kept, set.len(), |code| {
        id_of(set_id[code as usize] as usize) as usize
    });
    drop(found);
    let products: Vec<Product> = kept
        .iter()
        .map(|&pi| Product {
            id: items[pi].id.clone(),
            title: items[pi].title.clone(),
        })
        .collect();
    left_out_ids.extend(left_out.iter().map(|&pi| items[pi].id.clone()));
    let mut meta = meta.clone();
    if let Some(m) = meta.as_object_mut() {
        m.insert(
            index::LEFT_OUT_PRODUCTS.into(),
            serde_json::json!(left_out_ids),
        );
    }
    index::write_columns(
        out,
        &set,
        &trie,
        &postings,
        &products,
        &settings.delimiter,
        &meta,
    )?;
    // The index is safely written: the shards have served. Only shard files go (this build's
    // and those of earlier builds with more shards; the directory is the user's: it may hold
    // anything else), then the directory if that left it empty.
    for si in 0..items.len().div_ceil(shard_size) {
        let _ = std::fs::remove_file(shard_path(si));
    }
    if let Ok(entries) = std::fs::read_dir(&work) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let digits = name
                .strip_prefix("shard-")
                .and_then(|n| n.strip_suffix(".bin"));
            if digits.is_some_and(|d| d.len() >= 6 && d.bytes().all(|b| b.is_ascii_digit())) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // The lock last: a build waiting for this directory starts after the shards are gone.
    lock.release();
    let _ = std::fs::remove_dir(&work);
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Report {
        products: products.len(),
        codes: set.len(),
        postings: postings.products.len(),
        generated,
        reused_shards: reused,
        products_without_codes: without_codes.len(),
        without_codes_sample: without_codes
            .iter()
            .take(SAMPLE_IDS)
            .map(|&pi| items[pi].id.clone())
            .collect(),
        granularity: Granularity::of(&set.texts, &settings.delimiter),
        merged_codes: merged.len(),
        unused_codes,
        merged_sample: merged
            .iter()
            .take(SAMPLE_IDS)
            .map(|(a, b)| format!("{a:?} → {b:?}"))
            .collect(),
        skipped_products: unfit.len() + left_out.len(),
        skipped_sample: unfit
            .into_iter()
            .map(|(_, why)| why)
            .chain(left_out.iter().map(|&pi| items[pi].name()))
            .take(SAMPLE_IDS)
            .collect(),
        seconds,
        products_per_s: items.len() as f64 / seconds,
    })
}

/// Codes are generated as at most `limit` tokens, their EOS included, and hold none of the
/// model's other EOS tokens (`stops`).
fn check_codes(set: &CodeSet, limit: usize, stops: &[u32], name: CodeName) -> Result<()> {
    set.check_stops(stops, name)?;
    for i in 0..set.len() {
        if let Some(why) = too_long(set.code_tokens(i).len(), limit) {
            let text = &set.texts[i];
            return Err(Error::Input(format!(
                "{}: code {text:?} {why}",
                name(i, text)
            )));
        }
    }
    Ok(())
}

/// Why a code of `n` tokens (its EOS not counted) is too long to generate within `limit`
/// tokens, its EOS included (`Settings::code_token_limit`), if it is.
fn too_long(n: usize, limit: usize) -> Option<String> {
    (n >= limit).then(|| format!("is {n} tokens; codes may have at most {}", limit - 1))
}

/// What every shard's encoding needs.
struct Ctx<'a, B: Backend> {
    model: &'a Model<B>,
    tokenizer: &'a Tokenizer,
    settings: &'a Settings,
    generate: Option<&'a Generate>,
    /// The code list generation is constrained to, and its trie.
    list: Option<&'a (CodeSet, Trie)>,
    /// Every code known before generation (catalog and list), sorted.
    known: Option<&'a CodeSet>,
    eos: u32,
    on_error: OnError,
}

/// Head rows one teacher-forcing pass computes at most (each is a vocabulary of logits).
const TF_HEAD_ROWS: usize = 256;
/// Tokens one teacher-forcing pass runs at most, in model contexts (its KV arena's size).
const TF_CONTEXTS: usize = 4;

/// One shard: generated codes (with the beams' probabilities) and the catalog's codes (teacher
/// forced, many products per forward pass). Returns the shard's codes per product, which
/// products were left out (they do not fit the model; only under `OnError::Skip`), and how many
/// codes were generated.
fn encode_shard<B: Backend>(ctx: &Ctx<B>, items: &[Item]) -> Result<(Found, Vec<bool>, usize)> {
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .map(|item| {
            ctx.tokenizer
                .encode(&ctx.settings.product_prompt(&item.title))
        })
        .collect::<Result<_>>()?;
    let positions = ctx.model.max_positions();
    // Each product's room is checked before any pass: else a product too long for the model
    // failed a batch of beam searches as its slot ("query 5"), and no `--on-error skip` could
    // leave it out. Beam search needs the prompt plus every token it may add but the last
    // (which is returned, never run); teacher forcing the prompt plus each catalog code but
    // its last token.
    let beam_new = ctx.generate.map_or(0, |g| match ctx.list {
        Some((_, t)) => t.max_len() + 1,
        None => g.max_new_tokens,
    });
    let mut left_out = vec![false; items.len()];
    for (pi, item) in items.iter().enumerate() {
        let longest = item
            .codes
            .iter()
            .filter_map(|t| {
                let known = ctx.known?;
                let id = known.texts.binary_search(t).ok()?;
                Some(known.code_tokens(id).len())
            })
            .max()
            .unwrap_or(1);
        let need = beam_new.saturating_sub(1).max(longest.saturating_sub(1));
        let prompt = prompts[pi].len();
        if prompt > 0 && prompt + need <= positions {
            continue;
        }
        if ctx.on_error == OnError::Skip {
            left_out[pi] = true;
            continue;
        }
        if prompt == 0 {
            return Err(Error::Input(format!(
                "{}: its product prompt has no tokens (an empty title?) (--on-error skip \
                 leaves such products out)",
                item.name()
            )));
        }
        let codes = if need == 0 {
            String::from("already")
        } else {
            format!("with the {need} its codes need,")
        };
        return Err(Error::Input(format!(
            "{}: its prompt is {prompt} tokens, {codes} past the model's {positions} positions \
             (--on-error skip leaves such products out)",
            item.name()
        )));
    }
    let mut found: Found = vec![Vec::new(); items.len()];
    // Codes still needing teacher forcing: (product, text, tokens).
    let mut force: Vec<(usize, String, Vec<u32>)> = Vec::new();
    let mut generated = 0;
    if let Some(g) = ctx.generate {
        // Unconstrained beams need a trie only for its EOS: any one-code trie serves.
        let placeholder;
        let trie = match ctx.list {
            Some((_, trie)) => trie,
            None => {
                let one = CodeSet {
                    texts: vec![String::new()],
                    tokens: vec![u32::from(ctx.eos == 0)],
                    offsets: vec![0, 1],
                };
                placeholder = Trie::build(&one, ctx.model.config.vocab_size, ctx.eos)?;
                &placeholder
            }
        };
        let options = BeamOptions {
            beam: g.beam,
            max_new_tokens: match ctx.list {
                Some((_, t)) => t.max_len() + 1,
                None => g.max_new_tokens,
            },
            constrained: ctx.list.is_some(),
            ..Default::default()
        };
        let mut search = BeamSearch::new();
        let fit: Vec<usize> = (0..items.len()).filter(|&pi| !left_out[pi]).collect();
        for chunk in fit.chunks(g.batch) {
            let queries: Vec<Query> = chunk
                .iter()
                .map(|&pi| Query {
                    prompt: prompts[pi].clone(),
                    options,
                })
                .collect();
            for (&pi, out) in chunk.iter().zip(search.run(ctx.model, trie, &queries)?) {
                for c in out.codes {
                    let ended = c.token_logprobs.len() == c.tokens.len() + 1;
                    let p: f32 = c.token_logprobs.iter().sum::<f32>().exp();
                    if !ended || p < g.threshold {
                        continue;
                    }
                    let n = c.tokens.len();
                    let pt: Vec<f32> = c.token_logprobs[..n].iter().map(|l| l.exp()).collect();
                    let text = match (ctx.list, c.code) {
                        (Some((list, _)), Some(id)) => list.texts[id as usize].clone(),
                        (Some(_), None) => continue,
                        (None, _) => ctx.tokenizer.decode(&c.tokens)?.trim().to_string(),
                    };
                    // Two beams can decode to one text (e.g. different partial UTF-8 tails that
                    // both decode to U+FFFD): the first one only, whether kept or queued for
                    // teacher forcing (a posting list holds a product once). Products come in
                    // order, so this one's queued texts are the tail of `force`.
                    let seen = found[pi].iter().any(|(t, _)| *t == text)
                        || force
                            .iter()
                            .rev()
                            .take_while(|f| f.0 == pi)
                            .any(|f| f.1 == text);
                    if seen {
                        continue;
                    }
                    generated += 1;
                    if ctx.list.is_some() {
                        found[pi].push((text, pt));
                        continue;
                    }
                    // A decoded code is indexed by its own tokenization: the beams' numbers
                    // serve only when that is the generated sequence.
                    // (Its teacher forcing must fit the positions too: its own tokenization
                    // can be longer than the beam's.)
                    let tokens = ctx.tokenizer.encode_plain(&text)?;
                    let fits = !tokens.is_empty()
                        && tokens.len() < ctx.settings.code_token_limit()
                        && prompts[pi].len() + tokens.len() - 1 <= positions
                        && !tokens
                            .iter()
                            .any(|t| ctx.model.config.eos_token_ids.contains(t));
                    if !fits {
                        generated -= 1;
                    } else if tokens == c.tokens {
                        found[pi].push((text, pt));
                    } else {
                        force.push((pi, text, tokens));
                    }
                }
            }
        }
    }
    for (pi, item) in items.iter().enumerate() {
        if left_out[pi] {
            continue;
        }
        for text in &item.codes {
            let already = found[pi].iter().any(|(t, _)| t == text)
                || force.iter().any(|(p, t, _)| *p == pi && t == text);
            if already {
                continue;
            }
            let known = ctx.known.expect("catalog codes are known");
            let id = known
                .texts
                .binary_search(text)
                .expect("every catalog code is known");
            force.push((pi, text.clone(), known.code_tokens(id).to_vec()));
        }
    }
    // Teacher forcing, products packed into passes of up to TF_HEAD_ROWS head rows.
    force.sort_by_key(|f| f.0);
    for (pi, group) in force.chunk_by(|a, b| a.0 == b.0).scan(0, |at, g| {
        let r = *at..*at + g.len();
        *at = r.end;
        Some((g[0].0, r))
    }) {
        // Checked per product, so that the error names the product at fault, not the pass's.
        let prompt = prompts[pi].as_slice();
        let longest = force[group].iter().map(|f| f.2.len()).max().unwrap_or(1);
        if prompt.is_empty() || prompt.len() + longest - 1 > positions {
            return Err(Error::Input(format!(
                "{}: its prompt has {} tokens and its longest code {longest}, the model has \
                 {positions} positions",
                items[pi].name(),
                prompt.len()
            )));
        }
    }
    let mut arena = None;
    let lens: Vec<(usize, usize)> = force.iter().map(|f| (f.0, f.2.len())).collect();
    // Tokens a pass runs at most: its KV (the arena it sizes) stays within a few contexts.
    let max_tokens = TF_CONTEXTS * positions;
    for pass in tf_passes(&lens, TF_HEAD_ROWS, |p| prompts[p].len(), max_tokens) {
        let jobs: Vec<(&[u32], Vec<&[u32]>)> = pass
            .iter()
            .map(|r| {
                let codes = force[r.clone()].iter().map(|f| f.2.as_slice()).collect();
                (prompts[force[r.start].0].as_slice(), codes)
            })
            .collect();
        let (first, last) = (pass[0].start, pass[pass.len() - 1].end - 1);
        // Each product was checked above: an error of the pass is the pass's, named by the
        // products it held.
        let pts = teacher_force_many(ctx.model, &mut arena, &jobs).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!(
                "teacher forcing the codes of {} to {}: {m}",
                items[force[first].0].name(),
                items[force[last].0].name()
            )),
            e => e,
        })?;
        for (f, pt) in force[first..=last].iter().zip(pts.into_iter().flatten()) {
            found[f.0].push((f.1.clone(), pt));
        }
    }
    Ok((found, left_out, generated))
}

/// Progress of a build on stderr: a bar with rate and ETA on a terminal, a line every few
/// seconds otherwise (logs), nothing when off.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: usize,
    t0: Instant,
    last: Instant,
    on: bool,
}

impl Progress {
    fn new(total: usize, on: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (on && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "[index] {bar:40} {pos}/{len} products {per_sec} ETA {eta}",
                )
                .expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            done: 0,
            t0: now,
            last: now,
            on,
        }
    }

    fn advance(&mut self, n: usize) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        } else if self.on && (self.last.elapsed().as_secs_f64() >= 5.0 || self.done == self.total) {
            self.last = Instant::now();
            let rate = self.done as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
            crate::note!(
                "[index] {}/{} products, {rate:.1}/s, ETA {:.0} s",
                self.done,
                self.total,
                (self.total - self.done) as f64 / rate.max(1e-9)
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
