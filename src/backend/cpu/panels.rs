//! Weights re-laid for the matmul (decode, prefill, beam steps: every row count): panels of
//! 32 output features, k-major. Panel `p` of an `[n, k]` matrix holds, for each `j < k`, the
//! 32 weights `W[32p + c][j]` side by side (bf16: column `c` and `16 + c` share a u32 lane,
//! see `simd::panel_slot`); the last panel is padded with zero columns.
//!
//! Read this way, a kernel keeps 2 × T accumulators of 16 columns each and broadcasts one
//! input value per row and step: no horizontal sums, and every output is one FMA chain over
//! `k` in order, the same bits on every ISA (`simd::panel`). The row-major tile had to sum its
//! lanes for every (weight row, token) pair: about a fifth of its work at `k = 576`.
//!
//! f32, f16 and bf16 weights keep their type. ggml Q4_1 and Q8_0 blocks stay blocks, re-laid
//! per panel (see `blocks`) and dequantized in registers: as many bytes as the file, and the
//! same values and sums as the f32 panels of their dequantization (tested bit for bit).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::simd::{self, Isa, PANEL};
use crate::tensor::{DType, HostTensor, View};

/// The panels of `w: [n, k]`, as a tensor of shape `[panels × 32, k]` (its elements in panel
/// order, not row-major).
pub fn pack(isa: Isa, w: View, n: usize, k: usize) -> HostTensor {
    let panels = n.div_ceil(PANEL);
    let shape = vec![panels * PANEL, k];
    match w {
        View::F16(s) => HostTensor::from_f16(lay(s, n, k, f16::ZERO, |c| c), shape),
        View::BF16(s) => {
            HostTensor::from_bf16(lay(s, n, k, bf16::ZERO, simd::bf16_panel_slot), shape)
        }
        View::F32(s) => HostTensor::from_f32(lay(s, n, k, 0.0, |c| c), shape),
        View::Q4_1(b) if k.is_multiple_of(32) => {
            HostTensor::from_blocks(blocks(b, n, k, 20), DType::Q4_1, shape)
        }
        View::Q8_0(b) if k.is_multiple_of(32) => {
            HostTensor::from_blocks(blocks(b, n, k, 34), DType::Q8_0, shape)
        }
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

/// Re-lays ggml blocks (`bytes` per 32 elements: 20 for Q4_1 = d, m, 16 bytes of nibbles; 34
/// for Q8_0 = d, 32 signed bytes) of row-major `[n, k]` as block panels: per panel and block of
/// 32 input columns, the 32 columns' `d` (f16), for Q4_1 their `m`, then the quants in rows of
/// 32 bytes, byte `c` of a row for output column `c`. Q8_0: row `j` holds input column `j`'s
/// quants. Q4_1: row `j` holds input columns `2j` (low nibble) and `2j + 1` (high nibble),
/// where ggml pairs `j` with `j + 16`, so that a row widened once gives the weights of two
/// consecutive input columns. Same size as the blocks; padding columns are all zero (value 0).
fn blocks(w: &[u8], n: usize, k: usize, bytes: usize) -> Vec<u8> {
    let (panels, nb) = (n.div_ceil(PANEL), k / 32);
    let scales = if bytes == 20 { 4 } else { 2 };
    let mut out = vec![0u8; panels * nb * PANEL * bytes];
    out.par_chunks_mut(nb * PANEL * bytes)
        .enumerate()
        .for_each(|(p, panel)| {
            for (b, blk) in panel.chunks_exact_mut(PANEL * bytes).enumerate() {
                for c in 0..(n - p * PANEL).min(PANEL) {
                    let src = &w[((p * PANEL + c) * nb + b) * bytes..][..bytes];
                    blk[2 * c..2 * c + 2].copy_from_slice(&src[..2]);
                    if scales == 4 {
                        blk[64 + 2 * c..64 + 2 * c + 2].copy_from_slice(&src[2..4]);
                    }
                    let q = &src[scales..];
                    if scales == 4 {
                        // ggml's byte `j` holds quants `j` (low) and `j + 16` (high).
                        let nib = |r: usize| if r < 16 { q[r] & 15 } else { q[r - 16] >> 4 };
                        for j in 0..16 {
                            blk[128 + j * PANEL + c] = nib(2 * j) | nib(2 * j + 1) << 4;
                        }
                    } else {
                        for (j, &q) in q.iter().enumerate() {
                            blk[64 + j * PANEL + c] = q;
                        }
                    }
                }
            }
        });
    out
}

/// One block panel `p: [k, 32]` (Q4_1 or Q8_0, `k % 32 == 0`) dequantized into the f32 panel
/// of its values, `out: [k, 32]`: for calls with more token rows than one register pass takes,
/// which then sweep this copy (in L2) instead of dequantizing the panel once per pass. The
/// values of `simd::panel_weight`, bit for bit (`q·d` is exact, so `q·d + m` rounds once).
pub fn dequantize(isa: Isa, p: View, k: usize, out: &mut [f32]) {
    // Whole blocks only: a partial one would be left out, its inputs read as zero weights.
    assert!(
        !p.is_quantized() || k.is_multiple_of(32),
        "dequantize: a block panel of whole blocks; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.runnable() != Isa::Scalar {
        // SAFETY: a runnable AVX2 or AVX-512 ISA means the CPU has avx2, fma and f16c.
        return unsafe { dequantize_avx2(p, k, out) };
    }
    let _ = isa;
    dequantize_body(p, k, out)
}

/// [`dequantize`] compiled for AVX2 (the loops over the 32 columns vectorize).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_avx2(p: View, k: usize, out: &mut [f32]) {
    dequantize_body(p, k, out)
}

#[inline(always)]
fn dequantize_body(p: View, k: usize, out: &mut [f32]) {
    // The 32 f16 scales (or minima) at `o`, widened (F16C through `half` where the CPU has it).
    let scales = |b: &[u8], o: usize| {
        let mut v = [0f32; PANEL];
        match bytemuck::try_cast_slice::<u8, f16>(&b[o..o + 2 * PANEL]) {
            Ok(h) => h.convert_to_f32_slice(&mut v),
            Err(_) => {
                for (c, v) in v.iter_mut().enumerate() {
                    *v = f16::from_le_bytes([b[o + 2 * c], b[o + 2 * c + 1]]).to_f32();
                }
            }
        }
        v
    };
    let out = &mut out[..k * PANEL];
    match p {
        View::Q4_1(b) => {
            for (blk, o) in b.chunks_exact(640).zip(out.chunks_exact_mut(32 * PANEL)) {
                let (d, m) = (scales(blk, 0), scales(blk, 64));
                for (q, o) in blk[128..]
                    .chunks_exact(PANEL)
                    .zip(o.chunks_exact_mut(2 * PANEL))
                {
                    let (lo, hi) = o.split_at_mut(PANEL);
                    for c in 0..PANEL {
                        lo[c] = (q[c] & 15) as f32 * d[c] + m[c];
                        hi[c] = (q[c] >> 4) as f32 * d[c] + m[c];
                    }
                }
            }
        }
        View::Q8_0(b) => {
            for (blk, o) in b.chunks_exact(1088).zip(out.chunks_exact_mut(32 * PANEL)) {
                let d = scales(blk, 0);
                for (q, o) in blk[64..].chunks_exact(PANEL).zip(o.chunks_exact_mut(PANEL)) {
                    for c in 0..PANEL {
                        o[c] = q[c] as i8 as f32 * d[c];
                    }
                }
            }
        }
        _ => {
            for (j, o) in out.chunks_exact_mut(PANEL).enumerate() {
                for (c, o) in o.iter_mut().enumerate() {
                    *o = simd::panel_weight(p, j, c);
                }
            }
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

    /// A block panel's f32 copy takes whole blocks only: `k` = 48 (a block and a half) was
    /// copied as one block, the last 16 inputs read as zero weights.
    #[test]
    fn a_block_panel_of_a_partial_block_is_refused() {
        let blocks = vec![0x11u8; 2 * PANEL * 20];
        let mut out = vec![0f32; 48 * PANEL];
        for isa in Isa::available() {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dequantize(isa, View::Q4_1(&blocks), 48, &mut out)
            }));
            assert!(r.is_err(), "{isa:?}: a partial block was copied");
        }
    }

    /// Every weight of every dtype reads back (through `simd::panel_weight`, the layout's
    /// reference reader) as the row-major matrix's value, bit for bit; padding is zero.
    #[test]
    fn panels_hold_every_weight_where_the_kernels_read_it() {
        let (n, k) = (45, 64);
        let wf: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut q8 = vec![0u8; n * k / 32 * 34];
        for (i, b) in q8.chunks_exact_mut(34).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.01 + i as f32 * 1e-4).to_le_bytes());
            for (j, v) in b[2..].iter_mut().enumerate() {
                *v = (i * 7 + j * 13) as u8;
            }
        }
        let mut q4 = vec![0u8; n * k / 32 * 20];
        for (i, b) in q4.chunks_exact_mut(20).enumerate() {
            b[..2].copy_from_slice(&f16::from_f32(0.02 + i as f32 * 1e-4).to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(-0.1 + i as f32 * 3e-4).to_le_bytes());
            for (j, v) in b[4..].iter_mut().enumerate() {
                *v = (i * 11 + j * 29) as u8;
            }
        }
        for w in [
            View::F32(&wf),
            View::F16(&w16),
            View::BF16(&wb),
            View::Q8_0(&q8),
            View::Q4_1(&q4),
        ] {
            let t = pack(Isa::detect(), w, n, k);
            assert_eq!(t.shape(), &[64, k]);
            assert_eq!(t.view().is_quantized(), w.is_quantized());
            for r in 0..64 {
                let (panel, c) = (r / PANEL, r % PANEL);
                let p = t.view().slice(panel * PANEL * k..(panel + 1) * PANEL * k);
                for j in 0..k {
                    let want = if r < n { w.get(r * k + j) } else { 0.0 };
                    let got = simd::panel_weight(p, j, c);
                    assert_eq!(got.to_bits(), want.to_bits(), "row {r} col {j}");
                }
                for isa in Isa::available() {
                    let mut f = vec![f32::NAN; k * PANEL];
                    dequantize(isa, p, k, &mut f);
                    for j in 0..k {
                        let want = if r < n { w.get(r * k + j) } else { 0.0 };
                        let got = f[j * PANEL + c].to_bits();
                        assert_eq!(got, want.to_bits(), "{isa:?} f32 {r} {j}");
                    }
                }
            }
        }
    }
}
