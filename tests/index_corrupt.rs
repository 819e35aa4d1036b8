//! The index reader against damaged files: thousands of seeded mutations of a valid index
//! (bit flips, overwritten words, truncations, appended garbage) are each refused by
//! `Index::open` with an error, or opened and then read end to end (`Index::scan`) without a
//! panic. The same body runs under cargo-fuzz (`fuzz/fuzz_targets/index_open.rs`).

use gram::index::{self, CodePostings, Index, Product};
use gram::trie::{CodeSet, Trie};

/// A small valid index: 40 codes of 1–4 tokens over 25 products.
fn valid_index(path: &std::path::Path) -> Vec<u8> {
    let mut next = seeded(7);
    let (mut texts, mut tokens, mut offsets) = (Vec::new(), Vec::new(), vec![0]);
    for i in 0..40u32 {
        let n = 1 + next(4) as usize;
        texts.push(format!("c{i}{}", " | x".repeat(n - 1)));
        tokens.push(3 + i);
        tokens.extend((1..n).map(|_| 50 + next(40) as u32));
        offsets.push(tokens.len());
    }
    let set = CodeSet {
        texts,
        tokens,
        offsets,
    };
    let trie = Trie::build(&set, 128, 2).unwrap();
    let postings: Vec<CodePostings> = (0..set.len())
        .map(|c| {
            let mut products: Vec<u32> = (0..25).filter(|_| next(3) == 0).collect();
            products.dedup();
            let n = set.code_tokens(c).len();
            let pt = products
                .iter()
                .map(|_| (0..n).map(|_| (1 + next(999)) as f32 / 1000.0).collect())
                .collect();
            CodePostings { products, pt }
        })
        .collect();
    let products: Vec<Product> = (0..25)
        .map(|i| Product {
            id: format!("p{i}"),
            title: format!("product number {i}"),
        })
        .collect();
    let meta = serde_json::json!({"model": {"fingerprint": "test"}});
    index::write(path, &set, &trie, &postings, &products, " | ", &meta).unwrap();
    std::fs::read(path).unwrap()
}

/// The sections of the container at `path`, as (kind, bytes), in file order.
fn sections_of(path: &std::path::Path) -> Vec<(u32, Vec<u8>)> {
    let c = gram::container::Container::open(path).unwrap();
    c.sections()
        .iter()
        .map(|s| (s.kind, c.section(s.kind).unwrap().1.to_vec()))
        .collect()
}

/// Writes `sections` as a new container at `path`: every checksum holds whatever they hold.
fn write_sections(path: &std::path::Path, sections: &[(u32, Vec<u8>)]) {
    let refs: Vec<(u32, &[u8])> = sections.iter().map(|(k, b)| (*k, b.as_slice())).collect();
    gram::container::Container::write(path, &refs).unwrap();
}

fn seeded(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |m| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m.max(1)
    }
}

