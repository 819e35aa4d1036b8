//! The `gram lm` command-line contract (users' scripts parse it): one JSON object with the
//! prompt's ids, the top-N next tokens most likely first, and with `--greedy` the continuation's
//! text; bad arguments exit non-zero with an `error:` line, never a panic.

mod common;

use std::process::Command;

use common::*;

fn gram(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(args)
        .output()
        .expect("run gram")
}

#[test]
fn lm_prints_the_contract() {
    let g = golden("tiny-llama.json");
    let case = &g["cases"][1];
    let dir = model_dir("tiny-llama");
    let prompt = case["prompt"].as_str().unwrap();
    let greedy = u32s(&case["greedy_ids"]);
    let n = greedy.len().to_string();
    let out = gram(&[
        "lm",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--top",
        "7",
        "--greedy",
        &n,
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object on one line");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(u32s(&v["tokens"]), u32s(&case["ids"]));
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 7);
    // Most likely first, and the same as the golden logits' top 7.
    let logits = f32s(&case["logits"]);
    let lp = gram::lm::log_softmax(&logits);
    let want = gram::lm::top_n(&lp, 7);
    for (got, want) in top.iter().zip(&want) {
        assert_eq!(got["id"].as_u64().unwrap() as u32, want.id);
        assert!((got["logprob"].as_f64().unwrap() as f32 - want.logprob).abs() < 1e-4);
    }
    assert_eq!(
        v["text"].as_str().unwrap(),
        case["greedy_text"].as_str().unwrap()
    );
    assert_eq!(u32s(&v["greedy_tokens"]), greedy);
}

#[test]
fn lm_without_greedy_has_no_text() {
    let dir = model_dir("tiny-qwen2");
    let out = gram(&[
        "lm",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "sofa",
        "--top",
        "3",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("text").is_none());
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = model_dir("tiny-qwen2");
    let d = dir.to_str().unwrap();
    for (args, says) in [
        (
            vec!["lm", "--model", "/nonexistent/model", "--prompt", "x"],
            "not a directory",
        ),
        (
            vec!["lm", "--model", d, "--prompt", "x", "--threads", "0"],
            "--threads",
        ),
        (
            vec!["lm", "--model", d, "--prompt", "x", "--dtype", "int3"],
            "--dtype",
        ),
        // tiny-qwen2 adds no BOS: an empty prompt has no tokens at all.
        (vec!["lm", "--model", d, "--prompt", ""], "no tokens"),
    ] {
        let out = gram(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error:") && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `gram codes`: one JSON line per prompt, codes best first, each a line of the code file, with
/// one log-prob per generated token (EOS included).
#[test]
fn codes_prints_the_contract() {
    let dir = model_dir("tiny-qwen2");
    let codes = std::env::temp_dir().join(format!("gram-cli-codes-{}.txt", std::process::id()));
    let texts = [
        "sofa | velvet | green",
        "sofa",
        "lamp | brass",
        "rug | wool",
        "chair",
    ];
    std::fs::write(&codes, texts.join("\n") + "\n").unwrap();
    let out = gram(&[
        "codes",
        "--model",
        dir.to_str().unwrap(),
        "--codes",
        codes.to_str().unwrap(),
        "--beam",
        "3",
        "--threads",
        "1",
        "green sofa",
        "brass lamp",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one JSON object per prompt");
    for (line, prompt) in lines.iter().zip(["green sofa", "brass lamp"]) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["prompt"], prompt);
        let got = v["codes"].as_array().unwrap();
        assert!((1..=3).contains(&got.len()), "{line}");
        let scores: Vec<f64> = got.iter().map(|c| c["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first");
        for c in got {
            assert!(texts.contains(&c["code"].as_str().unwrap()));
            let lps = f32s(&c["token_logprobs"]);
            let mean = lps.iter().sum::<f32>() / lps.len() as f32;
            assert!((mean as f64 - c["score"].as_f64().unwrap()).abs() < 1e-4);
        }
    }

    // Bad input: an error line and a failing status, never a panic.
    let bad = |extra: &[&str], code_file: &str| {
        let mut args = vec![
            "codes",
            "--model",
            dir.to_str().unwrap(),
            "--codes",
            code_file,
        ];
        args.extend_from_slice(extra);
        let out = gram(&args);
        assert!(!out.status.success(), "{extra:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let c = codes.to_str().unwrap();
    assert!(bad(&["--beam", "0", "x"], c).contains("beam width 0"));
    assert!(bad(&["--beam", "100000", "x"], c).contains("out of range"));
    assert!(bad(&["--normalize", "sideways", "x"], c).contains("--normalize"));
    assert!(bad(&["x"], "/nonexistent/codes.txt").contains("/nonexistent/codes.txt"));
    let empty = std::env::temp_dir().join(format!("gram-cli-empty-{}.txt", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    assert!(bad(&["x"], empty.to_str().unwrap()).contains("empty"));
    let long = "sofa ".repeat(2000);
    assert!(bad(&[&long], c).contains("exceeds the model's"));
    std::fs::remove_file(&codes).unwrap();
    std::fs::remove_file(&empty).unwrap();
}
