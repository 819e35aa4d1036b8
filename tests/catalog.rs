//! Catalog reading, index building and `gram eval` on inputs that used to be taken wrongly
//! without a word (each found in a review): a repeated product id, a byte-order mark, a product
//! that does not fit the model inside a pass of many, beams that decode to one text, repeated
//! judgement lines, an out-of-range beam.

mod common;

use common::*;
use gram::catalog::{self, Generate, OnError};
use gram::{Model, Tokenizer};

/// `text` written to `dir/name` and read under `OnError::Stop`: its error.
fn read_stops(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    catalog::read(&path, OnError::Stop).unwrap_err().to_string()
}

/// Two lines with one id were two products: a search returned the id twice and nDCG@10 came
/// out at 1.13. Now the read stops at the repeat, or skips and counts it.
#[test]
fn a_repeated_product_id_is_refused_or_skipped() {
    let dir = fresh_dir("catalog-dup");
    let cat = dir.join("c.jsonl");
    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n\
         {\"id\":\"p1\",\"title\":\"lamp\",\"codes\":[\"lamp\"]}\n\
         {\"id\":\"p0\",\"title\":\"red sofa\",\"codes\":[\"sofa\"]}\n",
    )
    .unwrap();
    let e = catalog::read(&cat, OnError::Stop).unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("\"p0\"") && e.contains("repeats line 1"),
        "{e}"
    );
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!((ids, skipped), (vec!["p0", "p1"], 1));
    assert_eq!(items[0].title, "oak sofa", "the first line wins");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A line that lacks a field names its own line and column, not serde's "line 1" of the
