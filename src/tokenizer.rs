//! `tokenizer.json` through the `tokenizers` crate: text ↔ token ids exactly as transformers'
//! `tokenizer(text)` gives them (the post-processor runs, so a model that adds BOS gets it),
//! with the tokenizer loaded as `tokenizer.json` says (`PreTrainedTokenizerFast`, as in
//! transformers 4). transformers 5's `AutoTokenizer` rebuilds some classes from their own
//! defaults and then differs: SmolLM2's `GPT2Tokenizer` drops the digit split ("size  42"),
//! model type qwen2 adds NFC (huggingface/transformers#45920); `tests/golden/tokenize.json`
//! holds such texts. `tokenizer_config.json`'s `add_bos_token` / `add_eos_token` are not read:
//! `PreTrainedTokenizerFast` leaves the post-processor as it is, and so does transformers 5.24
//! for every class tried (LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast,
//! GPT2Tokenizer, Qwen2Tokenizer; ByteLevel and Metaspace tokenizers, each flag on and off:
//! the same ids, 2026-11-29). transformers 4's `LlamaTokenizerFast` rebuilt its post-processor
//! from the flags, so a Llama checkpoint whose flags disagree with its `tokenizer.json` gets
//! other ids there. Its `clean_up_tokenization_spaces` is read, for [`Tokenizer::decode`] (as
//! transformers 5.24 applies it: never to a BPE model).
//!
//! Many short texts at once (a code set: millions of codes made of a few thousand distinct
//! words) go through a [`PlainMemo`]: it splits printable-ASCII text into pre-tokens itself, the
//! way the tokenizer's normalizer and pre-tokenizer do, and asks the model for each distinct
//! pre-token once. It does so only for the normalizer / pre-tokenizer configurations it
//! reproduces exactly (listed at `PlainSplit`); any other text or tokenizer takes
//! [`Tokenizer::encode_plain`], its reference twin (tests compare the two).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Model;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// How `encode_plain` cuts printable-ASCII text into pre-tokens, where reproduced exactly.
    plain: Option<PlainSplit>,
    /// Whether [`Tokenizer::decode`] takes the spaces out before punctuation and English
    /// contractions, as transformers' `decode` does ([`clean_up_spaces`]).
    clean_up: bool,
}

