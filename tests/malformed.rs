//! Bad model directories are refused with a clear error that names what is wrong — never a
//! panic: truncated or garbage safetensors, config problems, tensors of the wrong shape, dtype
//! or name, missing shards, bad batches.

mod common;

use std::path::Path;

use common::*;
use gram::{LoadOptions, Model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites `dir/model.safetensors` after `edit` changes the (name, dtype, shape, bytes) list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut items: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut items);
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn truncated_and_garbage_safetensors() {
    let dir = copy_model(&model_dir("tiny-llama"), "trunc");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors"));
    std::fs::write(&path, b"").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors"));
}

#[test]
fn config_problems() {
    let dir = copy_model(&model_dir("tiny-llama"), "config");
    let cfg_path = dir.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    cfg.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("missing field `num_hidden_layers`"),
        "{e}"
    );

    let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(load_err(&dir).contains("unsupported architecture `MistralForCausalLM`"));

    // A value of the wrong type is named by its key, whichever key it is.
    for (key, value, says) in [
        (
            "hidden_size",
            serde_json::json!("sixty-four"),
            "expected usize",
        ),
        (
            "num_attention_heads",
            serde_json::json!(4.5),
            "expected usize",
        ),
        (
            "architectures",
            serde_json::json!("LlamaForCausalLM"),
            "expected a sequence",
        ),
        ("rms_norm_eps", serde_json::json!("tiny"), "expected f64"),
        (
            "tie_word_embeddings",
            serde_json::json!(1),
            "expected a boolean",
        ),
    ] {
        let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
        cfg[key] = value;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains(&format!("`{key}`: invalid type")) && e.contains(says),
            "{key}: {e}"
        );
    }
    std::fs::write(&cfg_path, "{\"hidden_size\": 64,").unwrap();
    assert!(load_err(&dir).contains("not valid JSON"));
    std::fs::write(&cfg_path, "[1, 2]").unwrap();
    assert!(load_err(&dir).contains("must be a JSON object, not an array"));

    std::fs::remove_file(&cfg_path).unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

/// The JSON files beside the weights were read whole, whatever they were: `/dev/zero` linked
/// as `config.json` (or `generation_config.json`, `gram.json`, `tokenizer.json`) read until
/// memory ran out, by the loaders and by the model fingerprint every CLI command takes first,
/// and a FIFO hung the load. Each is now a regular file of a bounded size, or
/// an error naming it.
#[test]
fn side_files_that_are_not_small_regular_files_are_refused() {
    let dir = copy_model(&model_dir("tiny-llama"), "side-files");
    let not_regular = |e: &str, file: &str| {
        assert!(
            e.contains(file) && e.contains("not a regular file"),
            "{file}: {e}"
        )
    };
    let link_to_zero = |name: &str| {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        p
    };
    let cfg = dir.join("config.json");
    let original = std::fs::read(&cfg).unwrap();
    link_to_zero("config.json");
    let e = load_err(&dir);
    not_regular(&e, "config.json");
    // The model's fingerprint reads it before any load (`gram index build`, `gram serve`).
    let e = gram::search::model_fingerprint(&dir)
        .unwrap_err()
        .to_string();
    not_regular(&e, "config.json");
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("a directory"),
        "{e}"
    );
    std::fs::remove_dir(&cfg).unwrap();
    // One byte past the cap: refused by its size, before it is read.
    let f = std::fs::File::create(&cfg).unwrap();
    f.set_len(gram::container::JSON_CAP + 1).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json")
            && e.contains(&format!("{} bytes", gram::container::JSON_CAP + 1)),
        "{e}"
    );
    std::fs::write(&cfg, &original).unwrap();
    assert!(Model::load(&dir, &LoadOptions::default()).is_ok());

    link_to_zero("generation_config.json");
    let e = load_err(&dir);
    not_regular(&e, "generation_config.json");
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();

    let tok = link_to_zero("tokenizer.json");
    let e = gram::Tokenizer::from_file(&tok).err().unwrap().to_string();
    not_regular(&e, "tokenizer.json");
    let e = gram::search::model_fingerprint(&dir)
        .unwrap_err()
        .to_string();
    not_regular(&e, "tokenizer.json");
    link_to_zero("gram.json");
    let e = gram::settings::Settings::load(&dir)
        .err()
        .unwrap()
        .to_string();
    not_regular(&e, "gram.json");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tensor_of_the_wrong_shape_is_named() {
    let dir = copy_model(&model_dir("tiny-llama"), "shape");
    rewrite(&dir, |items| {
        let t = items
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        let row = t.3.len() / t.2[0];
        t.2[0] -= 1;
        t.3.truncate(t.3.len() - row);
    });
    let e = load_err(&dir);
    assert!(
        e.contains("`model.layers.1.self_attn.k_proj.weight`")
            && e.contains("does not fit the config"),
        "{e}"
    );
}

