//! Attention launches of the CUDA backend: the per-pass attention plan (prompt tiles, beam
//! groups sharing a span, their uploads) made into `attention_prefill` / `attention_decode`
//! launches, and how decode attention splits a query's beam rows over blocks.

use super::graph::KArg;
use super::*;

impl CudaBackend {
    pub(super) fn attention_impl(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        batch: KvRows<'_>,
        shape: AttnShape,
        out: &CudaBuf,
    ) -> Result<()> {
        let d = shape.head_dim;
        if !HEAD_DIMS.contains(&d) {
            return Err(Error::Device(format!(
                "head dim {d}: the attention kernels have 64 and 128"
            )));
        }
        let mut s = lock(&self.scratch);
        let key = [
            batch.rows.as_ptr() as usize,
            batch.rows.len(),
            batch.links.as_ptr() as usize,
            batch.links.len(),
        ];
        let memo = s
            .attn
            .as_ref()
            .filter(|m| s.pass_gen != 0 && m.gen == s.pass_gen && m.key == key)
            .map(|m| (m.plan.clone(), m.rows_p, m.links_p, m.links_cap, m.groups_p));
        let (plan, rows_p, links_p, links_cap, groups_p) = match memo {
            Some(m) => m,
            None => {
                let plan = std::sync::Arc::new(plan_attention(batch.rows));
                let rows_p = self.upload_rows(&mut s, batch.rows)?;
                let links_p = self.upload(&mut s, Slot::Links, batch.links)?;
                // Bounds checks against the link buffer's capacity (every row's links were
                // checked against the batch on the host): the same number every step, so a
                // step's launch parameters do not change as links accumulate.
                let links_cap = s.uploads.get(&Slot::Links).map_or(0, |u| u.dev.len());
                let groups_p = self.upload(&mut s, Slot::Groups, &plan.groups)?;
                s.attn = Some(AttnMemo {
                    gen: s.pass_gen,
                    key,
                    plan: plan.clone(),
                    rows_p,
                    links_p,
                    links_cap,
                    groups_p,
                });
                (plan, rows_p, links_p, links_cap, groups_p)
            }
        };
        // Every run writes its rows of `out` and of their bf16 copy (o_proj's operand).
        let out_b = self.shadow_for(&mut s, out, out.len)?;
        drop(s);
        let layer_off = (layer * kv.entries * kv.kv_dim * 4) as u64;
        let q_stride = (shape.heads * d * 4) as u64;
        let g = shape.heads / shape.kv_heads.max(1);
        for run in &plan.runs {
            let n_groups = run.groups.1 - run.groups.0;
            let max_group = (run.groups.0..run.groups.1)
                .map(|i| plan.groups[i + 1] - plan.groups[i])
                .max()
                .unwrap_or(0);
            let rows_per_block = self.decode_rows.rows_per_block(
                g,
                max_group as usize,
                n_groups * shape.kv_heads,
                self.sms,
            );
            let row_slices = max_group.div_ceil(rows_per_block).max(1);
            // `plan::MAX_DECODE_GROUP` keeps this in bounds; an error, not a failed launch, if not.
            if !run.prefill && shape.kv_heads as u64 * row_slices as u64 > 65_535 {
                return Err(Error::Device(format!(
                    "decode attention grid of {} KV heads × {row_slices} row slices exceeds \
                     65,535; this is a bug",
                    shape.kv_heads
                )));
            }
            let p = AttnParams {
                q: self.bptr(q) + run.rows.0 as u64 * q_stride,
                out: self.bptr(out) + run.rows.0 as u64 * q_stride,
                k_cache: self.ptr(&kv.k) + layer_off,
                v_cache: self.ptr(&kv.v) + layer_off,
                rows: rows_p + run.rows.0 as u64 * 24,
                links: links_p,
                groups: groups_p + run.groups.0 as u64 * 4,
                part_o: 0,
                part_ml: 0,
                // The run's rows of the bf16 copy, as `out` above (2 bytes a value).
                out_b: if out_b == 0 {
                    0
                } else {
                    out_b + run.rows.0 as u64 * q_stride / 2
                },
                n_rows: (run.rows.1 - run.rows.0) as u32,
                n_links: links_cap as u32,
                n_groups: n_groups as u32,
                entries: kv.entries as u32,
                heads: shape.heads as u32,
                kv_heads: shape.kv_heads as u32,
                rows_per_block,
                row_slices,
                n_chunks: 1,
                scale: shape.scale(),
            };
            let (name, grid, block) = if run.prefill {
                (
                    if d == 64 {
                        "attention_prefill_d64_f32"
                    } else {
                        "attention_prefill_d128_f32"
                    },
                    (n_groups as u32, shape.heads as u32, 1),
                    128,
                )
            } else {
                (
                    if d == 64 {
                        "attention_decode_d64_f32"
                    } else {
                        "attention_decode_d128_f32"
                    },
                    (n_groups as u32, shape.kv_heads as u32 * row_slices, 1),
                    256,
                )
            };
            self.launch(name, grid, block, &[KArg::Attn(&p)])?;
        }
        Ok(())
    }
}

