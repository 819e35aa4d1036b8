//! The code → posting store: every indexed code (its text, granularity, trie node) and the
//! products that carry it, each with the product-side probability of every token of the code,
//! in one memory-mapped container file (`src/container.rs`, docs/FORMAT.md).
//!
//! Sections: the code trie; the code table (fixed records) and its texts; postings (product
//! ids, ascending within a code); the product-side probabilities as `u16` columns, one per code
//! token over the code's postings (what `score::score_postings` reads); the product table and its
//! texts; and a JSON metadata blob (which model built the index). Opening checks every record
//! against the sections it points into (O(codes + products)), so a lookup cannot go out of
//! bounds; a product id inside a posting list is checked where it is used.

use std::path::Path;

use bytemuck::{Pod, Zeroable};

use crate::container::Container;
use crate::error::{Error, Result};
use crate::score::Postings;
use crate::trie::{CodeSet, Trie};

/// Section kinds.
pub mod kind {
    pub const TRIE: u32 = 1;
    pub const CODES: u32 = 2;
    pub const CODE_TEXT: u32 = 3;
    pub const POSTINGS: u32 = 4;
    pub const PT: u32 = 5;
    pub const PRODUCTS: u32 = 6;
    pub const PRODUCT_TEXT: u32 = 7;
    pub const META: u32 = 8;
}

/// One code's record (40 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct CodeRecord {
    /// Byte range of its text in the code texts.
    pub text_off: u64,
    /// First posting (index into the postings).
    pub post_start: u64,
    /// First probability (index into the probability columns).
    pub pt_start: u64,
    pub text_len: u32,
    pub post_len: u32,
    /// Tokens of the code (without EOS): the number of probability columns.
    pub n_tokens: u16,
    /// Number of attributes (parts joined by the delimiter).
    pub granularity: u16,
    pub reserved: u32,
}

/// One product's record (24 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable, PartialEq, Eq)]
pub struct ProductRecord {
    pub id_off: u64,
    pub title_off: u64,
    pub id_len: u32,
    pub title_len: u32,
}

/// What the builder is given for one code: its product postings (ascending product index) and,
/// per posting, the product-side probability of each code token.
pub struct CodePostings {
    pub products: Vec<u32>,
    /// `products.len()` rows of `n_tokens` probabilities.
    pub pt: Vec<Vec<f32>>,
}

/// A product: external id and title.
pub struct Product {
    pub id: String,
    pub title: String,
}

/// Writes an index: `set` (codes, tokenized) and its trie, `postings[i]` for code `i`, the
/// products, a metadata JSON blob, and each code's granularity (`delimiter` splits it).
pub fn write(
    path: &Path,
    set: &CodeSet,
    trie: &Trie,
    postings: &[CodePostings],
    products: &[Product],
    delimiter: &str,
    meta: &serde_json::Value,
) -> Result<()> {
    let n = set.len();
    if postings.len() != n || trie.num_codes() != n {
        return Err(Error::Input(format!(
            "{n} codes, {} posting lists, a trie of {} codes",
            postings.len(),
            trie.num_codes()
        )));
    }
    let (mut codes, mut code_text) = (Vec::with_capacity(n), Vec::new());
    let (mut ids, mut pt) = (Vec::new(), Vec::<u16>::new());
    for (i, p) in postings.iter().enumerate() {
        let text = set.texts[i].as_bytes();
        let tokens = set.code_tokens(i).len();
        let sorted = p.products.windows(2).all(|w| w[0] < w[1]);
        let in_range = p.products.iter().all(|&x| (x as usize) < products.len());
        let shaped = p.pt.len() == p.products.len() && p.pt.iter().all(|r| r.len() == tokens);
        if !(sorted && in_range && shaped) || tokens > u16::MAX as usize {
            return Err(Error::Input(format!(
                "code {i} ({:?}): postings must be ascending product indices below {} with {tokens} probabilities each",
                set.texts[i],
                products.len()
            )));
        }
        codes.push(CodeRecord {
            text_off: code_text.len() as u64,
            post_start: ids.len() as u64,
            pt_start: pt.len() as u64,
            text_len: text.len() as u32,
            post_len: p.products.len() as u32,
            n_tokens: tokens as u16,
            granularity: set.texts[i].split(delimiter).count().min(u16::MAX as usize) as u16,
            reserved: 0,
        });
        code_text.extend_from_slice(text);
        ids.extend_from_slice(&p.products);
        for t in 0..tokens {
            pt.extend(p.pt.iter().map(|row| crate::score::quantize_pt(row[t])));
        }
    }
    let (mut prods, mut prod_text) = (Vec::with_capacity(products.len()), Vec::new());
    for p in products {
        let id_off = prod_text.len() as u64;
        prod_text.extend_from_slice(p.id.as_bytes());
        let title_off = prod_text.len() as u64;
        prod_text.extend_from_slice(p.title.as_bytes());
        prods.push(ProductRecord {
            id_off,
            title_off,
            id_len: p.id.len() as u32,
            title_len: p.title.len() as u32,
        });
    }
    let meta = serde_json::to_vec(meta).map_err(|e| Error::Input(e.to_string()))?;
    Container::write(
        path,
        &[
            (kind::TRIE, bytemuck::cast_slice(trie.as_words())),
            (kind::CODES, bytemuck::cast_slice(&codes)),
            (kind::CODE_TEXT, &code_text),
            (kind::POSTINGS, bytemuck::cast_slice(&ids)),
            (kind::PT, bytemuck::cast_slice(&pt)),
            (kind::PRODUCTS, bytemuck::cast_slice(&prods)),
            (kind::PRODUCT_TEXT, &prod_text),
            (kind::META, &meta),
        ],
    )
}

