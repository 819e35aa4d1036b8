//! The code → posting store: every indexed code (its text, granularity, trie node) and the
//! products that carry it, each with the product-side probability of every token of the code,
//! in one memory-mapped container file (`src/container.rs`, docs/FORMAT.md).
//!
//! Sections: the code trie; the code table (fixed records) and its texts; postings (product
//! ids, ascending within a code); the product-side probabilities as `u16` columns, one per code
//! token over the code's postings (what `score::score_postings` reads); the product table and its
//! texts; and a JSON metadata blob (which model built the index). Opening checks the trie's
//! structure and the sections' shapes, not the 12 million records of a paper-scale index:
//! each record is bounds-checked where it is read (a bad one reads as missing), and a product
//! id inside a posting list where it is used. The section checksums are verified by
//! `Container::verify`, which every engine open runs (`search::Engine::open`) and `gram index
//! inspect` too; [`Index::scan`] reads every record (`inspect --deep`).

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

    /// A section kind as errors name it: `the postings section (kind 4)`.
    pub fn name(kind: u32) -> String {
        let what = match kind {
            TRIE => "trie",
            CODES => "code records",
            CODE_TEXT => "code texts",
            POSTINGS => "postings",
            PT => "product probabilities",
            PRODUCTS => "product records",
            PRODUCT_TEXT => "product texts",
            META => "metadata",
            _ => return format!("section kind {kind}"),
        };
        format!("the {what} section (kind {kind})")
    }
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

/// Every code's postings in flat arrays, laid out as the index file stores them (what
/// [`write_columns`] takes; a catalog of tens of millions of postings fits without a vector per
/// posting):
///
/// - code `i`'s postings are `products[starts[i] .. starts[i + 1]]`, ascending product indices
///   (`starts` has one entry per code plus one, from 0 to `products.len()`);
/// - its product-side probabilities are `n_i` columns of `len_i` values (`n_i` = the code's
///   token count, `len_i` = its posting count), column-major per code, codes one after the
///   other: token `t` of posting `j` is `pt[pt_start_i + t · len_i + j]`, where
///   `pt_start_i = Σ_{k<i} n_k · len_k`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostingColumns {
    pub starts: Vec<u64>,
    pub products: Vec<u32>,
    pub pt: Vec<f32>,
}

impl PostingColumns {
    /// Columns from one [`CodePostings`] per code (rows of probabilities transposed; the caller
    /// has checked every row holds the code's token count).
    pub(crate) fn from_lists(postings: &[CodePostings]) -> PostingColumns {
        let total: usize = postings.iter().map(|p| p.products.len()).sum();
        let values: usize = postings
            .iter()
            .map(|p| p.pt.first().map_or(0, Vec::len) * p.products.len())
            .sum();
        let mut c = PostingColumns {
            starts: Vec::with_capacity(postings.len() + 1),
            products: Vec::with_capacity(total),
            pt: Vec::with_capacity(values),
        };
        c.starts.push(0);
        for p in postings {
            c.products.extend_from_slice(&p.products);
            c.starts.push(c.products.len() as u64);
            for t in 0..p.pt.first().map_or(0, Vec::len) {
                c.pt.extend(p.pt.iter().map(|row| row[t]));
            }
        }
        c
    }
}

/// Writes an index: `set` (codes, tokenized) and its trie, `postings[i]` for code `i`, the
/// products, a metadata JSON blob, and each code's granularity (`delimiter` splits it).
/// The same file as [`write_columns`] over the same postings.
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
    for (i, p) in postings.iter().enumerate() {
        let tokens = set.code_tokens(i).len();
        let shaped = p.pt.len() == p.products.len() && p.pt.iter().all(|r| r.len() == tokens);
        if !shaped || !list_ok(&p.products, products.len()) || tokens > u16::MAX as usize {
            return Err(bad_list(set, i, tokens, products.len()));
        }
    }
    let columns = PostingColumns::from_lists(postings);
    write_columns(path, set, trie, &columns, products, delimiter, meta)
}

/// Postings ascending, below the product count.
fn list_ok(list: &[u32], products: usize) -> bool {
    list.windows(2).all(|w| w[0] < w[1]) && list.iter().all(|&x| (x as usize) < products)
}

