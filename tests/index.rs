//! The catalog indexer and `gram search`: product-side probabilities against plain teacher
//! forcing, the build → inspect → search path end to end, and bad catalogs / indexes / models.

mod common;

use common::*;
use gram::catalog::teacher_force;
use gram::lm::log_softmax;
use gram::{Model, Tokenizer};

/// `teacher_force` (one pass, codes attending to a shared prompt) equals scoring each
/// prompt + code sequence on its own.
#[test]
fn teacher_forced_probabilities_match_plain_forward() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let dir = model_dir(name);
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let model = Model::load(&dir, &Default::default()).unwrap();
        let prompt = tok.encode("Green velvet sofa, three seats").unwrap();
        let codes: Vec<Vec<u32>> = ["sofa | velvet | green", "sofa", "x", "chair | oak"]
            .iter()
            .map(|c| tok.encode_plain(c).unwrap())
            .collect();
        let refs: Vec<&[u32]> = codes.iter().map(|c| c.as_slice()).collect();
        let mut arena = None;
        let got = teacher_force(&model, &mut arena, &prompt, &refs).unwrap();
        assert_eq!(got.len(), codes.len(), "{name}: one answer per code");
        for (code, g) in codes.iter().zip(&got) {
            let seq: Vec<u32> = prompt.iter().chain(code).copied().collect();
            let mut cache = model.new_cache(1, seq.len()).unwrap();
            let rows: Vec<usize> = (prompt.len() - 1..seq.len() - 1).collect();
            let logits = model
                .forward(&mut cache, &seq, &vec![0; seq.len()], &rows)
                .unwrap();
            let v = model.config.vocab_size;
            let want: Vec<f32> = code
                .iter()
                .enumerate()
                .map(|(i, &t)| log_softmax(&logits[i * v..(i + 1) * v])[t as usize].exp())
                .collect();
            assert_eq!(g.len(), code.len());
            let err = max_prob_err(g, &want);
            assert!(err < 1e-4, "{name} {code:?}: {g:?} vs {want:?} ({err:e})");
        }
    }
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn err(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "should fail");
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(e.starts_with("error: ") && !e.contains("panicked"), "{e}");
    e
}

