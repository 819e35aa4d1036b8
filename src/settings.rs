//! GRAM's serving settings, from `gram.json` beside the model (written by the training tools):
//! the query and product prompt templates, the code delimiter, the S_rele weights per code
//! granularity and how a product's scores across codes aggregate. A model directory without
//! `gram.json` gets the defaults below: templates that are the bare text, weight -1 (S_rele's
//! bracket is a divergence, so a negative weight ranks the closest product first) and `max`
//! (with negative scores, `sum` would penalize a product for matching more codes).
//!
//! `code_logprob` (optional) adds the query-side log-likelihood of each matched code to its
//! S_rele before the aggregation (`score::code_prior`): `{"weight": α, "per_token": bool}`.
//! Without it (every `gram.json` written before the term) the weight is 0 and products score
//! exactly as by S_rele alone.
//!
//! `code_size` (optional) adds each matched code's specificity, `-β · ln(its number of
//! products)`, to the same prior (`score::size_prior`): `{"weight": β}`. Absent: β 0, the
//! scores of before.

use std::path::Path;

use serde::Deserialize;

use crate::beam::MAX_NEW_TOKENS;
use crate::error::{Error, Result};
use crate::score::Aggregate;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Prompt for a query; `{query}` is replaced by the query text.
    pub query_template: String,
    /// Prompt for a product; `{title}` is replaced by the product title.
    pub product_template: String,
    pub delimiter: String,
    /// S_rele weight of every token of a code with 1–2 attributes (coarse), 3 (medium), 4+
    /// (fine).
    pub weights: Weights,
    /// `sum` or `max`.
    pub aggregation: String,
    /// The code-likelihood term; absent = weight 0 (S_rele alone).
    pub code_logprob: CodeLogprob,
    /// The code-specificity term; absent = weight 0.
    pub code_size: CodeSize,
    /// The spec's "max code tokens": most tokens a code may take, its EOS included. A catalog
    /// code longer than this is not indexed, generation (of the query's codes and, at index
    /// build, of the products') stops there. Absent: `beam::MAX_NEW_TOKENS`, what beam search
    /// allows ([`Settings::code_token_limit`]).
    pub max_code_tokens: Option<usize>,
}

/// `prior(c) += -weight · ln |products of c|` (see `score::size_prior`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeSize {
    pub weight: f32,
}

/// `prior(c) = weight · log P(c | q)`, `log P` summed over the code's tokens and its EOS, or
/// their mean when `per_token` (see `score::code_prior`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeLogprob {
    pub weight: f32,
    pub per_token: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub coarse: f32,
    pub medium: f32,
    pub fine: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            query_template: "{query}".into(),
            product_template: "{title}".into(),
            delimiter: " | ".into(),
            weights: Weights {
                coarse: -1.0,
                medium: -1.0,
                fine: -1.0,
            },
            aggregation: "max".into(),
            code_logprob: CodeLogprob::default(),
            code_size: CodeSize::default(),
            max_code_tokens: None,
        }
    }
}

/// The largest weight magnitude `gram.json` may give: a score sums weights times divergences
/// and log-probs of up to ~100 (f32), which a weight of 1e38 takes to inf.
pub const MAX_WEIGHT: f32 = 1e6;

impl Settings {
    /// `dir/gram.json`, or the defaults when there is none (no file and no link: a link to a
    /// missing file, or a file that cannot be read, is an error naming it).
    pub fn load(dir: &Path) -> Result<Settings> {
        let path = dir.join("gram.json");
        let text = match crate::container::read_capped(&path, crate::container::JSON_CAP) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(&path).is_err() =>
            {
                return Ok(Settings::default())
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |msg: String| Error::Config {
            path: path.clone(),
            msg,
        };
        // A byte-order mark (as Windows editors write) is not JSON; the catalog and judgement
        // readers skip it too.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        // An object: serde would also build the struct of defaults from `[]`.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !value.is_object() {
            return Err(bad(format!(
                "must be a JSON object, not {}",
                crate::config::json_kind(&value)
            )));
        }
        let s: Settings = serde_json::from_value(value.clone()).map_err(|e| {
            bad(match crate::config::failing_key::<Settings>(&value) {
                Some(k) => format!("`{k}`: {e}"),
                None => e.to_string(),
            })
        })?;
        // Each template holds its own placeholder once, and not the other's (left in as text,
        // it would be a literal `{title}` in every query): the server sizes a query's KV
        // entries by one copy of the query.
        for (key, template, own, other) in [
            ("query_template", &s.query_template, "{query}", "{title}"),
            (
                "product_template",
                &s.product_template,
                "{title}",
                "{query}",
            ),
        ] {
            let n = template.matches(own).count();
            if n != 1 || template.contains(other) {
                return Err(bad(format!(
                    "{key} {template:?} must hold {own} once (it holds it {n} times) and no {other}"
                )));
            }
        }
        if s.delimiter.is_empty() {
            return Err(bad("delimiter is empty".into()));
        }
        let weights = [
            ("weights.coarse", s.weights.coarse),
            ("weights.medium", s.weights.medium),
            ("weights.fine", s.weights.fine),
            ("code_logprob.weight", s.code_logprob.weight),
            ("code_size.weight", s.code_size.weight),
        ];
        for (name, w) in weights {
            if !(w.is_finite() && w.abs() <= MAX_WEIGHT) {
                return Err(bad(format!(
                    "{name} {w} must be finite and within ±{MAX_WEIGHT:e} (larger ones \
                     overflow a score to inf)"
                )));
            }
        }
        if s.aggregate().is_none() {
            return Err(bad(format!(
                "aggregation {:?}: expected \"sum\" or \"max\"",
                s.aggregation
            )));
        }
        if let Some(n) = s.max_code_tokens {
            if !(2..=MAX_NEW_TOKENS).contains(&n) {
                return Err(bad(format!(
                    "max_code_tokens {n}: expected 2..={MAX_NEW_TOKENS} (a code's tokens and \
                     its EOS)"
                )));
            }
        }
        Ok(s)
    }

