//! The whole GRAM path for a query: text → prompt tokens → codes (trie-constrained beam search
//! over the index's codes) → postings → S_rele scores → the top K products.
//!
//! [`Engine`] holds what a search needs (the index, the model that built it, its tokenizer and
//! `gram.json`), checked against each other when it opens. A search is two calls:
//! [`Engine::prepare`] validates a [`Request`] and tokenizes it (cheap, on any thread: bad input
//! stops here), and a [`Batch`] runs prepared requests through shared decoder steps — all at once
//! ([`Engine::search`]) or admitted continuously as a server receives them ([`Batch::admit`],
//! [`Batch::step`]). Results carry per-stage timings.
//!
//! [`Engine`] is generic over the [`Backend`] its model runs on (the CPU by default; the
//! tokenizer, postings and scores stay on the CPU whatever it is). [`AnyEngine`] is the engine
//! of a backend chosen at run time (`--device cpu|cuda|auto`): it opens with a [`Device`] and
//! hands out the typed engine to run batches on.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu::simd::Isa;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend};
use crate::backend::{Backend, Device};
use crate::beam::{self, Batcher, BeamOptions, BeamSearch, Ticket};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::model::{LoadOptions, Model};
use crate::score::{self, Aggregate};
use crate::settings::Settings;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;

/// Bounds on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest query text, in bytes.
    pub max_query_bytes: usize,
    /// Most tokens the query text may take (the template's own tokens not counted).
    pub max_query_tokens: usize,
    /// Most products a request may ask for.
    pub max_k: usize,
    /// Widest beam a request may ask for.
    pub max_beam: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query_bytes: 1024,
            max_query_tokens: 64,
            max_k: 10_000,
            max_beam: 64,
        }
    }
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub query: String,
    /// Products to return (1..=`Limits::max_k`).
    pub k: usize,
    /// Beam width: codes generated at most (1..=`Limits::max_beam`).
    pub beam: usize,
    /// Stop after the codes (no postings, no scores).
    pub codes_only: bool,
}

impl Request {
    pub fn new(query: impl Into<String>) -> Request {
        Request {
            query: query.into(),
            k: 300,
            beam: 10,
            codes_only: false,
        }
    }
}

/// A validated, tokenized request, ready for a [`Batch`].
#[derive(Debug, Clone)]
pub struct Prepared {
    request: Request,
    query: beam::Query,
    tokenize_ms: f64,
}

impl Prepared {
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Prompt tokens to prefill (the template filled with the query).
    pub fn prompt_tokens(&self) -> usize {
        self.query.prompt.len()
    }
}

/// A generated code on the query side.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CodeHit {
    pub code: String,
    /// `sum(token_logprobs) / len ^ length_penalty`.
    pub score: f32,
    /// Log-probability of each code token, then of the EOS that ends it.
    pub token_logprobs: Vec<f32>,
}

/// A retrieved product.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProductHit {
    pub id: String,
    pub title: String,
    pub score: f32,
    /// The query's codes that reached it (each text shared by every product it reached).
    pub codes: Vec<std::sync::Arc<str>>,
}

/// Wall time of each stage, in milliseconds. Prefill and decode are the steps the request took
/// part in, shared with the requests batched with it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Timings {
    pub tokenize: f64,
    pub prefill: f64,
    pub decode: f64,
    pub postings: f64,
    pub scoring: f64,
}

/// What a search returns.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Response {
    pub query: String,
    pub codes: Vec<CodeHit>,
    pub products: Vec<ProductHit>,
    pub timings_ms: Timings,
    /// Decoder steps the request took part in.
    pub steps: usize,
}

/// An index with the model that built it, ready to search, the model on backend `B`.
pub struct Engine<B: Backend = CpuBackend> {
    index: Index,
    model: Model<B>,
    tokenizer: Tokenizer,
    settings: Settings,
    aggregate: Aggregate,
    isa: Isa,
    limits: Limits,
    model_dir: PathBuf,
    /// Score accumulators (8 bytes per product each), one taken per request being scored.
    rankers: std::sync::Mutex<Vec<score::Ranker>>,
}

/// How far ahead of building an answer's products their records and texts are prefetched
/// (the records first, so that reading one to prefetch its text finds it in cache).
const RECORDS_AHEAD: usize = 16;
const TEXT_AHEAD: usize = 8;

