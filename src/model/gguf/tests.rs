use super::*;

#[test]
fn names_map_to_hf() {
    assert_eq!(
        hf_name("blk.7.attn_q.weight").unwrap(),
        "model.layers.7.self_attn.q_proj.weight"
    );
    assert_eq!(
        hf_name("blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(
        hf_name("token_embd.weight").unwrap(),
        "model.embed_tokens.weight"
    );
    assert!(hf_name("blk.x.attn_q.weight").is_none());
    assert!(hf_name("rope_freqs.weight").is_none());
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    // llama.cpp: reshape(n_head, 2, D/2, cols).swapaxes(1, 2) — i.e. HF row h*D + j*D/2 + i
    // goes to row h*D + 2i + j. Build that permutation and check we invert it.
    let (n_head, d, cols) = (3, 8, 5);
    let hf: Vec<f32> = (0..n_head * d * cols)
        .map(|x| x as f32 * 0.37 - 3.0)
        .collect();
    let mut permuted = vec![0f32; hf.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let (src, dst) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                permuted[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    assert_eq!(unpermute_rows(&permuted, n_head, cols), hf);
}

#[test]
fn q4_1_and_q8_0_blocks() {
    let d = f16::from_f32(0.5).to_le_bytes();
    let m = f16::from_f32(-1.25).to_le_bytes();
    let mut q41 = vec![d[0], d[1], m[0], m[1]];
    q41.extend((0..16u8).map(|j| (j & 0x0f) | ((15 - j) << 4)));
    let mut out = [0f32; 32];
    dequantize(GgmlType::Q4_1, &q41, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.25);
        assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.25);
    }
    let mut q80 = vec![d[0], d[1]];
    // -100..=117: every value fits an i8 (computed wider: 31 * 7 alone does not).
    let q = |j: i32| (j * 7 - 100) as i8;
    q80.extend((0..32).map(|j| q(j) as u8));
    dequantize(GgmlType::Q8_0, &q80, &mut out);
    for (j, o) in out.iter().enumerate() {
        assert_eq!(*o, q(j as i32) as f32 * 0.5);
    }
}

/// A GGUF of one tensor, `dims` (innermost first) of `ty`, with `data` after the header.
fn one_tensor_gguf(name: &str, dims: &[u64], ty: u32, data: &[u8]) -> Vec<u8> {
    gguf_of(&[(name, dims, ty, 0)], data)
}

#[path = "../../../tests/common/gguf.rs"]
mod writer;
use writer::gguf_of;

/// A one-layer Llama config for the synthetic files, and a scratch directory `name`.
fn tiny_config_and_dir(name: &str) -> (crate::config::ModelConfig, std::path::PathBuf) {
    let config = crate::config::ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":256}"#,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("gram-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (config, dir)
}

/// A stored `output.weight` beside tied embeddings is dropped before it is converted (the
/// engine reads the embeddings; a Q4_0 one was widened to f32 first, 7× its bytes, and
/// dropped after): the load returns every other tensor and not it.
#[test]
fn an_output_weight_beside_tied_embeddings_is_not_converted() {
    let config = crate::config::ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":256,
        "tie_word_embeddings":true}"#,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("gram-gguf-tied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Every tensor of the config in f32 (dims innermost first), then a Q4_0 output.weight.
    let f32s: [(&str, &[u64]); 11] = [
        ("token_embd.weight", &[64, 256]),
        ("blk.0.attn_q.weight", &[64, 64]),
        ("blk.0.attn_k.weight", &[64, 64]),
        ("blk.0.attn_v.weight", &[64, 64]),
        ("blk.0.attn_output.weight", &[64, 64]),
        ("blk.0.ffn_gate.weight", &[64, 128]),
        ("blk.0.ffn_up.weight", &[64, 128]),
        ("blk.0.ffn_down.weight", &[128, 64]),
        ("blk.0.attn_norm.weight", &[64]),
        ("blk.0.ffn_norm.weight", &[64]),
        ("output_norm.weight", &[64]),
    ];
    let mut tensors: Vec<(&str, &[u64], u32, u64)> = Vec::new();
    let mut data = Vec::new();
    for (name, dims) in f32s {
        let n: u64 = dims.iter().product();
        tensors.push((name, dims, 0, data.len() as u64));
        for i in 0..n {
            data.extend((0.01 * (i % 7) as f32 + 0.5).to_le_bytes());
        }
    }
    // [64, 256] Q4_0: 2 blocks of 18 bytes a row.
    tensors.push(("output.weight", &[64, 256], 2, data.len() as u64));
    data.extend(vec![0x11u8; 256 * 2 * 18]);
    data.resize(data.len().div_ceil(32) * 32, 0);
    let path = dir.join("model.gguf");
    std::fs::write(&path, gguf_of(&tensors, &data)).unwrap();
    let map = load_checked(&path, &config, true).unwrap();
    assert!(!map.contains_key("lm_head.weight"));
    assert!(map.contains_key("model.embed_tokens.weight"));
    assert_eq!(map.len(), 11);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Tensors must tile the data section in GGUF's layout: a corrupt offset that makes a
/// tensor overlap another, leave a gap (bytes read as weights that are not the tensor's)
/// or break the alignment is an error naming the tensor, never a load.
#[test]
fn tensor_offsets_must_tile_the_data_section() {
    let (config, dir) = tiny_config_and_dir("gguf-tile");
    let path = dir.join("model.gguf");
    // 4 × 4 and 3 × 1 f32: 64 bytes, then 12 bytes (padded to 32 after).
    let (up, norm) = ("blk.0.ffn_up.weight", "blk.0.attn_norm.weight");
    // The data section: the layouts that tile end at 96 (the last tensor padded); the others
    // get room for every tensor, so that the tiling is what refuses them.
    let load_with = |second: u64, first: u64| {
        let len = if second.max(first) == 96 { 128 } else { 96 };
        let file = gguf_of(
            &[(up, &[4, 4], 0, first), (norm, &[3], 0, second)],
            &vec![7; len],
        );
        std::fs::write(&path, file).unwrap();
        load_checked(&path, &config, false)
            .map(|m| m.len())
            .map_err(|e| e.to_string())
    };
    assert_eq!(load_with(64, 0), Ok(2));
    // Listed in another order than their offsets: still the same layout.
    assert_eq!(load_with(0, 32), Ok(2));
    for (second, first, want) in [
        (32, 0, "`blk.0.attn_norm.weight` at data offset 32 overlaps"),
        (
            96,
            0,
            "`blk.0.attn_norm.weight` at data offset 96 leaves a gap: expected 64",
        ),
        (68, 0, "at data offset 68 leaves a gap"),
        (
            64,
            32,
            "`blk.0.ffn_up.weight` at data offset 32 leaves a gap: expected 0",
        ),
        (0, 0, "overlaps"),
    ] {
        let err = load_with(second, first).expect_err(want);
        assert!(err.contains(want), "{second} {first}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The last tensor ends the file, padded to the alignment or not: a type or shape that makes
/// it shorter than what was written (F32 read as F16: the tiling cannot see it, nothing comes
/// after) leaves bytes past it, and the file is refused rather than loaded as other weights;
/// so are bytes appended after the padding.
#[test]
fn the_last_tensor_ends_the_data_section() {
    let (config, dir) = tiny_config_and_dir("gguf-end");
    let path = dir.join("model.gguf");
    let (up, norm) = ("blk.0.ffn_up.weight", "blk.0.attn_norm.weight");
    let load_with = |norm_dims: &[u64], norm_type: u32, len: usize| {
        let file = gguf_of(
            &[(up, &[4, 4], 0, 0), (norm, norm_dims, norm_type, 64)],
            &vec![7; len],
        );
        std::fs::write(&path, file).unwrap();
        load_checked(&path, &config, false)
            .map(|m| m.len())
            .map_err(|e| e.to_string())
    };
    // 64 + 64 bytes, ending aligned; 64 + 12: the padded end (96) and the exact end (76) are
    // both writers' layouts.
    assert_eq!(load_with(&[16], 0, 128), Ok(2));
    assert_eq!(load_with(&[3], 0, 96), Ok(2));
    assert_eq!(load_with(&[3], 0, 76), Ok(2));
    for (dims, norm_type, len, end) in [
        (&[16u64][..], 1, 128, 96), // F32 written, F16 in the header
        (&[3][..], 0, 128, 76),     // a block appended past the padding
        (&[3][..], 0, 80, 76),      // bytes past the end, short of the padding
    ] {
        let err = load_with(dims, norm_type, len).unwrap_err();
        let want =
            format!("the tensors end at data offset {end} but the data section holds {len} bytes");
        assert!(err.contains(&want), "type {norm_type}, {len} bytes: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Dims whose byte count overflows (2^31 × 2^31 f32 values: 2^64 bytes; a Q8_0 tensor
/// of 2^64 − 32 values) are refused as past the end of the file, never a wrapped size.
#[test]
fn tensor_sizes_that_overflow_are_errors() {
    let (config, dir) = tiny_config_and_dir("gguf");
    let path = dir.join("model.gguf");
    let cases: [(&[u64], u32); 3] = [
        (&[1 << 31, 1 << 31], 0),      // F32
        (&[1 << 32, 1 << 31], 1),      // F16
        (&[u64::MAX / 32 * 32, 1], 8), // Q8_0: 2^59 blocks of 34 bytes
    ];
    for (dims, ty) in cases {
        std::fs::write(
            &path,
            one_tensor_gguf("blk.0.ffn_up.weight", dims, ty, &[0; 64]),
        )
        .unwrap();
        let Err(err) = load_checked(&path, &config, false) else {
            panic!("{dims:?}: loaded");
        };
        let err = err.to_string();
        assert!(err.contains("past the end of the file"), "{dims:?}: {err}");
    }
    // An element count that overflows itself, named as such.
    std::fs::write(
        &path,
        one_tensor_gguf("blk.0.ffn_up.weight", &[1 << 32, 1 << 32, 2], 0, &[0; 64]),
    )
    .unwrap();
    let err = load_checked(&path, &config, false).unwrap_err().to_string();
    assert!(err.contains("element count overflows"), "{err}");
    // The same file with a shape that fits is read.
    std::fs::write(
        &path,
        one_tensor_gguf("blk.0.ffn_up.weight", &[4, 4], 0, &[0; 64]),
    )
    .unwrap();
    assert_eq!(load_checked(&path, &config, false).unwrap().len(), 1);
    // Random corruption of the header (dims, type, offset, counts, name length): an error
    // or a load, never a panic.
    let good = one_tensor_gguf("blk.0.ffn_up.weight", &[32, 2], 8, &[1; 68]);
    let header = good.len() - 68;
    let mut r = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        r
    };
    let (mut refused, mut loaded) = (0, 0);
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 3 {
            let i = (next() as usize) % header;
            b[i] = match next() % 3 {
                0 => b[i] ^ (1 << (next() % 8)),
                1 => 0xff,
                _ => next() as u8,
            };
        }
        std::fs::write(&path, &b).unwrap();
        match load_checked(&path, &config, false) {
            Ok(_) => loaded += 1,
            Err(_) => refused += 1,
        }
    }
    // Both happen: the mutations reach the parser's checks and pass some of them.
    assert!(
        refused > 100 && loaded > 10,
        "refused {refused}, loaded {loaded}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A GGUF header with metadata `(key, value type, value bytes)` and no tensors.
fn gguf_with_metadata(meta: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend((meta.len() as u64).to_le_bytes());
    for (key, ty, value) in meta {
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    b
}

/// The file's hyperparameters must be config.json's: 3 heads where the config says 2 (the
/// same width, so every shape fits) or another rope base is refused, naming both; equal
/// values (an f32 in the file) and keys the file lacks pass.
#[test]
fn hyperparameters_must_match_the_config() {
    let (config, dir) = tiny_config_and_dir("gguf-hparams");
    let arch = |a: &str| {
        let mut v = (a.len() as u64).to_le_bytes().to_vec();
        v.extend(a.as_bytes());
        ("general.architecture", 8u32, v)
    };
    let heads = |n: u32| ("llama.attention.head_count", 4u32, n.to_le_bytes().to_vec());
    let base = |f: f32| ("llama.rope.freq_base", 6u32, f.to_le_bytes().to_vec());
    let layers = |n: u64| ("llama.block_count", 10u32, n.to_le_bytes().to_vec());
    let eps = |e: f32| {
        let key = "llama.attention.layer_norm_rms_epsilon";
        (key, 6u32, e.to_le_bytes().to_vec())
    };
    let kv_heads = |n: u32| {
        (
            "llama.attention.head_count_kv",
            4u32,
            n.to_le_bytes().to_vec(),
        )
    };
    let rope_dims = |n: u32| ("llama.rope.dimension_count", 4u32, n.to_le_bytes().to_vec());
    let scaling = |t: &str| {
        let mut v = (t.len() as u64).to_le_bytes().to_vec();
        v.extend(t.as_bytes());
        ("llama.rope.scaling.type", 8u32, v)
    };
    let factor = |f: f32| ("llama.rope.scaling.factor", 6u32, f.to_le_bytes().to_vec());
    // As the load runs them.
    let check = |meta: &[(&str, u32, Vec<u8>)]| {
        let h = parse_header(&gguf_with_metadata(meta), usize::MAX)?;
        let permuted =
            rotary_permuted(&dir, h.arch.as_deref(), &config).map_err(|e| e.to_string())?;
        let a = h.arch.as_deref().unwrap_or_default();
        check_hparams(&dir, a, permuted, &h.meta, &config).map_err(|e| e.to_string())
    };
    let same = [
        arch("llama"),
        heads(2),
        kv_heads(2),
        base(10000.0),
        layers(1),
        eps(1e-6),
        rope_dims(32),
        scaling("none"),
        factor(1.0),
    ];
    assert_eq!(check(&same), Ok(()));
    assert_eq!(check(&same[..2]), Ok(()), "only the head count is required");
    for (meta, want) in [
        (
            vec![heads(2), kv_heads(2)],
            "general.architecture is missing",
        ),
        (
            vec![arch("llama"), kv_heads(2)],
            "llama.attention.head_count is missing",
        ),
        (
            vec![arch("llama"), heads(3)],
            "llama.attention.head_count is 3 and llama.attention.head_count_kv is absent \
             (so 3 too, as llama.cpp reads it) but config.json's num_key_value_heads is 2",
        ),
        (
            vec![arch("llama"), heads(3), kv_heads(2)],
            "llama.attention.head_count is 3 but config.json's num_attention_heads is 2",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), base(f32::NAN)],
            "llama.rope.freq_base is NaN",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), rope_dims(16)],
            "llama.rope.dimension_count is 16 but config.json's head_dim is 32",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), scaling("linear")],
            "llama.rope.scaling.type is `linear`",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), factor(4.0)],
            "llama.rope.scaling.factor is 4",
        ),
        (
            vec![arch("llama"), heads(2), heads(2)],
            "metadata key `llama.attention.head_count` is given twice",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), base(100000.0)],
            "llama.rope.freq_base is 100000 but config.json's rope_theta is 10000",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), layers(2)],
            "llama.block_count is 2",
        ),
        (
            vec![arch("llama"), heads(2), kv_heads(2), eps(1e-5)],
            "layer_norm_rms_epsilon",
        ),
    ] {
        let err = check(&meta).expect_err(want);
        assert!(err.contains(want), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An array of strings that are not UTF-8 (a tokenizer's vocabulary, which llama.cpp
/// takes) is skipped; a top-level string that is not UTF-8 is refused.
#[test]
fn array_strings_are_skipped_unread() {
    let mut tokens = 8u32.to_le_bytes().to_vec(); // item type: string
    tokens.extend(2u64.to_le_bytes());
    for t in [&b"ok"[..], b"\xff\xfe"] {
        tokens.extend((t.len() as u64).to_le_bytes());
        tokens.extend(t);
    }
    let h = parse_header(
        &gguf_with_metadata(&[("tokenizer.ggml.tokens", 9, tokens)]),
        usize::MAX,
    )
    .unwrap();
    assert!(h.meta.strings.is_empty() && h.meta.numbers.is_empty());
    let mut bad = 2u64.to_le_bytes().to_vec();
    bad.extend(b"\xff\xfe");
    let e = parse_header(&gguf_with_metadata(&[("general.name", 8, bad)]), usize::MAX);
    assert!(e.unwrap_err().contains("not UTF-8"));
}

/// Integer metadata by its type: INT8 and INT16 are signed, UINT8, UINT16 and BOOL not.
#[test]
fn small_integers_keep_their_sign() {
    let h = parse_header(
        &gguf_with_metadata(&[
            ("u8", 0, vec![0xff]),
            ("i8", 1, vec![0xff]),
            ("u16", 2, vec![0xfe, 0xff]),
            ("i16", 3, vec![0xfe, 0xff]),
            ("bool", 7, vec![1]),
        ]),
        usize::MAX,
    )
    .unwrap();
    let want = [
        ("u8", 255.0),
        ("i8", -1.0),
        ("u16", 65534.0),
        ("i16", -2.0),
        ("bool", 1.0),
    ];
    let got: Vec<(&str, f64)> = h
        .meta
        .numbers
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn corrupt_headers_are_errors() {
    assert!(parse_header(b"GGU", usize::MAX)
        .unwrap_err()
        .contains("truncated"));
    assert!(parse_header(b"NOPE\x03\0\0\0", usize::MAX)
        .unwrap_err()
        .contains("bad magic"));
    let mut v9 = b"GGUF".to_vec();
    v9.extend(9u32.to_le_bytes());
    assert!(parse_header(&v9, usize::MAX)
        .unwrap_err()
        .contains("version 9"));
    let mut huge = b"GGUF".to_vec();
    huge.extend(3u32.to_le_bytes());
    huge.extend(u64::MAX.to_le_bytes());
    huge.extend(0u64.to_le_bytes());
    assert!(parse_header(&huge, usize::MAX)
        .unwrap_err()
        .contains("exceeds the file"));
    // A count the file could hold, past what the model takes: refused by the count.
    let mut many = b"GGUF".to_vec();
    many.extend(3u32.to_le_bytes());
    many.extend(1000u64.to_le_bytes());
    many.extend(0u64.to_le_bytes());
    many.resize(1000 * 32 + 24, 0);
    let e = parse_header(&many, 999).unwrap_err();
    assert!(
        e.contains("lists 1000 tensors") && e.contains("at most 999"),
        "{e}"
    );
}