/// A call into the `tokenizers` crate, its error and its panic both an [`Error::Tokenizer`]
/// saying `what` failed: a malformed `tokenizer.json` that the crate accepts can make it panic
/// at load (a bad `precompiled_charsmap`, a BPE `continuing_subword_prefix` longer than a
/// token) or on some input (an empty `Replace` pattern, a `FixedLength` of 0, a template naming
/// a missing special token, a regex past oniguruma's retry limit).
/// The panic message of such a call is the error's, not a second report on stderr: the panic
/// hook (installed once, the previous hook kept for every other panic) stays quiet on a thread
/// inside `guarded`.
fn guarded<T>(
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> tokenizers::Result<T>,
) -> Result<T> {
    thread_local! {
        static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.replace(true);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.set(was);
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{}: {e}", what()))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(Error::Tokenizer(format!(
                "{}: the tokenizers library failed: {why}",
                what()
            )))
        }
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`. Its `truncation` and `padding` settings are dropped, as
    /// transformers' `tokenizer(text)` drops them unless asked (a query is never cut short
    /// unseen: over-long queries are refused by count), and encoding a probe text with and
    /// without special tokens must not panic, so a configuration that panics on every input
    /// fails here, not on the first query.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.exists() {
            return Err(Error::Tokenizer(format!("{} not found", path.display())));
        }
        let name = || path.display().to_string();
        let text = crate::container::read_capped(path, crate::container::TOKENIZER_CAP)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut inner = guarded(name, || text.parse::<tokenizers::Tokenizer>())?;
        // Dropout skips merges at random (a training device): the codes' trie, the index and
        // each query would get other ids on every run.
        if let tokenizers::ModelWrapper::BPE(bpe) = inner.get_model() {
            if let Some(p) = bpe.dropout.filter(|p| *p > 0.0 && *p < 1.0) {
                return Err(Error::Tokenizer(format!(
                    "{}: BPE dropout {p} makes tokenization random (set model.dropout to null)",
                    path.display()
                )));
            }
        }
        inner.with_truncation(None).map_err(|e| {
            Error::Tokenizer(format!("{}: clearing truncation: {e}", path.display()))
        })?;
        inner.with_padding(None);
        let mut tok = Tokenizer::new(inner);
        tok.read_clean_up(path);
        // Only a panic fails the probe: an error (a word-level model without an unk token
        // meeting an unknown word) belongs to that input, and `encode` reports it per query.
        for special in [true, false] {
            guarded(
                || format!("{}: encoding a probe text", path.display()),
                || {
                    Ok(tok
                        .inner
                        .encode_fast("a probe, 42 Probes.", special)
                        .is_ok())
                },
            )?;
        }
        Ok(tok)
    }

    fn new(inner: tokenizers::Tokenizer) -> Tokenizer {
        let plain = PlainSplit::of(&inner);
        Tokenizer {
            inner,
            plain,
            clean_up: false,
        }
    }

    /// Reads `clean_up_tokenization_spaces` from the `tokenizer_config.json` beside
    /// `tokenizer.json` (absent: false, transformers' default). transformers 5.24 applies it in
    /// `decode` to every model but BPE (ignored there, with a warning, unless
    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is also set),
    /// so a Llama, Qwen2 or Qwen3 BPE tokenizer decodes the same either way.
    /// A file that cannot be read or parsed (Python reads `NaN` literals that JSON has not)
    /// only costs the flag, with a warning: nothing else of it is read, and models loaded
    /// without it before.
    fn read_clean_up(&mut self, tokenizer_json: &Path) {
        let config = tokenizer_json.with_file_name("tokenizer_config.json");
        if !config.exists() {
            return;
        }
        let read = crate::container::read_capped(&config, crate::container::JSON_CAP)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()));
        let v = match read {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    "{}: {e}: clean_up_tokenization_spaces taken as false",
                    config.display()
                );
                return;
            }
        };
        let flag = |name: &str| v[name].as_bool().unwrap_or(false);
        let bpe = matches!(self.inner.get_model(), tokenizers::ModelWrapper::BPE(_));
        self.clean_up = flag("clean_up_tokenization_spaces")
            && (!bpe
                || flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"));
    }

    /// Ids of `text` with special tokens added by the post-processor, as `tokenizer(text)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(
            || format!("encoding {:?}", clip(text)),
            || self.inner.encode_fast(text, true),
        )?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of `text` alone: no special tokens added (how a code is tokenized).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(
            || format!("encoding {:?}", clip(text)),
            || self.inner.encode_fast(text, false),
        )?;
        Ok(enc.get_ids().to_vec())
    }

    /// A memo that gives `encode_plain`'s ids for many texts, fast where the texts repeat
    /// words (see [`PlainMemo`]). One per thread.
    pub fn plain_memo(&self) -> PlainMemo<'_> {
        PlainMemo {
            tok: self,
            memo: HashMap::default(),
            ids: Vec::new(),
            lower: String::new(),
            mapped: String::new(),
        }
    }

    /// Whether [`PlainMemo`] reproduces this tokenizer's pre-tokenization (else it is
    /// `encode_plain` text by text).
    pub fn has_plain_split(&self) -> bool {
        self.plain.is_some()
    }

    /// Text of `ids`, special tokens skipped (as `decode(ids, skip_special_tokens=True)`,
    /// `clean_up_tokenization_spaces` applied where transformers applies it).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = guarded(
            || format!("decoding {} ids", ids.len()),
            || self.inner.decode(ids, true),
        )?;
        Ok(if self.clean_up {
            clean_up_spaces(&text)
        } else {
            text
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every id this tokenizer can give must be a row of the model's embedding (`vocab`): a
    /// tokenizer of another model is refused at load, not on each query that meets a large id.
    /// The vocabulary's ids, and those the post-processor adds (its template names its special
    /// tokens' ids itself, which `tokenizers` never checks against the vocabulary).
    pub fn check_fits(&self, vocab: usize) -> Result<()> {
        let top = self
            .inner
            .get_vocab(true)
            .into_iter()
            .max_by_key(|(_, id)| *id);
        if let Some((token, id)) = top.filter(|(_, id)| *id as usize >= vocab) {
            return Err(Error::Tokenizer(format!(
                "token `{token}` has id {id}, outside the model's vocabulary of {vocab} \
                 (tokenizer.json is not this model's)"
            )));
        }
        // As the load's probe: an error of this input is not the tokenizer's to answer for.
        let Ok(added) = guarded(
            || "encoding the empty text".to_string(),
            || self.inner.encode_fast("", true),
        ) else {
            return Ok(());
        };
        match added.get_ids().iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(Error::Tokenizer(format!(
                "the post-processor adds id {id}, outside the model's vocabulary of {vocab} \
                 (tokenizer.json is not this model's)"
            ))),
            None => Ok(()),
        }
    }

    /// The id of a token string (e.g. `<|im_end|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The first 40 characters of `text`, for an error message.
pub(crate) fn clip(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The pre-tokenizer's regex, for printable ASCII.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// GPT-2's, ByteLevel's own: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// Qwen2's (`digits` 1) and Llama 3's (`digits` 3), a `Split` before a regex-less
    /// ByteLevel: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Cl100k { digits: usize },
}

const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What `encode_plain` does before the model, reproduced for text of printable ASCII
/// (`0x20..=0x7e`) that holds no added token (as written or normalized). Recognized from the
/// tokenizer's own configuration, and only these (anything else: `None`, the plain path):
/// - normalizer: none, or any sequence of NFC / NFD / NFKC / NFKD (each leaves ASCII as it is)
///   and Lowercase (ASCII lowercasing on ASCII);
/// - pre-tokenizer: ByteLevel with its regex and no prefix space, optionally after
///   `Digits` (digits isolated one by one or in runs); or a `Split` on Qwen2's or Llama 3's regex,
///   isolated, before a regex-less ByteLevel without prefix space;
/// - model: BPE without dropout (so a pre-token's ids do not depend on anything else);
/// - post-processor: none, ByteLevel, a template or a sequence of those (none of them changes
///   the ids when no special tokens are asked for); no truncation or padding.
#[derive(Debug, Clone)]
struct PlainSplit {
    lowercase: bool,
    /// `Digits` first: `Some(individual)`.
    digits: Option<bool>,
    pattern: Pattern,
    /// Added tokens as written and as normalized: text holding one takes the plain path.
    added: Vec<String>,
    /// First bytes of `added`, a quick test before the substring search.
    added_first: [bool; 256],
}

impl PlainSplit {
    fn of(tok: &tokenizers::Tokenizer) -> Option<PlainSplit> {
        if tok.get_truncation().is_some() || tok.get_padding().is_some() {
            return None;
        }
        match tok.get_model() {
            tokenizers::ModelWrapper::BPE(bpe) if bpe.dropout.is_none_or(|p| p == 0.0) => {}
            _ => return None,
        }
        if let Some(post) = tok.get_post_processor() {
            let post = serde_json::to_value(post).ok()?;
            let list = match post["type"].as_str()? {
                "Sequence" => post["processors"].as_array()?.clone(),
                _ => vec![post],
            };
            let keeps_ids =
                |p: &Value| matches!(p["type"].as_str(), Some("ByteLevel" | "TemplateProcessing"));
            if !list.iter().all(keeps_ids) {
                return None;
            }
        }
        let lowercase = match tok.get_normalizer().map(serde_json::to_value) {
            None => false,
            Some(Ok(n)) => {
                let list = match n["type"].as_str() {
                    Some("Sequence") => n["normalizers"].as_array()?.clone(),
                    _ => vec![n],
                };
                let mut lowercase = false;
                for n in &list {
                    match n["type"].as_str()? {
                        "NFC" | "NFD" | "NFKC" | "NFKD" => {}
                        "Lowercase" => lowercase = true,
                        _ => return None,
                    }
                }
                lowercase
            }
            Some(Err(_)) => return None,
        };
        let pre = serde_json::to_value(tok.get_pre_tokenizer()?).ok()?;
        let list = match pre["type"].as_str()? {
            "Sequence" => pre["pretokenizers"].as_array()?.clone(),
            _ => vec![pre],
        };
        let byte_level = |v: &Value, regex: bool| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] == false
                && v["use_regex"] == json!(regex)
        };
        let split = |v: &Value, regex: &str| {
            v["type"] == "Split"
                && v["pattern"] == json!({ "Regex": regex })
                && v["behavior"] == "Isolated"
                && v["invert"] == false
        };
        let (digits, pattern) = match list.as_slice() {
            [b] if byte_level(b, true) => (None, Pattern::Gpt2),
            [d, b] if d["type"] == "Digits" && byte_level(b, true) => {
                (Some(d["individual_digits"].as_bool()?), Pattern::Gpt2)
            }
            [s, b] if split(s, QWEN2_REGEX) && byte_level(b, false) => {
                (None, Pattern::Cl100k { digits: 1 })
            }
            [s, b] if split(s, LLAMA3_REGEX) && byte_level(b, false) => {
                (None, Pattern::Cl100k { digits: 3 })
            }
            _ => return None,
        };
        let mut added = Vec::new();
        for token in tok.get_added_tokens_decoder().values() {
            let mut normalized = tokenizers::NormalizedString::from(token.content.as_str());
            if let Some(n) = tok.get_normalizer() {
                tokenizers::Normalizer::normalize(n, &mut normalized).ok()?;
            }
            added.push(token.content.clone());
            added.push(normalized.get().to_owned());
        }
        added.retain(|a| !a.is_empty());
        added.sort();
        added.dedup();
        let mut added_first = [false; 256];
        for a in &added {
            added_first[a.as_bytes()[0] as usize] = true;
        }
        Some(PlainSplit {
            lowercase,
            digits,
            pattern,
            added,
            added_first,
        })
    }

    /// Whether `text` (printable ASCII, `normalized` its normalized form) may hold an added
    /// token, as written or normalized.
    fn may_hold_added(&self, text: &str, normalized: &str) -> bool {
        let hit = |s: &str| s.bytes().any(|b| self.added_first[b as usize]);
        (hit(text) || hit(normalized))
            && self
                .added
                .iter()
                .any(|a| text.contains(a.as_str()) || normalized.contains(a.as_str()))
    }

    /// Calls `piece` with each pre-token of `s` (normalized printable ASCII), in order.
    fn pieces(&self, s: &str, mut piece: impl FnMut(&str)) {
        let b = s.as_bytes();
        match self.digits {
            None => self.pattern.pieces(s, 0, b.len(), &mut piece),
            Some(individual) => {
                // `Digits` isolates digits (one by one or in runs); the regex then runs on each
                // part by itself.
                let mut start = 0;
                let mut i = 0;
                while i < b.len() {
                    if !b[i].is_ascii_digit() {
                        i += 1;
                        continue;
                    }
                    self.pattern.pieces(s, start, i, &mut piece);
                    let mut end = i + 1;
                    if !individual {
                        while end < b.len() && b[end].is_ascii_digit() {
                            end += 1;
                        }
                    }
                    piece(&s[i..end]);
                    start = end;
                    i = end;
                }
                self.pattern.pieces(s, start, b.len(), &mut piece);
            }
        }
    }
}