/// The index file of an index directory.
pub fn index_file(dir: &Path) -> PathBuf {
    dir.join("index.gram")
}

/// The index file of `dir` when there is one; else an error that says what `dir` is instead:
/// the index file itself (its directory is wanted), a build that did not finish, a model
/// directory, or another directory.
pub fn existing_index_file(dir: &Path) -> Result<PathBuf> {
    let file = index_file(dir);
    if file.exists() || !dir.exists() {
        // A missing directory: the open names it.
        return Ok(file);
    }
    let shown = dir.display();
    let why = if dir.is_file() {
        format!(
            "{shown} is a file: pass the index's directory (the one `gram index build --out` made)"
        )
    } else if file.with_extension("shards").is_dir() {
        format!(
            "{shown} holds a build that did not finish (index.shards, no index.gram): run the \
             same `gram index build --out {shown}` again to resume it"
        )
    } else if dir.join("config.json").is_file() {
        format!(
            "{shown} is a model directory, not an index: `gram index build --model {shown} \
             --catalog FILE --out DIR` makes one"
        )
    } else {
        format!(
            "{shown} is not an index (no index.gram): `gram index build --out {shown}` makes one"
        )
    };
    Err(Error::Input(why))
}

/// Bytes of each weight file that the fingerprint reads: its head (the tensor table) and
/// blocks spread evenly over the rest.
const FINGERPRINT_HEAD: u64 = 1 << 16;
const FINGERPRINT_BLOCKS: u64 = 64;
const FINGERPRINT_BLOCK: u64 = 4096;

/// What identifies a model to its indexes: a checksum of its config and tokenizer, and of each
/// weight file's name, size, head (its tensor table) and 64 blocks of 4 KiB spread over it —
/// so a model retrained in the same shape is another model, at the cost of a few reads, not
/// of hashing gigabytes (not its directory: a copied model, or a directory of links to its
/// files, still serves).
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    // Capped and regular, as the loaders read them: this runs before any model is loaded.
    for (f, cap) in [
        ("config.json", crate::container::JSON_CAP),
        ("tokenizer.json", crate::container::TOKENIZER_CAP),
    ] {
        let p = dir.join(f);
        bytes.extend(
            crate::container::read_capped(&p, cap)
                .map_err(|e| Error::io(&p, e))?
                .into_bytes(),
        );
    }
    let mut weights: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let weight = name.ends_with(".safetensors") || name.ends_with(".gguf");
            // The file's own size, through a symbolic link too (a model directory of links
            // to the weights is the same model).
            let meta = std::fs::metadata(e.path()).ok()?;
            Some((name, meta.len())).filter(|_| weight && meta.is_file())
        })
        .collect();
    weights.sort();
    for (name, len) in weights {
        bytes.extend(name.as_bytes());
        bytes.extend(len.to_le_bytes());
        let p = dir.join(&name);
        sample_file(&p, len, &mut bytes).map_err(|e| Error::io(&p, e))?;
    }
    Ok(format!("{:016x}", crate::container::checksum(&bytes)))
}

/// Appends to `out` the head of the file at `path` (`len` bytes long) and blocks spread evenly
/// over the rest (all of it when it is small).
fn sample_file(path: &Path, len: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut read_at = |at: u64, n: u64, out: &mut Vec<u8>| -> std::io::Result<()> {
        f.seek(SeekFrom::Start(at))?;
        let start = out.len();
        (&mut f).take(n).read_to_end(out)?;
        if ((out.len() - start) as u64) < n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "changed while being read",
            ));
        }
        Ok(())
    };
    let head = len.min(FINGERPRINT_HEAD);
    read_at(0, head, out)?;
    let rest = len - head;
    if rest <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK {
        return read_at(head, rest, out);
    }
    let stride = (rest - FINGERPRINT_BLOCK) / (FINGERPRINT_BLOCKS - 1);
    for i in 0..FINGERPRINT_BLOCKS {
        read_at(head + i * stride, FINGERPRINT_BLOCK, out)?;
    }
    Ok(())
}

/// The GRAM settings an index was built with (those that change what it stores).
pub fn build_settings(s: &Settings) -> serde_json::Value {
    serde_json::json!({"product_template": s.product_template, "delimiter": s.delimiter})
}

