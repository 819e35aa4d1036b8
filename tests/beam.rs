//! Trie-constrained beam search: exactness against teacher forcing, batching invariance, invalid
//! rate 0, and bad input. (Parity with transformers' `prefix_allowed_tokens_fn` is in
//! `tests/beam_hf.rs`.)

mod common;

use common::*;
use gram::beam::{self, BeamOptions, BeamSearch, Normalize, Query};
use gram::lm::log_softmax;
use gram::trie::{CodeSet, Trie};
use gram::{Model, Tokenizer};

const MODELS: [&str; 3] = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"];

/// A code set of attribute codes: 1 to 3 parts joined by " | ".
fn code_texts() -> Vec<String> {
    let kinds = ["sofa", "chair", "lamp", "rug", "table", "bed", "desk"];
    let materials = ["", "velvet", "oak", "wool", "brass"];
    let colours = ["", "green", "blue", "red"];
    let mut out = Vec::new();
    for k in kinds {
        for m in materials {
            for c in colours {
                let parts: Vec<&str> = [k, m, c].into_iter().filter(|p| !p.is_empty()).collect();
                out.push(parts.join(" | "));
            }
        }
    }
    out
}

struct Fixture {
    tok: Tokenizer,
    model: Model,
    set: CodeSet,
    trie: Trie,
}

/// A few hundred codes for the exactness test (issue 3: "a code set of a few hundred codes"):
/// [`code_texts`] with a fourth, optional part, the size.
fn code_texts_wide() -> Vec<String> {
    let mut out = Vec::new();
    for code in code_texts() {
        for size in ["", "small", "large"] {
            out.push(match size {
                "" => code.clone(),
                s => format!("{code} | {s}"),
            });
        }
    }
    out
}

fn fixture(name: &str) -> Fixture {
    fixture_with(name, code_texts())
}

fn fixture_with(name: &str, codes: Vec<String>) -> Fixture {
    let dir = model_dir(name);
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let eos = model.config.eos_token_ids[0];
    let set = CodeSet::from_texts(codes, &tok, eos).unwrap();
    let trie = Trie::build(&set, model.config.vocab_size, eos).unwrap();
    Fixture {
        tok,
        model,
        set,
        trie,
    }
}

/// Beam search for one prompt.
fn search_one(f: &Fixture, prompt: Vec<u32>, options: BeamOptions) -> beam::Output {
    let mut out = beam::search(&f.model, &f.trie, &[Query { prompt, options }]).unwrap();
    out.remove(0)
}

/// Every code scored by teacher forcing: the prompt and the code's tokens in one forward pass
/// (one cache slot per code), the log-prob of each code token and of the EOS read off the
/// logits, normalized as `normalize` says. Returns `(code id, score, token logprobs)`, best
/// first.
fn teacher_forced(
    f: &Fixture,
    prompt: &[u32],
    normalize: Normalize,
    length_penalty: f64,
) -> Vec<(u32, f32, Vec<f32>)> {
    let (model, trie, set) = (&f.model, &f.trie, &f.set);
    let eos = trie.eos();
    let n = set.len();
    let cap = prompt.len() + trie.max_len();
    let mut cache = model.new_cache(n, cap).unwrap();
    let (mut tokens, mut slots, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let code = set.code_tokens(i);
        for &t in prompt.iter().chain(code) {
            tokens.push(t);
            slots.push(i);
        }
        // Rows predicting code token 0.., then EOS.
        let last = tokens.len() - 1;
        rows.extend(last - code.len()..=last);
    }
    let logits = model.forward(&mut cache, &tokens, &slots, &rows).unwrap();
    let vocab = model.config.vocab_size;
    let mut rows = logits.chunks_exact(vocab);
    let mut out = Vec::new();
    for i in 0..n {
        let code = set.code_tokens(i);
        let mut lps = Vec::new();
        for d in 0..=code.len() {
            let row = rows.next().unwrap();
            let target = if d < code.len() { code[d] } else { eos };
            let lp = match normalize {
                Normalize::Full => log_softmax(row)[target as usize],
                Normalize::Children => {
                    let node = trie.walk(&code[..d]).unwrap();
                    let mut allowed: Vec<u32> = trie.children(node).0.to_vec();
                    if trie.code(node).is_some() {
                        allowed.push(eos);
                    }
                    let sub: Vec<f32> = allowed.iter().map(|&t| row[t as usize]).collect();
                    let at = allowed.iter().position(|&t| t == target).unwrap();
                    log_softmax(&sub)[at]
                }
            };
            lps.push(lp);
        }
        let sum: f32 = lps.iter().sum();
        let score = sum / gram::beam::length_factor(lps.len(), length_penalty);
        out.push((i as u32, score, lps));
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

#[test]
fn wide_beam_returns_every_code_in_teacher_forced_order() {
    for name in MODELS {
        let f = fixture_with(name, code_texts_wide());
        let n = f.set.len();
        assert_eq!(n, 420, "a few hundred codes");
        for (prompt, normalize, lp) in [
            (
                "green velvet sofa for the living room",
                Normalize::Full,
                1.0,
            ),
            ("oak desk", Normalize::Children, 1.0),
            ("blue wool rug", Normalize::Full, 2.0),
            ("a lamp", Normalize::Full, 0.5),
        ] {
            let ids = f.tok.encode(prompt).unwrap();
            let want = teacher_forced(&f, &ids, normalize, lp);
            let options = BeamOptions {
                beam: n + 1,
                max_new_tokens: f.trie.max_len() + 1,
                length_penalty: lp,
                normalize,
                constrained: true,
            };
            let out = search_one(&f, ids, options);
            let got = &out.codes;
            assert_eq!(got.len(), n, "{name} {prompt:?}: every code comes back");
            for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
                let ctx = format!("{name} {prompt:?} {normalize:?} lp {lp} rank {rank}");
                assert_eq!(g.code, Some(w.0), "{ctx}: code");
                assert_eq!(g.tokens, f.set.code_tokens(w.0 as usize), "{ctx}: tokens");
                assert!(
                    (g.score - w.1).abs() < 1e-4,
                    "{ctx}: {} vs {}",
                    g.score,
                    w.1
                );
                assert_eq!(g.token_logprobs.len(), w.2.len(), "{ctx}");
                let err = max_rel_err(&g.token_logprobs, &w.2);
                assert!(err < 1e-4, "{ctx}: token logprobs off by {err:.2e}");
            }
        }
    }
}

/// Beam 1 is transformers' greedy search under the trie: the best allowed token at each step
/// (full-vocabulary log-probs, ties to the lower id), ending at the first EOS.
#[test]
fn beam_one_is_constrained_greedy() {
    for name in MODELS {
        let f = fixture(name);
        let eos = f.trie.eos();
        for prompt in [
            "salon chair",
            "green sofa",
            "oak",
            "a red rug for the hall",
            "lamp",
        ] {
            let ids = f.tok.encode(prompt).unwrap();
            let m = f.trie.max_len() + 1;
            let mut cache = f.model.new_cache(1, ids.len() + m).unwrap();
            let mut logits = f
                .model
                .forward(&mut cache, &ids, &vec![0; ids.len()], &[ids.len() - 1])
                .unwrap();
            let (mut node, mut toks, mut lps) = (Trie::ROOT, Vec::new(), Vec::new());
            let greedy = loop {
                let lp = log_softmax(&logits);
                let mut allowed: Vec<u32> = f.trie.children(node).0.to_vec();
                if f.trie.code(node).is_some() {
                    allowed.push(eos);
                }
                let best = *allowed
                    .iter()
                    .max_by(|&&a, &&b| lp[a as usize].total_cmp(&lp[b as usize]).then(b.cmp(&a)))
                    .unwrap();
                lps.push(lp[best as usize]);
                if best == eos {
                    break Some(f.trie.code(node).unwrap());
                }
                toks.push(best);
                node = f.trie.child(node, best).unwrap();
                if toks.len() == m {
                    break None;
                }
                logits = f.model.forward(&mut cache, &[best], &[0], &[0]).unwrap();
            };
            let options = BeamOptions {
                beam: 1,
                max_new_tokens: m,
                ..Default::default()
            };
            let out = search_one(&f, ids, options);
            let ctx = format!("{name} {prompt:?}");
            assert_eq!(out.codes.first().and_then(|c| c.code), greedy, "{ctx}");
            if let Some(c) = out.codes.first() {
                assert_eq!(c.tokens, toks, "{ctx}");
                assert!(max_rel_err(&c.token_logprobs, &lps) < 1e-4, "{ctx}");
            }
        }
    }
}

fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut s = seed;
    move |m| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    }
}

