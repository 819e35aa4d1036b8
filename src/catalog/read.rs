//! Reading a catalog: the JSONL products (`Item`), malformed lines stopped at or skipped
//! (`OnError`), and a code list file (`CodeFile`) whose codes keep their own line numbers.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One catalog line. A field this type does not know is an error, not ignored: a misspelt
/// `codes` (`"code": [...]`) would otherwise index the product with no codes, never retrievable,
/// without a word.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub id: String,
    pub title: String,
    /// Checked to be a JSON object and not kept: the engine reads a product's title and codes
    /// (the codes are what its attributes become, `tools/train/codes.py`), and a catalog of
    /// millions of lines would hold them all in memory for nothing.
    #[serde(default, skip_serializing)]
    pub attributes: Attributes,
    #[serde(default)]
    pub codes: Vec<String>,
    /// The catalog line the product was read from (1-based), for errors; 0 for a product made
    /// in memory. Not a field of the line, nor of a shard's key (moving a product to another
    /// line changes nothing it is encoded from).
    #[serde(skip)]
    pub line: usize,
}

/// A catalog line's `attributes`: a JSON object, read through and dropped (see [`Item`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attributes;

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Attributes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of attributes")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Attributes, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Attributes)
            }
        }
        d.deserialize_map(Object)
    }
}

impl Item {
    /// The product as an error names it: `catalog line 7 (product "a")`, or `product "a"` when
    /// it was not read from a catalog.
    pub fn name(&self) -> String {
        if self.line == 0 {
            format!("product {:?}", self.id)
        } else {
            format!("catalog line {} (product {:?})", self.line, self.id)
        }
    }
}

/// Where a generation code list came from, for errors: its file and each code's line there
/// (blank lines are not codes, so a code's line is not its position + 1).
#[derive(Debug, Clone)]
pub struct CodeFile {
    pub path: std::path::PathBuf,
    pub lines: Vec<usize>,
}

impl CodeFile {
    /// Reads a code list (one code a line; blank lines are skipped, a byte-order mark is
    /// ignored): the codes, and where each came from.
    pub fn read(path: &Path) -> Result<(Vec<String>, CodeFile)> {
        let text = crate::trie::read_lines_file(path)?;
        let (mut codes, mut lines) = (Vec::new(), Vec::new());
        for (i, line) in crate::trie::without_bom(&text).lines().enumerate() {
            if !line.trim().is_empty() {
                codes.push(line.to_owned());
                lines.push(i + 1);
            }
        }
        let file = CodeFile {
            path: path.to_path_buf(),
            lines,
        };
        Ok((codes, file))
    }

    /// Code `i`'s name in errors: `codes.txt line 5`.
    pub(super) fn name(&self, i: usize) -> String {
        let line = self.lines.get(i).copied().unwrap_or(i + 1);
        format!("{} line {line}", self.path.display())
    }
}

/// Skipped lines named on stderr, at most (the report counts them all).
const SKIPPED_NAMED: usize = 10;

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Stop,
    Skip,
}

/// Reads a JSONL catalog (a UTF-8 byte-order mark is ignored). Blank lines are ignored; a
/// malformed line (not UTF-8, not JSON, not a product), or a product id seen on an earlier
/// line, stops the read with its line number, or is skipped and counted.
pub fn read(path: &Path, on_error: OnError) -> Result<(Vec<Item>, usize)> {
    let bytes = crate::container::read_input(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let (mut items, mut skipped) = (Vec::new(), 0);
    let mut seen = std::collections::HashMap::new();
    // A malformed line: the build's error under `Stop`; under `Skip` counted, and the first
    // few named on stderr (a count alone left nothing to look at).
    let mut malformed = |line: usize, what: String| -> Result<()> {
        let msg = format!("{} line {line}{what}", path.display());
        if on_error == OnError::Stop {
            return Err(Error::Input(msg));
        }
        skipped += 1;
        if skipped <= SKIPPED_NAMED {
            crate::note!("warning: skipped {msg}");
        } else if skipped == SKIPPED_NAMED + 1 {
            crate::note!("warning: more lines skipped; the report's skipped_lines counts them all");
        }
        Ok(())
    };
    // Split as bytes and decoded line by line (as `str::lines` cuts: at `\n`, a `\r` before it
    // dropped): a stray non-UTF-8 byte is one bad line, named and skippable, not a whole
    // catalog refused with no line to look at.
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = match std::str::from_utf8(raw) {
            Ok(line) => line,
            Err(e) => {
                let byte = e.valid_up_to() + 1;
                malformed(
                    i + 1,
                    format!(": not valid UTF-8 (byte {byte} of the line)"),
                )?;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        // serde's derived reader takes a JSON array as the fields in order: `["a","t",{},
        // ["c"]]` was product "a" with code "c". A product is an object.
        if !line.trim_start().starts_with('{') {
            malformed(
                i + 1,
                ": not a JSON object (a product is {\"id\": ..., \"title\": ..., ...})".into(),
            )?;
            continue;
        }
        match serde_json::from_str::<Item>(line) {
            // A blank code is no code: refused here under `Stop`, where the line and product are
            // known (the build sees the catalog's codes as one sorted set). Under `Skip` the
            // product is read, and the build leaves it out by id, as it does a product with a
            // code the model cannot emit, so that `gram eval` counts it (skipped here, its id
            // was lost and a judged product on it was dropped from the judgements).
            Ok(item)
                if on_error == OnError::Stop && item.codes.iter().any(|c| c.trim().is_empty()) =>
            {
                let k = item.codes.iter().position(|c| c.trim().is_empty());
                malformed(
                    i + 1,
                    format!(
                        ": product {:?}: code {} of its `codes` is empty",
                        item.id,
                        k.expect("found above") + 1
                    ),
                )?;
            }
            Ok(mut item) if !item.id.is_empty() => match seen.get(&item.id) {
                None => {
                    seen.insert(item.id.clone(), i + 1);
                    item.line = i + 1;
                    items.push(item);
                }
                Some(first) => {
                    let first = *first;
                    malformed(
                        i + 1,
                        format!(": product id {:?} repeats line {first}", item.id),
                    )?;
                }
            },
            Ok(_) => malformed(i + 1, ": empty product id".into())?,
            Err(e) => {
                // serde_json ends its message with the position within the line ("at line 1
                // column 10"): the column is what is left to say.
                let msg = e.to_string();
                let msg = msg
                    .rsplit_once(" at line ")
                    .map_or(msg.as_str(), |(m, _)| m);
                malformed(i + 1, format!(", column {}: {msg}", e.column()))?;
            }
        }
    }
    if items.is_empty() {
        return Err(Error::Input(format!(
            "{}: no products ({skipped} lines skipped)",
            path.display()
        )));
    }
    Ok((items, skipped))
}