/// What an engine holds besides its model, checked against each other: the index, the model
/// directory that built it, its settings and tokenizer.
struct Parts {
    index: Index,
    model_dir: PathBuf,
    settings: Settings,
    aggregate: Aggregate,
    tokenizer: Tokenizer,
}

impl Parts {
    /// Opens the index in `index_dir` and checks the model (`model_dir`, or the one the index
    /// names) and its `gram.json` against it; the weights are not loaded yet.
    fn open(index_dir: &Path, model_dir: Option<&Path>) -> Result<Parts> {
        let index = Index::open(&existing_index_file(index_dir)?)?;
        // Opening checks the structure only; a flipped payload byte (a posting, a
        // probability, a title) would answer wrong without a word. Reading the whole file
        // once (XXH3: several GB/s) catches it before the first query; the pages are wanted anyway.
        index.verify()?;
        // And every product and code record readable: one that is not would drop out of an
        // answer.
        index.check_products()?;
        index.check_codes()?;
        let meta = index.meta();
        let built_by = &meta["model"];
        let bad = |msg: String| Error::Index {
            path: index_file(index_dir),
            msg,
        };
        // A query generates a code's tokens and its EOS: a longer code could never be reached
        // (`gram index build` refuses such codes; a foreign index may hold them).
        let longest = index.trie().max_len();
        if longest >= crate::beam::MAX_NEW_TOKENS {
            return Err(bad(format!(
                "its longest code has {longest} tokens; beam search generates at most {} (the \
                 EOS included)",
                crate::beam::MAX_NEW_TOKENS
            )));
        }
        let model_dir = match model_dir {
            Some(d) => d.to_path_buf(),
            None => {
                let named = PathBuf::from(
                    built_by["dir"]
                        .as_str()
                        .ok_or_else(|| bad("the index names no model".into()))?,
                );
                if !named.join("config.json").exists() {
                    return Err(bad(format!(
                        "it was built by the model in {}, which is not there any more (moved \
                         or deleted?): pass its directory with --model",
                        named.display()
                    )));
                }
                named
            }
        };
        let fingerprint = model_fingerprint(&model_dir)?;
        if built_by["fingerprint"].as_str() != Some(fingerprint.as_str()) {
            return Err(bad(format!(
                "built by model {built_by}; {} has fingerprint {fingerprint} (another model, \
                 or its files changed since): rebuild it with this model",
                model_dir.display()
            )));
        }
        let settings = Settings::load(&model_dir)?;
        if meta["settings"] != build_settings(&settings) {
            return Err(bad(format!(
                "built with settings {}, the model's gram.json now says {}: rebuild it",
                meta["settings"],
                build_settings(&settings)
            )));
        }
        // Beam search stops at gram.json's limit: if the index holds longer codes, their
        // prefixes, cut there, would take the places of codes that did finish (HF's rule
        // finishes every candidate at the limit) and then be dropped, so answers would
        // silently shrink.
        if longest + 1 > settings.code_token_limit() {
            return Err(bad(format!(
                "its longest code has {longest} tokens and its EOS; the model's gram.json allows \
                 {} (max_code_tokens): rebuild it, or raise the limit",
                settings.code_token_limit()
            )));
        }
        let aggregate = settings.aggregate().ok_or_else(|| Error::Config {
            path: model_dir.join("gram.json"),
            msg: "aggregation must be sum or max".into(),
        })?;
        let tokenizer = Tokenizer::from_file(&model_dir.join("tokenizer.json"))?;
        Ok(Parts {
            index,
            model_dir,
            settings,
            aggregate,
            tokenizer,
        })
    }