#[test]
fn damaged_indexes_are_refused_or_read_safely() {
    let dir = std::env::temp_dir().join(format!("gram-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = valid_index(&dir.join("good.gram"));
    let clean = Index::open(&dir.join("good.gram")).unwrap().scan();
    assert_eq!(
        (clean.codes, clean.products, clean.trie_codes),
        (40, 25, 40)
    );
    assert_eq!(clean.stray_postings + clean.unsorted_lists, 0);

    let mut next = seeded(2026);
    let path = dir.join("bad.gram");
    let (mut refused, mut opened) = (0, 0);
    for round in 0..3000 {
        let mut bytes = good.clone();
        let len = bytes.len() as u64;
        match round % 5 {
            // A few flipped bits anywhere.
            0 | 1 => {
                for _ in 0..1 + next(4) {
                    let at = next(len) as usize;
                    bytes[at] ^= 1 << next(8);
                }
            }
            // A word overwritten with an extreme value (counts, offsets, lengths).
            2 => {
                let at = (next(len / 4) * 4) as usize;
                let v = [0u32, 1, u32::MAX, u32::MAX / 2, 1 << 31][next(5) as usize];
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            // Cut short.
            3 => bytes.truncate(next(len) as usize),
            // Garbage appended or written over the header.
            _ => {
                let n = 1 + next(64) as usize;
                let junk: Vec<u8> = (0..n).map(|_| next(256) as u8).collect();
                if next(2) == 0 {
                    bytes.extend(junk);
                } else {
                    let at = next(64.min(len)) as usize;
                    let end = (at + n).min(bytes.len());
                    bytes[at..end].copy_from_slice(&junk[..end - at]);
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match Index::open(&path) {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(ix) => {
                let _ = ix.container().verify();
                let scan = ix.scan();
                let _ = ix.rank_all();
                assert!(
                    scan.codes <= 40 && scan.products <= 25 + 64,
                    "round {round}"
                );
                opened += 1;
            }
        }
    }
    // Both outcomes happen: the test exercises the checks and the reads.
    assert!(
        refused > 100 && opened > 100,
        "{refused} refused, {opened} opened"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A record section whose length is not a whole number of records (in a file whose checksums
/// all hold: written anew by the container) is refused with a message that says so.
#[test]
fn a_section_of_partial_records_is_named() {
    let dir = std::env::temp_dir().join(format!("gram-slop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.gram");
    valid_index(&good);
    for kind in [index::kind::CODES, index::kind::PRODUCTS] {
        let mut sections = sections_of(&good);
        let (_, bytes) = sections.iter_mut().find(|(k, _)| *k == kind).unwrap();
        bytes.extend([0u8; 3]);
        let len = bytes.len();
        let bad = dir.join(format!("slop-{kind}.gram"));
        write_sections(&bad, &sections);
        let err = match Index::open(&bad) {
            Ok(_) => panic!("section {kind} with 3 bytes over opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!(
                "{}: {len} bytes is not a whole number of",
                gram::index::kind::name(kind)
            )),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A trie whose header counts more codes than it has nodes (each code ends at a node of its
/// own) is refused before the count sizes anything: the file is written anew by the container,
/// so only the trie's own checks stand between the count and an allocation (its checksum is
/// not checked at open).
#[test]
fn a_trie_counting_more_codes_than_nodes_is_refused_by_its_header() {
    let dir = std::env::temp_dir().join(format!("gram-trie-codes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.gram");
    valid_index(&good);
    let mut sections = sections_of(&good);
    let t = sections
        .iter()
        .position(|(k, _)| *k == index::kind::TRIE)
        .unwrap();
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let nodes = word(&sections[t].1, 5);
    assert_eq!(
        word(&sections[t].1, 7),
        40,
        "header word 7 is the code count"
    );
    for codes in [nodes + 1, 0x7FFF_FFFF] {
        sections[t].1[28..32].copy_from_slice(&codes.to_le_bytes());
        let bad = dir.join(format!("codes-{codes}.gram"));
        write_sections(&bad, &sections);
        let err = match Index::open(&bad) {
            Ok(_) => panic!("a trie of {nodes} nodes and {codes} codes opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&format!("trie holds {codes} codes (1..={nodes}")),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A product record pointing outside the product text (in a file whose checksums all hold:
/// written anew by the container) opens (records are checked where read) but fails
/// `check_products`, which an engine runs at open: it would otherwise drop out of a top K.
#[test]
fn an_unreadable_product_record_is_named_by_check_products() {
    let dir = std::env::temp_dir().join(format!("gram-bad-product-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.gram");
    valid_index(&good);
    Index::open(&good).unwrap().check_products().unwrap();
    for (record, field) in [(0usize, 0usize), (24, 8)] {
        let mut sections = sections_of(&good);
        let (_, bytes) = sections
            .iter_mut()
            .find(|(k, _)| *k == index::kind::PRODUCTS)
            .unwrap();
        // Record `record`'s id offset (field 0) or title offset (field 8) past any section.
        let at = 24 * record + field;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let bad = dir.join(format!("bad-product-{record}.gram"));
        write_sections(&bad, &sections);
        let ix = Index::open(&bad).unwrap();
        assert!(ix.product(record as u32).is_none());
        let err = ix.check_products().unwrap_err().to_string();
        assert!(
            err.contains(&format!("product record {record} points outside")),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Damage behind valid checksums: each round changes one section's bytes (bits flipped, a
/// word overwritten with an extreme value, whole records cut off or added) and writes the file
/// anew through the container, so every checksum holds and only the index's own checks stand
/// between the damage and a read (the rounds above mostly meet a checksum first). Each file is
/// refused at open, or opened and then read end to end, checked and ranked without a panic.
#[test]
fn damaged_sections_behind_valid_checksums_are_refused_or_read_safely() {
    let dir = std::env::temp_dir().join(format!("gram-corrupt-sections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.gram");
    valid_index(&good);
    let sections = sections_of(&good);
    let mut next = seeded(77);
    let path = dir.join("bad.gram");
    let (mut refused, mut opened, mut short_products, mut bad_codes) = (0, 0, 0, 0);
    for round in 0..1500 {
        let mut s = sections.clone();
        let which = next(s.len() as u64) as usize;
        // Record sizes: code records 40 bytes, product records 24, the rest words.
        let record = match s[which].0 {
            index::kind::CODES => 40,
            index::kind::PRODUCTS => 24,
            _ => 4,
        };
        let bytes = &mut s[which].1;
        let len = bytes.len() as u64;
        match round % 4 {
            0 => {
                for _ in 0..1 + next(4) {
                    if len > 0 {
                        let at = next(len) as usize;
                        bytes[at] ^= 1 << next(8);
                    }
                }
            }
            1 if len >= 8 => {
                let at = (next(len / 4) * 4) as usize;
                let v = [0u32, 1, u32::MAX, u32::MAX / 2, 1 << 31][next(5) as usize];
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            2 => {
                let cut = (1 + next(3)) as usize * record;
                bytes.truncate(bytes.len().saturating_sub(cut));
            }
            _ => {
                let add: Vec<u8> = (0..record * (1 + next(3) as usize))
                    .map(|_| next(256) as u8)
                    .collect();
                bytes.extend(add);
            }
        }
        write_sections(&path, &s);
        match Index::open(&path) {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(ix) => {
                ix.verify().expect("the container wrote valid checksums");
                let products_ok = ix.check_products().is_ok();
                let codes_ok = ix.check_codes().is_ok();
                short_products += usize::from(!products_ok);
                bad_codes += usize::from(!codes_ok);
                let scan = ix.scan();
                // What the engine's checks at open pass, a search reads whole: no record the
                // deep scan finds unreadable, no posting past the product table.
                if products_ok && codes_ok {
                    assert_eq!(
                        (scan.bad_records, scan.stray_postings),
                        (0, 0),
                        "round {round}: passed the open checks"
                    );
                }
                let _ = ix.rank_all();
                for i in 0..ix.num_products() as u32 + 2 {
                    let _ = ix.product(i);
                }
                assert!(scan.codes <= 40, "round {round}");
                opened += 1;
            }
        }
    }
    assert!(
        refused > 50 && opened > 50 && short_products > 0 && bad_codes > 0,
        "{refused} refused, {opened} opened, {short_products} with unreadable products, \
         {bad_codes} with unreadable codes"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