fn bad_list(set: &CodeSet, i: usize, tokens: usize, products: usize) -> Error {
    Error::Input(format!(
        "code {i} ({:?}): postings must be ascending product indices below {products} with {tokens} probabilities each",
        set.texts[i]
    ))
}

/// Writes an index from postings in columns (see [`PostingColumns`]); otherwise as [`write`].
pub fn write_columns(
    path: &Path,
    set: &CodeSet,
    trie: &Trie,
    postings: &PostingColumns,
    products: &[Product],
    delimiter: &str,
    meta: &serde_json::Value,
) -> Result<()> {
    let n = set.len();
    let starts = &postings.starts;
    if starts.len() != n + 1 || trie.num_codes() != n {
        return Err(Error::Input(format!(
            "{n} codes, {} posting lists, a trie of {} codes",
            starts.len().saturating_sub(1),
            trie.num_codes()
        )));
    }
    let cut = starts.first() == Some(&0)
        && starts.last() == Some(&(postings.products.len() as u64))
        && starts.windows(2).all(|w| w[0] <= w[1]);
    if !cut {
        return Err(Error::Input(format!(
            "posting starts must grow from 0 to the {} postings",
            postings.products.len()
        )));
    }
    let mut codes = Vec::with_capacity(n);
    let mut code_text = Vec::new();
    let mut pt_len = 0u64;
    for i in 0..n {
        let text = set.texts[i].as_bytes();
        let tokens = set.code_tokens(i).len();
        let (p0, p1) = (starts[i] as usize, starts[i + 1] as usize);
        let list = &postings.products[p0..p1];
        if !list_ok(list, products.len())
            || tokens > u16::MAX as usize
            || list.len() > u32::MAX as usize
        {
            return Err(bad_list(set, i, tokens, products.len()));
        }
        codes.push(CodeRecord {
            text_off: code_text.len() as u64,
            post_start: p0 as u64,
            pt_start: pt_len,
            text_len: text.len() as u32,
            post_len: list.len() as u32,
            n_tokens: tokens as u16,
            granularity: crate::settings::granularity(&set.texts[i], delimiter)
                .min(u16::MAX as usize) as u16,
            reserved: 0,
        });
        code_text.extend_from_slice(text);
        let need = (tokens * list.len()) as u64;
        // The writer's own guard (teacher forcing and beam search already refuse a model's
        // non-finite output): a NaN would quantize to 0 and the index would look sound.
        let pts = postings
            .pt
            .get(pt_len as usize..(pt_len + need) as usize)
            .unwrap_or(&[]);
        if let Some(p) = pts.iter().find(|p| !p.is_finite()) {
            return Err(Error::Input(format!(
                "code `{}`: a product probability is {p} (of {} products): the model's \
                 probabilities are not finite; is its checkpoint corrupt?",
                set.texts[i],
                list.len()
            )));
        }
        pt_len += need;
    }
    if pt_len != postings.pt.len() as u64 {
        return Err(Error::Input(format!(
            "{} product probabilities for codes that need {pt_len}",
            postings.pt.len()
        )));
    }
    let pt: Vec<u16> = postings
        .pt
        .iter()
        .map(|&p| crate::score::quantize_pt(p))
        .collect();
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
            (kind::POSTINGS, bytemuck::cast_slice(&postings.products)),
            (kind::PT, bytemuck::cast_slice(&pt)),
            (kind::PRODUCTS, bytemuck::cast_slice(&prods)),
            (kind::PRODUCT_TEXT, &prod_text),
            (kind::META, &meta),
        ],
    )
}

