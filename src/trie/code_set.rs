//! The code set: a code list tokenized the way the model emits each code (on its own, no
//! special tokens; the EOS comes after), checked so that every code can be emitted whole.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rayon::prelude::*;

use super::MAX_CODES;
use crate::error::{Error, Result};
use crate::tokenizer::{PlainMemo, Tokenizer};

/// Where code `i` (text `text`) came from, as an error names it ("line 3", "catalog line 7
/// (product \"a\")"): a code set's position is its line only when it was read straight from
/// a file.
pub type CodeName<'a> = &'a (dyn Fn(usize, &str) -> String + Sync);

/// Names code `i` by its position: line `i + 1`.
pub fn line_name(i: usize, _: &str) -> String {
    format!("line {}", i + 1)
}

/// A code list, tokenized: code `i` is `texts[i]` and its tokens (without EOS)
/// `tokens[offsets[i]..offsets[i + 1]]`.
pub struct CodeSet {
    pub texts: Vec<String>,
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
}

/// Reads a text file of one item a line; a file that is not UTF-8 is an error naming the line
/// and byte where it stops being so (a Latin-1 `café` on line 90,000 of a code list was
/// refused without a place).
pub fn read_lines_file(path: &Path) -> Result<String> {
    let bytes = crate::container::read_input(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Input(format!(
            "{}: line {line}: not valid UTF-8 (byte {} of the line)",
            path.display(),
            at - line_start + 1
        ))
    })
}

/// `text` without a leading UTF-8 byte-order mark (an editor's, not part of the first code:
/// kept, it would be a code of its own beside the catalog's spelling).
pub fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Why a code whose own tokens are `ids` (its EOS not yet added) cannot be in a code set: it
/// is no tokens at all, or it holds the EOS token, so the model could never emit it whole.
pub fn refusal(ids: &[u32], eos: u32) -> Option<String> {
    if ids.is_empty() {
        Some("tokenizes to nothing".into())
    } else if ids.contains(&eos) {
        Some(format!("contains the EOS token {eos}"))
    } else {
        None
    }
}

/// Why a code whose own tokens are `ids` cannot be emitted whole by a model that also stops at
/// `stops` (its EOS tokens other than the one codes end with), if it cannot: transformers ends a
/// beam at any of them, so a beam would stop inside the code.
pub fn stopped_inside(ids: &[u32], stops: &[u32]) -> Option<String> {
    ids.iter()
        .find(|t| stops.contains(t))
        .map(|t| format!("contains token {t}, an EOS of the model: a beam would stop there"))
}

impl CodeSet {
    /// The first code holding one of `stops` (see [`stopped_inside`]), as an error naming it.
    pub fn check_stops(&self, stops: &[u32], name: CodeName) -> Result<()> {
        if stops.is_empty() {
            return Ok(());
        }
        for i in 0..self.len() {
            if let Some(why) = stopped_inside(self.code_tokens(i), stops) {
                let text = &self.texts[i];
                return Err(Error::Input(format!(
                    "{}: code {text:?} {why}",
                    name(i, text)
                )));
            }
        }
        Ok(())
    }

