//! The tokenizer's unit tests (in their own file to keep `tokenizer.rs` to the code).

use super::*;
use std::path::PathBuf;

/// `clean_up_tokenization_spaces` from `tokenizer_config.json`: applied by `decode` to a
/// word-level model, as transformers 5.24's `PreTrainedTokenizerFast.decode` gives ("a, b's?
/// donn't" with it, "a , b 's ? don n't" without), and not to a BPE model, where
/// transformers ignores it (every fixture tokenizer is BPE: unchanged).
#[test]
fn decode_cleans_up_spaces_where_transformers_does() {
    let dir = std::env::temp_dir().join(format!("gram-tok-cleanup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": {
            "a": 0, "b": 1, ",": 2, "[UNK]": 3, "'s": 4, "?": 5, "n't": 6, "don": 7}},
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let ids = [0, 2, 1, 4, 5, 7, 6];
    let config = dir.join("tokenizer_config.json");
    let decode = |config_text: Option<&str>| {
        match config_text {
            Some(t) => std::fs::write(&config, t).unwrap(),
            None => {
                let _ = std::fs::remove_file(&config);
            }
        }
        Tokenizer::from_file(&path).unwrap().decode(&ids).unwrap()
    };
    let on = r#"{"clean_up_tokenization_spaces": true}"#;
    assert_eq!(decode(Some(on)), "a, b's? donn't");
    assert_eq!(
        decode(Some(r#"{"clean_up_tokenization_spaces": false}"#)),
        "a , b 's ? don n't"
    );
    assert_eq!(decode(None), "a , b 's ? don n't");
    // A config JSON cannot parse (Python's NaN) costs only the flag, not the tokenizer.
    let nan = r#"{"clean_up_tokenization_spaces": true, "x": NaN}"#;
    assert_eq!(decode(Some(nan)), "a , b 's ? don n't");
    // A BPE model: the flag is ignored.
    let bpe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    std::fs::copy(bpe.join("tokenizer.json"), &path).unwrap();
    let plain = Tokenizer::from_file(&bpe.join("tokenizer.json")).unwrap();
    let text = "it 's a sofa , is n't it ?";
    let ids = plain.encode_plain(text).unwrap();
    std::fs::write(&config, on).unwrap();
    let flagged = Tokenizer::from_file(&path).unwrap();
    assert_eq!(flagged.decode(&ids).unwrap(), plain.decode(&ids).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every tokenizer of the fixtures (SmolLM2's where fetched).
fn fixtures() -> Vec<(String, Value)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path().join("tokenizer.json"))
        .collect();
    let smollm2 = crate::test_rng::shared_data().join("smollm2-135m-instruct/tokenizer.json");
    assert!(
        smollm2.exists(),
        "SmolLM2's tokenizer: {} is missing",
        smollm2.display()
    );
    paths.push(smollm2);
    paths.sort();
    let mut out: Vec<(String, Value)> = Vec::new();
    for p in paths.into_iter().filter(|p| p.exists()) {
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        // Once per distinct tokenizer (tiny-qwen2 and tiny-qwen3 share theirs).
        if out.iter().all(|(_, j)| *j != json) {
            out.push((p.display().to_string(), json));
        }
    }
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("fixture tokenizers: {names:?}");
    // gram-icecat-2m, tiny-llama, tiny-qwen2 (= tiny-qwen3) and SmolLM2 at least.
    assert!(out.len() >= 4, "fixture tokenizers: {names:?}");
    out
}

fn tokenizer(json: &Value) -> Tokenizer {
    let inner: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    Tokenizer::new(inner)
}

/// The fixture's tokenizer, and variants of it with each other recognized normalizer and
/// pre-tokenizer (the vocabulary and merges stay the fixture's).
fn variants(json: &Value) -> Vec<(String, Tokenizer)> {
    let byte_level = |regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": regex})
    };
    let split = |regex: &str| {
        json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
               "invert": false})
    };
    let pre = [
        ("bytelevel", byte_level(true)),
        (
            "digits+bytelevel",
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        ),
        (
            "digit-runs+bytelevel",
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": false}, byte_level(true)]}),
        ),
        (
            "qwen2",
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
        ),
        (
            "llama3",
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
        ),
    ];
    let norm = [
        ("none", Value::Null),
        ("nfc", json!({"type": "NFC"})),
        (
            "nfkc+lower",
            json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}),
        ),
    ];
    let mut out = vec![("as is".to_string(), tokenizer(json))];
    for (pn, p) in &pre {
        for (nn, n) in &norm {
            let mut j = json.clone();
            j["pre_tokenizer"] = p.clone();
            j["normalizer"] = n.clone();
            if *pn == "llama3" {
                // Llama 3's post-processor: ByteLevel, then its template.
                let mut list = vec![json!({"type": "ByteLevel", "add_prefix_space": true,
                                           "trim_offsets": false, "use_regex": true})];
                list.extend(json["post_processor"].as_object().map(|p| json!(p)));
                j["post_processor"] = json!({"type": "Sequence", "processors": list});
            }
            let t = tokenizer(&j);
            assert!(t.has_plain_split(), "{pn} {nn}");
            out.push((format!("{pn}, {nn}"), t));
        }
    }
    out
}

