//! What opening a trie proves before any walk: the header, the counts against the length,
//! the checksum where asked, and the structure (a breadth-first tree whose every child,
//! token and code id is in bounds), so that every access the walker makes is in bounds.

use super::{
    checksum, Counts, Sections, Trie, Verify, HEADER_WORDS, MAGIC, MAX_CODES, NONE, VERSION,
};

impl Trie {
    /// Validates a serialized trie; returns its counts.
    pub(super) fn check(words: &[u32], verify: Verify) -> std::result::Result<Counts, String> {
        let h = words
            .get(..HEADER_WORDS)
            .ok_or("file is shorter than a trie header")?;
        if h[..2] != MAGIC {
            return Err("not a gram trie (bad magic)".into());
        }
        if h[2] != VERSION {
            return Err(format!(
                "trie format version {} (this build reads {VERSION})",
                h[2]
            ));
        }
        let (vocab, eos, nodes, edges, codes, max_len) = (
            h[3] as usize,
            h[4],
            h[5] as usize,
            h[6] as usize,
            h[7] as usize,
            h[8] as usize,
        );
        let want = (vocab as u128) + 2 * (nodes as u128) + 2 * (edges as u128) + 1;
        if words.len() as u128 != HEADER_WORDS as u128 + want {
            return Err(format!(
                "trie is {} words, its header says {} (truncated or corrupt)",
                words.len(),
                HEADER_WORDS as u128 + want
            ));
        }
        if verify == Verify::Checksum {
            let sum = checksum(words);
            if (sum as u32, (sum >> 32) as u32, 0) != (h[9], h[10], h[11]) {
                return Err("trie checksum mismatch (corrupt file)".into());
            }
        }
        if nodes == 0 || eos as usize >= vocab {
            return Err("trie header is inconsistent".into());
        }
        let s = Sections::new(vocab, nodes, edges);
        let start = &words[s.child_start..s.child_token];
        let token = &words[s.child_token..s.child_node];
        let node = &words[s.child_node..s.code];
        let code = &words[s.code..s.end];
        // The layout `build` writes: breadth first, so edge `e` leads to node `e + 1` — every
        // node but the root has exactly one parent, of a smaller id (a tree, no cycles).
        if edges + 1 != nodes
            || start[0] != 0
            || start[nodes] as usize != edges
            || node.iter().enumerate().any(|(e, &c)| c as usize != e + 1)
        {
            return Err("trie edges are not in breadth-first layout".into());
        }
        // `start` monotone, children's tokens strictly ascending and valid, children after
        // their parent: branch-free scans (one over nodes, one over edges), then the node at
        // fault found by the plain walk for the message.
        if !nodes_well_formed(start, token, vocab, eos) {
            let n = first_malformed_node(start, token, vocab, eos).unwrap_or(0);
            return Err(format!("trie node {n} has malformed children"));
        }
        // Each code ends at a node of its own, so there are at most `nodes` of them: checked
        // before the count sizes anything.
        if codes == 0 || codes > MAX_CODES || codes > nodes {
            return Err(format!(
                "trie holds {codes} codes (1..={}: at most one a node)",
                MAX_CODES.min(nodes)
            ));
        }
        // The root ends no code: a code has at least one token (`build` refuses an empty
        // one), and an empty code would let beam search end every query at its first step.
        if code[0] != NONE {
            return Err("the trie's root ends a code (an empty code)".into());
        }
        // A bit per code id (2.5 M codes: 312 KB, in L2; the ids are in code order, not the
        // nodes' breadth-first one, so these reads are scattered).
        let mut seen = vec![0u64; codes.div_ceil(64)];
        let mut last = 0;
        for (n, &c) in code.iter().enumerate() {
            if c == NONE {
                continue;
            }
            let (w, bit) = (c as usize / 64, 1u64 << (c % 64));
            match seen.get_mut(w) {
                Some(s) if (c as usize) < codes && *s & bit == 0 => *s |= bit,
                _ => return Err(format!("trie code id {c} is out of range or appears twice")),
            }
            last = n;
        }
        // A node with no children must end a code: `build` makes a node only on the way to a
        // code, so a leaf that ends none is damage — a walk that reaches it can neither go on
        // nor end (a dead end beam search would offer no token at all).
        let dead_end = |(w, &c): (&[u32], &u32)| w[0] == w[1] && c == NONE;
        if start.windows(2).zip(code).any(dead_end) {
            let n = start.windows(2).zip(code).position(dead_end).unwrap_or(0);
            return Err(format!(
                "trie node {n} is a dead end: it has no children and ends no code"
            ));
        }
        // Breadth first, depths never fall with the node id: the deepest code ends at the
        // last terminal node.
        let deepest = depth_of(start, last);
        let full = |(i, &w): (usize, &u64)| {
            let bits = (codes - 64 * i).min(64); // 1..=64
            w == u64::MAX >> (64 - bits)
        };
        if !seen.iter().enumerate().all(full) || deepest != max_len {
            return Err("trie codes or their longest length disagree with the header".into());
        }
        let root = &words[s.root..s.child_start];
        let mut dense = vec![NONE; vocab];
        for e in start[0] as usize..start[1] as usize {
            dense[token[e] as usize] = node[e];
        }
        if root != dense.as_slice() {
            return Err("trie root table disagrees with the root's children".into());
        }
        Ok((vocab, eos, nodes, edges, codes, max_len))
    }
}