/// An opened index.
pub struct Index {
    file: Container,
    trie: Trie,
    meta: serde_json::Value,
}

impl Index {
    /// Maps and checks an index file.
    pub fn open(path: &Path) -> Result<Index> {
        let file = Container::open(path)?;
        let bad = |msg: String| Error::Index {
            path: path.to_path_buf(),
            msg,
        };
        let (trie_sec, _) = file
            .section(kind::TRIE)
            .ok_or_else(|| bad("the trie section is missing".into()))?;
        let trie =
            Trie::from_map(file.map().clone(), trie_sec.offset, trie_sec.len).map_err(bad)?;
        let meta = serde_json::from_slice(file.require(kind::META, "metadata")?)
            .map_err(|e| bad(format!("metadata: {e}")))?;
        let index = Index { file, trie, meta };
        index.check().map_err(bad)?;
        Ok(index)
    }

    fn records<T: Pod>(&self, kind: u32) -> std::result::Result<&[T], String> {
        let bytes = self
            .file
            .section(kind)
            .map(|(_, b)| b)
            .ok_or(format!("section {kind} is missing"))?;
        bytemuck::try_cast_slice(bytes).map_err(|e| format!("section {kind}: {e}"))
    }

    fn check(&self) -> std::result::Result<(), String> {
        let codes: &[CodeRecord] = self.records(kind::CODES)?;
        let text = self.records::<u8>(kind::CODE_TEXT)?.len() as u64;
        let posts = self.records::<u32>(kind::POSTINGS)?.len() as u64;
        let pts = self.records::<u16>(kind::PT)?.len() as u64;
        if codes.len() != self.trie.num_codes() {
            return Err(format!(
                "{} code records for a trie of {} codes",
                codes.len(),
                self.trie.num_codes()
            ));
        }
        for (i, c) in codes.iter().enumerate() {
            let ok = within(c.text_off, c.text_len as u64, text)
                && within(c.post_start, c.post_len as u64, posts)
                && (c.n_tokens as u64)
                    .checked_mul(c.post_len as u64)
                    .is_some_and(|l| within(c.pt_start, l, pts));
            if !ok {
                return Err(format!("code record {i} points outside its sections"));
            }
        }
        let products: &[ProductRecord] = self.records(kind::PRODUCTS)?;
        let ptext = self.records::<u8>(kind::PRODUCT_TEXT)?.len() as u64;
        for (i, p) in products.iter().enumerate() {
            let ok = within(p.id_off, p.id_len as u64, ptext)
                && within(p.title_off, p.title_len as u64, ptext);
            if !ok {
                return Err(format!("product record {i} points outside its section"));
            }
        }
        Ok(())
    }

    pub fn trie(&self) -> &Trie {
        &self.trie
    }

    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    pub fn container(&self) -> &Container {
        &self.file
    }

    fn codes(&self) -> &[CodeRecord] {
        self.records(kind::CODES).expect("checked at open")
    }

    pub fn num_codes(&self) -> usize {
        self.codes().len()
    }

    pub fn num_products(&self) -> usize {
        self.records::<ProductRecord>(kind::PRODUCTS)
            .expect("checked at open")
            .len()
    }

    /// Code `id`'s record, if the index has it.
    pub fn code(&self, id: u32) -> Option<&CodeRecord> {
        self.codes().get(id as usize)
    }

