//! The synthetic index: codes, posting lists, product probabilities, products.
//!
//! **Codes** are attribute paths like `c123 | a4 | b7 | d9 | e2` (granularity 1–5), grown as a
//! tree: every code of granularity g > 1 extends a random code of granularity g − 1 by one
//! attribute value, so codes share prefixes the way `sofa`, `sofa | velvet` do and the trie has
//! real depth. Shares of granularity 1..5: 2 %, 13 %, 30 %, 30 %, 25 %. Each attribute value is
//! one or two tokens from its level's own token range (prefix-free, so distinct texts give
//! distinct token sequences), 1–8 tokens per code, vocabulary 49,152, EOS 0 never inside a code.
//!
//! **Posting lists** have Zipf-like lengths: the code of rank r gets ∝ (r + 1)^-s postings
//! (s = 0.8 by default; at paper scale the longest list has ~650 k postings, ten have 100 k+,
//! the median code ~9), at least 1, summing exactly to the requested total; ranks go to coarse
//! codes first (granularity 1 codes hold the long lists), random within a granularity. Products
//! are uniform, distinct and ascending within a list; every product-side probability is
//! uniform in (0, 1). Each code's list comes from its own seed, so the output does not depend
//! on the thread count.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use gram::index::{self, PostingColumns, Product};
use gram::trie::{CodeSet, Trie};
use rayon::prelude::*;
use serde_json::json;

use crate::{index_file, memory, mix, ms, secs, Result, Rng};

pub const VOCAB: usize = 49_152;
pub const EOS: u32 = 0;
const SHARES: [f64; 5] = [0.02, 0.13, 0.30, 0.30, 0.25];
/// Attribute values per level (granularity 1 is the category: its own count).
const VALUES: [u32; 5] = [0, 8_000, 8_000, 10_000, 10_000];
const LETTERS: [&str; 5] = ["c", "a", "b", "d", "e"];
/// Most categories the level-1 token ranges encode.
const MAX_CATEGORIES: usize = 8_000 + 1_000 * 200;

pub struct Params {
    pub products: usize,
    pub codes: usize,
    pub postings: usize,
    pub out: PathBuf,
    pub seed: u64,
    pub zipf: f64,
}

/// Tokens of attribute value `v` at `level` (1..=5); ranges are disjoint across levels and
/// each level's encoding is prefix-free.
fn encode(level: usize, v: u32, out: &mut Vec<u32>) {
    match level {
        1 if v < 8_000 => out.push(1 + v),
        1 => {
            let k = v - 8_000;
            out.extend([8_001 + k / 200, 9_001 + k % 200]);
        }
        2 | 3 => {
            let base = if level == 2 { 10_001 } else { 17_001 };
            if v < 5_000 {
                out.push(base + v);
            } else {
                let k = v - 5_000;
                out.extend([base + 5_000 + k / 100, base + 6_000 + k % 100]);
            }
        }
        4 => out.push(24_001 + v),
        _ => out.push(34_001 + v),
    }
}

/// The code set and each code's granularity.
pub fn codes(n: usize, rng: &mut Rng) -> Result<(CodeSet, Vec<u8>)> {
    let mut counts = [0usize; 5];
    counts[0] = ((n as f64 * SHARES[0]).round() as usize).clamp(1, n);
    let mut left = n - counts[0];
    for g in 1..5 {
        counts[g] = if g == 4 {
            left
        } else {
            ((n as f64 * SHARES[g]).round() as usize).min(left)
        };
        left -= counts[g];
    }
    if counts[0] > MAX_CATEGORIES {
        return Err(format!("{} categories; at most {MAX_CATEGORIES}", counts[0]).into());
    }
    let mut set = CodeSet {
        texts: Vec::with_capacity(n),
        tokens: Vec::with_capacity(n * 5),
        offsets: Vec::with_capacity(n + 1),
    };
    set.offsets.push(0);
    let mut gran = Vec::with_capacity(n);
    for c in 0..counts[0] as u32 {
        set.texts.push(format!("c{c}"));
        encode(1, c, &mut set.tokens);
        set.offsets.push(set.tokens.len());
        gran.push(1);
    }
    let mut level_start = 0;
    let mut taken: HashSet<u64> = HashSet::with_capacity(n);
    for g in 1..5 {
        let (parents_lo, parents_hi) = (level_start, set.texts.len());
        level_start = parents_hi;
        let parents = (parents_hi - parents_lo) as u64;
        if parents == 0 && counts[g] > 0 {
            return Err("too few codes for the granularity levels".into());
        }
        let mut made = 0;
        let mut tries = 0u64;
        while made < counts[g] {
            tries += 1;
            if tries > 100 * counts[g] as u64 + 1_000 {
                return Err(
                    format!("cannot draw {} distinct level-{} codes", counts[g], g + 1).into(),
                );
            }
            let p = parents_lo + rng.below(parents) as usize;
            let v = rng.below(VALUES[g] as u64) as u32;
            if !taken.insert(((p as u64) << 32) | v as u64) {
                continue;
            }
            let text = format!("{} | {}{v}", set.texts[p], LETTERS[g]);
            set.texts.push(text);
            let (a, b) = (set.offsets[p], set.offsets[p + 1]);
            set.tokens.extend_from_within(a..b);
            encode(g + 1, v, &mut set.tokens);
            set.offsets.push(set.tokens.len());
            gran.push(g as u8 + 1);
            made += 1;
        }
    }
    Ok((set, gran))
}