/// Whether the child table is well formed (given `start[0] == 0`, `start[nodes] == edges`, and
/// edge `e` leading to node `e + 1`): `start` never falls, a node's children come after it
/// (its first edge `e >= n`), and each node's child tokens are below `vocab`, not `eos`, and
/// strictly ascending. Two branch-free scans: the nodes, then the edges, where an edge
/// continues its parent's run unless a node's children start there (a byte per edge).
pub(super) fn nodes_well_formed(start: &[u32], token: &[u32], vocab: usize, eos: u32) -> bool {
    let edges = token.len();
    // Pure compares over u32 lanes (the compiler's SIMD); `n < 2^32` as the header's counts.
    let bad = start.windows(2).enumerate().fold(false, |bad, (n, w)| {
        let (e, b) = (w[0], w[1]);
        bad | (b < e) | (b as usize > edges) | ((e < b) & ((e as usize) < n))
    });
    if bad {
        return false;
    }
    // A byte per edge: 1 where a node's children start (`start` never falls, so in order).
    let mut first = vec![0u8; edges + 1];
    for &e in start {
        match first.get_mut(e as usize) {
            Some(f) => *f = 1,
            None => return false,
        }
    }
    let Some(&t0) = token.first() else {
        return true;
    };
    let head = (t0 as usize >= vocab) | (t0 == eos);
    !token
        .windows(2)
        .zip(&first[1..])
        .fold(head, |bad, (t, &starts)| {
            bad | (t[1] as usize >= vocab) | (t[1] == eos) | ((starts == 0) & (t[1] <= t[0]))
        })
}

/// The plain walk of [`nodes_well_formed`]'s rules, node by node: the first node that breaks
/// one.
pub(super) fn first_malformed_node(
    start: &[u32],
    token: &[u32],
    vocab: usize,
    eos: u32,
) -> Option<usize> {
    let edges = token.len();
    let mut e = 0usize;
    for n in 0..start.len() - 1 {
        let b = start[n + 1] as usize;
        if b < e || b > edges || (e < b && e < n) {
            return Some(n);
        }
        let mut prev = None;
        for &t in &token[e..b] {
            if t as usize >= vocab || t == eos || prev.is_some_and(|p| t <= p) {
                return Some(n);
            }
            prev = Some(t);
        }
        e = b;
    }
    None
}

/// The depth of node `n` of a well-formed breadth-first trie: the nodes of one depth are a
/// range `lo..hi`, and their children the next, `start[lo] + 1..start[hi] + 1`.
pub(super) fn depth_of(start: &[u32], n: usize) -> usize {
    let (mut lo, mut hi, mut d) = (0usize, 1usize, 0usize);
    while n >= hi && lo < hi {
        (lo, hi) = (start[lo] as usize + 1, start[hi] as usize + 1);
        d += 1;
    }
    d
}
