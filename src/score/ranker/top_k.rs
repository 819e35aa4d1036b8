//! The threshold passes' running top `k` of distinct products, [`TopK`]: kept as integer keys
//! in `rank`'s order, with a floor that rises at each compaction.

use super::THRESHOLD_MAX_K;

/// The best `k` distinct products offered so far ([`Ranker`](super::Ranker)'s threshold passes), as
/// [`TopK::key`]s in no order: the best `k` as of the last compaction (all at or above
/// `floor`) and those that entered since; at `2k` kept, a selection (`select_nth_unstable`)
/// keeps the best `k` and raises the floor. No heap: an entry costs a push, and the selection
/// a few nanoseconds an entry (a heap's sift was ~30 ns of mispredicted branches). A count per
/// hash bucket of the products kept tells a product not kept — nearly every one offered — in
/// one read; a kept one is found by a scan.
#[derive(Debug, Default)]
pub(super) struct TopK {
    k: usize,
    kept: Vec<u64>,
    /// The `k`-th best key at the last compaction; 0 (below every finite score's key) before.
    floor: u64,
    /// Kept products per bucket of [`TopK::bucket`] (`2k ≤ 4 THRESHOLD_MAX_K` fits a `u16`).
    held: Vec<u16>,
}

impl TopK {
    /// 16 Ki buckets (32 KiB): at `k` = 300 (300–600 kept) a product not kept is sent to
    /// the scan 2–4 % of the time.
    const BUCKETS: u32 = 1 << 14;

    fn bucket(product: u32) -> usize {
        (product.wrapping_mul(0x9e37_79b1) >> (32 - Self::BUCKETS.trailing_zeros())) as usize
    }

    /// `(score, product)` as one integer in `rank`'s order, greater = better: the score's bits
    /// made monotone (the order of `f32::total_cmp`), then the product id inverted (ties to the
    /// lower id). One integer compare instead of two branchy ones.
    fn key(product: u32, score: f32) -> u64 {
        let b = score.to_bits();
        let ordered = if b >> 31 == 1 { !b } else { b | 1 << 31 };
        (ordered as u64) << 32 | !product as u64
    }

    fn product(key: u64) -> u32 {
        !(key as u32)
    }

    fn score(key: u64) -> f32 {
        let o = (key >> 32) as u32;
        f32::from_bits(if o >> 31 == 1 { o & !(1 << 31) } else { !o })
    }

    pub(super) fn reset(&mut self, k: usize) {
        debug_assert!(k <= 2 * THRESHOLD_MAX_K, "counts fit a u16");
        if self.held.is_empty() {
            self.held = vec![0; Self::BUCKETS as usize];
        }
        self.clear();
        self.k = k;
    }

    /// Empties the top (and only its buckets).
    pub(super) fn clear(&mut self) {
        for &key in &self.kept {
            self.held[Self::bucket(Self::product(key))] = 0;
        }
        self.kept.clear();
        self.floor = 0;
    }

    /// The best `k` products kept (fewer when fewer were offered), in no order.
    pub(super) fn products(&mut self) -> impl Iterator<Item = u32> + '_ {
        self.entries().map(|(product, _)| product)
    }

    /// The best `k` products kept and their best scores offered, in no order.
    pub(super) fn entries(&mut self) -> impl Iterator<Item = (u32, f32)> + '_ {
        if self.kept.len() > self.k {
            self.compact();
        }
        self.kept
            .iter()
            .map(|&key| (Self::product(key), Self::score(key)))
    }

    /// The lowest score an offer may enter or change the top with (an equal score enters
    /// only with a lower product id): the `k`-th best at the last compaction, else −∞.
    pub(super) fn floor(&self) -> f32 {
        if self.floor == 0 {
            f32::NEG_INFINITY
        } else {
            Self::score(self.floor)
        }
    }

    /// Offers a posting under `max`: a product kept keeps its better score; a new one enters
    /// if it is at or above the floor.
    pub(super) fn offer_max(&mut self, product: u32, score: f32) {
        let key = Self::key(product, score);
        if key < self.floor {
            return; // below the `k` best kept: it neither enters nor betters one of them
        }
        let b = Self::bucket(product);
        if self.held[b] != 0 {
            // Eight keys compared at once, branch-free, and only a group holding the product
            // looked into: nearly every product sent here is not kept (another shares its
            // bucket), and a scan key by key of the up to `2k` kept cost ~2 cycles a key.
            let id = !product;
            for group in self.kept.chunks_mut(8) {
                if group.iter().fold(false, |any, &h| any | (h as u32 == id)) {
                    let kept = group.iter_mut().find(|h| **h as u32 == id).expect("found");
                    *kept = (*kept).max(key);
                    return;
                }
            }
        }
        self.kept.push(key);
        self.held[b] += 1;
        if self.kept.len() >= 2 * self.k {
            self.compact();
        }
    }

    /// Keeps the best `k` and makes the `k`-th of them the floor.
    fn compact(&mut self) {
        let k = self.k;
        self.kept.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        for &key in &self.kept[k..] {
            self.held[Self::bucket(Self::product(key))] -= 1;
        }
        self.kept.truncate(k);
        self.floor = self.kept[k - 1];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::tests::rng;

    /// `TopK::key` orders as `rank` does (score by `total_cmp`, then the lower product) and
    /// decodes back, ±0 and infinities included.
    #[test]
    fn top_k_keys_order_as_rank() {
        let mut next = rng(12);
        let pick = |r: u64| match r % 6 {
            0 => [0.0, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY][(r / 6 % 6) as usize],
            _ => f32::from_bits(r as u32 >> 1) * if r & 1 << 40 == 0 { 1.0 } else { -1.0 },
        };
        for _ in 0..10_000 {
            let (a, b) = ((next() % 5) as u32, (next() % 5) as u32);
            let (sa, sb) = (pick(next()), pick(next()));
            let (ka, kb) = (TopK::key(a, sa), TopK::key(b, sb));
            assert_eq!(
                kb.cmp(&ka),
                sb.total_cmp(&sa).then(a.cmp(&b)),
                "({a}, {sa}) vs ({b}, {sb})"
            );
            assert_eq!(
                (TopK::product(ka), TopK::score(ka).to_bits()),
                (a, sa.to_bits())
            );
        }
    }
}
