//! The device beam step's GPU time per decode step (kernels/beam_step.cu through
//! `cuda::beam_step::DeviceBeams`): full normalization's `row_logsumexp_f32` over every slot's
//! logits row, then `beam_select_f32` and `beam_feed`, timed with CUDA events, for batches of
//! 1, 16 and 64 queries at beam 10 and 64 on the default model's trie (25,786 codes) with
//! logits rows as wide as SmolLM2's vocabulary (49,152; the trie's tokens are the default
//! model's 4,096, so its root has the same children). Random logits, a fresh search per
//! repetition, every step until no query runs (steps run on, as the device would run them:
//! a finished query's blocks exit at once). Prints one JSON line per configuration: the first
//! step (the root: thousands of candidates), the mean over the steps a query still ran, and
//! the selection alone (the normalizers given). Without a GPU it says so and exits 0.
//!
//! cargo bench --bench beam_step_gpu [-- --reps N]   (GRAM_REPO=<repo> for a binary run elsewhere)

use gram::backend::cuda::beam_step::DeviceBeams;
use gram::backend::cuda::CudaBackend;
use gram::beam::{BeamOptions, Normalize};
use gram::trie::{CodeSet, Trie};
use gram::{Model, Tokenizer};

const VOCAB: usize = 49152;

fn main() {
    let reps: usize = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let gpu = match CudaBackend::new(0, false) {
        Ok(g) => g,
        Err(e) => {
            if std::env::var("GRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                eprintln!("beam_step_gpu: GRAM_REQUIRE_GPU=1 but no usable GPU ({e})");
                std::process::exit(1);
            }
            println!("beam_step_gpu: skipped, no usable GPU ({e})");
            return;
        }
    };
    // GRAM_REPO: where the repository is when the binary runs elsewhere (a GPU machine).
    let repo = std::env::var("GRAM_REPO").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let dir = std::path::Path::new(&repo).join("models/gram-icecat-2m");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let eos = model.config.eos_token_ids[0];
    let texts: Vec<String> = std::fs::read_to_string(dir.join("codes.txt"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let set = CodeSet::from_texts(texts, &tok, eos).unwrap();
    let trie = Trie::build(&set, VOCAB, eos).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for (queries, beam) in [(1, 10), (16, 10), (64, 10), (1, 64), (16, 64), (64, 64)] {
        let options = vec![
            BeamOptions {
                beam,
                normalize: Normalize::Full,
                ..Default::default()
            };
            queries
        ];
        let prompts = vec![32u32; queries];
        let rows = queries * beam;
        let host: Vec<f32> = (0..rows * VOCAB)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
            })
            .collect();
        let (mut first, mut active, mut select_only) = (Vec::new(), Vec::new(), Vec::new());
        let mut steps_run = 0;
        for rep in 0..reps + 1 {
            for given_lse in [false, true] {
                let mut d = DeviceBeams::new(&gpu, &trie, VOCAB, &options, &prompts).unwrap();
                let logits = d.upload(&host).unwrap();
                let lse = d.row_logsumexp(&logits).unwrap();
                let lse = d.upload(&lse).unwrap();
                for s in 0..16 {
                    if !d.states().unwrap().iter().any(|st| st.active()) {
                        break;
                    }
                    let ms = d.timed_step(&logits, given_lse.then_some(&lse)).unwrap();
                    if rep == 0 {
                        continue; // warm-up
                    }
                    match (given_lse, s) {
                        (true, _) => select_only.push(ms),
                        (false, 0) => first.push(ms),
                        (false, _) => active.push(ms),
                    }
                    steps_run += !given_lse as usize;
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "{{\"bench\":\"beam_step_gpu\",\"device\":{:?},\"vocab\":{VOCAB},\"queries\":{queries},\"beam\":{beam},\"reps\":{reps},\"steps_mean\":{:.1},\"first_step_us\":{:.1},\"later_step_us\":{:.1},\"select_feed_only_us\":{:.1}}}",
            gpu.device_name(),
            steps_run as f64 / reps as f64,
            1e3 * mean(&first),
            1e3 * mean(&active),
            1e3 * mean(&select_only),
        );
    }
}
