//! `gram eval`: retrieval quality of an index on graded human judgements, through the engine.
//!
//! Every judged query runs through [`Engine::search`] (the query template of `gram.json` applied
//! by [`Engine::prepare`], `k` products, `beam` codes), in batches sharing decoder steps, and its
//! ranking is scored against the query's grades. The metrics mirror `tools/train/metrics.py`
//! exactly (the Python numbers of `docs/QUALITY.md` are these):
//!
//! - **relevant** = grade ≥ [`REL`] (2);
//! - **unjudged products count as not relevant** for nDCG and recall (gain 0, never in the
//!   relevant set: the standard, pessimistic reading of a shallow pool), and are left out of
//!   the relevance rate, measured among the *judged* products of the top 300 only;
//! - [`ndcg`]@10: gain 2^grade − 1, discount log2(rank + 1), the ideal ranking every judged
//!   product ordered by grade; undefined (`None`) when no product has a positive ideal gain;
//! - [`recall`]@10/100/300: |top k ∩ relevant| / |relevant|; undefined with nothing relevant;
//! - [`relevance_rate`]@300: share of grade ≥ 2 among the judged products of the top 300;
//!   undefined when none of them is judged;
//! - [`judged_at`]@10: share of the top 10 that is judged at all; undefined for an empty ranking;
//! - the *condensed* nDCG@10 and recall@10/100 ([`condense`]; Sakai, "Alternatives to Bpref",
//!   SIGIR 2007) read unjudged as unknown the other standard way: the unjudged products are
//!   taken out of the ranking first, then the same metrics. Condensing a k-deep ranking drops
//!   nothing relevant, so its condensed recall@k is its recall@k: only the shallower cut-offs move;
//! - each metric is the mean over the queries where it is defined ([`summarize`]), with the
//!   count of those queries beside it.
//!
//! Judged products missing from the index are dropped before scoring (as `evaluate.py` drops
//! those missing from the catalog), and counted; but a product the index's build left out
//! (`--on-error skip`: it is in the catalog, the index records its id) is kept and counted
//! apart: relevant, it is a miss. A query the engine refuses (empty, too long)
//! is kept with an empty ranking (every defined metric 0 for it) and counted.
//!
//! Judgements are JSONL (`{"query": Q, "grades": {product_id: grade}}` a line, what
//! `tools/train/pairs.py` writes as `judged.jsonl`) or CSV with a header naming `query`, a
//! product column (`docid`, `product_id` or `id`) and a grade column (`rating`, `grade` or
//! `final_rating`), as Chorus's `Broad_Query_Set_rated.csv`; CSV grades are truncated to
//! integers and rows with an empty grade are skipped, as `pairs.py` reads them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::beam::BeamSearch;
use crate::search::{Engine, Request, Response};

/// A product is relevant from this grade up.
pub const REL: f64 = 2.0;

/// One query's grades: product id → grade.
pub type Grades = HashMap<String, f64>;

/// DCG of gains given as grades, best first: Σ (2^g − 1) / log2(i + 2).
pub fn dcg(grades: &[f64]) -> f64 {
    grades
        .iter()
        .enumerate()
        .map(|(i, &g)| (2f64.powf(g) - 1.0) / ((i + 2) as f64).log2())
        .fold(0.0, |a, b| a + b)
}

/// Grades are truncated to whole numbers in 0..=[`MAX_GRADE`]: a negative grade (TREC's junk
/// −2) has a negative gain, which the ideal ranking cut at k keeps when fewer than k products
/// grade above it, so a perfect run scored above 1; from 1,024 up 2^g overflows and the
/// query's nDCG (and the whole run's mean) came out NaN, written as null.
pub const MAX_GRADE: f64 = 10.0;

fn grade_in_range(g: f64) -> std::result::Result<f64, String> {
    let g = g.trunc();
    if (0.0..=MAX_GRADE).contains(&g) {
        Ok(g)
    } else {
        Err(format!(
            "grade {g} is outside 0..={MAX_GRADE} (map a scale with negative grades onto 0 and up)"
        ))
    }
}

/// nDCG@k with gain 2^grade − 1 (unjudged: 0); the ideal orders every judged product by grade.
/// `None` when the ideal DCG is not positive (no product graded above 0).
pub fn ndcg<S: AsRef<str>>(ranked: &[S], grades: &Grades, k: usize) -> Option<f64> {
    let mut ideal: Vec<f64> = grades.values().copied().collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    ideal.truncate(k);
    let ideal = dcg(&ideal);
    if ideal.is_nan() || ideal <= 0.0 {
        return None;
    }
    let got: Vec<f64> = ranked
        .iter()
        .take(k)
        .map(|d| grades.get(d.as_ref()).copied().unwrap_or(0.0))
        .collect();
    Some(dcg(&got) / ideal)
}