/// The metadata key under which a build lists the ids of the products it left out.
pub const LEFT_OUT_PRODUCTS: &str = "left_out_products";

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
        let trie = Trie::from_map(
            file.map().clone(),
            trie_sec.offset,
            trie_sec.len,
            crate::trie::Verify::StructureOnly,
        )
        .map_err(bad)?;
        let meta = serde_json::from_slice(file.require(kind::META, "metadata")?)
            .map_err(|e| bad(format!("metadata: {e}")))?;
        let index = Index { file, trie, meta };
        index.check().map_err(bad)?;
        Ok(index)
    }

    /// Section `kind` as records of `T`. On every product and code lookup: the error's text is
    /// made only for an error.
    fn records<T: Pod>(&self, kind: u32) -> std::result::Result<&[T], String> {
        let bytes = self
            .file
            .section(kind)
            .map(|(_, b)| b)
            .ok_or_else(|| format!("{} is missing", kind::name(kind)))?;
        bytemuck::try_cast_slice(bytes).map_err(|e| {
            let section = kind::name(kind);
            let size = std::mem::size_of::<T>();
            match e {
                bytemuck::PodCastError::OutputSliceWouldHaveSlop => format!(
                    "{section}: {} bytes is not a whole number of {size}-byte records",
                    bytes.len()
                ),
                bytemuck::PodCastError::TargetAlignmentGreaterAndInputNotAligned => format!(
                    "{section} is not {}-byte aligned",
                    std::mem::align_of::<T>()
                ),
                e => format!("{section}: {e}"),
            }
        })
    }

    /// What opening proves, in O(1) past the trie: every section is there with whole
    /// records, and there is one code record per trie code. Each record is bounds-checked
    /// where it is read (a bad one reads as missing), so opening a paper-scale index does not
    /// touch its 12 million records.
    fn check(&self) -> std::result::Result<(), String> {
        let codes: &[CodeRecord] = self.records(kind::CODES)?;
        for k in [kind::CODE_TEXT, kind::PRODUCT_TEXT] {
            self.records::<u8>(k)?;
        }
        self.records::<u32>(kind::POSTINGS)?;
        self.records::<u16>(kind::PT)?;
        self.records::<ProductRecord>(kind::PRODUCTS)?;
        if codes.len() != self.trie.num_codes() {
            return Err(format!(
                "{} code records for a trie of {} codes",
                codes.len(),
                self.trie.num_codes()
            ));
        }
        Ok(())
    }

    pub fn trie(&self) -> &Trie {
        &self.trie
    }

    /// The ids of the catalog's products that the build left out (`--on-error skip`: they do
    /// not fit the model, or list a code it cannot emit): in the catalog, never retrievable.
    /// Empty for an index written before the build recorded them.
    pub fn left_out_products(&self) -> impl Iterator<Item = &str> {
        self.meta[LEFT_OUT_PRODUCTS]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
    }

    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    pub fn container(&self) -> &Container {
        &self.file
    }

    /// Checks every section's checksum (reads the whole file); a mismatch names the section
    /// (`the postings section (kind 4) checksum mismatch`).
    pub fn verify(&self) -> Result<()> {
        self.file.verify_named(&kind::name)
    }

    /// Checks that every product record can be read (its id and title inside their section,
    /// as [`Index::product`] reads them), naming the first that cannot. Opening does not (it
    /// is O(products)); an engine does it with [`Index::verify`], which reads the whole file
    /// anyway: a top-K product whose record cannot be read would otherwise drop out of an
    /// answer, leaving fewer than K where lower-ranked products could fill in.
    pub fn check_products(&self) -> Result<()> {
        let bad = (0..self.num_products() as u32).find(|&i| self.product(i).is_none());
        match bad {
            None => Ok(()),
            Some(i) => Err(Error::Index {
                path: self.file.path().to_path_buf(),
                msg: format!("product record {i} points outside the product text section"),
            }),
        }
    }

    /// Every code record readable as a search reads it (at least one token; its text and its
    /// postings inside their sections, every posting a product of the table) and every code the
    /// trie ends naming a record whose token count is the node's depth. `open`'s checks are
    /// O(1) and the checksums only say the bytes are the ones written: a record that fails
    /// here would drop its code, or a product, from every answer without a word (a forged or
    /// mis-written file; `gram index inspect --deep` counts them all).
    pub fn check_codes(&self) -> Result<()> {
        let bad = |msg: String| Error::Index {
            path: self.file.path().to_path_buf(),
            msg,
        };
        let text = self.records::<u8>(kind::CODE_TEXT).map_err(&bad)?;
        let ids: &[u32] = self.records(kind::POSTINGS).map_err(&bad)?;
        let pt: &[u16] = self.records(kind::PT).map_err(&bad)?;
        let products = self.num_products() as u32;
        if let Some(at) = ids.iter().position(|&p| p >= products) {
            return Err(bad(format!(
                "posting {at} names product {}, past the {products} of the table",
                ids[at]
            )));
        }
        // Each code's depth in the trie, from one pass over the nodes (4 bytes a code, written
        // where the trie ends it), then one sequential pass over the records: reading each
        // terminal node's record instead is a random read of the code table a code (~2.5 M
        // misses at the paper's scale).
        let mut code_depth = vec![u32::MAX; self.num_codes()];
        for (node, &d) in self.node_depths().iter().enumerate() {
            if let Some(code) = self.trie.code(node as u32) {
                *code_depth
                    .get_mut(code as usize)
                    .ok_or_else(|| bad(format!("the trie ends code {code}, past the table")))? = d;
            }
        }
        let inside =
            |start: u64, len: u64, of: usize| range(start, len).is_some_and(|r| r.end <= of);
        for (id, c) in self.codes().iter().enumerate() {
            let n_pt = (c.n_tokens as u64).checked_mul(c.post_len as u64);
            if c.n_tokens == 0
                || !inside(c.text_off, c.text_len as u64, text.len())
                || !inside(c.post_start, c.post_len as u64, ids.len())
                || !n_pt.is_some_and(|n| inside(c.pt_start, n, pt.len()))
            {
                return Err(bad(format!(
                    "code record {id} has no token or points outside its sections"
                )));
            }
            let d = code_depth[id];
            if d != u32::MAX && c.n_tokens as u32 != d {
                return Err(bad(format!(
                    "code {id} has {} tokens where the trie spells {d}",
                    c.n_tokens
                )));
            }
        }
        Ok(())
    }

    /// Each trie node's depth (breadth first: a parent's is known before its children's): the
    /// token count of the code a terminal node ends, as the query side generates it.
    fn node_depths(&self) -> Vec<u32> {
        let (start, _, child, _) = self.trie.csr();
        let mut depth = vec![0u32; self.trie.num_nodes()];
        for n in 0..depth.len() {
            for e in start[n] as usize..start[n + 1] as usize {
                depth[child[e] as usize] = depth[n] + 1;
            }
        }
        depth
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

    /// Code `id`'s text (lossy if the file's bytes are not UTF-8); `None` for an id outside
    /// the table or a record pointing outside its section.
    pub fn code_text(&self, id: u32) -> Option<std::borrow::Cow<'_, str>> {
        let c = self.code(id)?;
        let text = self.records::<u8>(kind::CODE_TEXT).ok()?;
        let b = text.get(range(c.text_off, c.text_len as u64)?)?;
        Some(utf8(b))
    }

    /// Code `id`'s postings, ready to score with the query side `pq` and weights `w` (one per
    /// code token; `None` when their length is not the code's token count, the record counts
    /// no token (no code is empty: such a record is damage, and would score every product of
    /// its list by the prior alone), or it points outside its sections), with no code prior
    /// (set [`Postings::prior`] for one).
    pub fn postings<'a>(&'a self, id: u32, pq: &'a [f32], w: &'a [f32]) -> Option<Postings<'a>> {
        let c = self.code(id)?;
        if c.n_tokens == 0 || pq.len() != c.n_tokens as usize || w.len() != pq.len() {
            return None;
        }
        let ids: &[u32] = self.records(kind::POSTINGS).ok()?;
        let pt: &[u16] = self.records(kind::PT).ok()?;
        let n_pt = (c.n_tokens as u64).checked_mul(c.post_len as u64)?;
        Some(Postings {
            products: ids.get(range(c.post_start, c.post_len as u64)?)?,
            pt: pt.get(range(c.pt_start, n_pt)?)?,
            pq,
            w,
            prior: 0.0,
        })
    }

    /// Starts loading product `i`'s record into the cache (see [`Index::prefetch_product_text`]);
    /// nothing for an id outside the table.
    pub fn prefetch_product_record(&self, i: u32) {
        if let Some(p) = self
            .records::<ProductRecord>(kind::PRODUCTS)
            .ok()
            .and_then(|r| r.get(i as usize))
        {
            prefetch(p);
        }
    }

    /// Starts loading the first bytes of product `i`'s id and title (reads its record: prefetch
    /// that a while before). Reading the answer's products one by one waits on two cache misses
    /// each (record, text: random places in a mapped file); a few products ahead, the loads
    /// overlap.
    pub fn prefetch_product_text(&self, i: u32) {
        let (Some(p), Ok(text)) = (
            self.records::<ProductRecord>(kind::PRODUCTS)
                .ok()
                .and_then(|r| r.get(i as usize)),
            self.records::<u8>(kind::PRODUCT_TEXT),
        ) else {
            return;
        };
        for off in [p.id_off, p.title_off] {
            if let Some(b) = usize::try_from(off).ok().and_then(|o| text.get(o)) {
                prefetch(b);
            }
        }
    }

    /// Product `i`'s external id and title (`None` for an id outside the table, or a record
    /// pointing outside its section).
    pub fn product(
        &self,
        i: u32,
    ) -> Option<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
        let p = self
            .records::<ProductRecord>(kind::PRODUCTS)
            .ok()?
            .get(i as usize)?;
        let text = self.records::<u8>(kind::PRODUCT_TEXT).ok()?;
        let id = text.get(range(p.id_off, p.id_len as u64)?)?;
        let title = text.get(range(p.title_off, p.title_len as u64)?)?;
        Some((utf8(id), utf8(title)))
    }

    /// Reads every record the way a search does — each code's text, trie path and postings
    /// (scored), each product — and counts what it finds. A deep check beyond the checksums
    /// (`gram index inspect --deep`), and what the fuzz target drives: on any file `open`
    /// accepted, it must not panic.
    pub fn scan(&self) -> Scan {
        let mut scan = Scan::default();
        let isa = crate::backend::cpu::simd::Isa::detect();
        let products = self.num_products() as u32;
        let mut scores = Vec::new();
        for id in 0..self.num_codes() as u32 {
            let c = *self.code(id).expect("id < num_codes");
            scan.codes += 1;
            match self.code_text(id) {
                Some(t) => scan.code_bytes += t.len(),
                None => scan.bad_records += 1,
            }
            let n = c.n_tokens as usize;
            let (pq, w) = (vec![0.5; n], vec![-1.0; n]);
            let Some(p) = self.postings(id, &pq, &w) else {
                scan.bad_records += 1;
                continue;
            };
            scan.postings += p.products.len();
            scan.longest_list = scan.longest_list.max(p.products.len());
            scan.stray_postings += p.products.iter().filter(|&&x| x >= products).count();
            scan.unsorted_lists += usize::from(!p.products.windows(2).all(|w| w[0] < w[1]));
            scores.clear();
            scores.resize(p.products.len(), 0.0);
            crate::score::score_postings(isa, p.pq, p.w, p.pt, &mut scores);
            scan.non_finite_scores += scores.iter().filter(|s| !s.is_finite()).count();
        }
        // A code record whose token count is not the depth of its trie node is unsearchable:
        // the query side has the trie path's length, `postings` then refuses the record.
        let depth = self.node_depths();
        for node in 0..self.trie.num_nodes() as u32 {
            if let Some(code) = self.trie.code(node) {
                if let Some(c) = self.code(code) {
                    scan.trie_codes += 1;
                    if c.n_tokens as u32 != depth[node as usize] {
                        scan.bad_records += 1;
                    }
                } else {
                    // A trie node naming a code past the code table: a bad record too.
                    scan.bad_records += 1;
                }
            }
        }
        for i in 0..products {
            match self.product(i) {
                Some((id, title)) => {
                    scan.products += 1;
                    scan.product_bytes += id.len() + title.len();
                }
                None => scan.bad_records += 1,
            }
        }
        scan
    }
}