/// Strings that exercise the regexes' corners.
const CASES: &[&str] = &[
    "sofa | velvet | green",
    "memory cartridge | hp",
    "ethnic sets | cynthia's fashion",
    "Sofa | VELVET | Green",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    " ",
    "   ",
    "x",
    "don't I'LL we've they're it'S you'd I'm 'tis ''s '' ' s",
    "a'sb 'll'll''re",
    "usb 3.0 | 128gb | 2 pack",
    "12345678 a1b22c333 x 4 5",
    "12 | 1234567 |  99  ",
    "!!! ??? ... ,,,",
    "a-b a_b a.b a/b a\\b a|b |a | a",
    "(x) [y] {z} <w> #1 $2 %3 ^4 &5 *6",
    "~`@=+;:\"",
    "<|endoftext|>",
    "a <|im_start|> b",
    "<s>x</s><pad>",
    "< s >",
    "café | crème brûlée",
    "naïve  résumé",
    "日本語 | テスト",
    "emoji 😀 | 👍🏽",
    "ﬁne ﬀ ①②③ ½",
    "tab\there",
    "new\nline",
    "nbsp\u{a0}here",
    "İstanbul ΣΑΣ",
    "\u{7f}del \u{1}ctl",
    "x\r\ny",
];

/// The memo's ids for `text` against `encode_plain`'s. Where the tokenizer's split is
/// reproduced, printable ASCII without an added token must take the memo's path.
/// [`check`] on every text, for every fixture tokenizer and each of its variants.
fn check_every_variant(texts: &[String]) {
    for (path, json) in fixtures() {
        for (variant, t) in variants(&json) {
            let name = format!("{path} ({variant})");
            let mut memo = t.plain_memo();
            for text in texts {
                check(&name, &t, &mut memo, text);
            }
        }
    }
}

fn check(name: &str, t: &Tokenizer, memo: &mut PlainMemo, text: &str) {
    let want = t.encode_plain(text).unwrap();
    let mut got = vec![7];
    let fast = memo.try_fast(text, &mut got);
    if !fast {
        assert_eq!(got, [7], "{name}: {text:?}");
        memo.encode_into(text, &mut got).unwrap();
    }
    assert_eq!(&got[1..], want.as_slice(), "{name}: {text:?}");
    let lower = match &t.plain {
        Some(p) if p.lowercase => text.to_ascii_lowercase(),
        _ => text.to_owned(),
    };
    let added = t
        .inner
        .get_added_tokens_decoder()
        .into_values()
        .any(|a| text.contains(&a.content) || lower.contains(&a.content));
    let ascii = text.bytes().all(|b| (0x20..0x7f).contains(&b));
    assert_eq!(
        fast,
        t.has_plain_split() && ascii && !added,
        "{name}: {text:?}"
    );
}

