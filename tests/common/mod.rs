//! Shared test helpers: fixture paths, golden files, tolerance checks.
#![allow(dead_code)]

pub mod gguf;

use std::path::{Path, PathBuf};
use std::sync::Once;

use serde_json::Value;

/// The repository root: `$GRAM_REPO` when set (a test binary run on another machine, e.g.
/// the GPU box), else the crate's own directory.
pub fn repo() -> PathBuf {
    std::env::var_os("GRAM_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The shared data directory: `GRAM_SHARED_DATA` (as `tools/get_smollm2.sh` reads it), else
/// `../shared/data` beside the repository.
pub fn shared_data() -> PathBuf {
    std::env::var_os("GRAM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data"))
}

pub fn model_dir(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

pub fn golden(name: &str) -> Value {
    let path = repo().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest relative error of probabilities, `|g - w| / w` (no floor on the denominator: a
/// probability of 1e-3 must be right to its own digits, not to 1e-4 absolute).
pub fn max_prob_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            assert!(w > 0.0 && w.is_finite(), "reference probability {w}");
            let e = (g as f64 - w as f64).abs() / w as f64;
            // A NaN would vanish in `f64::max`: it is infinitely wrong.
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// Largest `|got - want| / max(|want|, 1)` over all elements; panics on a length mismatch.
/// Infinite where one side is NaN and the other is not (`f64::max` would skip the NaN, so an
/// all-NaN output scored 0); the same infinity on both sides counts as equal.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| match (g.is_nan(), w.is_nan()) {
            (true, true) => 0.0,
            (true, false) | (false, true) => f64::INFINITY,
            _ if g == w => 0.0,
            _ => ((g as f64 - w as f64).abs()) / (w.abs() as f64).max(1.0),
        })
        .fold(0.0, f64::max)
}

/// The SmolLM2-135M directory, fetched through the documented command when missing
/// (`tools/get_smollm2.sh`). Panics (never skips) when it cannot be had.
pub fn smollm2_dir() -> PathBuf {
    static FETCH: Once = Once::new();
    let dir = model_dir("smollm2-135m-instruct");
    FETCH.call_once(|| {
        let status = std::process::Command::new("bash")
            .arg(repo().join("tools/get_smollm2.sh"))
            .arg(&dir)
            .status()
            .expect("run tools/get_smollm2.sh");
        assert!(
            status.success(),
            "tools/get_smollm2.sh failed: SmolLM2 weights are needed for this test"
        );
    });
    assert!(dir.join("model.gguf").exists());
    dir
}

/// An empty temp directory of this test process, `name` telling it from the others (made anew).
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gram-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Loads the model in `dir` and runs a 3-token prompt through it, catching a panic: `Some(true)`
/// it loaded and ran (an error at run time counts: damaged weights may be refused then),
/// `Some(false)` the load refused it with an error, `None` something panicked.
pub fn load_and_run(dir: &Path) -> Option<bool> {
    use gram::{LoadOptions, Model};
    std::panic::catch_unwind(|| match Model::load(dir, &LoadOptions::default()) {
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
        Ok(model) => {
            let ids = [5u32, 17, 42];
            let mut cache = model.new_cache(1, ids.len()).unwrap();
            let _ = model.forward(&mut cache, &ids, &[0; 3], &[2]);
            true
        }
    })
    .ok()
}

/// A damage test saw both outcomes: its mutations reach the loader's checks and pass some of
/// them (a test whose every case is refused, or loaded, proves less).
pub fn both_outcomes(refused: usize, loaded: usize) {
    eprintln!("refused {refused}, loaded {loaded}");
    assert!(
        refused > 100 && loaded > 10,
        "refused {refused}, loaded {loaded}"
    );
}

/// Copies a model directory (files only) into a fresh temp dir for corruption tests.
pub fn copy_model(src: &Path, name: &str) -> PathBuf {
    let dst = fresh_dir(name);
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    dst
}

/// Catalog items `p0`, `p1`, ... with these titles and no codes.
pub fn items(titles: &[&str]) -> Vec<gram::catalog::Item> {
    titles
        .iter()
        .enumerate()
        .map(|(i, t)| gram::catalog::Item {
            id: format!("p{i}"),
            title: t.to_string(),
            attributes: Default::default(),
            codes: vec![],
            line: 0,
        })
        .collect()
}

/// Runs the `gram` binary with `args` and waits for it.
pub fn gram(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(args)
        .output()
        .expect("run gram")
}

/// `gram index build --model MODEL --catalog CATALOG --out OUT EXTRA...`, waited for.
pub fn index_build(
    model: &Path,
    catalog: &Path,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gram"))
        .args(["index", "build", "--model"])
        .arg(model)
        .arg("--catalog")
        .arg(catalog)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run gram index build")
}

/// Builds an index with `gram index build` (as users do) over `model` from catalog `lines`
/// (JSONL) in `dir` (made anew); returns the index directory.
pub fn build_index(dir: &Path, model: &str, lines: &[String]) -> PathBuf {
    build_index_with(dir, &model_dir(model), lines)
}

/// [`build_index`] over the model directory `model`.
pub fn build_index_with(dir: &Path, model: &Path, lines: &[String]) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let catalog = dir.join("catalog.jsonl");
    std::fs::write(&catalog, lines.join("\n")).unwrap();
    let out = index_build(model, &catalog, &dir.join("ix"), &["--threads", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("ix")
}

/// Each request searched on its own through `engine` (one query per decoder batch): the
/// answers a batched path must reproduce.
pub fn search_alone(
    engine: &gram::search::Engine,
    requests: &[gram::search::Request],
) -> Vec<gram::search::Response> {
    let mut beams = gram::beam::BeamSearch::new();
    requests
        .iter()
        .map(|r| {
            let p = engine.prepare(r.clone()).unwrap();
            engine.search(&mut beams, vec![p]).unwrap().remove(0)
        })
        .collect()
}

/// Flips one bit in the middle of the section of `kind` of an index file's bytes
/// (docs/FORMAT.md: the section table after the 16-byte header, 32 bytes an entry: kind u32,
/// offset u64 at +8, length u64 at +16): the structure checks at open cannot see it, the
/// checksums can.
pub fn flip_in_section(bytes: &mut [u8], kind: usize) {
    let word = |bytes: &[u8], at: usize, n: usize| {
        bytes[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |a, &b| (a << 8) | b as u64) as usize
    };
    let (offset, len) = (0..word(bytes, 12, 4))
        .map(|i| 16 + 32 * i)
        .find(|&e| word(bytes, e, 4) == kind)
        .map(|e| (word(bytes, e + 8, 8), word(bytes, e + 16, 8)))
        .unwrap_or_else(|| panic!("no section of kind {kind}"));
    assert!(len > 0, "section {kind} is empty");
    bytes[offset + len / 2] ^= 0x10;
}
