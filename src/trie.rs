//! Code set → trie: the set of valid codes, tokenized the way the model emits them, compiled into
//! the compact structure beam search walks.
//!
//! A code is tokenized on its own without special tokens; the model ends it with its EOS token.
//! The trie holds the code tokens (not the EOS): node 0 is the root, every node's children are
//! stored CSR-style (`child_start[n]..child_start[n + 1]` into `child_token`, sorted, and
//! `child_node`), and a node where a code ends carries that code's id (`code[n]`); it may also
//! have children (`sofa` and `sofa | velvet`). So the tokens allowed after a beam's prefix are
//! its node's children, plus EOS where the node ends a code. The root also has a dense table
//! `root[token] → node` for O(1) lookup of the first token.
//!
//! The serialized form is one little-endian `u32` array, memory-mappable as it is (the index
//! embeds it; see docs/FORMAT.md):
//!
//! ```text
//! header  [MAGIC0, MAGIC1, VERSION, vocab, eos, nodes, edges, codes, max_len, checksum_lo, checksum_hi, 0]
//! root        [vocab]      node of each first token, or NONE
//! child_start [nodes + 1]
//! child_token [edges]      sorted within each node
//! child_node  [edges]
//! code        [nodes]      code id ending at the node, or NONE
//! ```
//! Loading checks the checksum and every structural invariant, so a corrupt file is an error,
//! never a panic or a wrong walk.

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::container::write_atomic;
use crate::error::{Error, Result};

mod check;
mod code_set;

pub use code_set::{
    line_name, read_lines_file, refusal, stopped_inside, without_bom, CodeName, CodeSet,
};

/// A trie's `(vocab, eos, nodes, edges, codes, max_len)`.
type Counts = (usize, u32, usize, usize, usize, usize);

/// "No node" / "no code".
pub const NONE: u32 = u32::MAX;
const MAGIC: [u32; 2] = [u32::from_le_bytes(*b"GRAM"), u32::from_le_bytes(*b"TRIE")];
const VERSION: u32 = 2;
const HEADER_WORDS: usize = 12;

/// Most codes a trie holds (ids are `u32`, `NONE` reserved).
pub const MAX_CODES: usize = (u32::MAX - 1) as usize;

