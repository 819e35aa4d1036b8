//! Beam search against transformers: `generate(num_beams=B, num_return_sequences=B,
//! length_penalty=P, max_new_tokens=M, prefix_allowed_tokens_fn=trie)` golden outputs from
//! `tools/beam_oracle.py` (see tools/FIXTURES.md) on the three tiny models and SmolLM2-135M.
//! Same codes in the same order, scores and per-token log-probs within 2e-4 for SmolLM2 (issue
//! 3 asks 1e-3; the largest difference measured across hosts and ISAs was 6.7e-5, so a bug
//! of a few 1e-4 in the decode steps still fails) and 2e-5 for the tiny f32 models (reruns of
//! the oracle move them by ~2e-6), scores also within a few f32 ulps of their size. All cases
//! of a model run as one batch (different beams, lengths and penalties sharing decoder steps).

mod common;

use common::*;
use gram::beam::{self, BeamOptions, Normalize, Query};
use gram::trie::{CodeSet, Trie};
use gram::{Model, Tokenizer};

fn check(fixture: &str, dir: &std::path::Path, tol: f64) {
    let g = golden(fixture);
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(dir, &Default::default()).unwrap();
    let eos = model.config.eos_token_ids[0];
    assert_eq!(g["eos"].as_u64(), Some(eos as u64), "{fixture}: EOS");
    let codes = repo().join(g["codes_file"].as_str().unwrap());
    let set = CodeSet::from_file(&codes, &tok, eos).unwrap();
    let trie = Trie::build(&set, model.config.vocab_size, eos).unwrap();
    let cases = g["cases"].as_array().unwrap();
    let queries: Vec<Query> = cases
        .iter()
        .map(|c| {
            let prompt = tok.encode(c["prompt"].as_str().unwrap()).unwrap();
            assert_eq!(prompt, u32s(&c["prompt_tokens"]), "{fixture}: prompt ids");
            Query {
                prompt,
                options: BeamOptions {
                    beam: c["beam"].as_u64().unwrap() as usize,
                    max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
                    length_penalty: c["length_penalty"].as_f64().unwrap(),
                    normalize: Normalize::Full,
                    constrained: true,
                },
            }
        })
        .collect();
    let outs = beam::search(&model, &trie, &queries).unwrap();
    assert_eq!(outs.len(), cases.len(), "{fixture}: one answer per query");
    for (case, out) in cases.iter().zip(&outs) {
        let ctx = format!(
            "{fixture} {:?} beam {}",
            case["prompt"].as_str().unwrap(),
            case["beam"]
        );
        let want = case["codes"].as_array().unwrap();
        let got: Vec<&str> = out
            .codes
            .iter()
            .map(|c| set.texts[c.code.unwrap() as usize].as_str())
            .collect();
        let want_codes: Vec<&str> = want.iter().map(|w| w["code"].as_str().unwrap()).collect();
        assert_eq!(got, want_codes, "{ctx}: codes and their order");
        for (c, w) in out.codes.iter().zip(want) {
            let ws = w["score"].as_f64().unwrap();
            assert!(
                // And a few f32 ulps of the score: a length penalty below 0 multiplies a
                // score (to -1,449 here, where an ulp is 1.2e-4).
                (c.score as f64 - ws).abs() < tol + 4e-7 * ws.abs(),
                "{ctx} {:?}: score {} vs {ws}",
                w["code"],
                c.score
            );
            let wl = f32s(&w["token_logprobs"]);
            assert_eq!(c.token_logprobs.len(), wl.len(), "{ctx}");
            for (a, b) in c.token_logprobs.iter().zip(&wl) {
                assert!(
                    ((a - b).abs() as f64) < tol,
                    "{ctx} {:?}: {a} vs {b}",
                    w["code"]
                );
            }
        }
    }
}

#[test]
fn tiny_models_match_transformers_beam_search() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        check(&format!("beam-{name}.json"), &model_dir(name), 2e-5);
    }
}

/// Ten codes, each a prefix of the next in its family (`caps` … `caps | puma | red | xl |
/// cotton`): nodes that end a code and go on, beams wider than the reachable codes,
/// `max_new_tokens` that cut codes off, length penalties from -1 to 3.
#[test]
fn prefix_codes_match_transformers_beam_search() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        check(&format!("beam-prefix-{name}.json"), &model_dir(name), 2e-5);
    }
}

#[test]
fn smollm2_matches_transformers_beam_search() {
    check("beam-smollm2.json", &smollm2_dir(), 2e-4);
}
