//! The `gram` command line: raw flags → validated options → library calls. Output is JSON on
//! stdout; errors go to stderr with a non-zero exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gram::backend::cuda::CudaBackend;
use gram::backend::{Backend, Device};
use gram::beam::{self, BeamOptions, BeamSearch, Normalize, Query};
use gram::catalog::{self, OnError};
use gram::index::Index;
use gram::lm;
use gram::search::{
    build_settings, model_fingerprint, open_backend, AnyEngine, AnyModel, Engine, Limits, Request,
};
use gram::settings::Settings;
use gram::tensor::DType;
use gram::trie::{CodeSet, Trie};
use gram::{LoadOptions, Model, Tokenizer};
use serde_json::json;

#[derive(Parser)]
#[command(name = "gram", version, about = "GRAM generative retrieval engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a command runs the model: `--threads`, `--device`.
#[derive(clap::Args, Clone, Copy)]
struct RunOn {
    /// CPU worker threads (default: all cores; on the GPU the model uses one).
    #[arg(long)]
    threads: Option<usize>,
    /// Backend: `cpu`, `cuda` (GPU 0; an error where there is none) or `auto` (CUDA when a GPU
    /// can run the model, else the CPU). Stderr says which.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Subcommand)]
enum Command {
    /// Next-token log-probabilities (and an optional greedy continuation) for one prompt.
    Lm(LmArgs),
    /// The most likely codes of a code set for each prompt (trie-constrained beam search).
    Codes(CodesArgs),
    /// Build or inspect a code → posting index.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Retrieve products for queries: codes by beam search over the index's trie, postings,
    /// S_rele scores, top K.
    Search(SearchArgs),
    /// Serve searches over HTTP: batched, with a bounded queue, deadlines and metrics.
    Serve(gram::server::ServeArgs),
    /// Load-test a `gram serve` server: closed or open loop, latency report and plot.
    Bench(gram::loadgen::BenchArgs),
    /// Time the query → codes stage (beam search) on fixed prompts, CPU or GPU.
    BenchCodes(gram::codes_bench::BenchCodesArgs),
    /// Retrieval quality on graded judgements through the engine: nDCG@10, Recall@10/100/300,
    /// relevance rate, judged@10, their condensed nDCG@10 and Recall@10/100 (unjudged products
    /// left out), invalid codes, candidates, latency (one JSON object).
    Eval(EvalArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Index directory (`gram index build --out`).
    #[arg(long)]
    index: PathBuf,
    /// Judgements: JSONL `{"query": Q, "grades": {product_id: grade}}` a line, or CSV with
    /// `query`, `docid` and `rating` columns (Chorus's `Broad_Query_Set_rated.csv`).
    #[arg(long)]
    judgements: PathBuf,
    /// Model directory (default: the one that built the index; another one is refused).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Products retrieved per query (at least 300: the report's deepest cut-off is
    /// Recall@300).
    #[arg(long, default_value_t = 300)]
    k: usize,
    /// Beam width: codes generated per query at most.
    #[arg(long, default_value_t = 10)]
    beam: usize,
    /// Queries sharing decoder steps (1: one at a time, as `gram search`; at most 256).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    run: RunOn,
    /// Also write each query's codes, candidates, metrics and latency here (JSONL).
    #[arg(long)]
    per_query: Option<PathBuf>,
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Index a JSONL catalog (`id`, `title`, optional `attributes`, `codes`) with a model.
    Build(BuildArgs),
    /// Print an index's counts, sections and checksum state.
    Inspect {
        /// Index directory.
        dir: PathBuf,
        /// Also read every record as a search would (codes, trie, postings, products).
        #[arg(long)]
        deep: bool,
    },
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("generation").args(["codes", "generate"]).multiple(true))]
struct BuildArgs {
    /// Model directory (its gram.json, if any, gives templates, delimiter and weights).
    #[arg(long)]
    model: PathBuf,
    /// JSONL catalog.
    #[arg(long)]
    catalog: PathBuf,
    /// Index directory to write (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// What a malformed catalog line does: stop the build, or skip it (and count it). A
    /// product whose prompt and codes do not fit the model's positions, or with a catalog code
    /// the model cannot emit, likewise stops the build, or is left out of the index (counted as
    /// the report's `skipped_products`).
    #[arg(long, default_value = "stop")]
    on_error: String,
    /// Also generate each product's codes with the model: beam search over this code list
    /// (one code per line) from the product template.
    #[arg(long)]
    codes: Option<PathBuf>,
    /// Generate each product's codes with the model, unconstrained when no `--codes` list is
    /// given (any sequence the model ends with EOS, decoded, becomes a code).
    #[arg(long)]
    generate: bool,
    /// Unconstrained generation: most tokens a code may take, its EOS included (default:
    /// gram.json's `max_code_tokens`, else 16; at most that).
    #[arg(long, requires = "generation")]
    max_code_tokens: Option<usize>,
    /// Products per shard: a restarted build reuses the shards it finished.
    #[arg(long, default_value_t = 1000)]
    shard_size: usize,
    /// Where finished shards wait until the index is written (default: beside the index);
    /// afterwards only the shard files are removed, and the directory if that empties it.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Beam width of that generation (with --codes or --generate).
    #[arg(long, default_value_t = 10, requires = "generation")]
    beam: usize,
    /// Keep a generated code when its probability (EOS included) is at least this (with
    /// --codes or --generate).
    #[arg(long, default_value_t = 0.0, requires = "generation")]
    threshold: f32,
    /// Products whose generation shares decoder steps (with --codes or --generate).
    #[arg(long, default_value_t = 16, requires = "generation")]
    batch: usize,
    #[command(flatten)]
    run: RunOn,
}

#[derive(clap::Args)]
struct SearchArgs {
    /// Index directory (`gram index build --out`).
    #[arg(long)]
    index: PathBuf,
    /// Model directory (default: the one that built the index; another one is refused).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Products to return per query.
    #[arg(long, default_value_t = 300)]
    k: usize,
    /// Beam width: codes generated per query at most.
    #[arg(long, default_value_t = 10)]
    beam: usize,
    #[command(flatten)]
    run: RunOn,
    /// Queries (each filled into the query template of gram.json). One that starts with `-`
    /// goes after `--` (`gram search ... -- "-5 volts"`).
    #[arg(required = true)]
    queries: Vec<String>,
}

#[derive(clap::Args)]
struct CodesArgs {
    /// Model directory: config.json, tokenizer.json, *.safetensors or one *.gguf.
    #[arg(long)]
    model: PathBuf,
    /// Code set: one code per line (UTF-8); each is tokenized alone and ended with the EOS.
    #[arg(long)]
    codes: PathBuf,
    /// Beam width (1..=512): codes returned per prompt at most.
    #[arg(long, default_value_t = 10)]
    beam: usize,
    /// Most tokens a code may take, its EOS included.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// HF length penalty: a finished code scores sum(logprobs) / length ^ penalty (negative
    /// values too: `--length-penalty -1`).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f64,
    /// `full`: full-vocabulary log-softmax, then the trie mask (transformers' semantics);
    /// `children`: normalize over the allowed tokens only (sparse LM head).
    #[arg(long, default_value = "full")]
    normalize: String,
    /// Unconstrained beam search (for comparison): reports how many returned codes are invalid.
    #[arg(long)]
    no_trie: bool,
    #[command(flatten)]
    run: RunOn,
    /// Convert weights to this dtype at load: f32, f16 or bf16 (default: as stored; a GGUF's
    /// Q4_1/Q8_0 stay blocks the kernels dequantize, Q4_0 becomes f32). CPU only: the GPU keeps
    /// bf16 weights.
    #[arg(long)]
    dtype: Option<String>,
    /// Prompts, used as given (tokenized as `tokenizer(text)`); all share decoder steps. One
    /// that starts with `-` goes after `--` (`gram codes ... -- "-5 volts"`).
    #[arg(required = true)]
    prompts: Vec<String>,
}

#[derive(clap::Args)]
struct LmArgs {
    /// Model directory: config.json, tokenizer.json, *.safetensors or one *.gguf.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text, tokenized as transformers' `tokenizer(text)` (special tokens added). It may
    /// start with `-` (`--prompt "-5 volts"`).
    #[arg(long, allow_hyphen_values = true)]
    prompt: String,
    /// How many of the most likely next tokens to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also print the greedy continuation of this many tokens (stops at the model's end
    /// tokens: EOS and those of `generation_config.json`).
    #[arg(long)]
    greedy: Option<usize>,
    #[command(flatten)]
    run: RunOn,
    /// Convert weights to this dtype at load: f32, f16 or bf16 (default: as stored; a GGUF's
    /// Q4_1/Q8_0 stay blocks the kernels dequantize, Q4_0 becomes f32). CPU only: the GPU keeps
    /// bf16 weights.
    #[arg(long)]
    dtype: Option<String>,
}

/// Set when stdout's reader has gone (`gram search ... | head`): later output is dropped.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// `println!` for the commands' output. A closed stdout is no error and no panic, as for a Unix
/// tool: the output is dropped from then on, and the command still finishes what it writes
/// elsewhere (`eval --per-query`) and still exits nonzero when it fails (`index inspect` of a
/// damaged index).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        if !stdout_closed() {
            if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(format!("writing to stdout: {e}"));
                }
                STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }};
}

