//! gram: a native engine for GRAM generative retrieval (JD.com, arXiv 2504.01403).
//!
//! The retrieval path is text → tokens → codes → postings → scores → results. This crate holds
//! all of it: a decoder (HF Llama / Qwen2 / Qwen3) that computes what transformers computes, on
//! a narrow backend interface whose CPU implementation is the reference (CUDA beside it),
//! trie-constrained beam search, the index, GRAM's scoring, the HTTP server, evaluation and a
//! load generator.
//!
//! Modules, in the order data flows through them:
//! - [`config`]: HF `config.json` → validated [`config::ModelConfig`].
//! - [`tokenizer`]: `tokenizer.json` → ids, as transformers' `tokenizer(text)`.
//! - [`tensor`]: host tensors (f32/f16/bf16), memory-mapped or owned.
//! - [`model`]: checkpoint loading (safetensors, sharded, GGUF), weights, KV cache, forward.
//! - [`backend`]: the `Backend` trait, the CPU backend (SIMD kernels with scalar twins) and the
//!   CUDA one (cudarc, loaded at run time, so every build has it; `kernels/` compiled by
//!   NVRTC on first use).
//! - [`trie`]: a code list → the compact, mappable trie of valid codes.
//! - [`beam`]: trie-constrained batched beam search: prompts → codes with log-probabilities.
//! - [`container`]: the index's on-disk container: typed, aligned, checksummed sections, mapped.
//! - [`settings`]: GRAM's serving settings (`gram.json`: templates, delimiter, weights).
//! - [`catalog`]: JSONL catalog → index, with product-side probabilities by teacher forcing.
//! - [`index`]: the code → posting store (codes, postings, product probabilities, products).
//! - [`score`]: GRAM's S_rele over a posting list (SIMD across products, scalar twin, f64 reference).
//! - [`search`]: the whole path for a query, batched: [`search::Engine`], [`search::Batch`].
//! - [`server`]: `gram serve`: the search over HTTP (axum), continuous batching on one engine
//!   thread, bounded queue, deadlines, Prometheus metrics.
//! - [`loadgen`]: `gram bench`: an open- or closed-loop HTTP load generator with latency reports.
//! - [`codes_bench`]: `gram bench-codes`: query-side code generation timed on a backend.
//! - [`eval`]: `gram eval`: nDCG, recall and relevance rate of an index on graded judgements.
//! - [`lm`]: next-token log-probabilities and greedy continuation (`gram lm`).
//! - [`error`]: `gram::Error`, one variant per boundary.

// The index, trie and GGUF readers cast mapped little-endian files in native order.
#[cfg(target_endian = "big")]
compile_error!(
    "gram reads its little-endian files in native byte order: big-endian targets are not supported"
);

/// `eprintln!` that cannot panic: a note for stderr, dropped when stderr cannot take it (a
/// closed pipe, a full disk). `eprintln!` panics then, and a command whose stdout report was
/// complete would die with exit 101 on a warning.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod backend;
pub mod beam;
pub mod catalog;
pub mod codes_bench;
pub mod config;
pub mod container;
pub mod error;
pub mod eval;
pub mod index;
pub mod lm;
pub mod loadgen;
pub mod model;
pub mod score;
pub mod search;
pub mod server;
pub mod settings;
pub mod tensor;
#[cfg(test)]
mod test_rng;
pub mod tokenizer;
pub mod trie;

pub use error::{Error, Result};
pub use model::{LoadOptions, Model};
pub use tokenizer::Tokenizer;