/// |top k ∩ relevant| / |relevant|; `None` when nothing is relevant.
pub fn recall<S: AsRef<str>>(ranked: &[S], grades: &Grades, k: usize) -> Option<f64> {
    let rel: HashSet<&str> = grades
        .iter()
        .filter(|(_, &g)| g >= REL)
        .map(|(d, _)| d.as_str())
        .collect();
    if rel.is_empty() {
        return None;
    }
    let top: HashSet<&str> = ranked.iter().take(k).map(|d| d.as_ref()).collect();
    Some(rel.intersection(&top).count() as f64 / rel.len() as f64)
}

/// Among the judged products of the top k, the share relevant; `None` when none is judged.
pub fn relevance_rate<S: AsRef<str>>(ranked: &[S], grades: &Grades, k: usize) -> Option<f64> {
    let judged: Vec<f64> = ranked
        .iter()
        .take(k)
        .filter_map(|d| grades.get(d.as_ref()).copied())
        .collect();
    if judged.is_empty() {
        return None;
    }
    Some(judged.iter().filter(|&&g| g >= REL).count() as f64 / judged.len() as f64)
}

/// The share of the top k that is judged; `None` for an empty ranking.
pub fn judged_at<S: AsRef<str>>(ranked: &[S], grades: &Grades, k: usize) -> Option<f64> {
    let top = &ranked[..k.min(ranked.len())];
    if top.is_empty() {
        return None;
    }
    Some(
        top.iter()
            .filter(|d| grades.contains_key(d.as_ref()))
            .count() as f64
            / top.len() as f64,
    )
}

/// The ranking with its unjudged products taken out, order kept.
pub fn condense<'a, S: AsRef<str>>(ranked: &'a [S], grades: &Grades) -> Vec<&'a str> {
    ranked
        .iter()
        .map(|d| d.as_ref())
        .filter(|d| grades.contains_key(*d))
        .collect()
}

/// A metric of one ranking against one query's grades.
pub type Metric = fn(&[String], &Grades) -> Option<f64>;

/// How deep a ranking the condensed metrics read: the top 300 whatever `--k`, as
/// `metrics.py`'s `CONDENSE_DEPTH` (the systems `evaluate.py` compares return 300 products by
/// default): a deeper `--k` must not bring judged products from below rank 300 into them.
pub const CONDENSE_DEPTH: usize = 300;

/// The top [`CONDENSE_DEPTH`] of `ranked`, condensed.
fn condensed<'a>(ranked: &'a [String], grades: &Grades) -> Vec<&'a str> {
    condense(&ranked[..ranked.len().min(CONDENSE_DEPTH)], grades)
}

/// The metrics reported, by name, in the order `evaluate.py` prints them.
pub const METRICS: [(&str, Metric); 9] = [
    ("ndcg@10", |r, g| ndcg(r, g, 10)),
    ("recall@10", |r, g| recall(r, g, 10)),
    ("recall@100", |r, g| recall(r, g, 100)),
    ("recall@300", |r, g| recall(r, g, 300)),
    ("relevance_rate@300", |r, g| relevance_rate(r, g, 300)),
    ("judged@10", |r, g| judged_at(r, g, 10)),
    ("condensed_ndcg@10", |r, g| ndcg(&condensed(r, g), g, 10)),
    ("condensed_recall@10", |r, g| {
        recall(&condensed(r, g), g, 10)
    }),
    ("condensed_recall@100", |r, g| {
        recall(&condensed(r, g), g, 100)
    }),
];

/// One metric over a set of queries: the mean where it is defined, and over how many.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Averaged {
    pub name: &'static str,
    pub mean: Option<f64>,
    pub queries: usize,
}

/// Each of [`METRICS`] averaged over the queries where it is defined (`metrics.py`'s
/// `summarize`): `runs[i]` is the ranking of the query graded by `grades[i]`.
pub fn summarize(runs: &[Vec<String>], grades: &[&Grades]) -> Vec<Averaged> {
    METRICS
        .iter()
        .map(|&(name, f)| {
            let vals: Vec<f64> = runs
                .iter()
                .zip(grades)
                .filter_map(|(r, g)| f(r, g))
                .collect();
            Averaged {
                name,
                mean: (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64),
                queries: vals.len(),
            }
        })
        .collect()
}

/// The nearest-rank value at quantile `q` (0..=1) of `xs`, as `gram bench` reports its
/// percentiles ([`crate::loadgen::rank`]): always one of the values (the median of an even
/// count is the lower middle one); `None` for no values.
pub fn quantile(xs: &[f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    Some(crate::loadgen::rank(&v, q.clamp(0.0, 1.0)))
}

/// One judged query.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub query: String,
    pub grades: Grades,
}

/// Judgements as read, in first-seen query order, with what reading passed over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgements {
    pub queries: Vec<Judged>,
    /// JSONL lines repeating an earlier query (merged into the earlier entry, a later grade of
    /// the same product winning, as `metrics.py` does).
    pub duplicate_queries: usize,
    /// CSV rows with an empty grade (skipped, as `pairs.py` skips them).
    pub empty_grades: usize,
    /// Grades of a (query, product) already graded (a per-rater CSV, a repeated JSONL line):
    /// the later one kept, as `metrics.py` keeps it.
    pub replaced_grades: usize,
}