    /// Reads a code file (one code per line, UTF-8; a byte-order mark is ignored) and tokenizes
    /// each code. Blank lines, codes that tokenize to nothing or contain `eos`, and an empty
    /// file are errors naming the line.
    pub fn from_file(path: &Path, tokenizer: &Tokenizer, eos: u32) -> Result<CodeSet> {
        let text = read_lines_file(path)?;
        let lines: Vec<String> = without_bom(&text).lines().map(str::to_owned).collect();
        CodeSet::from_texts(lines, tokenizer, eos).map_err(|e| match e {
            Error::Input(msg) => Error::Input(format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    /// Tokenizes `texts` (code id = index; line numbers in errors are `index + 1`). Each worker
    /// thread keeps a [`PlainMemo`] (the ids of each distinct word, asked of the tokenizer
    /// once): the ids are exactly `encode_plain`'s, as [`CodeSet::from_texts_plain`], the
    /// reference twin, gives them. Of several bad codes the first is reported.
    pub fn from_texts(texts: Vec<String>, tokenizer: &Tokenizer, eos: u32) -> Result<CodeSet> {
        CodeSet::tokenize(texts, tokenizer, eos, true, &line_name, false).map(|(set, _)| set)
    }

    /// [`CodeSet::from_texts`] that sets bad codes aside instead of failing: the set of the
    /// others (in their order), and each bad code's text with why (blank, refused by the
    /// tokenizer, no tokens, the EOS inside), in order. Fails only on no codes or too many.
    pub fn from_texts_lenient(
        texts: Vec<String>,
        tokenizer: &Tokenizer,
        eos: u32,
    ) -> Result<(CodeSet, Vec<(String, String)>)> {
        CodeSet::tokenize(texts, tokenizer, eos, true, &line_name, true)
    }

    /// [`CodeSet::from_texts`] with errors naming each code as `name` says (where it came
    /// from: a file's line, a catalog product), not by its position in `texts`.
    pub fn from_texts_named(
        texts: Vec<String>,
        tokenizer: &Tokenizer,
        eos: u32,
        name: CodeName,
    ) -> Result<CodeSet> {
        CodeSet::tokenize(texts, tokenizer, eos, true, name, false).map(|(set, _)| set)
    }

    /// [`CodeSet::from_texts`] with `encode_plain` code by code, no memo: the reference.
    pub fn from_texts_plain(
        texts: Vec<String>,
        tokenizer: &Tokenizer,
        eos: u32,
    ) -> Result<CodeSet> {
        CodeSet::tokenize(texts, tokenizer, eos, false, &line_name, false).map(|(set, _)| set)
    }

    /// Tokenizes `texts`; a bad code is an error naming it, or with `lenient` set aside (with
    /// why, by its index in `texts`).
    fn tokenize(
        texts: Vec<String>,
        tokenizer: &Tokenizer,
        eos: u32,
        use_memo: bool,
        name: CodeName,
        lenient: bool,
    ) -> Result<(CodeSet, Vec<(String, String)>)> {
        /// Codes per parallel job.
        const CHUNK: usize = 4096;
        if texts.is_empty() {
            return Err(Error::Input("the code set is empty".into()));
        }
        if texts.len() > MAX_CODES {
            return Err(Error::Input(format!(
                "{} codes; at most {MAX_CODES} fit",
                texts.len()
            )));
        }
        // One memo per worker thread, so that each word is tokenized about once per thread. A
        // job takes its thread's; were it ever taken (nothing in a job runs other jobs), a
        // fresh one.
        let memos: Vec<Mutex<PlainMemo>> = (0..rayon::current_num_threads())
            .map(|_| Mutex::new(tokenizer.plain_memo()))
            .collect();
        type Part = (Vec<u32>, Vec<usize>, Vec<(usize, String)>);
        let parts: Vec<Result<Part>> = texts
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(c, chunk)| {
                let mut guard: Option<MutexGuard<PlainMemo>> = None;
                let mut own = None;
                let mine = rayon::current_thread_index().and_then(|i| memos.get(i));
                let memo: &mut PlainMemo = match mine.and_then(|m| m.try_lock().ok()) {
                    Some(m) => guard.insert(m),
                    None => own.insert(tokenizer.plain_memo()),
                };
                let mut tokens = Vec::with_capacity(chunk.len() * 12);
                let mut lens = Vec::with_capacity(chunk.len());
                let mut bad = Vec::new();
                for (k, text) in chunk.iter().enumerate() {
                    let i = c * CHUNK + k;
                    if text.trim().is_empty() {
                        if lenient {
                            bad.push((i, "is an empty code".to_string()));
                            continue;
                        }
                        return Err(Error::Input(format!("{} is an empty code", name(i, text))));
                    }
                    let start = tokens.len();
                    let encoded = if use_memo {
                        memo.encode_into(text, &mut tokens)
                    } else {
                        tokenizer
                            .encode_plain(text)
                            .map(|ids| tokens.extend_from_slice(&ids))
                    };
                    let why = match encoded {
                        Err(e) if lenient => Some(e.to_string()),
                        Err(e) => return Err(e),
                        Ok(()) => refusal(&tokens[start..], eos),
                    };
                    match why {
                        None => lens.push(tokens.len() - start),
                        Some(why) if lenient => {
                            tokens.truncate(start);
                            bad.push((i, why));
                        }
                        Some(why) => {
                            return Err(Error::Input(format!(
                                "{}: code {text:?} {why}",
                                name(i, text)
                            )))
                        }
                    }
                }
                Ok((tokens, lens, bad))
            })
            .collect();
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0);
        // In order: the first bad code's error.
        let parts: Vec<Part> = parts.into_iter().collect::<Result<_>>()?;
        let mut tokens = Vec::with_capacity(parts.iter().map(|(t, ..)| t.len()).sum());
        let mut bad: Vec<(usize, String)> = Vec::new();
        for (part, lens, part_bad) in parts {
            tokens.extend_from_slice(&part);
            for n in lens {
                offsets.push(offsets.last().unwrap() + n);
            }
            bad.extend(part_bad);
        }
        let (texts, bad) = if bad.is_empty() {
            (texts, Vec::new())
        } else {
            let mut why: Vec<Option<String>> = vec![None; texts.len()];
            for (i, w) in bad {
                why[i] = Some(w);
            }
            let mut kept = Vec::with_capacity(texts.len());
            let mut set_aside = Vec::new();
            for (text, w) in texts.into_iter().zip(why) {
                match w {
                    None => kept.push(text),
                    Some(w) => set_aside.push((text, w)),
                }
            }
            (kept, set_aside)
        };
        let set = CodeSet {
            texts,
            tokens,
            offsets,
        };
        Ok((set, bad))
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Tokens of code `i` (without EOS).
    pub fn code_tokens(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The codes whose `keep` is set, in their order, and each code's id among them.
    pub fn retain(self, keep: &[bool]) -> (CodeSet, Vec<Option<u32>>) {
        assert_eq!(keep.len(), self.len(), "one flag a code");
        if keep.iter().all(|&k| k) {
            let ids = (0..self.len() as u32).map(Some).collect();
            return (self, ids);
        }
        let mut kept = CodeSet {
            texts: Vec::new(),
            tokens: Vec::new(),
            offsets: vec![0],
        };
        let mut ids = vec![None; self.len()];
        for i in (0..self.len()).filter(|&i| keep[i]) {
            ids[i] = Some(kept.texts.len() as u32);
            kept.tokens.extend_from_slice(self.code_tokens(i));
            kept.offsets.push(kept.tokens.len());
            kept.texts.push(self.texts[i].clone());
        }
        (kept, ids)
    }

    /// Merges codes that tokenize alike (with a normalizing tokenizer, "HP" and "hp"): the
    /// model cannot tell them apart, so they are one code. Of each such group the code with
    /// the largest `weight` (how many products list it; ties: the first) stays, under its
    /// text, and the others become it. Returns the merged set (the kept codes in their order
    /// here), each code's id in it, and the merged codes as (text, the text kept), in order.
    pub fn merge_alike(self, weight: &[usize]) -> (CodeSet, Vec<u32>, Vec<(String, String)>) {
        let n = self.len();
        assert_eq!(weight.len(), n, "one weight a code");
        let mut order: Vec<usize> = (0..n).collect();
        order.par_sort_unstable_by(|&a, &b| {
            self.code_tokens(a).cmp(self.code_tokens(b)).then(a.cmp(&b))
        });
        // Each code's representative: the heaviest of its group, the first on ties.
        let mut rep: Vec<usize> = (0..n).collect();
        for group in order.chunk_by(|&a, &b| self.code_tokens(a) == self.code_tokens(b)) {
            if let [first, rest @ ..] = group {
                let best = rest
                    .iter()
                    .fold(*first, |b, &i| if weight[i] > weight[b] { i } else { b });
                for &i in group {
                    rep[i] = best;
                }
            }
        }
        if rep.iter().enumerate().all(|(i, &r)| r == i) {
            let ids = (0..n as u32).collect();
            return (self, ids, Vec::new());
        }
        let merged = (0..n)
            .filter(|&i| rep[i] != i)
            .map(|i| (self.texts[i].clone(), self.texts[rep[i]].clone()))
            .collect();
        let keep: Vec<bool> = (0..n).map(|i| rep[i] == i).collect();
        let (kept, new_id) = self.retain(&keep);
        let ids = rep
            .iter()
            .map(|&r| new_id[r].expect("a representative is kept"))
            .collect();
        (kept, ids, merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures' tokenizers: the repository's models and SmolLM2's (49,152 tokens, from
    /// `../shared/data`, as `tests/tokenizer.rs` reads it: never skipped).
    fn fixture_tokenizers() -> Vec<(String, Tokenizer)> {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut paths: Vec<(&str, std::path::PathBuf)> =
            ["gram-icecat-2m", "tiny-llama", "tiny-qwen2", "tiny-qwen3"]
                .into_iter()
                .map(|name| (name, root.join("models").join(name).join("tokenizer.json")))
                .collect();
        paths.push((
            "smollm2-135m-instruct",
            crate::test_rng::shared_data().join("smollm2-135m-instruct/tokenizer.json"),
        ));
        paths
            .into_iter()
            .map(|(name, path)| {
                let tok = Tokenizer::from_file(&path)
                    .unwrap_or_else(|e| panic!("{name}'s tokenizer {}: {e}", path.display()));
                (name.to_string(), tok)
            })
            .collect()
    }

    /// Code sets through the per-thread memos are exactly the reference twin's (`encode_plain`
    /// code by code): the golden code sets, the bundled catalog's codes, and random codes
    /// (many chunks, mixed case, digits, punctuation, spaces, non-ASCII).
    #[test]
    fn memo_code_sets_match_the_plain_twin() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut sets: Vec<Vec<String>> = Vec::new();
        for f in ["codes-tiny.txt", "codes-smollm2.txt"] {
            let text = std::fs::read_to_string(root.join("tests/golden").join(f)).unwrap();
            sets.push(text.lines().map(str::to_owned).collect());
        }
        let catalog =
            std::fs::read_to_string(root.join("models/gram-icecat-2m/catalog.jsonl")).unwrap();
        let mut codes = std::collections::BTreeSet::new();
        for line in catalog.lines().take(3000) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for c in v["codes"].as_array().unwrap() {
                codes.insert(c.as_str().unwrap().to_owned());
            }
        }
        sets.push(codes.into_iter().collect());
        const WORDS: &[&str] = &[
            "sofa", "Velvet", "GREEN", "hp", "usb", "3.0", "128gb", "it's", "don't", "x-ray",
            "a/b", "café", "naïve", "日本", "😀", "(2)", "#1", "'ll", "<s>", "ﬁ",
        ];
        const SEPS: &[&str] = &[" | ", " ", "  ", "|", ", ", " - ", "'", " / "];
        let mut rng = crate::test_rng::xorshift(0x1234_5678_9abc_def1u64);
        let mut next = |m: usize| (rng() % m as u64) as usize;
        let mut random = Vec::new();
        for i in 0..10_000 {
            let mut code = String::new();
            if i % 13 == 0 {
                code.push(' ');
            }
            for w in 0..1 + next(4) {
                if w > 0 {
                    code.push_str(SEPS[next(SEPS.len())]);
                }
                code.push_str(WORDS[next(WORDS.len())]);
                code.push_str(&next(50).to_string()[..next(2)]);
            }
            if i % 17 == 0 {
                code.push_str("  ");
            }
            random.push(code);
        }
        sets.push(random);
        for (name, tok) in fixture_tokenizers() {
            // An EOS no code holds, so every set tokenizes.
            let eos = tok.vocab_size() as u32;
            for texts in &sets {
                let fast = CodeSet::from_texts(texts.clone(), &tok, eos).unwrap();
                let plain = CodeSet::from_texts_plain(texts.clone(), &tok, eos).unwrap();
                assert_eq!(fast.offsets, plain.offsets, "{name}");
                assert_eq!(fast.tokens, plain.tokens, "{name}");
                assert_eq!(fast.texts, *texts);
            }
        }
    }

    /// A large code file (`$GRAM_CODES`, default `bench-out/codes-100k.txt`, made by
    /// `tools/make_codes.py`) through both twins for every fixture tokenizer, timed. Ignored
    /// (the file is not committed): `GRAM_CODES=bench-out/codes-2.5m.txt cargo test --release
    /// --lib trie::code_set::tests::large_code_file -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn large_code_file_memo_matches_the_plain_twin() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = std::env::var_os("GRAM_CODES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join("bench-out/codes-100k.txt"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (tools/make_codes.py makes it)", path.display()));
        let texts: Vec<String> = text.lines().map(str::to_owned).collect();
        for (name, tok) in fixture_tokenizers() {
            let eos = tok.vocab_size() as u32;
            let t = std::time::Instant::now();
            let fast = CodeSet::from_texts(texts.clone(), &tok, eos).unwrap();
            let t_fast = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let plain = CodeSet::from_texts_plain(texts.clone(), &tok, eos).unwrap();
            let t_plain = t.elapsed().as_secs_f64();
            assert!(
                fast.offsets == plain.offsets && fast.tokens == plain.tokens,
                "{name}"
            );
            crate::note!(
                "{name}: {} codes, {} tokens, identical; memo {t_fast:.3} s, plain {t_plain:.3} s",
                fast.len(),
                fast.tokens.len()
            );
        }
    }

    /// `merge_alike` against a quadratic twin, on random sets where many codes share tokens:
    /// each code's group is every code with its tokens, the heaviest (first on ties) stays,
    /// and ids, kept tokens and the merged list follow.
    #[test]
    fn merge_alike_matches_its_quadratic_twin() {
        let mut next = crate::test_rng::xorshift(17);
        for round in 0..200 {
            let n = 1 + (next() % 60) as usize;
            let alphabet = 1 + next() % 4;
            let mut set = CodeSet {
                texts: Vec::new(),
                tokens: Vec::new(),
                offsets: vec![0],
            };
            for i in 0..n {
                for _ in 0..1 + next() % 3 {
                    set.tokens.push((next() % alphabet) as u32);
                }
                set.offsets.push(set.tokens.len());
                set.texts.push(format!("code {i:03}"));
            }
            let weight: Vec<usize> = (0..n).map(|_| (next() % 4) as usize).collect();
            let rep: Vec<usize> = (0..n)
                .map(|i| {
                    let group = (0..n).filter(|&j| set.code_tokens(j) == set.code_tokens(i));
                    // The heaviest, the first of those on ties.
                    group.fold(usize::MAX, |b, j| {
                        if b == usize::MAX || weight[j] > weight[b] {
                            j
                        } else {
                            b
                        }
                    })
                })
                .collect();
            let kept: Vec<usize> = (0..n).filter(|&i| rep[i] == i).collect();
            let want_merged: Vec<(String, String)> = (0..n)
                .filter(|&i| rep[i] != i)
                .map(|i| (set.texts[i].clone(), set.texts[rep[i]].clone()))
                .collect();
            let old_tokens: Vec<Vec<u32>> = (0..n).map(|i| set.code_tokens(i).to_vec()).collect();
            let old_texts = set.texts.clone();
            let (merged, ids, pairs) = set.merge_alike(&weight);
            assert_eq!(pairs, want_merged, "round {round}");
            assert_eq!(merged.len(), kept.len(), "round {round}");
            for (k, &i) in kept.iter().enumerate() {
                assert_eq!(merged.texts[k], old_texts[i]);
                assert_eq!(merged.code_tokens(k), old_tokens[i].as_slice());
            }
            for i in 0..n {
                let id = ids[i] as usize;
                assert_eq!(
                    merged.texts[id], old_texts[rep[i]],
                    "round {round} code {i}"
                );
                assert_eq!(merged.code_tokens(id), old_tokens[i].as_slice());
            }
        }
    }

    /// The lenient read sets every bad code aside with why, across parallel chunks, and its set
    /// is exactly the strict read of the good codes.
    #[test]
    fn the_lenient_read_sets_every_bad_code_aside() {
        let (_, tok) = fixture_tokenizers().remove(1);
        let eos = tok.token_id("<|endoftext|>").unwrap();
        let mut texts: Vec<String> = (0..20_000).map(|i| format!("code {i}")).collect();
        let bad = [
            (2, " "),
            (4_100, "a <|endoftext|>"),
            (9_000, ""),
            (19_999, "b <|endoftext|>"),
        ];
        for &(i, text) in &bad {
            texts[i] = text.to_owned();
        }
        let (set, aside) = CodeSet::from_texts_lenient(texts.clone(), &tok, eos).unwrap();
        let want: Vec<(String, bool)> = bad
            .iter()
            .map(|&(_, t)| (t.to_owned(), t.trim().is_empty()))
            .collect();
        let got: Vec<(String, bool)> = aside
            .iter()
            .map(|(t, why)| (t.clone(), why.contains("empty code")))
            .collect();
        assert_eq!(got, want);
        assert!(
            aside[1].1.contains("EOS") && aside[3].1.contains("EOS"),
            "{aside:?}"
        );
        let good: Vec<String> = texts
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !bad.iter().any(|&(b, _)| b == *i))
            .map(|(_, t)| t)
            .collect();
        let strict = CodeSet::from_texts_plain(good, &tok, eos).unwrap();
        assert_eq!(set.texts, strict.texts);
        assert_eq!(set.tokens, strict.tokens);
        assert_eq!(set.offsets, strict.offsets);
    }

    /// Of several bad codes, the first (by line) is the error, across parallel chunks.
    #[test]
    fn the_first_bad_code_is_reported() {
        let (_, tok) = fixture_tokenizers().remove(1);
        let eos = tok.token_id("<|endoftext|>").unwrap();
        let texts = |bad: &[(usize, &str)]| {
            let mut t: Vec<String> = (0..20_000).map(|i| format!("code {i}")).collect();
            for &(line, text) in bad {
                t[line - 1] = text.to_owned();
            }
            t
        };
        for bad in [
            vec![(15_000, "  "), (19_000, "a <|endoftext|>")],
            vec![(9_000, "a <|endoftext|>"), (15_000, "")],
            vec![(3, " "), (5_000, "x")],
        ] {
            let want = format!("line {}", bad[0].0);
            for twin in [CodeSet::from_texts, CodeSet::from_texts_plain] {
                let e = twin(texts(&bad), &tok, eos).err().unwrap().to_string();
                assert!(e.contains(&want), "{e}");
            }
        }
    }
}
