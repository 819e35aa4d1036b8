//! postings-bench: gram's code → posting store at paper scale (JD's test set: 9.7 M products,
//! 2.5 M codes, 60 M postings), against tantivy holding the same postings.
//!
//! - `synth`: a deterministic synthetic index written through `gram::index::write_columns`;
//! - `tantivy`: the same postings as a tantivy index (one document per product, one term per
//!   code, a stored per-product score as a fast field);
//! - `query`: random 10-code queries through both, single thread; latency percentiles, open
//!   time, memory, and a correctness check of both engines against straightforward
//!   recomputations.
//!
//! Each subcommand prints one JSON line. `tools/bench_postings.sh` runs all three.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

mod query;
mod synth;
mod tv;

#[derive(Parser)]
#[command(about = "gram posting store at paper scale, against tantivy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes a synthetic index to OUT/index.gram.
    Synth {
        #[arg(long, default_value_t = 9_700_000)]
        products: usize,
        #[arg(long, default_value_t = 2_500_000)]
        codes: usize,
        #[arg(long, default_value_t = 60_000_000)]
        postings: usize,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Zipf exponent of the posting-list lengths (rank r gets ∝ (r + 1)^-s postings).
        #[arg(long, default_value_t = 0.8)]
        zipf: f64,
    },
    /// Builds a tantivy index of the same postings in TDIR (replaced if it exists).
    Tantivy {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Indexing memory budget (one indexing thread).
        #[arg(long, default_value_t = 2048)]
        heap_mb: usize,
    },
    /// Times random 10-code queries through gram and tantivy (single thread each).
    Query {
        #[arg(long)]
        index: PathBuf,
        /// The tantivy index to time against; without it only gram runs.
        #[arg(long)]
        tantivy: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Codes per query.
        #[arg(long, default_value_t = 10)]
        codes: usize,
        /// Products returned.
        #[arg(long, default_value_t = 300)]
        k: usize,
        /// Timed passes over the queries per engine (after one warm-up pass), alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Queries checked against the reference recomputations.
        #[arg(long, default_value_t = 20)]
        check: usize,
        /// Warm `Index::open` repetitions.
        #[arg(long, default_value_t = 10)]
        opens: usize,
        /// How a product's scores across codes combine: `max` (gram's default) or `sum`.
        #[arg(long, default_value = "max")]
        aggregate: String,
        /// Give every code a random prior (`score::Postings::prior`, in [-R, 0), R =
        /// --prior-range).
        #[arg(long)]
        priors: bool,
        /// The priors' range R (the shipped model's α · log P(c|q) spans about 1.3 over a
        /// query's likely codes).
        #[arg(long, default_value_t = 3.0)]
        prior_range: f32,
        /// Draw each prior by the code's granularity instead, as the shipped model's α · log
        /// P(c|q) falls (measured on real queries: coarse codes, the long lists, likeliest).
        #[arg(long)]
        priors_by_granularity: bool,
        /// Skip timing the slow twin `score::rank` (still used by the checks).
        #[arg(long)]
        no_slow_twin: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Synth {
            products,
            codes,
            postings,
            out,
            seed,
            zipf,
        } => synth::run(&synth::Params {
            products,
            codes,
            postings,
            out,
            seed,
            zipf,
        }),
        Cmd::Tantivy {
            index,
            out,
            heap_mb,
        } => tv::build(&index, &out, heap_mb << 20),
        Cmd::Query {
            index,
            tantivy,
            queries,
            seed,
            codes,
            k,
            rounds,
            check,
            opens,
            aggregate,
            priors,
            prior_range,
            priors_by_granularity,
            no_slow_twin,
        } => query::run(&query::Params {
            index,
            tantivy,
            queries,
            seed,
            codes,
            k,
            rounds,
            check,
            opens,
            aggregate: match aggregate.as_str() {
                "max" => gram::score::Aggregate::Max,
                "sum" => gram::score::Aggregate::Sum,
                other => {
                    eprintln!("postings-bench: --aggregate {other}: max or sum");
                    std::process::exit(2);
                }
            },
            priors,
            prior_range,
            priors_by_granularity,
            slow_twin: !no_slow_twin,
        }),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("postings-bench: {e}");
            std::process::exit(1);
        }
    }
}

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The index file inside an index directory.
pub fn index_file(dir: &Path) -> PathBuf {
    dir.join("index.gram")
}

/// splitmix64's finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in the open interval (0, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 41) as f32 + 0.5) / (1u32 << 23) as f32
    }
}

/// The stored per-product score tantivy ranks by (a fixed function of the product index).
pub fn stored_score(product: u32) -> f64 {
    ((mix(product as u64 ^ 0x5c0e_5c0e) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// `VmRSS`, `VmHWM`, `RssAnon`, `RssFile` of this process, in MiB.
pub fn memory() -> serde_json::Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb / 1024.0 * 10.0).round() / 10.0)
    };
    serde_json::json!({
        "vm_rss_mib": field("VmRSS:"),
        "vm_hwm_mib": field("VmHWM:"),
        "rss_anon_mib": field("RssAnon:"),
        "rss_file_mib": field("RssFile:"),
    })
}

/// Bytes of all files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Seconds, rounded to milliseconds.
pub fn secs(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e3).round() / 1e3
}

/// Milliseconds, rounded to microseconds.
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The postings section (product indices) of a gram index; code `c`'s are
/// `post_start .. post_start + post_len` of its record.
pub fn posting_ids(ix: &gram::index::Index) -> Result<&[u32]> {
    let (_, bytes) = ix
        .container()
        .section(gram::index::kind::POSTINGS)
        .ok_or("the index has no postings section")?;
    Ok(bytemuck::try_cast_slice(bytes).map_err(|e| format!("postings: {e}"))?)
}

/// Code `c`'s product indices.
pub fn code_products<'a>(ix: &gram::index::Index, ids: &'a [u32], c: u32) -> &'a [u32] {
    let r = ix.code(c).expect("code id below num_codes");
    &ids[r.post_start as usize..r.post_start as usize + r.post_len as usize]
}
