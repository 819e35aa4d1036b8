//! The portable twins of the SIMD kernels: plain loops with 8 partial sums (which LLVM maps
//! onto SSE2). They are the reference the SIMD versions are tested against.

use crate::tensor::View;

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            s[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    s.iter().sum::<f32>() + tail
}

pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

pub fn dot_rows(w: View, row0: usize, nr: usize, k: usize, x: &[f32], acc: &mut [f32; 4]) {
    let mut row = vec![0f32; k];
    for (r, a) in acc.iter_mut().enumerate().take(nr) {
        let start = (row0 + r) * k;
        w.widen_into(start..start + k, &mut row);
        *a = dot(&row, &x[..k]);
    }
}

pub fn tile(
    w: View,
    row0: usize,
    nr: usize,
    x: &[f32],
    tr: usize,
    k: usize,
    acc: &mut [[f32; super::TILE_TR]; super::TILE_NR],
) {
    let mut row = vec![0f32; k];
    for (r, acc_r) in acc.iter_mut().enumerate().take(nr) {
        let start = (row0 + r) * k;
        w.widen_into(start..start + k, &mut row);
        for (t, a) in acc_r.iter_mut().enumerate().take(tr) {
            *a = dot(&row, &x[t * k..(t + 1) * k]);
        }
    }
}

/// `exp(x)` for `x <= 0` with the SIMD kernels' polynomial (Cephes' `expf` after
/// `x = n ln2 + r`, |r| <= ln2/2; relative error ~1e-7), the same operations in the same order
/// (ties-to-even `n`, fused multiply-adds), so the same bits as `avx2::exp_neg8`. Below -87.3,
/// and for NaN as the SIMD `max` does, it returns ~1e-38.
#[inline]
pub fn exp_neg(x: f32) -> f32 {
    // Not `clamp`: it keeps NaN, where the SIMD `max` gives the bound.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(0.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(EXP_LN2_HI, x);
    let r = (-n).mul_add(EXP_LN2_LO, r);
    let mut p = EXP_C[0];
    for &c in &EXP_C[1..] {
        p = p.mul_add(r, c);
    }
    let e = (p * r).mul_add(r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// ln 2 split in two so that `n * EXP_LN2_HI` is exact.
pub const EXP_LN2_HI: f32 = 0.693_359_4;
pub const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` coefficients, highest degree first.
pub const EXP_C: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `sum(exp(x - shift))` for `shift >= max(x)` (summed in f64).
pub fn sum_exp(x: &[f32], shift: f32) -> f32 {
    x.iter().map(|&v| exp_neg(v - shift) as f64).sum::<f64>() as f32
}

/// `x[i] = exp(x[i] - shift)` for `shift >= max(x)`; returns their sum (in f64, rounded).
pub fn exp_shift(x: &mut [f32], shift: f32) -> f32 {
    x.iter_mut()
        .map(|v| {
            *v = exp_neg(*v - shift);
            *v as f64
        })
        .sum::<f64>() as f32
}

/// `silu(g) = g · sigmoid(g)` with `sigmoid(g) = 1 / (1 + e)` for `g >= 0` and `e / (1 + e)`
/// below, `e = exp(-|g|)` from [`exp_neg`]: no overflow on either side; 0 below -87.3, where
/// `exp_neg` stops. The operations of `avx2::silu_mul`, so its bits.
pub fn silu(g: f32) -> f32 {
    let e = exp_neg(-g.abs());
    let r = 1.0 / (1.0 + e);
    let s = if g.is_sign_negative() { e * r } else { r };
    g * if g < -87.3 { 0.0 } else { s }
}

/// `g[i] = silu(g[i]) * u[i]`.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        *g = silu(*g) * u;
    }
}

/// `out = w * (x * inv)` with `inv = 1 / sqrt(mean(x²) + eps)`, the mean summed in f64 in
/// order: HF's RMSNorm of one row (`x * rsqrt(mean(x²) + eps)` in f32, then the weight).
pub fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / ((ms as f32) + eps).sqrt();
    for ((o, &v), &wi) in out.iter_mut().zip(x.iter()).zip(w) {
        *o = wi * (v * inv);
    }
}

/// The largest element (`-inf` for none).
pub fn max(x: &[f32]) -> f32 {
    // NaN wins (`f32::max` would skip it): a NaN logit or attention score must poison the
    // row's normalizer, so that the check for non-finite log-probs sees it.
    x.iter().copied().fold(f32::NEG_INFINITY, |a, b| {
        if a.is_nan() || b.is_nan() {
            f32::NAN
        } else {
            a.max(b)
        }
    })
}

/// The panel kernels' twin: each output one `mul_add` chain over `k` from 0, in order, exactly
/// what the SIMD kernels compute in each lane. Row `j` of the panel is widened once and applied
/// to every token row (the loop over columns vectorizes where the target has FMA).
pub fn panel(
    p: View,
    k: usize,
    x: &[f32],
    tr: usize,
    acc: &mut [[f32; super::PANEL]; super::PANEL_TR],
) {
    const P: usize = super::PANEL;
    for a in acc.iter_mut().take(tr) {
        *a = [0.0; P];
    }
    let mut w = [0f32; P];
    for j in 0..k {
        match p {
            View::F32(s) => w.copy_from_slice(&s[j * P..(j + 1) * P]),
            View::F16(s) => {
                for (c, w) in w.iter_mut().enumerate() {
                    *w = s[j * P + c].to_f32();
                }
            }
            View::BF16(s) => {
                for (c, w) in w.iter_mut().enumerate() {
                    *w = s[j * P + super::panel_slot(p, c)].to_f32();
                }
            }
            View::Q4_1(_) | View::Q8_0(_) => {
                for (c, w) in w.iter_mut().enumerate() {
                    *w = super::panel_weight(p, j, c);
                }
            }
        }
        for (t, a) in acc.iter_mut().enumerate().take(tr) {
            let xv = x[t * k + j];
            for (a, &w) in a.iter_mut().zip(&w) {
                *a = w.mul_add(xv, *a);
            }
        }
    }
}
