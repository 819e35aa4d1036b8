//! Weights re-laid for the many-row matmul (prefill, beam decode): panels of 32 output
//! features, k-major. Panel `p` of an `[n, k]` matrix holds, for each `j < k`, the 32 weights
//! `W[32p + c][j]` side by side (bf16: column `c` and `16 + c` share a u32 lane, see
//! `simd::panel_slot`); the last panel is padded with zero columns.
//!
//! Read this way, a kernel keeps 2 × T accumulators of 16 columns each and broadcasts one
//! input value per row and step: no horizontal sums, and every output is one FMA chain over
//! `k` in order, the same bits on every ISA (`simd::panel`). The row-major tile had to sum its
//! lanes for every (weight row, token) pair: about a fifth of its work at `k = 576`.
//!
//! f32, f16 and bf16 weights keep their type; ggml blocks become f32 (the values of a
//! load-time dequantization, which is what the many-row kernels read before).

use half::{bf16, f16};
use rayon::prelude::*;

use super::simd::{self, Isa, PANEL};
use crate::tensor::{HostTensor, View};

/// The panels of `w: [n, k]`, as a tensor of shape `[panels × 32, k]` (its elements in panel
/// order, not row-major).
pub fn pack(isa: Isa, w: View, n: usize, k: usize) -> HostTensor {
    let panels = n.div_ceil(PANEL);
    let shape = vec![panels * PANEL, k];
    match w {
        View::F16(s) => HostTensor::from_f16(lay(s, n, k, f16::ZERO, |c| c), shape),
        View::BF16(s) => HostTensor::from_bf16(
            lay(s, n, k, bf16::ZERO, |c| {
                simd::panel_slot(View::BF16(&[]), c)
            }),
            shape,
        ),
        View::F32(s) => HostTensor::from_f32(lay(s, n, k, 0.0, |c| c), shape),
        View::Q4_1(_) | View::Q8_0(_) => {
            let mut out = vec![0f32; panels * PANEL * k];
            out.par_chunks_mut(PANEL * k)
                .enumerate()
                .for_each(|(p, panel)| {
                    let rows = (n - p * PANEL).min(PANEL);
                    let mut dense = vec![0f32; rows * k];
                    simd::dequant_rows(isa, w, p * PANEL, rows, k, &mut dense);
                    for (c, row) in dense.chunks_exact(k).enumerate() {
                        for (j, &v) in row.iter().enumerate() {
                            panel[j * PANEL + c] = v;
                        }
                    }
                });
            HostTensor::from_f32(out, shape)
        }
    }
}

/// Lays out row-major `w: [n, k]` of a plain element type; `slot(c)` places column `c`.
fn lay<T: Copy + Send + Sync>(
    w: &[T],
    n: usize,
    k: usize,
    zero: T,
    slot: impl Fn(usize) -> usize + Sync,
) -> Vec<T> {
    let panels = n.div_ceil(PANEL);
    let mut out = vec![zero; panels * PANEL * k];
    out.par_chunks_mut(PANEL * k)
        .enumerate()
        .for_each(|(p, panel)| {
            for c in 0..(n - p * PANEL).min(PANEL) {
                let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                let s = slot(c);
                for (j, &v) in row.iter().enumerate() {
                    panel[j * PANEL + s] = v;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of every dtype lands where `panel_slot` says, padding is zero.
    #[test]
    fn panels_hold_every_weight_where_the_kernels_read_it() {
        let (n, k) = (45, 64);
        let wf: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut q = vec![0u8; n * k / 32 * 34];
        for (i, b) in q.chunks_exact_mut(34).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.01 + i as f32 * 1e-4).to_le_bytes());
            b[2..]
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = (i * 7 + j * 13) as u8);
        }
        for w in [
            View::F32(&wf),
            View::F16(&w16),
            View::BF16(&wb),
            View::Q8_0(&q),
        ] {
            let t = pack(Isa::detect(), w, n, k);
            assert_eq!(t.shape(), &[64, k]);
            let p = t.view();
            for r in 0..64 {
                for j in 0..k {
                    let (panel, c) = (r / PANEL, r % PANEL);
                    let at = panel * PANEL * k + j * PANEL + simd::panel_slot(p, c);
                    let want = if r < n { w.get(r * k + j) } else { 0.0 };
                    assert_eq!(p.get(at).to_bits(), want.to_bits(), "row {r} col {j}");
                }
            }
        }
    }
}
