//! The Q4_1 product (any number of rows, one included) with the token rows quantized to i16
//! (`GRAM_INT16_ACTIVATIONS=1`, AVX512-VNNI only): each row, per block of 32 input columns, becomes
//! `x ≈ s·xq` (`xq` in ±32,767), and a Q4_1 block's product `Σ (q·d + m)·x` becomes `d·s·Σ q·xq +
//! m·s·Σ xq`, the inner sums exact in i32 (`vpdpwssd`, two products a lane), so the nibbles are
//! never converted to f32. About twice the exact kernel's speed at ten rows on an Intel core, at an
//! error of ~2e-5 of the output's scale (docs/PERF.md, "Q4_1 against integer dot products"). Not
//! bit-identical to the exact path; [`panel_q4_1_twin`] is this path's slow twin, bit for bit.

use super::PANEL;
use crate::tensor::View;

/// Token rows quantized per row and block of 32 input columns.
#[derive(Debug)]
pub struct QuantRows {
    /// `[rows, k]`, `round(x / s)`.
    pub xq: Vec<i16>,
    /// `[rows, k / 32]`, the block's scale `max |x| / 32767`.
    pub scale: Vec<f32>,
    /// `[rows, k / 32]`, `s · Σ xq` (the block's sum as the integers see it).
    pub sum: Vec<f32>,
    pub k: usize,
}

impl QuantRows {
    /// Quantizes `rows` rows of `k` values (`k` a multiple of 32): per block, `s = max |x| /
    /// 32767` and `xq = x · (1 / s)` rounded to nearest, ties to even (a block of zeros or of
    /// values below ~1e-34 has `s = 0`; one with a value that is not finite has `s` NaN, so
    /// the outputs it feeds are NaN). The same values on every ISA.
    pub fn new(x: &[f32], rows: usize, k: usize) -> QuantRows {
        assert!(
            k.is_multiple_of(32) && x.len() >= rows * k,
            "quantized rows: k {k} and {} values for {rows} rows; this is a bug",
            x.len()
        );
        let nb = k / 32;
        let mut q = QuantRows {
            xq: vec![0; rows * k],
            scale: vec![0.0; rows * nb],
            sum: vec![0.0; rows * nb],
            k,
        };
        let vector = super::has_vnni();
        for ((blk, xq), (scale, sum)) in x[..rows * k]
            .chunks_exact(32)
            .zip(q.xq.chunks_exact_mut(32))
            .zip(q.scale.iter_mut().zip(q.sum.iter_mut()))
        {
            let (s, total) = quantize_block_best(vector, blk, xq);
            (*scale, *sum) = (s, total as f32 * s);
        }
        q
    }

    /// Rows `t0..t0 + n`: `(xq, scale, sum)`.
    pub fn group(&self, t0: usize, n: usize) -> (&[i16], &[f32], &[f32]) {
        let nb = self.k / 32;
        (
            &self.xq[t0 * self.k..(t0 + n) * self.k],
            &self.scale[t0 * nb..(t0 + n) * nb],
            &self.sum[t0 * nb..(t0 + n) * nb],
        )
    }
}

/// A block with a value that is not finite gets this scale: NaN, so every output it feeds is
/// NaN, as on the exact path (whose non-finite checks then refuse it), not a quiet 0.
const NOT_FINITE: f32 = f32::NAN;

/// A block's scale and reciprocal: `max |x| / 32767`, or 0 (and 0) for a block of zeros or one
/// so small (< ~1e-34) that the reciprocal overflows: its values all quantize to 0.
fn block_scale(amax: f32) -> (f32, f32) {
    let s = amax / 32767.0;
    let inv = 1.0 / s;
    if s > 0.0 && inv.is_finite() {
        (s, inv)
    } else {
        (0.0, 0.0)
    }
}

/// One block of 32, scalar: `(scale, Σ xq)`.
fn quantize_block(blk: &[f32], xq: &mut [i16]) -> (f32, i32) {
    if !blk.iter().all(|v| v.is_finite()) {
        xq.fill(0);
        return (NOT_FINITE, 0);
    }
    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (s, inv) = block_scale(amax);
    // Round to nearest, ties to even, by the 1.5 · 2^23 trick (|x · inv| <= 32767 + ε), as
    // `vcvtps2dq` does; no libm call.
    const MAGIC: f32 = 12_582_912.0;
    let mut total = 0;
    for (q, &v) in xq.iter_mut().zip(blk) {
        *q = ((v * inv + MAGIC) - MAGIC) as i16;
        total += *q as i32;
    }
    (s, total)
}

/// [`quantize_block_avx512`] where `vector` ([`super::has_vnni`], which includes AVX-512
/// F/BW), else [`quantize_block`]: the same values either way.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn quantize_block_best(vector: bool, blk: &[f32], xq: &mut [i16]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: AVX-512 F/BW detected (`vector` is `has_vnni`); 32 values each.
        return unsafe { quantize_block_avx512(blk, xq) };
    }
    quantize_block(blk, xq)
}

