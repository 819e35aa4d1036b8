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