/// Random batches mixing beam widths, prompt lengths, length penalties, both normalizations
/// and an unconstrained query: each query's codes, scores and token log-probs are the bits it
/// gets alone (a query normalized over its children used to differ in the last bit when a
/// fully normalized one shared its steps: its logits came from the dense head then, from the
/// sparse head's other sum alone), and every constrained result is a code of the set.
#[test]
fn batched_queries_match_single_ones_and_return_only_codes() {
    let words = [
        "sofa", "green", "for", "kids", "oak", "table", "modern", "lamp", "cheap", "rug",
    ];
    for name in MODELS {
        let f = fixture(name);
        let mut next = rng(17 + name.len() as u64);
        let mut search = BeamSearch::new();
        for round in 0..3 {
            let queries: Vec<Query> = (0..1 + next(6))
                .map(|_| {
                    let prompt: Vec<&str> = (0..1 + next(12))
                        .map(|_| words[next(words.len() as u64) as usize])
                        .collect();
                    Query {
                        prompt: f.tok.encode(&prompt.join(" ")).unwrap(),
                        options: BeamOptions {
                            beam: 1 + next(24) as usize,
                            max_new_tokens: 4 + next(14) as usize,
                            length_penalty: [1.0, 0.5, 2.0][next(3) as usize],
                            normalize: [Normalize::Full, Normalize::Children][next(2) as usize],
                            constrained: true,
                        },
                    }
                })
                .collect();
            let mut queries = queries;
            // One unconstrained query among constrained ones: the batch's head then serves
            // both kinds of row (the dense head's constrained branches).
            if let [_, .., last] = queries.as_mut_slice() {
                last.options.constrained = false;
            }
            let together = search.run(&f.model, &f.trie, &queries).unwrap();
            assert_eq!(together.len(), queries.len(), "{name} round {round}");
            for (qi, (q, got)) in queries.iter().zip(&together).enumerate() {
                let ctx = format!("{name} round {round} query {qi} {:?}", q.options);
                let alone = beam::search(&f.model, &f.trie, std::slice::from_ref(q)).unwrap();
                let alone = &alone[0];
                assert!(got.codes.len() <= q.options.beam, "{ctx}");
                assert_eq!(got.codes.len(), alone.codes.len(), "{ctx}");
                assert_eq!(got.invalid, alone.invalid, "{ctx}");
                for (g, a) in got.codes.iter().zip(&alone.codes) {
                    assert_eq!(g.code, a.code, "{ctx}");
                    assert_eq!(g.tokens, a.tokens, "{ctx}");
                    assert_eq!(g.score.to_bits(), a.score.to_bits(), "{ctx}");
                    assert_eq!(g.token_logprobs.len(), a.token_logprobs.len(), "{ctx}");
                    for (x, y) in g.token_logprobs.iter().zip(&a.token_logprobs) {
                        assert_eq!(x.to_bits(), y.to_bits(), "{ctx}: token logprob {x} vs {y}");
                    }
                }
                if !q.options.constrained {
                    continue;
                }
                // Invalid rate 0: each returned code is the set's code with those tokens.
                for c in &got.codes {
                    let id = c.code.expect("constrained results are codes") as usize;
                    assert_eq!(c.tokens, f.set.code_tokens(id), "{ctx}");
                    assert_eq!(c.token_logprobs.len(), c.tokens.len() + 1, "{ctx}");
                    let sum: f32 = c.token_logprobs.iter().sum();
                    let len = c.token_logprobs.len() as f32;
                    let want = sum / len.powf(q.options.length_penalty as f32);
                    assert!((c.score - want).abs() < 1e-4, "{ctx}: score {}", c.score);
                    assert!(c.tokens.len() < q.options.max_new_tokens, "{ctx}");
                }
                let scores: Vec<f32> = got.codes.iter().map(|c| c.score).collect();
                assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{ctx}: best first");
            }
        }
    }
}