/// Posting-list length of every code (by code id): Zipf over ranks, coarse codes first.
pub fn lengths(
    gran: &[u8],
    postings: usize,
    products: usize,
    s: f64,
    rng: &mut Rng,
) -> Result<Vec<u32>> {
    let n = gran.len();
    if postings < n
        || postings as u128 > n as u128 * products as u128
        || products > u32::MAX as usize
    {
        return Err(format!(
            "{postings} postings for {n} codes of at most {products} products each (at least 1)"
        )
        .into());
    }
    let mut order: Vec<(u8, u64, u32)> = (0..n)
        .map(|i| (gran[i], rng.next_u64(), i as u32))
        .collect();
    order.sort_unstable();
    let weights: Vec<f64> = (0..n).map(|r| ((r + 1) as f64).powf(-s)).collect();
    let total: f64 = weights.iter().sum();
    let cap = products as u64;
    let mut len: Vec<u64> = weights
        .iter()
        .map(|w| ((postings as f64 * w / total).floor() as u64).clamp(1, cap))
        .collect();
    let mut diff = postings as i64 - len.iter().sum::<u64>() as i64;
    // Top up the longest lists first (or trim them), one posting a pass.
    while diff != 0 {
        for l in len.iter_mut() {
            if diff > 0 && *l < cap {
                *l += 1;
                diff -= 1;
            } else if diff < 0 && *l > 1 {
                *l -= 1;
                diff += 1;
            }
            if diff == 0 {
                break;
            }
        }
    }
    let mut by_code = vec![0u32; n];
    for (r, &(_, _, c)) in order.iter().enumerate() {
        by_code[c as usize] = len[r] as u32;
    }
    Ok(by_code)
}

/// `out.len()` distinct product indices below `n`, ascending.
fn sample_sorted(rng: &mut Rng, n: u32, out: &mut [u32]) {
    let l = out.len();
    if l as u64 * 3 > n as u64 {
        // Dense: selection sampling (Knuth's algorithm S).
        let mut need = l;
        let mut j = 0;
        for x in 0..n {
            if need == 0 {
                break;
            }
            if rng.below((n - x) as u64) < need as u64 {
                out[j] = x;
                j += 1;
                need -= 1;
            }
        }
        return;
    }
    let mut v: Vec<u32> = (0..l).map(|_| rng.below(n as u64) as u32).collect();
    loop {
        v.sort_unstable();
        v.dedup();
        if v.len() == l {
            break;
        }
        while v.len() < l {
            v.push(rng.below(n as u64) as u32);
        }
    }
    out.copy_from_slice(&v);
}

/// Every code's postings and probabilities, in the index's columnar layout.
pub fn postings(set: &CodeSet, len: &[u32], products: usize, seed: u64) -> PostingColumns {
    let n = len.len();
    let mut starts = Vec::with_capacity(n + 1);
    starts.push(0u64);
    let mut pt_len = 0usize;
    for (i, &l) in len.iter().enumerate() {
        starts.push(starts[i] + l as u64);
        pt_len += l as usize * set.code_tokens(i).len();
    }
    let mut ids = vec![0u32; starts[n] as usize];
    let mut pt = vec![0f32; pt_len];
    let mut parts: Vec<(usize, &mut [u32], &mut [f32])> = Vec::with_capacity(n);
    let (mut rest_ids, mut rest_pt) = (&mut ids[..], &mut pt[..]);
    for (i, &l) in len.iter().enumerate() {
        let (a, b) = std::mem::take(&mut rest_ids).split_at_mut(l as usize);
        let (c, d) =
            std::mem::take(&mut rest_pt).split_at_mut(l as usize * set.code_tokens(i).len());
        parts.push((i, a, c));
        rest_ids = b;
        rest_pt = d;
    }
    parts.par_iter_mut().for_each(|(i, list, pt)| {
        let mut rng = Rng::new(seed ^ mix(*i as u64 + 1));
        sample_sorted(&mut rng, products as u32, list);
        for p in pt.iter_mut() {
            *p = rng.unit();
        }
    });
    drop(parts);
    PostingColumns {
        starts,
        products: ids,
        pt,
    }
}