/// Two codes' names as one phrase: "lines 3 and 8" for two lines of one source, else "A and B".
fn name_pair(a: &str, b: &str) -> String {
    let numbered = |s: &str| {
        s.rsplit_once("line ")
            .filter(|(_, n)| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
            .map(|(head, n)| (head.to_owned(), n.to_owned()))
    };
    match (numbered(a), numbered(b)) {
        (Some((ha, x)), Some((hb, y))) if ha == hb => format!("{ha}lines {x} and {y}"),
        _ => format!("{a} and {b}"),
    }
}

/// Where a trie's words live: built in memory, or mapped from a file (possibly inside an
/// index, at a 4-byte aligned offset).
enum Words {
    Owned(Vec<u32>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

/// A compiled code trie (see the module docs for the layout).
pub struct Trie {
    words: Words,
    vocab: usize,
    eos: u32,
    nodes: usize,
    edges: usize,
    codes: usize,
    max_len: usize,
}

/// Word offsets of the sections, from the counts.
struct Sections {
    root: usize,
    child_start: usize,
    child_token: usize,
    child_node: usize,
    code: usize,
    end: usize,
}

impl Sections {
    fn new(vocab: usize, nodes: usize, edges: usize) -> Sections {
        let root = HEADER_WORDS;
        let child_start = root + vocab;
        let child_token = child_start + nodes + 1;
        let child_node = child_token + edges;
        let code = child_node + edges;
        Sections {
            root,
            child_start,
            child_token,
            child_node,
            code,
            end: code + nodes,
        }
    }
}

/// A 64-bit checksum (XXH3-64 over the little-endian bytes) of the header's counts and the
/// payload of a serialized trie's `words`: catches truncation and corruption. The header holds
/// it in words 9 (low half) and 10.
pub fn checksum(words: &[u32]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [&words[2..9], &words[HEADER_WORDS..]] {
        if cfg!(target_endian = "little") {
            h.update(bytemuck::cast_slice(part));
        } else {
            for w in part {
                h.update(&w.to_le_bytes());
            }
        }
    }
    h.digest()
}

/// What opening a mapped trie proves beyond its structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Its checksum too (a standalone trie file).
    Checksum,
    /// Structure only: the file around it is checksummed by section and verified on demand
    /// (`Container::verify`, `gram index inspect`), which keeps opening a large index fast.
    StructureOnly,
}

impl Trie {
    /// Compiles a code set for a model with `vocab` tokens ending codes with `eos`. Two codes
    /// with the same tokens are an error naming both lines.
    pub fn build(set: &CodeSet, vocab: usize, eos: u32) -> Result<Trie> {
        Trie::build_named(set, vocab, eos, &line_name)
    }

    /// [`Trie::build`] with errors naming each code as `name` says (see
    /// [`CodeSet::from_texts_named`]).
    pub fn build_named(set: &CodeSet, vocab: usize, eos: u32, name: CodeName) -> Result<Trie> {
        let n = set.len();
        let text = |i: usize| set.texts.get(i).map_or("", String::as_str);
        if n == 0 || n > MAX_CODES {
            return Err(Error::Input(format!(
                "a code set of {n} codes (1..={MAX_CODES})"
            )));
        }
        let offsets_ok = set.offsets.len() == n + 1
            && set.offsets[0] == 0
            && set.offsets[n] == set.tokens.len()
            && set.offsets.windows(2).all(|w| w[0] < w[1]);
        if !offsets_ok {
            return Err(Error::Input(
                "code set offsets do not cut its tokens into non-empty codes".into(),
            ));
        }
        if let Some(i) = (0..n).find(|&i| set.code_tokens(i).contains(&eos)) {
            return Err(Error::Input(format!(
                "{}: code {:?} contains the EOS token {eos}",
                name(i, text(i)),
                text(i)
            )));
        }
        let outside = |i: usize| set.code_tokens(i).iter().find(|&&t| t as usize >= vocab);
        if let Some((i, t)) = (0..n).find_map(|i| outside(i).map(|t| (i, t))) {
            return Err(Error::Input(format!(
                "{}: code {:?} has token {t}, outside the model's vocabulary of {vocab}",
                name(i, text(i)),
                text(i)
            )));
        }
        if eos as usize >= vocab {
            return Err(Error::Input(format!(
                "EOS {eos} is outside the vocabulary of {vocab}"
            )));
        }
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.par_sort_unstable_by(|&a, &b| {
            set.code_tokens(a as usize)
                .cmp(set.code_tokens(b as usize))
                .then(a.cmp(&b))
        });
        if let Some(w) = order
            .windows(2)
            .find(|w| set.code_tokens(w[0] as usize) == set.code_tokens(w[1] as usize))
        {
            let (a, b) = (w[0] as usize, w[1] as usize);
            return Err(Error::Input(format!(
                "{} are the same code ({:?}, {:?} tokenize alike)",
                name_pair(&name(a, text(a)), &name(b, text(b))),
                text(a),
                text(b)
            )));
        }
        let tok = |i: u32, depth: usize| set.code_tokens(order[i as usize] as usize).get(depth);

        // Breadth first: node ids are handed out in the order nodes are queued, and nodes are
        // expanded in id order, so each node's children get consecutive ids and `child_start`
        // grows monotonically. A node is the range of sorted codes sharing its prefix.
        let mut child_start = vec![0u32];
        let mut child_token = Vec::new();
        let mut child_node = Vec::new();
        let mut code = Vec::new();
        let mut queue = std::collections::VecDeque::from([(0u32, n as u32, 0usize)]);
        let mut max_len = 0;
        while let Some((mut lo, hi, depth)) = queue.pop_front() {
            // Codes ending here sort first in the range (at most one: duplicates are refused).
            if tok(lo, depth).is_none() {
                code.push(order[lo as usize]);
                max_len = max_len.max(depth);
                lo += 1;
            } else {
                code.push(NONE);
            }
            while lo < hi {
                let t = *tok(lo, depth).expect("codes ending here were taken above");
                let mut end = lo + 1;
                while end < hi && tok(end, depth) == Some(&t) {
                    end += 1;
                }
                let id = code.len() + queue.len();
                child_token.push(t);
                child_node.push(id as u32);
                queue.push_back((lo, end, depth + 1));
                lo = end;
            }
            child_start.push(child_token.len() as u32);
        }
        let nodes = code.len();
        if nodes >= NONE as usize || child_token.len() >= NONE as usize {
            return Err(Error::Input(format!(
                "the code set makes a trie of {nodes} nodes: more than a u32 index holds"
            )));
        }
        let edges = child_token.len();
        let s = Sections::new(vocab, nodes, edges);
        let mut words = vec![0u32; s.end];
        words[s.root..s.child_start].fill(NONE);
        for e in child_start[0] as usize..child_start[1] as usize {
            words[s.root + child_token[e] as usize] = child_node[e];
        }
        words[s.child_start..s.child_token].copy_from_slice(&child_start);
        words[s.child_token..s.child_node].copy_from_slice(&child_token);
        words[s.child_node..s.code].copy_from_slice(&child_node);
        words[s.code..s.end].copy_from_slice(&code);
        words[..HEADER_WORDS].copy_from_slice(&[
            MAGIC[0],
            MAGIC[1],
            VERSION,
            vocab as u32,
            eos,
            nodes as u32,
            edges as u32,
            n as u32,
            max_len as u32,
            0,
            0,
            0,
        ]);
        let sum = checksum(&words);
        words[9] = sum as u32;
        words[10] = (sum >> 32) as u32;
        Ok(Trie {
            words: Words::Owned(words),
            vocab,
            eos,
            nodes,
            edges,
            codes: n,
            max_len,
        })
    }

    /// The serialized trie (see the module docs).
    pub fn as_words(&self) -> &[u32] {
        match &self.words {
            Words::Owned(w) => w,
            Words::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * 4])
            }
        }
    }

    /// Writes the trie to `path` atomically (temp file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, bytemuck::cast_slice(self.as_words()))
    }

    /// Maps a trie file written by [`Trie::write`] and checks it.
    pub fn open(path: &Path) -> Result<Trie> {
        let file = crate::container::open_regular(path)?;
        // SAFETY: the map is read-only; a trie file is written atomically and never modified
        // in place, so no other writer changes it under the map.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let len = map.len();
        Trie::from_map(Arc::new(map), 0, len, Verify::Checksum).map_err(|msg| Error::Index {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// A trie stored at `offset..offset + bytes` of a mapped file (an index embeds one there).
    /// Its structure is always checked (every access is then in bounds); its checksum as
    /// `verify` says.
    pub fn from_map(
        map: Arc<Mmap>,
        offset: usize,
        bytes: usize,
        verify: Verify,
    ) -> std::result::Result<Trie, String> {
        let region = map
            .get(offset..offset.saturating_add(bytes))
            .ok_or_else(|| format!("trie at {offset}+{bytes} is past the end of the file"))?;
        if !offset.is_multiple_of(4) || !bytes.is_multiple_of(4) {
            return Err(format!("trie at {offset}+{bytes} is not 4-byte aligned"));
        }
        let words: &[u32] = bytemuck::try_cast_slice(region)
            .map_err(|e| format!("trie words cannot be read in place: {e}"))?;
        let counts = Trie::check(words, verify)?;
        let len = words.len();
        Ok(Trie::with_counts(
            Words::Mapped { map, offset, len },
            counts,
        ))
    }

    /// A trie over checked `words` with the counts `check` returned.
    fn with_counts(words: Words, counts: Counts) -> Trie {
        let (vocab, eos, nodes, edges, codes, max_len) = counts;
        Trie {
            words,
            vocab,
            eos,
            nodes,
            edges,
            codes,
            max_len,
        }
    }

    fn sections(&self) -> Sections {
        Sections::new(self.vocab, self.nodes, self.edges)
    }

    /// The root node.
    pub const ROOT: u32 = 0;

    /// Children of `node`: `(tokens, nodes)`, tokens ascending.
    #[inline]
    pub fn children(&self, node: u32) -> (&[u32], &[u32]) {
        let s = self.sections();
        let w = self.as_words();
        let n = node as usize;
        let (a, b) = (
            w[s.child_start + n] as usize,
            w[s.child_start + n + 1] as usize,
        );
        (
            &w[s.child_token + a..s.child_token + b],
            &w[s.child_node + a..s.child_node + b],
        )
    }

    /// The CSR arrays, as mapped: `child_start [nodes + 1]`, `child_token [edges]` (ascending
    /// within a node), `child_node [edges]`, `code [nodes]` ([`NONE`] where no code ends). What
    /// the device beam step reads (kernels/beam_step.cu, `BeamTrie`).
    pub fn csr(&self) -> (&[u32], &[u32], &[u32], &[u32]) {
        let s = self.sections();
        let w = self.as_words();
        (
            &w[s.child_start..s.child_token],
            &w[s.child_token..s.child_node],
            &w[s.child_node..s.code],
            &w[s.code..s.end],
        )
    }

    /// The code ending at `node`, if one does.
    #[inline]
    pub fn code(&self, node: u32) -> Option<u32> {
        let c = self.as_words()[self.sections().code + node as usize];
        (c != NONE).then_some(c)
    }

    /// The child of `node` along `token`.
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        if node == Trie::ROOT {
            let c = *self.as_words().get(self.sections().root + token as usize)?;
            return (c != NONE && (token as usize) < self.vocab).then_some(c);
        }
        let (tokens, nodes) = self.children(node);
        tokens.binary_search(&token).ok().map(|i| nodes[i])
    }

    /// The node `tokens` lead to from the root.
    pub fn walk(&self, tokens: &[u32]) -> Option<u32> {
        tokens
            .iter()
            .try_fold(Trie::ROOT, |node, &t| self.child(node, t))
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn num_codes(&self) -> usize {
        self.codes
    }

    pub fn num_nodes(&self) -> usize {
        self.nodes
    }

    /// Longest code, in tokens (without EOS).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Size of the serialized trie.
    pub fn size_bytes(&self) -> usize {
        self.as_words().len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::check::{depth_of, first_malformed_node, nodes_well_formed};
    use super::*;

    /// A code set straight from token lists (no tokenizer).
    fn set(codes: &[&[u32]]) -> CodeSet {
        let mut tokens = Vec::new();
        let mut offsets = vec![0];
        for c in codes {
            tokens.extend_from_slice(c);
            offsets.push(tokens.len());
        }
        CodeSet {
            texts: (0..codes.len()).map(|i| format!("c{i}")).collect(),
            tokens,
            offsets,
        }
    }

    /// Every code walks to a node carrying its id; every node's children are exactly the next
    /// tokens of the codes through it.
    fn check_against_codes(trie: &Trie, s: &CodeSet) {
        use std::collections::{BTreeMap, BTreeSet};
        let mut next: BTreeMap<Vec<u32>, BTreeSet<u32>> = BTreeMap::new();
        for i in 0..s.len() {
            let t = s.code_tokens(i);
            let node = trie.walk(t).expect("code walks");
            assert_eq!(trie.code(node), Some(i as u32));
            for d in 0..t.len() {
                next.entry(t[..d].to_vec()).or_default().insert(t[d]);
            }
        }
        for (prefix, toks) in next {
            let node = trie.walk(&prefix).unwrap();
            let (ct, _) = trie.children(node);
            assert_eq!(ct, toks.into_iter().collect::<Vec<_>>().as_slice());
        }
    }

    #[test]
    fn builds_and_walks() {
        let s = set(&[&[5, 6], &[5], &[5, 6, 7], &[9, 1], &[5, 8], &[3]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        check_against_codes(&trie, &s);
        assert_eq!(trie.max_len(), 3);
        assert_eq!(trie.children(Trie::ROOT).0, &[3, 5, 9]);
        assert_eq!(trie.walk(&[5, 7]), None);
        assert_eq!(trie.code(Trie::ROOT), None);
        assert_eq!(trie.child(Trie::ROOT, 15), None);
    }

    #[test]
    fn random_sets_match_their_codes() {
        let mut rng = crate::test_rng::xorshift(0x1234_5678);
        let mut next = |m: u64| rng() % m;
        for _ in 0..20 {
            let mut codes = std::collections::BTreeSet::new();
            for _ in 0..next(300) + 1 {
                let len = next(6) + 1;
                codes.insert((0..len).map(|_| next(12) as u32 + 3).collect::<Vec<_>>());
            }
            let codes: Vec<Vec<u32>> = codes.into_iter().collect();
            let refs: Vec<&[u32]> = codes.iter().map(|c| c.as_slice()).collect();
            let s = set(&refs);
            let trie = Trie::build(&s, 20, 2).unwrap();
            check_against_codes(&trie, &s);
            Trie::check(trie.as_words(), Verify::Checksum).unwrap();
        }
    }

    #[test]
    fn duplicates_and_bad_tokens_are_errors() {
        let e = Trie::build(&set(&[&[5, 6], &[7], &[5, 6]]), 16, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lines 1 and 3"), "{e}");
        let e = Trie::build(&set(&[&[5, 60]]), 16, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("outside the model's vocabulary"), "{e}");
    }

    /// The vocabulary error named a token but no code; and every error numbered codes by their
    /// position in the set, which is not their line when blank lines were dropped or the set
    /// was sorted. Now each names the code, as the caller's `name` says.
    #[test]
    fn errors_name_the_code_as_the_caller_says() {
        let mut s = set(&[&[5, 6], &[5, 60]]);
        s.texts = vec!["sofa".into(), "lamp".into()];
        let e = Trie::build(&s, 16, 2).err().unwrap().to_string();
        assert!(
            e.contains("line 2: code \"lamp\" has token 60, outside the model's vocabulary"),
            "{e}"
        );
        let lines = [1, 5];
        let name = |i: usize, _: &str| format!("codes.txt line {}", lines[i]);
        let e = Trie::build_named(&s, 16, 2, &name)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("codes.txt line 5: code \"lamp\" has token 60"),
            "{e}"
        );
        let mut s = set(&[&[5, 6], &[5, 6]]);
        s.texts = vec!["mouse".into(), "mouse".into()];
        let e = Trie::build_named(&s, 16, 2, &name)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("codes.txt lines 1 and 5 are the same code"),
            "{e}"
        );
        let other = |i: usize, _: &str| format!("catalog line {} (product \"p{i}\")", 3 * i + 2);
        let e = Trie::build_named(&s, 16, 2, &other)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("catalog line 2 (product \"p0\") and catalog line 5 (product \"p1\")"),
            "{e}"
        );
    }

    #[test]
    fn malformed_code_sets_are_errors() {
        let empty = CodeSet {
            texts: vec![],
            tokens: vec![],
            offsets: vec![0],
        };
        assert!(Trie::build(&empty, 16, 2).is_err());
        let e = Trie::build(&set(&[&[5, 2], &[5]]), 16, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("contains the EOS"), "{e}");
        let bad = CodeSet {
            texts: vec!["a".into()],
            tokens: vec![5, 6],
            offsets: vec![0, 3],
        };
        assert!(Trie::build(&bad, 16, 2).is_err());
    }

    /// Structural corruption that keeps a valid checksum is still refused.
    #[test]
    fn structurally_bad_tries_are_refused() {
        let s = set(&[&[5, 6], &[5, 7], &[9]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        let good = trie.as_words().to_vec();
        let sec = Sections::new(16, trie.num_nodes(), trie.edges);
        let resum = |mut w: Vec<u32>| {
            let sum = checksum(&w);
            w[9] = sum as u32;
            w[10] = (sum >> 32) as u32;
            w
        };
        // Node 1 (`5`) has children `6`, `7`: point both edges at one node.
        let mut w = good.clone();
        let (a, b) = (
            w[sec.child_start + 1] as usize,
            w[sec.child_start + 2] as usize,
        );
        assert_eq!(b - a, 2);
        w[sec.child_node + a + 1] = w[sec.child_node + a];
        let e = Trie::check(&resum(w), Verify::Checksum).err().unwrap();
        assert!(e.contains("breadth-first"), "{e}");
        // A code id at two nodes.
        let mut w = good.clone();
        let terminals: Vec<usize> = (0..trie.num_nodes())
            .filter(|&n| good[sec.code + n] != NONE)
            .collect();
        w[sec.code + terminals[1]] = w[sec.code + terminals[0]];
        let e = Trie::check(&resum(w), Verify::Checksum).err().unwrap();
        assert!(e.contains("appears twice"), "{e}");
        // A code id past the header's count (3 codes: ids 0..3).
        let mut w = good.clone();
        w[sec.code + terminals[0]] = 3;
        let e = Trie::check(&resum(w), Verify::Checksum).err().unwrap();
        assert!(e.contains("out of range"), "{e}");
        // A code id no node carries: the header says 4 codes.
        let mut w = good.clone();
        w[7] += 1;
        let e = Trie::check(&resum(w), Verify::Checksum).err().unwrap();
        assert!(e.contains("disagree with the header"), "{e}");
        // A wrong longest length.
        let mut w = good.clone();
        w[8] += 1;
        assert!(Trie::check(&resum(w), Verify::Checksum).is_err());
        Trie::check(&resum(good), Verify::Checksum).unwrap();
    }

    /// A leaf that ends no code (a dead end: a walk there can neither go on nor end) passed
    /// the checks when every code id was still accounted for. `9` (code 2, the last id) ends
    /// at a leaf: erasing its code and counting one code fewer keeps every other rule.
    #[test]
    fn a_dead_end_leaf_is_refused() {
        let s = set(&[&[5, 6], &[5, 7], &[9]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        let sec = Sections::new(16, trie.num_nodes(), trie.edges);
        let leaf = trie.walk(&[9]).unwrap();
        assert_eq!((trie.code(leaf), trie.children(leaf).0.len()), (Some(2), 0));
        let mut w = trie.as_words().to_vec();
        w[sec.code + leaf as usize] = NONE;
        w[7] -= 1;
        let sum = checksum(&w);
        w[9] = sum as u32;
        w[10] = (sum >> 32) as u32;
        let e = Trie::check(&w, Verify::Checksum).err().unwrap();
        assert!(
            e.contains(&format!("trie node {leaf} is a dead end")),
            "{e}"
        );
    }

    /// A root that ends a code (an empty code: every walk could end before its first token)
    /// passed every check before: the code of a node that has children moved onto the root,
    /// the checksum made anew.
    #[test]
    fn a_root_that_ends_a_code_is_refused() {
        let s = set(&[&[5], &[5, 6], &[9]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        let sec = Sections::new(16, trie.num_nodes(), trie.edges);
        let inner = trie.walk(&[5]).unwrap();
        assert!(trie.code(inner).is_some() && !trie.children(inner).0.is_empty());
        let mut w = trie.as_words().to_vec();
        w[sec.code] = w[sec.code + inner as usize];
        w[sec.code + inner as usize] = NONE;
        let sum = checksum(&w);
        w[9] = sum as u32;
        w[10] = (sum >> 32) as u32;
        let e = Trie::check(&w, Verify::Checksum).err().unwrap();
        assert!(e.contains("root ends a code"), "{e}");
    }

    /// The branch-free scans of the child table accept exactly what the plain node-by-node
    /// walk accepts, on a random trie and thousands of corruptions of its `start` and token
    /// words; and `depth_of` gives every node's depth as a breadth-first walk counts it.
    #[test]
    fn node_scans_agree_with_the_plain_walk() {
        let mut r = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r
        };
        let mut codes: Vec<Vec<u32>> = (0..400)
            .map(|_| {
                (0..1 + next() % 5)
                    .map(|_| 3 + (next() % 61) as u32)
                    .collect()
            })
            .collect();
        codes.sort();
        codes.dedup();
        let refs: Vec<&[u32]> = codes.iter().map(|c| c.as_slice()).collect();
        let trie = Trie::build(&set(&refs), 64, 2).unwrap();
        let sec = trie.sections();
        let good = trie.as_words().to_vec();
        let nodes = trie.num_nodes();
        // Depths by walking down from the root.
        let mut depth = vec![0usize; nodes];
        for n in 0..nodes as u32 {
            for &c in trie.children(n).1 {
                depth[c as usize] = depth[n as usize] + 1;
            }
        }
        let start = &good[sec.child_start..sec.child_token];
        for (n, &d) in depth.iter().enumerate() {
            assert_eq!(depth_of(start, n), d, "node {n}");
        }
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..5_000 {
            let mut w = good.clone();
            for _ in 0..1 + next() % 3 {
                // An interior `start` entry (the first and last are checked before) or a token.
                let i = if next() % 2 == 0 {
                    sec.child_start + 1 + (next() as usize % (nodes - 1))
                } else {
                    sec.child_token + (next() as usize % trie.edges)
                };
                w[i] = match next() % 4 {
                    0 => w[i] ^ (1 << (next() % 6)),
                    1 => w[i].wrapping_add(1),
                    2 => w[i].wrapping_sub(1),
                    _ => (next() % 70) as u32,
                };
            }
            let start = &w[sec.child_start..sec.child_token];
            let token = &w[sec.child_token..sec.child_node];
            let fast = nodes_well_formed(start, token, 64, 2);
            let plain = first_malformed_node(start, token, 64, 2);
            assert_eq!(fast, plain.is_none(), "{plain:?}");
            if fast {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        assert!(accepted > 100 && refused > 1_000, "{accepted} / {refused}");
    }

    /// Random corruption with a recomputed checksum (so the structural checks are what stands
    /// between it and the walker): `check` never panics, and a trie that passes it can be walked
    /// everywhere without panicking.
    #[test]
    fn randomly_corrupted_tries_never_panic() {
        let s = set(&[&[5, 6, 7], &[5, 6], &[9, 1], &[9, 3, 4], &[12]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        let good = trie.as_words().to_vec();
        let mut r = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            r
        };
        let (mut passed, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut w = good.clone();
            for _ in 0..1 + next() % 3 {
                let i = HEADER_WORDS + (next() as usize % (w.len() - HEADER_WORDS));
                w[i] = match next() % 3 {
                    0 => w[i] ^ (1 << (next() % 32)),
                    1 => (next() % 20) as u32,
                    _ => NONE,
                };
            }
            let sum = checksum(&w);
            w[9] = sum as u32;
            w[10] = (sum >> 32) as u32;
            let Ok(counts) = Trie::check(&w, Verify::Checksum) else {
                refused += 1;
                continue;
            };
            passed += 1;
            let t = Trie::with_counts(Words::Owned(w), counts);
            for n in 0..t.num_nodes() as u32 {
                let (tokens, _) = t.children(n);
                let _ = t.code(n);
                for &tok in tokens {
                    let _ = t.child(n, tok);
                }
                let _ = t.child(n, 15);
            }
            for i in 0..s.len() {
                let _ = t.walk(s.code_tokens(i));
            }
        }
        // Both halves ran: corruptions the check refuses, and ones it passes that are walked.
        assert!(
            passed > 100 && refused > 100,
            "{passed} passed, {refused} refused"
        );
    }

    #[test]
    fn corrupt_words_are_refused() {
        let s = set(&[&[5, 6], &[5], &[9, 1]]);
        let trie = Trie::build(&s, 16, 2).unwrap();
        let good = trie.as_words().to_vec();
        for i in 0..good.len() {
            let mut w = good.clone();
            w[i] ^= 0x10;
            assert!(
                Trie::check(&w, Verify::Checksum).is_err(),
                "flipped word {i} passed"
            );
        }
        assert!(Trie::check(&good[..good.len() - 1], Verify::Checksum).is_err());
        // A wrong checksum alone passes a structure-only check (the container's section
        // checksums cover an embedded trie), and nothing else does.
        let mut w = good.clone();
        w[9] ^= 1;
        assert!(Trie::check(&w, Verify::StructureOnly).is_ok());
        assert!(Trie::check(&w, Verify::Checksum).is_err());
        assert!(Trie::check(&good[..5], Verify::Checksum).is_err());
    }
}
