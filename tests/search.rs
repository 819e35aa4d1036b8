//! The in-process search path (`gram::search`): request validation, and a continuous batch
//! answering exactly as one request at a time.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gram::beam::BeamSearch;
use gram::search::{Admission, Engine, Request};

/// Builds a small index over tiny-llama with the CLI (as users do) and returns its directory.
fn small_index(tag: &str) -> PathBuf {
    let tmp = std::env::temp_dir().join(format!("gram-search-{tag}-{}", std::process::id()));
    let kinds = ["sofa", "chair", "lamp", "rug", "desk", "bed"];
    let materials = ["velvet", "oak", "wool", "brass"];
    let colours = ["green", "blue", "red"];
    let mut lines = Vec::new();
    for (i, k) in kinds.iter().enumerate() {
        for (j, m) in materials.iter().enumerate() {
            let c = colours[(i + j) % colours.len()];
            let mut codes = vec![
                k.to_string(),
                format!("{k} | {m}"),
                format!("{k} | {m} | {c}"),
            ];
            // Fine codes (4 and 5 parts) on some products, so every granularity is scored.
            if (i + j) % 3 == 0 {
                codes.push(format!("{k} | {m} | {c} | large"));
            }
            if (i + j) % 4 == 1 {
                codes.push(format!("{k} | {m} | {c} | large | soft"));
            }
            lines.push(
                serde_json::json!({"id": format!("p{i}-{j}"), "title": format!("{c} {m} {k}"),
                                   "codes": codes})
                .to_string(),
            );
        }
    }
    build_index(&tmp, "tiny-llama", &lines)
}

fn open(ix: &Path) -> Engine {
    Engine::open(ix, None, &Default::default()).unwrap()
}

