//! `Model`: a decoder checkpoint loaded onto a backend, plus its KV [`Cache`].
//!
//! A model directory holds HF `config.json`, `tokenizer.json` and the weights (`checkpoint.rs`:
//! safetensors, sharded safetensors or GGUF). Llama, Qwen2 and Qwen3 are one architecture with
//! flags (`ModelConfig`): the forward pass (`forward.rs`) reads top to bottom for all three.

pub mod checkpoint;
mod forward;
pub mod gguf;
pub mod rope;
pub mod weights;

use std::path::{Path, PathBuf};

use self::checkpoint::Source;
use self::rope::RopeTable;
use self::weights::Weights;
use crate::backend::cpu::team::Team;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, KvRows, RowKv};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Longest context a rotary table is built for (positions past it are refused).
const MAX_ROPE_POSITIONS: usize = 1 << 15;

static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Convert every weight matrix to this dtype at load. `None` keeps the stored dtype (read
    /// in place from the mapped file; a GGUF's Q4_1 and Q8_0 matrices stay blocks that the
    /// matmul dequantizes in registers, its Q4_0 ones are widened to f32 at load).
    pub dtype: Option<DType>,
    /// Worker threads of the model's pool (default: one per core).
    pub threads: Option<usize>,
}

/// A loaded decoder.
pub struct Model<B: Backend = CpuBackend> {
    pub config: ModelConfig,
    pub backend: B,
    pub dir: PathBuf,
    pub source: Source,
    weights: Weights<B::Weight>,
    rope: RopeTable,
    /// The model's own workers. A forward pass runs inside it, so its ~100 parallel regions fork
    /// from a worker thread (cheap) instead of each waking the pool from outside (two cross-thread
    /// wake-ups per region).
    pool: rayon::ThreadPool,
    /// The forward pass's parallel regions: the pool thread that runs a pass and `threads - 1`
    /// workers that spin between regions (`backend::cpu::team`).
    team: Team,
    /// Unique in the process: tells caches built for one model from another's.
    id: u64,
}

impl Model<CpuBackend> {
    /// Loads `dir` on the CPU backend.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        Model::load_on(CpuBackend::default(), dir, options)
    }
}