    /// Most tokens a code may take, its EOS included: `max_code_tokens`, else what beam search
    /// allows.
    pub fn code_token_limit(&self) -> usize {
        self.max_code_tokens.unwrap_or(MAX_NEW_TOKENS)
    }

    pub fn query_prompt(&self, query: &str) -> String {
        self.query_template.replace("{query}", query)
    }

    pub fn product_prompt(&self, title: &str) -> String {
        self.product_template.replace("{title}", title)
    }

    pub fn aggregate(&self) -> Option<Aggregate> {
        match self.aggregation.as_str() {
            "sum" => Some(Aggregate::Sum),
            "max" => Some(Aggregate::Max),
            _ => None,
        }
    }

    /// The prior of a query code whose tokens and EOS came with `logprobs` from the query.
    pub fn code_prior(&self, logprobs: &[f32]) -> f32 {
        crate::score::code_prior(
            self.code_logprob.weight,
            logprobs,
            self.code_logprob.per_token,
        )
    }

    /// The prior of a query code: its likelihood term ([`Settings::code_prior`], from
    /// `logprobs`) plus its specificity term over its `products` (`score::size_prior`).
    /// Both terms are finite (each is `0.0` where it would not be), and weights within
    /// `MAX_WEIGHT` keep their sum so.
    pub fn prior(&self, logprobs: &[f32], products: usize) -> f32 {
        self.code_prior(logprobs) + crate::score::size_prior(self.code_size.weight, products)
    }

    /// The weight of a code with `granularity` attributes.
    pub fn weight(&self, granularity: usize) -> f32 {
        match Grain::of(granularity) {
            Grain::Coarse => self.weights.coarse,
            Grain::Medium => self.weights.medium,
            Grain::Fine => self.weights.fine,
        }
    }
}

/// A code's granularity: how many attributes it joins, `delimiter` between them (what the index
/// stores for each code and the build report counts).
pub fn granularity(code: &str, delimiter: &str) -> usize {
    code.split(delimiter).count()
}

/// A code's granularity class, which picks its weight: coarse (1–2 attributes), medium (3),
/// fine (4 or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Coarse,
    Medium,
    Fine,
}