    fn with_model<B: Backend>(self, model: Model<B>) -> Result<Engine<B>> {
        self.tokenizer.check_fits(model.config.vocab_size)?;
        // A query template so long that not even a one-token query leaves room for the
        // index's longest code: every query would be refused, each blamed on the query.
        let shortest = self
            .tokenizer
            .encode(&self.settings.query_prompt("a"))?
            .len();
        // The longest code a query may generate: the index's (within gram.json's limit).
        let longest_code = self.index.trie().max_len();
        if shortest + longest_code > model.max_positions() {
            return Err(Error::Config {
                path: self.model_dir.join("gram.json"),
                msg: format!(
                    "query_template takes {shortest} tokens with a one-token query; with the \
                     index's longest code ({longest_code} tokens) no query fits the model's {} \
                     positions",
                    model.max_positions()
                ),
            });
        }
        // An index built for a model with one EOS, opened with a model that has more: a code
        // holding one of the others could never be emitted whole (a beam stops there).
        let stops = &model.config.eos_token_ids;
        let trie = self.index.trie();
        if let Some(t) = trie
            .csr()
            .1
            .iter()
            .find(|&&t| t != trie.eos() && stops.contains(&t))
        {
            return Err(Error::Input(format!(
                "the index's codes hold token {t}, an EOS of the model ({stops:?}): a beam \
                 would stop inside them; rebuild the index with this model"
            )));
        }
        Ok(Engine {
            index: self.index,
            model,
            tokenizer: self.tokenizer,
            settings: self.settings,
            aggregate: self.aggregate,
            isa: Isa::detect(),
            limits: Limits::default(),
            model_dir: self.model_dir,
            rankers: Default::default(),
        })
    }
}

impl Engine<CpuBackend> {
    /// Opens the index in `index_dir` and the model that built it (`model_dir`, or the one the
    /// index names) on the CPU. A model with another fingerprint, or a `gram.json` whose build
    /// settings changed since, is refused.
    pub fn open(index_dir: &Path, model_dir: Option<&Path>, load: &LoadOptions) -> Result<Engine> {
        Engine::open_on(CpuBackend::default(), index_dir, model_dir, load)
    }
}

impl<B: Backend> Engine<B> {
    /// [`Engine::open`] with the model loaded onto `backend` (the CUDA backend keeps bf16
    /// weights: load it with `dtype: Some(DType::BF16), threads: Some(1)`).
    pub fn open_on(
        backend: B,
        index_dir: &Path,
        model_dir: Option<&Path>,
        load: &LoadOptions,
    ) -> Result<Engine<B>> {
        let parts = Parts::open(index_dir, model_dir)?;
        let model = Model::load_on(backend, &parts.model_dir, load)?;
        parts.with_model(model)
    }