/// An index whose model directory has gone (moved with its checkout, deleted) says so and
/// what to pass, rather than "config.json: No such file"; `--model` opens it again.
#[test]
fn an_index_whose_model_has_gone_names_it() {
    let tmp = std::env::temp_dir().join(format!("gram-search-gone-{}", std::process::id()));
    let model = copy_model(&model_dir("tiny-llama"), "search-gone-model");
    let line = serde_json::json!({"id": "p0", "title": "green sofa", "codes": ["sofa"]});
    let ix = build_index_with(&tmp, &model, &[line.to_string()]);
    let moved = model.with_file_name(format!("search-gone-model-moved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&moved);
    std::fs::rename(&model, &moved).unwrap();
    let e = Engine::open(&ix, None, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("which is not there any more") && e.contains("--model"),
        "{e}"
    );
    assert!(Engine::open(&ix, Some(&moved), &Default::default()).is_ok());
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&moved);
}

#[test]
fn bad_requests_are_clear_errors() {
    let ix = small_index("bad");
    let engine = open(&ix);
    let cases: Vec<(Request, &str)> = vec![
        (Request::new(""), "empty"),
        (Request::new("   "), "empty"),
        (Request::new("sofa ".repeat(400)), "bytes"),
        (Request::new("sofa ".repeat(100)), "tokens"),
        (
            Request {
                k: 0,
                ..Request::new("sofa")
            },
            "k: 0",
        ),
        (
            Request {
                k: 1_000_000,
                ..Request::new("sofa")
            },
            "k: 1000000",
        ),
        (
            Request {
                beam: 0,
                ..Request::new("sofa")
            },
            "beam: 0",
        ),
        (
            Request {
                beam: 100_000,
                ..Request::new("sofa")
            },
            "beam: 100000",
        ),
    ];
    for (req, want) in cases {
        let e = engine.prepare(req.clone()).err().unwrap();
        assert_eq!(e.kind(), "input", "{req:?}");
        assert!(e.to_string().contains(want), "{req:?}: {e}");
    }
    // The limits are inclusive: a query of exactly the most bytes or tokens allowed is taken,
    // one more is refused.
    let query = "green velvet sofa oak";
    let tok = gram::Tokenizer::from_file(&model_dir("tiny-llama").join("tokenizer.json")).unwrap();
    let tokens = tok.encode_plain(query).unwrap().len();
    for (bytes, toks, ok) in [
        (query.len(), 1000, true),
        (query.len() - 1, 1000, false),
        (1024, tokens, true),
        (1024, tokens - 1, false),
    ] {
        let limits = gram::search::Limits {
            max_query_bytes: bytes,
            max_query_tokens: toks,
            ..Default::default()
        };
        let engine = open(&ix).with_limits(limits);
        let got = engine.prepare(Request::new(query));
        assert_eq!(
            got.is_ok(),
            ok,
            "{bytes} bytes, {toks} tokens: {:?}",
            got.err()
        );
    }
    // Another model directory is refused.
    let e = Engine::open(&ix, Some(&model_dir("tiny-qwen2")), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rebuild it with this model"), "{e}");
    // So is the same model retrained in the same shape (same files, names and sizes, other
    // weights), while a plain copy serves.
    let copy = ix.parent().unwrap().join("model-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(model_dir("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    Engine::open(&ix, Some(&copy), &Default::default()).unwrap();
    let fingerprint = gram::search::model_fingerprint(&copy).unwrap();
    // A directory of symbolic links to the model's files is the same model (the sizes are
    // the files', not the links').
    #[cfg(unix)]
    {
        let links = ix.parent().unwrap().join("model-links");
        std::fs::create_dir_all(&links).unwrap();
        for f in std::fs::read_dir(model_dir("tiny-llama")).unwrap() {
            let f = f.unwrap().path();
            std::os::unix::fs::symlink(&f, links.join(f.file_name().unwrap())).unwrap();
        }
        assert_eq!(
            gram::search::model_fingerprint(&links).unwrap(),
            fingerprint
        );
        Engine::open(&ix, Some(&links), &Default::default()).unwrap();
    }
    let weights = copy.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    // A byte of the tensor table, and the first byte after the 64 KiB head (the first sampled
    // block): each changes the fingerprint.
    for at in [100, 1 << 16] {
        let mut changed = bytes.clone();
        changed[at] ^= 0x01;
        std::fs::write(&weights, &changed).unwrap();
        assert_ne!(
            gram::search::model_fingerprint(&copy).unwrap(),
            fingerprint,
            "byte {at}"
        );
    }
    let e = Engine::open(&ix, Some(&copy), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rebuild it with this model"), "{e}");
    std::fs::write(&weights, &bytes).unwrap();
    assert_eq!(gram::search::model_fingerprint(&copy).unwrap(), fingerprint);
    std::fs::remove_dir_all(ix.parent().unwrap()).unwrap();
}

#[test]
fn continuous_batch_answers_as_single_requests() {
    let ix = small_index("batch");
    let engine = open(&ix);
    let queries = [
        "green velvet sofa",
        "oak desk",
        "cheap rug",
        "red lamp for kids",
        "bed",
        "blue wool chair",
        "brass",
    ];
    let requests: Vec<Request> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| Request {
            k: 1 + 3 * i,
            beam: 1 + (i * 5) % 9,
            codes_only: i == 4,
            ..Request::new(*q)
        })
        .collect();
    let alone = search_alone(&engine, &requests);
    for (r, a) in requests.iter().zip(&alone) {
        assert!(!a.codes.is_empty() && a.codes.len() <= r.beam, "{r:?}");
        if r.codes_only {
            assert!(a.products.is_empty());
        } else {
            assert!(!a.products.is_empty() && a.products.len() <= r.k, "{r:?}");
        }
    }
    // Admitted two at a time, one step apart, into an arena that holds about two.
    let mut search = BeamSearch::new();
    let prepared: Vec<_> = requests
        .iter()
        .map(|r| engine.prepare(r.clone()).unwrap())
        .collect();
    let room = prepared
        .iter()
        .map(|p| engine.entries_for(p))
        .max()
        .unwrap()
        * 2;
    let mut batch = engine.batch(&mut search, room).unwrap();
    let mut queue: std::collections::VecDeque<_> = prepared.into_iter().enumerate().collect();
    let (mut tickets, mut got) = (std::collections::HashMap::new(), Vec::new());
    while !queue.is_empty() || batch.in_flight() > 0 {
        if let Some((i, p)) = queue.pop_front() {
            match batch.admit(p) {
                Admission::Admitted(t) => {
                    tickets.insert(t, i);
                }
                Admission::Wait(p) => queue.push_front((i, p)),
                Admission::Refused(e) => panic!("{e}"),
            }
        }
        got.extend(step_ok(&mut batch));
    }
    assert_eq!(got.len(), requests.len());
    for (t, r) in got {
        let a = &alone[tickets[&t]];
        assert_eq!(r.query, a.query);
        let codes = |x: &gram::search::Response| -> Vec<String> {
            x.codes.iter().map(|c| c.code.clone()).collect()
        };
        assert_eq!(codes(&r), codes(a), "{}", r.query);
        let ids = |x: &gram::search::Response| -> Vec<String> {
            x.products.iter().map(|p| p.id.clone()).collect()
        };
        assert_eq!(ids(&r), ids(a), "{}", r.query);
        // The same bits: the codes' scores and log-probs, then each product's score (the
        // CPU's answers do not depend on the batch; a ranker's state left from another
        // request would show here).
        assert_eq!(r.codes, a.codes, "{}", r.query);
        assert_eq!(r.products, a.products, "{}", r.query);
        for (x, y) in r.products.iter().zip(&a.products) {
            assert_eq!(x.score.to_bits(), y.score.to_bits(), "{}", r.query);
        }
    }
    std::fs::remove_dir_all(ix.parent().unwrap()).unwrap();
}

/// The engine opened for a `--device`: `cpu` is the CPU engine (same answers as
/// [`Engine::open`]), `cuda` is a device error where no GPU can run the model (none here;
/// tiny-llama's head dim on a GPU box), and `auto` opens on what it can and says so.
#[test]
fn any_engine_opens_on_the_device_asked_for() {
    use gram::backend::Device;
    use gram::search::AnyEngine;
    let ix = small_index("device");
    let load = gram::LoadOptions {
        threads: Some(1),
        ..Default::default()
    };
    let engine = Engine::open(&ix, None, &load).unwrap();
    let (any, info) = AnyEngine::open(Device::Cpu, &ix, None, &load).unwrap();
    assert_eq!(info.to_string(), "cpu");
    assert_eq!(
        serde_json::to_value(&info).unwrap(),
        serde_json::json!({"backend": "cpu"})
    );
    let AnyEngine::Cpu(cpu) = &any else {
        panic!("--device cpu opened another backend")
    };
    let request = || Request {
        k: 5,
        beam: 4,
        ..Request::new("green velvet sofa")
    };
    let mut beams = BeamSearch::new();
    let want = engine
        .search(&mut beams, vec![engine.prepare(request()).unwrap()])
        .unwrap();
    let got = cpu
        .search(&mut beams, vec![any.prepare(request()).unwrap()])
        .unwrap();
    assert_eq!(got[0].codes, want[0].codes);
    assert_eq!(got[0].products, want[0].products);
    assert_eq!(any.index().num_products(), engine.index().num_products());

    match AnyEngine::open(Device::Cuda, &ix, None, &load) {
        Err(e) => assert_eq!(e.kind(), "device", "{e}"),
        Ok(_) => panic!("tiny-llama opened on CUDA"),
    }
    let (auto, info) = AnyEngine::open(Device::Auto, &ix, None, &load).unwrap();
    match &auto {
        AnyEngine::Cpu(_) => assert!(info.to_string().starts_with("cpu"), "{info}"),
        AnyEngine::Cuda(_) => assert!(info.to_string().starts_with("cuda on "), "{info}"),
    }
    std::fs::remove_dir_all(ix.parent().unwrap()).unwrap();
}

/// The engine's product scores, with a `gram.json` of distinct granularity weights, the
/// code-likelihood term and the code-size term, against an f64 recomputation from what the
/// response says (each code's token log-probabilities) and what the index stores (each
/// posting's quantized Pt and its number of products):
/// every product of the catalog scored, under `max` and `sum`; the engine's top k is the
/// reference's, each score within f32 rounding, each product's matched codes exactly those
/// of the reference.
#[test]
fn scores_follow_gram_json_against_an_f64_reference() {
    use std::collections::BTreeMap;
    let ix = small_index("reference");
    let index = gram::index::Index::open(&gram::search::index_file(&ix)).unwrap();
    let text_to_id: BTreeMap<String, u32> = (0..index.num_codes() as u32)
        .map(|c| (index.code_text(c).unwrap().into_owned(), c))
        .collect();
    let dir = ix.parent().unwrap().join("model-weights");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(model_dir("tiny-llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    // Coarse (1–2 parts) / medium (3) / fine (4+): the small index has codes of 1 to 5 parts.
    // Mixed signs, as the shipped model's fit (a positive medium weight rewards divergence).
    let (coarse, medium, fine, alpha) = (-0.3f64, 0.75f64, -0.9f64, 0.25f64);
    let (mut codes_checked, mut fine_codes) = (0, 0);
    for (aggregation, per_token, beta) in [("max", false, 0.35f64), ("sum", true, 0.6)] {
        let settings = serde_json::json!({
            "query_template": "{query}", "product_template": "{title}", "delimiter": " | ",
            "weights": {"coarse": coarse, "medium": medium, "fine": fine},
            "aggregation": aggregation,
            "code_logprob": {"weight": alpha, "per_token": per_token},
            "code_size": {"weight": beta},
        });
        std::fs::write(dir.join("gram.json"), settings.to_string()).unwrap();
        let engine = Engine::open(&ix, Some(&dir), &Default::default()).unwrap();
        let mut beams = BeamSearch::new();
        for query in ["green velvet sofa", "oak desk", "lamp"] {
            // Every product the codes reach (24 in the index): the fine codes' products too,
            // which a tiny random model ranks low.
            let request = Request {
                k: 30,
                beam: 12,
                ..Request::new(query)
            };
            let p = engine.prepare(request).unwrap();
            let r = engine.search(&mut beams, vec![p]).unwrap().remove(0);
            // The reference: every posting of every returned code, in f64.
            let mut totals: BTreeMap<u32, (f64, Vec<String>)> = BTreeMap::new();
            for code in &r.codes {
                let id = text_to_id[&code.code];
                let n = code.token_logprobs.len() - 1; // the last is the EOS
                let parts = code.code.split(" | ").count();
                fine_codes += usize::from(parts >= 4);
                let w = match parts {
                    0..=2 => coarse,
                    3 => medium,
                    _ => fine,
                };
                let lp: f64 = code.token_logprobs.iter().map(|&l| l as f64).sum();
                let prior = alpha * if per_token { lp / (n + 1) as f64 } else { lp };
                let pq32: Vec<f32> = code.token_logprobs[..n].iter().map(|l| l.exp()).collect();
                let pq: Vec<f64> = pq32.iter().map(|&p| p as f64).collect();
                let w32 = vec![w as f32; n];
                let list = index.postings(id, &pq32, &w32).unwrap();
                let prior = prior - beta * (list.products.len() as f64).ln();
                for (j, &product) in list.products.iter().enumerate() {
                    let pt: Vec<f64> = (0..n)
                        .map(|t| list.pt[t * list.products.len() + j] as f64 / 65535.0)
                        .collect();
                    let s = prior + gram::score::s_rele_f64(&pq, &pt, &vec![w; n]);
                    let e = totals
                        .entry(product)
                        .or_insert((f64::NEG_INFINITY, Vec::new()));
                    e.0 = match (aggregation, e.1.is_empty()) {
                        (_, true) => s,
                        ("max", false) => e.0.max(s),
                        _ => e.0 + s,
                    };
                    e.1.push(code.code.clone());
                }
            }
            let mut want: Vec<(u32, f64, Vec<String>)> =
                totals.into_iter().map(|(p, (s, c))| (p, s, c)).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            assert_eq!(
                r.products.len(),
                want.len().min(30),
                "{aggregation} {query}"
            );
            for (got, (product, score, codes)) in r.products.iter().zip(&want) {
                let (pid, _) = index.product(*product).unwrap();
                let at = format!("{aggregation} {query:?} {pid}");
                // Near-ties may swap within f32 rounding: compare the score at this rank, and
                // the product where the reference's next score is clearly apart.
                assert!(
                    (got.score as f64 - score).abs() <= 1e-4 * (1.0 + score.abs()),
                    "{at}: {} vs {score}",
                    got.score
                );
                if got.id == pid {
                    codes_checked += 1;
                    let mut c = codes.clone();
                    c.sort();
                    let mut g: Vec<String> = got.codes.iter().map(|c| c.to_string()).collect();
                    g.sort();
                    assert_eq!(g, c, "{at}: matched codes");
                }
            }
            // Every product of the reference's top 30 whose score is clearly above the first
            // left out (not a near-tie at the cut) is returned.
            let ids: Vec<&str> = r.products.iter().map(|p| p.id.as_str()).collect();
            let cut = want.get(30).map_or(f64::NEG_INFINITY, |w| w.1);
            for (p, score, _) in want.iter().take(30) {
                if score - cut > 1e-4 * (1.0 + score.abs()) {
                    let pid = index.product(*p).unwrap().0;
                    assert!(
                        ids.contains(&pid.as_ref()),
                        "{aggregation} {query}: {pid} ({score}) missing from {ids:?}"
                    );
                }
            }
        }
    }
    // The matched codes were compared for most of the returned products, and the fine
    // weight's branch ran.
    assert!(
        codes_checked >= 20,
        "{codes_checked} products' codes compared"
    );
    assert!(
        fine_codes > 0,
        "no query returned a code of 4 or more parts"
    );
    std::fs::remove_dir_all(ix.parent().unwrap()).unwrap();
}

/// One step of `batch`: the requests that finished, each answered (none may fail here).
fn step_ok(
    batch: &mut gram::search::Batch<'_>,
) -> Vec<(gram::beam::Ticket, gram::search::Response)> {
    batch
        .step()
        .unwrap()
        .into_iter()
        .map(|(t, r)| (t, r.unwrap()))
        .collect()
}