impl Index {
    /// Ranks every code's postings the way a search does — groups of ten consecutive codes,
    /// under `max` and `sum`, with a small `k` (the threshold passes and the shared gather) and
    /// one past [`THRESHOLD_MAX_K`](crate::score::THRESHOLD_MAX_K) (the block merge) — and
    /// returns how many hits came back. What the fuzz target and the corruption tests drive
    /// past [`Index::scan`]: a list with stray product ids or out of order must be ranked
    /// without a panic.
    pub fn rank_all(&self) -> usize {
        use crate::score::{Aggregate, Ranker, THRESHOLD_MAX_K};
        let isa = crate::backend::cpu::simd::Isa::detect();
        let products = self.num_products() as u32;
        let sides: Vec<(u32, Vec<f32>, Vec<f32>)> = (0..self.num_codes() as u32)
            .filter_map(|id| {
                let n = self.code(id)?.n_tokens as usize;
                Some((id, vec![0.5; n], vec![-1.0; n]))
            })
            .collect();
        let mut ranker = Ranker::new();
        let mut hits = 0;
        for group in sides.chunks(10) {
            let lists: Vec<_> = group
                .iter()
                .filter_map(|(id, pq, w)| self.postings(*id, pq, w))
                .collect();
            for aggregate in [Aggregate::Max, Aggregate::Sum] {
                for k in [3, THRESHOLD_MAX_K + 1] {
                    hits += ranker.rank(isa, &lists, aggregate, k, products).len();
                }
            }
        }
        hits
    }
}