    pub fn with_limits(mut self, limits: Limits) -> Engine<B> {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Validates `request` and tokenizes its prompt. Every error is the caller's (an
    /// [`Error::Input`] naming the field), except a tokenizer failure.
    pub fn prepare(&self, request: Request) -> Result<Prepared> {
        let t = Instant::now();
        let l = &self.limits;
        let query = request.query.trim();
        if query.is_empty() {
            return Err(Error::Input("query: empty".into()));
        }
        // The query searched is the trimmed one: whitespace around it counts against no limit
        // (the request body's own limit bounds it).
        if query.len() > l.max_query_bytes {
            return Err(Error::Input(format!(
                "query: {} bytes, at most {} allowed",
                query.len(),
                l.max_query_bytes
            )));
        }
        if request.k == 0 || request.k > l.max_k {
            return Err(Error::Input(format!(
                "k: {} is out of range (1..={})",
                request.k, l.max_k
            )));
        }
        if request.beam == 0 || request.beam > l.max_beam {
            return Err(Error::Input(format!(
                "beam: {} is out of range (1..={})",
                request.beam, l.max_beam
            )));
        }
        let own = self.tokenizer.encode_plain(query)?.len();
        if own > l.max_query_tokens {
            return Err(Error::Input(format!(
                "query: {own} tokens, at most {} allowed",
                l.max_query_tokens
            )));
        }
        let prompt = self.tokenizer.encode(&self.settings.query_prompt(query))?;
        let options = BeamOptions {
            beam: request.beam,
            // The index's longest code and its EOS (within gram.json's `max_code_tokens`:
            // checked at open).
            max_new_tokens: self.index.trie().max_len() + 1,
            ..Default::default()
        };
        let query = beam::Query { prompt, options };
        // The last token of a code (its EOS) is never run: it takes no position.
        let need = query.prompt.len() + options.max_new_tokens - 1;
        if need > self.model.max_positions() {
            return Err(Error::Input(format!(
                "query: its prompt of {} tokens and codes of up to {} exceed the model's {} positions",
                query.prompt.len(),
                options.max_new_tokens,
                self.model.max_positions()
            )));
        }
        Ok(Prepared {
            request,
            query,
            tokenize_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// A continuous batch over `search`'s arena with room for `entries` KV entries (see
    /// [`Engine::entries_for`]).
    pub fn batch<'a>(
        &'a self,
        search: &'a mut BeamSearch<B>,
        entries: usize,
    ) -> Result<Batch<'a, B>> {
        Ok(Batch {
            engine: self,
            beams: Batcher::new(search, &self.model, self.index.trie(), entries)?,
            prepared: Vec::new(),
        })
    }

    /// Arena entries a prepared request holds while its codes are generated.
    pub fn entries_for(&self, p: &Prepared) -> usize {
        crate::beam::arena_entries(&p.query, self.index.trie())
    }

    /// Searches all `requests` together (shared decoder steps) and returns one response each,
    /// in order; a request that failed (a numeric error of its own rows) fails the call, after
    /// the others ran to their end.
    pub fn search(
        &self,
        search: &mut BeamSearch<B>,
        requests: Vec<Prepared>,
    ) -> Result<Vec<Response>> {
        self.search_each(search, requests)?.into_iter().collect()
    }

    /// [`Engine::search`] with each request's own outcome: the outer error is the batch's (it
    /// could not be made, or a step failed as a whole), an inner one a request's alone.
    pub fn search_each(
        &self,
        search: &mut BeamSearch<B>,
        requests: Vec<Prepared>,
    ) -> Result<Vec<Result<Response>>> {
        let entries = requests.iter().map(|p| self.entries_for(p)).sum();
        let mut batch = self.batch(search, entries)?;
        let mut tickets = Vec::with_capacity(requests.len());
        for p in requests {
            match batch.admit(p) {
                Admission::Admitted(t) => tickets.push(t),
                Admission::Refused(e) => return Err(e),
                Admission::Wait(_) => {
                    return Err(Error::Internal(
                        "a request waited for room in a batch sized for all of them".into(),
                    ))
                }
            }
        }
        let mut done = self.model.install(|| -> Result<Vec<_>> {
            let mut done = Vec::with_capacity(tickets.len());
            while batch.in_flight() > 0 {
                done.extend(batch.step()?);
            }
            Ok(done)
        })?;
        done.sort_by_key(|(t, _)| *t);
        Ok(done.into_iter().map(|(_, r)| r).collect())
    }

    /// Postings, scores and top K of a request whose codes are done ([`Batch::step_codes`]). It
    /// needs only the index, so it may run on any thread, beside the next decoder steps.
    pub fn score(&self, done: CodesDone) -> Response {
        self.finish(done.prepared, done.output)
    }

    /// Postings, scores and top K for a request whose codes came out as `out`.
    fn finish(&self, p: Prepared, out: beam::Output) -> Response {
        let index = &self.index;
        let t = Instant::now();
        let codes: Vec<CodeHit> = out
            .codes
            .iter()
            .filter_map(|c| {
                Some(CodeHit {
                    code: index.code_text(c.code?)?.into_owned(),
                    score: c.score,
                    token_logprobs: c.token_logprobs.clone(),
                })
            })
            .collect();
        let mut timings = Timings {
            tokenize: p.tokenize_ms,
            prefill: out.prefill_s * 1e3,
            decode: out.decode_s * 1e3,
            ..Timings::default()
        };
        let mut products = Vec::new();
        if !p.request.codes_only {
            // Query side: each code token's probability (the EOS is not a code token), and the
            // code's prior: its query-side log-probability (its tokens and the EOS) and its
            // specificity (its number of products), +0.0 without `code_logprob` and
            // `code_size` weights in gram.json.
            // (code, Pq of its tokens, their weights, its log-probabilities with the EOS)
            type Side<'c> = (u32, Vec<f32>, Vec<f32>, &'c [f32]);
            let sides: Vec<Side> = out
                .codes
                .iter()
                .filter_map(|c| {
                    let id = c.code?;
                    let n = c.tokens.len();
                    let pq = c.token_logprobs[..n].iter().map(|l| l.exp()).collect();
                    let g = index.code(id)?.granularity as usize;
                    Some((
                        id,
                        pq,
                        vec![self.settings.weight(g); n],
                        &c.token_logprobs[..],
                    ))
                })
                .collect();
            let (lists, list_codes): (Vec<_>, Vec<u32>) = sides
                .iter()
                .filter_map(|(id, pq, w, logprobs)| {
                    let list = index.postings(*id, pq, w)?;
                    let prior = self.settings.prior(logprobs, list.products.len());
                    Some((score::Postings { prior, ..list }, *id))
                })
                .unzip();
            timings.postings = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let n = index.num_products() as u32;
            let pool = || self.rankers.lock().unwrap_or_else(|e| e.into_inner());
            let mut ranker = pool().pop().unwrap_or_default();
            let hits = ranker.rank(self.isa, &lists, self.aggregate, p.request.k, n);
            pool().push(ranker);
            // Each product's record, then its text, a few products ahead of reading them.
            let ahead = |j: usize| hits.get(j).map(|h| h.product);
            let texts: Vec<std::sync::Arc<str>> = list_codes
                .iter()
                .map(|&code| index.code_text(code).unwrap_or_default().into())
                .collect();
            for i in (0..RECORDS_AHEAD).filter_map(ahead) {
                index.prefetch_product_record(i);
            }
            for i in (0..TEXT_AHEAD).filter_map(ahead) {
                index.prefetch_product_text(i);
            }
            products = hits
                .iter()
                .enumerate()
                .filter_map(|(j, h)| {
                    if let Some(i) = ahead(j + RECORDS_AHEAD) {
                        index.prefetch_product_record(i);
                    }
                    if let Some(i) = ahead(j + TEXT_AHEAD) {
                        index.prefetch_product_text(i);
                    }
                    let (id, title) = index.product(h.product)?;
                    let matched = h
                        .codes
                        .iter()
                        .filter_map(|&c| texts.get(c as usize).cloned())
                        .collect();
                    Some(ProductHit {
                        id: id.into_owned(),
                        title: title.into_owned(),
                        score: h.score,
                        codes: matched,
                    })
                })
                .collect();
            timings.scoring = t.elapsed().as_secs_f64() * 1e3;
        }
        Response {
            query: p.request.query,
            codes,
            products,
            timings_ms: timings,
            steps: out.steps,
        }
    }
}

/// Requests in flight through shared decoder steps (see [`beam::Batcher`]).
pub struct Batch<'a, B: Backend = CpuBackend> {
    engine: &'a Engine<B>,
    beams: Batcher<'a, B>,
    /// The requests in flight, by ticket.
    prepared: Vec<(Ticket, Prepared)>,
}