/// Rows of a query's beams per decode-attention block (`GRAM_CUDA_DECODE_ROWS`): a block has
/// 8 warps, each taking the block's (row, query head) pairs in turn, and each block reads the
/// shared prompt chunk once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecodeRows {
    /// `floor(8 / G)` (the default): one pair per warp, more blocks. On an H100 (tenth
    /// session) it took the 10-row SmolLM2- and Qwen-shaped passes 15–17 % lower with the other
    /// attention changes of that commit, but grids already holding ≥ 1,024 blocks at `ceil`
    /// (64 queries × beam 16 or 64) were 1–5 % slower: twice the prompt re-reads.
    Floor,
    /// `ceil(8 / G)` (the earlier rule): fewer blocks, some warps take two pairs.
    Ceil,
    /// `ceil` where its grid has at least 6 blocks an SM, else `floor` (the rule those
    /// numbers suggest; not measured yet).
    Auto,
}

impl DecodeRows {
    pub(super) fn from_env() -> Self {
        match std::env::var("GRAM_CUDA_DECODE_ROWS").as_deref() {
            Ok("ceil") => DecodeRows::Ceil,
            Ok("auto") => DecodeRows::Auto,
            _ => DecodeRows::Floor,
        }
    }

    /// Rows per block for query heads per KV head `g`, the largest group of rows sharing a
    /// span `max_group`, `blocks_per_slice` (groups × KV heads) and the device's SMs.
    fn rows_per_block(self, g: usize, max_group: usize, blocks_per_slice: usize, sms: u32) -> u32 {
        let g = g.max(1);
        let floor = (8 / g).max(1);
        let ceil = 8usize.div_ceil(g).max(1);
        let rows = match self {
            DecodeRows::Floor => floor,
            DecodeRows::Ceil => ceil,
            DecodeRows::Auto => {
                let ceil_grid = blocks_per_slice * max_group.div_ceil(ceil).max(1);
                if ceil_grid >= 6 * sms as usize {
                    ceil
                } else {
                    floor
                }
            }
        };
        rows as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rows_per_block() {
        // SmolLM2 (G = 3), Qwen2.5-0.5B (G = 7), G = 1 and G = 16, on 132 SMs.
        assert_eq!(DecodeRows::Floor.rows_per_block(3, 10, 3, 132), 2);
        assert_eq!(DecodeRows::Ceil.rows_per_block(3, 10, 3, 132), 3);
        assert_eq!(DecodeRows::Floor.rows_per_block(7, 10, 2, 132), 1);
        assert_eq!(DecodeRows::Ceil.rows_per_block(7, 10, 2, 132), 2);
        assert_eq!(DecodeRows::Floor.rows_per_block(1, 10, 2, 132), 8);
        assert_eq!(DecodeRows::Floor.rows_per_block(16, 10, 2, 132), 1);
        assert_eq!(DecodeRows::Ceil.rows_per_block(16, 10, 2, 132), 1);
        // Auto: one query of beam 10 (12 blocks at ceil) splits finer; 64 queries of beam 64
        // (64 × 3 × 22 = 4,224 blocks at ceil) keep the coarser split; 64 queries of beam 10
        // (768 < 6 × 132) the finer one.
        assert_eq!(DecodeRows::Auto.rows_per_block(3, 10, 3, 132), 2);
        assert_eq!(DecodeRows::Auto.rows_per_block(3, 64, 64 * 3, 132), 3);
        assert_eq!(DecodeRows::Auto.rows_per_block(3, 10, 64 * 3, 132), 2);
        assert_eq!(DecodeRows::Auto.rows_per_block(0, 10, 1, 132), 8);
    }
}