/// one-line document it parsed.
#[test]
fn a_malformed_line_is_named_by_its_line() {
    let dir = fresh_dir("catalog-field");
    let e = read_stops(
        &dir,
        "c.jsonl",
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n{\"id\":\"p1\"}\n",
    );
    assert!(
        e.contains("c.jsonl line 2, column ") && e.contains("missing field `title`"),
        "{e}"
    );
    assert!(!e.contains("at line 1"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A JSON array was read as the fields in order (serde's derived reader takes sequences):
/// `["p1","lamp",{},["lamp"]]` became product p1. Now it is a malformed line.
#[test]
fn a_json_array_is_not_a_product() {
    let dir = fresh_dir("catalog-array");
    let cat = dir.join("c.jsonl");
    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n  [\"p1\",\"lamp\",{},[\"lamp\"]]\n",
    )
    .unwrap();
    let e = catalog::read(&cat, OnError::Stop).unwrap_err().to_string();
    assert!(e.contains("c.jsonl line 2: not a JSON object"), "{e}");
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!((ids, skipped), (vec!["p0"], 1));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A UTF-8 byte-order mark (as Windows tools write) made line 1 unparseable, and under
/// `--on-error skip` the first product vanished.
#[test]
fn a_byte_order_mark_is_not_a_product() {
    let dir = fresh_dir("catalog-bom");
    let cat = dir.join("c.jsonl");
    std::fs::write(
        &cat,
        "\u{feff}{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n\
         {\"id\":\"p1\",\"title\":\"lamp\",\"codes\":[\"lamp\"]}\n",
    )
    .unwrap();
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    assert_eq!((items.len(), skipped), (2, 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A product whose title does not fit the model's positions: the error names it, not the first
/// product of its teacher-forcing pass.
#[test]
fn a_product_that_does_not_fit_is_named() {
    let dir = fresh_dir("catalog-long");
    let cat = dir.join("c.jsonl");
    let long = vec!["sofa"; 3000].join(" ");
    let lines = [
        serde_json::json!({"id": "p0", "title": "oak sofa", "codes": ["sofa"]}).to_string(),
        serde_json::json!({"id": "p1-long", "title": long, "codes": ["sofa"]}).to_string(),
    ];
    std::fs::write(&cat, lines.join("\n")).unwrap();
    let model = model_dir("tiny-llama");
    let out = index_build(&model, &cat, &dir.join("ix"), &["--threads", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("\"p1-long\"") && !err.contains("\"p0\""),
        "{err}"
    );
    // An empty title gives an empty prompt (this model adds no BOS): said as such, where the
    // message was "its prompt is 0 tokens and its codes need 0 more, past the model's 1024
    // positions".
    let empty = serde_json::json!({"id": "p2-empty", "title": "", "codes": ["sofa"]});
    std::fs::write(&cat, format!("{}\n{empty}", lines[0])).unwrap();
    let out = index_build(
        &model_dir("tiny-qwen2"),
        &cat,
        &dir.join("ix"),
        &["--threads", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("(product \"p2-empty\"): its product prompt has no tokens (an empty title?)"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Unconstrained generation (`--generate` with no code list): two beams of one product that
/// decode to the same text (different partial UTF-8 tails, both U+FFFD), neither the text's
/// own tokenization, were both queued for teacher forcing, the product landed twice on one
/// posting list, and the whole build failed at the write. The EOS ids are ones that make
/// tiny-qwen2 do this at beam 48.
#[test]
fn beams_that_decode_to_one_text_are_indexed_once() {
    let src = model_dir("tiny-qwen2");
    let tok = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    let titles = [
        "Green velvet sofa",
        "Oak desk",
        "Blue wool rug",
        "Brass lamp",
        "a",
        " ",
        "the the the",
        "Red chair",
    ];
    let items = items(&titles);
    for eos in [106u32, 276] {
        let dir = copy_model(&src, &format!("catalog-free-{eos}"));
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        config["eos_token_id"] = eos.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        std::fs::remove_file(dir.join("generation_config.json")).unwrap();
        let model = Model::load(&dir, &Default::default()).unwrap();
        let generate = Generate {
            codes: vec![],
            beam: 48,
            threshold: 0.0,
            batch: 8,
            max_new_tokens: 5,
        };
        let report = catalog::build(
            &model,
            &tok,
            &gram::settings::Settings::default(),
            &items,
            Some(&generate),
            &dir.join("free.gram"),
            &serde_json::json!({"model": {"fingerprint": format!("eos {eos}")}}),
        );
        assert!(report.is_ok(), "eos {eos}: {}", report.err().unwrap());
        // The case arose: some generated code decodes to U+FFFD (the beams that collided), and
        // every posting list holds a product at most once.
        let index = gram::index::Index::open(&dir.join("free.gram")).unwrap();
        let texts: Vec<String> = (0..index.num_codes() as u32)
            .map(|c| index.code_text(c).unwrap().into_owned())
            .collect();
        assert!(
            texts.iter().any(|t| t.contains('\u{FFFD}')),
            "eos {eos}: no code decodes to U+FFFD: {texts:?}"
        );
        for c in 0..index.num_codes() as u32 {
            let n = index.code(c).unwrap().n_tokens as usize;
            let pq = vec![0.5f32; n];
            let w = vec![1.0f32; n];
            let products = index.postings(c, &pq, &w).unwrap().products.to_vec();
            assert!(
                products.windows(2).all(|p| p[0] < p[1]),
                "eos {eos}: code {:?} lists {products:?}",
                texts[c as usize]
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `gram eval` with a beam the engine refuses: every query was refused, the report read as
/// zeros, and the exit status was 0.
#[test]
fn eval_refuses_an_out_of_range_beam() {
    let dir = fresh_dir("catalog-evalbeam");
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "oak lamp", "lamp")]
        .into_iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string()
        })
        .collect();
    let ix = build_index(&dir, "tiny-llama", &lines);
    let j = dir.join("j.jsonl");
    std::fs::write(&j, "{\"query\": \"sofa\", \"grades\": {\"p0\": 3}}\n").unwrap();
    for beam in ["0", "100000"] {
        let out = gram(&[
            "eval",
            "--index",
            ix.to_str().unwrap(),
            "--judgements",
            j.to_str().unwrap(),
            "--threads",
            "1",
            "--beam",
            beam,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--beam {beam} exited 0");
        assert!(
            err.contains("--beam") && err.contains("out of range"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `gram eval` refuses before the run what would make its report measure nothing: a batch
/// past the bound, a `--per-query` file in a missing directory (it used to fail after the
/// whole run, the report lost), judgements without a grade, a query template that leaves no
/// query room for the index's codes (every query was refused, each blamed on the query, and
/// the zeros exited 0).
#[test]
fn eval_refuses_what_would_measure_nothing() {
    let dir = fresh_dir("catalog-evalnothing");
    let model = dir.join("m");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(model_dir("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model.join(f.file_name().unwrap())).unwrap();
    }
    let lines: Vec<String> = [("p0", "oak sofa", "sofa"), ("p1", "oak lamp", "lamp")]
        .into_iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string()
        })
        .collect();
    let ix = build_index_with(&dir.join("b"), &model, &lines);
    let j = dir.join("j.jsonl");
    std::fs::write(&j, "{\"query\": \"sofa\", \"grades\": {\"p0\": 3}}\n").unwrap();
    let none = dir.join("none.jsonl");
    std::fs::write(&none, "{\"query\": \"sofa\", \"grades\": {}}\n").unwrap();
    let run = |judgements: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--index",
            ix.to_str().unwrap(),
            "--judgements",
            judgements.to_str().unwrap(),
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        gram(&args)
    };
    let eval = |judgements: &std::path::Path, extra: &[&str]| {
        let out = run(judgements, extra);
        assert!(!out.status.success(), "{extra:?} exited 0");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = eval(&j, &["--batch", "257"]);
    assert!(e.contains("--batch 257"), "{e}");
    let missing = dir.join("no-such-dir/per-query.jsonl");
    let e = eval(&j, &["--per-query", missing.to_str().unwrap()]);
    assert!(
        e.contains("--per-query") && e.contains("not a directory"),
        "{e}"
    );
    // A --per-query file that is an input: the judgements (by another spelling of the path
    // too), or a file of the index directory. Neither is touched.
    let before = std::fs::read(&j).unwrap();
    let other_spelling = dir.join("b/../j.jsonl");
    let e = eval(&j, &["--per-query", other_spelling.to_str().unwrap()]);
    assert!(e.contains("is the --judgements file"), "{e}");
    assert_eq!(std::fs::read(&j).unwrap(), before);
    let index_file = ix.join("index.gram");
    let index_before = std::fs::read(&index_file).unwrap();
    let e = eval(&j, &["--per-query", index_file.to_str().unwrap()]);
    assert!(e.contains("is the index's own file"), "{e}");
    assert_eq!(std::fs::read(&index_file).unwrap(), index_before);
    // Another name in the index directory is the user's to write.
    let beside = ix.join("per-query.jsonl");
    let out = run(&j, &["--per-query", beside.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(beside.exists());
    assert_eq!(std::fs::read(&index_file).unwrap(), index_before);
    let e = eval(&none, &[]);
    assert!(e.contains("no grades"), "{e}");
    // Every query refused (each past the model's context; the server's 64-token guard does
    // not apply to judged queries): the report prints, the run fails.
    let long_query = dir.join("long.jsonl");
    let q = "sofa ".repeat(2000);
    std::fs::write(
        &long_query,
        serde_json::json!({"query": q, "grades": {"p0": 3}}).to_string(),
    )
    .unwrap();
    let e = eval(&long_query, &[]);
    assert!(e.contains("refused every query"), "{e}");
    let long = format!("{}{{query}}", "z ".repeat(1100));
    std::fs::write(
        model.join("gram.json"),
        serde_json::json!({ "query_template": long }).to_string(),
    )
    .unwrap();
    let e = eval(&j, &[]);
    assert!(
        e.contains("gram.json") && e.contains("no query fits"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Repeated JSONL judgement lines merge and grades truncate, as `tools/train/metrics.py` reads
/// them: the same nDCG@10 as Python's (0.8428282648809379 for this file and ranking b, a, c).
#[test]
fn jsonl_judgements_give_the_metrics_of_metrics_py() {
    let text = "{\"query\": \"q\", \"grades\": {\"a\": 3, \"b\": 2.5}}\n\
                {\"query\": \"q\", \"grades\": {\"c\": 1}}\n";
    let j = gram::eval::parse_jsonl_judgements(text).unwrap();
    let g = &j.queries[0].grades;
    assert_eq!((j.queries.len(), g.len(), g["b"]), (1, 3, 2.0));
    let ranked = ["b", "a", "c"];
    assert_eq!(gram::eval::recall(&ranked, g, 10), Some(1.0));
    let n = gram::eval::ndcg(&ranked, g, 10).unwrap();
    // Gains 2^grade - 1 over log2(rank + 1): b (2), a (3), c (1) against the ideal a, b, c.
    let dcg = |grades: [f64; 3]| -> f64 {
        grades
            .iter()
            .enumerate()
            .map(|(i, g)| (2f64.powf(*g) - 1.0) / (i as f64 + 2.0).log2())
            .sum()
    };
    let want = dcg([2.0, 3.0, 1.0]) / dcg([3.0, 2.0, 1.0]);
    assert!((want - 0.8428282648809379).abs() < 1e-12, "{want}");
    assert!((n - want).abs() < 1e-12, "{n}");
}

/// A misspelt field (`code` for `codes`) was ignored: the product was indexed with no codes,
/// never retrievable, and the build said nothing. Now an unknown field is an error naming the
/// line and the field (or a skipped line), and a product indexed under no code at all is
/// counted in the build report and named in a warning.
#[test]
fn an_unknown_field_is_refused_and_a_product_without_codes_is_reported() {
    let dir = fresh_dir("catalog-unknown");
    let cat = dir.join("c.jsonl");
    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n\
         {\"id\":\"a\",\"title\":\"wireless mouse\",\"code\":[\"mouse\"]}\n",
    )
    .unwrap();
    let e = catalog::read(&cat, OnError::Stop).unwrap_err().to_string();
    assert!(
        e.contains("c.jsonl line 2") && e.contains("unknown field `code`"),
        "{e}"
    );
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    assert_eq!((items.len(), skipped), (1, 1));

    // Every field real catalogs use is still read.
    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"attributes\":{\"material\":\"oak\"},\"codes\":[\"sofa\"]}\n\
         {\"id\":\"p1\",\"title\":\"wireless mouse\",\"codes\":[]}\n\
         {\"id\":\"p2\",\"title\":\"lamp\"}\n",
    )
    .unwrap();
    let (items, skipped) = catalog::read(&cat, OnError::Stop).unwrap();
    assert_eq!((items.len(), skipped), (3, 0));
    // Attributes are read through, not kept, but they must still be an object.
    let e = read_stops(
        &dir,
        "bad.jsonl",
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"attributes\":[\"oak\"],\"codes\":[\"sofa\"]}\n",
    );
    assert!(
        e.contains("bad.jsonl line 1") && e.contains("a JSON object of attributes"),
        "{e}"
    );
    let out = index_build(
        &model_dir("tiny-llama"),
        &cat,
        &dir.join("ix"),
        &["--threads", "1"],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["report"]["products_without_codes"], 2, "{stdout}");
    assert!(
        stderr.contains("2 products have no codes") && stderr.contains(": \"p1\", \"p2\""),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A code list (`gram codes --codes`, `gram index build --codes`) that is not UTF-8 is refused
/// naming the line and the byte, not only "stream did not contain valid UTF-8".
#[test]
fn a_code_list_that_is_not_utf8_names_the_line() {
    let dir = fresh_dir("codes-utf8");
    let codes = dir.join("codes.txt");
    std::fs::write(&codes, b"sofa\nrug | wool\ncaf\xe9 | table\n").unwrap();
    let e = catalog::CodeFile::read(&codes).unwrap_err().to_string();
    assert!(
        e.contains("codes.txt: line 3: not valid UTF-8 (byte 4 of the line)"),
        "{e}"
    );
    let tok = gram::tokenizer::Tokenizer::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-llama/tokenizer.json"),
    )
    .unwrap();
    let e = gram::trie::CodeSet::from_file(&codes, &tok, 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("codes.txt: line 3: not valid UTF-8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A non-UTF-8 byte on one line failed the whole read with "stream did not contain valid
/// UTF-8", no line named, and `--on-error skip` could not skip it. Now the error names the
/// line, and skip mode skips (and counts) that line alone.
#[test]
fn a_line_that_is_not_utf8_is_named_or_skipped() {
    let dir = fresh_dir("catalog-utf8");
    let cat = dir.join("c.jsonl");
    let mut bytes = b"{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\r\n".to_vec();
    bytes.extend(b"{\"id\":\"p1\",\"title\":\"caf\xe9 lamp\",\"codes\":[\"lamp\"]}\n");
    bytes.extend(b"{\"id\":\"p2\",\"title\":\"rug\",\"codes\":[\"rug\"]}");
    std::fs::write(&cat, &bytes).unwrap();
    let e = catalog::read(&cat, OnError::Stop).unwrap_err().to_string();
    assert!(
        e.contains("c.jsonl line 2") && e.contains("not valid UTF-8"),
        "{e}"
    );
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!((ids, skipped), (vec!["p0", "p2"], 1));
    assert_eq!(
        items[0].codes,
        ["sofa"],
        "a CRLF line ending is not part of the line"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Code errors gave wrong line numbers: the `--codes` file's blank lines were dropped before
/// its codes were numbered (`mouse`, two blank lines, `toner`, `mouse` said "lines 1 and 3"),
/// and catalog codes were numbered by their place in the sorted set of all codes (a blank
/// code on catalog line 2 said "line 1"). Now the file's own lines are named, a blank catalog
/// code is refused (or its line skipped) where the catalog is read, naming the line and
/// product, and a catalog code the tokenizer refuses names its product and catalog line.
#[test]
fn code_errors_name_their_own_lines_and_products() {
    let dir = fresh_dir("catalog-code-lines");
    let model = model_dir("tiny-llama");
    let cat = dir.join("c.jsonl");
    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n",
    )
    .unwrap();
    let codes = dir.join("codes.txt");
    std::fs::write(&codes, "mouse\n\n\ntoner\nmouse\n").unwrap();
    let (list, file) = catalog::CodeFile::read(&codes).unwrap();
    assert_eq!((list.len(), file.lines.as_slice()), (3, &[1, 4, 5][..]));
    let out = index_build(
        &model,
        &cat,
        &dir.join("ix"),
        &["--threads", "1", "--codes", codes.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("codes.txt lines 1 and 5 are the same code"),
        "{err}"
    );

    std::fs::write(
        &cat,
        "{\"id\":\"p0\",\"title\":\"oak sofa\",\"codes\":[\"sofa\"]}\n\
         {\"id\":\"a\",\"title\":\"wireless mouse\",\"codes\":[\"mouse\",\"  \"]}\n",
    )
    .unwrap();
    let e = catalog::read(&cat, OnError::Stop).unwrap_err().to_string();
    assert!(
        e.contains("c.jsonl line 2: product \"a\": code 2 of its `codes` is empty"),
        "{e}"
    );
    // Under `Skip` the product is read: the build leaves it out by id (next test).
    let (items, skipped) = catalog::read(&cat, OnError::Skip).unwrap();
    assert_eq!((items.len(), skipped), (2, 0));

    // A code holding the EOS token's text, on the third line: named by its product and line.
    let eos = std::fs::read_to_string(model.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["eos_token"].as_str().map(str::to_owned))
        .unwrap();
    let lines = [
        serde_json::json!({"id": "p0", "title": "oak sofa", "codes": ["sofa"]}),
        serde_json::json!({"id": "p1", "title": "rug", "codes": ["rug"]}),
        serde_json::json!({"id": "p2", "title": "lamp", "codes": [format!("lamp {eos}")]}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&cat, text.join("\n")).unwrap();
    let out = index_build(&model, &cat, &dir.join("ix"), &["--threads", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("catalog line 3 (product \"p2\"): code") && err.contains("contains the EOS"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Under `--on-error skip`, a catalog code the model cannot emit (it holds the EOS token, or is
/// longer than a code may be) stopped the build all the same. Now its product is left out,
/// counted with the products that do not fit and named with the code and why; the rest is
/// indexed, numbered anew. `gram eval` dropped such a product's grades as if it were not in
/// the catalog, which raised recall; now the index lists it and it counts as a miss.
#[test]
fn a_product_with_a_code_the_model_cannot_emit_is_skipped() {
    let dir = fresh_dir("catalog-skip-codes");
    let cat = dir.join("c.jsonl");
    let model = model_dir("tiny-llama");
    let eos = std::fs::read_to_string(model.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["eos_token"].as_str().map(str::to_owned))
        .unwrap();
    let long = vec!["sofa"; 200].join(" ");
    let lines: Vec<String> = [
        serde_json::json!({"id": "p0", "title": "oak sofa", "codes": ["sofa"]}),
        serde_json::json!({"id": "p1", "title": "lamp", "codes": ["lamp", format!("lamp {eos}")]}),
        serde_json::json!({"id": "p2", "title": "rug", "codes": ["rug"]}),
        serde_json::json!({"id": "p3", "title": "long", "codes": [long]}),
        serde_json::json!({"id": "p4", "title": "lamp too", "codes": ["lamp"]}),
        serde_json::json!({"id": "p5", "title": "rug too", "codes": ["rug", " "]}),
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    std::fs::write(&cat, lines.join("\n")).unwrap();
    let run = |mode: &str| {
        index_build(
            &model,
            &cat,
            &dir.join("ix"),
            &["--threads", "1", "--on-error", mode],
        )
    };
    // Under `stop` without p5 (whose blank code the read refuses first, naming line 6).
    std::fs::write(&cat, lines[..5].join("\n")).unwrap();
    let out = run("stop");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("catalog line 2 (product \"p1\")"), "{err}");
    std::fs::write(&cat, lines.join("\n")).unwrap();
    let (v, stderr) = built(&run("skip"));
    assert_eq!(v["report"]["skipped_products"], 3, "{v}");
    assert_eq!(v["report"]["products"], 3, "{v}");
    // One-word codes: a delimiter that none holds is worth a word (a catalog written with
    // another delimiter would score every code as coarse).
    assert!(
        stderr.contains("none of the 3 codes contains the delimiter"),
        "{stderr}"
    );
    assert!(
        stderr.contains("3 products do not fit the model")
            && stderr.contains("catalog line 2 (product \"p1\"): code")
            && stderr.contains("contains the EOS")
            && stderr.contains("catalog line 4 (product \"p3\"): code")
            && stderr.contains("codes may have at most")
            && stderr.contains("catalog line 6 (product \"p5\"): code \" \" is blank"),
        "{stderr}"
    );
    let (ids, lamp) = ids_and_carriers(&dir.join("ix"), "lamp");
    assert_eq!(ids, ["p0", "p2", "p4"]);
    assert_eq!(lamp, [2], "p4 is product 2 now");
    // `gram eval` on that index: a judged product the build left out (for a code the model
    // cannot emit, or a blank code: that one's line used to be skipped as unreadable and its
    // id lost) is in the catalog and can never be retrieved, so it is a miss (Recall@300 1/3,
    // not 1.0); an id the catalog lacks is dropped. Every product comes back (three codes,
    // beam 10).
    let j = dir.join("j.jsonl");
    std::fs::write(
        &j,
        "{\"query\": \"lamp\", \"grades\": {\"p1\": 3, \"p4\": 3, \"p5\": 2, \"ghost\": 2}}\n",
    )
    .unwrap();
    let ix = dir.join("ix");
    let out = gram(&[
        "eval",
        "--index",
        ix.to_str().unwrap(),
        "--judgements",
        j.to_str().unwrap(),
        "--threads",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("2 judged products were left out of the index by its build"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["judged_products"], 3, "{r}");
    assert_eq!(r["judged_products_not_in_index"], 1, "{r}");
    assert_eq!(r["judged_products_left_out_by_build"], 2, "{r}");
    assert_eq!(r["mean_returned"], 3.0, "{r}");
    assert_eq!(r["metrics"]["recall@300"], 1.0 / 3.0, "{r}");
    // `gram index inspect` counts them rather than listing every id.
    let out = gram(&["index", "inspect", ix.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["meta"]["left_out_products"], 3, "{v}");
    // Under `stop` the error names the first bad product in catalog order, not the bad code
    // first in byte order ("lamp …" sorts before "sofa …").
    let (first, second) = (lines[1].clone(), lines[3].clone());
    let swapped = [&lines[0], &second, &lines[2], &first, &lines[4]];
    std::fs::write(&cat, swapped.map(String::as_str).join("\n")).unwrap();
    let out = run("stop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("catalog line 2 (product \"p3\")"),
        "{err}"
    );
    // Every code refused and nothing to generate: said so, not "unconstrained generation
    // found no codes … within 0 tokens", a mode that was never run.
    // (A product without codes keeps the build going past "no product fits".)
    let bare = serde_json::json!({"id": "p9", "title": "chair"}).to_string();
    let blank = serde_json::json!({"id": "p6", "title": "stool", "codes": [" "]}).to_string();
    let only_bad = [&lines[3], &blank, &bare];
    std::fs::write(&cat, only_bad.map(String::as_str).join("\n")).unwrap();
    let out = run("skip");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no codes: every code of the catalog was refused (2 products left out")
            && err.contains("product \"p3\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With product-code generation (`--codes`), a product whose prompt does not fit the model
/// failed the build naming its beam-search slot ("query 5"), not the product, and it did so
/// under `--on-error skip` too. Now each product's room is checked before any pass: under
/// `stop` the error names the product and its catalog line; under `skip` the product is left
/// out of the index, counted in the report and named in a warning, and the rest is indexed.
#[test]
fn a_product_too_long_to_generate_for_is_named_or_skipped() {
    let dir = fresh_dir("catalog-long-gen");
    let cat = dir.join("c.jsonl");
    let long = vec!["sofa"; 3000].join(" ");
    let lines: Vec<String> = [
        serde_json::json!({"id": "p0", "title": "oak sofa"}),
        serde_json::json!({"id": "p1", "title": "brass lamp"}),
        serde_json::json!({"id": "p2-long", "title": long, "codes": ["sofa"]}),
        serde_json::json!({"id": "p3", "title": "wool rug", "codes": ["rug"]}),
    ]
    .iter()
    .map(|l| l.to_string())
    .collect();
    std::fs::write(&cat, lines.join("\n")).unwrap();
    let model = model_dir("tiny-llama");
    let codes = repo().join("tests/golden/codes-tiny.txt");
    for generate in [
        &[
            "--codes",
            codes.to_str().unwrap(),
            "--beam",
            "3",
            "--batch",
            "8",
        ][..],
        &[],
    ] {
        let run = |mode: &str| {
            let mut args = vec!["--threads", "1", "--on-error", mode];
            args.extend(generate);
            index_build(&model, &cat, &dir.join("ix"), &args)
        };
        let out = run("stop");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{generate:?}");
        assert!(
            err.contains("catalog line 3 (product \"p2-long\")") && !err.contains("query"),
            "{generate:?}: {err}"
        );
        let (v, stderr) = built(&run("skip"));
        assert_eq!(v["report"]["skipped_products"], 1, "{generate:?}: {v}");
        assert_eq!(v["report"]["products"], 3, "{generate:?}: {v}");
        assert!(
            stderr.contains("1 products do not fit the model")
                && stderr.contains("catalog line 3 (product \"p2-long\")"),
            "{stderr}"
        );
        let (ids, rug) = ids_and_carriers(&dir.join("ix"), "rug");
        assert_eq!(ids, ["p0", "p1", "p3"], "{generate:?}");
        assert!(rug.contains(&2), "p3 is product 2 now");
        if generate.is_empty() {
            // "sofa" was listed by p2-long alone: it stayed in the trie with no postings.
            assert_eq!(v["report"]["codes"], 1, "{v}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A product fits generation when its prompt and all the generated tokens but the last (which
/// is returned, never run) fit the model's positions, as beam search itself counts: the build
/// refused a prompt one token shorter than that, which `gram codes` runs.
#[test]
fn a_prompt_that_leaves_room_for_all_but_the_last_new_token_fits() {
    let dir = fresh_dir("catalog-fit");
    let cat = dir.join("c.jsonl");
    let model = model_dir("tiny-qwen2");
    let tok = Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let positions = Model::load(&model, &Default::default())
        .unwrap()
        .max_positions();
    let new_tokens = 8;
    // A title of exactly `positions - (new_tokens - 1)` prompt tokens, then one more.
    let count = |t: &str| tok.encode(t).unwrap().len();
    let title = |n: usize| -> String {
        let mut t = vec!["sofa"; n].join(" ");
        while count(&t) > n {
            t.truncate(t.rfind(' ').unwrap());
        }
        for filler in [" oak", " a", "s", "x"] {
            while count(&format!("{t}{filler}")) <= n {
                t.push_str(filler);
            }
        }
        assert_eq!(count(&t), n, "a title of {n} tokens");
        t
    };
    let fits = positions - (new_tokens - 1);
    for (n, ok) in [(fits, true), (fits + 1, false)] {
        let line = serde_json::json!({"id": "p", "title": title(n), "codes": ["sofa"]});
        std::fs::write(&cat, line.to_string()).unwrap();
        let max = new_tokens.to_string();
        let args = [
            "--threads",
            "1",
            "--generate",
            "--max-code-tokens",
            &max,
            "--beam",
            "2",
        ];
        let out = index_build(&model, &cat, &dir.join("ix"), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "a prompt of {n} tokens: {err}");
        if !ok {
            assert!(err.contains("past the model's"), "{err}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The default model's tokenizer lowercases, so "HP" and "hp" are one token sequence: a
/// catalog with both failed the build at its very end, after every product was encoded, in
/// either `--on-error` mode. Now they are one code: one posting list under the text more
/// products list, a product listing both posted once, and the index equals the one built
/// from the catalog written in that text.
#[test]
fn codes_that_tokenize_alike_share_one_posting_list() {
    let dir = fresh_dir("catalog-alike");
    let model = model_dir("gram-icecat-2m");
    let (hp, hp_lower) = ("toner cartridge | HP", "toner cartridge | hp");
    let catalog = |codes: [&[&str]; 5]| -> String {
        let titles = [
            "hp toner",
            "HP toner",
            "toner pair",
            "hp 305",
            "wireless mouse",
        ];
        (0..5)
            .map(|i| {
                serde_json::json!({"id": format!("p{i}"), "title": titles[i], "codes": codes[i]})
                    .to_string()
                    + "\n"
            })
            .collect()
    };
    let mixed = catalog([
        &[hp, "toner cartridge"],
        &[hp_lower],
        &[hp_lower, hp],
        &["toner cartridge", hp_lower],
        &["mouse | logitech"],
    ]);
    let lower = mixed.replace("| HP", "| hp");
    std::fs::write(dir.join("mixed.jsonl"), &mixed).unwrap();
    std::fs::write(dir.join("lower.jsonl"), &lower).unwrap();
    let run = |cat: &str, out: &str, mode: &str| {
        index_build(
            &model,
            &dir.join(cat),
            &dir.join(out),
            &["--threads", "1", "--on-error", mode],
        )
    };
    let (reference, _) = built(&run("lower.jsonl", "lower", "stop"));
    for mode in ["stop", "skip"] {
        let (v, stderr) = built(&run("mixed.jsonl", mode, mode));
        assert_eq!(v["report"]["merged_codes"], 1, "{v}");
        let g = &v["report"]["granularity"];
        assert_eq!(
            (&g["single"], &g["coarse"], &g["medium"], &g["fine"]),
            (&1.into(), &3.into(), &0.into(), &0.into()),
            "{v}"
        );
        assert!(!stderr.contains("contains the delimiter"), "{stderr}");
        assert_eq!(v["report"]["codes"], reference["report"]["codes"], "{v}");
        assert_eq!(
            v["report"]["postings"], reference["report"]["postings"],
            "{v}"
        );
        assert!(
            stderr.contains("1 codes tokenize like another code")
                && stderr.contains(&format!("{hp:?} → {hp_lower:?}")),
            "{stderr}"
        );
        let (ids, carriers) = ids_and_carriers(&dir.join(mode), hp_lower);
        assert_eq!(ids, ["p0", "p1", "p2", "p3", "p4"]);
        assert_eq!(carriers, [0, 1, 2, 3], "p2 lists both texts: posted once");
        // Every code's postings, probabilities included, are those of the lowercase build.
        let a = gram::index::Index::open(&dir.join(mode).join("index.gram")).unwrap();
        let b = gram::index::Index::open(&dir.join("lower").join("index.gram")).unwrap();
        assert_eq!(a.num_codes(), b.num_codes());
        for c in 0..a.num_codes() as u32 {
            assert_eq!(a.code_text(c).unwrap(), b.code_text(c).unwrap());
            let n = a.code(c).unwrap().n_tokens as usize;
            let (pq, w) = (vec![0.5; n], vec![1.0; n]);
            let (pa, pb) = (
                a.postings(c, &pq, &w).unwrap(),
                b.postings(c, &pq, &w).unwrap(),
            );
            assert_eq!((pa.products, pa.pt), (pb.products, pb.pt), "code {c}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `gram index build` that succeeded: its JSON report and its stderr.
fn built(out: &std::process::Output) -> (serde_json::Value, String) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_str(stdout.trim()).unwrap(), stderr)
}

/// The product ids of the index in `dir`, in index order, and the products carrying `code`.
fn ids_and_carriers(dir: &std::path::Path, code: &str) -> (Vec<String>, Vec<u32>) {
    let index = gram::index::Index::open(&dir.join("index.gram")).unwrap();
    let ids = (0..index.num_products() as u32)
        .map(|i| index.product(i).unwrap().0.into_owned())
        .collect();
    let c = (0..index.num_codes() as u32)
        .find(|&c| index.code_text(c).unwrap() == code)
        .unwrap();
    let n = index.code(c).unwrap().n_tokens as usize;
    let (pq, w) = (vec![0.5; n], vec![1.0; n]);
    (ids, index.postings(c, &pq, &w).unwrap().products.to_vec())
}

/// A code of the generation list that no product was found to carry was indexed with an empty
/// posting list (a search could spend a beam on it and find nothing); now only codes some
/// indexed product carries are indexed, and the report counts the others.
#[test]
fn a_list_code_no_product_carries_is_not_indexed() {
    let dir = fresh_dir("catalog-unused-list");
    let model = model_dir("tiny-llama");
    let cat = dir.join("c.jsonl");
    let list = dir.join("list.txt");
    let catalog: String = [("p0", "oak sofa", "sofa"), ("p1", "brass lamp", "lamp")]
        .iter()
        .map(|(id, title, code)| {
            serde_json::json!({"id": id, "title": title, "codes": [code]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&cat, catalog).unwrap();
    std::fs::write(&list, "sofa\nrug\nvelvet chair\nside table\n").unwrap();
    let build = |out: &str, threshold: &str| {
        let args = [
            "--threads",
            "1",
            "--codes",
            list.to_str().unwrap(),
            "--beam",
            "4",
            "--threshold",
            threshold,
        ];
        let (v, _) = built(&index_build(&model, &cat, &dir.join(out), &args));
        let index = gram::index::Index::open(&dir.join(out).join("index.gram")).unwrap();
        let mut texts = Vec::new();
        for c in 0..index.num_codes() as u32 {
            let n = index.code(c).unwrap().n_tokens as usize;
            let (pq, w) = (vec![0.5; n], vec![1.0; n]);
            let carriers = index.postings(c, &pq, &w).unwrap().products.len();
            let text = index.code_text(c).unwrap().to_string();
            assert!(carriers > 0, "{text:?} is indexed with no product");
            texts.push(text);
        }
        (v, texts)
    };
    // Nothing is generated at probability 1: only the catalog's codes are indexed.
    let (v, texts) = build("none", "1.0");
    assert_eq!(texts, ["lamp", "sofa"], "{v}");
    assert_eq!(v["report"]["codes"], 2, "{v}");
    assert_eq!(
        v["report"]["unused_codes"], 3,
        "rug, velvet chair, side table: {v}"
    );
    // Everything the beams find is kept: every indexed code has products, and the list's
    // codes are either indexed or counted.
    let (v, texts) = build("all", "0.0");
    let known = 5;
    assert_eq!(
        texts.len() + v["report"]["unused_codes"].as_u64().unwrap() as usize,
        known,
        "{v}"
    );
    assert!(
        texts.len() > 2,
        "four beams a product find list codes: {texts:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A code list saved with a byte-order mark (as some editors write UTF-8) made `"\u{feff}sofa"`
/// a code of its own beside the catalog's `"sofa"`, with no word; both code-list readers now
/// ignore the mark.
#[test]
fn a_byte_order_mark_is_not_part_of_the_first_code() {
    let dir = fresh_dir("catalog-bom-list");
    let model = model_dir("tiny-llama");
    let (plain, bom) = (dir.join("plain.txt"), dir.join("bom.txt"));
    std::fs::write(&plain, "sofa\nlamp\n").unwrap();
    std::fs::write(&bom, "\u{feff}sofa\nlamp\n").unwrap();
    // `gram codes --codes`: the same code set, token for token.
    let tok = Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let eos = Model::load(&model, &Default::default())
        .unwrap()
        .config
        .eos_token_ids[0];
    let a = gram::trie::CodeSet::from_file(&plain, &tok, eos).unwrap();
    let b = gram::trie::CodeSet::from_file(&bom, &tok, eos).unwrap();
    assert_eq!(a.texts, b.texts);
    assert_eq!(b.texts, ["sofa", "lamp"]);
    for i in 0..a.len() {
        assert_eq!(a.code_tokens(i), b.code_tokens(i), "code {i}");
    }
    // `gram index build --codes`: the list's "sofa" is the catalog's.
    let cat = dir.join("c.jsonl");
    let line = serde_json::json!({"id": "p0", "title": "oak sofa", "codes": ["sofa"]});
    std::fs::write(&cat, line.to_string() + "\n").unwrap();
    let args = [
        "--threads",
        "1",
        "--codes",
        bom.to_str().unwrap(),
        "--threshold",
        "1.0",
    ];
    let (v, _) = built(&index_build(&model, &cat, &dir.join("ix"), &args));
    assert_eq!(v["report"]["codes"], 1, "{v}");
    assert_eq!(v["report"]["unused_codes"], 1, "lamp alone: {v}");
    let index = gram::index::Index::open(&dir.join("ix").join("index.gram")).unwrap();
    assert_eq!(index.code_text(0).unwrap(), "sofa");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// gram.json's `max_code_tokens` (the spec's "max code tokens", EOS included): a catalog code
/// longer than it is refused under `stop` and its product left out under `skip`; an index built
/// without it is refused by an engine under it; a value out of range, or an unconstrained
/// generation asked for more, is refused.
#[test]
fn max_code_tokens_bounds_the_codes_indexed_and_generated() {
    let dir = fresh_dir("catalog-max-code-tokens");
    let model = copy_model(&model_dir("tiny-llama"), "catalog-max-code-tokens-model");
    let tok = gram::tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let long = "green velvet sofa with oak legs";
    let n_long = tok.encode_plain(long).unwrap().len();
    assert!(n_long >= 4, "{n_long}");
    let run = builder(
        &model,
        &dir,
        &[
            serde_json::json!({"id": "p0", "title": "sofa", "codes": ["sofa"]}),
            serde_json::json!({"id": "p1", "title": "velvet sofa", "codes": ["sofa", long]}),
            serde_json::json!({"id": "p2", "title": "rug", "codes": ["rug"]}),
        ],
    );
    // Without the key: every code is indexed.
    let (v, _) = built(&run(&[], "all"));
    assert_eq!(v["report"]["products"], 3, "{v}");
    // With it (the long code's tokens and its EOS do not fit): refused, or its product left out.
    let limit = n_long; // n_long + 1 tokens with the EOS
    std::fs::write(
        model.join("gram.json"),
        format!("{{\"max_code_tokens\": {limit}}}"),
    )
    .unwrap();
    let out = run(&["--on-error", "stop"], "stop");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("product \"p1\"")
            && err.contains(&format!("codes may have at most {}", limit - 1)),
        "{err}"
    );
    let (v, _) = built(&run(&["--on-error", "skip"], "skip"));
    assert_eq!(v["report"]["products"], 2, "{v}");
    assert_eq!(v["report"]["skipped_products"], 1, "{v}");
    // The index of every code, opened under the limit: refused (beam search would cut the long
    // code's prefixes at the limit, and they would crowd out codes that finished); without the
    // limit the long code is generated.
    let open = || gram::search::Engine::open(&dir.join("all"), Some(&model), &Default::default());
    let err = open()
        .err()
        .expect("an index with longer codes than max_code_tokens opened");
    assert!(
        err.to_string()
            .contains(&format!("allows {limit} (max_code_tokens)")),
        "{err}"
    );
    std::fs::remove_file(model.join("gram.json")).unwrap();
    let req = gram::search::Request {
        query: "velvet sofa".into(),
        k: 10,
        beam: 10,
        codes_only: true,
    };
    let free = search_alone(&open().unwrap(), &[req]).remove(0);
    assert!(
        free.codes.iter().any(|c| c.code == long),
        "{:?}",
        free.codes
    );
    // Out of range, and a generation longer than the limit.
    for (json, says) in [
        (
            "{\"max_code_tokens\": 1}",
            "max_code_tokens 1: expected 2..=",
        ),
        (
            "{\"max_code_tokens\": 4}",
            "--max-code-tokens 6: expected 1..=4",
        ),
    ] {
        std::fs::write(model.join("gram.json"), json).unwrap();
        let out = run(&["--generate", "--max-code-tokens", "6"], "gen");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&model).unwrap();
}

/// A model with a second EOS token (Qwen2.5's `[151645, 151643]`): transformers ends a beam at
/// either, so a code holding the second could never be emitted whole. The build refuses it
/// under `stop` and leaves its product out under `skip`; an index built before the second EOS
/// was declared (generation_config.json, outside the model's fingerprint) is refused at open.
#[test]
fn a_code_holding_another_eos_token_is_refused() {
    let dir = fresh_dir("catalog-other-eos");
    let model = copy_model(&model_dir("tiny-llama"), "catalog-other-eos-model");
    let tok = gram::tokenizer::Tokenizer::from_file(&model.join("tokenizer.json")).unwrap();
    let stop = tok.encode_plain("velvet").unwrap()[0];
    let rug = tok.encode_plain("rug").unwrap();
    assert!(!rug.contains(&stop) && stop != 2, "{stop} {rug:?}");
    let run = builder(
        &model,
        &dir,
        &[
            serde_json::json!({"id": "p0", "title": "sofa", "codes": ["velvet sofa"]}),
            serde_json::json!({"id": "p1", "title": "rug", "codes": ["rug"]}),
        ],
    );
    let (v, _) = built(&run(&[], "before"));
    assert_eq!(v["report"]["products"], 2, "{v}");
    let gen = model.join("generation_config.json");
    std::fs::write(&gen, format!("{{\"eos_token_id\": [2, {stop}]}}")).unwrap();
    let out = run(&["--on-error", "stop"], "stop");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("product \"p0\"")
            && err.contains(&format!("contains token {stop}, an EOS of the model")),
        "{err}"
    );
    let (v, _) = built(&run(&["--on-error", "skip"], "skip"));
    assert_eq!(
        (&v["report"]["products"], &v["report"]["skipped_products"]),
        (&serde_json::json!(1), &serde_json::json!(1)),
        "{v}"
    );
    let e = gram::search::Engine::open(&dir.join("before"), Some(&model), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&format!("hold token {stop}, an EOS of the model")),
        "{e}"
    );
    // `gram codes` refuses such a code list too, naming its line.
    let codes = dir.join("codes.txt");
    std::fs::write(&codes, "rug\nvelvet sofa\n").unwrap();
    let out = gram(&[
        "codes",
        "--model",
        model.to_str().unwrap(),
        "--codes",
        codes.to_str().unwrap(),
        "rug",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("codes.txt: line 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&model).unwrap();
}

/// Writes `lines` as the catalog `dir/c.jsonl` and returns what runs `gram index build
/// --threads 1 EXTRA...` over `model` and it into `dir/OUT`.
fn builder<'a>(
    model: &'a std::path::Path,
    dir: &'a std::path::Path,
    lines: &[serde_json::Value],
) -> impl Fn(&[&str], &str) -> std::process::Output + 'a {
    let cat = dir.join("c.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&cat, text.join("\n")).unwrap();
    move |extra: &[&str], out: &str| {
        let mut args = vec!["--threads", "1"];
        args.extend_from_slice(extra);
        index_build(model, &cat, &dir.join(out), &args)
    }
}