/// A request whose codes are done and whose products are not scored yet
/// ([`Batch::step_codes`], then [`Engine::score`]).
#[derive(Debug)]
pub struct CodesDone {
    prepared: Prepared,
    output: beam::Output,
}

impl CodesDone {
    /// The request it answers.
    pub fn request(&self) -> &Request {
        self.prepared.request()
    }
}

/// What [`Batch::admit`] did with a request.
#[derive(Debug)]
pub enum Admission {
    /// It runs from the next step on.
    Admitted(Ticket),
    /// Its KV does not fit until requests in flight finish: handed back to try again.
    Wait(Prepared),
    /// It can never run in this batch.
    Refused(Error),
}

impl<B: Backend> Batch<'_, B> {
    /// Admits a prepared request to the next step.
    pub fn admit(&mut self, p: Prepared) -> Admission {
        match self.beams.admit(p.query.clone()) {
            Ok(Some(t)) => {
                self.prepared.push((t, p));
                Admission::Admitted(t)
            }
            Ok(None) => Admission::Wait(p),
            Err(e) => Admission::Refused(e),
        }
    }

    /// Requests admitted and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.beams.in_flight()
    }

    /// Arena entries free now.
    pub fn free_entries(&self) -> usize {
        self.beams.free_entries()
    }

    /// Decoder rows the last step ran.
    pub fn last_step_rows(&self) -> usize {
        self.beams.last_step_rows()
    }

    /// Drops an admitted request whose caller has gone: no further steps, its KV entries free
    /// at once. `false` when it is not in flight.
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        self.prepared.retain(|(t, _)| *t != ticket);
        self.beams.cancel(ticket)
    }

    /// One decoder step over every request in flight; the requests whose codes finished come
    /// back with their products scored, or with the error that stopped them alone (a
    /// log-probability of their rows that is not finite). On an error of the step every request
    /// in flight is dropped.
    pub fn step(&mut self) -> Result<Vec<(Ticket, Result<Response>)>> {
        let engine = self.engine;
        Ok(self
            .step_codes()?
            .into_iter()
            .map(|(t, done)| (t, done.map(|d| engine.score(d))))
            .collect())
    }

    /// [`Batch::step`] without the scoring: the requests whose codes finished come back as
    /// [`CodesDone`], for [`Engine::score`] to finish (on another thread, say, while the batch
    /// steps on).
    pub fn step_codes(&mut self) -> Result<Vec<(Ticket, Result<CodesDone>)>> {
        let done = match self.beams.step() {
            Ok(done) => done,
            Err(e) => {
                self.prepared.clear();
                return Err(e);
            }
        };
        Ok(done
            .into_iter()
            .map(|(t, out)| {
                let at = self
                    .prepared
                    .iter()
                    .position(|(pt, _)| *pt == t)
                    .expect("every ticket was admitted here");
                let (_, prepared) = self.prepared.swap_remove(at);
                (t, out.map(|output| CodesDone { prepared, output }))
            })
            .collect())
    }
}