/// A path as JSON output and index metadata hold it: UTF-8, or an error naming the flag (a
/// name the report could not spell would be a report about another path).
fn utf8_path<'a>(flag: &str, path: &'a Path) -> Result<&'a str, String> {
    path.to_str().ok_or_else(|| {
        format!(
            "{flag} {}: the path is not valid UTF-8 (gram records paths in JSON)",
            path.display()
        )
    })
}

/// The library's warnings (`tracing`) on stderr for every command, as `warning: ...` lines
/// like the commands' own; `gram serve` installs its own subscriber (`RUST_LOG`, default
/// `info`). Nothing below warnings: a command's stderr stays what its users' scripts read.
fn log_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .event_format(WarningLine)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A tracing event as one `warning: MESSAGE key=value...` (or `error: ...`) line.
struct WarningLine;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for WarningLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = if *event.metadata().level() == tracing::Level::ERROR {
            "error"
        } else {
            "warning"
        };
        write!(writer, "{level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        log_warnings();
    }
    let result = match cli.command {
        Command::Lm(args) => run_lm(args),
        Command::Codes(args) => run_codes(args),
        Command::Index(IndexCommand::Build(args)) => run_index_build(args),
        Command::Index(IndexCommand::Inspect { dir, deep }) => run_index_inspect(&dir, deep),
        Command::Search(args) => run_search(args),
        Command::Serve(args) => gram::server::run(args).map_err(|e| e.to_string()),
        Command::Bench(args) => gram::loadgen::run(args),
        Command::BenchCodes(args) => gram::codes_bench::run(args),
        Command::Eval(args) => run_eval(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            gram::note!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_dtype(s: Option<&str>) -> Result<Option<DType>, String> {
    s.map(|s| DType::parse(s).ok_or_else(|| format!("--dtype `{s}`: expected f32, f16 or bf16")))
        .transpose()
}

/// A model on the backend `--device` chose (one per command: the variants' sizes do not
/// matter).
#[allow(clippy::large_enum_variant)]
enum Loaded {
    Cpu(Model),
    Cuda(Model<CudaBackend>),
}

/// Runs `$body` with `$m` bound to the loaded model, whatever its backend (the body is
/// compiled once per backend).
macro_rules! on_model {
    ($loaded:expr, $m:ident => $body:expr) => {
        match $loaded {
            Loaded::Cpu($m) => $body,
            Loaded::Cuda($m) => $body,
        }
    };
}

/// `--threads`, checked the same way by every command that runs the model. Given, it also
/// sizes rayon's global pool, which builds the code set and the trie and packs the weights
/// at load: the model's own pool had T threads while those took every core.
fn check_threads(threads: Option<usize>) -> Result<(), String> {
    match threads {
        Some(t) if t == 0 || t > 1024 => Err(format!("--threads {t}: expected 1..=1024")),
        Some(t) => {
            // Only the first call sizes it (one command, one `--threads`).
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build_global();
            Ok(())
        }
        None => Ok(()),
    }
}

/// Loads the model directory's tokenizer and weights on the backend `device` picks, and says
/// which on stderr (`backend: cpu`, `backend: cuda on <GPU>`).
fn load(
    dir: &std::path::Path,
    device: Device,
    threads: Option<usize>,
    dtype: Option<&str>,
) -> Result<(Tokenizer, Loaded), String> {
    if !dir.is_dir() {
        return Err(format!("--model {}: not a directory", dir.display()));
    }
    // Checked whatever the device: on a GPU the CPU settings are replaced (one host thread,
    // bf16 weights), and a bad value is still the user's mistake to hear about.
    check_threads(threads)?;
    let cpu = LoadOptions {
        dtype: parse_dtype(dtype)?,
        threads,
    };
    let (gpu, info) = open_backend(device, dir).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
    let (model, info) =
        gram::search::load_model(device, gpu, info, dir, &cpu).map_err(|e| e.to_string())?;
    gram::note!("backend: {info}");
    let model = match model {
        AnyModel::Cuda(m) => {
            if threads.is_some() || dtype.is_some() {
                gram::note!(
                    "note: on the GPU, --threads and --dtype do not apply (bf16 weights, one host \
                     thread)"
                );
            }
            Loaded::Cuda(m)
        }
        AnyModel::Cpu(m) => Loaded::Cpu(m),
    };
    let vocab = on_model!(&model, m => m.config.vocab_size);
    tokenizer.check_fits(vocab).map_err(|e| e.to_string())?;
    Ok((tokenizer, model))
}

fn run_codes(args: CodesArgs) -> Result<(), String> {
    let normalize = match args.normalize.as_str() {
        "full" => Normalize::Full,
        "children" => Normalize::Children,
        other => return Err(format!("--normalize `{other}`: expected full or children")),
    };
    let options = BeamOptions {
        beam: args.beam,
        max_new_tokens: args.max_new_tokens,
        length_penalty: args.length_penalty,
        normalize,
        constrained: !args.no_trie,
    };
    // Checked before the model loads; the search would say the same of every prompt.
    options.check().map_err(|e| e.to_string())?;
    let (tokenizer, loaded) = load(
        &args.model,
        args.run.device,
        args.run.threads,
        args.dtype.as_deref(),
    )?;
    on_model!(loaded, model => codes_on(&args, options, &tokenizer, &model))
}

fn codes_on<B: Backend>(
    args: &CodesArgs,
    options: BeamOptions,
    tokenizer: &Tokenizer,
    model: &Model<B>,
) -> Result<(), String> {
    let eos = *model
        .config
        .eos_token_ids
        .first()
        .ok_or("the model's config names no eos_token_id: codes cannot end")?;
    let set = CodeSet::from_file(&args.codes, tokenizer, eos).map_err(|e| e.to_string())?;
    set.check_stops(&model.config.eos_token_ids[1..], &|i, _| {
        format!("{}: line {}", args.codes.display(), i + 1)
    })
    .map_err(|e| e.to_string())?;
    // Its errors (a code listed twice) name lines of the file: the file too.
    let trie = Trie::build(&set, model.config.vocab_size, eos)
        .map_err(|e| format!("{}: {e}", args.codes.display()))?;
    // A code longer than `--max-new-tokens` (its EOS counted) can never be returned: said, as
    // a constrained search leaves such cut beams out of its answer without a word.
    if !args.no_trie && trie.max_len() + 1 > args.max_new_tokens {
        let long: Vec<usize> = (0..set.len())
            .filter(|&i| set.code_tokens(i).len() + 1 > args.max_new_tokens)
            .collect();
        gram::note!(
            "warning: {} of {} codes take more than --max-new-tokens {} tokens with their EOS \
             and can never be returned (the first: {}: line {}, {} tokens)",
            long.len(),
            set.len(),
            args.max_new_tokens,
            args.codes.display(),
            long[0] + 1,
            set.code_tokens(long[0]).len() + 1
        );
    }
    let queries = args
        .prompts
        .iter()
        .map(|p| {
            Ok(Query {
                prompt: tokenizer.encode(p).map_err(|e| e.to_string())?,
                options,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // Each prompt checked first, named by its place on the command line and its text (the
    // search would call the one past the context "query 0").
    for (i, (q, p)) in queries.iter().zip(&args.prompts).enumerate() {
        beam::check_query(model, q, &trie).map_err(|e| format!("prompt {}: {e}", named(i, p)))?;
    }
    let outputs = beam::search(model, &trie, &queries).map_err(|e| e.to_string())?;
    for (prompt, out) in args.prompts.iter().zip(outputs) {
        let codes = out
            .codes
            .iter()
            .map(|c| {
                let text = match c.code {
                    Some(id) => set.texts[id as usize].clone(),
                    None => tokenizer.decode(&c.tokens).map_err(|e| e.to_string())?,
                };
                Ok(json!({"code": text, "score": c.score, "token_logprobs": c.token_logprobs}))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut obj = json!({"prompt": prompt, "codes": codes});
        if args.no_trie {
            obj["invalid"] = json!(out.invalid);
        }
        out!("{obj}");
    }
    Ok(())
}

fn run_index_build(args: BuildArgs) -> Result<(), String> {
    let on_error = match args.on_error.as_str() {
        "stop" => OnError::Stop,
        "skip" => OnError::Skip,
        other => return Err(format!("--on-error `{other}`: expected stop or skip")),
    };
    if !args.model.is_dir() {
        return Err(format!("--model {}: not a directory", args.model.display()));
    }
    if !(0.0..=1.0).contains(&args.threshold) {
        return Err(format!("--threshold {}: expected 0..=1", args.threshold));
    }
    let out_text = utf8_path("--out", &args.out)?.to_owned();
    let catalog_text = utf8_path("--catalog", &args.catalog)?;
    let model_dir = std::fs::canonicalize(&args.model).map_err(|e| e.to_string())?;
    let model_text = utf8_path("--model", &model_dir)?;
    check_threads(args.run.threads)?;
    let settings = Settings::load(&args.model).map_err(|e| e.to_string())?;
    // The flags before the catalog: a refusal comes before a large read and its warnings.
    let limit = settings.code_token_limit();
    let max_code_tokens = args
        .max_code_tokens
        .unwrap_or(settings.max_code_tokens.unwrap_or(16));
    if max_code_tokens == 0 || max_code_tokens > limit {
        return Err(format!(
            "--max-code-tokens {max_code_tokens}: expected 1..={limit}{}",
            if settings.max_code_tokens.is_some() {
                " (gram.json's max_code_tokens)"
            } else {
                ""
            }
        ));
    }
    let generating = args.generate || args.codes.is_some();
    if generating {
        beam::check_width(args.beam).map_err(|e| format!("--beam: {e}"))?;
        if args.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
    }
    if args.shard_size == 0 {
        return Err("--shard-size must be at least 1".into());
    }
    let (items, skipped) = catalog::read(&args.catalog, on_error).map_err(|e| e.to_string())?;
    let meta = json!({
        "model": {
            "dir": model_text,
            "fingerprint": model_fingerprint(&args.model).map_err(|e| e.to_string())?,
        },
        "settings": build_settings(&settings),
        "catalog": catalog_text,
        "skipped_lines": skipped,
    });
    let (list, code_file) = match &args.codes {
        Some(path) => {
            let (list, file) = catalog::CodeFile::read(path).map_err(|e| e.to_string())?;
            (list, Some(file))
        }
        None => (Vec::new(), None),
    };
    if args.codes.is_some() && list.is_empty() {
        return Err("--codes: the code list is empty".into());
    }
    // Every input checked, and the model loaded on its backend (a missing GPU is an error
    // here): only now is anything written.
    let (tokenizer, loaded) = load(&args.model, args.run.device, args.run.threads, None)?;
    gram::container::create_dir_durable(&args.out).map_err(|e| e.to_string())?;
    let generate = generating.then_some(catalog::Generate {
        codes: list,
        beam: args.beam,
        threshold: args.threshold,
        batch: args.batch,
        max_new_tokens: max_code_tokens,
    });
    let options = catalog::BuildOptions {
        generate: generate.as_ref(),
        shard_size: args.shard_size,
        work_dir: args.work_dir.clone(),
        progress: true,
        code_file,
        on_error,
    };
    let out = gram::search::index_file(&args.out);
    let report = on_model!(loaded, model => catalog::build_with(
        &model, &tokenizer, &settings, &items, &options, &out, &meta
    ))
    .map_err(|e| e.to_string())?;
    // Each list of products or codes the build set apart, its first few named.
    let tell = |count: usize, sample: &[String], says: &str| {
        if count > 0 {
            let more = count - sample.len();
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            gram::note!(
                "{}: {}{more}",
                says.replace("{n}", &count.to_string()),
                sample.join(", ")
            );
        }
    };
    tell(
        report.skipped_products,
        &report.skipped_sample,
        "warning: {n} products do not fit the model and were left out",
    );
    let g = report.granularity;
    if report.codes > 1 && g.single == report.codes {
        gram::note!(
            "warning: none of the {} codes contains the delimiter {:?} (the model's gram.json, \
             or the default without one): each is one attribute, and every one scores with the \
             coarse weight (do the catalog's codes use another delimiter?)",
            report.codes,
            settings.delimiter
        );
    }
    tell(
        report.merged_codes,
        &report.merged_sample,
        "note: {n} codes tokenize like another code, so the model cannot tell them apart; \
         each shares one posting list under the text more products list",
    );
    let without: Vec<String> = report
        .without_codes_sample
        .iter()
        .map(|id| format!("{id:?}"))
        .collect();
    tell(
        report.products_without_codes,
        &without,
        "warning: {n} products have no codes, so no search can return them",
    );
    out!(
        "{}",
        json!({"index": out_text, "report": report, "skipped_lines": skipped})
    );
    Ok(())
}

fn run_index_inspect(dir: &std::path::Path, deep: bool) -> Result<(), String> {
    let index = gram::search::existing_index_file(dir)
        .and_then(|file| Index::open(&file))
        .map_err(|e| e.to_string())?;
    let c = index.container();
    let verify = index.verify();
    let verified = match &verify {
        Ok(()) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    let sections: Vec<_> = c
        .sections()
        .iter()
        .map(|s| json!({"kind": s.kind, "bytes": s.len}))
        .collect();
    // The left-out products by count: the ids are for `gram eval`, and a large skip lists many.
    let mut meta = index.meta().clone();
    if let Some(ids) = meta.get_mut(gram::index::LEFT_OUT_PRODUCTS) {
        *ids = json!(ids.as_array().map_or(0, Vec::len));
    }
    let mut out = json!({"codes": index.num_codes(), "products": index.num_products(),
           "trie_nodes": index.trie().num_nodes(), "sections": sections,
           "checksums": verified, "meta": meta});
    let mut problems = Vec::new();
    if let Err(e) = verify {
        problems.push(e.to_string());
    }
    if deep {
        let scan = index.scan();
        let unended = scan.codes.saturating_sub(scan.trie_codes);
        let bad = scan.stray_postings
            + scan.bad_records
            + scan.unsorted_lists
            + scan.non_finite_scores
            + unended;
        if bad > 0 {
            problems.push(format!(
                "the deep scan found {} stray postings, {} bad records, {} unsorted lists, {} \
                 non-finite scores and {} codes the trie does not end",
                scan.stray_postings,
                scan.bad_records,
                scan.unsorted_lists,
                scan.non_finite_scores,
                unended
            ));
        }
        out["scan"] = json!(scan);
    }
    // The report first, then the verdict: a damaged index exits nonzero (an engine refuses
    // to open it; this command says what is damaged, and with `--deep` reads every record).
    out!("{out}");
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: damaged: {}",
            dir.display(),
            problems.join("; ")
        ))
    }
}

/// Opens the index and its model where `run` says (stderr names the backend), with room for
/// `k` products and any beam width.
fn open_engine(
    run: RunOn,
    index: &std::path::Path,
    model: Option<&std::path::Path>,
    k: usize,
) -> Result<(AnyEngine, gram::search::BackendInfo), String> {
    check_threads(run.threads)?;
    // The engine's limit on `k` is `--k` itself here, so 0 would read "out of range (1..=1)".
    if k == 0 {
        return Err("--k must be at least 1".into());
    }
    let load = LoadOptions {
        dtype: None,
        threads: run.threads,
    };
    let (engine, info) =
        AnyEngine::open(run.device, index, model, &load).map_err(|e| e.to_string())?;
    gram::note!("backend: {info}");
    // The server's query limits guard it against its clients; a query given here (or a
    // judged query of `gram eval`, which `evaluate.py` scores whatever its length) is the
    // user's own, and only the model's context bounds it.
    let engine = engine.with_limits(Limits {
        max_k: k,
        max_beam: beam::MAX_BEAM,
        max_query_bytes: usize::MAX,
        max_query_tokens: usize::MAX,
    });
    Ok((engine, info))
}

fn run_search(args: SearchArgs) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let (engine, _) = open_engine(args.run, &args.index, args.model.as_deref(), args.k)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    match &engine {
        AnyEngine::Cpu(e) => search_on(e, &args, open_ms),
        AnyEngine::Cuda(e) => search_on(e, &args, open_ms),
    }
}

/// An argument's place on the command line (from 1) and the start of its text, for errors.
fn named(i: usize, text: &str) -> String {
    let preview: String = text.chars().take(40).collect();
    let more = if preview.len() < text.len() {
        "…"
    } else {
        ""
    };
    format!("{} ({preview:?}{more})", i + 1)
}

/// Searches `args.queries` one at a time, one JSON line each, once every query is found good
/// (a bad one is named, and nothing is printed: not the queries before it alone).
fn search_on<B: Backend>(
    engine: &Engine<B>,
    args: &SearchArgs,
    open_ms: f64,
) -> Result<(), String> {
    // The command's own option first (`--k` is checked at open): named as a flag, not as the
    // first query's.
    beam::check_width(args.beam).map_err(|e| format!("--beam: {e}"))?;
    let mut beams = BeamSearch::new();
    let prepared = (args.queries.iter().enumerate())
        .map(|(i, q)| {
            let request = Request {
                k: args.k,
                beam: args.beam,
                ..Request::new(q.as_str())
            };
            (engine.prepare(request)).map_err(|e| format!("query {}: {e}", named(i, q)))
        })
        .collect::<Result<Vec<_>, String>>()?;
    for prepared in prepared {
        if stdout_closed() {
            break;
        }
        let response = engine
            .search(&mut beams, vec![prepared])
            .map_err(|e| e.to_string())?
            .remove(0);
        let mut obj = serde_json::to_value(&response).map_err(|e| e.to_string())?;
        obj["timings_ms"]["open"] = json!(open_ms);
        out!("{obj}");
    }
    Ok(())
}

/// Whether `a` and `b` name one existing file (the same inode: links and other spellings of a
/// path included).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            x.dev() == y.dev() && x.ino() == y.ino()
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok(),
        _ => false,
    }
}

/// Most queries `gram eval --batch` puts in one batch of shared decoder steps (each holds its
/// beam's rows and KV entries: past this the arena is the memory of a server, not a run).
const MAX_EVAL_BATCH: usize = 256;

fn run_eval(args: EvalArgs) -> Result<(), String> {
    check_threads(args.run.threads)?;
    // Recall@100/300 and the relevance rate@300 of a shorter list would be those of the list,
    // under the deeper names.
    if args.k < 300 {
        return Err(format!(
            "--k {}: the report's deepest cut-off is 300 (Recall@300, relevance rate@300); \
             use --k 300 or more",
            args.k
        ));
    }
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    // Checked here: the engine would refuse every query, and the report would read as zeros.
    beam::check_width(args.beam).map_err(|e| format!("--beam: {e}"))?;
    if args.batch > MAX_EVAL_BATCH {
        return Err(format!(
            "--batch {}: at most {MAX_EVAL_BATCH} queries share decoder steps",
            args.batch
        ));
    }
    let index_text = utf8_path("--index", &args.index)?;
    let judgements_text = utf8_path("--judgements", &args.judgements)?;
    // Checked before the run, not after it: its directory, and that a file can be written
    // there under its name.
    if let Some(path) = &args.per_query {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "--per-query {}: {} is not a directory",
                path.display(),
                dir.display()
            ));
        }
        if path.is_dir() {
            return Err(format!("--per-query {}: is a directory", path.display()));
        }
        // Written by a rename at the end of the run: over an input, that input is lost.
        if same_file(path, &args.judgements) {
            return Err(format!(
                "--per-query {}: is the --judgements file",
                path.display()
            ));
        }
        // The index file, or its shard directory's name beside it (`<index>.shards`).
        let index = gram::search::index_file(&args.index);
        let canonical = |p: &Path| std::fs::canonicalize(p).ok();
        let in_index_dir = canonical(dir).is_some() && canonical(dir) == canonical(&args.index);
        let index_name = path.file_name().is_some_and(|n| {
            index.file_name() == Some(n) || Some(n) == index.with_extension("shards").file_name()
        });
        if same_file(path, &index) || (in_index_dir && index_name) {
            return Err(format!(
                "--per-query {}: is the index's own file (--index {})",
                path.display(),
                args.index.display()
            ));
        }
        gram::container::check_writable(path)
            .map_err(|e| format!("--per-query {}: {e}", path.display()))?;
    }
    let mut judged = gram::eval::read_judgements(&args.judgements)?;
    if judged.num_grades() == 0 {
        return Err(format!(
            "{}: no grades (every query's judgements are empty): nothing to evaluate",
            args.judgements.display()
        ));
    }
    let (engine, info) = open_engine(args.run, &args.index, args.model.as_deref(), args.k)?;
    let grades = judged.num_grades();
    let (mut known, left_out) = gram::eval::catalog_product_ids(engine.index());
    known.extend(left_out.iter().cloned());
    let (dropped, emptied) = judged.retain_products(&known);
    let judged_left_out = judged.count_products(&left_out);
    if dropped == grades {
        return Err(format!(
            "none of the {grades} judged products of {} is in the index (judgements of another \
             catalog?)",
            args.judgements.display()
        ));
    }
    if dropped > 0 {
        gram::note!(
            "warning: {dropped} of {grades} judged products are not in the index: dropped (as \
             evaluate.py drops those missing from the catalog)"
        );
    }
    if emptied > 0 {
        gram::note!(
            "warning: {emptied} queries have none of their judged products in the index: left \
             out (counted as queries_without_judged_products_in_index)"
        );
    }
    if judged_left_out > 0 {
        gram::note!(
            "warning: {judged_left_out} judged products were left out of the index by its build \
             (--on-error skip): counted, never retrieved"
        );
    }
    if let Some(lines) = engine.index().meta()["skipped_lines"]
        .as_u64()
        .filter(|&n| n > 0)
    {
        gram::note!(
            "warning: the index's build skipped {lines} catalog lines it could not read: a \
             judged product on one of them is dropped with those not in the index"
        );
    }
    if judged.duplicate_queries > 0 {
        gram::note!(
            "warning: {} judgement lines repeat an earlier query: merged with it (a later grade \
             of the same product wins)",
            judged.duplicate_queries
        );
    }
    if judged.replaced_grades > 0 {
        gram::note!(
            "warning: {} grades repeat an earlier grade of the same query and product: the \
             later one kept",
            judged.replaced_grades
        );
    }
    if judged.empty_grades > 0 {
        gram::note!(
            "warning: {} rows with an empty grade skipped",
            judged.empty_grades
        );
    }
    let opts = gram::eval::EvalOptions {
        k: args.k,
        beam: args.beam,
        batch: args.batch,
    };
    // The CUDA backend's products take another kernel past 16 rows (docs/PERF.md), so a
    // query's codes there can depend on the queries it shares steps with; the CPU's never do.
    let batch_invariant =
        (matches!(engine, AnyEngine::Cpu(_)) && gram::backend::cpu::panels_on()) || args.batch == 1;
    if !batch_invariant {
        gram::note!(
            "warning: on the GPU a query's codes may depend on the queries batched with it \
             (near-ties can swap); --batch 1 or --device cpu for figures that do not"
        );
    }
    let (report, results) = match &engine {
        AnyEngine::Cpu(e) => gram::eval::evaluate(e, &judged.queries, &opts),
        AnyEngine::Cuda(e) => gram::eval::evaluate(e, &judged.queries, &opts),
    }
    .map_err(|e| e.to_string())?;
    let mut out = json!({
        "index": index_text,
        "judgements": judgements_text,
        "backend": info.backend,
        "k": args.k,
        "beam": args.beam,
        "batch": args.batch,
        "batch_invariant": batch_invariant,
        "judged_products": grades - dropped,
        "judged_products_not_in_index": dropped,
        "judged_products_left_out_by_build": judged_left_out,
        "queries_without_judged_products_in_index": emptied,
    });
    if let (Some(o), Some(r)) = (out.as_object_mut(), report.as_object()) {
        o.extend(r.clone());
    }
    // The file first: a closed stdout must not cost it.
    if let Some(path) = &args.per_query {
        let mut text = String::new();
        for r in &results {
            text += &serde_json::to_string(r).map_err(|e| e.to_string())?;
            text.push('\n');
        }
        gram::container::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("--per-query {}: {e}", path.display()))?;
    }
    out!("{out}");
    // Every query refused: the report's zeros measure nothing.
    if let Some(first) = results.iter().find_map(|r| r.error.as_ref()) {
        if results.iter().all(|r| r.error.is_some()) {
            return Err(format!(
                "the engine refused every query ({}; the first: {first})",
                results.len()
            ));
        }
    }
    Ok(())
}

fn run_lm(args: LmArgs) -> Result<(), String> {
    if args.top == 0 {
        return Err("--top must be at least 1".into());
    }
    let (tokenizer, loaded) = load(
        &args.model,
        args.run.device,
        args.run.threads,
        args.dtype.as_deref(),
    )?;
    // Checked before the forward pass, against the logits it will give.
    let vocab = on_model!(&loaded, model => model.config.vocab_size);
    if args.top > vocab {
        return Err(format!("--top {}: expected 1..={vocab}", args.top));
    }
    let tokens = tokenizer.encode(&args.prompt).map_err(|e| e.to_string())?;
    let greedy = args.greedy.unwrap_or(0);
    let out =
        on_model!(loaded, model => lm::run(&model, &tokens, greedy)).map_err(|e| e.to_string())?;
    let mut obj = json!({
        "tokens": tokens,
        "top": out.top(args.top),
    });
    if args.greedy.is_some() {
        obj["text"] = json!(tokenizer.decode(&out.greedy).map_err(|e| e.to_string())?);
        obj["greedy_tokens"] = json!(out.greedy);
    }
    out!("{obj}");
    Ok(())
}
