//! The forward pass against HF transformers' golden outputs (tools/hf_oracle.py) for the five
//! tiny random-weight checkpoints: Llama (f32, one file, BOS added), Llama with every bias
//! (`attention_bias`: q/k/v/o; `mlp_bias`: gate/up/down), Llama with `llama3` rope scaling,
//! Qwen2 (f32, sharded, qkv bias, tied embeddings) and Qwen3 (bf16, q/k norm, explicit
//! head_dim). Every logit is checked, on every
//! SIMD path this machine has.

mod common;

use common::*;
use gram::backend::cpu::simd::Isa;
use gram::backend::cpu::CpuBackend;
use gram::tensor::DType;
use gram::{lm, LoadOptions, Model, Tokenizer};

const MODELS: [&str; 5] = [
    "tiny-llama",
    "tiny-llama-bias",
    "tiny-llama-rope",
    "tiny-qwen2",
    "tiny-qwen3",
];

#[test]
fn logits_and_greedy_match_transformers() {
    for name in MODELS {
        let g = golden(&format!("{name}.json"));
        let dir = model_dir(name);
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        // The budget transformers generated with, not the golden's length: a continuation that
        // stopped at EOS early is only matched by an engine that stops there too.
        let budget = g["greedy_max_new_tokens"].as_u64().unwrap() as usize;
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
                let out = lm::run(&model, &ids, budget).unwrap();
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

/// The config's `rms_norm_eps` reaches every norm of the forward pass: every fixture model has
/// the default's 1e-6, so a forward that used its own constant would match every golden. With
/// eps 0.5 the logits move, and back at 1e-6 written out they are the default's bits.
#[test]
fn the_configs_rms_norm_eps_reaches_the_forward_pass() {
    let src = model_dir("tiny-qwen3");
    let tok = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    let ids = tok.encode("green velvet sofa").unwrap();
    let logits = |dir: &std::path::Path| {
        let model = Model::load(dir, &LoadOptions::default()).unwrap();
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        model
            .forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
            .unwrap()
    };
    let base = logits(&src);
    let dir = std::env::temp_dir().join(format!("gram-eps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (eps, moved) in [(0.5, true), (1e-6, false)] {
        config["rms_norm_eps"] = eps.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let other = logits(&dir);
        let diff = base
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(diff > 1e-3, moved, "eps {eps}: largest logit change {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
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
            // With panels (the default) a row's bits do not depend on its batch: checked bit
            // for bit (a tolerance let a last-bit dependence pass); without, within 1e-5.
            let same = |a: &[f32], b: &[f32], what: &str| {
                if gram::backend::cpu::panels_on() {
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(bits(a) == bits(b), "{name} slot {s} {what}: other bits");
                } else {
                    let err = max_rel_err(a, b);
                    assert!(err < 1e-5, "{name} slot {s} {what}: {err:.2e}");
                }
            };
            same(&batched[s * v..(s + 1) * v], &l, "prefill");
            for (step, got) in steps.iter().enumerate() {
                let l = model.forward(&mut solo, &[gr[step]], &[0], &[0]).unwrap();
                same(&got[s * v..(s + 1) * v], &l, &format!("decode step {step}"));
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

/// Rewrites `dir`'s f32 `model.safetensors` as tensors of `dtype`, each f32 value through
/// `convert(shape, value)` into its bytes.
fn rewrite_f32_checkpoint(
    dir: &std::path::Path,
    dtype: safetensors::Dtype,
    convert: impl Fn(&[usize], f32) -> Vec<u8>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let items: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let data = v
                .data()
                .chunks_exact(4)
                .flat_map(|b| convert(v.shape(), f32::from_le_bytes(b.try_into().unwrap())))
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = items
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// What converting at load computes, exactly: the f16 and bf16 kernels on tiny-llama converted
/// at load give the logits of the f32 kernels on the same checkpoint with every matrix rounded
/// to that dtype beforehand (and kept in f32), every logit of every golden prompt within 1e-5
/// (the f32 path itself is transformers' to 1e-4, above): the conversion rounds once, to
/// nearest, and the kernels widen exactly.
#[test]
fn converted_dtypes_compute_the_rounded_model() {
    let g = golden("tiny-llama.json");
    let src = model_dir("tiny-llama");
    let logits = |model: &Model, ids: &[u32]| {
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        model
            .forward(&mut cache, ids, &vec![0; ids.len()], &[ids.len() - 1])
            .unwrap()
    };
    for (dtype, round) in [
        (
            DType::F16,
            (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (DType::BF16, |x: f32| half::bf16::from_f32(x).to_f32()),
    ] {
        let dir = copy_model(&src, &format!("rounded-{dtype:?}"));
        // The matrices rounded, still stored as f32; the 1-D tensors as they are.
        rewrite_f32_checkpoint(&dir, safetensors::Dtype::F32, |shape, x| {
            let x = if shape.len() == 2 { round(x) } else { x };
            x.to_le_bytes().to_vec()
        });
        let rounded = Model::load(&dir, &LoadOptions::default()).unwrap();
        let converted = Model::load(
            &src,
            &LoadOptions {
                dtype: Some(dtype),
                ..Default::default()
            },
        )
        .unwrap();
        for case in g["cases"].as_array().unwrap() {
            let ids = u32s(&case["ids"]);
            let (want, got) = (logits(&rounded, &ids), logits(&converted, &ids));
            assert_eq!(want.len(), got.len());
            let err = max_rel_err(&got, &want);
            assert!(err < 1e-5, "{dtype:?} {ids:?}: {err:.2e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A checkpoint stored in f16 (every tensor of tiny-llama rewritten as f16 safetensors, as HF
/// saves a `torch_dtype: float16` model): the checkpoint's tensors are mapped, not copied
/// (`Source::load`'s map; the CPU backend then lays the matrices out in panels), and its logits
/// are close to the f32 checkpoint's converted to f16 at load, and within f16's rounding of
/// transformers' f32 golden.
#[test]
fn an_f16_checkpoint_is_mapped_and_matches_transformers_within_f16() {
    use safetensors::tensor::Dtype;
    let dir = copy_model(&model_dir("tiny-llama"), "f16-stored");
    rewrite_f32_checkpoint(&dir, Dtype::F16, |_, x| {
        half::f16::from_f32(x).to_le_bytes().to_vec()
    });

    let config = Model::load(&dir, &LoadOptions::default()).unwrap().config;
    let map = gram::model::checkpoint::Source::find(&dir)
        .unwrap()
        .load(&config)
        .unwrap();
    let q = &map["model.layers.0.self_attn.q_proj.weight"];
    assert!(q.is_mapped(), "{q:?}");
    assert_eq!(q.dtype(), DType::F16);

    let g = golden("tiny-llama.json");
    let case = &g["cases"][3];
    let ids = u32s(&case["ids"]);
    let logits = |m: &Model| {
        let mut cache = m.new_cache(1, ids.len()).unwrap();
        m.forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
            .unwrap()
    };
    let stored = logits(&Model::load(&dir, &LoadOptions::default()).unwrap());
    let converted = logits(
        &Model::load(
            &model_dir("tiny-llama"),
            &LoadOptions {
                dtype: Some(DType::F16),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    // Not bit for bit: the stored checkpoint's norm weights are f16 too, where a conversion at
    // load keeps the 1-D tensors in f32.
    let err = max_rel_err(&stored, &converted);
    assert!(err < 1e-2, "stored f16 against converted f16: {err:.2e}");
    assert!(err > 0.0, "the norms differ, so the logits must");
    let err = max_rel_err(&stored, &f32s(&case["logits"]));
    assert!(err < 1e-2, "against transformers in f32: {err:.2e}");
    std::fs::remove_dir_all(&dir).unwrap();
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
