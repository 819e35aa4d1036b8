//! The many-row Q4_1 product with the token rows quantized to i16 (`GRAM_INT16_ACTIVATIONS=1`,
//! AVX512-VNNI only): each row, per block of 32 input columns, becomes `x ≈ s·xq` (`xq` in
//! ±32,767), and a Q4_1 block's product `Σ (q·d + m)·x` becomes `d·s·Σ q·xq + m·s·Σ xq`, the
//! inner sums exact in i32 (`vpdpwssd`, two products a lane), so the nibbles are never
//! converted to f32. About twice the exact kernel's speed at ten rows on an Intel core, at an
//! error of ~2e-5 of the output's scale (docs/PERF.md, "Q4_1 against integer dot products").
//! Not bit-identical to the exact path; [`panel_q4_1_twin`] is this path's slow twin, bit for
//! bit.

use super::PANEL;
use crate::tensor::View;

/// Token rows quantized per row and block of 32 input columns.
#[derive(Debug, Default)]
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
    /// Quantizes `rows` rows of `k` values (`k` a multiple of 32).
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
        for (i, blk) in x[..rows * k].chunks_exact(32).enumerate() {
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = amax / 32767.0;
            let inv = if s > 0.0 && s.is_finite() {
                1.0 / s
            } else {
                0.0
            };
            let mut tot = 0i32;
            for (j, &v) in blk.iter().enumerate() {
                // `as` saturates (and maps NaN to 0); |v · inv| <= 32767 up to rounding.
                let qv = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                q.xq[i * 32 + j] = qv;
                tot += qv as i32;
            }
            q.scale[i] = s;
            q.sum[i] = tot as f32 * s;
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
    let f16_at = |o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    let nb = k / 32;
    for (t, acc_t) in acc.iter_mut().enumerate().take(tr) {
        for (c, y) in acc_t.iter_mut().enumerate() {
            let mut v = 0f32;
            for blk in 0..nb {
                let o = blk * 640;
                let mut isum = 0i32;
                for r in 0..32 {
                    let byte = b[o + 128 + (r / 2) * 32 + c];
                    let q = if r % 2 == 0 { byte & 15 } else { byte >> 4 };
                    isum += q as i32 * xq[t * k + blk * 32 + r] as i32;
                }
                let (d, m) = (f16_at(o + 2 * c), f16_at(o + 64 + 2 * c));
                let (s, su) = (scale[t * nb + blk], sum[t * nb + blk]);
                v = (isum as f32).mul_add(d * s, m.mul_add(su, v));
            }
            *y = v;
        }
    }
}
