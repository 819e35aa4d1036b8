//! Whole-path beam search on a real model and code set: trie build time, per-query latency
//! (median, p99) at one query per batch, the sparse head's saving, and throughput when 8 and 32
//! queries share decoder steps. Prints JSON records (one per line) that
//! `tools/bench_beam.sh` puts beside transformers + `prefix_allowed_tokens_fn` and the machine's
//! floor.
//!
//! Prompts: real WANDS queries (shared/data/wands-queries) in a fixed template of ~20 tokens;
//! `--print-prompts` prints them (the peer script reads the same list).
//!
//! cargo bench --bench beam_search -- --model models/smollm2-135m-instruct \
//!     --codes bench-out/codes-100k.txt --threads 2 --beam 10 --max-new-tokens 16

use std::path::PathBuf;
use std::time::Instant;

use gram::beam::{BeamOptions, BeamSearch, Normalize, Output, Query};
use gram::tensor::DType;
use gram::trie::{CodeSet, Trie};
use gram::{LoadOptions, Model, Tokenizer};
use serde_json::json;

const TEMPLATE: &str =
    "You are a shopping assistant. Give the product code for this search query. Query: {q} Code:";

struct Args {
    model: PathBuf,
    codes: PathBuf,
    threads: usize,
    beam: usize,
    max_new_tokens: usize,
    queries: usize,
    batches: Vec<usize>,
    print_prompts: bool,
    /// Build the trie, print its record, stop (for the 2.5M-code build timing).
    trie_only: bool,
    /// Convert weights at load (default: as stored, a GGUF's Q4_1 / Q8_0 blocks read in place
    /// and computed on in f32; `--dtype f32` dequantizes them at load, as transformers does).
    dtype: Option<DType>,
    /// Which of `full`, `children`, `full+prefix` to run (default: all three).
    modes: Vec<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: PathBuf::from("models/smollm2-135m-instruct"),
        codes: PathBuf::from("bench-out/codes-100k.txt"),
        threads: 2,
        beam: 10,
        max_new_tokens: 16,
        queries: 20,
        batches: vec![8, 32],
        print_prompts: false,
        trie_only: false,
        dtype: None,
        modes: vec!["full".into(), "children".into(), "full+prefix".into()],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--model" => a.model = PathBuf::from(val()),
            "--codes" => a.codes = PathBuf::from(val()),
            "--threads" => a.threads = val().parse().expect("--threads N"),
            "--beam" => a.beam = val().parse().expect("--beam N"),
            "--max-new-tokens" => a.max_new_tokens = val().parse().expect("--max-new-tokens N"),
            "--dtype" => a.dtype = Some(DType::parse(&val()).expect("--dtype f32|f16|bf16")),
            "--queries" => a.queries = val().parse().expect("--queries N"),
            "--batches" => {
                a.batches = val()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().expect("--batches 8,32"))
                    .collect()
            }
            "--modes" => a.modes = val().split(',').map(str::to_string).collect(),
            "--print-prompts" => {
                a.print_prompts = true;
                i += 1;
                continue;
            }
            "--trie-only" => {
                a.trie_only = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// The first `n` WANDS queries (every 7th, for variety) in the template.
fn prompts(n: usize) -> Vec<String> {
    // `GRAM_SHARED_DATA`, as tools/get_smollm2.sh reads it, else `../shared/data`.
    let shared = std::env::var_os("GRAM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let path = shared.join("wands-queries/query.csv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(1))
        .step_by(7)
        .take(n)
        .map(|q| TEMPLATE.replace("{q}", q))
        .collect()
}

/// The median as `statistics.median` takes it (the mean of the two middle values of an even
/// count), which is what `tools/beam_oracle.py` reports for transformers beside it.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

/// The nearest-rank `q` quantile, as `tools/beam_oracle.py` and `gram bench` take it.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
}

/// FLOPs of one decoder row without the LM head (matmuls + attention over `ctx` entries).
fn row_flops(m: &Model, ctx: f64) -> f64 {
    let c = &m.config;
    let (h, q, kv, i) = (
        c.hidden_size as f64,
        c.q_dim() as f64,
        c.kv_dim() as f64,
        c.intermediate_size as f64,
    );
    let per_layer = 2.0 * (h * (q + 2.0 * kv) + q * h + 3.0 * h * i) + 4.0 * ctx * q;
    per_layer * c.num_hidden_layers as f64
}

