//! What the shards of a build found, kept compact until the index is written, then turned into
//! posting columns.
//!
//! A shard gives each product's codes as `(text, probabilities)`: a `String` and a `Vec` a
//! posting, ~110 bytes with the allocator's share. A catalog of millions of products holds
//! them all until the code set is final (unconstrained generation finds codes up to the last
//! shard), so [`Collected`] keeps one interned code id, one length and the probabilities in
//! one array a posting (~30 bytes), and [`Collected::columns`] writes the index's posting
//! columns straight from it, with no list a code in between.

use std::collections::HashMap;

use super::Found;
use crate::error::{Error, Result};
use crate::index::PostingColumns;
use crate::trie::CodeSet;

/// Every product's codes, in catalog order, as the shards gave them.
pub(super) struct Collected {
    /// Interned code texts, by first sighting, and their ids.
    names: Vec<String>,
    ids: HashMap<String, u32>,
    /// Product `p`'s postings are `first[p]..first[p + 1]`; their probabilities start at
    /// `pt_first[p]`, one run a posting of `len` values.
    first: Vec<usize>,
    pt_first: Vec<usize>,
    code: Vec<u32>,
    len: Vec<u32>,
    pt: Vec<f32>,
}

impl Collected {
    pub(super) fn new() -> Collected {
        Collected {
            names: Vec::new(),
            ids: HashMap::new(),
            first: vec![0],
            pt_first: vec![0],
            code: Vec::new(),
            len: Vec::new(),
            pt: Vec::new(),
        }
    }

    /// Appends a shard's products.
    pub(super) fn push(&mut self, found: Found) {
        for codes in found {
            for (text, pt) in codes {
                let id = match self.ids.get(&text) {
                    Some(&id) => id,
                    None => {
                        let id = self.names.len() as u32;
                        self.names.push(text.clone());
                        self.ids.insert(text, id);
                        id
                    }
                };
                self.code.push(id);
                self.len.push(pt.len() as u32);
                self.pt.extend_from_slice(&pt);
            }
            self.first.push(self.code.len());
            self.pt_first.push(self.pt.len());
        }
    }

    #[cfg(test)]
    fn products(&self) -> usize {
        self.first.len() - 1
    }

    /// Every distinct code text found, in first-seen order.
    pub(super) fn names(&self) -> &[String] {
        &self.names
    }