impl Judgements {
    pub fn num_grades(&self) -> usize {
        self.queries.iter().map(|j| j.grades.len()).sum()
    }

    /// How many grades name a product of `ids`.
    pub fn count_products(&self, ids: &HashSet<String>) -> usize {
        self.queries
            .iter()
            .map(|j| j.grades.keys().filter(|d| ids.contains(*d)).count())
            .sum()
    }

    /// Drops the grades of products outside `known` (not in the index), and the queries that
    /// had grades and none of them is left (nothing of theirs can be judged: kept, they would
    /// count in `queries`, latency and judged@10 as zeros); returns how many grades and how
    /// many queries (as `evaluate.py` drops them).
    pub fn retain_products(&mut self, known: &HashSet<String>) -> (usize, usize) {
        let (mut dropped, before_queries) = (0, self.queries.len());
        self.queries.retain_mut(|j| {
            let before = j.grades.len();
            j.grades.retain(|d, _| known.contains(d));
            dropped += before - j.grades.len();
            before == 0 || !j.grades.is_empty()
        });
        (dropped, before_queries - self.queries.len())
    }
}

/// Reads judgements from `path`: CSV when it ends in `.csv` or does not start with `{`, else
/// JSONL. Errors name the file and line.
pub fn read_judgements(path: &Path) -> Result<Judgements, String> {
    let bytes = crate::container::read_input(path)
        .map_err(|e| format!("--judgements {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| format!("--judgements {}: not UTF-8 ({e})", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_csv = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("csv") => true,
        Some(e) if e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json") => false,
        _ => !text.trim_start().starts_with('{'),
    };
    let out = if is_csv {
        parse_csv_judgements(text)
    } else {
        parse_jsonl_judgements(text)
    }
    .map_err(|e| format!("--judgements {}: {e}", path.display()))?;
    if out.queries.is_empty() {
        return Err(format!(
            "--judgements {}: no judged queries",
            path.display()
        ));
    }
    Ok(out)
}

/// Adds `grades` of `query` to `out`, merged into an earlier entry of the same query (a later
/// grade of the same product wins), as `metrics.py`'s `read_judgements` does; with `count`, a
/// repeated query is counted in `duplicate_queries`.
fn add_query(
    out: &mut Judgements,
    at: &mut HashMap<String, usize>,
    query: String,
    grades: Grades,
    count: bool,
) {
    match at.get(&query) {
        Some(&i) => {
            if count {
                out.duplicate_queries += 1;
            }
            for (d, g) in grades {
                if out.queries[i].grades.insert(d, g).is_some() {
                    out.replaced_grades += 1;
                }
            }
        }
        None => {
            at.insert(query.clone(), out.queries.len());
            out.queries.push(Judged { query, grades });
        }
    }
}

/// JSONL: one `{"query": string, "grades": {product_id: number}}` a non-blank line. Grades are
/// truncated to integers and a repeated query's lines are merged, as `metrics.py` reads them.
pub fn parse_jsonl_judgements(text: &str) -> Result<Judgements, String> {
    let mut out = Judgements::default();
    let mut at = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| format!("line {}: {msg}", n + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| {
            // serde_json ends its message with the position in `line`: the column is what is
            // left to say.
            let msg = e.to_string();
            let msg = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(m, _)| m);
            bad(format!("not JSON at column {}: {msg}", e.column()))
        })?;
        let query = v
            .get("query")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no string \"query\"".into()))?;
        let obj = v
            .get("grades")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no object \"grades\" {product_id: grade}".into()))?;
        let mut grades = Grades::with_capacity(obj.len());
        for (d, g) in obj {
            let g = g
                .as_f64()
                .filter(|g| g.is_finite())
                .ok_or_else(|| bad(format!("the grade of product {d:?} is not a number: {g}")))?;
            let g = grade_in_range(g).map_err(|e| bad(format!("product {d:?}: {e}")))?;
            grades.insert(d.clone(), g);
        }
        add_query(&mut out, &mut at, query.to_string(), grades, true);
    }
    Ok(out)
}

