//! A build's saved shards: each finished shard of products is written (atomically) beside the
//! index, keyed by a checksum of everything it was encoded from, so that a build stopped and
//! run again with the same inputs takes it instead of encoding it again. A shard that does not
//! read back whole, or was made from other inputs, is made again.

use std::path::Path;

use super::Found;
use crate::error::Result;

/// Bumped when what a shard holds changes meaning (2: a product left out; 3: XXH3 sums and
/// the generated count).
pub(super) const SHARD_VERSION: u32 = 3;
const SHARD_MAGIC: &[u8; 8] = b"GRAMSHRD";

/// A product's code count in a shard that says it was left out.
const LEFT_OUT: u32 = u32::MAX;

/// A saved shard: magic, key (the inputs' checksum), payload checksum, payload. Payload: `u32`
/// product count, `u32` count of the codes generation found (the build report's
/// `generated`), per product `u32` code count ([`LEFT_OUT`] for a product left out), per code
/// `u32` text length, the text, `u32` token count, `f32`s.
pub(super) fn write_shard(
    path: &Path,
    key: u64,
    found: &Found,
    left_out: &[bool],
    generated: usize,
) -> Result<()> {
    let mut payload = Vec::new();
    let u32 = |v: &mut Vec<u8>, x: usize| v.extend((x as u32).to_le_bytes());
    u32(&mut payload, found.len());
    u32(&mut payload, generated);
    for (codes, &out) in found.iter().zip(left_out) {
        if out {
            payload.extend(LEFT_OUT.to_le_bytes());
            continue;
        }
        u32(&mut payload, codes.len());
        for (text, pt) in codes {
            u32(&mut payload, text.len());
            payload.extend(text.as_bytes());
            u32(&mut payload, pt.len());
            payload.extend(pt.iter().flat_map(|p| p.to_le_bytes()));
        }
    }
    let mut bytes = SHARD_MAGIC.to_vec();
    bytes.extend(key.to_le_bytes());
    bytes.extend(crate::container::checksum(&payload).to_le_bytes());
    bytes.extend(payload);
    crate::container::write_atomic(path, &bytes)
}

/// A saved shard with this key and `items` products, if there is one intact (its codes per
/// product, which were left out, and how many codes generation found); anything else (cut
/// short at any byte, another key, another count) is recomputed.
pub(super) fn read_shard(path: &Path, key: u64, items: usize) -> Option<(Found, Vec<bool>, usize)> {
    let bytes = crate::container::read_regular(path).ok()?;
    let word = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    if bytes.get(..8)? != SHARD_MAGIC || word(&bytes, 8)? != key {
        return None;
    }
    let sum = word(&bytes, 16)?;
    let payload = bytes.get(24..)?;
    if sum != crate::container::checksum(payload) {
        return None;
    }
    let mut r = Reader { bytes: payload };
    let products = r.count()?;
    if products != items {
        return None;
    }
    let generated = r.count()?;
    let mut found = Vec::with_capacity(products.min(payload.len()));
    let mut left_out = Vec::with_capacity(products.min(payload.len()));
    for _ in 0..products {
        let n = r.count()?;
        left_out.push(n == LEFT_OUT as usize);
        if n == LEFT_OUT as usize {
            found.push(Vec::new());
            continue;
        }
        // Each code takes at least 8 bytes (its two counts): no more room than the rest holds.
        let mut codes = Vec::with_capacity(n.min(r.bytes.len() / 8));
        for _ in 0..n {
            let len = r.count()?;
            let text = String::from_utf8(r.take(len)?.to_vec()).ok()?;
            let len = r.count()?;
            let pt = r
                .take(len.checked_mul(4)?)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            codes.push((text, pt));
        }
        found.push(codes);
    }
    r.bytes.is_empty().then_some((found, left_out, generated))
}

/// Reads a shard's payload front to back; `None` past its end.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn count(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
}
