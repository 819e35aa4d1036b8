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
