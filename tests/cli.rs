//! The `gram lm` command-line contract (users' scripts parse it): one JSON object with the
//! prompt's ids, the top-N next tokens most likely first, and with `--greedy` the continuation's
//! text; bad arguments exit non-zero with an `error:` line, never a panic. Commands that run the
//! model say on stderr which backend `--device` chose (`backend: ...`).

mod common;

use std::path::PathBuf;

use common::*;

/// The error of a failed run: its status is non-zero, nothing panicked, and stderr ends with
/// one `error: ` line (after the `backend: ` line, when the model's backend was chosen).
fn error_line(args: &[&str], out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    let (last, before) = lines
        .split_last()
        .unwrap_or_else(|| panic!("{args:?}: no stderr"));
    assert!(last.starts_with("error: "), "{args:?}: {err}");
    if args.first() != Some(&"serve") {
        // The server logs; the other commands say only which backend, and warnings.
        assert!(
            before
                .iter()
                .all(|l| l.starts_with("backend: ") || l.starts_with("warning: ")),
            "{args:?}: {err}"
        );
    }
    last.to_string()
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

/// A prompt may start with `-` (a user's text, "-5 volts"): it is the prompt, tokenized as
/// given, not a flag; and one that spells a flag is text too.
#[test]
fn lm_takes_a_prompt_that_starts_with_a_hyphen() {
    let dir = model_dir("tiny-qwen2");
    let d = dir.to_str().unwrap();
    for prompt in ["-5 volts", "--help"] {
        let out = gram(&["lm", "--model", d, "--prompt", prompt, "--top", "1"]);
        assert!(
            out.status.success(),
            "{prompt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tokenizer = gram::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        assert_eq!(
            u32s(&v["tokens"]),
            tokenizer.encode(prompt).unwrap(),
            "{prompt}"
        );
    }
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
    assert!(
        v.get("text").is_none() && v.get("greedy_tokens").is_none(),
        "{v}"
    );
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
        (
            vec!["lm", "--model", d, "--prompt", "x", "--top", "0"],
            "--top",
        ),
        (
            vec!["lm", "--model", d, "--prompt", "x", "--top", "1000000000"],
            "--top 1000000000: expected 1..=",
        ),
        (
            vec![
                "lm",
                "--model",
                d,
                "--prompt",
                "x",
                "--device",
                "cpu",
                "--threads",
                "5000",
            ],
            "--threads 5000: expected 1..=1024",
        ),
        // A device or a directory as an input file: refused at once, not read until memory
        // runs out (`/dev/zero`) or typing comes.
        #[cfg(target_os = "linux")]
        (
            vec!["codes", "--model", d, "--codes", "/dev/zero", "x"],
            "/dev/zero: a device or socket (expected a file or a pipe)",
        ),
        #[cfg(target_os = "linux")]
        (
            vec![
                "index",
                "build",
                "--model",
                d,
                "--catalog",
                "/dev/zero",
                "--out",
                "/nonexistent/gram-never-made",
            ],
            "/dev/zero: a device or socket (expected a file or a pipe)",
        ),
        (
            vec!["codes", "--model", d, "--codes", "/", "x"],
            "a directory (expected a file or a pipe)",
        ),
    ] {
        let err = error_line(&args, &gram(&args));
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // The generation's settings without a generation: refused (clap's usage), not ignored.
    for flag in [["--beam", "5"], ["--threshold", "0.5"], ["--batch", "4"]] {
        let mut args = vec![
            "index",
            "build",
            "--model",
            d,
            "--catalog",
            "c.jsonl",
            "--out",
            "ix",
        ];
        args.extend(flag);
        let out = gram(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.contains("panicked"),
            "{args:?}"
        );
        assert!(
            err.contains("<--codes <CODES>|--generate>"),
            "{args:?}: {err}"
        );
    }
}

/// `--index` naming something other than an index directory says what it names instead.
#[test]
fn an_index_flag_that_names_no_index_says_what_it_names() {
    let model = model_dir("tiny-qwen2");
    let tmp = std::env::temp_dir().join(format!("gram-cli-noindex-{}", std::process::id()));
    let (empty, unfinished) = (tmp.join("empty"), tmp.join("unfinished"));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(unfinished.join("index.shards")).unwrap();
    let file = tmp.join("index.gram");
    std::fs::write(&file, b"not read").unwrap();
    for (dir, says) in [
        (&model, "is a model directory, not an index"),
        (&empty, "is not an index (no index.gram)"),
        (&unfinished, "holds a build that did not finish"),
        (&file, "is a file: pass the index's directory"),
    ] {
        let d = dir.to_str().unwrap();
        for args in [
            vec!["search", "--index", d, "mouse"],
            vec!["index", "inspect", d],
        ] {
            let err = error_line(&args, &gram(&args));
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `gram codes`: one JSON line per prompt, codes best first, each a line of the code file, with
/// one log-prob per generated token (EOS included).
/// A code list of five codes, written to a temporary file named by `tag`: its path and texts.
fn code_list(tag: &str) -> (PathBuf, [&'static str; 5]) {
    let texts = [
        "sofa | velvet | green",
        "sofa",
        "lamp | brass",
        "rug | wool",
        "chair",
    ];
    let path = std::env::temp_dir().join(format!("gram-cli-{tag}-{}.txt", std::process::id()));
    std::fs::write(&path, texts.join("\n") + "\n").unwrap();
    (path, texts)
}

/// A negative length penalty is a number, not a flag: `--length-penalty -1` scores a code
/// `sum(logprobs) / length^-1`.
#[test]
fn codes_takes_a_negative_length_penalty() {
    let dir = model_dir("tiny-qwen2");
    let (codes, _) = code_list("negative-penalty");
    let out = gram(&[
        "codes",
        "--model",
        dir.to_str().unwrap(),
        "--codes",
        codes.to_str().unwrap(),
        "--beam",
        "2",
        "--length-penalty",
        "-1",
        "green sofa",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for c in v["codes"].as_array().unwrap() {
        let lps = f32s(&c["token_logprobs"]);
        let want = lps.iter().map(|&x| x as f64).sum::<f64>() * lps.len() as f64;
        let got = c["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-3 * want.abs().max(1.0),
            "{got} against {want}"
        );
    }
    let _ = std::fs::remove_file(&codes);
}

#[test]
fn codes_prints_the_contract() {
    let dir = model_dir("tiny-qwen2");
    let (codes, texts) = code_list("codes");
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

    // Codes longer than --max-new-tokens can never be returned: a warning names them (the
    // answer held fewer codes without a word).
    let args = [
        "codes",
        "--model",
        dir.to_str().unwrap(),
        "--codes",
        codes.to_str().unwrap(),
        "--max-new-tokens",
        "2",
        "--threads",
        "1",
        "green sofa",
    ];
    let out = gram(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("take more than --max-new-tokens 2"), "{err}");
    assert!(err.contains("line 1, "), "{err}");

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
        error_line(&args, &gram(&args))
    };
    let c = codes.to_str().unwrap();
    assert!(bad(&["--beam", "0", "x"], c).contains("beam width 0"));
    assert!(bad(&["--beam", "100000", "x"], c).contains("out of range"));
    assert!(bad(&["--normalize", "sideways", "x"], c).contains("--normalize"));
    // Named by the option, not by the first prompt that meets it.
    for n in ["0", "300"] {
        let e = bad(&["--max-new-tokens", n, "x"], c);
        assert!(
            e.contains(&format!("max_new_tokens {n} is out of range")),
            "{e}"
        );
        assert!(!e.contains("query 0"), "{e}");
    }
    assert!(bad(&["x"], "/nonexistent/codes.txt").contains("/nonexistent/codes.txt"));
    let empty = std::env::temp_dir().join(format!("gram-cli-empty-{}.txt", std::process::id()));
    std::fs::write(&empty, "").unwrap();
    assert!(bad(&["x"], empty.to_str().unwrap()).contains("empty"));
    // A code listed twice: named by the file and its lines.
    std::fs::write(&empty, "sofa\nrug\nsofa\n").unwrap();
    let e = bad(&["x"], empty.to_str().unwrap());
    assert!(e.contains(&format!("{}: ", empty.display())), "{e}");
    let long = "sofa ".repeat(2000);
    // Named by its place and text, not "query 0".
    let e = bad(&["sofa", &long], c);
    assert!(e.contains("exceeds the model's"), "{e}");
    assert!(e.contains("prompt 2 (\"sofa sofa "), "{e}");
    assert!(!e.contains("query 0"), "{e}");
    std::fs::remove_file(&codes).unwrap();
    std::fs::remove_file(&empty).unwrap();
}

/// `gram codes`' options through the binary: `--length-penalty`, `--normalize children` and
/// `--no-trie` each give what `beam::search` gives in process with the same options (codes,
/// scores and token log-probs; the unconstrained run's decoded texts and its `invalid` count).
#[test]
fn codes_options_reach_the_search() {
    use gram::beam::{self, BeamOptions, Normalize, Query};
    let dir = model_dir("tiny-qwen2");
    let (codes, texts) = code_list("opts");
    let tok = gram::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = gram::Model::load(&dir, &Default::default()).unwrap();
    let eos = model.config.eos_token_ids[0];
    let set = gram::trie::CodeSet::from_texts(texts.map(String::from).to_vec(), &tok, eos).unwrap();
    let trie = gram::trie::Trie::build(&set, model.config.vocab_size, eos).unwrap();
    let base = BeamOptions {
        beam: 4,
        max_new_tokens: 6,
        ..Default::default()
    };
    let cases: [(&[&str], BeamOptions); 3] = [
        (
            &["--length-penalty", "0.5"],
            BeamOptions {
                length_penalty: 0.5,
                ..base
            },
        ),
        (
            &["--normalize", "children"],
            BeamOptions {
                normalize: Normalize::Children,
                ..base
            },
        ),
        (
            &["--no-trie"],
            BeamOptions {
                constrained: false,
                ..base
            },
        ),
    ];
    for (flags, options) in cases {
        let mut args = vec![
            "codes",
            "--model",
            dir.to_str().unwrap(),
            "--codes",
            codes.to_str().unwrap(),
            "--beam",
            "4",
            "--max-new-tokens",
            "6",
            "--threads",
            "1",
        ];
        args.extend_from_slice(flags);
        args.push("green sofa");
        let out = gram(&args);
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let q = Query {
            prompt: tok.encode("green sofa").unwrap(),
            options,
        };
        let want = beam::search(&model, &trie, &[q]).unwrap().remove(0);
        let got = v["codes"].as_array().unwrap();
        assert_eq!(got.len(), want.codes.len(), "{flags:?}: {v}");
        for (g, w) in got.iter().zip(&want.codes) {
            let text = match w.code {
                Some(id) => set.texts[id as usize].clone(),
                None => tok.decode(&w.tokens).unwrap(),
            };
            assert_eq!(g["code"], text.as_str(), "{flags:?}");
            assert_eq!(g["score"].as_f64().unwrap() as f32, w.score, "{flags:?}");
            assert_eq!(f32s(&g["token_logprobs"]), w.token_logprobs, "{flags:?}");
        }
        if options.constrained {
            assert!(v.get("invalid").is_none(), "{flags:?}: {v}");
        } else {
            assert_eq!(v["invalid"].as_u64(), Some(want.invalid as u64), "{v}");
        }
    }
    std::fs::remove_file(&codes).unwrap();
}

/// Every command that runs the model takes `--device` and says on stderr which backend it
/// chose; `--device cuda` where no GPU can run the model (no GPU here; on a GPU box, the tiny
/// models' head dims are not ones the CUDA kernels are built for) is a `device:` error with a
/// failing status, before anything is written.
#[test]
fn device_is_chosen_and_reported_by_every_model_command() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gram-cli-device-{}", std::process::id()));
    let lines: Vec<String> = ["sofa", "lamp", "rug"]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            serde_json::json!({"id": format!("p{i}"), "title": format!("oak {k}"), "codes": [k]})
                .to_string()
        })
        .collect();
    let ix = build_index(&tmp, "tiny-llama", &lines);
    let ix = ix.to_str().unwrap();
    let model = model_dir("tiny-llama");
    let model = model.to_str().unwrap();
    let codes = tmp.join("codes.txt");
    std::fs::write(&codes, "sofa\nlamp | brass\n").unwrap();
    let codes = codes.to_str().unwrap();
    let catalog = tmp.join("catalog.jsonl");
    let catalog = catalog.to_str().unwrap();
    let out_ix = tmp.join("ix-cuda");
    let out_ix = out_ix.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["lm", "--model", model, "--prompt", "sofa", "--threads", "1"],
        vec![
            "codes",
            "--model",
            model,
            "--codes",
            codes,
            "--threads",
            "1",
            "sofa",
        ],
        vec![
            "index",
            "build",
            "--model",
            model,
            "--catalog",
            catalog,
            "--out",
            out_ix,
            "--threads",
            "1",
        ],
        vec![
            "search",
            "--index",
            ix,
            "--k",
            "2",
            "--threads",
            "1",
            "oak sofa",
        ],
    ];
    for args in &commands {
        // --device cpu: the CPU, said on stderr before the JSON on stdout.
        let mut cpu = args.clone();
        cpu.extend(["--device", "cpu"]);
        let out = gram(&cpu);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{cpu:?}: {err}");
        // (index build then reports its progress.)
        assert_eq!(err.lines().next(), Some("backend: cpu"), "{cpu:?}: {err}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with('{'), "{cpu:?}: {stdout}");
        // auto (the default): one backend line, the CPU's or the GPU's.
        let out = gram(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("backend: ")).count(),
            1,
            "{args:?}: {err}"
        );
        assert!(
            err.starts_with("backend: cpu") || err.starts_with("backend: cuda on "),
            "{args:?}: {err}"
        );
        // --device cuda: a device error, nothing on stdout.
        let mut cuda = args.clone();
        cuda.extend(["--device", "cuda"]);
        let out = gram(&cuda);
        let err = error_line(&cuda, &out);
        assert!(err.starts_with("error: device: "), "{cuda:?}: {err}");
        assert!(out.stdout.is_empty(), "{cuda:?}");
    }
    // The server: the startup fails the same way (its log before the error line).
    let serve = [
        "serve",
        "--index",
        ix,
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--device",
        "cuda",
    ];
    let err = error_line(&serve, &gram(&serve));
    assert!(err.starts_with("error: device: "), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A query of the user's own (`gram search`, a judged query of `gram eval`) is bound by the
/// model's context only, not by the server's 64-token guard against its clients: `gram
/// eval` refused a 100-word judged query and scored it 0, which `evaluate.py` ranks.
#[test]
fn a_long_query_is_searched_and_evaluated() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gram-cli-long-{}", std::process::id()));
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "oak lamp", "lamp")]
        .into_iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string()
        })
        .collect();
    let ix = build_index(&tmp, "tiny-llama", &lines);
    let ix = ix.to_str().unwrap();
    let long = ["green oak sofa with a lamp"; 20].join(" ");
    let out = gram(&["search", "--index", ix, "--k", "2", "--threads", "1", &long]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["products"].as_array().unwrap().is_empty(), "{v}");
    let judged = tmp.join("judged.jsonl");
    std::fs::write(
        &judged,
        serde_json::json!({"query": long, "grades": {"p0": 3}}).to_string(),
    )
    .unwrap();
    let args = [
        "eval",
        "--index",
        ix,
        "--judgements",
        judged.to_str().unwrap(),
    ];
    let out = gram(&[&args[..], &["--threads", "1"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("refused"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["skipped"]["refused_by_engine"], 0, "{r}");
    // A bad query among good ones: named by its place and text, before anything is printed
    // (the queries before it were printed and those after never run).
    let out = gram(&[
        "search",
        "--index",
        ix,
        "--threads",
        "1",
        "oak",
        "   ",
        "lamp",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("query 2 (\"   \"): ") && err.contains("empty"),
        "{err}"
    );
    // The command's own option is named as such, not as the first query's fault.
    let out = gram(&["search", "--index", ix, "--beam", "0", "oak", "lamp"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--beam: ") && !err.contains("query 1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `gram eval` on a tiny index and hand-made grades: one JSON object with the metrics and
/// counts. Every query's beam (10) reaches all 3 codes, so all 4 products come back and the
/// ranking-free metrics are hand-checkable: recall, relevance rate, judged@10, what is
/// skipped. A judged product outside the index is dropped and counted; an empty query is
/// refused, counted and ranks nothing. JSONL and CSV give the same numbers; bad input is an
/// `error:` line.
#[test]
fn eval_reports_metrics_on_judgements() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gram-cli-eval-{}", std::process::id()));
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "oak lamp", "lamp")]
        .into_iter()
        .chain([("p2", "oak rug", "rug"), ("p3", "red sofa", "sofa")])
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string()
        })
        .collect();
    let ix = build_index(&tmp, "tiny-llama", &lines);
    let ix = ix.to_str().unwrap();
    let judged = [
        r#"{"query": "oak sofa", "grades": {"p0": 3, "p3": 2, "p1": 0, "ghost": 3}}"#,
        r#"{"query": "red lamp", "grades": {"p1": 1, "p2": 0}}"#,
        r#"{"query": "rug", "grades": {"p2": 0}}"#,
        r#"{"query": "  ", "grades": {"p2": 3}}"#,
    ];
    let jsonl = tmp.join("judged.jsonl");
    std::fs::write(&jsonl, judged.join("\n")).unwrap();
    let csv = tmp.join("judged.csv");
    let mut rows = vec!["query,docid,rating".to_string()];
    for l in judged {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        for (d, g) in v["grades"].as_object().unwrap() {
            rows.push(format!("\"{}\",{d},{g}", v["query"].as_str().unwrap()));
        }
    }
    std::fs::write(&csv, rows.join("\r\n")).unwrap();
    let per_query = tmp.join("per-query.jsonl");
    let eval = |file: &std::path::Path| {
        let args = [
            "eval",
            "--index",
            ix,
            "--judgements",
            file.to_str().unwrap(),
            "--threads",
            "1",
            "--device",
            "cpu",
            "--per-query",
            per_query.to_str().unwrap(),
        ];
        let out = gram(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("1 of 8 judged products are not in the index"),
            "{err}"
        );
        assert!(err.contains("query \"  \" refused"), "{err}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let r = eval(&jsonl);
    let m = &r["metrics"];
    let n = &r["queries_averaged"];
    let close = |v: &serde_json::Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-12;
    assert_eq!(r["queries"], 4);
    assert_eq!(r["queries_with_relevant"], 2);
    assert_eq!(r["judged_products"], 7);
    assert_eq!(r["judged_products_not_in_index"], 1);
    assert_eq!(
        r["batch_invariant"], true,
        "the CPU's codes never depend on the batch"
    );
    assert_eq!(r["skipped"]["refused_by_engine"], 1);
    // Every answered query returned a judged product; the refused one is not counted twice.
    assert_eq!(
        r["skipped"]["no_judged_product_in_top_300 (left out of relevance_rate)"], 0,
        "{r}"
    );
    assert_eq!(r["mean_candidates"], 4.0);
    assert_eq!(r["codes_per_query"], 3.0);
    assert_eq!(r["invalid_code_rate"], 0.0);
    // Recall: "oak sofa" 1 (p0, p3 both returned), the refused query 0; the other two have
    // nothing graded >= 2 and are left out.
    assert!(
        close(&m["recall@10"], 0.5) && close(&m["recall@300"], 0.5),
        "{r}"
    );
    assert_eq!(n["recall@10"], 2);
    // Relevance rate among the judged returned: 2/3 (p0, p3 of p0, p3, p1), 0/2, 0/1; the
    // refused query returned none and is left out.
    assert!(close(&m["relevance_rate@300"], 2.0 / 9.0), "{r}");
    assert_eq!(n["relevance_rate@300"], 3);
    // judged@10 of 4 returned: 3/4, 2/4, 1/4.
    assert!(close(&m["judged@10"], 0.5), "{r}");
    // nDCG: "rug" has no positive grade; the refused query counts 0.
    assert_eq!(n["ndcg@10"], 3);
    // Condensed lists (unjudged taken out first): defined where the plain ones are. Every
    // ranking here is shorter than 10, and condensing drops nothing relevant, so recall@10
    // keeps its value; the nDCG can only rise (judged products move up).
    assert_eq!(n["condensed_ndcg@10"], 3);
    assert_eq!(n["condensed_recall@10"], 2);
    assert_eq!(m["condensed_recall@10"], m["recall@10"], "{r}");
    let ndcg = m["ndcg@10"].as_f64().unwrap();
    assert!(m["condensed_ndcg@10"].as_f64().unwrap() >= ndcg, "{r}");
    assert!((0.0..=2.0 / 3.0).contains(&ndcg), "{r}");
    for key in ["p50", "p99", "mean"] {
        assert!(r["latency_ms"][key].as_f64().unwrap() > 0.0, "{r}");
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&per_query)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["returned"], 4);
    assert_eq!(rows[0]["metrics"]["recall@10"], 1.0);
    assert_eq!(rows[3]["returned"], 0);
    assert!(rows[3]["error"].as_str().unwrap().contains("empty"));
    // The same grades as CSV: the same numbers.
    let c = eval(&csv);
    assert_eq!(c["metrics"], r["metrics"]);
    assert_eq!(c["queries_averaged"], r["queries_averaged"]);
    // Bad input: clear errors, no panic.
    let bad = tmp.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"query\": \"x\", \"grades\": {\"p0\": 3}}\nnot json\n",
    )
    .unwrap();
    let missing = tmp.join("missing.jsonl");
    // Judgements of another catalog: not one product in the index, an error rather than a
    // report of zeros.
    let other = tmp.join("other.jsonl");
    std::fs::write(
        &other,
        "{\"query\": \"sofa\", \"grades\": {\"x1\": 3, \"x2\": 1}}\n",
    )
    .unwrap();
    for (file, want) in [
        (&bad, "line 2: not JSON"),
        (&missing, "missing.jsonl"),
        (&other, "none of the 2 judged products"),
    ] {
        let args = [
            "eval",
            "--index",
            ix,
            "--judgements",
            file.to_str().unwrap(),
        ];
        let e = error_line(&args, &gram(&args));
        assert!(e.contains(want), "{e}");
    }
    // Below 300 the deeper cut-offs would be the short list's own, under their names.
    let j = jsonl.to_str().unwrap();
    let args = eval_args(ix, j, &["--k", "10"]);
    let e = error_line(&args, &gram(&args));
    assert!(
        e.contains("--k 10: the report's deepest cut-off is 300"),
        "{e}"
    );
    // --per-query is checked before the run: a directory is refused at once (no backend
    // chosen), and a long name that fits the file system is written (its temp name is
    // shortened).
    let args = eval_args(ix, j, &["--per-query", tmp.to_str().unwrap()]);
    let out = gram(&args);
    let e = error_line(&args, &out);
    assert!(
        e.contains("--per-query") && e.contains("is a directory"),
        "{e}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("backend:"),
        "refused after the engine opened: {stderr}"
    );
    let long = tmp.join(format!("{}.jsonl", "q".repeat(244)));
    let args = eval_args(
        ix,
        j,
        &["--threads", "1", "--per-query", long.to_str().unwrap()],
    );
    let out = gram(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&long).unwrap().lines().count(), 4);
    // A closed stdout costs neither the --per-query file nor the exit status.
    let quiet = tmp.join("quiet.jsonl");
    let q = quiet.to_str().unwrap();
    let out = gram_stdout_closed(&eval_args(ix, j, &["--threads", "1", "--per-query", q]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&quiet).unwrap().lines().count(), 4);
    // A damaged index (a byte of the product-probability section flipped: the structure
    // checks at open cannot see it, the checksums can), its report unread: still a failure.
    let damaged = tmp.join("flipped");
    std::fs::create_dir_all(&damaged).unwrap();
    let mut bytes = std::fs::read(std::path::Path::new(ix).join("index.gram")).unwrap();
    flip_in_section(&mut bytes, 5);
    std::fs::write(damaged.join("index.gram"), bytes).unwrap();
    let out = gram_stdout_closed(&["index", "inspect", damaged.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged index passed: {stderr}");
    assert!(
        stderr.contains("checksum") && !stderr.contains("panicked"),
        "{stderr}"
    );
    // A path that is not UTF-8 is an error naming its flag, not a panic after the run.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"judged-\xff.jsonl");
        std::fs::copy(&jsonl, tmp.join(odd)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
            .args(["eval", "--index", ix, "--judgements"])
            .arg(tmp.join(odd))
            .output()
            .unwrap();
        let e = error_line(&["eval"], &out);
        assert!(
            e.contains("--judgements") && e.contains("not valid UTF-8"),
            "{e}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `gram eval --index IX --judgements JUDGED EXTRA...`.
fn eval_args<'a>(ix: &'a str, judged: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["eval", "--index", ix, "--judgements", judged];
    args.extend_from_slice(extra);
    args
}

/// `gram ARGS` whose stdout's reader is gone before anything is written: every write meets a
/// broken pipe.
fn gram_stdout_closed(args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gram");
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// A reader that closes the pipe (`gram lm ... | head -c0`, `gram search ... | head`) ends the
/// command quietly, with status 0, not a panic at the next line written.
#[test]
fn a_closed_stdout_is_a_quiet_exit_not_a_panic() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    let m = model.to_str().unwrap();
    let out = gram_stdout_closed(&["lm", "--device", "cpu", "--prompt", "hi", "--model", m]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}

/// A stderr that cannot be written (`2>/dev/full`, a closed pipe) loses the notes, not the
/// report: `gram lm` prints its `backend:` line there, and `eprintln!` panicked (exit 101,
/// stdout empty).
#[test]
fn a_full_stderr_loses_the_notes_not_the_report() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(["lm", "--device", "cpu", "--prompt", "hi", "--model"])
        .arg(&model)
        .stderr(full)
        .output()
        .expect("run gram");
    assert!(out.status.success(), "{:?}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["top"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
}

/// The library's warnings reach stderr in every command, not only in `gram serve`: an extra
/// stop token of `generation_config.json` past the vocabulary is dropped with a warning that
/// names it, and the command still succeeds.
#[test]
fn warnings_reach_stderr() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gram-cli-warn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, 99999]}"#,
    )
    .unwrap();
    let out = gram(&[
        "lm",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--prompt",
        "hi",
        "--model",
        dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains("eos_token_id 99999 is past")),
        "{stderr}"
    );
    // A generation_config.json that is not an object is refused, naming the file.
    std::fs::write(dir.join("generation_config.json"), "[]").unwrap();
    let args = [
        "lm",
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--model",
        dir.to_str().unwrap(),
    ];
    let e = error_line(&args, &gram(&args));
    assert!(
        e.contains("generation_config.json") && e.contains("must be a JSON object"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// One judged query whose own rows go non-finite (its token's embedding row is NaN in this
/// copy of the model; no title or code uses that token, so the index builds) fails alone:
/// `gram eval` keeps it, counted as refused with a warning, and reports the others. It used
/// to abort the whole evaluation, its report and per-query file lost.
#[test]
fn a_query_that_fails_alone_does_not_end_the_evaluation() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gram-cli-nan-{}", std::process::id()));
    let model = copy_model(&model_dir("tiny-llama"), "cli-nan-model");
    let tok = gram::tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let used: std::collections::HashSet<u32> = ["oak sofa", "oak lamp", "sofa", "lamp", "oak"]
        .iter()
        .flat_map(|t| tok.encode_plain(t).unwrap())
        .chain(tok.encode("oak").unwrap())
        .collect();
    let poisoned = tok
        .encode_plain("zebra")
        .unwrap()
        .into_iter()
        .find(|t| !used.contains(t))
        .expect("a token of `zebra` no title, code or other query uses");
    // The embedding row of that token, NaN, in place in the f32 safetensors file.
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["model.embed_tokens.weight"];
    assert_eq!(t["dtype"], "F32");
    let hidden = t["shape"][1].as_u64().unwrap() as usize;
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    let row = start + poisoned as usize * hidden * 4;
    for c in bytes[row..row + hidden * 4].chunks_exact_mut(4) {
        c.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "oak lamp", "lamp")]
        .into_iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string()
        })
        .collect();
    let ix = build_index_with(&tmp, &model, &lines);
    let judged = tmp.join("judged.jsonl");
    std::fs::write(
        &judged,
        [
            serde_json::json!({"query": "oak", "grades": {"p0": 3}}).to_string(),
            serde_json::json!({"query": "zebra", "grades": {"p1": 3}}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = gram(&[
        "eval",
        "--index",
        ix.to_str().unwrap(),
        "--judgements",
        judged.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("query \"zebra\" failed"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            r["queries"].as_u64(),
            r["skipped"]["refused_by_engine"].as_u64()
        ),
        (Some(2), Some(1)),
        "{r}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&model);
}
