//! How one attention call is launched: which rows go to the prefill kernel (tiles of one
//! sequence's consecutive positions) and which to the decode kernel (groups of beams sharing a
//! span). Host-side only; the kernels are correct for any grouping, the plan decides speed.

use crate::backend::RowKv;

/// How one attention call is launched: runs of consecutive rows, each a prefill run (tiles of
/// one sequence's consecutive positions, the prefill kernel) or a decode run (groups of rows
/// sharing a span: a query's beams, the decode kernel). `groups` holds every run's CSR offsets,
/// relative to the run's first row, back to back (run r uses `groups[r.groups.0..=r.groups.1]`).
#[derive(Debug, PartialEq, Eq)]
pub struct AttnPlan {
    pub groups: Vec<u32>,
    pub runs: Vec<AttnRun>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct AttnRun {
    pub prefill: bool,
    /// Batch rows `rows.0..rows.1`.
    pub rows: (usize, usize),
    /// Its groups: `groups[g]..groups[g + 1]` for `g` in `groups.0..groups.1`.
    pub groups: (usize, usize),
}

/// Rows of a prefill tile, at most (the kernel walks 16 rows at a time).
const TILE: usize = 16;

/// Rows of a decode group, at most. Every beam of a batch shares one span once the batch has a
/// shared prompt prefix (`BeamSearch::set_prefix`), and the decode kernel's grid height is KV
/// heads × the largest group's row slices: unbounded, 16,384 beams of a 1B model passed CUDA's
/// 65,535. A longer run of one span is split into groups of this many (up to 64 KV heads × 512
/// slices of one row stay under the limit).
pub const MAX_DECODE_GROUP: usize = 512;

/// Splits a batch into prefill tiles and decode groups (see [`AttnPlan`]). Rows of a prompt
/// (each following the previous one) go to the prefill kernel in tiles of up to 16; other rows
/// (beams) go to the decode kernel, grouped while they share one span, at most
/// [`MAX_DECODE_GROUP`] rows a group.
pub fn plan_attention(rows: &[RowKv]) -> AttnPlan {
    // Tiles of following rows.
    let mut tiles: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && j - i < TILE && rows[j].follows(&rows[j - 1]) {
            j += 1;
        }
        tiles.push((i, j));
        i = j;
    }
    let mut plan = AttnPlan {
        groups: Vec::new(),
        runs: Vec::new(),
    };
    let mut t = 0;
    while t < tiles.len() {
        let prefill = tiles[t].1 - tiles[t].0 > 1;
        let start_row = tiles[t].0;
        let g0 = plan.groups.len();
        plan.groups.push(0);
        if prefill {
            while t < tiles.len() && tiles[t].1 - tiles[t].0 > 1 {
                plan.groups.push((tiles[t].1 - start_row) as u32);
                t += 1;
            }
        } else {
            // Single rows, grouped while their spans are equal.
            let mut end = start_row;
            while t < tiles.len() && tiles[t].1 - tiles[t].0 == 1 {
                let r = tiles[t].0;
                let group_start = *plan.groups.last().expect("pushed") as usize + start_row;
                let full = r - group_start >= MAX_DECODE_GROUP;
                if r > start_row && (rows[r].span != rows[end - 1].span || full) {
                    plan.groups.push((r - start_row) as u32);
                }
                end = r + 1;
                t += 1;
            }
            plan.groups.push((end - start_row) as u32);
        }
        let end_row = start_row + *plan.groups.last().expect("pushed") as usize;
        plan.runs.push(AttnRun {
            prefill,
            rows: (start_row, end_row),
            groups: (g0, plan.groups.len() - 1),
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous(base: u32, n: u32) -> Vec<RowKv> {
        (0..n).map(|p| RowKv::contiguous(base, p)).collect()
    }

    #[test]
    fn plan_prefill_tiles_and_decode_groups() {
        // Two prompts of 20 and 3 rows, then 4 beams of each (span = the prompt, one link each).
        let mut rows = contiguous(0, 20);
        rows.extend(contiguous(20, 3));
        for q in 0..2u32 {
            let span = if q == 0 { (0, 20) } else { (20, 23) };
            for j in 0..4u32 {
                rows.push(RowKv {
                    pos: span.1 - span.0,
                    entry: 100 + q * 4 + j,
                    span,
                    link: (q * 4 + j, q * 4 + j + 1),
                });
            }
        }
        let plan = plan_attention(&rows);
        assert_eq!(plan.runs.len(), 2);
        assert!(plan.runs[0].prefill);
        assert_eq!(plan.runs[0].rows, (0, 23));
        let g = &plan.groups[plan.runs[0].groups.0..=plan.runs[0].groups.1];
        assert_eq!(g, &[0, 16, 20, 23]);
        assert!(!plan.runs[1].prefill);
        assert_eq!(plan.runs[1].rows, (23, 31));
        let g = &plan.groups[plan.runs[1].groups.0..=plan.runs[1].groups.1];
        assert_eq!(g, &[0, 4, 8]);
    }

    #[test]
    fn a_long_run_of_one_span_is_split_into_bounded_groups() {
        // 1,300 beams that all share the span of one prefix, then 3 beams of another.
        let beam = |i: u32, span: (u32, u32)| RowKv {
            pos: span.1 - span.0,
            entry: 10_000 + i,
            span,
            link: (i, i + 1),
        };
        let mut rows: Vec<RowKv> = (0..1300).map(|i| beam(i, (0, 7))).collect();
        rows.extend((1300..1303).map(|i| beam(i, (7, 9))));
        let plan = plan_attention(&rows);
        assert_eq!(plan.runs.len(), 1);
        let run = &plan.runs[0];
        assert!(!run.prefill);
        assert_eq!(run.rows, (0, 1303));
        let g = &plan.groups[run.groups.0..=run.groups.1];
        assert_eq!(g, &[0, 512, 1024, 1300, 1303]);
        assert!(g
            .windows(2)
            .all(|w| (w[1] - w[0]) as usize <= MAX_DECODE_GROUP));
    }

    #[test]
    fn plan_single_rows_and_shared_prefix_prompts() {
        // One decode row alone; then a shared-prefix prompt (span (0, 5) + its own links).
        let mut rows = vec![RowKv {
            pos: 9,
            entry: 50,
            span: (0, 9),
            link: (0, 1),
        }];
        for i in 0..3u32 {
            rows.push(RowKv {
                pos: 5 + i,
                entry: 60 + i,
                span: (0, 5),
                link: (10, 11 + i),
            });
        }
        let plan = plan_attention(&rows);
        assert_eq!(plan.runs.len(), 2);
        assert!(!plan.runs[0].prefill);
        assert_eq!(plan.runs[0].rows, (0, 1));
        assert!(plan.runs[1].prefill);
        assert_eq!(plan.runs[1].rows, (1, 4));
        // Every row is in exactly one run, in order.
        let covered: usize = plan.runs.iter().map(|r| r.rows.1 - r.rows.0).sum();
        assert_eq!(covered, rows.len());
    }
}