/// The backend a command or server runs on, as it reports it (CLI stderr, `/health`,
/// `gram_backend_info`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendInfo {
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// The GPU's name (CUDA only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Why `--device auto` chose the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

impl std::fmt::Display for BackendInfo {
    /// `cpu`, `cpu (auto: <why>)` or `cuda on <GPU name>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.backend)?;
        if let Some(d) = &self.device {
            write!(f, " on {d}")?;
        }
        if let Some(why) = &self.fallback {
            write!(f, " (auto: {why})")?;
        }
        Ok(())
    }
}

/// The backend `device` asks for, for the model in `model_dir`: `Some(gpu)` for CUDA, `None`
/// for the CPU, with what to report. `cuda` is an [`Error::Device`] where no GPU can run the
/// model (no driver or GPU, a library missing, a head dim the kernels are not built for);
/// `auto` takes the CPU then, and says why.
pub fn open_backend(
    device: Device,
    model_dir: &Path,
) -> Result<(Option<CudaBackend>, BackendInfo)> {
    let cpu = |fallback: Option<String>| BackendInfo {
        backend: "cpu",
        device: None,
        fallback,
    };
    if device == Device::Cpu {
        tracing::info!("backend: cpu (--device cpu)");
        return Ok((None, cpu(None)));
    }
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    // Cheap checks first (a GPU at all, then the model's shape), before the kernels compile.
    let opened = cuda::probe().and_then(|_| {
        if cuda::HEAD_DIMS.contains(&config.head_dim) {
            CudaBackend::new(0, false).map(Some)
        } else {
            Err(Error::Device(format!(
                "the model's head dim {} is not one the CUDA kernels are built for ({:?})",
                config.head_dim,
                cuda::HEAD_DIMS
            )))
        }
    });
    match opened {
        Ok(Some(gpu)) => {
            let info = BackendInfo {
                backend: "cuda",
                device: Some(gpu.device_name().to_string()),
                fallback: None,
            };
            Ok((Some(gpu), info))
        }
        Ok(None) => Ok((None, cpu(None))),
        Err(e) if device == Device::Auto => {
            let why = match e {
                Error::Device(why) => why,
                e => e.to_string(),
            };
            tracing::info!("backend: cpu (--device auto: {why})");
            Ok((None, cpu(Some(why))))
        }
        Err(e) => Err(e),
    }
}

/// How a model loads on the backend [`open_backend`] chose: the CPU as `cpu` says, the GPU
/// with bf16 weights and one host thread (the GPU does the work).
pub fn load_options(gpu: bool, cpu: &LoadOptions) -> LoadOptions {
    if gpu {
        LoadOptions {
            dtype: Some(DType::BF16),
            threads: Some(1),
        }
    } else {
        cpu.clone()
    }
}

/// A model on the backend chosen at run time ([`load_model`]).
// One per process, loaded once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnyModel {
    Cpu(Model<CpuBackend>),
    Cuda(Model<CudaBackend>),
}

