//! The same postings in tantivy: one document per product (doc order = product order), a
//! raw-tokenized multi-valued field `codes` with one term `c<code id>` per code the product
//! carries (doc ids only: `IndexRecordOption::Basic`), the stored per-product score as an `f64`
//! fast field `score`, and the product index as a `u64` fast field `pid`. One indexing
//! thread, no merges while indexing, then every segment merged into one.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use tantivy::indexer::NoMergePolicy;
use tantivy::schema::{IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST};
use tantivy::{IndexWriter, TantivyDocument};

use crate::{code_products, dir_size, index_file, memory, posting_ids, secs, stored_score, Result};

pub const CODES: &str = "codes";
pub const SCORE: &str = "score";
pub const PID: &str = "pid";

/// The term of code `c`.
pub fn term_text(c: u32) -> String {
    format!("c{c}")
}

pub fn schema() -> Schema {
    let mut sb = Schema::builder();
    let indexing = TextFieldIndexing::default()
        .set_tokenizer("raw")
        .set_index_option(IndexRecordOption::Basic);
    sb.add_text_field(CODES, TextOptions::default().set_indexing_options(indexing));
    sb.add_f64_field(SCORE, FAST);
    sb.add_u64_field(PID, FAST);
    sb.build()
}

pub fn build(index: &Path, out: &Path, heap: usize) -> Result<String> {
    let start = Instant::now();
    let ix = gram::index::Index::open(&index_file(index))?;
    let ids = posting_ids(&ix)?;
    let (n, c) = (ix.num_products(), ix.num_codes() as u32);
    // Invert code → products into product → codes (counting sort).
    let mut off = vec![0u64; n + 1];
    for code in 0..c {
        for &p in code_products(&ix, ids, code) {
            off[p as usize + 1] += 1;
        }
    }
    for i in 0..n {
        off[i + 1] += off[i];
    }
    let mut fill = off.clone();
    let mut codes_of = vec![0u32; off[n] as usize];
    for code in 0..c {
        for &p in code_products(&ix, ids, code) {
            codes_of[fill[p as usize] as usize] = code;
            fill[p as usize] += 1;
        }
    }
    drop(fill);
    let invert_s = secs(start.elapsed());

    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    let schema = schema();
    let (f_codes, f_score, f_pid) = (
        schema.get_field(CODES)?,
        schema.get_field(SCORE)?,
        schema.get_field(PID)?,
    );
    let tix = tantivy::Index::create_in_dir(out, schema)?;
    let t = Instant::now();
    let mut writer: IndexWriter = tix.writer_with_num_threads(1, heap)?;
    writer.set_merge_policy(Box::new(NoMergePolicy));
    for p in 0..n {
        let mut doc = TantivyDocument::new();
        for &code in &codes_of[off[p] as usize..off[p + 1] as usize] {
            doc.add_text(f_codes, term_text(code));
        }
        doc.add_f64(f_score, stored_score(p as u32));
        doc.add_u64(f_pid, p as u64);
        writer.add_document(doc)?;
    }
    writer.commit()?;
    let index_s = secs(t.elapsed());
    let segments = tix.searchable_segment_ids()?;
    let t = Instant::now();
    if segments.len() > 1 {
        writer.merge(&segments).wait()?;
    }
    writer.wait_merging_threads()?;
    let merge_s = secs(t.elapsed());
    let line = json!({
        "tantivy": {
            "path": out,
            "version": tantivy::version_string(),
            "products": n, "codes": c, "postings": off[n],
            "invert_s": invert_s,
            "index_s": index_s,
            "segments_before_merge": segments.len(),
            "merge_s": merge_s,
            "build_s": secs(start.elapsed()),
            "bytes": dir_size(out),
            "heap_mib": heap >> 20,
            "build_memory": memory(),
        }
    });
    Ok(line.to_string())
}