impl<B: Backend> Model<B> {
    /// Loads `dir` (config.json + weights) onto `backend`.
    pub fn load_on(backend: B, dir: &Path, options: &LoadOptions) -> Result<Self> {
        // 0 asks rayon for one thread per core, so it is only reachable as `None`.
        let threads = options.threads.unwrap_or(0);
        if options.threads == Some(0) || threads > 1024 {
            return Err(Error::Input(format!(
                "{threads} threads is out of range (1..=1024)"
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("gram-{i}"))
            .build()
            .map_err(|e| Error::Input(format!("cannot start {threads} worker threads: {e}")))?;
        let team = Team::new(pool.current_num_threads(), "gram-team")
            .map_err(|e| Error::Input(format!("cannot start {threads} worker threads: {e}")))?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?
            .with_generation_config(&dir.join("generation_config.json"))?;
        let source = Source::find(dir)?;
        let tensors = source.load(&config)?;
        let weights = weights::load(&backend, &config, tensors, options.dtype)?;
        let rope = RopeTable::new(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings.min(MAX_ROPE_POSITIONS),
        );
        Ok(Model {
            config,
            backend,
            dir: dir.to_path_buf(),
            source,
            weights,
            rope,
            pool,
            team,
            id: NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// A number no other model loaded in this process has (KV computed for one model must not
    /// be reused with another, even one loaded at the same address).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Worker threads a forward pass uses.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The longest sequence this model accepts.
    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// A KV arena of `entries` token entries (see [`RowKv`]); beam search lays out its prompts
    /// and beams in one.
    pub fn new_arena(&self, entries: usize) -> Result<KvArena<B>> {
        Ok(KvArena {
            kv: self.backend.new_kv(&self.config, entries)?,
            entries,
            model: self.id,
        })
    }

    /// A KV cache for `slots` sequences of up to `capacity` tokens each.
    pub fn new_cache(&self, slots: usize, capacity: usize) -> Result<Cache<B>> {
        if capacity > self.max_positions() {
            return Err(Error::Input(format!(
                "a context of {capacity} tokens exceeds the model's {} positions",
                self.max_positions()
            )));
        }
        let entries = slots
            .checked_mul(capacity)
            .filter(|&e| e > 0)
            .ok_or_else(|| {
                Error::Input(format!("a cache of {slots} slots × {capacity} positions"))
            })?;
        Ok(Cache {
            arena: self.new_arena(entries)?,
            lens: vec![0; slots],
            capacity,
        })
    }

    /// Runs `tokens` through the decoder. Row `t` belongs to sequence `slots[t]` and is placed
    /// after what that slot already holds (rows of one slot in order), so one call can prefill a
    /// prompt, decode one token in each of many sequences, or mix both. Returns the logits of
    /// the rows named in `logits_rows`, `[logits_rows.len(), V]` row-major.
    pub fn forward(
        &self,
        cache: &mut Cache<B>,
        tokens: &[u32],
        slots: &[usize],
        logits_rows: &[usize],
    ) -> Result<Vec<f32>> {
        let rows = cache.place(tokens, slots)?;
        let batch = KvRows {
            rows: &rows,
            links: &[],
        };
        let logits = self.forward_rows(&mut cache.arena, tokens, batch, Head::Full(logits_rows))?;
        cache.commit(slots);
        Ok(logits)
    }

    /// Runs `tokens` through the decoder, row `t` placed in the arena as `batch.rows[t]` says
    /// (its K/V entry, position and context). The lower-level twin of [`Model::forward`]: beam
    /// search uses it to share one prompt's KV among all its beams. Returns what `head` asks for.
    pub fn forward_rows(
        &self,
        arena: &mut KvArena<B>,
        tokens: &[u32],
        batch: KvRows,
        head: Head,
    ) -> Result<Vec<f32>> {
        self.check_batch(arena, tokens, batch, head)?;
        let out = self.pool.install(|| {
            self.team.enter(|| {
                self.backend
                    .run_forward(&mut || forward::forward(self, &mut arena.kv, tokens, batch, head))
            })
        });
        self.backend.check()?;
        Ok(out)
    }

    /// Runs `f` on one of this model's pool threads. Every forward runs on the pool; called
    /// from outside it, each one hands its work to a pool thread and sleeps until it is done
    /// (two thread wake-ups a step). A loop of steps run inside `install` pays that once:
    /// with the default model (~0.15 ms steps) a search's prefill + decode took 5–8 % less
    /// (docs/PERF.md, "The step loop on the model's pool").
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Hands back logits that [`Model::forward_rows`] returned, once read, for a later pass to
    /// reuse (saves page faults on megabyte-sized rows).
    pub fn recycle(&self, logits: Vec<f32>) {
        self.backend.recycle_host(logits);
    }

    fn check_batch(
        &self,
        arena: &KvArena<B>,
        tokens: &[u32],
        batch: KvRows,
        head: Head,
    ) -> Result<()> {
        let vocab = self.config.vocab_size;
        if tokens.is_empty() || tokens.len() != batch.rows.len() {
            return Err(Error::Input(format!(
                "a batch needs one row per token and at least one token ({} tokens, {} rows)",
                tokens.len(),
                batch.rows.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        let entries = arena.entries as u32;
        if arena.model != self.id {
            return Err(Error::Input(
                "this KV arena was made for another model".into(),
            ));
        }
        for row in batch.rows {
            let links = (row.link.0 <= row.link.1)
                .then(|| batch.links.get(row.link.0 as usize..row.link.1 as usize))
                .flatten();
            let ok = (row.pos as usize) < self.max_positions()
                && row.entry < entries
                && row.span.0 <= row.span.1
                && row.span.1 <= entries
                && links.is_some_and(|l| l.iter().all(|&e| e < entries))
                && row.context_len() > 0;
            if !ok {
                return Err(Error::Input(format!(
                    "batch row {row:?} is outside the KV arena of {entries} entries or the model's {} positions",
                    self.max_positions()
                )));
            }
            // A row attends to what comes before it and to itself: its context ends at the
            // entry it writes (else it reads an entry no one wrote, or misses its own).
            let last = match links {
                Some(&[.., e]) => Some(e),
                _ => row
                    .span
                    .1
                    .checked_sub(1)
                    .filter(|_| row.span.1 > row.span.0),
            };
            if last != Some(row.entry) {
                return Err(Error::Input(format!(
                    "batch row {row:?}: its context does not end at the entry it writes"
                )));
            }
        }
        // Two rows writing one entry would leave it to whichever came last (a device backend
        // would race on it).
        let mut written: Vec<u32> = batch.rows.iter().map(|r| r.entry).collect();
        written.sort_unstable();
        if let Some(w) = written.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Input(format!(
                "two rows of the batch write KV entry {}",
                w[0]
            )));
        }
        let (picked, picks) = match head {
            Head::Full(r) => (r, &[][..]),
            Head::Picks(r, p) | Head::PicksLse(r, p) => (r, p),
        };
        if let Some(&r) = picked.iter().find(|&&r| r >= tokens.len()) {
            return Err(Error::Input(format!(
                "logits row {r} is outside the batch of {}",
                tokens.len()
            )));
        }
        if let Some(&(r, v)) = picks
            .iter()
            .find(|&&(r, v)| r as usize >= picked.len() || v as usize >= vocab)
        {
            return Err(Error::Input(format!(
                "head pick (row {r}, token {v}) is outside {} rows × {vocab} tokens",
                picked.len()
            )));
        }
        Ok(())
    }
}

/// Which LM-head outputs a forward pass returns.
#[derive(Debug, Clone, Copy)]
pub enum Head<'a> {
    /// Full-vocabulary logits of these batch rows: `[R, V]` row-major.
    Full(&'a [usize]),
    /// Only the logits `(i, v)` — token `v` at the `i`-th of these batch rows — in pick order
    /// (the sparse head: a trie's allowed children).
    Picks(&'a [usize], &'a [(u32, u32)]),
    /// The picks as in `Picks`, then the full-vocabulary log-sum-exp of each of these rows
    /// (`picks.len() + rows.len()` values): full normalization without the `[R, V]` logits
    /// leaving the backend.
    PicksLse(&'a [usize], &'a [(u32, u32)]),
}

/// A KV arena: `entries` token entries, every layer.
pub struct KvArena<B: Backend> {
    kv: B::Kv,
    entries: usize,
    /// `Model::id` of the model whose shapes it has.
    model: u64,
}

impl<B: Backend> KvArena<B> {
    pub fn entries(&self) -> usize {
        self.entries
    }
}

/// A KV cache of `slots` sequences (slot `s` is entries `s * capacity..`) and how many
/// positions each holds.
pub struct Cache<B: Backend> {
    arena: KvArena<B>,
    lens: Vec<usize>,
    capacity: usize,
}

impl<B: Backend> Cache<B> {
    /// Tokens held by `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything `slot` holds.
    pub fn clear(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Checks a batch and places each row after what its slot holds.
    fn place(&self, tokens: &[u32], slots: &[usize]) -> Result<Vec<RowKv>> {
        if tokens.len() != slots.len() {
            return Err(Error::Input(format!(
                "a batch needs one slot per token ({} tokens, {} slots)",
                tokens.len(),
                slots.len()
            )));
        }
        let mut next = self.lens.clone();
        let mut rows = Vec::with_capacity(tokens.len());
        for &slot in slots {
            let pos = *next.get(slot).ok_or_else(|| {
                Error::Input(format!(
                    "slot {slot} does not exist (cache has {})",
                    self.lens.len()
                ))
            })?;
            if pos >= self.capacity {
                return Err(Error::Input(format!(
                    "slot {slot} is full: the cache holds {} positions per sequence",
                    self.capacity
                )));
            }
            next[slot] = pos + 1;
            rows.push(RowKv::contiguous((slot * self.capacity) as u32, pos as u32));
        }
        Ok(rows)
    }

    fn commit(&mut self, slots: &[usize]) {
        for &s in slots {
            self.lens[s] += 1;
        }
    }
}
