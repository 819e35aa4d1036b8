//! `gram bench-codes`: the query → codes stage (prefill + trie-constrained beam search) timed
//! on fixed token prompts, per (beam, batch), on the CPU or the GPU. It prints one JSON line
//! per configuration: per-batch latencies, p50/p99, queries/s, decoder steps, and on the GPU the
//! per-op GPU time (CUDA events, one extra profiled batch), the weight bytes and the bandwidth
//! floor (steps × weight bytes / measured copy bandwidth). The prompts come from a JSON file of
//! token ids (`tools/gpu/make_inputs.py` writes one) so that peers see the very same ids.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, Device};
use crate::beam::{BeamOptions, BeamSearch, Normalize, Query};
use crate::tensor::DType;
use crate::trie::{CodeSet, Trie};
use crate::{LoadOptions, Model, Tokenizer};

#[derive(clap::Args, Debug)]
pub struct BenchCodesArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Code set, one code per line (the trie).
    #[arg(long)]
    pub codes: PathBuf,
    /// Prompts as token ids (JSON `{"prompts": [[ids...], ...]}`), or text, one per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Beam widths to run (repeat the flag).
    #[arg(long, default_values_t = [10usize])]
    pub beam: Vec<usize>,
    /// Queries per batch (repeat the flag).
    #[arg(long, default_values_t = [1usize])]
    pub batch: Vec<usize>,
    /// Most tokens a code may take, its EOS included.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// `full` (HF's) or `children`.
    #[arg(long, default_value = "full")]
    pub normalize: String,
    /// Untimed batches first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed batches per configuration (fewer when `--config-s` runs out).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Seconds a configuration may take before it stops repeating.
    #[arg(long, default_value_t = 20.0)]
    pub config_s: f64,
    /// Seconds the whole run may take: later configurations are skipped (and listed).
    #[arg(long, default_value_t = 600.0)]
    pub budget_s: f64,
    /// GPU: extra batches per configuration with CUDA events: one without graphs, the stream
    /// drained around every op (each op's own time), one with graphs (each replayed pass).
    #[arg(long)]
    pub profile: bool,
    /// GPU: launch every op (no CUDA graphs), to compare.
    #[arg(long)]
    pub eager: bool,
    /// Weights dtype on the CPU (the GPU keeps bf16).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// CPU worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also append the JSON lines here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the codes of beam 10, batch 1 for the first 4 prompts here (to compare with HF).
    #[arg(long)]
    pub dump_codes: Option<PathBuf>,
}

/// Prints `rec` as a line on stdout while its reader is there: a closed stdout (`| head`) is
/// no panic, and the run goes on for its `--out` file.
fn print_line(rec: &Value, open: &mut bool) -> Result<(), String> {
    if *open {
        if let Err(e) = writeln!(std::io::stdout().lock(), "{rec}") {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(format!("writing to stdout: {e}"));
            }
            *open = false;
        }
    }
    Ok(())
}

/// Most queries one timed batch shares decoder steps with (as `gram eval --batch`).
pub const MAX_BENCH_BATCH: usize = 256;