#[test]
fn memo_matches_encode_plain_on_corner_cases() {
    for (path, json) in fixtures() {
        for (variant, t) in variants(&json) {
            let name = format!("{path} ({variant})");
            let mut memo = t.plain_memo();
            // Twice: the second pass is served by the memo.
            for _ in 0..2 {
                for text in CASES {
                    check(&name, &t, &mut memo, text);
                }
            }
        }
    }
}

/// Random strings from an alphabet dense in the regexes' corners (spaces, apostrophes and
/// contraction letters, digits, symbols, case, a few non-ASCII and control characters and
/// added tokens), each compared with `encode_plain`.
#[test]
fn memo_matches_encode_plain_on_random_text() {
    const ATOMS: &[&str] = &[
        " ",
        " ",
        " ",
        "  ",
        "'",
        "'",
        "s",
        "t",
        "re",
        "ve",
        "m",
        "ll",
        "d",
        "S",
        "LL",
        "Re",
        "a",
        "e",
        "x",
        "Q",
        "Z",
        "sofa",
        "Velvet",
        "green",
        "|",
        " | ",
        "-",
        ".",
        ",",
        "!",
        "?",
        "/",
        "(",
        ")",
        "&",
        "_",
        "\"",
        "0",
        "1",
        "7",
        "42",
        "2024",
        "é",
        "ß",
        "Ω",
        "日",
        "😀",
        "\t",
        "\n",
        "\u{a0}",
        "ﬁ",
        "<",
        ">",
        "<|im_start|>",
        "<s>",
        "</s>",
        "<|endoftext|>",
        "<pad>",
    ];
    let mut rng = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1du64);
    let mut next = |m: usize| (rng() % m as u64) as usize;
    let texts: Vec<String> = (0..3000)
        .map(|i| {
            let atoms = 1 + next(12);
            // Most texts ASCII only, as codes are (the memo's path).
            let ascii = i % 4 != 0;
            (0..atoms)
                .map(|_| loop {
                    let a = ATOMS[next(ATOMS.len())];
                    if !ascii || a.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                        break a;
                    }
                })
                .collect()
        })
        .collect();
    check_every_variant(&texts);
}

/// Random printable ASCII, every byte equally likely.
#[test]
fn memo_matches_encode_plain_on_random_ascii() {
    let mut rng = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15u64);
    let mut next = |m: usize| (rng() % m as u64) as usize;
    let texts: Vec<String> = (0..2000)
        .map(|_| {
            let len = 1 + next(24);
            (0..len)
                .map(|_| (0x20 + next(0x5f) as u8) as char)
                .collect()
        })
        .collect();
    check_every_variant(&texts);
}

/// Configurations it does not reproduce take the plain path (and still give its ids).
#[test]
fn unknown_configurations_take_the_plain_path() {
    let (_, json) = fixtures()
        .into_iter()
        .find(|(name, _)| name.contains("tiny-llama"))
        .unwrap();
    let mut unknown = Vec::new();
    let mut j = json.clone();
    j["normalizer"] = json!({"type": "Replace", "pattern": {"String": " "}, "content": "_"});
    unknown.push(j);
    let mut j = json.clone();
    j["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": true,
                                "trim_offsets": true, "use_regex": true});
    unknown.push(j);
    let mut j = json.clone();
    j["pre_tokenizer"] = json!({"type": "Whitespace"});
    unknown.push(j);
    let mut j = json.clone();
    // Dropout 1 (every merge dropped) loads, deterministic, but is no plain split.
    j["model"]["dropout"] = json!(1.0);
    unknown.push(j);
    let mut j = json.clone();
    j["post_processor"] = json!({"type": "BertProcessing", "sep": ["<|endoftext|>", 0],
                                 "cls": ["<|endoftext|>", 0]});
    unknown.push(j);
    for j in &unknown {
        let t = tokenizer(j);
        assert!(!t.has_plain_split(), "{}", j["pre_tokenizer"]);
        if j["model"]["dropout"].is_null() {
            let mut memo = t.plain_memo();
            for text in CASES {
                check("unknown", &t, &mut memo, text);
            }
        }
    }
}