/// The model in `dir` on the backend [`open_backend`] chose (`gpu`, `info`), loaded as
/// [`load_options`] says. Under `--device auto` a GPU that opened but could not take the model
/// (its memory, most often) is given up for the CPU, with why in the returned info's
/// `fallback`, as when no GPU opens; under `--device cuda` that is the error.
pub fn load_model(
    device: Device,
    gpu: Option<CudaBackend>,
    info: BackendInfo,
    dir: &Path,
    cpu: &LoadOptions,
) -> Result<(AnyModel, BackendInfo)> {
    let mut info = info;
    if let Some(gpu) = gpu {
        match Model::load_on(gpu, dir, &load_options(true, cpu)) {
            Ok(m) => return Ok((AnyModel::Cuda(m), info)),
            Err(Error::Device(why)) if device == Device::Auto => {
                let why = format!("the model did not load on the GPU: {why}");
                tracing::info!("backend: cpu (--device auto: {why})");
                info = BackendInfo {
                    backend: "cpu",
                    device: None,
                    fallback: Some(why),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Ok((
        AnyModel::Cpu(Model::load(dir, &load_options(false, cpu))?),
        info,
    ))
}

/// An [`Engine`] on the backend chosen at run time. Requests are prepared on it directly;
/// batches run on the typed engine (match on it: the search code is generic).
// One per process, opened once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Engine<CudaBackend>),
}

impl AnyEngine {
    /// [`Engine::open`] on the backend `device` picks (see [`open_backend`]). `load` is the
    /// CPU's; on the GPU the model loads as [`load_options`] says. The index and model are
    /// checked before the device is opened.
    pub fn open(
        device: Device,
        index_dir: &Path,
        model_dir: Option<&Path>,
        load: &LoadOptions,
    ) -> Result<(AnyEngine, BackendInfo)> {
        let parts = Parts::open(index_dir, model_dir)?;
        let (gpu, info) = open_backend(device, &parts.model_dir)?;
        let dir = parts.model_dir.clone();
        let (model, info) = load_model(device, gpu, info, &dir, load)?;
        let engine = match model {
            AnyModel::Cuda(m) => AnyEngine::Cuda(parts.with_model(m)?),
            AnyModel::Cpu(m) => AnyEngine::Cpu(parts.with_model(m)?),
        };
        Ok((engine, info))
    }

    pub fn with_limits(self, limits: Limits) -> AnyEngine {
        match self {
            AnyEngine::Cpu(e) => AnyEngine::Cpu(e.with_limits(limits)),
            AnyEngine::Cuda(e) => AnyEngine::Cuda(e.with_limits(limits)),
        }
    }

    /// See [`Engine::prepare`].
    pub fn prepare(&self, request: Request) -> Result<Prepared> {
        match self {
            AnyEngine::Cpu(e) => e.prepare(request),
            AnyEngine::Cuda(e) => e.prepare(request),
        }
    }

    pub fn limits(&self) -> &Limits {
        match self {
            AnyEngine::Cpu(e) => e.limits(),
            AnyEngine::Cuda(e) => e.limits(),
        }
    }

    pub fn index(&self) -> &Index {
        match self {
            AnyEngine::Cpu(e) => e.index(),
            AnyEngine::Cuda(e) => e.index(),
        }
    }

    pub fn model_dir(&self) -> &Path {
        match self {
            AnyEngine::Cpu(e) => e.model_dir(),
            AnyEngine::Cuda(e) => e.model_dir(),
        }
    }

    pub fn settings(&self) -> &Settings {
        match self {
            AnyEngine::Cpu(e) => e.settings(),
            AnyEngine::Cuda(e) => e.settings(),
        }
    }

    /// The model's config (the same on every backend).
    pub fn config(&self) -> &ModelConfig {
        match self {
            AnyEngine::Cpu(e) => &e.model().config,
            AnyEngine::Cuda(e) => &e.model().config,
        }
    }
}

impl From<Engine<CpuBackend>> for AnyEngine {
    fn from(e: Engine<CpuBackend>) -> AnyEngine {
        AnyEngine::Cpu(e)
    }
}

impl From<Engine<CudaBackend>> for AnyEngine {
    fn from(e: Engine<CudaBackend>) -> AnyEngine {
        AnyEngine::Cuda(e)
    }
}