    /// Code `id`'s text (lossy if the file's bytes are not UTF-8).
    pub fn code_text(&self, id: u32) -> Option<std::borrow::Cow<'_, str>> {
        let c = self.code(id)?;
        let text = self.records::<u8>(kind::CODE_TEXT).ok()?;
        let b = &text[c.text_off as usize..(c.text_off + c.text_len as u64) as usize];
        Some(String::from_utf8_lossy(b))
    }

    /// Code `id`'s postings, ready to score with the query side `pq` and weights `w` (one per
    /// code token; `None` when their length is not the code's token count).
    pub fn postings<'a>(&'a self, id: u32, pq: &'a [f32], w: &'a [f32]) -> Option<Postings<'a>> {
        let c = self.code(id)?;
        if pq.len() != c.n_tokens as usize || w.len() != pq.len() {
            return None;
        }
        let ids: &[u32] = self.records(kind::POSTINGS).ok()?;
        let pt: &[u16] = self.records(kind::PT).ok()?;
        let (p0, pl) = (c.post_start as usize, c.post_len as usize);
        let t0 = c.pt_start as usize;
        Some(Postings {
            products: &ids[p0..p0 + pl],
            pt: &pt[t0..t0 + pl * c.n_tokens as usize],
            pq,
            w,
        })
    }

    /// Product `i`'s external id and title (`None` for an id outside the table).
    pub fn product(
        &self,
        i: u32,
    ) -> Option<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
        let p = self
            .records::<ProductRecord>(kind::PRODUCTS)
            .ok()?
            .get(i as usize)?;
        let text = self.records::<u8>(kind::PRODUCT_TEXT).ok()?;
        let s = |off: u64, len: u32| {
            String::from_utf8_lossy(&text[off as usize..(off + len as u64) as usize])
        };
        Some((s(p.id_off, p.id_len), s(p.title_off, p.title_len)))
    }
}

/// `off .. off + len` lies inside `0 .. size` (no overflow).
fn within(off: u64, len: u64, size: u64) -> bool {
    off.checked_add(len).is_some_and(|end| end <= size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(codes: &[(&str, &[u32])]) -> CodeSet {
        let mut tokens = Vec::new();
        let mut offsets = vec![0];
        for (_, t) in codes {
            tokens.extend_from_slice(t);
            offsets.push(tokens.len());
        }
        CodeSet {
            texts: codes.iter().map(|(s, _)| s.to_string()).collect(),
            tokens,
            offsets,
        }
    }

    #[test]
    fn round_trip_reads_back_every_posting_and_probability() {
        let s = set(&[
            ("sofa | velvet", &[5, 6, 7]),
            ("lamp", &[9]),
            ("sofa", &[5, 6]),
        ]);
        let trie = Trie::build(&s, 32, 2).unwrap();
        let products: Vec<Product> = (0..5)
            .map(|i| Product {
                id: format!("sku-{i}"),
                title: format!("Product {i} — ünïcode"),
            })
            .collect();
        let lists = vec![
            CodePostings {
                products: vec![0, 3, 4],
                pt: vec![
                    vec![0.9, 0.5, 0.1],
                    vec![0.2, 0.0, 1.0],
                    vec![0.33, 0.66, 0.99],
                ],
            },
            CodePostings {
                products: vec![],
                pt: vec![],
            },
            CodePostings {
                products: vec![1, 3],
                pt: vec![vec![0.7, 0.25], vec![0.125, 0.5]],
            },
        ];
        let path = std::env::temp_dir().join(format!("gram-index-{}.bin", std::process::id()));
        let meta = serde_json::json!({"model": "tiny", "eos": 2});
        write(&path, &s, &trie, &lists, &products, " | ", &meta).unwrap();
        let ix = Index::open(&path).unwrap();
        ix.container().verify().unwrap();
        assert_eq!(ix.meta(), &meta);
        assert_eq!((ix.num_codes(), ix.num_products()), (3, 5));
        for (i, l) in lists.iter().enumerate() {
            let id = i as u32;
            assert_eq!(ix.code_text(id).unwrap(), s.texts[i]);
            assert_eq!(
                ix.code(id).unwrap().granularity as usize,
                s.texts[i].split(" | ").count()
            );
            let n = s.code_tokens(i).len();
            let (pq, w) = (vec![0.5; n], vec![1.0; n]);
            let p = ix.postings(id, &pq, &w).unwrap();
            assert_eq!(p.products, &l.products[..]);
            for (j, row) in l.pt.iter().enumerate() {
                for (t, &want) in row.iter().enumerate() {
                    let got = p.pt[t * l.products.len() + j] as f32 * crate::score::PT_SCALE;
                    assert!(
                        (got - want).abs() <= 0.5 / 65535.0 + 1e-7,
                        "code {i} row {j} token {t}"
                    );
                }
            }
            assert!(ix.postings(id, &pq[..n - 1], &w[..n - 1]).is_none());
        }
        let (pid, title) = ix.product(4).unwrap();
        assert_eq!(
            (pid.as_ref(), title.as_ref()),
            ("sku-4", "Product 4 — ünïcode")
        );
        assert!(ix.product(5).is_none() && ix.code(3).is_none());
        // The trie inside maps codes to the same ids.
        assert_eq!(
            ix.trie().walk(&[5, 6]).and_then(|n| ix.trie().code(n)),
            Some(2)
        );

        // Corrupt a code record so that it points past the postings: refused at open.
        let c = ix.container().section(kind::CODES).unwrap().0;
        drop(ix);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[c.offset + 8..c.offset + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = Index::open(&path).err().unwrap().to_string();
        assert!(e.contains("code record 0"), "{e}");
        std::fs::remove_file(&path).unwrap();

        // Bad postings are refused at write.
        let mut bad = lists;
        bad[0].products = vec![3, 0, 4];
        assert!(write(&path, &s, &trie, &bad, &products, " | ", &meta).is_err());
    }
}