fn main() {
    let args = parse_args();
    let texts = prompts(args.queries.max(*args.batches.iter().max().unwrap_or(&1)));
    if args.print_prompts {
        for p in texts.iter().take(args.queries) {
            println!("{p}");
        }
        return;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .unwrap();
    let tok = Tokenizer::from_file(&args.model.join("tokenizer.json")).unwrap();
    let model = Model::load(
        &args.model,
        &LoadOptions {
            dtype: args.dtype,
            threads: Some(args.threads),
        },
    )
    .unwrap();
    let eos = model.config.eos_token_ids[0];

    let t0 = Instant::now();
    let set = CodeSet::from_file(&args.codes, &tok, eos).unwrap();
    let t_tok = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let trie = Trie::build(&set, model.config.vocab_size, eos).unwrap();
    let t_build = t1.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"kind": "trie", "codes": set.len(), "tokens": set.tokens.len(),
               "tokenize_s": t_tok, "build_s": t_build, "nodes": trie.num_nodes(),
               "bytes": trie.size_bytes(), "max_len": trie.max_len(),
               "root_children": trie.children(Trie::ROOT).0.len(),
               "threads": rayon::current_num_threads()})
    );
    if args.trie_only {
        return;
    }

    let queries: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    // Over the queries the batch-1 runs time (the floor stands beside them), not the extra
    // prompts the batches take.
    let timed = &queries[..args.queries.min(queries.len())];
    let mean_prompt = timed.iter().map(Vec::len).sum::<usize>() as f64 / timed.len() as f64;
    let options = |normalize| BeamOptions {
        beam: args.beam,
        max_new_tokens: args.max_new_tokens,
        length_penalty: 1.0,
        normalize,
        constrained: true,
    };
    let head_flops = 2.0 * model.config.hidden_size as f64;
    // The template's head, as a shared prefix: its KV is computed once per searcher.
    let head = tok
        .encode(TEMPLATE.split("{q}").next().unwrap().trim_end())
        .unwrap();
    let sharing = queries.iter().filter(|q| q.starts_with(&head)).count();
    for (normalize, prefix) in [
        (Normalize::Full, false),
        (Normalize::Children, false),
        (Normalize::Full, true),
    ] {
        let name = match (normalize, prefix) {
            (Normalize::Full, false) => "full",
            (Normalize::Children, _) => "children",
            (Normalize::Full, true) => "full+prefix",
        };
        if !args.modes.iter().any(|m| m == name) {
            continue;
        }
        let mut search = BeamSearch::new();
        if prefix {
            search.set_prefix(&model, head.clone()).unwrap();
            eprintln!(
                "[beam] shared prefix of {} tokens; {sharing} of {} prompts start with it",
                head.len(),
                queries.len()
            );
        }
        // Warm-up (arena, page faults, caches).
        let q = |i: usize| Query {
            prompt: queries[i % queries.len()].clone(),
            options: options(normalize),
        };
        search.run(&model, &trie, &[q(0)]).unwrap();
        let mut times = Vec::new();
        let mut outs: Vec<Output> = Vec::new();
        for i in 0..args.queries {
            let t = Instant::now();
            let out = search.run(&model, &trie, &[q(i)]).unwrap();
            times.push(t.elapsed().as_secs_f64());
            outs.extend(out);
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let n = outs.len() as f64;
        let rows = outs.iter().map(|o| o.rows).sum::<usize>() as f64 / n;
        let head = outs.iter().map(|o| o.head_logits).sum::<usize>() as f64 / n;
        let steps = outs.iter().map(|o| o.steps).sum::<usize>() as f64 / n;
        let codes = outs.iter().map(|o| o.codes.len()).sum::<usize>() as f64 / n;
        // Attention context ~ prompt + half the code: small next to the matmuls.
        let flops = rows * row_flops(&model, mean_prompt + 4.0) + head * head_flops;
        println!(
            "{}",
            json!({"kind": "beam", "peer": "gram", "normalize": name, "batch": 1,
                   "dtype": args.dtype.map_or("stored", |d| d.name()),
                   "beam": args.beam, "max_new_tokens": args.max_new_tokens,
                   "threads": args.threads, "queries": args.queries,
                   "prompt_tokens_mean": mean_prompt,
                   "ms_median": median(&sorted) * 1e3,
                   "ms_p99": nearest_rank(&sorted, 0.99) * 1e3,
                   "ms_mean": times.iter().sum::<f64>() / n * 1e3,
                   "rows_mean": rows, "head_logits_mean": head, "steps_mean": steps,
                   "codes_mean": codes, "gflop_mean": flops / 1e9})
        );
        if normalize == Normalize::Full && !prefix {
            // What the trie prevents: the same queries with beams free to go anywhere.
            let (mut returned, mut invalid) = (0, 0);
            for i in 0..args.queries {
                let mut q = q(i);
                q.options.constrained = false;
                let out = search.run(&model, &trie, &[q]).unwrap();
                returned += out[0].codes.len();
                invalid += out[0].invalid;
            }
            println!(
                "{}",
                json!({"kind": "unconstrained", "peer": "gram", "beam": args.beam,
                       "queries": args.queries, "returned": returned, "invalid": invalid,
                       "invalid_rate": invalid as f64 / returned.max(1) as f64})
            );
        }
        for &b in &args.batches {
            let batch: Vec<Query> = (0..b).map(q).collect();
            search.run(&model, &trie, &batch).unwrap();
            let t = Instant::now();
            let outs = search.run(&model, &trie, &batch).unwrap();
            let s = t.elapsed().as_secs_f64();
            let rows: usize = outs.iter().map(|o| o.rows).sum();
            println!(
                "{}",
                json!({"kind": "beam_batch", "peer": "gram", "normalize": name, "batch": b,
                       "beam": args.beam, "threads": args.threads, "s": s, "qps": b as f64 / s,
                       "rows": rows})
            );
        }
    }
}
