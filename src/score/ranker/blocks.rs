//! The block merge, [`Ranker::rank_blocks`]: every list scored whole, then merged one block of
//! product ids at a time into block-local slots, each block's products offered to a running
//! top-`k` heap (`Worst`). The path for `k` past [`THRESHOLD_MAX_K`](super::THRESHOLD_MAX_K)
//! and for lists that are not `ordinary`.

use super::Ranker;
use crate::backend::cpu::simd::Isa;
use crate::score::{score_postings, Aggregate, Hit, Postings};

/// Product ids aggregated together by [`Ranker`]: 32 Ki slots, 256 KiB, an L2's share.
const RANK_BLOCK: u32 = 1 << 15;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Slot {
    /// The block that last wrote `score`.
    epoch: u32,
    score: f32,
}

/// A `(product, score)` ordered so that the heap's top is the worst kept: lowest score, and
/// among equal scores the highest product id (`rank`'s tie-break).
#[derive(Debug, Clone, Copy)]
pub(super) struct Worst(u32, f32);

impl Worst {
    fn key(&self, other: &Worst) -> std::cmp::Ordering {
        other.1.total_cmp(&self.1).then(self.0.cmp(&other.0))
    }
}

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.key(other).is_eq()
    }
}

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key(other)
    }
}

impl Ranker {
    /// Every list's scores into `scores` (list `c`'s from `at[c]`).
    fn score_lists(&mut self, isa: Isa, lists: &[Postings]) {
        self.scores.clear();
        self.at.clear();
        for l in lists {
            let from = self.scores.len();
            self.at.push(from);
            self.scores.resize(from + l.products.len(), l.prior);
            score_postings(isa, l.pq, l.w, l.pt, &mut self.scores[from..]);
        }
    }

    /// The block merge described on [`Ranker`]: as [`rank`](crate::score::rank).
    pub fn rank_blocks(
        &mut self,
        isa: Isa,
        lists: &[Postings],
        aggregate: Aggregate,
        k: usize,
        products: u32,
    ) -> Vec<Hit> {
        self.merged = true;
        if k == 0 {
            return Vec::new();
        }
        if self.slots.is_empty() {
            self.slots = vec![Slot::default(); RANK_BLOCK as usize];
        }
        self.score_lists(isa, lists);
        let at = &self.at;
        self.top.clear();
        let mut cursor: Vec<usize> = vec![0; lists.len()];
        loop {
            let next = lists
                .iter()
                .zip(&cursor)
                .filter_map(|(l, &c)| l.products.get(c))
                .min();
            let Some(&next) = next.filter(|&&p| p < products) else {
                break; // every list is done (or only stray postings are left)
            };
            let start = next - next % RANK_BLOCK;
            let end = start.saturating_add(RANK_BLOCK).min(products);
            if self.epoch == u32::MAX {
                self.slots.fill(Slot::default());
                self.epoch = 0;
            }
            self.epoch += 1;
            let epoch = self.epoch;
            for (i, l) in lists.iter().enumerate() {
                let c = cursor[i];
                // A scan, not a binary search: it makes progress on a corrupt (unsorted) list
                // too, and these postings are read next anyway.
                let n = l.products[c..].iter().take_while(|&&p| p < end).count();
                let scores = &self.scores[at[i] + c..at[i] + c + n];
                for (&p, &v) in l.products[c..c + n].iter().zip(scores) {
                    // `start <= p` holds on sorted lists; an unsorted one may step back.
                    let Some(slot) = self.slots.get_mut(p.wrapping_sub(start) as usize) else {
                        continue;
                    };
                    if slot.epoch != epoch {
                        *slot = Slot { epoch, score: v };
                        self.touched.push(p);
                    } else {
                        slot.score = match aggregate {
                            Aggregate::Sum => slot.score + v,
                            Aggregate::Max => slot.score.max(v),
                        };
                    }
                }
                cursor[i] = c + n;
            }
            for &p in &self.touched {
                let w = Worst(p, self.slots[(p - start) as usize].score);
                if self.top.len() < k {
                    self.top.push(w);
                } else if self.top.peek().is_some_and(|worst| w < *worst) {
                    self.top.pop();
                    self.top.push(w);
                }
            }
            self.touched.clear();
        }
        // Best first: ascending in `Worst`'s order is best to worst.
        let best = std::mem::take(&mut self.top).into_sorted_vec();
        best.iter()
            .map(|&Worst(product, score)| Hit {
                product,
                score,
                codes: (0..lists.len() as u32)
                    .filter(|&c| lists[c as usize].products.binary_search(&product).is_ok())
                    .collect(),
            })
            .collect()
    }
}
