//! Whole-forward throughput of gram on a real model, measured exactly like
//! `tools/bench_peers.py` measures llama.cpp and PyTorch (same prompt text, same three shapes,
//! same JSON "result" records), so `tools/bench_peers.py --markdown` puts them side by side:
//!
//! - prefill: one forward over the first P tokens (default 32) of the fixed prompt, logits of
//!   the last row only;
//! - decode_b1: S single-token greedy steps after the prompt (default 64);
//! - decode_b10: B sequences (default 10) that start from the prompt's top-B next tokens, then S
//!   steps of B rows per forward, greedy per row; tok/s = B·S / time.
//!
//! cargo bench --bench lm_throughput -- --model models/smollm2-135m-instruct --threads 2 --dtype f32

use std::path::PathBuf;
use std::time::Instant;

use gram::tensor::DType;
use gram::{lm, LoadOptions, Model, Tokenizer};
use serde_json::json;

const PROMPT_TEXT: &str =
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg \
developed a system of movable metal type in Mainz. His press combined several existing \
technologies into a practical method for producing books quickly and cheaply, which changed \
how knowledge spread across Europe.";
const CHECK_PROMPT: &str = "The capital of France is";

struct Args {
    model: PathBuf,
    threads: usize,
    /// `None`: as stored (a GGUF's Q4_1/Q8_0 read in place).
    dtypes: Vec<Option<DType>>,
    prompt_len: usize,
    steps: usize,
    batch: usize,
    warmup: usize,
    reps: usize,
    /// Run only this measurement (prefill, b1, bn; another name is refused): for profiling. The
    /// others do not run and print as null.
    only: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: PathBuf::from("models/smollm2-135m-instruct"),
        threads: 2,
        dtypes: Vec::new(),
        prompt_len: 32,
        steps: 64,
        batch: 10,
        warmup: 1,
        reps: 3,
        only: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--model" => a.model = PathBuf::from(val()),
            "--threads" => a.threads = val().parse().expect("--threads N"),
            "--dtype" if val() == "stored" => a.dtypes.push(None),
            "--dtype" => a.dtypes.push(Some(
                DType::parse(&val()).expect("--dtype f32|f16|bf16|stored"),
            )),
            "--prompt-len" => a.prompt_len = val().parse().expect("--prompt-len N"),
            "--steps" => a.steps = val().parse().expect("--steps N"),
            "--batch" => a.batch = val().parse().expect("--batch N"),
            "--warmup" => a.warmup = val().parse().expect("--warmup N"),
            "--reps" => a.reps = val().parse().expect("--reps N"),
            "--only" => {
                let v = val();
                assert!(
                    ["prefill", "b1", "bn"].contains(&v.as_str()),
                    "--only prefill|b1|bn, not {v:?}"
                );
                a.only = Some(v)
            }
            // cargo bench passes --bench; ignore flags that are not ours.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    if a.dtypes.is_empty() {
        a.dtypes = vec![Some(DType::F32), Some(DType::BF16)];
    }
    a
}

fn summarize(samples: &[f64], n_tokens: usize) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::Value::Null;
    }
    // Medians as `statistics.median` takes them (the peers' script, over tok/s): the mean of
    // the two middle values of an even count.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        (v[(n - 1) / 2] + v[n / 2]) / 2.0
    };
    let tps: Vec<f64> = samples.iter().map(|s| n_tokens as f64 / s).collect();
    let best = tps.iter().copied().fold(f64::MIN, f64::max);
    json!({
        "tok_s_best": best,
        "tok_s_median": median(tps),
        "ms_median": median(samples.to_vec()) * 1e3,
        "n_tokens": n_tokens,
        "runs_s": samples,
    })
}

fn measure(warmup: usize, reps: usize, mut f: impl FnMut() -> f64) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    (0..reps).map(|_| f()).collect()
}

fn main() {
    let args = parse_args();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .unwrap();
    let tok = Tokenizer::from_file(&args.model.join("tokenizer.json")).unwrap();
    let prompt: Vec<u32> = tok.encode_plain(PROMPT_TEXT).unwrap()[..args.prompt_len].to_vec();
    let (p, s, b) = (args.prompt_len, args.steps, args.batch);
    println!(
        "{}",
        json!({"kind": "machine", "peer": "gram", "isa": format!("{:?}", gram::backend::cpu::simd::Isa::detect()), "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)})
    );
    for &dtype in &args.dtypes {
        let dtype_name = dtype.map_or("stored", DType::name);
        let t0 = Instant::now();
        let options = LoadOptions {
            dtype,
            threads: Some(args.threads),
        };
        let model = Model::load(&args.model, &options).unwrap();
        eprintln!(
            "[gram] {} loaded in {:.2}s",
            dtype_name,
            t0.elapsed().as_secs_f64()
        );
        let v = model.config.vocab_size;
        let all = |n: usize| vec![0usize; n];

        // `--only`: the other measurements do not run at all (their results are null).
        let skip = |name: &str| args.only.as_deref().is_some_and(|o| o != name);
        let runs = |name: &str| {
            if skip(name) {
                (0, 0)
            } else {
                (args.warmup, args.reps)
            }
        };
        let (w, r) = runs("prefill");
        let prefill = measure(w, r, || {
            let mut cache = model.new_cache(1, p).unwrap();
            let t = Instant::now();
            model
                .forward(&mut cache, &prompt, &all(p), &[p - 1])
                .unwrap();
            t.elapsed().as_secs_f64()
        });
        let (w, r) = runs("b1");
        let decode_b1 = measure(w, r, || {
            let mut cache = model.new_cache(1, p + s).unwrap();
            let logits = model
                .forward(&mut cache, &prompt, &all(p), &[p - 1])
                .unwrap();
            let mut next = lm::argmax(&logits);
            let t = Instant::now();
            for _ in 0..s {
                next = lm::argmax(&model.forward(&mut cache, &[next], &[0], &[0]).unwrap());
            }
            t.elapsed().as_secs_f64()
        });
        let (w, r) = runs("bn");
        let decode_bn = measure(w, r, || {
            let mut cache = model.new_cache(b, p + s).unwrap();
            let mut first = Vec::new();
            for slot in 0..b {
                first = model
                    .forward(&mut cache, &prompt, &vec![slot; p], &[p - 1])
                    .unwrap();
            }
            let mut toks: Vec<u32> = lm::top_n(&lm::log_softmax(&first), b)
                .iter()
                .map(|t| t.id)
                .collect();
            let slots: Vec<usize> = (0..b).collect();
            let t = Instant::now();
            for _ in 0..s {
                let logits = model.forward(&mut cache, &toks, &slots, &slots).unwrap();
                toks = (0..b)
                    .map(|r| lm::argmax(&logits[r * v..(r + 1) * v]))
                    .collect();
            }
            t.elapsed().as_secs_f64()
        });
        let check_ids = tok.encode(CHECK_PROMPT).unwrap();
        let check = lm::run(&model, &check_ids, 16).unwrap();
        let mut res = json!({
            "kind": "result", "peer": "gram", "dtype": dtype_name, "model": args.model,
            "threads": args.threads, "prompt_len": p, "steps": s, "batch": b,
            "warmup": args.warmup, "reps": args.reps,
            "greedy_check": {"prompt": CHECK_PROMPT, "tokens": check.greedy, "text": tok.decode(&check.greedy).unwrap()},
            "prefill": summarize(&prefill, p),
            "decode_b1": summarize(&decode_b1, s),
        });
        res[format!("decode_b{b}")] = summarize(&decode_bn, b * s);
        println!("{res}");
    }
}
