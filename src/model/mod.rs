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
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, RowPos};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Longest context a rotary table is built for (positions past it are refused).
const MAX_ROPE_POSITIONS: usize = 1 << 15;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Convert every weight matrix to this dtype at load. `None` keeps the stored dtype (read
    /// in place from the mapped file); a quantized GGUF is dequantized to f32.
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
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let source = Source::find(dir)?;
        let tensors = source.load(&config)?;
        let weights = weights::load(&backend, &config, tensors, options.dtype)?;
        let rope = RopeTable::new(
            config.head_dim,
            config.rope_theta,
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
        })
    }

    /// Worker threads a forward pass uses.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The longest sequence this model accepts.
    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// A KV cache for `slots` sequences of up to `capacity` tokens each.
    pub fn new_cache(&self, slots: usize, capacity: usize) -> Result<Cache<B>> {
        if capacity > self.max_positions() {
            return Err(Error::Input(format!(
                "a context of {capacity} tokens exceeds the model's {} positions",
                self.max_positions()
            )));
        }
        Ok(Cache {
            kv: self.backend.new_kv(&self.config, slots, capacity)?,
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
        let rows = cache.place(tokens, slots, self.config.vocab_size)?;
        if let Some(&r) = logits_rows.iter().find(|&&r| r >= tokens.len()) {
            return Err(Error::Input(format!(
                "logits row {r} is outside the batch of {}",
                tokens.len()
            )));
        }
        let logits = self
            .pool
            .install(|| forward::forward(self, &mut cache.kv, tokens, &rows, logits_rows));
        cache.commit(&rows);
        Ok(logits)
    }
}

/// The KV cache of a model and how many positions each slot holds.
pub struct Cache<B: Backend> {
    kv: B::Kv,
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

    /// Checks a batch and gives each row its position.
    fn place(&self, tokens: &[u32], slots: &[usize], vocab: usize) -> Result<Vec<RowPos>> {
        if tokens.is_empty() || tokens.len() != slots.len() {
            return Err(Error::Input(format!(
                "a batch needs one slot per token and at least one token ({} tokens, {} slots)",
                tokens.len(),
                slots.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary of {vocab}"
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
            rows.push(RowPos { slot, pos });
        }
        Ok(rows)
    }

    fn commit(&mut self, rows: &[RowPos]) {
        for r in rows {
            self.lens[r.slot] = self.lens[r.slot].max(r.pos + 1);
        }
    }
}