pub fn run(args: BenchCodesArgs) -> Result<(), String> {
    let dtype = DType::parse(&args.dtype)
        .ok_or_else(|| format!("--dtype `{}`: expected f32, f16 or bf16", args.dtype))?;
    // A batch of 0 would time nothing and report 0 queries/s; one past the limit would be
    // the memory of a server, not a bench (and `usize::MAX` an overflow).
    if let Some(&b) = args.batch.iter().find(|&&b| b == 0 || b > MAX_BENCH_BATCH) {
        return Err(format!("--batch {b}: expected 1..={MAX_BENCH_BATCH}"));
    }
    if args.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    for (flag, v) in [("--config-s", args.config_s), ("--budget-s", args.budget_s)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!(
                "{flag} {v}: expected a finite number of seconds, 0 or more"
            ));
        }
    }
    for &b in &args.beam {
        crate::beam::check_width(b).map_err(|e| format!("--beam: {e}"))?;
    }
    // The other flags too, before a model loads (or a device opens) to say so.
    let options = BeamOptions {
        max_new_tokens: args.max_new_tokens,
        normalize: normalize(&args.normalize)?,
        ..Default::default()
    };
    options
        .check()
        .map_err(|e| format!("--max-new-tokens: {e}"))?;
    if let Some(t) = args.threads.filter(|&t| t == 0 || t > 1024) {
        return Err(format!("--threads {t}: expected 1..=1024"));
    }
    let (gpu, info) =
        crate::search::open_backend(args.device, &args.model).map_err(|e| e.to_string())?;
    crate::note!("bench-codes: backend {info}");
    match gpu {
        Some(gpu) => {
            gpu.set_graphs(!args.eager);
            let options = crate::search::load_options(true, &LoadOptions::default());
            let model = Model::load_on(gpu, &args.model, &options).map_err(|e| e.to_string())?;
            bench(&args, &model, Some(&model.backend))
        }
        None => {
            let model = Model::load(
                &args.model,
                &LoadOptions {
                    dtype: Some(dtype),
                    threads: args.threads,
                },
            )
            .map_err(|e| e.to_string())?;
            bench(&args, &model, None)
        }
    }
}