/// Continuous batching: queries admitted at random steps into a small arena (so some wait for
/// others to finish and reuse their entries, fragmented) come out as they do alone.
#[test]
fn continuous_batching_matches_single_queries() {
    let words = [
        "sofa", "green", "oak", "table", "lamp", "rug", "cheap", "for", "kids",
    ];
    for name in MODELS {
        let f = fixture(name);
        let mut next = rng(99 + name.len() as u64);
        let queries: Vec<Query> = (0..14)
            .map(|_| {
                let prompt: Vec<&str> = (0..1 + next(8))
                    .map(|_| words[next(words.len() as u64) as usize])
                    .collect();
                Query {
                    prompt: f.tok.encode(&prompt.join(" ")).unwrap(),
                    options: BeamOptions {
                        beam: 1 + next(12) as usize,
                        max_new_tokens: 3 + next(10) as usize,
                        normalize: [Normalize::Full, Normalize::Children][next(2) as usize],
                        ..Default::default()
                    },
                }
            })
            .collect();
        let mut search = BeamSearch::new();
        let biggest = 160;
        let mut batch = beam::Batcher::new(&mut search, &f.model, &f.trie, 2 * biggest).unwrap();
        let (mut pending, mut got) = (queries.iter().enumerate().peekable(), Vec::new());
        let mut tickets = std::collections::HashMap::new();
        let mut waited = 0;
        while pending.peek().is_some() || batch.in_flight() > 0 {
            // Admit a random number of the next queries, as long as they fit.
            for _ in 0..next(3) {
                let Some(&(i, q)) = pending.peek() else { break };
                assert!(batch.entries_for(q) <= biggest, "test sizing");
                match batch.admit(q.clone()).unwrap() {
                    Some(t) => {
                        tickets.insert(t, i);
                        pending.next();
                    }
                    None => {
                        waited += 1;
                        break;
                    }
                }
            }
            got.extend(step_ok(&mut batch));
        }
        assert_eq!(
            batch.free_entries(),
            2 * biggest,
            "{name}: every entry returns"
        );
        assert!(
            waited > 0,
            "{name}: the arena never filled; the test proves less"
        );
        assert_eq!(got.len(), queries.len());
        for (t, out) in got {
            let q = &queries[tickets[&t]];
            let alone = search_one(&f, q.prompt.clone(), q.options);
            let ctx = format!("{name} query {} {:?}", tickets[&t], q.options);
            assert_eq!(out.codes.len(), alone.codes.len(), "{ctx}");
            for (g, a) in out.codes.iter().zip(&alone.codes) {
                assert_eq!(g.code, a.code, "{ctx}");
                // The same bits: a query's answer does not depend on its neighbours.
                assert_eq!(g.score.to_bits(), a.score.to_bits(), "{ctx}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g.token_logprobs), bits(&a.token_logprobs), "{ctx}");
            }
        }
        // A query that can never fit is an error, not a wait.
        let mut search = BeamSearch::new();
        let mut small = beam::Batcher::new(&mut search, &f.model, &f.trie, 8).unwrap();
        let e = small.admit(queries[0].clone()).err().unwrap().to_string();
        assert!(e.contains("KV entries"), "{e}");
    }
}

/// A query cancelled mid-flight leaves at once (its entries free), the others answer as alone;
/// each step reports the rows it ran.
#[test]
fn a_cancelled_query_leaves_the_batch() {
    let f = fixture("tiny-llama");
    let queries: Vec<Query> = ["green sofa", "oak table for kids", "lamp"]
        .iter()
        .map(|p| Query {
            prompt: f.tok.encode(p).unwrap(),
            options: BeamOptions {
                beam: 4,
                max_new_tokens: 8,
                ..Default::default()
            },
        })
        .collect();
    let mut search = BeamSearch::new();
    let cap = 200;
    let mut batch = beam::Batcher::new(&mut search, &f.model, &f.trie, cap).unwrap();
    let t: Vec<_> = queries
        .iter()
        .map(|q| batch.admit(q.clone()).unwrap().unwrap())
        .collect();
    let mut got = step_ok(&mut batch);
    let prompts: usize = queries.iter().map(|q| q.prompt.len()).sum();
    assert_eq!(
        batch.last_step_rows(),
        prompts,
        "the first step prefills every prompt"
    );
    assert!(batch.cancel(t[1]));
    assert!(!batch.cancel(t[1]), "already gone");
    while batch.in_flight() > 0 {
        got.extend(step_ok(&mut batch));
        assert!(
            batch.last_step_rows() <= 2 * 4,
            "one row per running beam of two queries"
        );
    }
    assert_eq!(batch.free_entries(), cap);
    let tickets: Vec<_> = got.iter().map(|g| g.0).collect();
    assert_eq!(tickets.len(), 2);
    assert!(tickets.contains(&t[0]) && tickets.contains(&t[2]));
    for (ticket, out) in got {
        let q = &queries[if ticket == t[0] { 0 } else { 2 }];
        let alone = search_one(&f, q.prompt.clone(), q.options);
        // The same codes, scores and log-probs, bit for bit (f32 equality; none is NaN).
        assert_eq!(out.codes, alone.codes);
    }
}

/// A shared prompt prefix (the template's head, prefilled once) changes no result: same codes,
/// same scores, fewer rows. Covers queries that do not start with it, a prompt equal to it,
/// reuse across runs and the arena growing under it.
#[test]
fn shared_prefix_gives_the_same_codes() {
    for name in MODELS {
        let f = fixture(name);
        let head = f.tok.encode("Give the code for the query:").unwrap();
        let prompts = [
            "Give the code for the query: green sofa",
            "Give the code for the query: oak desk for kids",
            "a lamp",
            "Give the code for the query:",
        ];
        let queries = |beam: usize| -> Vec<Query> {
            prompts
                .iter()
                .map(|p| Query {
                    prompt: f.tok.encode(p).unwrap(),
                    options: BeamOptions {
                        beam,
                        max_new_tokens: f.trie.max_len() + 1,
                        ..Default::default()
                    },
                })
                .collect()
        };
        let starts = queries(1)
            .iter()
            .filter(|q| q.prompt.starts_with(&head) && q.prompt.len() > head.len())
            .count();
        assert_eq!(
            starts, 2,
            "{name}: the prefix must be a token prefix of two prompts"
        );
        let mut with = BeamSearch::new();
        with.set_prefix(&f.model, head.clone()).unwrap();
        for beam in [4, 12] {
            let qs = queries(beam);
            let plain = beam::search(&f.model, &f.trie, &qs).unwrap();
            let shared = with.run(&f.model, &f.trie, &qs).unwrap();
            assert_eq!(
                (plain.len(), shared.len()),
                (qs.len(), qs.len()),
                "{name} beam {beam}"
            );
            for (i, (a, b)) in plain.iter().zip(&shared).enumerate() {
                let ctx = format!("{name} beam {beam} prompt {i}");
                // Codes, scores and token log-probs, bit for bit: the prefix's keys and values
                // are the ones the whole prompt's prefill computes (each row on its own).
                assert_eq!(a.codes, b.codes, "{ctx}");
                let saved = if i < 2 { head.len() } else { 0 };
                assert_eq!(a.rows, b.rows + saved, "{ctx}: rows");
            }
        }
    }
}

/// Stable rows (every query's decode step runs a row per beam slot, fillers repeating a running
/// beam where fewer run, as the CUDA backend asks for by default): the same codes, scores and
/// per-token log-probabilities, bit for bit, as without them, on random batches whose narrow
/// tries leave fewer running beams than slots; and fillers did run. With finished queries'
/// rows held as well (`Batcher::set_hold_finished`, what `BeamSearch::run` does): the same
/// results again, every decode step runs every query's slots (one pass shape from the first
/// decode step to the last), and every arena entry is free when the batch is done.
#[test]
fn stable_rows_give_the_same_results() {
    let words = [
        "sofa", "green", "oak", "table", "lamp", "rug", "cheap", "for", "kids",
    ];
    let (mut fillers, mut held_extra) = (0, 0);
    for name in MODELS {
        let f = fixture(name);
        let mut next = rng(4242 + name.len() as u64);
        let head = f.tok.encode("sofa green oak").unwrap();
        for round in 0..4 {
            let queries: Vec<Query> = (0..1 + next(5))
                .map(|_| {
                    let mut prompt: Vec<&str> = (0..1 + next(8))
                        .map(|_| words[next(words.len() as u64) as usize])
                        .collect();
                    if next(2) == 0 {
                        prompt.splice(0..0, ["sofa", "green", "oak"]);
                    }
                    Query {
                        prompt: f.tok.encode(&prompt.join(" ")).unwrap(),
                        options: BeamOptions {
                            beam: 1 + next(40) as usize,
                            max_new_tokens: 3 + next(14) as usize,
                            length_penalty: [1.0, 0.5][next(2) as usize],
                            normalize: [Normalize::Full, Normalize::Children][next(2) as usize],
                            constrained: true,
                        },
                    }
                })
                .collect();
            // Rows the batch ran at each step, stepping a batcher by hand.
            let run = |stable: bool, hold: bool| -> (Vec<beam::Output>, Vec<usize>) {
                let mut search = BeamSearch::new();
                search.set_stable_rows(Some(stable));
                if round % 2 == 1 {
                    search.set_prefix(&f.model, head.clone()).unwrap();
                }
                let entries = queries
                    .iter()
                    .map(|q| q.prompt.len() + q.options.beam * q.options.max_new_tokens)
                    .sum();
                let mut batch =
                    beam::Batcher::new(&mut search, &f.model, &f.trie, entries).unwrap();
                batch.set_hold_finished(hold);
                for q in &queries {
                    batch
                        .admit(q.clone())
                        .unwrap()
                        .expect("sized for the batch");
                }
                let (mut done, mut ran) = (Vec::new(), Vec::new());
                while batch.in_flight() > 0 {
                    done.extend(step_ok(&mut batch));
                    ran.push(batch.last_step_rows());
                }
                assert_eq!(batch.free_entries(), entries, "every entry free at the end");
                done.sort_by_key(|d| d.0);
                (done.into_iter().map(|d| d.1).collect(), ran)
            };
            let (plain, plain_steps) = run(false, false);
            let (stable, stable_steps) = run(true, false);
            let (held, held_steps) = run(true, true);
            // Held rows: every decode step runs every query's beam slots (no query here ends
            // at its first selection: codes have at least one token, limits at least 3).
            let slots: usize = queries.iter().map(|q| q.options.beam).sum();
            assert!(
                held_steps[1..].iter().all(|&r| r == slots),
                "{name} round {round}: held rows {held_steps:?}, {slots} slots"
            );
            held_extra += held_steps.iter().sum::<usize>() - stable_steps.iter().sum::<usize>();
            let (plain_rows, stable_rows) = (
                plain_steps.iter().sum::<usize>(),
                stable_steps.iter().sum::<usize>(),
            );
            let own: usize = plain.iter().map(|o| o.rows).sum();
            assert_eq!(
                plain_rows, own,
                "{name} round {round}: no fillers without stable rows"
            );
            assert!(
                stable_rows >= own,
                "{name} round {round}: {stable_rows} rows ran, {own} owned"
            );
            assert_eq!(
                (stable.len(), held.len()),
                (queries.len(), queries.len()),
                "{name} round {round}"
            );
            assert_eq!(plain.len(), queries.len(), "{name} round {round}");
            let variants = plain.iter().zip(&stable).chain(plain.iter().zip(&held));
            for (qi, (a, b)) in variants.enumerate() {
                let ctx = format!("{name} round {round} query {}", qi % plain.len());
                assert_eq!(a.rows, b.rows, "{ctx}: rows of its own");
                assert_eq!(a.codes.len(), b.codes.len(), "{ctx}");
                for (x, y) in a.codes.iter().zip(&b.codes) {
                    assert_eq!((x.code, &x.tokens), (y.code, &y.tokens), "{ctx}");
                    assert_eq!(x.score.to_bits(), y.score.to_bits(), "{ctx}");
                    let bits = |c: &beam::Code| -> Vec<u32> {
                        c.token_logprobs.iter().map(|l| l.to_bits()).collect()
                    };
                    assert_eq!(bits(x), bits(y), "{ctx}");
                }
            }
            fillers += stable_rows - own;
        }
    }
    // Over the models and rounds, some steps had fewer running beams than slots, and some
    // queries finished before others.
    eprintln!("{fillers} filler rows ran, {held_extra} held rows");
    assert!(fillers > 0, "no filler row ever ran");
    assert!(held_extra > 0, "no query finished before another");
}

/// One searcher serving models of different shapes in turn makes a new arena (and prefix KV)
/// for each: results equal fresh searches.
#[test]
fn a_searcher_moves_between_models() {
    let mut search = BeamSearch::new();
    for name in ["tiny-llama", "tiny-qwen3", "tiny-llama", "tiny-qwen2"] {
        let f = fixture(name);
        search
            .set_prefix(
                &f.model,
                f.tok.encode("Give the code for the query:").unwrap(),
            )
            .unwrap();
        let q = Query {
            prompt: f
                .tok
                .encode("Give the code for the query: blue rug")
                .unwrap(),
            options: BeamOptions {
                beam: 5,
                max_new_tokens: f.trie.max_len() + 1,
                ..Default::default()
            },
        };
        let got = search
            .run(&f.model, &f.trie, std::slice::from_ref(&q))
            .unwrap();
        let want = beam::search(&f.model, &f.trie, &[q]).unwrap();
        assert_eq!(got[0].codes, want[0].codes, "{name}");
    }
}

#[test]
fn unconstrained_search_counts_invalid_codes() {
    let f = fixture("tiny-llama");
    let options = BeamOptions {
        beam: 6,
        max_new_tokens: 5,
        constrained: false,
        ..Default::default()
    };
    let q = Query {
        prompt: f.tok.encode("green sofa").unwrap(),
        options,
    };
    let out = beam::search(&f.model, &f.trie, &[q]).unwrap();
    let o = &out[0];
    assert_eq!(
        o.codes.len(),
        6,
        "unconstrained beams always fill their slots"
    );
    // A random tiny model does not spell codes: everything it returns is counted invalid.
    assert_eq!(o.invalid, 6);
    assert!(o.codes.iter().all(|c| c.code.is_none()));
}

/// Unconstrained, a sequence that ends in EOS and spells a code of the set is that code (its
/// id), and every other one (off the set, or cut at the length limit) counts as invalid. A
/// random tiny model almost never emits its EOS, so the model is a copy whose EOS is a token
/// it does emit; the set is made of some of the sequences a first search returned.
#[test]
fn unconstrained_search_recognizes_the_codes_it_spells() {
    let f = fixture("tiny-llama");
    let vocab = f.model.config.vocab_size;
    let query = |p: &str| Query {
        prompt: f.tok.encode(p).unwrap(),
        options: BeamOptions {
            beam: 16,
            max_new_tokens: 5,
            constrained: false,
            ..Default::default()
        },
    };
    let prompts = [
        "green sofa",
        "oak table for kids",
        "cheap rug",
        "modern lamp",
        "velvet chair blue",
        "wool bed",
        "brass desk lamp",
        "red sofa for kids",
    ];
    let queries: Vec<Query> = prompts.iter().map(|p| query(p)).collect();
    // Tokens generated after the first position, most frequent first: the first that ends
    // at least 4 sequences becomes the EOS.
    let explore = beam::search(&f.model, &f.trie, &queries).unwrap();
    let mut counts = vec![0usize; vocab];
    for c in explore.iter().flat_map(|o| &o.codes) {
        for &t in c.tokens.iter().skip(1) {
            counts[t as usize] += 1;
        }
    }
    let mut order: Vec<u32> = (0..vocab as u32).collect();
    order.sort_by_key(|&t| std::cmp::Reverse(counts[t as usize]));
    let ended_in = |o: &[beam::Output]| -> Vec<Vec<u32>> {
        o.iter()
            .flat_map(|o| &o.codes)
            .filter(|c| c.token_logprobs.len() == c.tokens.len() + 1 && !c.tokens.is_empty())
            .map(|c| c.tokens.clone())
            .collect()
    };
    let with_eos = |eos: u32| {
        let dir = copy_model(&model_dir("tiny-llama"), "beam-unconstrained-eos");
        let config = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        cfg["eos_token_id"] = eos.into();
        std::fs::write(&config, cfg.to_string()).unwrap();
        let _ = std::fs::remove_file(dir.join("generation_config.json"));
        let model = Model::load(&dir, &Default::default()).unwrap();
        assert_eq!(model.config.eos_token_ids, vec![eos]);
        // Any trie with that EOS (its codes do not steer the search).
        let placeholder = CodeSet {
            texts: vec!["placeholder".into()],
            tokens: vec![(eos + 1) % vocab as u32],
            offsets: vec![0, 1],
        };
        let trie = Trie::build(&placeholder, vocab, eos).unwrap();
        let first = beam::search(&model, &trie, &queries).unwrap();
        (model, first)
    };
    let (eos, model, first) = order[..8]
        .iter()
        .map(|&eos| {
            let (model, first) = with_eos(eos);
            (eos, model, first)
        })
        .inspect(|(eos, _, first)| eprintln!("eos {eos}: {} ended", ended_in(first).len()))
        .find(|(_, _, first)| ended_in(first).len() >= 4)
        .expect("no frequent token ends 4 sequences");
    let ended = ended_in(&first);
    let mut chosen: Vec<Vec<u32>> = Vec::new();
    for t in ended.iter().step_by(2) {
        if !chosen.contains(t) {
            chosen.push(t.clone());
        }
    }
    let set = CodeSet {
        texts: (0..chosen.len()).map(|i| format!("code {i}")).collect(),
        tokens: chosen.concat(),
        offsets: std::iter::once(0)
            .chain(chosen.iter().scan(0, |n, c| {
                *n += c.len();
                Some(*n)
            }))
            .collect(),
    };
    let trie = Trie::build(&set, vocab, eos).unwrap();
    let again = beam::search(&model, &trie, &queries).unwrap();
    assert_eq!((first.len(), again.len()), (queries.len(), queries.len()));
    let (mut codes, mut others) = (0, 0);
    for (a, b) in first.iter().zip(&again) {
        // The trie does not steer an unconstrained search: the same sequences come back.
        let seqs = |o: &beam::Output| o.codes.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>();
        assert_eq!(seqs(a), seqs(b));
        let mut invalid = 0;
        for c in &b.codes {
            let ended = c.token_logprobs.len() == c.tokens.len() + 1;
            let want = chosen
                .iter()
                .position(|t| ended && *t == c.tokens)
                .map(|i| i as u32);
            assert_eq!(c.code, want, "{:?}", c.tokens);
            if want.is_some() {
                codes += 1;
            } else {
                invalid += 1;
            }
        }
        assert_eq!(b.invalid, invalid);
        others += invalid;
    }
    assert!(codes >= 2 && others >= 2, "{codes} codes, {others} others");
}

#[test]
fn bad_queries_are_clear_errors() {
    let f = fixture("tiny-llama");
    let prompt = f.tok.encode("sofa").unwrap();
    let run = |prompt: Vec<u32>, options: BeamOptions| {
        beam::search(&f.model, &f.trie, &[Query { prompt, options }])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let with = |beam, max_new_tokens| BeamOptions {
        beam,
        max_new_tokens,
        ..Default::default()
    };
    assert!(run(prompt.clone(), with(0, 8)).contains("beam width 0"));
    assert!(run(prompt.clone(), with(513, 8)).contains("beam width 513"));
    assert!(run(prompt.clone(), with(4, 0)).contains("max_new_tokens 0"));
    assert!(run(vec![], with(4, 8)).contains("no tokens"));
    let long = vec![5u32; f.model.max_positions()];
    assert!(run(long, with(4, 8)).contains("exceeds the model's"));
    // The last new token is never run: a prompt of max − 7 tokens may ask for 8 (the highest
    // position run is max − 1), one more token may not.
    let fits = vec![5u32; f.model.max_positions() - 7];
    assert_eq!(run(fits.clone(), with(4, 8)), "");
    let over = vec![5u32; f.model.max_positions() - 6];
    assert!(run(over, with(4, 8)).contains("exceeds the model's"));
    // A constrained beam runs at most the longest code's tokens, whatever `max_new_tokens`
    // asks: a prompt that leaves room for those fits (it was refused for the 199 positions
    // `max_new_tokens` 200 would take); unconstrained, the 199 count.
    let deepest = f.trie.max_len();
    assert!(
        deepest < 199,
        "the fixture's codes are shorter than max_new_tokens"
    );
    let fits = vec![5u32; f.model.max_positions() - deepest];
    assert_eq!(run(fits.clone(), with(4, 200)), "");
    let over = vec![5u32; f.model.max_positions() - deepest + 1];
    let e = run(over, with(4, 200));
    assert!(
        e.contains("exceeds the model's") && e.contains("the longest code is"),
        "{e}"
    );
    let free = BeamOptions {
        constrained: false,
        ..with(4, 200)
    };
    assert!(run(fits, free).contains("exceeds the model's"));
    let sparse_free = BeamOptions {
        constrained: false,
        normalize: Normalize::Children,
        ..Default::default()
    };
    assert!(run(prompt.clone(), sparse_free).contains("needs the trie"));
    assert!(run(vec![5, 100_000], with(4, 8)).contains("query 0: prompt token 100000"));
    let mut search = BeamSearch::new();
    let long = vec![5u32; f.model.max_positions()];
    let e = search.set_prefix(&f.model, long).err().unwrap().to_string();
    assert!(e.contains("shared prefix of"), "{e}");
    let e = search
        .set_prefix(&f.model, vec![100_000])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shared prefix token"), "{e}");

    // Code sets: empty, blank line, a code of only whitespace, duplicates, EOS inside, no tokens.
    let eos = f.trie.eos();
    let set = |texts: &[&str]| {
        CodeSet::from_texts(texts.iter().map(|s| s.to_string()).collect(), &f.tok, eos)
            .and_then(|s| Trie::build(&s, 512, eos))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(set(&[]).contains("empty"));
    assert!(set(&["sofa", ""]).contains("line 2 is an empty code"));
    assert!(set(&["sofa", " \t "]).contains("line 2 is an empty code"));
    assert!(set(&["sofa", "lamp", "sofa"]).contains("lines 1 and 3"));
    assert_eq!(f.tok.token_id("<|im_end|>"), Some(eos));
    assert!(set(&["sofa<|im_end|>"]).contains("contains the EOS"));

    // A code that is not blank but that the tokenizer maps to no token at all: a word-level
    // tokenizer whose normalizer deletes "~".
    let dir = std::env::temp_dir().join(format!("gram-tok-nothing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tok_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": {"type": "Replace", "pattern": {"String": "~"}, "content": ""},
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"sofa": 0, "[UNK]": 1, "</s>": 2},
                  "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok_json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.encode_plain("sofa").unwrap(), vec![0]);
    let e = CodeSet::from_texts(vec!["sofa".into(), "~~~".into()], &tok, 2)
        .err()
        .expect("a code of no tokens is refused")
        .to_string();
    assert!(
        e.contains("line 2: code \"~~~\" tokenizes to nothing"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A constrained query reserves KV entries for the longest code, not for `max_new_tokens`: beam
/// 512 with 256 new tokens over a few prompts asked for tens of GB (an abort in the allocator)
/// where no step could write past the trie's depth. The answer is the same bits at any
/// `max_new_tokens` past the longest code; an unconstrained query still reserves them all.
#[test]
fn max_new_tokens_past_the_longest_code_reserves_nothing_more() {
    let f = fixture("tiny-qwen2");
    let prompt = f.tok.encode("green velvet").unwrap();
    let deepest = f.trie.max_len();
    let query = |beam, max_new_tokens, constrained| Query {
        prompt: prompt.clone(),
        options: BeamOptions {
            beam,
            max_new_tokens,
            constrained,
            ..Default::default()
        },
    };
    for (beam, max_new) in [(512, 256), (8, 256), (8, deepest + 1), (8, deepest), (3, 2)] {
        let fed = (max_new - 1).min(deepest);
        assert_eq!(
            beam::arena_entries(&query(beam, max_new, true), &f.trie),
            prompt.len() + beam * fed,
            "beam {beam}, {max_new} new tokens"
        );
        assert_eq!(
            beam::arena_entries(&query(beam, max_new, false), &f.trie),
            prompt.len() + beam * (max_new - 1),
            "unconstrained, beam {beam}, {max_new} new tokens"
        );
    }
    let fits = search_one(&f, prompt.clone(), query(8, deepest + 1, true).options);
    let long = search_one(&f, prompt.clone(), query(8, 256, true).options);
    assert!(!fits.codes.is_empty());
    assert_eq!(fits.codes.len(), long.codes.len());
    for (a, b) in fits.codes.iter().zip(&long.codes) {
        assert_eq!((a.code, &a.tokens), (b.code, &b.tokens));
        assert_eq!(a.score.to_bits(), b.score.to_bits());
    }
    // Beam 512 with 256 new tokens over eight prompts runs in a few MB.
    let wide: Vec<Query> = (0..8).map(|_| query(512, 256, true)).collect();
    let out = beam::search(&f.model, &f.trie, &wide).unwrap();
    assert!(out.iter().all(|o| o.codes.len() == f.set.len().min(512)));
}

#[test]
fn trie_round_trips_through_a_mapped_file() {
    let f = fixture("tiny-qwen2");
    let path = std::env::temp_dir().join(format!("gram-trie-{}.bin", std::process::id()));
    f.trie.write(&path).unwrap();
    let mapped = Trie::open(&path).unwrap();
    assert_eq!(mapped.as_words(), f.trie.as_words());
    for i in 0..f.set.len() {
        let node = mapped.walk(f.set.code_tokens(i)).unwrap();
        assert_eq!(mapped.code(node), Some(i as u32));
    }
    // Truncated and corrupted files are errors naming the file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    let e = Trie::open(&path).err().unwrap().to_string();
    assert!(e.contains("truncated"), "{e}");
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let e = Trie::open(&path).err().unwrap().to_string();
    assert!(e.contains("checksum"), "{e}");
    std::fs::write(&path, b"not a trie").unwrap();
    assert!(Trie::open(&path).is_err());
    std::fs::remove_file(&path).unwrap();
}

/// `search_logits` (the slow twin of the device beam step) fed with the model's own logits,
/// recomputed from scratch for every beam's tokens, returns what `beam::search` returns: the
/// same codes in the same order, scores and per-token log-probs within f32 rounding of the
/// other summation order. Every model, both normalizations, beams 1, 4 and 16, length penalties
/// 1 and 0.6, codes cut at 3 tokens too (the length limit).
#[test]
fn search_logits_matches_search_on_the_models_logits() {
    for name in MODELS {
        let f = fixture(name);
        let prompt = f.tok.encode("Q: a green velvet sofa\n").unwrap();
        for (beam_w, normalize, penalty, max_new) in [
            (1, Normalize::Full, 1.0, 16),
            (4, Normalize::Children, 1.0, 16),
            (16, Normalize::Full, 0.6, 16),
            (16, Normalize::Children, 1.0, 3),
        ] {
            let options = BeamOptions {
                beam: beam_w,
                normalize,
                length_penalty: penalty,
                max_new_tokens: max_new,
                ..Default::default()
            };
            let want = search_one(&f, prompt.clone(), options);
            let mut calls = 0;
            let got = beam::search_logits(&f.trie, options, |_, _, tokens| {
                calls += 1;
                let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
                let mut cache = f.model.new_cache(1, seq.len()).unwrap();
                f.model
                    .forward(&mut cache, &seq, &vec![0; seq.len()], &[seq.len() - 1])
                    .unwrap()
            })
            .unwrap();
            let what =
                format!("{name} beam {beam_w} {normalize:?} penalty {penalty} max {max_new}");
            assert!(!want.codes.is_empty(), "{what}: no codes");
            assert_eq!(got.codes.len(), want.codes.len(), "{what}");
            assert_eq!(got.truncated, want.truncated, "{what}");
            if max_new == 3 {
                assert!(want.truncated > 0, "{what}: the limit cut no code");
            }
            assert_eq!(got.steps, want.steps, "{what}: steps");
            assert_eq!(
                calls, got.rows,
                "{what}: one logits row per running beam and step"
            );
            for (g, w) in got.codes.iter().zip(&want.codes) {
                assert_eq!((g.code, &g.tokens), (w.code, &w.tokens), "{what}");
                assert!((g.score - w.score).abs() <= 1e-4, "{what}: {g:?} vs {w:?}");
                assert_eq!(g.token_logprobs.len(), w.token_logprobs.len(), "{what}");
                for (a, b) in g.token_logprobs.iter().zip(&w.token_logprobs) {
                    assert!((a - b).abs() <= 1e-4, "{what}: {g:?} vs {w:?}");
                }
            }
        }
    }
    // The twin refuses what the search refuses.
    let f = fixture(MODELS[0]);
    let bad = BeamOptions {
        beam: 0,
        ..Default::default()
    };
    assert!(beam::search_logits(&f.trie, bad, |_, _, _| unreachable!()).is_err());
    // A negative length penalty too strong for the trie's longest code (in range for
    // `BeamOptions::check` alone, which the twin used to ask only).
    let lp = -9.9;
    assert!(beam::check_length_penalty(lp, f.trie.max_len() + 1).is_err());
    let strong = BeamOptions {
        length_penalty: lp,
        ..Default::default()
    };
    assert!(strong.check().is_ok());
    let e = beam::search_logits(&f.trie, strong, |_, _, _| unreachable!()).unwrap_err();
    assert!(e.to_string().contains("length_penalty -9.9"), "{e}");
    let short = beam::search_logits(&f.trie, BeamOptions::default(), |_, _, _| vec![0.5; 3]);
    assert!(short.unwrap_err().to_string().contains("vocabulary"));
    // A NaN or an infinite logit among a step's allowed tokens is a numeric error, as in
    // `search` (before, the twin ranked such a token last or dropped it).
    let vocab = f.trie.vocab();
    for bad in [f32::NAN, f32::INFINITY] {
        let got = beam::search_logits(&f.trie, BeamOptions::default(), |step, _, _| {
            let mut row: Vec<f32> = (0..vocab).map(|t| ((t * 37 % 101) as f32) * 0.01).collect();
            if step == 1 {
                row.fill(bad);
            }
            row
        });
        let e = got.unwrap_err();
        assert!(matches!(e, gram::Error::Numeric(_)), "{bad}: {e}");
    }
}

/// A batch holding finished queries' rows frees their entries when its last running query is
/// cancelled, and when a new query joins (held rows only keep a batch's shape).
#[test]
fn held_rows_are_freed_by_a_cancel_and_by_a_new_query() {
    let f = fixture(MODELS[0]);
    let mut search = BeamSearch::new();
    search.set_stable_rows(Some(true));
    let query = |beam: usize, max_new_tokens: usize| Query {
        prompt: f.tok.encode("Q: a green velvet sofa").unwrap(),
        options: BeamOptions {
            beam,
            max_new_tokens,
            ..Default::default()
        },
    };
    let (short, long) = (query(4, 3), query(4, 16));
    let mut batch = beam::Batcher::new(&mut search, &f.model, &f.trie, 400).unwrap();
    batch.set_hold_finished(true);
    let need = batch.entries_for(&short) + batch.entries_for(&long);
    batch.admit(short.clone()).unwrap().unwrap();
    let t_long = batch.admit(long.clone()).unwrap().unwrap();
    let mut finished = 0;
    while finished == 0 {
        finished = batch.step().unwrap().len();
    }
    assert_eq!(batch.in_flight(), 1, "the short query finished first");
    assert_eq!(batch.free_entries(), 400 - need, "its entries are held");
    assert!(batch.cancel(t_long));
    assert_eq!(
        batch.free_entries(),
        400,
        "a cancel that empties the batch frees held rows"
    );

    batch.admit(short.clone()).unwrap().unwrap();
    batch.admit(long.clone()).unwrap().unwrap();
    let mut finished = 0;
    while finished == 0 {
        finished = batch.step().unwrap().len();
    }
    assert_eq!(batch.free_entries(), 400 - need);
    batch.admit(short.clone()).unwrap().unwrap();
    assert_eq!(
        batch.free_entries(),
        400 - batch.entries_for(&long) - batch.entries_for(&short),
        "a new query frees held rows"
    );
    while batch.in_flight() > 0 {
        batch.step().unwrap();
    }
    assert_eq!(batch.free_entries(), 400);
}

/// One step of `batch`: the queries that finished, each with its codes (none may fail here).
fn step_ok(
    batch: &mut beam::Batcher<'_, gram::backend::cpu::CpuBackend>,
) -> Vec<(beam::Ticket, beam::Output)> {
    batch
        .step()
        .unwrap()
        .into_iter()
        .map(|(t, out)| (t, out.unwrap()))
        .collect()
}

/// One query whose rows go non-finite (its prompt holds a token whose embedding is infinite)
/// fails alone: the queries batched with it get the codes, scores and log-probs they get
/// alone, bit for bit, and `beam::search` over them all names the failed query.
#[test]
fn a_query_whose_rows_go_non_finite_fails_alone() {
    use safetensors::tensor::TensorView;
    let f = fixture("tiny-llama");
    let dir = copy_model(&model_dir("tiny-llama"), "beam-inf-row");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let poisoned: u32 = 7;
    let items: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let mut data = v.data().to_vec();
            if n == "model.embed_tokens.weight" {
                assert_eq!(v.dtype(), safetensors::Dtype::F32);
                let c = v.shape()[1];
                let row = poisoned as usize * c * 4;
                for x in data[row..row + c * 4].chunks_exact_mut(4) {
                    x.copy_from_slice(&f32::INFINITY.to_le_bytes());
                }
            }
            (n, v.dtype(), v.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView)> = items
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let model = Model::load(&dir, &Default::default()).unwrap();
    let options = BeamOptions {
        beam: 4,
        max_new_tokens: f.trie.max_len() + 1,
        ..Default::default()
    };
    let clean = |text: &str| {
        let ids = f.tok.encode(text).unwrap();
        assert!(!ids.contains(&poisoned), "{text}: {ids:?}");
        Query {
            prompt: ids,
            options,
        }
    };
    let mut bad = f.tok.encode("a green sofa").unwrap();
    bad.insert(1, poisoned);
    let queries = [
        clean("a green sofa"),
        Query {
            prompt: bad,
            options,
        },
        clean("oak desk"),
    ];
    let mut search = BeamSearch::new();
    let mut batch = beam::Batcher::new(&mut search, &model, &f.trie, 4096).unwrap();
    let tickets: Vec<_> = queries
        .iter()
        .map(|q| batch.admit(q.clone()).unwrap().unwrap())
        .collect();
    let mut done = Vec::new();
    while batch.in_flight() > 0 {
        done.extend(batch.step().unwrap());
    }
    done.sort_by_key(|d| d.0);
    assert_eq!(done.len(), 3);
    for ((t, out), (q, want_t)) in done.into_iter().zip(queries.iter().zip(&tickets)) {
        assert_eq!(t, *want_t);
        if q.prompt.contains(&poisoned) {
            let e = out.unwrap_err();
            assert_eq!(e.kind(), "numeric", "{e}");
            continue;
        }
        let got = out.unwrap();
        let alone = beam::search(&model, &f.trie, std::slice::from_ref(q))
            .unwrap()
            .remove(0);
        assert!(!got.codes.is_empty());
        assert_eq!(
            got.codes, alone.codes,
            "the same codes, scores and log-probs, bit for bit"
        );
    }
    let e = beam::search(&model, &f.trie, &queries)
        .unwrap_err()
        .to_string();
    assert!(e.contains("query 1:") && e.contains("not finite"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