pub fn run(p: &Params) -> Result<String> {
    let start = Instant::now();
    std::fs::create_dir_all(&p.out)?;
    let path = index_file(&p.out);
    let mut rng = Rng::new(p.seed);
    let t = Instant::now();
    let (set, gran) = codes(p.codes, &mut rng)?;
    let codes_s = secs(t.elapsed());
    let t = Instant::now();
    let trie = Trie::build(&set, VOCAB, EOS)?;
    let trie_s = secs(t.elapsed());
    let t = Instant::now();
    let len = lengths(&gran, p.postings, p.products, p.zipf, &mut rng)?;
    let cols = postings(&set, &len, p.products, p.seed);
    let postings_s = secs(t.elapsed());
    let t = Instant::now();
    let products: Vec<Product> = (0..p.products)
        .map(|i| Product {
            id: format!("sku{i:08}"),
            title: format!("synthetic product {i}"),
        })
        .collect();
    let products_s = secs(t.elapsed());
    let meta = json!({
        "synthetic": {
            "products": p.products, "codes": p.codes, "postings": p.postings,
            "seed": p.seed, "zipf": p.zipf, "vocab": VOCAB, "eos": EOS,
        }
    });
    let t = Instant::now();
    index::write_columns(&path, &set, &trie, &cols, &products, " | ", &meta)?;
    let write_s = secs(t.elapsed());
    let build_s = secs(start.elapsed());
    let build_memory = memory();

    let mut sorted = len.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let pt_values = cols.pt.len();
    let max_tokens = (0..set.len())
        .map(|i| set.code_tokens(i).len())
        .max()
        .unwrap_or(0);
    let mean_tokens = set.tokens.len() as f64 / set.len() as f64;
    let granularity: Vec<usize> = (1..=5)
        .map(|g| gran.iter().filter(|&&x| x == g).count())
        .collect();
    drop((set, trie, cols, products, len));

    let size = std::fs::metadata(&path)?.len();
    let t = Instant::now();
    let ix = gram::index::Index::open(&path)?;
    let open = t.elapsed();
    let sections: serde_json::Map<String, serde_json::Value> = ix
        .container()
        .sections()
        .iter()
        .map(|s| (s.kind.to_string(), json!(s.len)))
        .collect();
    let line = json!({
        "synth": {
            "path": path, "products": p.products, "codes": p.codes, "postings": p.postings,
            "seed": p.seed, "zipf": p.zipf,
            "build_s": build_s,
            "phases_s": {"codes": codes_s, "trie": trie_s, "postings": postings_s,
                         "products": products_s, "write": write_s},
            "file_bytes": size,
            "section_bytes": sections,
            "trie_nodes": ix.trie().num_nodes(), "trie_max_len": ix.trie().max_len(),
            "code_tokens": {"mean": (mean_tokens * 100.0).round() / 100.0, "max": max_tokens},
            "granularity_counts": granularity,
            "pt_values": pt_values,
            "list_lengths": {
                "max": sorted[0], "p99_code": sorted[sorted.len() / 100], "median": sorted[sorted.len() / 2],
                "at_least_100k": sorted.iter().filter(|&&l| l >= 100_000).count(),
                "at_least_10k": sorted.iter().filter(|&&l| l >= 10_000).count(),
            },
            "build_memory": build_memory,
            "open_ms_after_build": ms(open),
        }
    });
    std::fs::write(p.out.join("synth.json"), format!("{line}\n"))?;
    Ok(line.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_tree_shaped_and_within_bounds() {
        let (set, gran) = codes(5_000, &mut Rng::new(3)).unwrap();
        assert_eq!(set.len(), 5_000);
        let trie = Trie::build(&set, VOCAB, EOS).unwrap(); // refuses duplicates and EOS
        assert!(trie.max_len() <= 8);
        for (i, &g) in gran.iter().enumerate() {
            let t = set.code_tokens(i);
            assert!(!t.is_empty() && t.len() <= 8);
            assert_eq!(set.texts[i].split(" | ").count(), g as usize);
            // Every parent prefix is itself a code.
            if g > 1 {
                let parent = set.texts[i].rsplit_once(" | ").unwrap().0;
                assert!(set.texts.iter().any(|t| t == parent));
            }
        }
    }

    #[test]
    fn lengths_sum_exactly_and_postings_are_sorted_and_deterministic() {
        let mut rng = Rng::new(5);
        let (set, gran) = codes(2_000, &mut rng).unwrap();
        let len = lengths(&gran, 50_000, 3_000, 0.8, &mut rng).unwrap();
        assert_eq!(len.iter().map(|&l| l as u64).sum::<u64>(), 50_000);
        assert!(len.iter().all(|&l| (1..=3_000).contains(&l)));
        let a = postings(&set, &len, 3_000, 9);
        let b = postings(&set, &len, 3_000, 9);
        assert_eq!(a, b);
        for (i, &n) in len.iter().enumerate() {
            let l = &a.products[a.starts[i] as usize..a.starts[i + 1] as usize];
            assert_eq!(l.len(), n as usize);
            assert!(l.windows(2).all(|w| w[0] < w[1]) && l.iter().all(|&p| p < 3_000));
        }
        assert!(a.pt.iter().all(|&p| p > 0.0 && p < 1.0));
        // Dense sampling too.
        let mut out = vec![0; 900];
        sample_sorted(&mut Rng::new(1), 1_000, &mut out);
        assert!(out.windows(2).all(|w| w[0] < w[1]) && out[899] < 1_000);
    }
}