/// What [`Index::scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Scan {
    pub codes: usize,
    pub code_bytes: usize,
    pub postings: usize,
    pub longest_list: usize,
    /// Postings naming a product past the product table (ignored by search).
    pub stray_postings: usize,
    /// Code or product records pointing outside their sections (read as missing), code
    /// records whose `n_tokens` is not the depth of their trie node (never scored), and trie
    /// nodes naming a code past the code table.
    pub bad_records: usize,
    /// Posting lists not strictly ascending.
    pub unsorted_lists: usize,
    pub non_finite_scores: usize,
    /// Trie nodes ending a code of the code table.
    pub trie_codes: usize,
    pub products: usize,
    pub product_bytes: usize,
}

/// `off .. off + len` as a slice range (`None` on overflow).
fn range(off: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(off).ok()?;
    Some(start..start.checked_add(usize::try_from(len).ok()?)?)
}

/// Asks the CPU to bring `x`'s cache line in, without waiting for it.
#[inline(always)]
pub(crate) fn prefetch<T: ?Sized>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it cannot fault and changes nothing the program reads.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(x as *const T as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Text stored in the file: borrowed when it is UTF-8 (`str::from_utf8`'s check, the fast
/// one), else lossy (`String::from_utf8_lossy`, which walks the bytes chunk by chunk).
fn utf8(b: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
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

        // Corrupt a code record so that it points past the postings: it reads as missing,
        // `scan` counts it, the checksums catch it.
        let c = ix.container().section(kind::CODES).unwrap().0;
        drop(ix);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[c.offset + 8..c.offset + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let ix = Index::open(&path).unwrap();
        let n = ix.code(0).unwrap().n_tokens as usize;
        assert!(ix.postings(0, &vec![0.5; n], &vec![1.0; n]).is_none());
        assert!(ix.code_text(0).is_some(), "its text is still in range");
        assert_eq!(ix.scan().bad_records, 1);
        assert!(ix.container().verify().is_err());
        drop(ix);

        // A code record whose token count is not its trie path's depth passed the deep scan
        // and could never be found (the query side has the path's length): a bad record.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[c.offset + 8..c.offset + 16].copy_from_slice(&0u64.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Index::open(&path).unwrap().scan().bad_records, 0);
        let n_tokens = c.offset + 2 * 40 + 32; // code 2 ("sofa", 2 tokens)
        bytes[n_tokens..n_tokens + 2].copy_from_slice(&1u16.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let ix = Index::open(&path).unwrap();
        assert_eq!(ix.code(2).unwrap().n_tokens, 1);
        assert!(
            ix.postings(2, &[0.5], &[1.0]).is_some(),
            "it reads as 1 token"
        );
        assert_eq!(ix.scan().bad_records, 1);
        drop(ix);
        // One that counts no token is refused outright: an empty query side would score every
        // product of its list by the prior alone. The deep scan counts it twice (no postings,
        // and not its node's depth).
        bytes[n_tokens..n_tokens + 2].copy_from_slice(&0u16.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let ix = Index::open(&path).unwrap();
        assert!(ix.postings(2, &[], &[]).is_none());
        assert_eq!(ix.scan().bad_records, 2);
        drop(ix);
        std::fs::remove_file(&path).unwrap();

        // Bad postings are refused at write.
        let mut bad = lists;
        bad[0].products = vec![3, 0, 4];
        assert!(write(&path, &s, &trie, &bad, &products, " | ", &meta).is_err());
    }

    /// `write` and `write_columns` over the same postings (random shapes, empty lists, one
    /// product) give byte-identical files; `write_columns` refuses a bad cut or a short `pt`.
    #[test]
    fn write_and_write_columns_give_the_same_bytes() {
        let mut next = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let n_products = 50usize;
        let mut codes: Vec<(String, Vec<u32>)> = Vec::new();
        for i in 0..40u32 {
            let parts = 1 + (next() % 4) as usize;
            let text = (0..parts)
                .map(|p| format!("a{i}x{p}"))
                .collect::<Vec<_>>()
                .join(" | ");
            let len = 1 + (next() % 6) as usize;
            let mut toks = vec![1 + i];
            toks.extend((1..len).map(|_| 1 + (next() % 60) as u32));
            codes.push((text, toks));
        }
        let refs: Vec<(&str, &[u32])> = codes.iter().map(|(t, k)| (t.as_str(), &k[..])).collect();
        let s = set(&refs);
        let trie = Trie::build(&s, 64, 0).unwrap();
        let lists: Vec<CodePostings> = (0..s.len())
            .map(|i| {
                let mut products: Vec<u32> = (0..next() % 30)
                    .map(|_| (next() % n_products as u64) as u32)
                    .collect();
                if i % 7 == 0 {
                    products.clear();
                }
                products.sort_unstable();
                products.dedup();
                let n = s.code_tokens(i).len();
                let pt = products
                    .iter()
                    .map(|_| (0..n).map(|_| (next() % 1001) as f32 / 1000.0).collect())
                    .collect();
                CodePostings { products, pt }
            })
            .collect();
        let products: Vec<Product> = (0..n_products)
            .map(|i| Product {
                id: format!("p{i}"),
                title: if i % 3 == 0 {
                    String::new()
                } else {
                    format!("title {i}")
                },
            })
            .collect();
        let meta = serde_json::json!({"model": "synthetic"});
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let (a, b) = (
            dir.join(format!("gram-write-rows-{pid}.bin")),
            dir.join(format!("gram-write-cols-{pid}.bin")),
        );
        write(&a, &s, &trie, &lists, &products, " | ", &meta).unwrap();
        let mut cols = PostingColumns::default();
        cols.starts.push(0);
        for l in &lists {
            cols.products.extend_from_slice(&l.products);
            cols.starts.push(cols.products.len() as u64);
            let n = l.pt.first().map_or(0, Vec::len);
            for t in 0..n {
                cols.pt.extend(l.pt.iter().map(|r| r[t]));
            }
        }
        assert_eq!(cols, PostingColumns::from_lists(&lists));
        write_columns(&b, &s, &trie, &cols, &products, " | ", &meta).unwrap();
        let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(ba == bb, "write and write_columns differ");
        Index::open(&b).unwrap().container().verify().unwrap();

        let mut short = cols.clone();
        short.pt.pop();
        assert!(write_columns(&b, &s, &trie, &short, &products, " | ", &meta).is_err());
        let mut uncut = cols.clone();
        uncut.starts[3] = uncut.products.len() as u64 + 1;
        assert!(write_columns(&b, &s, &trie, &uncut, &products, " | ", &meta).is_err());
        let mut unsorted = cols;
        let c = (0..s.len())
            .find(|&i| lists[i].products.len() >= 2)
            .unwrap();
        let p0 = unsorted.starts[c] as usize;
        unsorted.products.swap(p0, p0 + 1);
        let e = write_columns(&b, &s, &trie, &unsorted, &products, " | ", &meta)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&format!("code {c} ")), "{e}");
        std::fs::remove_file(&a).unwrap();
        std::fs::remove_file(&b).unwrap();
    }
}
