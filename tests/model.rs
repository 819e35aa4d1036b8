//! The forward pass against HF transformers' golden outputs (tools/hf_oracle.py) for the three
//! tiny random-weight checkpoints: Llama (f32, one file, BOS added), Qwen2 (f32, sharded, qkv
//! bias, tied embeddings) and Qwen3 (bf16, q/k norm, explicit head_dim). Every logit is checked,
//! on every SIMD path this machine has.

mod common;

use common::*;
use gram::backend::cpu::simd::Isa;
use gram::backend::cpu::CpuBackend;
use gram::tensor::DType;
use gram::{lm, LoadOptions, Model, Tokenizer};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

#[test]
fn logits_and_greedy_match_transformers() {
    for name in MODELS {
        let g = golden(&format!("{name}.json"));
        let dir = model_dir(name);
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        for isa in Isa::available() {
            let model = Model::load_on(
                CpuBackend {
                    isa,
                    ..CpuBackend::default()
                },
                &dir,
                &LoadOptions::default(),
            )
            .unwrap();
            for case in g["cases"].as_array().unwrap() {
                let prompt = case["prompt"].as_str().unwrap();
                let ids = tok.encode(prompt).unwrap();
                assert_eq!(ids, u32s(&case["ids"]), "{name}: ids of {prompt:?}");
                let mut cache = model.new_cache(1, ids.len()).unwrap();
                let logits = model
                    .forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
                    .unwrap();
                let want = f32s(&case["logits"]);
                let err = max_rel_err(&logits, &want);
                assert!(
                    err < 1e-4,
                    "{name} {isa:?} {prompt:?}: max rel err {err:.2e}"
                );
                let greedy_want = u32s(&case["greedy_ids"]);
                let out = lm::run(&model, &ids, greedy_want.len()).unwrap();
                assert_eq!(
                    out.greedy, greedy_want,
                    "{name} {isa:?} {prompt:?}: greedy ids"
                );
                assert_eq!(
                    tok.decode(&out.greedy).unwrap(),
                    case["greedy_text"].as_str().unwrap()
                );
            }
        }
    }
}

/// Many sequences in one call (a mixed prefill batch, then one decode row per sequence) give
/// the same logits as each sequence alone: rows never see another slot's KV.
#[test]
fn batched_rows_equal_single_rows() {
    for name in MODELS {
        let g = golden(&format!("{name}.json"));
        let model = Model::load(&model_dir(name), &LoadOptions::default()).unwrap();
        let cases: Vec<(Vec<u32>, Vec<u32>)> = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (u32s(&c["ids"]), u32s(&c["greedy_ids"])))
            .collect();
        let n = cases.len();
        let cap = cases.iter().map(|(p, _)| p.len() + 4).max().unwrap();
        let mut cache = model.new_cache(n, cap).unwrap();
        // One prefill call holding every prompt, rows interleaved by slot.
        let (mut tokens, mut slots, mut last) = (Vec::new(), Vec::new(), vec![0; n]);
        let longest = cases.iter().map(|(p, _)| p.len()).max().unwrap();
        for i in 0..longest {
            for (s, (p, _)) in cases.iter().enumerate() {
                if i < p.len() {
                    last[s] = tokens.len();
                    tokens.push(p[i]);
                    slots.push(s);
                }
            }
        }
        let v = model.config.vocab_size;
        let batched = model.forward(&mut cache, &tokens, &slots, &last).unwrap();
        // Then three decode steps, one row per sequence, feeding the golden greedy tokens.
        let mut steps = Vec::new();
        for step in 0..3 {
            let toks: Vec<u32> = cases.iter().map(|(_, gr)| gr[step]).collect();
            let slots: Vec<usize> = (0..n).collect();
            steps.push(model.forward(&mut cache, &toks, &slots, &slots).unwrap());
        }
        for (s, (p, gr)) in cases.iter().enumerate() {
            let mut solo = model.new_cache(1, cap).unwrap();
            let l = model
                .forward(&mut solo, p, &vec![0; p.len()], &[p.len() - 1])
                .unwrap();
            let err = max_rel_err(&batched[s * v..(s + 1) * v], &l);
            assert!(err < 1e-5, "{name} slot {s} prefill: {err:.2e}");
            for (step, got) in steps.iter().enumerate() {
                let l = model.forward(&mut solo, &[gr[step]], &[0], &[0]).unwrap();
                let err = max_rel_err(&got[s * v..(s + 1) * v], &l);
                assert!(err < 1e-5, "{name} slot {s} decode step {step}: {err:.2e}");
            }
        }
    }
}

/// Converting weights at load (`--dtype`) runs the f16/bf16 kernels on a checkpoint stored in
/// f32; results stay close to the f32 golden (the weights were rounded, so not to 1e-4).
#[test]
fn converted_dtypes_stay_close() {
    let g = golden("tiny-llama.json");
    let case = &g["cases"][3];
    let ids = u32s(&case["ids"]);
    let want = f32s(&case["logits"]);
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let model = Model::load(
            &model_dir("tiny-llama"),
            &LoadOptions {
                dtype: Some(dtype),
                ..Default::default()
            },
        )
        .unwrap();
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let logits = model
            .forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
            .unwrap();
        let err = max_rel_err(&logits, &want);
        let tol = match dtype {
            DType::F16 => 1e-2,
            DType::BF16 => 5e-2,
            _ => 1e-4,
        };
        assert!(err < tol, "{dtype:?}: {err:.2e}");
    }
}

#[test]
fn weights_are_read_in_place_when_the_dtype_allows() {
    // f32 and bf16 safetensors are mapped, not copied (no conversion asked for).
    for name in ["tiny-llama", "tiny-qwen3"] {
        let map = gram::model::checkpoint::Source::find(&model_dir(name))
            .unwrap()
            .load(
                &Model::load(&model_dir(name), &LoadOptions::default())
                    .unwrap()
                    .config,
            )
            .unwrap();
        let q = &map["model.layers.0.self_attn.q_proj.weight"];
        assert!(q.is_mapped(), "{name}: {q:?}");
    }
}
