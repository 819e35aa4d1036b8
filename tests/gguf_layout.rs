//! A GGUF laid out the way llama.cpp's `convert_hf_to_gguf.py` lays it out gives the logits of
//! the safetensors checkpoint it was made from, for each architecture:
//! - the `llama` converter permutes the q_proj/k_proj rows for its rotary layout, weights and
//!   biases alike;
//! - the `qwen2` and `qwen3` converters permute nothing (llama.cpp runs them with NEOX rope).
//!
//! The files are F32 (exact), written here from the tiny checkpoints in `models/`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use gram::{LoadOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, tail) = rest.split_once('.').unwrap();
    let (part, kind) = tail.rsplit_once('.').unwrap();
    let g = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        p => panic!("{p}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// llama.cpp's LlamaModel.permute: HF row h*D + j*D/2 + i goes to row h*D + 2i + j.
fn permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let d = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let (src, dst) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn gstr(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// Writes `dir/model.gguf` (all F32) from the safetensors checkpoint in `src`, permuting
/// q/k rows (and biases) like llama.cpp's LlamaModel when `llama_permute`.
fn write_gguf(src: &Path, dir: &Path, arch: &str, llama_permute: bool) {
    let model = Model::load(src, &LoadOptions::default()).unwrap();
    let cfg = model.config.clone();
    let map = gram::model::checkpoint::Source::find(src)
        .unwrap()
        .load(&cfg)
        .unwrap();
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for name in names {
        let t = &map[name];
        let mut v = t.to_f32_vec();
        let shape = t.shape().to_vec();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        if llama_permute {
            if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
                v = permute(&v, cfg.num_attention_heads, cols);
            }
            if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
                v = permute(&v, cfg.num_key_value_heads, cols);
            }
        }
        tensors.push((gguf_name(name), shape, v));
    }
    // The hyperparameters llama.cpp's converter writes (u32 counts, f32 floats).
    let counts = [
        ("block_count", cfg.num_hidden_layers),
        ("embedding_length", cfg.hidden_size),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.num_attention_heads),
        ("attention.head_count_kv", cfg.num_key_value_heads),
    ];
    let floats = [
        ("rope.freq_base", cfg.rope_theta),
        ("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
    ];
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((1 + counts.len() as u64 + floats.len() as u64).to_le_bytes());
    gstr(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    gstr(&mut b, arch);
    for (key, n) in counts {
        gstr(&mut b, &format!("{arch}.{key}"));
        b.extend(4u32.to_le_bytes());
        b.extend((n as u32).to_le_bytes());
    }
    for (key, f) in floats {
        gstr(&mut b, &format!("{arch}.{key}"));
        b.extend(6u32.to_le_bytes());
        b.extend(f.to_le_bytes());
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, shape, v) in &tensors {
        gstr(&mut b, name);
        b.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + v.len() as u64 * 4).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    let data_start = b.len();
    for ((_, _, v), off) in tensors.iter().zip(offsets) {
        b.resize(data_start + off as usize, 0);
        for x in v {
            b.extend(x.to_le_bytes());
        }
    }
    std::fs::write(dir.join("model.gguf"), b).unwrap();
}

fn meta_only(src: &Path, name: &str) -> PathBuf {
    let d = fresh_dir(&format!("gguf-layout-{name}"));
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    d
}

fn last_logits(dir: &Path) -> Vec<f32> {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = vec![5, 17, 42, 99, 7, 3, 120, 64];
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    model
        .forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
        .unwrap()
}

fn check(src: &Path, arch: &str, llama_permute: bool, name: &str) {
    let dir = meta_only(src, name);
    write_gguf(src, &dir, arch, llama_permute);
    let want = last_logits(src);
    let got = last_logits(&dir);
    let err = max_rel_err(&got, &want);
    assert!(
        err < 1e-5,
        "{name}: GGUF vs safetensors logits differ, max rel err {err:.3e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_llama_gguf_with_permuted_q_k_matches_safetensors() {
    check(&model_dir("tiny-llama"), "llama", true, "llama");
}

/// Qwen2's and Qwen3's Q/K are in HF row order in a GGUF: nothing to undo (they were once
/// un-permuted all the same, and the logits were off by 250 %).
#[test]
fn a_qwen2_gguf_matches_safetensors() {
    check(&model_dir("tiny-qwen2"), "qwen2", false, "qwen2");
}

#[test]
fn a_qwen3_gguf_matches_safetensors() {
    check(&model_dir("tiny-qwen3"), "qwen3", false, "qwen3");
}

/// A Llama with `attention_bias`: llama.cpp permutes the q/k biases too.
#[test]
fn a_llama_gguf_with_q_k_biases_matches_safetensors() {
    let src = copy_model(&model_dir("tiny-llama"), "gguf-layout-bias");
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["attention_bias"] = serde_json::json!(true);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let c = gram::config::ModelConfig::from_file(&cfg_path).unwrap();
    // Add q/k/v/o biases (distinct values per row so that a row permutation shows).
    let path = src.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut items: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    for l in 0..c.num_hidden_layers {
        for (p, n) in [
            ("q_proj", c.q_dim()),
            ("k_proj", c.kv_dim()),
            ("v_proj", c.kv_dim()),
            ("o_proj", c.hidden_size),
        ] {
            let v: Vec<u8> = (0..n)
                .flat_map(|i| (((i * 37 + l * 11) % 23) as f32 * 0.05 - 0.5).to_le_bytes())
                .collect();
            items.insert(
                format!("model.layers.{l}.self_attn.{p}.bias"),
                (Dtype::F32, vec![n], v),
            );
        }
    }
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    check(&src, "llama", true, "llama-bias");
    std::fs::remove_dir_all(&src).unwrap();
}

/// A GGUF whose `general.architecture` is not the config's is refused by name (its Q/K layout
/// would be guessed wrong).
#[test]
fn a_gguf_of_another_architecture_is_refused() {
    let src = model_dir("tiny-qwen2");
    let dir = meta_only(&src, "mismatch");
    write_gguf(&src, &dir, "llama", true);
    let e = Model::load(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("general.architecture is `llama`") && e.contains("qwen2"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Damaged GGUFs: seeded truncations, bit flips and overwritten words, most of them in the
/// header (counts, string lengths, dims, types, offsets), each either refused by `Model::load`
/// with an error or loaded and run; never a panic. The file is tiny-llama's, all F32.
#[test]
fn damaged_ggufs_are_refused_or_load_and_run() {
    let src = model_dir("tiny-llama");
    let dir = meta_only(&src, "damaged");
    write_gguf(&src, &dir, "llama", true);
    let path = dir.join("model.gguf");
    let good = std::fs::read(&path).unwrap();
    // The header ends where the data section starts: at the first tensor's bytes, past the
    // 32-byte alignment padding. Most mutations land before it.
    let header = header_len(&good);
    assert!(header > 64 && header < good.len(), "{header}");
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |m: usize| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % m.max(1) as u64) as usize
    };
    let (mut refused, mut loaded) = (0, 0);
    for case in 0..600 {
        let mut bytes = good.clone();
        // Four in five in the header; the rest anywhere.
        let span = if case % 5 == 4 { bytes.len() } else { header };
        match case % 4 {
            0 => bytes.truncate(next(span)),
            1 => {
                for _ in 0..1 + next(3) {
                    let at = next(span);
                    bytes[at] ^= 1 << next(8);
                }
            }
            2 => {
                let at = next(span.saturating_sub(8));
                let word = [
                    0,
                    1,
                    u32::MAX as u64,
                    u64::MAX,
                    1 << 62,
                    next(1 << 20) as u64,
                ];
                bytes[at..at + 8].copy_from_slice(&word[next(word.len())].to_le_bytes());
            }
            _ => {
                let at = next(span.saturating_sub(4));
                let word = [0u32, 1, 13, 255, u32::MAX, next(64) as u32];
                bytes[at..at + 4].copy_from_slice(&word[next(word.len())].to_le_bytes());
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match load_and_run(&dir) {
            Some(true) => loaded += 1,
            Some(false) => refused += 1,
            None => panic!("case {case}: a damaged GGUF panicked the loader"),
        }
    }
    both_outcomes(refused, loaded);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where the data section of a GGUF written by [`write_gguf`] starts (its metadata values are
/// strings, u32s and f32s).
fn header_len(b: &[u8]) -> usize {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut at = 24;
    for _ in 0..n_kv {
        at += 8 + u64_at(at); // key
        let ty = u32_at(at);
        at += 4;
        at += match ty {
            8 => 8 + u64_at(at),
            4 | 6 => 4,
            t => panic!("value type {t}"),
        };
    }
    for _ in 0..n_tensors {
        at += 8 + u64_at(at); // name
        let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + 8 * n_dims + 4 + 8;
    }
    at.div_ceil(32) * 32
}