/// CSV with a header: `query`, a product column (`docid`, `product_id`, `id`), a grade column
/// (`rating`, `grade`, `final_rating`; the first present wins). Grades are truncated to
/// integers (`int(float(x))`, as `pairs.py`); a row with an empty grade is skipped and
/// counted; a later row for the same (query, product) replaces an earlier one.
pub fn parse_csv_judgements(text: &str) -> Result<Judgements, String> {
    let rows = csv_rows(text)?;
    let mut rows = rows.into_iter();
    let (_, header) = rows.next().ok_or("empty file")?;
    let header: Vec<String> = header.iter().map(|h| h.trim().to_lowercase()).collect();
    let col = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| header.iter().position(|h| h == n))
    };
    let missing = |what: &str| format!("line 1: the header {header:?} names no {what} column");
    let qc = col(&["query"]).ok_or_else(|| missing("`query`"))?;
    let dc = col(&["docid", "product_id", "id"])
        .ok_or_else(|| missing("product (`docid`, `product_id` or `id`)"))?;
    let gc = col(&["rating", "grade", "final_rating"])
        .ok_or_else(|| missing("grade (`rating`, `grade` or `final_rating`)"))?;
    let mut out = Judgements::default();
    let mut at = HashMap::new();
    for (line, row) in rows {
        if row.len() == 1 && row[0].trim().is_empty() {
            continue;
        }
        let bad = |msg: String| format!("line {line}: {msg}");
        if row.len() != header.len() {
            return Err(bad(format!(
                "{} fields, the header has {}",
                row.len(),
                header.len()
            )));
        }
        let grade = row[gc].trim();
        if grade.is_empty() {
            out.empty_grades += 1;
            continue;
        }
        let g: f64 = grade
            .parse()
            .ok()
            .filter(|g: &f64| g.is_finite())
            .ok_or_else(|| bad(format!("grade {grade:?} is not a number")))?;
        let g = grade_in_range(g).map_err(bad)?;
        let (q, d) = (row[qc].clone(), row[dc].trim().to_string());
        if d.is_empty() {
            return Err(bad("empty product id".into()));
        }
        let grades = Grades::from([(d, g)]);
        add_query(&mut out, &mut at, q, grades, false);
    }
    Ok(out)
}

/// RFC 4180 records: fields split by commas, `"`-quoted fields may hold commas, newlines and
/// `""`; CRLF or LF line ends. Each record with the line it starts on (1-based).
fn csv_rows(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut line, mut start) = (1usize, 1usize);
    let mut quoted = false;
    let mut at_field_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                quoted = true;
                at_field_start = false;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push((start, std::mem::take(&mut row)));
                line += 1;
                start = line;
                at_field_start = true;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if quoted {
        return Err(format!("line {start}: a quoted field is not closed"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((start, row));
    }
    Ok(rows)
}

/// How `gram eval` runs the queries.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Products retrieved per query.
    pub k: usize,
    /// Codes per query (beam width).
    pub beam: usize,
    /// Queries sharing decoder steps.
    pub batch: usize,
}

/// One query's run and its metrics.
#[derive(Debug, Clone, Serialize)]
pub struct QueryResult {
    pub query: String,
    /// Judged products (in the index) and those graded ≥ 2.
    pub judged: usize,
    pub relevant: usize,
    /// Products returned.
    pub returned: usize,
    /// Distinct products on the posting lists of the query's codes (what was scored).
    pub candidates: usize,
    pub codes: Vec<String>,
    /// Returned codes that are not codes of the index.
    pub invalid_codes: usize,
    /// Each of [`METRICS`] (`null` where undefined).
    pub metrics: serde_json::Map<String, Value>,
    /// The engine's time for the query (tokenize + prefill + decode + postings + scoring; the
    /// decoder steps are shared with the queries batched with it), ms.
    pub latency_ms: f64,
    /// Why the engine refused the query (its ranking is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub ranked: Vec<String>,
    #[serde(skip)]
    pub stages: Vec<(&'static str, f64)>,
}

/// The index's code texts → ids.
fn code_ids(engine_index: &crate::index::Index) -> HashMap<String, u32> {
    (0..engine_index.num_codes() as u32)
        .filter_map(|id| Some((engine_index.code_text(id)?.into_owned(), id)))
        .collect()
}

/// Every product id of the index's catalog, in two sets: the index's products, and those its
/// build left out (`--on-error skip`), which a judgement may name too: relevant and never
/// retrieved, they count as misses.
pub fn catalog_product_ids(index: &crate::index::Index) -> (HashSet<String>, HashSet<String>) {
    let indexed: HashSet<String> = (0..index.num_products() as u32)
        .filter_map(|i| Some(index.product(i)?.0.into_owned()))
        .collect();
    let left_out = index
        .left_out_products()
        .filter(|id| !indexed.contains(*id))
        .map(str::to_owned)
        .collect();
    (indexed, left_out)
}

/// Runs every judged query through `engine` in batches of `opts.batch` and scores it. A query
/// the engine refuses gets an empty ranking and its error; a batch that fails as a whole is an
/// error. Stderr gets one warning per refused query.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    judged: &[Judged],
    opts: &EvalOptions,
) -> crate::Result<Vec<QueryResult>> {
    let index = engine.index();
    let ids = code_ids(index);
    let mut seen = vec![false; index.num_products()];
    let mut beams = BeamSearch::new();
    let mut out = Vec::with_capacity(judged.len());
    for chunk in judged.chunks(opts.batch.max(1)) {
        let mut prepared = Vec::new();
        let mut refused: HashMap<usize, String> = HashMap::new();
        for (i, j) in chunk.iter().enumerate() {
            let request = Request {
                k: opts.k,
                beam: opts.beam,
                ..Request::new(j.query.as_str())
            };
            match engine.prepare(request) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    crate::note!("warning: query {:?} refused: {e}", j.query);
                    refused.insert(i, e.to_string());
                }
            }
        }
        // One query's failure (a numeric error of its own rows) is that query's, kept and
        // counted as refused like one `prepare` refused: the others' answers stand.
        let mut responses = if prepared.is_empty() {
            Vec::new()
        } else {
            engine.search_each(&mut beams, prepared)?
        }
        .into_iter();
        for (i, j) in chunk.iter().enumerate() {
            let r = match refused.remove(&i) {
                Some(e) => Err(e),
                None => match responses.next().expect("one response per prepared query") {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        crate::note!("warning: query {:?} failed: {e}", j.query);
                        Err(e.to_string())
                    }
                },
            };
            out.push(match r {
                Ok(r) => score_query(j, Some(r), None, &ids, index, &mut seen),
                Err(e) => score_query(j, None, Some(e), &ids, index, &mut seen),
            });
        }
    }
    Ok(out)
}