#[test]
fn build_inspect_search_end_to_end() {
    let tmp = std::env::temp_dir().join(format!("gram-index-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let catalog = tmp.join("catalog.jsonl");
    let lines = [
        r#"{"id":"p1","title":"Green velvet sofa","codes":["sofa | velvet | green","sofa"]}"#,
        r#"{"id":"p2","title":"Oak desk","attributes":{"material":"oak"},"codes":["desk | oak","desk"]}"#,
        r#"{"id":"p3","title":"Blue wool rug","codes":["rug | wool | blue","rug"]}"#,
        r#"{"id":"p4","title":"Red velvet chair","codes":["chair | velvet | red","sofa | velvet | green"]}"#,
    ];
    std::fs::write(&catalog, lines.join("\n") + "\n").unwrap();
    let model = model_dir("tiny-llama");
    let (m, c, ix) = (
        model.to_str().unwrap(),
        catalog.to_str().unwrap(),
        tmp.join("ix"),
    );
    let ix = ix.to_str().unwrap();
    let build = |extra: &[&str]| {
        let mut args = vec!["index", "build", "--model", m, "--catalog", c, "--out", ix];
        args.extend_from_slice(extra);
        gram(&args)
    };
    let report: serde_json::Value = serde_json::from_str(&ok(&build(&[]))).unwrap();
    assert_eq!(report["report"]["products"], 4);
    assert_eq!(report["report"]["codes"], 7);
    assert_eq!(report["report"]["postings"], 8);

    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&gram(&["index", "inspect", ix]))).unwrap();
    assert_eq!(inspect["checksums"], "ok");
    assert_eq!(inspect["codes"], 7);
    let deep: serde_json::Value =
        serde_json::from_str(&ok(&gram(&["index", "inspect", "--deep", ix]))).unwrap();
    assert_eq!(deep["scan"]["non_finite_scores"], 0);

    // A copy with one payload byte flipped (a product probability, which the structure checks
    // at open cannot see): inspect still prints its report, and exits nonzero naming the
    // damage; a search refuses the index (it answered from it, a score off, before).
    let bad = tmp.join("ix-flipped");
    std::fs::create_dir_all(&bad).unwrap();
    let mut bytes = std::fs::read(std::path::Path::new(ix).join("index.gram")).unwrap();
    flip_in_section(&mut bytes, 5);
    std::fs::write(bad.join("index.gram"), bytes).unwrap();
    let out = gram(&["index", "inspect", bad.to_str().unwrap()]);
    assert!(!out.status.success(), "a damaged index passed inspect");
    let msg = err(&out);
    assert!(msg.contains("damaged") && msg.contains("checksum"), "{msg}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(report["checksums"], "ok");
    let msg = err(&gram(&["search", "--index", bad.to_str().unwrap(), "oak"]));
    // Named as the format names it, not by its kind number alone.
    assert!(
        msg.contains("the product probabilities section (kind 5) checksum mismatch"),
        "{msg}"
    );

    let out = ok(&gram(&[
        "search",
        "--index",
        ix,
        "--k",
        "3",
        "--beam",
        "7",
        "green sofa",
        "oak",
    ]));
    let results: Vec<&str> = out.lines().collect();
    assert_eq!(results.len(), 2);
    let ids = ["p1", "p2", "p3", "p4"];
    for line in results {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        // Beam 7 over 7 codes: every code comes back, so every product is reached; top 3.
        assert_eq!(v["codes"].as_array().unwrap().len(), 7, "{line}");
        let products = v["products"].as_array().unwrap();
        assert_eq!(products.len(), 3, "{line}");
        let scores: Vec<f64> = products
            .iter()
            .map(|p| p["score"].as_f64().unwrap())
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first");
        for p in products {
            assert!(ids.contains(&p["id"].as_str().unwrap()));
            assert!(!p["codes"].as_array().unwrap().is_empty());
        }
        for stage in [
            "open", "tokenize", "prefill", "decode", "postings", "scoring",
        ] {
            assert!(v["timings_ms"][stage].as_f64().unwrap() >= 0.0, "{stage}");
        }
    }

    // Another model is refused; a corrupt index is refused; bad catalogs are reported.
    let other = model_dir("tiny-qwen2");
    let e = err(&gram(&[
        "search",
        "--index",
        ix,
        "--model",
        other.to_str().unwrap(),
        "x",
    ]));
    assert!(e.contains("rebuild it with this model"), "{e}");
    let e = err(&gram(&["search", "--index", ix, "--k", "0", "x"]));
    assert!(e.contains("--k must be at least 1"), "{e}");
    let file = tmp.join("ix/index.gram");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&gram(&["search", "--index", ix, "x"]));
    assert!(e.contains("truncated"), "{e}");
    std::fs::write(
        &catalog,
        format!("{}\n{{not json\n{}\n", lines[0], lines[1]),
    )
    .unwrap();
    let e = err(&build(&[]));
    assert!(e.contains("line 2"), "{e}");
    let skipping = build(&["--on-error", "skip"]);
    let out = ok(&skipping);
    assert!(out.contains(r#""skipped_lines":1"#), "{out}");
    // The skipped line is named, with what is wrong with it (a count alone said nothing).
    let said = String::from_utf8_lossy(&skipping.stderr);
    assert!(
        said.contains("warning: skipped") && said.contains("catalog.jsonl line 2, column"),
        "{said}"
    );
    // A refused flag is refused before anything is written: no output directory is left.
    let fresh = tmp.join("never");
    for (flags, says) in [
        (&["--generate", "--beam", "0"][..], "--beam"),
        (&["--generate", "--beam", "513"][..], "--beam"),
        (&["--shard-size", "0"][..], "--shard-size"),
        (&["--generate", "--batch", "0"][..], "--batch"),
        (
            &["--generate", "--threshold", "2"][..],
            "--threshold 2: expected 0..=1",
        ),
        (
            &["--generate", "--max-code-tokens", "0"][..],
            "--max-code-tokens 0: expected",
        ),
        (&["--threads", "0"][..], "--threads"),
        (&["--device", "cuda", "--threads", "0"][..], "--threads"),
    ] {
        let mut args = vec![
            "index",
            "build",
            "--model",
            m,
            "--catalog",
            c,
            "--on-error",
            "skip",
        ];
        args.extend_from_slice(&["--out", fresh.to_str().unwrap()]);
        args.extend_from_slice(flags);
        let e = err(&gram(&args));
        assert!(e.contains(says), "{flags:?}: {e}");
        assert!(!fresh.exists(), "{flags:?} left {}", fresh.display());
    }
    // A model that fails to load (its weights cut short) fails before --out is made.
    let broken = tmp.join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(std::path::Path::new(m).join(f), broken.join(f)).unwrap();
    }
    let weights = std::fs::read(std::path::Path::new(m).join("model.safetensors")).unwrap();
    std::fs::write(
        broken.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    let out = gram(&[
        "index",
        "build",
        "--model",
        broken.to_str().unwrap(),
        "--catalog",
        c,
        "--on-error",
        "skip",
        "--out",
        fresh.to_str().unwrap(),
    ]);
    // After the backend's line (the model was being loaded), the error.
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.lines().last().unwrap().starts_with("error: ") && e.contains("model.safetensors"),
        "{e}"
    );
    assert!(
        !fresh.exists(),
        "a failed model load left {}",
        fresh.display()
    );
    // An --out that is not UTF-8 cannot be recorded in the report: refused before the build,
    // not a panic after it.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = tmp.join(std::ffi::OsStr::from_bytes(b"ix-\xff"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
            .args(["index", "build", "--model", m, "--catalog", c, "--out"])
            .arg(&odd)
            .output()
            .unwrap();
        let e = err(&out);
        assert!(e.contains("--out") && e.contains("not valid UTF-8"), "{e}");
        assert!(!odd.exists());
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Codes the model generates for a product (beam search over a code list from the product
/// template) are indexed with the beams' token probabilities, which equal teacher forcing; the
/// catalog's own codes are kept too.
#[test]
fn generated_product_codes_carry_teacher_forced_probabilities() {
    use gram::catalog::{build, Generate};
    use gram::index::Index;
    use gram::settings::Settings;
    let dir = model_dir("tiny-qwen2");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let mut items = items(&["Green velvet sofa", "Oak desk", "Blue wool rug"]);
    items[0].codes = vec!["sofa".into()];
    let list = std::fs::read_to_string(repo().join("tests/golden/codes-tiny.txt")).unwrap();
    let generate = Generate {
        codes: list.lines().map(str::to_owned).collect(),
        beam: 4,
        threshold: 0.0,
        batch: 2,
        max_new_tokens: 16,
    };
    let path = std::env::temp_dir().join(format!("gram-gen-{}.gram", std::process::id()));
    // A product template as the shipped models have (the default is the bare title): every
    // probability is teacher-forced after the templated prompt, generation starts from it.
    let settings = Settings {
        product_template: "P: {title}\n".into(),
        ..Settings::default()
    };
    let report = build(
        &model,
        &tok,
        &settings,
        &items,
        Some(&generate),
        &path,
        &serde_json::json!({"model": {"fingerprint": "generated"}}),
    )
    .unwrap();
    assert_eq!(report.generated, 12, "beam 4 × 3 products");
    assert_eq!(report.postings, 13, "plus the catalog's own code");
    let ix = Index::open(&path).unwrap();
    assert_eq!(
        pt_matches_teacher_forcing(&ix, &items, &model, &tok, &settings),
        13
    );
    std::fs::remove_file(&path).unwrap();
}

/// Checks every stored Pt of `ix` against teacher forcing the code's own tokens after the
/// product's prompt (default template); returns how many postings it checked.
fn pt_matches_teacher_forcing(
    ix: &gram::index::Index,
    items: &[gram::catalog::Item],
    model: &Model,
    tok: &Tokenizer,
    settings: &gram::settings::Settings,
) -> usize {
    let mut arena = None;
    let mut seen = 0;
    for id in 0..ix.num_codes() as u32 {
        let n = ix.code(id).unwrap().n_tokens as usize;
        let (pq, w) = (vec![0.5; n], vec![1.0; n]);
        let p = ix.postings(id, &pq, &w).unwrap();
        let text = ix.code_text(id).unwrap().into_owned();
        let code = tok.encode_plain(&text).unwrap();
        assert_eq!(code.len(), n, "{text:?}");
        for (j, &prod) in p.products.iter().enumerate() {
            let prompt = tok
                .encode(&settings.product_prompt(&items[prod as usize].title))
                .unwrap();
            let want = teacher_force(model, &mut arena, &prompt, &[&code])
                .unwrap()
                .remove(0);
            for (t, w) in want.iter().enumerate() {
                let got = p.pt[t * p.products.len() + j] as f32 * gram::score::PT_SCALE;
                // The u16 quantization's half step, and the forward's own 1e-4 relative.
                let tol = 0.5 * gram::score::PT_SCALE * 1.001 + 1e-4 * w;
                assert!(
                    (got - w).abs() <= tol,
                    "{text:?} product {prod} token {t}: {got} vs {w}"
                );
            }
            seen += 1;
        }
    }
    seen
}

/// Many products in one teacher-forcing pass give what each gives alone.
#[test]
fn teacher_forcing_many_products_at_once_equals_one_at_a_time() {
    use gram::catalog::teacher_force_many;
    for name in ["tiny-llama", "tiny-qwen2", "tiny-qwen3"] {
        let dir = model_dir(name);
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let model = Model::load(&dir, &Default::default()).unwrap();
        let enc = |t: &str| tok.encode_plain(t).unwrap();
        let prompts: Vec<Vec<u32>> = ["Green velvet sofa", "Oak desk with drawers", "rug", "x"]
            .iter()
            .map(|t| tok.encode(t).unwrap())
            .collect();
        let codes: Vec<Vec<Vec<u32>>> = vec![
            vec![enc("sofa | velvet | green"), enc("sofa")],
            vec![enc("desk"), enc("desk | oak"), enc("chair | oak | brown")],
            vec![enc("rug | wool")],
            vec![enc("lamp")],
        ];
        let jobs: Vec<(&[u32], Vec<&[u32]>)> = prompts
            .iter()
            .zip(&codes)
            .map(|(p, c)| (p.as_slice(), c.iter().map(|c| c.as_slice()).collect()))
            .collect();
        let mut arena = None;
        let together = teacher_force_many(&model, &mut arena, &jobs).unwrap();
        assert_eq!(together.len(), jobs.len(), "{name}: one answer per product");
        for ((prompt, cs), got) in jobs.iter().zip(&together) {
            let alone = teacher_force(&model, &mut None, prompt, cs).unwrap();
            assert_eq!(got.len(), alone.len());
            for (g, a) in got.iter().zip(&alone) {
                assert_eq!(g.len(), a.len());
                let err = max_prob_err(g, a);
                assert!(err < 1e-5, "{name}: {g:?} vs {a:?} ({err:e})");
            }
        }
    }
}

/// Unconstrained product codes: whatever the model ends with EOS, decoded, is indexed under its
/// own tokenization, with teacher-forced probabilities where that differs from the beam's.
/// (A random tiny model hardly ever picks its real EOS, so this copy of tiny-qwen2 names as
/// EOS a token it often ranks first.)
#[test]
fn unconstrained_generation_indexes_decoded_codes() {
    use gram::catalog::{build, Generate};
    let src = model_dir("tiny-qwen2");
    let dir = std::env::temp_dir().join(format!("gram-free-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["eos_token_id"] = 228.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let items = items(&[
        "Green velvet sofa",
        "Oak desk",
        "Blue wool rug",
        "Brass lamp",
    ]);
    let mut generate = Generate {
        codes: vec![],
        beam: 8,
        threshold: 0.0,
        batch: 3,
        max_new_tokens: 6,
    };
    let path = dir.join("free.gram");
    let settings = gram::settings::Settings::default();
    let run = |generate: &Generate, meta: &serde_json::Value| {
        build(&model, &tok, &settings, &items, Some(generate), &path, meta)
    };
    // Metadata without the model's fingerprint is refused: the saved shards are keyed by it.
    let e = run(&generate, &serde_json::json!({})).unwrap_err();
    assert!(e.to_string().contains("model.fingerprint"), "{e}");
    assert!(!path.exists() && !path.with_extension("shards").exists());
    let meta = serde_json::json!({"model": {"fingerprint": "free"}});
    let report = run(&generate, &meta).unwrap();
    assert!(report.generated > 0 && report.codes > 0, "{report:?}");
    let ix = gram::index::Index::open(&path).unwrap();
    assert_eq!(
        pt_matches_teacher_forcing(&ix, &items, &model, &tok, &settings),
        report.postings
    );
    // A threshold nothing reaches: a clear error, not an empty index.
    generate.threshold = 1.0;
    let e = run(&generate, &meta).err().unwrap().to_string();
    assert!(e.contains("found no codes"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// tiny-llama's tokenizer and model, and five products (no codes yet): the shard tests' catalog.
fn five_products() -> (Tokenizer, Model, Vec<gram::catalog::Item>) {
    let dir = model_dir("tiny-llama");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let names = [
        "Green velvet sofa",
        "Oak desk",
        "Blue wool rug",
        "Brass lamp",
        "Red chair",
    ];
    (tok, model, items(&names))
}

/// A build stopped after some shards resumes from them: a second run reuses every intact shard
/// with the same inputs, recomputes a corrupt one, and writes the same index as a clean build.
#[test]
fn a_stopped_build_resumes_from_its_shards() {
    use gram::catalog::{build_with, BuildOptions, Generate};
    let (tok, model, mut items) = five_products();
    items[1].codes = vec!["desk | oak".into()];
    let list = std::fs::read_to_string(repo().join("tests/golden/codes-tiny.txt")).unwrap();
    let generate = Generate {
        codes: list.lines().map(str::to_owned).collect(),
        beam: 3,
        threshold: 0.0,
        batch: 2,
        max_new_tokens: 16,
    };
    let tmp = std::env::temp_dir().join(format!("gram-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let work = tmp.join("work");
    let options = BuildOptions {
        generate: Some(&generate),
        shard_size: 2,
        work_dir: Some(work.clone()),
        progress: false,
        code_file: None,
        on_error: gram::catalog::OnError::Stop,
    };
    let settings = gram::settings::Settings::default();
    let meta = serde_json::json!({"model": {"fingerprint": "x"}});
    let run =
        |out: &std::path::Path| build_with(&model, &tok, &settings, &items, &options, out, &meta);
    // "Stopped": the index cannot be written (its directory is missing); the shards stay.
    assert!(run(&tmp.join("missing/index.gram")).is_err());
    let shards = std::fs::read_dir(&work)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != ".lock")
        .count();
    assert_eq!(shards, 3, "5 products in shards of 2");
    // Another build holding the work directory: refused, its shards untouched (two builds at
    // once overwrote each other's shards, and the first to finish removed the other's).
    {
        let held = std::fs::File::open(work.join(".lock")).unwrap();
        held.lock().unwrap();
        let e = run(&tmp.join("second.gram")).unwrap_err().to_string();
        assert!(
            e.contains("another build is using this work directory"),
            "{e}"
        );
        assert!(!tmp.join("second.gram").exists());
    }
    // Corrupt one shard: it is recomputed, the others reused.
    let one = work.join("shard-000001.bin");
    let mut bytes = std::fs::read(&one).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&one, bytes).unwrap();
    let resumed = run(&tmp.join("resumed.gram")).unwrap();
    assert_eq!(resumed.reused_shards, 2);
    assert!(!work.exists(), "the shards go once the index is written");
    // The work directory is the user's: a file of theirs there (or the index itself) stays,
    // only the build's shards go, and the directory with them.
    // A shard of an earlier, longer catalog goes too.
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("keep.txt"), b"theirs").unwrap();
    std::fs::write(work.join("shard-000009.bin"), b"GRAMSHRD").unwrap();
    let clean = run(&tmp.join("clean.gram")).unwrap();
    assert_eq!(clean.reused_shards, 0);
    // A resumed build counts the codes its reused shards' generation found.
    assert!(clean.generated > 0);
    assert_eq!(resumed.generated, clean.generated);
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["keep.txt"]);
    assert!(run(&work.join("in-work.gram")).is_ok());
    assert!(work.join("in-work.gram").exists() && work.join("keep.txt").exists());
    std::fs::remove_dir_all(&work).unwrap();
    assert_eq!(
        std::fs::read(tmp.join("resumed.gram")).unwrap(),
        std::fs::read(tmp.join("clean.gram")).unwrap()
    );
    // Other inputs reuse nothing: each build below starts from the shards of a stopped one.
    let reused_by = |model: &Model, options: &BuildOptions, name: &str| {
        assert!(run(&tmp.join("missing/index.gram")).is_err());
        let out = tmp.join(name);
        build_with(model, &tok, &settings, &items, options, &out, &meta)
            .unwrap()
            .reused_shards
    };
    // Another beam.
    let wider = Generate {
        beam: 4,
        ..generate.clone()
    };
    let wider = BuildOptions {
        generate: Some(&wider),
        ..options.clone()
    };
    assert_eq!(reused_by(&model, &wider, "o.gram"), 0);
    // A backend with other numerics (the GPU's bf16 GEMM operands, on the CPU).
    let rounded = Model::load_on(
        gram::backend::cpu::CpuBackend::gpu_numerics(),
        &model_dir("tiny-llama"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(reused_by(&rounded, &options, "r.gram"), 0);
    // A model whose EOS is another (`generation_config.json` may give it, and the model's
    // fingerprint does not hash that file): the codes a shard generated end at its EOS.
    let mut other_eos = Model::load(&model_dir("tiny-llama"), &Default::default()).unwrap();
    other_eos.config.eos_token_ids = vec![model.config.eos_token_ids[0] + 1];
    assert_eq!(reused_by(&other_eos, &options, "e.gram"), 0);
    // A second EOS (a code holding it is refused).
    let mut second_eos = Model::load(&model_dir("tiny-llama"), &Default::default()).unwrap();
    second_eos.config.eos_token_ids = vec![model.config.eos_token_ids[0], 1];
    assert_eq!(reused_by(&second_eos, &options, "s.gram"), 0);
    // gram.json's `max_code_tokens` (the generated codes a shard kept are within it).
    let capped = gram::settings::Settings {
        max_code_tokens: Some(20),
        ..settings.clone()
    };
    assert!(run(&tmp.join("missing/index.gram")).is_err());
    let capped = build_with(
        &model,
        &tok,
        &capped,
        &items,
        &options,
        &tmp.join("c.gram"),
        &meta,
    );
    assert_eq!(capped.unwrap().reused_shards, 0);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A shard cut short anywhere, its header included, is recomputed rather than trusted or
/// panicked on, and the index comes out byte for byte as a clean build's.
#[test]
fn a_shard_cut_short_anywhere_is_recomputed() {
    use gram::catalog::{build_with, BuildOptions};
    let (tok, model, mut items) = five_products();
    let codes = [
        "sofa | green",
        "desk | oak",
        "rug | wool",
        "lamp | brass",
        "chair | red",
    ];
    for (item, code) in items.iter_mut().zip(codes) {
        item.codes = vec![code.into(), code.split(" | ").next().unwrap().into()];
    }
    let tmp = std::env::temp_dir().join(format!("gram-shard-cut-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let work = tmp.join("work");
    let options = BuildOptions {
        generate: None,
        shard_size: 2,
        work_dir: Some(work.clone()),
        progress: false,
        code_file: None,
        on_error: gram::catalog::OnError::Stop,
    };
    let settings = gram::settings::Settings::default();
    let meta = serde_json::json!({"model": {"fingerprint": "x"}});
    let run =
        |out: &std::path::Path| build_with(&model, &tok, &settings, &items, &options, out, &meta);
    run(&tmp.join("clean.gram")).unwrap();
    let clean = std::fs::read(tmp.join("clean.gram")).unwrap();
    let one = work.join("shard-000001.bin");
    // Magic, key, checksum: 8 bytes each, then the payload.
    for cut in [0, 4, 8, 12, 16, 20, 23, 24, 25, 30] {
        assert!(run(&tmp.join("missing/index.gram")).is_err());
        let bytes = std::fs::read(&one).unwrap();
        assert!(
            bytes.len() > 30,
            "a shard of two products is {} bytes",
            bytes.len()
        );
        std::fs::write(&one, &bytes[..cut]).unwrap();
        let out = tmp.join(format!("cut-{cut}.gram"));
        let resumed = run(&out).unwrap();
        assert_eq!(resumed.reused_shards, 2, "cut at {cut}");
        assert!(std::fs::read(&out).unwrap() == clean, "cut at {cut}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// End to end on the ESCI sample (16 real Amazon products, `tools/make_esci_catalog.py`) with
/// SmolLM2: product codes generated over the 3,000-code list, the sample's query searched; the
/// path runs and returns catalog products.
#[test]
fn esci_sample_end_to_end_with_smollm2() {
    let model = smollm2_dir();
    let tmp = std::env::temp_dir().join(format!("gram-esci-{}", std::process::id()));
    let catalog = repo().join("tests/golden/esci-catalog.jsonl");
    let codes = repo().join("tests/golden/codes-smollm2.txt");
    let out = ok(&index_build(
        &model,
        &catalog,
        &tmp,
        &["--codes", codes.to_str().unwrap(), "--beam", "20"],
    ));
    assert!(out.contains(r#""products":16"#), "{out}");
    let query = "06 bmw 325i radio oem not navigation system";
    let out = ok(&gram(&[
        "search",
        "--index",
        tmp.to_str().unwrap(),
        "--k",
        "5",
        "--beam",
        "20",
        query,
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<String> = std::fs::read_to_string(&catalog)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let products = v["products"].as_array().unwrap();
    assert!(!products.is_empty(), "{out}");
    for p in products {
        assert!(ids.contains(&p["id"].as_str().unwrap().to_string()), "{p}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// An index holding a code longer than beam search can generate (`gram index build` refuses
/// such codes; a foreign or hand-made index may hold one) is refused when the engine opens,
/// not request by request.
#[test]
fn an_index_with_a_code_past_the_generation_limit_is_refused_at_open() {
    use gram::index::{self, CodePostings, Product};
    use gram::trie::{CodeSet, Trie};
    let dir = fresh_dir("longcode");
    let n = gram::beam::MAX_NEW_TOKENS;
    let mut tokens = vec![5u32];
    tokens.extend((1..n).map(|i| 10 + (i % 50) as u32));
    let set = CodeSet {
        texts: vec!["long".into(), "short".into()],
        offsets: vec![0, n, n + 1],
        tokens: [tokens, vec![6]].concat(),
    };
    let trie = Trie::build(&set, 128, 2).unwrap();
    let postings: Vec<CodePostings> = (0..set.len())
        .map(|c| CodePostings {
            products: vec![0],
            pt: vec![vec![0.5; set.code_tokens(c).len()]],
        })
        .collect();
    let products = vec![Product {
        id: "p0".into(),
        title: "a product".into(),
    }];
    let meta = serde_json::json!({"model": {"fingerprint": "test"}});
    let file = dir.join("index.gram");
    index::write(&file, &set, &trie, &postings, &products, " | ", &meta).unwrap();
    let e = gram::search::Engine::open(&dir, None, &gram::LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&format!("longest code has {n} tokens")), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The generation threshold keeps a generated code whose sequence probability (its EOS
/// included) is at least the threshold: at one between two of a product's beams, exactly the
/// beams at or above it are indexed for each product. (The other tests use 0 and 1, where the
/// comparison cannot show: `>` for `>=`, or a length-normalized probability, passed them.)
#[test]
fn the_generation_threshold_keeps_the_codes_at_or_above_it() {
    use gram::beam::{self, BeamOptions, Query};
    use gram::catalog::{build, Generate};
    use gram::index::Index;
    use gram::settings::Settings;
    use gram::trie::{CodeSet, Trie};
    use std::collections::BTreeSet;
    let dir = model_dir("tiny-qwen2");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let items = items(&["Green velvet sofa", "Oak desk", "Blue wool rug"]);
    let list: Vec<String> = std::fs::read_to_string(repo().join("tests/golden/codes-tiny.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let eos = model.config.eos_token_ids[0];
    let set = CodeSet::from_texts(list.clone(), &tok, eos).unwrap();
    let trie = Trie::build(&set, model.config.vocab_size, eos).unwrap();
    let settings = Settings::default();
    // Each product's beams as the build runs them (beam 4), with their probabilities.
    let beams: Vec<Vec<(String, f32)>> = items
        .iter()
        .map(|it| {
            let q = Query {
                prompt: tok.encode(&settings.product_prompt(&it.title)).unwrap(),
                options: BeamOptions {
                    beam: 4,
                    max_new_tokens: trie.max_len() + 1,
                    ..Default::default()
                },
            };
            let out = beam::search(&model, &trie, &[q]).unwrap().remove(0);
            (out.codes.iter())
                .map(|c| {
                    let p = c.token_logprobs.iter().sum::<f32>().exp();
                    (set.texts[c.code.unwrap() as usize].clone(), p)
                })
                .collect()
        })
        .collect();
    // Exactly product 0's second beam's probability (the build computes the same bits: its
    // batches give each product's beams as alone): that beam is kept, the third is not.
    let mut p0: Vec<f32> = beams[0].iter().map(|b| b.1).collect();
    p0.sort_by(|a, b| b.total_cmp(a));
    assert!(p0.len() == 4 && p0[1] > p0[2], "{p0:?}");
    let threshold = p0[1];
    let generate = Generate {
        codes: list,
        beam: 4,
        threshold,
        batch: 2,
        max_new_tokens: 16,
    };
    let path = std::env::temp_dir().join(format!("gram-threshold-{}.gram", std::process::id()));
    let meta = serde_json::json!({"model": {"fingerprint": "threshold"}});
    build(
        &model,
        &tok,
        &settings,
        &items,
        Some(&generate),
        &path,
        &meta,
    )
    .unwrap();
    let ix = Index::open(&path).unwrap();
    let mut kept = 0;
    for (pi, b) in beams.iter().enumerate() {
        let want: BTreeSet<String> = (b.iter())
            .filter(|(_, p)| *p >= threshold)
            .map(|(t, _)| t.clone())
            .collect();
        let got: BTreeSet<String> = (0..ix.num_codes() as u32)
            .filter(|&c| {
                let n = ix.code(c).unwrap().n_tokens as usize;
                let (pq, w) = (vec![0.5; n], vec![-1.0; n]);
                let list = ix.postings(c, &pq, &w).unwrap();
                list.products.contains(&(pi as u32))
            })
            .map(|c| ix.code_text(c).unwrap().into_owned())
            .collect();
        assert_eq!(got, want, "product {pi} at threshold {threshold}: {b:?}");
        kept += want.len();
    }
    assert!(
        (2..12).contains(&kept),
        "{kept} of 12 beams kept: {beams:?} at {threshold}"
    );
    std::fs::remove_file(&path).unwrap();
}