/// A printable-ASCII byte's class under `\p{L}`, `\p{N}`, `\s` and the rest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Digit,
        b' ' => Class::Space,
        _ => Class::Other,
    }
}

impl Pattern {
    /// The pattern's matches in `s[start..end]` (printable ASCII; the regex sees that part
    /// alone), leftmost first with the alternatives' priority, as the regex engine finds them.
    fn pieces(self, s: &str, start: usize, end: usize, piece: &mut impl FnMut(&str)) {
        let b = &s.as_bytes()[..end];
        let run = |mut k: usize, c: Class| {
            while k < end && class(b[k]) == c {
                k += 1;
            }
            k
        };
        let mut i = start;
        while i < end {
            let c = class(b[i]);
            let next = b.get(i + 1).map(|&n| class(n));
            let j = match self {
                Pattern::Gpt2 => {
                    if let Some(n) = contraction(&b[i..], false) {
                        i + n
                    } else if c == Class::Space && next.is_some_and(|n| n != Class::Space) {
                        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`.
                        run(i + 2, next.unwrap())
                    } else if c == Class::Space {
                        spaces(b, i, end)
                    } else {
                        run(i + 1, c)
                    }
                }
                Pattern::Cl100k { digits } => {
                    if let Some(n) = contraction(&b[i..], true) {
                        i + n
                    } else if c == Class::Letter {
                        run(i + 1, Class::Letter)
                    } else if c != Class::Digit && next == Some(Class::Letter) {
                        // `[^\r\n\p{L}\p{N}]?\p{L}+`: a space or a symbol, then letters.
                        run(i + 2, Class::Letter)
                    } else if c == Class::Digit {
                        let mut k = i + 1;
                        while k < end && k - i < digits && b[k].is_ascii_digit() {
                            k += 1;
                        }
                        k
                    } else if c == Class::Other {
                        run(i + 1, Class::Other)
                    } else if next == Some(Class::Other) {
                        // ` ?[^\s\p{L}\p{N}]+`
                        run(i + 2, Class::Other)
                    } else {
                        spaces(b, i, end)
                    }
                }
            };
            piece(&s[i..j]);
            i = j;
        }
    }
}

/// Length of a contraction (`'s|'t|'re|'ve|'m|'ll|'d`, or any case) at the start of `b`.
fn contraction(b: &[u8], any_case: bool) -> Option<usize> {
    if b.first() != Some(&b'\'') {
        return None;
    }
    let lower = |k: usize| {
        b.get(k)
            .map(|&c| if any_case { c.to_ascii_lowercase() } else { c })
    };
    match (lower(1), lower(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => Some(2),
        (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => Some(3),
        _ => None,
    }
}

/// `\s+(?!\S)|\s+` at `i` (a space): the run of spaces, less its last when a non-space follows
/// and the run is longer than one (that space goes with the next word).
fn spaces(b: &[u8], i: usize, end: usize) -> usize {
    let mut k = i;
    while k < end && b[k] == b' ' {
        k += 1;
    }
    if k < end && k - i > 1 {
        k - 1
    } else {
        k
    }
}

/// FxHash (rustc's): a multiply-rotate over 8-byte words; the memo's keys are short words.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
    }

    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `encode_plain` for many texts, memoized by pre-token: printable-ASCII text without added
/// tokens is cut into pre-tokens here (as `PlainSplit` reproduces them), and the model's ids
/// of each distinct pre-token are asked for once; any other text (or tokenizer) is
/// `encode_plain`'s own. The ids are exactly `encode_plain`'s (tested on random text for every
/// tokenizer in the fixtures).
pub struct PlainMemo<'t> {
    tok: &'t Tokenizer,
    /// Pre-token → its ids' range in `ids`.
    memo: HashMap<Box<str>, (u32, u32), BuildHasherDefault<FxHasher>>,
    ids: Vec<u32>,
    lower: String,
    mapped: String,
}

impl PlainMemo<'_> {
    /// Appends `encode_plain(text)` to `out`.
    pub fn encode_into(&mut self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if !self.try_fast(text, out) {
            out.extend_from_slice(&self.tok.encode_plain(text)?);
        }
        Ok(())
    }

    /// The memoized path; false (`out` as it was) where it does not apply.
    fn try_fast(&mut self, text: &str, out: &mut Vec<u32>) -> bool {
        let Some(split) = &self.tok.plain else {
            return false;
        };
        if !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return false;
        }
        let s = if split.lowercase && text.bytes().any(|b| b.is_ascii_uppercase()) {
            self.lower.clear();
            self.lower.push_str(text);
            self.lower.make_ascii_lowercase();
            self.lower.as_str()
        } else {
            text
        };
        if split.may_hold_added(text, s) {
            return false;
        }
        let model = self.tok.inner.get_model();
        let (memo, ids, mapped) = (&mut self.memo, &mut self.ids, &mut self.mapped);
        let start = out.len();
        let mut failed = false;
        split.pieces(s, |p| {
            if failed {
                return;
            }
            let (a, n) = match memo.get(p) {
                Some(&r) => r,
                None => {
                    // ByteLevel's byte → char map: printable ASCII is itself, but the space.
                    mapped.clear();
                    mapped.extend(p.chars().map(|c| if c == ' ' { 'Ġ' } else { c }));
                    // A failure or a panic of the model: the plain path decides (and reports).
                    let Ok(tokens) = guarded(String::new, || model.tokenize(mapped)) else {
                        failed = true;
                        return;
                    };
                    let r = (ids.len() as u32, tokens.len() as u32);
                    ids.extend(tokens.iter().map(|t| t.id));
                    memo.insert(p.into(), r);
                    r
                }
            };
            out.extend_from_slice(&ids[a as usize..(a + n) as usize]);
        });
        if failed {
            out.truncate(start);
        }
        !failed
    }
}

/// transformers' `clean_up_tokenization`: the space before `.`, `?`, `!`, `,` and English
/// contractions taken out, in its order (each replacement over the whole text in turn).
fn clean_up_spaces(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

#[cfg(test)]
mod tests;