fn score_query(
    j: &Judged,
    r: Option<Response>,
    error: Option<String>,
    ids: &HashMap<String, u32>,
    index: &crate::index::Index,
    seen: &mut [bool],
) -> QueryResult {
    let (ranked, codes, stages) = match &r {
        Some(r) => {
            let t = &r.timings_ms;
            (
                r.products.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
                r.codes.iter().map(|c| c.code.clone()).collect::<Vec<_>>(),
                vec![
                    ("tokenize", t.tokenize),
                    ("prefill", t.prefill),
                    ("decode", t.decode),
                    ("postings", t.postings),
                    ("scoring", t.scoring),
                ],
            )
        }
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    // Candidates: the union of the codes' posting lists.
    let mut invalid = 0;
    let mut touched = Vec::new();
    for c in &codes {
        let Some(&id) = ids.get(c) else {
            invalid += 1;
            continue;
        };
        let n = index.code(id).map_or(0, |c| c.n_tokens as usize);
        let (pq, w) = (vec![0.0; n], vec![0.0; n]);
        if let Some(p) = index.postings(id, &pq, &w) {
            for &d in p.products {
                if let Some(s) = seen.get_mut(d as usize) {
                    if !*s {
                        *s = true;
                        touched.push(d);
                    }
                }
            }
        }
    }
    for &d in &touched {
        seen[d as usize] = false;
    }
    let metrics = METRICS
        .iter()
        .map(|&(name, f)| (name.to_string(), json!(f(&ranked, &j.grades))))
        .collect();
    QueryResult {
        query: j.query.clone(),
        judged: j.grades.len(),
        relevant: j.grades.values().filter(|&&g| g >= REL).count(),
        returned: ranked.len(),
        candidates: touched.len(),
        invalid_codes: invalid,
        codes,
        metrics,
        latency_ms: stages.iter().fold(0.0, |a, (_, ms)| a + ms),
        error,
        ranked,
        stages,
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for x in xs {
        s += x;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

/// The report of `gram eval`: metrics, counts, codes and candidates, latency.
pub fn report(judged: &[Judged], results: &[QueryResult], wall_s: f64) -> Value {
    let runs: Vec<Vec<String>> = results.iter().map(|r| r.ranked.clone()).collect();
    let grades: Vec<&Grades> = judged.iter().map(|j| &j.grades).collect();
    let summary = summarize(&runs, &grades);
    let metrics: serde_json::Map<String, Value> = summary
        .iter()
        .map(|a| (a.name.to_string(), json!(a.mean)))
        .collect();
    let counted: serde_json::Map<String, Value> = summary
        .iter()
        .map(|a| (a.name.to_string(), json!(a.queries)))
        .collect();
    let n = results.len();
    let answered: Vec<&QueryResult> = results.iter().filter(|r| r.error.is_none()).collect();
    let undefined = |name: &str| {
        n - summary
            .iter()
            .find(|a| a.name == name)
            .map_or(0, |a| a.queries)
    };
    let codes: usize = answered.iter().map(|r| r.codes.len()).sum();
    let invalid: usize = answered.iter().map(|r| r.invalid_codes).sum();
    let lat: Vec<f64> = answered.iter().map(|r| r.latency_ms).collect();
    let mut stages = serde_json::Map::new();
    if let Some(first) = answered.first() {
        for (i, (name, _)) in first.stages.iter().enumerate() {
            let xs: Vec<f64> = answered.iter().map(|r| r.stages[i].1).collect();
            stages.insert(name.to_string(), json!(quantile(&xs, 0.5)));
        }
    }
    json!({
        "queries": n,
        "queries_with_relevant": results.iter().filter(|r| r.relevant > 0).count(),
        "skipped": {
            "refused_by_engine": n - answered.len(),
            "no_relevant_product (left out of recall)": undefined("recall@10"),
            "no_positive_grade (left out of ndcg)": undefined("ndcg@10"),
            // Of the answered queries: a refused one is counted above, not again here.
            "no_judged_product_in_top_300 (left out of relevance_rate)":
                undefined("relevance_rate@300").saturating_sub(n - answered.len()),
        },
        "unjudged": "not relevant (gain 0) for ndcg and recall; left out of relevance_rate \
                     and of the ranking for the condensed_ metrics",
        "metrics": metrics,
        "queries_averaged": counted,
        "mean_returned": mean(results.iter().map(|r| r.returned as f64)),
        "codes_per_query": mean(answered.iter().map(|r| r.codes.len() as f64)),
        "invalid_code_rate": (codes > 0).then(|| invalid as f64 / codes as f64),
        "mean_candidates": mean(answered.iter().map(|r| r.candidates as f64)),
        "latency_ms": {
            "p50": quantile(&lat, 0.5),
            "p99": quantile(&lat, 0.99),
            "mean": mean(lat.iter().copied()),
            "stages_p50": stages,
        },
        "wall_s": wall_s,
        "queries_per_s": (wall_s > 0.0).then(|| n as f64 / wall_s),
    })
}

/// Runs and reports: what `gram eval` prints, its per-query results beside it.
pub fn evaluate<B: Backend>(
    engine: &Engine<B>,
    judged: &[Judged],
    opts: &EvalOptions,
) -> crate::Result<(Value, Vec<QueryResult>)> {
    let t = Instant::now();
    let results = run(engine, judged, opts)?;
    let wall = t.elapsed().as_secs_f64();
    Ok((report(judged, &results, wall), results))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Grades {
        // relevant (>= 2): a, b
        [("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 0.0)]
            .into_iter()
            .map(|(d, g)| (d.to_string(), g))
            .collect()
    }

    fn ids(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn ndcg_by_hand() {
        assert!(close(
            ndcg(&ids(&["a", "b", "c", "d"]), &g(), 10).unwrap(),
            1.0
        ));
        // b first, unjudged x, then a: (3 + 0 + 7/2) / (7 + 3/log2(3) + 1/2)
        let want = (3.0 + 0.0 + 7.0 / 2.0) / (7.0 + 3.0 / 3f64.log2() + 1.0 / 2.0);
        assert!(close(ndcg(&ids(&["b", "x", "a"]), &g(), 10).unwrap(), want));
        // The ideal is cut at k too: k = 1, a ideal (gain 7), b got (gain 3).
        assert!(close(ndcg(&ids(&["b", "a"]), &g(), 1).unwrap(), 3.0 / 7.0));
        let zero: Grades = [("a".to_string(), 0.0)].into();
        assert_eq!(ndcg(&ids(&["a"]), &zero, 10), None);
        assert_eq!(ndcg(&ids(&["x", "y"]), &g(), 10), Some(0.0));
        assert_eq!(ndcg::<String>(&[], &g(), 10), Some(0.0));
        assert_eq!(ndcg(&ids(&["a"]), &Grades::new(), 10), None);
    }

    #[test]
    fn recall_by_hand() {
        assert_eq!(recall(&ids(&["a", "x", "b"]), &g(), 2), Some(0.5));
        assert_eq!(recall(&ids(&["a", "x", "b"]), &g(), 3), Some(1.0));
        // grade 1 is not relevant
        assert_eq!(recall(&ids(&["c", "d"]), &g(), 10), Some(0.0));
        let one: Grades = [("a".to_string(), 1.0)].into();
        assert_eq!(recall(&ids(&["a"]), &one, 10), None);
        // a duplicate counts once
        assert_eq!(recall(&ids(&["a", "a"]), &g(), 10), Some(0.5));
    }

    #[test]
    fn relevance_rate_ignores_unjudged() {
        // a of {a, d}
        assert_eq!(
            relevance_rate(&ids(&["a", "x", "y", "d"]), &g(), 300),
            Some(0.5)
        );
        assert_eq!(relevance_rate(&ids(&["x", "y"]), &g(), 300), None);
        // only the top k
        assert_eq!(relevance_rate(&ids(&["d", "a"]), &g(), 1), Some(0.0));
        assert_eq!(judged_at(&ids(&["a", "x", "y", "d"]), &g(), 4), Some(0.5));
        assert_eq!(judged_at(&ids(&["a", "x", "y", "d"]), &g(), 10), Some(0.5));
        assert_eq!(judged_at(&ids(&["a", "x", "y", "d"]), &g(), 1), Some(1.0));
        assert_eq!(judged_at::<String>(&[], &g(), 10), None);
    }

    #[test]
    fn summarize_means_over_defined_queries() {
        // metrics.py's case: q1 ranks a, b; q2 has z (grade 3) and returns x; q3 nothing
        // relevant and no run.
        let z: Grades = [("z".to_string(), 3.0)].into();
        let w: Grades = [("w".to_string(), 0.0)].into();
        let gq1 = g();
        let s = summarize(&[ids(&["a", "b"]), ids(&["x"]), vec![]], &[&gq1, &z, &w]);
        let get = |n: &str| s.iter().find(|a| a.name == n).unwrap().clone();
        assert_eq!(get("recall@10").queries, 2);
        assert_eq!(get("recall@10").mean, Some(0.5)); // q1: 1, q2: 0
        assert_eq!(get("ndcg@10").queries, 2);
        // q1 ranks a, b of a, b, c, d; q2's x is unjudged: 0
        let q1 = (7.0 + 3.0 / 3f64.log2()) / (7.0 + 3.0 / 3f64.log2() + 0.5);
        assert!(close(get("ndcg@10").mean.unwrap(), q1 / 2.0));
        assert_eq!(get("relevance_rate@300").queries, 1);
        assert_eq!(get("relevance_rate@300").mean, Some(1.0));
        assert_eq!(get("judged@10").queries, 2); // q3's run is empty
        assert_eq!(get("judged@10").mean, Some(0.5)); // q1: 1, q2: 0
        let none = summarize(&[], &[]);
        assert_eq!(none.len(), METRICS.len());
        assert!(none.iter().all(|a| a.mean.is_none() && a.queries == 0));
    }

    /// Each cutoff sees its own part of a long ranking: relevant r1..r4 at ranks 5, 50, 200
    /// and 400 of 500, a grade-0 product at 250.
    #[test]
    fn summarize_cuts_each_metric_at_its_own_rank() {
        let mut ranked: Vec<String> = (0..500).map(|i| format!("x{i}")).collect();
        for (rank, id) in [(5, "r1"), (50, "r2"), (200, "r3"), (400, "r4"), (250, "n")] {
            ranked[rank - 1] = id.to_string();
        }
        let grades: Grades = [
            ("r1", 2.0),
            ("r2", 2.0),
            ("r3", 2.0),
            ("r4", 2.0),
            ("n", 0.0),
        ]
        .into_iter()
        .map(|(d, g)| (d.to_string(), g))
        .collect();
        let s = summarize(&[ranked], &[&grades]);
        let mean = |n: &str| s.iter().find(|a| a.name == n).unwrap().mean.unwrap();
        assert_eq!(mean("recall@10"), 0.25);
        assert_eq!(mean("recall@100"), 0.5);
        assert_eq!(mean("recall@300"), 0.75);
        assert_eq!(mean("relevance_rate@300"), 0.75); // r1, r2, r3 of r1, r2, r3, n
        assert_eq!(mean("judged@10"), 0.1);
        let ideal = 3.0 * (1.0 + 1.0 / 3f64.log2() + 0.5 + 1.0 / 5f64.log2());
        assert!(close(mean("ndcg@10"), 3.0 / 6f64.log2() / ideal));
    }

    /// Condensed lists, the cases of `test_metrics.py`'s `test_condensed`.
    #[test]
    fn condensed_metrics_by_hand() {
        let ranked = ids(&["x", "b", "y", "a", "c", "d"]);
        assert_eq!(condense(&ranked, &g()), ["b", "a", "c", "d"]);
        let ideal = 7.0 + 3.0 / 3f64.log2() + 0.5;
        let s = summarize(&[ranked], &[&g()]);
        let mean = |s: &[Averaged], n: &str| s.iter().find(|a| a.name == n).unwrap().mean;
        assert!(close(
            mean(&s, "condensed_ndcg@10").unwrap(),
            (3.0 + 7.0 / 3f64.log2() + 0.5) / ideal
        ));
        let raw = 3.0 / 3f64.log2() + 7.0 / 5f64.log2() + 1.0 / 6f64.log2();
        assert!(close(mean(&s, "ndcg@10").unwrap(), raw / ideal));
        // a behind ten unjudged: out of the raw top 10, first once condensed
        let mut behind = vec!["x"; 10];
        behind.push("a");
        let s = summarize(&[ids(&behind)], &[&g()]);
        assert_eq!(mean(&s, "recall@10"), Some(0.0));
        assert_eq!(mean(&s, "condensed_recall@10"), Some(0.5));
        assert!(close(mean(&s, "condensed_ndcg@10").unwrap(), 7.0 / ideal));
        // nothing judged: condensed to nothing, 0 (not undefined)
        let s = summarize(&[ids(&["x", "y"])], &[&g()]);
        assert_eq!(mean(&s, "condensed_ndcg@10"), Some(0.0));
        assert_eq!(mean(&s, "condensed_recall@100"), Some(0.0));
        // a at rank 301 of a deeper --k: outside the condensed top 300, as evaluate.py's
        // 300-deep lists would have it; at rank 300 inside
        for (unjudged, found) in [(CONDENSE_DEPTH, 0.0), (CONDENSE_DEPTH - 1, 0.5)] {
            let mut deep = vec!["x"; unjudged];
            deep.extend(["a", "y"]);
            let s = summarize(&[ids(&deep)], &[&g()]);
            assert_eq!(mean(&s, "condensed_recall@10"), Some(found), "{unjudged}");
            assert_eq!(mean(&s, "recall@300"), Some(found), "{unjudged}");
        }
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        // Nearest rank: the value at ceil(q n), as `gram bench` reports.
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.51), Some(3.0));
        assert_eq!(quantile(&[5.0], 0.99), Some(5.0));
        let xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.99), Some(99.0));
        assert_eq!(quantile(&xs, 0.999), Some(100.0));
        assert_eq!(quantile(&xs, 0.0), Some(1.0));
        assert_eq!(quantile(&xs, 1.0), Some(100.0));
    }

    #[test]
    fn jsonl_judgements() {
        let text = "{\"query\": \"aa battery\", \"grades\": {\"1\": 3, \"2\": 0}}\n\n\
                    {\"query\": \"mouse\", \"grades\": {\"7\": 2.5}}\n\
                    {\"query\": \"aa battery\", \"grades\": {\"3\": 1}}\n";
        let j = parse_jsonl_judgements(text).unwrap();
        assert_eq!(j.queries.len(), 2);
        assert_eq!(j.duplicate_queries, 1);
        // The repeated line grades another product: nothing replaced.
        assert_eq!(j.replaced_grades, 0);
        assert_eq!(j.queries[0].query, "aa battery");
        // merged as metrics.py merges them; grades truncate as int(g)
        assert_eq!(
            j.queries[0].grades,
            Grades::from([
                ("1".to_string(), 3.0),
                ("2".to_string(), 0.0),
                ("3".to_string(), 1.0)
            ])
        );
        assert_eq!(j.queries[1].grades["7"], 2.0);
        for (bad, want) in [
            ("{\"query\": \"x\"", "line 1: not JSON at column"),
            ("\n{\"grades\": {}}", "line 2: no string \"query\""),
            ("{\"query\": \"x\", \"grades\": []}", "no object \"grades\""),
            (
                "{\"query\": \"x\", \"grades\": {\"p\": \"3\"}}",
                "product \"p\" is not a number",
            ),
            // A negative gain made a perfect run's nDCG 1.047; 2^1024 made it NaN.
            (
                "{\"query\": \"x\", \"grades\": {\"a\": 3, \"b\": -1}}",
                "product \"b\": grade -1 is outside 0..=10",
            ),
            (
                "{\"query\": \"x\", \"grades\": {\"a\": 1024}}",
                "grade 1024 is outside",
            ),
        ] {
            let e = parse_jsonl_judgements(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn csv_judgements() {
        let text = "query,docid,name,rating\r\n\
                    aa battery,1,\"Duracell, \"\"AA\"\"\",3\r\n\
                    aa battery,2,\"two\nlines\",\r\n\
                    mouse,7,m,2.9\r\n\
                    aa battery,1,again,1\r\n";
        let j = parse_csv_judgements(text).unwrap();
        assert_eq!(j.queries.len(), 2);
        assert_eq!(j.empty_grades, 1);
        // a later row for the same product wins; grades truncate as int(float(x))
        assert_eq!(j.queries[0].grades, Grades::from([("1".to_string(), 1.0)]));
        assert_eq!(j.queries[1].grades["7"], 2.0);
        // and is counted (a per-rater file's repeats were replaced without a word)
        assert_eq!(j.replaced_grades, 1);
        let rows = csv_rows("a,\"b,c\",\"d\"\"e\"\nx,\"y\nz\",w").unwrap();
        assert_eq!(rows[0], (1, ids(&["a", "b,c", "d\"e"])));
        assert_eq!(rows[1], (2, ids(&["x", "y\nz", "w"])));
        for (bad, want) in [
            ("query,docid\nx,1", "names no grade"),
            ("q,docid,rating\nx,1,2", "names no `query`"),
            ("query,rating\nx,1", "names no product"),
            ("query,docid,rating\nx,1", "line 2: 2 fields"),
            ("query,docid,rating\nx,1,good", "line 2: grade \"good\""),
            (
                "query,docid,rating\nx,1,-2",
                "line 2: grade -2 is outside 0..=10",
            ),
            ("query,docid,rating\nx,1,11", "line 2: grade 11 is outside"),
            ("query,docid,rating\nx,\"1,3", "not closed"),
            ("", "empty file"),
        ] {
            let e = parse_csv_judgements(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_products_are_dropped_and_counted() {
        let mut j = parse_jsonl_judgements(
            "{\"query\": \"q\", \"grades\": {\"1\": 3, \"2\": 0, \"9\": 2}}\n\
             {\"query\": \"gone\", \"grades\": {\"8\": 3, \"9\": 1}}\n\
             {\"query\": \"none\", \"grades\": {}}",
        )
        .unwrap();
        let known: HashSet<String> = ["1", "2"].iter().map(|s| s.to_string()).collect();
        // 3 grades of products outside the index; "gone" has none left and goes, "none"
        // never had any and stays (as read).
        assert_eq!(j.retain_products(&known), (3, 1));
        assert_eq!(j.num_grades(), 2);
        let left: Vec<&str> = j.queries.iter().map(|q| q.query.as_str()).collect();
        assert_eq!(left, ["q", "none"]);
    }
}
