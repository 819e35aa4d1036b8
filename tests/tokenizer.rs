//! Token ids against transformers' `tokenizer(text)["input_ids"]` (tests/golden/tokenize.json):
//! SmolLM2's real tokenizer and the tiny fixtures' (one of which adds BOS).

mod common;

use common::*;
use gram::Tokenizer;

#[test]
fn ids_match_transformers() {
    let g = golden("tokenize.json");
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap() {
        let name = case["tokenizer"].as_str().unwrap();
        let path = if name == "smollm2-135m-instruct" {
            shared_data().join("smollm2-135m-instruct/tokenizer.json")
        } else {
            model_dir(name).join("tokenizer.json")
        };
        let tok = Tokenizer::from_file(&path).unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            u32s(&case["ids"]),
            "{name}: {text:?}"
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} cases");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let err = Tokenizer::from_file(&repo().join("models/nope/tokenizer.json"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not found"), "{err}");
}

/// A copy of tiny-llama's `tokenizer.json` changed by `edit`, in a fresh directory.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let dir = fresh_dir(&format!("tokenizer-{name}"));
    let path = model_dir("tiny-llama").join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    let out = dir.join("tokenizer.json");
    std::fs::write(&out, json.to_string()).unwrap();
    out
}

/// Configurations the `tokenizers` crate accepts but panics on, at load or on every input:
/// each is a load error naming the file, never a panic. (Found by fuzzing.)
#[test]
fn a_tokenizer_that_panics_is_an_error() {
    use serde_json::json;
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "charsmap",
            Box::new(|j| {
                j["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": ""})
            }),
        ),
        (
            "subword-prefix",
            Box::new(|j| j["model"]["continuing_subword_prefix"] = json!("##")),
        ),
        (
            "empty-replace",
            Box::new(|j| {
                j["normalizer"] =
                    json!({"type": "Replace", "pattern": {"String": ""}, "content": "x"})
            }),
        ),
        (
            "fixed-length-0",
            Box::new(|j| j["pre_tokenizer"] = json!({"type": "FixedLength", "length": 0})),
        ),
        (
            "missing-special",
            Box::new(|j| {
                j["post_processor"]["special_tokens"]
                    .as_object_mut()
                    .unwrap()
                    .remove("<|im_start|>");
            }),
        ),
    ];
    for (name, edit) in cases {
        let path = edited(name, edit);
        let err = match Tokenizer::from_file(&path) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("tokenizer.json"), "{name}: {err}");
        // And through the CLI: an `error:` line, exit status 1, not a panic's 101.
        let dir = copy_model(&model_dir("tiny-llama"), &format!("tokenizer-cli-{name}"));
        std::fs::copy(&path, dir.join("tokenizer.json")).unwrap();
        let out = gram(&["lm", "--model", dir.to_str().unwrap(), "--prompt", "hello"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error:"), "{name}: {stderr}");
    }
}

/// A regex pre-tokenizer that backtracks past oniguruma's limit on some inputs only: those
/// inputs are an error, the others encode.
#[test]
fn a_tokenizer_that_panics_on_one_input_is_an_error_for_that_input() {
    use serde_json::json;
    let path = edited("backtracking", |j| {
        j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]});
    });
    let tok = Tokenizer::from_file(&path).unwrap();
    assert!(!tok.encode("hello world").unwrap().is_empty());
    let bad = format!("{}b", "a".repeat(40));
    let err = tok.encode(&bad).unwrap_err().to_string();
    assert!(err.contains("tokenizers library failed"), "{err}");
}

/// `truncation` and `padding` in tokenizer.json are dropped, as transformers' `tokenizer(text)`
/// drops them: a prompt is never cut short unseen.
#[test]
fn truncation_and_padding_in_the_file_are_ignored() {
    use serde_json::json;
    let plain = Tokenizer::from_file(&model_dir("tiny-llama").join("tokenizer.json")).unwrap();
    let text = "hello world, a longer prompt than two tokens";
    let want = plain.encode(text).unwrap();
    assert!(want.len() > 5);
    for (name, stride) in [("truncation", 0), ("truncation-stride", 5)] {
        let path = edited(name, |j| {
            j["truncation"] = json!({"direction": "Right", "max_length": 2,
                "strategy": "LongestFirst", "stride": stride});
            j["padding"] = json!({"strategy": {"Fixed": 64}, "direction": "Right",
                "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"});
        });
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{name}");
        assert_eq!(
            tok.encode_plain(text).unwrap(),
            plain.encode_plain(text).unwrap(),
            "{name}"
        );
    }
}

/// A word-level tokenizer without its unk token in the vocabulary loads (as in transformers):
/// only the texts with unknown words are errors, each when it is encoded.
#[test]
fn a_tokenizer_that_errs_on_unknown_words_still_loads() {
    let dir = fresh_dir("tokenizer-wordlevel");
    let path = dir.join("tokenizer.json");
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"green": 0, "sofa": 1}, "unk_token": "<unk>"}
    });
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.encode("green sofa").unwrap(), vec![0, 1]);
    assert!(tok.encode("a red sofa").is_err());
}

/// A tokenizer whose post-processor adds an id past the model's vocabulary is not this
/// model's: refused at load like one whose vocabulary is too large, not on every query.
#[test]
fn a_post_processor_id_past_the_vocabulary_is_refused() {
    use serde_json::json;
    let fits = Tokenizer::from_file(&edited("template-ok", |_| {})).unwrap();
    fits.check_fits(512).unwrap();
    let path = edited("template-id", |j| {
        j["post_processor"]["special_tokens"]["<|im_start|>"]["ids"] = json!([100000]);
    });
    let e = Tokenizer::from_file(&path)
        .unwrap()
        .check_fits(512)
        .unwrap_err()
        .to_string();
    assert!(e.contains("post-processor adds id 100000"), "{e}");
}

/// BPE dropout makes every encoding random: refused, naming the setting; 0 and 1 (no merge
/// dropped, every merge dropped) are deterministic and load.
#[test]
fn bpe_dropout_is_refused() {
    use serde_json::json;
    let e = Tokenizer::from_file(&edited("dropout", |j| j["model"]["dropout"] = json!(0.5)))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("dropout 0.5") && e.contains("tokenizer.json"),
        "{e}"
    );
    for p in [0.0, 1.0] {
        let path = edited(&format!("dropout-{p}"), |j| {
            j["model"]["dropout"] = json!(p)
        });
        Tokenizer::from_file(&path).unwrap();
    }
}