/// A NaN or inf in a norm or bias (a corrupt file) is refused at load, naming the tensor; a NaN
/// in a matrix (too big to scan at load) makes every probability NaN, which `gram index build`
/// refuses rather than storing them as 0.
#[test]
fn non_finite_weights_are_errors() {
    let set = |dir: &Path, name: &str, value: f32| {
        rewrite(dir, |items| {
            let t = items.iter_mut().find(|t| t.0 == name).unwrap();
            assert_eq!(t.1, Dtype::F32, "{name}");
            t.3[4..8].copy_from_slice(&value.to_le_bytes());
        });
    };
    for (name, value) in [
        ("model.norm.weight", f32::NAN),
        ("model.layers.0.input_layernorm.weight", f32::INFINITY),
    ] {
        let dir = copy_model(&model_dir("tiny-llama"), "non-finite");
        set(&dir, name, value);
        let e = load_err(&dir);
        assert!(
            e.contains(&format!("`{name}`"))
                && e.contains("element 1 is")
                && e.contains("not finite"),
            "{e}"
        );
    }
    // A NaN in a matrix, and finite LM-head rows so large that their logits overflow to ±inf:
    // `gram index build`, `gram lm` and `gram codes` refuse what the model computes, rather
    // than store probabilities of 0 or print null log-probs, null scores or no codes.
    for (case, edit) in [("nan", 0), ("overflow", 1)] {
        let dir = copy_model(&model_dir("tiny-llama"), &format!("non-finite-{case}"));
        if edit == 0 {
            set(&dir, "model.layers.0.mlp.down_proj.weight", f32::NAN);
        } else {
            rewrite(&dir, |items| {
                let t = items.iter_mut().find(|t| t.0 == "lm_head.weight").unwrap();
                let row = t.2[1] * 4;
                for (r, sign) in [(5, 1.0f32), (6, -1.0)] {
                    for v in t.3[r * row..(r + 1) * row].chunks_exact_mut(4) {
                        v.copy_from_slice(&(sign * 3e38f32).to_le_bytes());
                    }
                }
            });
        }
        let catalog = dir.join("catalog.jsonl");
        std::fs::write(
            &catalog,
            r#"{"id":"p1","title":"green velvet sofa","codes":["sofa","sofa | velvet"]}"#,
        )
        .unwrap();
        let out = index_build(&dir, &catalog, &dir.join("ix"), &["--threads", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: built an index");
        assert!(err.contains("not finite"), "{case}: {err}");
        assert!(!dir.join("ix").join("index.gram").exists());
        let d = dir.to_str().unwrap();
        let codes = dir.join("codes.txt");
        std::fs::write(&codes, "sofa\nsofa | velvet\n").unwrap();
        for args in [
            vec!["lm", "--model", d, "--prompt", "green sofa"],
            vec![
                "codes",
                "--model",
                d,
                "--codes",
                codes.to_str().unwrap(),
                "green sofa",
            ],
        ] {
            let out = gram(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{case} {args:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                err.contains("numeric") && err.contains("not finite"),
                "{case} {args:?}: {err}"
            );
        }
    }
}

#[test]
fn missing_unexpected_and_wrongly_typed_tensors_are_named() {
    let dir = copy_model(&model_dir("tiny-llama"), "names");
    rewrite(&dir, |items| {
        items.retain(|t| t.0 != "model.layers.0.mlp.up_proj.weight")
    });
    let e = load_err(&dir);
    assert!(
        e.contains("`model.layers.0.mlp.up_proj.weight`") && e.contains("missing"),
        "{e}"
    );

    let dir = copy_model(&model_dir("tiny-llama"), "extra");
    rewrite(&dir, |items| {
        let mut t = items
            .iter()
            .find(|t| t.0 == "model.layers.1.input_layernorm.weight")
            .unwrap()
            .clone();
        t.0 = "model.layers.2.input_layernorm.weight".into();
        items.push(t);
    });
    let e = load_err(&dir);
    assert!(
        e.contains("`model.layers.2.input_layernorm.weight`") && e.contains("not expected"),
        "{e}"
    );

    let dir = copy_model(&model_dir("tiny-llama"), "dtype");
    rewrite(&dir, |items| {
        let t = items
            .iter_mut()
            .find(|t| t.0 == "model.norm.weight")
            .unwrap();
        t.1 = Dtype::I32;
    });
    let e = load_err(&dir);
    assert!(
        e.contains("`model.norm.weight`") && e.contains("I32"),
        "{e}"
    );
}

#[test]
fn missing_shard_and_empty_dir() {
    let dir = copy_model(&model_dir("tiny-qwen2"), "shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");

    let empty = copy_model(&model_dir("tiny-qwen2"), "noweights");
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::remove_file(empty.join(f)).unwrap();
    }
    assert!(load_err(&empty).contains("no model.safetensors"));
}

/// A directory with both `model.safetensors` and a shard index loads `model.safetensors`, as
/// transformers' `from_pretrained` does (an unsharded save written over an older sharded one):
/// here a truncated one, so the load fails naming it, where the shards alone load.
#[test]
fn model_safetensors_comes_before_a_shard_index() {
    let dir = copy_model(&model_dir("tiny-qwen2"), "both-layouts");
    let shard = std::fs::read(dir.join("model-00001-of-00002.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &shard[..shard.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && !e.contains("model-0000"),
        "{e}"
    );
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    // The shards alone load.
    Model::load(&dir, &LoadOptions::default()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The index of a sharded set is held to what the shards hold: a tensor named twice (JSON
/// keeps both keys; a plain map kept the last), a tensor the index puts in the other shard, and
/// one it names that no shard holds are each refused, by name.
#[test]
fn a_shard_index_that_does_not_fit_its_shards() {
    let src = model_dir("tiny-qwen2");
    let index = std::fs::read_to_string(src.join("model.safetensors.index.json")).unwrap();
    let (one, two) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let entry = format!("\"model.embed_tokens.weight\": \"{one}\"");
    assert!(index.contains(&entry), "{index}");
    for (name, edited, want) in [
        (
            "twice",
            index.replacen(&entry, &format!("{entry}, {entry}"), 1),
            "tensor `model.embed_tokens.weight` is named twice",
        ),
        (
            "moved",
            index.replacen(&entry, &format!("\"model.embed_tokens.weight\": \"{two}\""), 1),
            "`model.embed_tokens.weight` is in model-00001-of-00002.safetensors, the index says model-00002",
        ),
        (
            "ghost",
            index.replacen(&entry, &format!("{entry}, \"model.ghost.weight\": \"{one}\""), 1),
            "`model.ghost.weight` is in no shard",
        ),
        (
            // `dir.join("")` is the directory itself: named as the index's fault, not an
            // IO error about a directory.
            "empty",
            index.replacen(&entry, "\"model.embed_tokens.weight\": \"\"", 1),
            "shard name `` is not a plain file name",
        ),
        (
            "a path",
            index.replacen(&entry, "\"model.embed_tokens.weight\": \"sub/x.safetensors\"", 1),
            "shard name `sub/x.safetensors` is not a plain file name",
        ),
        (
            "the parent",
            index.replacen(&entry, "\"model.embed_tokens.weight\": \"../x.safetensors\"", 1),
            "shard name `../x.safetensors` is not a plain file name",
        ),
    ] {
        let dir = copy_model(&src, &format!("index-{name}"));
        std::fs::write(dir.join("model.safetensors.index.json"), edited).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(want), "{name}: {e}");
    }
    // A tensor in two shards (the index names one of them): refused by name.
    let dir = copy_model(&src, "index-in-two");
    let two_path = dir.join(two);
    let bytes = std::fs::read(dir.join(one)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    let bytes2 = std::fs::read(&two_path).unwrap();
    let st2 = SafeTensors::deserialize(&bytes2).unwrap();
    let mut views: Vec<(String, TensorView)> = st2.tensors();
    views.push(("model.embed_tokens.weight".into(), embed));
    std::fs::write(&two_path, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("appears twice"),
        "{e}"
    );
}

#[test]
fn bad_batches_are_input_errors() {
    let model = Model::load(&model_dir("tiny-qwen2"), &LoadOptions::default()).unwrap();
    let mut cache = model.new_cache(2, 4).unwrap();
    let e = |r: gram::Result<Vec<f32>>| r.expect_err("must fail").to_string();
    assert!(e(model.forward(&mut cache, &[], &[], &[])).contains("at least one token"));
    assert!(e(model.forward(&mut cache, &[5, 6], &[0], &[0])).contains("one slot per token"));
    assert!(e(model.forward(&mut cache, &[100_000], &[0], &[0])).contains("outside the vocabulary"));
    assert!(e(model.forward(&mut cache, &[5], &[7], &[0])).contains("slot 7 does not exist"));
    assert!(e(model.forward(&mut cache, &[5; 5], &[1; 5], &[4])).contains("is full"));
    assert!(e(model.forward(&mut cache, &[5], &[1], &[3])).contains("outside the batch"));
    // A refused batch leaves the cache as it was.
    assert_eq!(cache.len(1), 0);
    assert!(model
        .new_cache(1, 1 << 20)
        .err()
        .unwrap()
        .to_string()
        .contains("exceeds"));
    assert!(gram::lm::run(&model, &[], 3)
        .err()
        .unwrap()
        .to_string()
        .contains("no tokens"));
    // A count of new tokens that would wrap `prompt + new` is refused, not a wrapped size.
    assert!(gram::lm::run(&model, &[5], usize::MAX)
        .err()
        .unwrap()
        .to_string()
        .contains("exceeds the model's"));
    // The last greedy token is never run, so a prompt of P tokens may ask for 1024 − P + 1
    // (1,024 positions), not one more.
    let max = model.max_positions();
    let prompt = vec![5u32; max - 2];
    assert!(gram::lm::run(&model, &prompt, 3).is_ok());
    assert!(gram::lm::run(&model, &prompt, 4)
        .err()
        .unwrap()
        .to_string()
        .contains("exceeds the model's"));
}

/// A tokenizer whose ids go past the model's vocabulary (another model's tokenizer.json) is
/// refused when the two are loaded together, naming the token, not on each query that meets it.
#[test]
fn a_tokenizer_larger_than_the_model_is_refused() {
    let tok = gram::Tokenizer::from_file(&model_dir("tiny-llama").join("tokenizer.json")).unwrap();
    assert!(tok.check_fits(512).is_ok());
    let e = tok.check_fits(511).unwrap_err().to_string();
    assert!(
        e.contains("has id 511, outside the model's vocabulary of 511"),
        "{e}"
    );
}

#[test]
fn thread_counts_out_of_range_are_refused() {
    for threads in [0, 5000] {
        let options = LoadOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let e = Model::load(&model_dir("tiny-qwen2"), &options)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains("out of range"), "{threads}: {e}");
    }
}

/// `forward_rows` refuses rows whose KV placement is malformed, and arenas of another model.
#[test]
fn bad_kv_rows_are_input_errors() {
    use gram::backend::{KvRows, RowKv};
    use gram::model::Head;
    let model = Model::load(&model_dir("tiny-qwen2"), &LoadOptions::default()).unwrap();
    let other = Model::load(&model_dir("tiny-qwen3"), &LoadOptions::default()).unwrap();
    let mut arena = model.new_arena(8).unwrap();
    let run = |arena: &mut gram::model::KvArena<_>, row: RowKv, links: &[u32]| {
        let rows = [row];
        let batch = KvRows { rows: &rows, links };
        model
            .forward_rows(arena, &[5], batch, Head::Full(&[0]))
            .expect_err("must fail")
            .to_string()
    };
    let ok = RowKv::contiguous(0, 0);
    for (row, links) in [
        (RowKv { link: (5, 0), ..ok }, &[1u32, 2][..]), // reversed link range
        (RowKv { link: (0, 3), ..ok }, &[1, 2][..]),    // past the link table
        (RowKv { link: (0, 1), ..ok }, &[99][..]),      // link past the arena
        (RowKv { entry: 8, ..ok }, &[][..]),            // entry past the arena
        (RowKv { span: (3, 2), ..ok }, &[][..]),        // reversed span
        (RowKv { span: (0, 0), ..ok }, &[][..]),        // empty context
        (RowKv { pos: 1 << 20, ..ok }, &[][..]),        // position past the model's
    ] {
        assert!(run(&mut arena, row, links).contains("outside"), "{row:?}");
    }
    // A context that does not end at the row's own entry: it would read an entry no one
    // wrote (here 3, past the span) or miss its own.
    for (row, links) in [
        (RowKv { entry: 3, ..ok }, &[][..]),
        (RowKv { link: (0, 1), ..ok }, &[4u32][..]),
    ] {
        let e = run(&mut arena, row, links);
        assert!(
            e.contains("does not end at the entry it writes"),
            "{row:?}: {e}"
        );
    }
    // Two rows writing one entry.
    let rows = [ok, RowKv { pos: 1, ..ok }];
    let e = model
        .forward_rows(
            &mut arena,
            &[5, 6],
            KvRows {
                rows: &rows,
                links: &[],
            },
            Head::Full(&[0]),
        )
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("two rows of the batch write KV entry 0"), "{e}");
    let mut foreign = other.new_arena(8).unwrap();
    assert!(run(&mut foreign, ok, &[]).contains("another model"));
}

/// Damaged safetensors headers: seeded edits of the JSON header that keep it JSON (a digit of a
/// shape or an offset changed, a dtype swapped) or break it (a byte flipped, the file cut), and
/// flips in the data; each refused with an error or loaded and run, never a panic.
#[test]
fn damaged_safetensors_are_refused_or_load_and_run() {
    let dir = copy_model(&model_dir("tiny-llama"), "damaged-st");
    let path = dir.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let header = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let digits: Vec<usize> = (8..header).filter(|&i| good[i].is_ascii_digit()).collect();
    let dtype_at: Vec<usize> = (8..header)
        .filter(|&i| good[i..].starts_with(b"\"F32\""))
        .collect();
    assert!(digits.len() > 100 && !dtype_at.is_empty());
    let mut next = xorshift_below(0x2545_F491_4F6C_DD1D);
    let (mut refused, mut loaded) = (0, 0);
    for case in 0..400 {
        let mut bytes = good.clone();
        match case % 5 {
            0 | 1 => {
                let at = digits[next(digits.len())];
                bytes[at] = b'0' + next(10) as u8;
            }
            2 => {
                let at = dtype_at[next(dtype_at.len())];
                let ty: &[u8] = [&b"F16"[..], b"I64", b"BF16", b"U8", b"F64"][next(5)];
                bytes.splice(at + 1..at + 4, ty.iter().copied());
                let grown = (header - 8 + ty.len() - 3) as u64;
                bytes[..8].copy_from_slice(&grown.to_le_bytes());
            }
            3 => {
                let at = next(header);
                bytes[at] ^= 1 << next(8);
            }
            _ => {
                if next(2) == 0 {
                    bytes.truncate(next(bytes.len()));
                } else {
                    let at = header + next(bytes.len() - header);
                    bytes[at] = 0xff; // a NaN or infinite weight, most of the time
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match load_and_run(&dir) {
            Some(true) => loaded += 1,
            Some(false) => refused += 1,
            None => panic!("case {case}: a damaged safetensors file panicked the loader"),
        }
    }
    both_outcomes(refused, loaded);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Seeded xorshift64 values below `m`.
fn xorshift_below(mut s: u64) -> impl FnMut(usize) -> usize {
    move |m| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % m.max(1) as u64) as usize
    }
}

/// A safetensors file whose data section starts one byte off (a header padded with one more
/// space than 4-byte alignment allows, as a non-standard writer may leave it): every f32
/// tensor lies misaligned, is copied once its name and shape are checked, and the model gives
/// the logits of the aligned file, bit for bit.
#[test]
fn a_misaligned_safetensors_file_gives_the_same_logits() {
    let logits = |dir: &Path| {
        let model = Model::load(dir, &LoadOptions::default()).unwrap();
        let ids = [5u32, 17, 42, 99];
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        model.forward(&mut cache, &ids, &[0; 4], &[3]).unwrap()
    };
    let src = model_dir("tiny-llama");
    let dir = copy_model(&src, "misaligned");
    let path = dir.join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut bytes = ((n + 1) as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&good[8..8 + n]);
    bytes.push(b' ');
    bytes.extend_from_slice(&good[8 + n..]);
    assert_ne!((8 + n + 1) % 4, 0);
    std::fs::write(&path, bytes).unwrap();
    let (want, got) = (logits(&src), logits(&dir));
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.to_bits(), g.to_bits(), "logit {i}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Logits after a fixed prompt, for comparing loads of the same model.
fn logits_of(dir: &Path) -> Vec<f32> {
    let model = Model::load(dir, &LoadOptions::default()).unwrap();
    gram::lm::run(&model, &[1, 17, 42, 99, 7], 0)
        .unwrap()
        .logits
}

/// `tie_word_embeddings` with an `lm_head.weight` stored anyway (some exports keep it):
/// transformers ties the head to the embeddings and the stored one is not used, so gram's
/// logits are those of a model whose head is a copy of the embeddings, bit for bit, and not
/// the stored head's. And old Llama checkpoints' `rotary_emb.inv_freq` buffers are skipped
/// (recomputed), changing nothing.
#[test]
fn a_stored_head_of_a_tied_model_and_inv_freq_buffers_are_not_used() {
    let src = model_dir("tiny-llama");
    let untied = logits_of(&src);
    // The same files, the config tied: the stored (random, untied) head is ignored.
    let tied = copy_model(&src, "tied-stored-head");
    let config = std::fs::read_to_string(tied.join("config.json")).unwrap();
    let config = config.replace(
        "\"tie_word_embeddings\": false",
        "\"tie_word_embeddings\": true",
    );
    assert!(config.contains("\"tie_word_embeddings\": true"), "{config}");
    std::fs::write(tied.join("config.json"), config).unwrap();
    // The reference: untied, its head a copy of the embeddings.
    let copied = copy_model(&src, "head-copied");
    rewrite(&copied, |items| {
        let embed = items
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .3
            .clone();
        let head = items.iter_mut().find(|t| t.0 == "lm_head.weight").unwrap();
        head.3 = embed;
    });
    let (got, want) = (logits_of(&tied), logits_of(&copied));
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_ne!(got, untied, "the stored head was used");
    // inv_freq buffers in every layer: skipped.
    let buffers = copy_model(&src, "inv-freq");
    rewrite(&buffers, |items| {
        for l in 0..2 {
            let junk: Vec<u8> = (0..16u32)
                .flat_map(|i| (i as f32 * 3.5).to_le_bytes())
                .collect();
            items.push((
                format!("model.layers.{l}.self_attn.rotary_emb.inv_freq"),
                Dtype::F32,
                vec![16],
                junk,
            ));
        }
    });
    assert_eq!(logits_of(&buffers), untied);
    for d in [tied, copied, buffers] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