    /// Product `p`'s codes (interned ids) with their probabilities, in the order found.
    pub(super) fn product(&self, p: usize) -> impl Iterator<Item = (u32, &[f32])> + '_ {
        let mut at = self.pt_first[p];
        (self.first[p]..self.first[p + 1]).map(move |i| {
            let n = self.len[i] as usize;
            at += n;
            (self.code[i], &self.pt[at - n..at])
        })
    }

    /// Each interned code's id in `set`, checked: every code found is in `set`, and each of
    /// its postings of the products in `kept` holds one probability per token. Also how many
    /// of those products list each code of `set`. A failure is a shard that does not match its
    /// build (the shard key should have kept it out): named with `work`, the shards' directory.
    pub(super) fn resolve(
        &self,
        set: &CodeSet,
        kept: &[usize],
        work: &std::path::Path,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        let stale =
            |what: String| Error::Input(format!("{what} (a stale shard in {}?)", work.display()));
        let mut set_id = Vec::with_capacity(self.names.len());
        for text in &self.names {
            match set.texts.binary_search(text) {
                Ok(c) => set_id.push(c as u32),
                // Only a code of a kept product is an error.
                Err(_) => set_id.push(u32::MAX),
            }
        }
        let mut listed = vec![0usize; set.len()];
        for &p in kept {
            for (code, pt) in self.product(p) {
                let text = &self.names[code as usize];
                let c = set_id[code as usize];
                if c == u32::MAX {
                    return Err(stale(format!("code {text:?} is not in the code set")));
                }
                let tokens = set.code_tokens(c as usize).len();
                if pt.len() != tokens {
                    return Err(stale(format!(
                        "code {text:?}: {} probabilities for {tokens} tokens",
                        pt.len()
                    )));
                }
                listed[c as usize] += 1;
            }
        }
        Ok((set_id, listed))
    }

    /// The index's posting columns over `lists` codes: the products of `kept`, numbered anew
    /// from 0 in that order, each posted on list `list_of(code)` of each of its (interned)
    /// codes, once a list (two codes of one product that map to one list, codes that merged,
    /// tokenize alike: the first one's probabilities are posted).
    pub(super) fn columns(
        &self,
        kept: &[usize],
        lists: usize,
        list_of: impl Fn(u32) -> usize,
    ) -> PostingColumns {
        // Pass 1: each list's length and probability count.
        let (mut count, mut values) = (vec![0usize; lists], vec![0usize; lists]);
        let mut last = vec![u32::MAX; lists];
        for (new, &p) in kept.iter().enumerate() {
            for (code, pt) in self.product(p) {
                let l = list_of(code);
                if last[l] != new as u32 {
                    last[l] = new as u32;
                    count[l] += 1;
                    values[l] += pt.len();
                }
            }
        }
        let mut starts = Vec::with_capacity(lists + 1);
        let mut pt_at = Vec::with_capacity(lists);
        let (mut s, mut v) = (0usize, 0usize);
        for l in 0..lists {
            starts.push(s as u64);
            pt_at.push(v);
            s += count[l];
            v += values[l];
        }
        starts.push(s as u64);
        // Pass 2: fill, products ascending in each list; a list's probabilities column-major
        // (token `t` of its posting `j` at `pt_at + t · count + j`, as the index stores them).
        let mut products = vec![0u32; s];
        let mut pt = vec![0f32; v];
        let mut j = vec![0usize; lists];
        last.fill(u32::MAX);
        for (new, &p) in kept.iter().enumerate() {
            for (code, values) in self.product(p) {
                let l = list_of(code);
                if last[l] != new as u32 {
                    last[l] = new as u32;
                    products[starts[l] as usize + j[l]] = new as u32;
                    for (t, &x) in values.iter().enumerate() {
                        pt[pt_at[l] + t * count[l] + j[l]] = x;
                    }
                    j[l] += 1;
                }
            }
        }
        PostingColumns {
            starts,
            products,
            pt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::CodePostings;
    use crate::test_rng::xorshift;

    /// The columns against the lists the build made before (one `Vec` a list, filled product
    /// by product, a product once a list, then laid out by `PostingColumns::from_lists`):
    /// random products with random codes (repeats and codes that map to one list included),
    /// random probabilities, some products left out; every start, product and probability
    /// equal.
    #[test]
    fn columns_equal_the_lists_built_one_posting_at_a_time() {
        let mut next = xorshift(0xc011_ec7e);
        for round in 0..20 {
            let texts = 1 + (next() % 12) as usize;
            let lists = 1 + (next() % texts as u64) as usize;
            // Each text's list (several texts may share one: merged codes) and token count
            // (shared by the texts of a list, as merged codes tokenize alike).
            let list_of_text: Vec<usize> = (0..texts)
                .map(|t| {
                    if t < lists {
                        t
                    } else {
                        (next() % lists as u64) as usize
                    }
                })
                .collect();
            let tokens: Vec<usize> = (0..lists).map(|_| 1 + (next() % 4) as usize).collect();
            let n = 1 + (next() % 40) as usize;
            let mut found: Found = Vec::new();
            for _ in 0..n {
                let k = (next() % 6) as usize;
                let codes = (0..k)
                    .map(|_| {
                        let t = (next() % texts as u64) as usize;
                        let pt = (0..tokens[list_of_text[t]])
                            .map(|_| (next() % 1000) as f32 / 1000.0)
                            .collect();
                        (format!("code {t}"), pt)
                    })
                    .collect();
                found.push(codes);
            }
            let kept: Vec<usize> = (0..n).filter(|_| !next().is_multiple_of(4)).collect();
            // The plain build.
            let mut plain: Vec<CodePostings> = (0..lists)
                .map(|_| CodePostings {
                    products: Vec::new(),
                    pt: Vec::new(),
                })
                .collect();
            for (new, &p) in kept.iter().enumerate() {
                for (text, pt) in &found[p] {
                    let t: usize = text[5..].parse().unwrap();
                    let list = &mut plain[list_of_text[t]];
                    if list.products.last() != Some(&(new as u32)) {
                        list.products.push(new as u32);
                        list.pt.push(pt.clone());
                    }
                }
            }
            // Split over two shards, as a build pushes them.
            let mut c = Collected::new();
            let cut = (next() % (n as u64 + 1)) as usize;
            let (a, b) = found.split_at(cut);
            c.push(a.to_vec());
            c.push(b.to_vec());
            assert_eq!(c.products(), n);
            let text_of = |code: u32| -> usize { c.names()[code as usize][5..].parse().unwrap() };
            let cols = c.columns(&kept, lists, |code| list_of_text[text_of(code)]);
            let want = PostingColumns::from_lists(&plain);
            assert_eq!(cols.starts, want.starts, "round {round}");
            assert_eq!(cols.products, want.products, "round {round}");
            assert_eq!(cols.pt, want.pt, "round {round}");
        }
    }

    /// `product` gives back each product's codes and probabilities as pushed.
    #[test]
    fn products_read_back_as_pushed() {
        let found: Found = vec![
            vec![("a".into(), vec![0.5, 0.25]), ("b".into(), vec![0.75])],
            vec![],
            vec![("b".into(), vec![0.125]), ("c".into(), vec![0.5, 0.5, 0.5])],
        ];
        let mut c = Collected::new();
        c.push(found.clone());
        for (p, codes) in found.iter().enumerate() {
            let got: Vec<(String, Vec<f32>)> = c
                .product(p)
                .map(|(code, pt)| (c.names()[code as usize].clone(), pt.to_vec()))
                .collect();
            assert_eq!(&got, codes);
        }
        assert_eq!(c.names(), ["a", "b", "c"]);
    }
}