/// [`quantize_block`] in AVX-512: the same values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(blk: &[f32], xq: &mut [i16]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let v0 = _mm512_loadu_ps(blk.as_ptr());
    let v1 = _mm512_loadu_ps(blk.as_ptr().add(16));
    // `x · 0` is NaN exactly where `x` is not finite.
    let zero = _mm512_setzero_ps();
    let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(_mm512_mul_ps(v0, zero), _mm512_mul_ps(v1, zero));
    if finite != 0xffff {
        xq.fill(0);
        return (NOT_FINITE, 0);
    }
    let m = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
    let (s, inv) = block_scale(amax);
    let inv = _mm512_set1_ps(inv);
    let h0 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
    let h1 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
    _mm256_storeu_si256(xq.as_mut_ptr() as *mut __m256i, h0);
    _mm256_storeu_si256(xq.as_mut_ptr().add(16) as *mut __m256i, h1);
    // The sum of the values stored (after the saturating narrowing, which |x · inv| <= 32767
    // never needs).
    let total = _mm512_add_epi32(_mm512_cvtepi16_epi32(h0), _mm512_cvtepi16_epi32(h1));
    (s, _mm512_reduce_add_epi32(total))
}

/// The slow twin of the VNNI kernel, bit for bit: per block the exact integer sum, then
/// `y = f32(Σ)·(d·s) + (m·sum + y)`, each step rounded once as the kernel's FMAs do.
pub fn panel_q4_1_twin(
    p: View,
    k: usize,
    (xq, scale, sum): (&[i16], &[f32], &[f32]),
    tr: usize,
    acc: &mut [[f32; PANEL]; super::PANEL_TR],
) {
    let View::Q4_1(b) = p else {
        panic!("int16 panel of a panel that is not Q4_1; this is a bug")
    };
    let nb = k / 32;
    for (t, acc_t) in acc.iter_mut().enumerate().take(tr) {
        for (c, y) in acc_t.iter_mut().enumerate() {
            let mut v = 0f32;
            for blk in 0..nb {
                let mut isum = 0i32;
                for r in 0..32 {
                    let (q, _, _) = super::q4_1_panel_parts(b, blk * 32 + r, c);
                    isum += q as i32 * xq[t * k + blk * 32 + r] as i32;
                }
                let (_, d, m) = super::q4_1_panel_parts(b, blk * 32, c);
                let (s, su) = (scale[t * nb + blk], sum[t * nb + blk]);
                v = (isum as f32).mul_add(d * s, m.mul_add(su, v));
            }
            *y = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 quantizer gives the scalar one's values, scales and sums on random blocks
    /// and on the edge cases: zeros, exact ties, an infinity, a NaN, the largest value negative.
    #[test]
    fn quantizers_agree() {
        if !super::super::has_vnni() {
            eprintln!("no AVX-512 VNNI: the AVX-512 quantizer is not compared here");
        }
        let mut bits = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = move || crate::test_rng::signed_unit(bits());
        let mut blocks: Vec<[f32; 32]> = (0..200)
            .map(|i| std::array::from_fn(|_| next() * [1.0, 1e-6, 3e4][i % 3]))
            .collect();
        blocks.push([0.0; 32]);
        let mut ties = [0.0f32; 32];
        for (j, v) in ties.iter_mut().enumerate() {
            // 32767 at the top, so `x / s` lands on n + 0.5 for these.
            *v = if j == 0 { 32767.0 } else { j as f32 + 0.5 };
        }
        blocks.push(ties);
        let mut special = blocks[0];
        special[3] = f32::INFINITY;
        blocks.push(special);
        let mut nan = blocks[1];
        nan[5] = f32::NAN;
        blocks.push(nan);
        let mut neg = blocks[2];
        neg[9] = -1e5;
        blocks.push(neg);
        blocks.push(std::array::from_fn(|j| (j as f32 - 15.5) * 1e-36));
        for (i, blk) in blocks.iter().enumerate() {
            let mut a = [0i16; 32];
            let (sa, ta) = quantize_block(blk, &mut a);
            assert_eq!(ta, a.iter().map(|&v| v as i32).sum::<i32>(), "block {i}");
            let finite = blk.iter().all(|v| v.is_finite());
            assert_eq!(
                sa.is_nan(),
                !finite,
                "block {i}: NaN scale for a non-finite value"
            );
            if i == 205 {
                assert_eq!((sa, ta), (0.0, 0), "a block too small to scale");
            }
            if i == 201 {
                assert_eq!(&a[1..4], &[2, 2, 4], "ties go to even");
            }
            #[cfg(target_arch = "x86_64")]
            if super::super::has_vnni() {
                let mut b = [0i16; 32];
                // SAFETY: AVX-512 F/BW detected.
                let (sb, tb) = unsafe { quantize_block_avx512(blk, &mut b) };
                assert_eq!((a, sa.to_bits(), ta), (b, sb.to_bits(), tb), "block {i}");
            }
        }
    }
}
