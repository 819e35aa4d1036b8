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
            repo().join("../shared/data/smollm2-135m-instruct/tokenizer.json")
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