impl Grain {
    pub fn of(granularity: usize) -> Grain {
        match granularity {
            0..=2 => Grain::Coarse,
            3 => Grain::Medium,
            _ => Grain::Fine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("gram-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Settings::load(&dir).unwrap();
        assert_eq!(s.query_prompt("sofa"), "sofa");
        assert_eq!((s.weight(1), s.weight(3), s.weight(6)), (-1.0, -1.0, -1.0));
        assert_eq!(s.aggregate(), Some(Aggregate::Max));
        assert_eq!(s.code_token_limit(), crate::beam::MAX_NEW_TOKENS);
        let write = |text: &str| {
            std::fs::write(dir.join("gram.json"), text).unwrap();
            Settings::load(&dir)
        };
        let s = write(r#"{"query_template":"Q: {query}","weights":{"coarse":0.5,"medium":1,"fine":2},"aggregation":"max"}"#).unwrap();
        assert_eq!(s.query_prompt("rug"), "Q: rug");
        assert_eq!((s.weight(2), s.weight(3), s.weight(4)), (0.5, 1.0, 2.0));
        assert_eq!(s.aggregate(), Some(Aggregate::Max));
        // No code_logprob (every gram.json before the term): weight 0, prior +0.0.
        assert_eq!(s.code_logprob, CodeLogprob::default());
        assert_eq!(s.code_prior(&[-1.0, -2.0]).to_bits(), 0f32.to_bits());
        let s = write(r#"{"code_logprob":{"weight":0.5}}"#).unwrap();
        assert_eq!(s.code_prior(&[-1.0, -2.0]), -1.5);
        let s = write(r#"{"code_logprob":{"weight":0.5,"per_token":true}}"#).unwrap();
        assert_eq!(s.code_prior(&[-1.0, -2.0]), -0.75);
        assert_eq!((s.weight(1), s.aggregate()), (-1.0, Some(Aggregate::Max)));
        // No code_size: the prior is the likelihood term's, bit for bit, at any list length.
        assert_eq!(s.code_size, CodeSize::default());
        assert_eq!(s.prior(&[-1.0, -2.0], 500).to_bits(), (-0.75f32).to_bits());
        let s = write(r#"{"code_logprob":{"weight":0.5},"code_size":{"weight":0.25}}"#).unwrap();
        let want = -1.5 - 0.25 * 40f64.ln();
        assert!(
            (s.prior(&[-1.0, -2.0], 40) as f64 - want).abs() < 1e-6,
            "{want}"
        );
        // One product: ln 1 = 0, the likelihood term alone.
        assert_eq!(s.prior(&[-1.0, -2.0], 1), -1.5);
        let s = write(r#"{"max_code_tokens":16}"#).unwrap();
        assert_eq!((s.max_code_tokens, s.code_token_limit()), (Some(16), 16));
        let s = write(r#"{"code_size":{"weight":0.25}}"#).unwrap();
        assert_eq!(s.prior(&[-1.0, -2.0], 1).to_bits(), 0f32.to_bits());
        // Each refusal names the file and what is wrong in it.
        for (bad, says) in [
            (r#"{"code_logprob":{"weight":1e40}}"#, "code_logprob.weight"),
            (r#"{"code_logprob":{"alpha":1}}"#, "alpha"),
            (r#"{"aggregation":"MAX"}"#, "aggregation \"MAX\""),
            (r#"{"query_template":"no placeholder"}"#, "query_template"),
            (
                r#"{"query_template":"{query} and {query}"}"#,
                "holds it 2 times",
            ),
            (
                r#"{"query_template":"{query} like {title}"}"#,
                "and no {title}",
            ),
            (r#"{"product_template":"P: {query}"}"#, "product_template"),
            (
                r#"{"product_template":"no placeholder"}"#,
                "product_template",
            ),
            (r#"{"delimiter":""}"#, "delimiter is empty"),
            (r#"{"unknown_key":1}"#, "unknown_key"),
            (
                r#"{"weights":{"coarse":3e38,"medium":1,"fine":1}}"#,
                "weights.coarse",
            ),
            (r#"{"code_logprob":{"weight":-2e6}}"#, "code_logprob.weight"),
            (r#"{"code_size":{"weight":1e7}}"#, "code_size.weight"),
            (r#"{"code_size":{"beta":1}}"#, "beta"),
            (
                r#"{"max_code_tokens":1}"#,
                "max_code_tokens 1: expected 2..=256",
            ),
            (r#"{"max_code_tokens":257}"#, "max_code_tokens 257"),
            (
                r#"{"max_code_tokens":-3}"#,
                "`max_code_tokens`: invalid value",
            ),
            (
                r#"{"weights":{"coarse":"x","medium":1,"fine":1}}"#,
                "`weights`: invalid type: string",
            ),
            (
                r#"{"weights":{"coarse":1}}"#,
                "`weights`: missing field `medium`",
            ),
            (
                r#"{"aggregation":null}"#,
                "`aggregation`: invalid type: null",
            ),
            ("[]", "JSON object, not an array"),
            ("null", "JSON object"),
            ("not json", "expected"),
        ] {
            let e = write(bad).err().unwrap().to_string();
            assert!(e.contains("gram.json") && e.contains(says), "{bad}: {e}");
        }
        // A byte-order mark is skipped.
        let s = write("\u{feff}{\"aggregation\":\"sum\"}").unwrap();
        assert_eq!(s.aggregate(), Some(Aggregate::Sum));
        // A link to a missing file is an error, not the defaults.
        std::fs::remove_file(dir.join("gram.json")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.join("gone.json"), dir.join("gram.json")).unwrap();
            let e = Settings::load(&dir).err().unwrap().to_string();
            assert!(e.contains("gram.json"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