/// Token-id prompts from JSON (`{"prompts": [[ids]]}`), or a text file of one prompt per line
/// (tokenized with the model's tokenizer).
fn read_prompts(
    path: &std::path::Path,
    vocab: usize,
    tok: &Tokenizer,
) -> Result<Vec<Vec<u32>>, String> {
    let bytes =
        crate::container::read_input(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8 ({e})", path.display()))?;
    if !text.trim_start().starts_with('{') {
        let out: Vec<Vec<u32>> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| tok.encode(l).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        if out.is_empty() {
            return Err(format!("{}: no prompts", path.display()));
        }
        return Ok(out);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts = v["prompts"]
        .as_array()
        .ok_or_else(|| format!("{}: no `prompts` array", path.display()))?;
    let out: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            p.as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(|x| x.as_u64())
                        .filter(|&x| (x as usize) < vocab)
                        .map(|x| x as u32)
                        .collect::<Vec<u32>>()
                })
                .filter(|ids| !ids.is_empty() && ids.len() == p.as_array().map_or(0, Vec::len))
                .ok_or_else(|| {
                    format!(
                        "{}: a prompt is not a list of token ids < {vocab}",
                        path.display()
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err(format!("{}: no prompts", path.display()));
    }
    Ok(out)
}

/// `--normalize`'s value.
fn normalize(flag: &str) -> Result<Normalize, String> {
    match flag {
        "full" => Ok(Normalize::Full),
        "children" => Ok(Normalize::Children),
        o => Err(format!("--normalize `{o}`: expected full or children")),
    }
}

fn bench<B: Backend>(
    args: &BenchCodesArgs,
    model: &Model<B>,
    gpu: Option<&CudaBackend>,
) -> Result<(), String> {
    let normalize = normalize(&args.normalize)?;
    let tokenizer =
        Tokenizer::from_file(&args.model.join("tokenizer.json")).map_err(|e| e.to_string())?;
    tokenizer
        .check_fits(model.config.vocab_size)
        .map_err(|e| e.to_string())?;
    let eos = *model
        .config
        .eos_token_ids
        .first()
        .ok_or("the model's config names no eos_token_id")?;
    let set = CodeSet::from_file(&args.codes, &tokenizer, eos).map_err(|e| e.to_string())?;
    let trie = Trie::build(&set, model.config.vocab_size, eos).map_err(|e| e.to_string())?;
    let prompts = read_prompts(&args.prompts, model.config.vocab_size, &tokenizer)?;
    let mut stdout_open = true;
    let mut out_file = match &args.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
        ),
        None => None,
    };
    // Found before the bench, not after it.
    if let Some(path) = &args.dump_codes {
        crate::container::check_writable(path)
            .map_err(|e| format!("--dump-codes {}: {e}", path.display()))?;
    }
    let (bandwidth, weight_bytes) = match gpu {
        Some(g) => (
            Some(g.copy_bandwidth().map_err(|e| e.to_string())?),
            Some(g.weight_bytes()),
        ),
        None => (None, None),
    };
    let machine = json!({
        "device": gpu.map_or_else(|| format!("cpu ({} threads)", model.threads()), |g| g.device_name().to_string()),
        "backend": model.backend.name(),
        "copy_bandwidth_gbs": bandwidth.map(|b| b / 1e9),
        "weight_bytes": weight_bytes,
        "model": args.model.display().to_string(),
        "codes": set.len(),
        "prompt_tokens": prompts[0].len(),
        // The batch-shape settings the backend asks of beam search (docs/PERF.md).
        "stable_beam_rows": model.backend.stable_beam_rows(),
        "hold_finished_rows": model.backend.hold_finished_rows(),
    });
    let started = Instant::now();
    let mut skipped = Vec::new();
    let mut ran_one = false;
    let mut cursor = 0usize;
    for &beam in &args.beam {
        for &batch in &args.batch {
            // The first configuration always runs: a budget skips later ones only.
            let first = !ran_one;
            ran_one = true;
            if !first && started.elapsed().as_secs_f64() > args.budget_s {
                skipped.push(json!({"beam": beam, "batch": batch}));
                continue;
            }
            let options = BeamOptions {
                beam,
                max_new_tokens: args.max_new_tokens,
                normalize,
                ..Default::default()
            };
            let mut next_batch = || -> Vec<Query> {
                (0..batch)
                    .map(|_| {
                        let p = prompts[cursor % prompts.len()].clone();
                        cursor += 1;
                        Query { prompt: p, options }
                    })
                    .collect()
            };
            let mut search = BeamSearch::new();
            let stats0 = gpu.map(|g| g.graph_stats());
            for _ in 0..args.warmup {
                search
                    .run(model, &trie, &next_batch())
                    .map_err(|e| e.to_string())?;
            }
            let timed0 = gpu.map(|g| g.graph_stats());
            let (mut lat, mut steps, mut rows, mut codes) =
                (Vec::new(), Vec::new(), 0usize, 0usize);
            let t_config = Instant::now();
            while lat.len() < args.reps
                && (lat.is_empty() || t_config.elapsed().as_secs_f64() < args.config_s)
            {
                let qs = next_batch();
                let t0 = Instant::now();
                let outs = search.run(model, &trie, &qs).map_err(|e| e.to_string())?;
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                steps.push(outs.iter().map(|o| o.steps).max().unwrap_or(0));
                rows += outs.iter().map(|o| o.rows).sum::<usize>();
                codes += outs.iter().map(|o| o.codes.len()).sum::<usize>();
            }
            let graphs = match (gpu, stats0, timed0) {
                (Some(g), Some(s0), Some(t0)) => {
                    // Counts over warm-up and timed batches; host times per timed batch.
                    let now = g.graph_stats();
                    let s = now.since(&s0);
                    let t = now.since(&t0);
                    let per_batch = |ns: u64| ns as f64 / 1e6 / lat.len().max(1) as f64;
                    Some(json!({
                        "captured": s.captured,
                        "replayed": s.replayed,
                        "direct": s.direct,
                        "unplanned": s.unplanned,
                        "host_plan_ms_per_batch": per_batch(t.plan_ns),
                        "host_walk_ms_per_batch": per_batch(t.walk_ns),
                        "wait_ms_per_batch": per_batch(t.wait_ns),
                        "host_instantiate_ms_per_batch": per_batch(t.instantiate_ns),
                    }))
                }
                _ => None,
            };
            // Profiles: (1) graphs off, the stream drained around every op: each op's own
            // launch + GPU time; (2) graphs on as timed: the GPU time of each replayed pass
            // ("graph") and of the head's ops, against the batch's wall time.
            let mut profile = Vec::new();
            let mut profile_graphs = Vec::new();
            let mut profiled_wall = None;
            let mut profiled_graphs_wall = None;
            if let (true, Some(g)) = (args.profile, gpu) {
                let report = |g: &CudaBackend| -> Result<Vec<Value>, String> {
                    Ok(g.profile_report()
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .map(|(op, calls, ms)| json!({"op": op, "calls": calls, "ms": ms}))
                        .collect())
                };
                g.synchronize().map_err(|e| e.to_string())?;
                g.set_graphs(false);
                g.set_profiling(true, true);
                let t0 = Instant::now();
                let outs = search.run(model, &trie, &next_batch());
                profiled_wall = Some(t0.elapsed().as_secs_f64() * 1e3);
                g.set_profiling(false, false);
                g.set_graphs(!args.eager);
                outs.map_err(|e| e.to_string())?;
                profile = report(g)?;
                if !args.eager {
                    // Twice: the first may capture graphs for the new prompts' shapes.
                    for rep in 0..2 {
                        let qs = next_batch();
                        g.synchronize().map_err(|e| e.to_string())?;
                        g.set_profiling(rep == 1, false);
                        let t0 = Instant::now();
                        let outs = search.run(model, &trie, &qs);
                        g.synchronize().map_err(|e| e.to_string())?;
                        profiled_graphs_wall = Some(t0.elapsed().as_secs_f64() * 1e3);
                        g.set_profiling(false, false);
                        outs.map_err(|e| e.to_string())?;
                    }
                    profile_graphs = report(g)?;
                }
            }
            let pct = crate::loadgen::Percentiles::of(&lat);
            let p50 = pct.p50;
            let mean_steps = steps.iter().sum::<usize>() as f64 / steps.len().max(1) as f64;
            let floor_ms = match (bandwidth, weight_bytes) {
                (Some(bw), Some(wb)) => Some(mean_steps * wb as f64 / bw * 1e3),
                _ => None,
            };
            let rec = json!({
                "kind": "bench-codes",
                "machine": machine,
                "beam": beam,
                "batch": batch,
                "max_new_tokens": args.max_new_tokens,
                "normalize": args.normalize,
                "reps": lat.len(),
                "latency_ms": lat,
                "p50_ms": p50,
                "p99_ms": pct.p99,
                "qps": batch as f64 / (p50 / 1e3),
                "steps_mean": mean_steps,
                "rows_per_batch": rows as f64 / lat.len() as f64,
                "codes_per_query": codes as f64 / (lat.len() * batch) as f64,
                "floor_ms": floor_ms,
                "over_floor": floor_ms.map(|f| p50 / f),
                "graphs": graphs,
                "eager": args.eager,
                "profiled_wall_ms": profiled_wall,
                "profile": profile,
                "profiled_graphs_wall_ms": profiled_graphs_wall,
                "profile_graphs": profile_graphs,
            });
            print_line(&rec, &mut stdout_open)?;
            if let Some(f) = out_file.as_mut() {
                writeln!(f, "{rec}").map_err(|e| e.to_string())?;
            }
        }
    }
    if !skipped.is_empty() {
        let rec =
            json!({"kind": "bench-codes-skipped", "budget_s": args.budget_s, "skipped": skipped});
        print_line(&rec, &mut stdout_open)?;
        if let Some(f) = out_file.as_mut() {
            writeln!(f, "{rec}").map_err(|e| e.to_string())?;
        }
    }
    if let Some(path) = &args.dump_codes {
        let options = BeamOptions {
            beam: 10,
            max_new_tokens: args.max_new_tokens,
            normalize,
            ..Default::default()
        };
        let mut search = BeamSearch::new();
        let mut dump = Vec::new();
        for (i, p) in prompts.iter().take(4).enumerate() {
            let outs = search
                .run(
                    model,
                    &trie,
                    &[Query {
                        prompt: p.clone(),
                        options,
                    }],
                )
                .map_err(|e| e.to_string())?;
            let codes: Vec<Value> = outs[0]
                .codes
                .iter()
                .map(|c| {
                    json!({
                        "code": c.code.map(|id| set.texts[id as usize].clone()),
                        "score": c.score,
                        "token_logprobs": c.token_logprobs,
                    })
                })
                .collect();
            dump.push(json!({"prompt_index": i, "codes": codes}));
        }
        let text =
            serde_json::to_string_pretty(&json!({"backend": model.backend.name(), "cases": dump}))
                .map_err(|e| e.to_string())?;
        crate::container::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("--dump-codes {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{run, BenchCodesArgs};

    fn args(flags: &[&str]) -> BenchCodesArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchCodesArgs,
        }
        let mut argv = vec![
            "bench-codes",
            "--model",
            "/nonexistent",
            "--codes",
            "c.txt",
            "--prompts",
            "p.txt",
        ];
        argv.extend_from_slice(flags);
        <Cli as clap::Parser>::parse_from(argv).bench
    }

    /// Each bad number is refused by its flag before any model is opened (the model path does
    /// not exist: reaching it would be another error).
    #[test]
    fn bad_numbers_are_refused_by_their_flag() {
        for (flags, want) in [
            (&["--reps", "0"][..], "--reps must be at least 1"),
            (&["--config-s", "NaN"][..], "--config-s NaN"),
            (&["--budget-s=-1"][..], "--budget-s -1"),
            (&["--budget-s", "inf"][..], "--budget-s inf"),
            (&["--dtype", "int3"][..], "expected f32, f16 or bf16"),
            (&["--batch", "0"][..], "--batch 0: expected 1..=256"),
            (
                &["--batch", "1000000000000000000"][..],
                "--batch 1000000000000000000",
            ),
            (&["--batch", "1", "--batch", "257"][..], "--batch 257"),
            (&["--beam", "0"][..], "--beam"),
            // Checked before the model (here: a directory that does not exist) loads.
            (
                &["--max-new-tokens", "0"][..],
                "max_new_tokens 0 is out of range",
            ),
            (&["--max-new-tokens", "257"][..], "max_new_tokens 257"),
            (&["--normalize", "x"][..], "--normalize `x`"),
            (&["--threads", "0"][..], "--threads 0: expected 1..=1024"),
        ] {
            let e = run(args(flags)).unwrap_err();
            assert!(e.contains(want), "{flags:?}: {e}");
        }
    }

    /// A budget of 0 s runs the first configuration and skips (and lists) the later ones: it
    /// used to skip every one and exit 0 having measured nothing. An unwritable `--dump-codes`
    /// is refused before the bench, not after it.
    #[test]
    fn a_spent_budget_still_runs_the_first_configuration() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("gram-bench-codes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (codes, prompts, out) = (
            dir.join("codes.txt"),
            dir.join("prompts.txt"),
            dir.join("out.jsonl"),
        );
        std::fs::write(&codes, "desk\nwool rug\noak desk\n").unwrap();
        std::fs::write(&prompts, "oak\nrug\n").unwrap();
        let model = root.join("models/tiny-llama");
        let mut argv = vec![
            "bench-codes".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--codes".into(),
            codes.to_str().unwrap().into(),
            "--prompts".into(),
            prompts.to_str().unwrap().into(),
            "--device".into(),
            "cpu".into(),
            "--dtype".into(),
            "f32".into(),
            "--threads".into(),
            "1".into(),
            "--reps".into(),
            "1".into(),
            "--warmup".into(),
            "0".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        for flag in ["--beam", "2", "--beam", "3", "--budget-s", "0"] {
            argv.push(flag.into());
        }
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchCodesArgs,
        }
        let parse = |extra: &[&str]| {
            let mut a = argv.clone();
            a.extend(extra.iter().map(|s| s.to_string()));
            <Cli as clap::Parser>::parse_from(a).bench
        };
        let no_dir = dir.join("no-such-dir/codes.json");
        let e = run(parse(&["--dump-codes", no_dir.to_str().unwrap()])).unwrap_err();
        assert!(e.contains("--dump-codes"), "{e}");
        assert!(!out.exists() || std::fs::read_to_string(&out).unwrap().is_empty());
        run(parse(&[])).unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["bench-codes", "bench-codes-skipped"], "{lines:?}");
        assert_eq!(lines[0]["beam"], 2);
        assert_eq!(lines[1]["skipped"][0]["beam"], 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
