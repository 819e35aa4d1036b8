//! AVX2 + FMA + F16C kernels. Every function is `unsafe` and requires those CPU features;
//! every safe entry point of `simd` calls them only through `Isa::runnable()`, which falls
//! back to the scalar twins on a CPU without them (the `Isa` variants are public, so a
//! caller may name one its CPU lacks).

use std::arch::x86_64::*;

use super::PANEL_AHEAD;
use crate::tensor::View;

const F32: u8 = 0;
const F16: u8 = 1;

/// How far ahead (in weight rows) the GEMV prefetches: about DRAM latency's worth of work.
const PREFETCH_ROWS: usize = 16;

/// Hints the cache line at `p` into L2 (`_MM_HINT_T1`: measured well ahead of an L1 hint on
/// the DRAM-streaming GEMV, 23 → 29 GiB/s f32 and 20 → 34 GiB/s bf16, see docs/PERF.md).
/// The address may lie past the end of the weights (the rows after the last): a prefetch never
/// faults, and callers form `p` with `wrapping_add` so that computing it is defined too.
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    // SAFETY: `_mm_prefetch` is a hint; it reads nothing architecturally and cannot fault,
    // whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) };
}

const fn elem_bytes<const D: u8>() -> usize {
    if D == F32 {
        4
    } else {
        2
    }
}

/// 8 elements of dtype `D` at element index `i` of `p`, widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const D: u8>(p: *const u8, i: usize) -> __m256 {
    match D {
        F32 => _mm256_loadu_ps((p as *const f32).add(i)),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(i) as *const __m128i)),
        // bf16 (used for tails and the generic path; the bf16 kernels use load16_bf16).
        _ => {
            let h = _mm_loadu_si128((p as *const u16).add(i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load1<const D: u8>(p: *const u8, i: usize) -> f32 {
    match D {
        F32 => *(p as *const f32).add(i),
        F16 => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
        _ => half::bf16::from_bits(*(p as *const u16).add(i)).to_f32(),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// NR rows of dtype D at `w + row0 * k` · x.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_n<const D: u8, const NR: usize>(
    w: *const u8,
    row0: usize,
    k: usize,
    x: *const f32,
    acc: &mut [f32; 4],
) {
    let mut a = [_mm256_setzero_ps(); NR];
    let k8 = k - k % 8;
    let mut i = 0;
    while i < k8 {
        let xv = _mm256_loadu_ps(x.add(i));
        for (r, ar) in a.iter_mut().enumerate() {
            let e = (row0 + r) * k + i;
            prefetch(w.wrapping_add((e + PREFETCH_ROWS * k) * elem_bytes::<D>()));
            *ar = _mm256_fmadd_ps(load8::<D>(w, e), xv, *ar);
        }
        i += 8;
    }
    for (r, ar) in a.iter().enumerate() {
        let mut s = hsum(*ar);
        for j in k8..k {
            s += load1::<D>(w, (row0 + r) * k + j) * *x.add(j);
        }
        acc[r] = s;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_d<const D: u8>(
    w: *const u8,
    row0: usize,
    nr: usize,
    k: usize,
    x: *const f32,
    acc: &mut [f32; 4],
) {
    match nr {
        4 => dot_rows_n::<D, 4>(w, row0, k, x, acc),
        3 => dot_rows_n::<D, 3>(w, row0, k, x, acc),
        2 => dot_rows_n::<D, 2>(w, row0, k, x, acc),
        1 => dot_rows_n::<D, 1>(w, row0, k, x, acc),
        _ => {}
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(
    w: View,
    row0: usize,
    nr: usize,
    k: usize,
    x: super::Rows,
    acc: &mut [f32; 4],
) {
    let xp = x.x.as_ptr();
    match w {
        // Block types are dequantized into f32 panels before they get here (`matmul`).
        View::Q4_1(_) | View::Q8_0(_) => super::scalar::dot_rows(w, row0, nr, k, x.x, acc),
        View::F32(s) => dot_rows_d::<F32>(s.as_ptr() as *const u8, row0, nr, k, xp, acc),
        View::F16(s) => dot_rows_d::<F16>(s.as_ptr() as *const u8, row0, nr, k, xp, acc),
        View::BF16(s) => {
            let (w, pp) = (s.as_ptr() as *const u16, x.pairs.as_ptr());
            match nr {
                4 => dot_rows_bf16::<4>(w, row0, k, xp, pp, acc),
                3 => dot_rows_bf16::<3>(w, row0, k, xp, pp, acc),
                2 => dot_rows_bf16::<2>(w, row0, k, xp, pp, acc),
                1 => dot_rows_bf16::<1>(w, row0, k, xp, pp, acc),
                _ => {}
            }
        }
    }
}

/// 16 bf16 at `p` as (even elements, odd elements) in f32 — no shuffle.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16_bf16(p: *const u16) -> (__m256, __m256) {
    let v = _mm256_loadu_si256(p as *const __m256i);
    let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    let odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xffff0000u32 as i32)));
    (even, odd)
}

/// bf16 GEMV rows against the even/odd split input `pp` (tail past the last whole 16-block
/// from `x`). Two accumulators per row hide the FMA latency; the next block of rows is
/// prefetched while this one streams.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_bf16<const NR: usize>(
    w: *const u16,
    row0: usize,
    k: usize,
    x: *const f32,
    pp: *const f32,
    acc: &mut [f32; 4],
) {
    let mut ae = [_mm256_setzero_ps(); NR];
    let mut ao = [_mm256_setzero_ps(); NR];
    let k16 = k - k % 16;
    let mut i = 0;
    while i < k16 {
        let xe = _mm256_loadu_ps(pp.add(i));
        let xo = _mm256_loadu_ps(pp.add(i + 8));
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            prefetch(row.wrapping_add(PREFETCH_ROWS * k));
            let (e, o) = load16_bf16(row);
            ae[r] = _mm256_fmadd_ps(e, xe, ae[r]);
            ao[r] = _mm256_fmadd_ps(o, xo, ao[r]);
        }
        i += 16;
    }
    for r in 0..NR {
        let mut s = hsum(_mm256_add_ps(ae[r], ao[r]));
        for j in k16..k {
            s += half::bf16::from_bits(*w.add((row0 + r) * k + j)).to_f32() * *x.add(j);
        }
        acc[r] = s;
    }
}

/// bf16 tile: NR weight rows × TR token rows against even/odd split inputs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the 12 accumulators in registers
unsafe fn tile_bf16<const NR: usize, const TR: usize>(
    w: *const u16,
    row0: usize,
    x: *const f32,
    pp: *const f32,
    k: usize,
    acc: &mut [[f32; super::TILE_TR]; super::TILE_NR],
) {
    let mut a = [[_mm256_setzero_ps(); TR]; NR];
    let k16 = k - k % 16;
    let mask = _mm256_set1_epi32(0xffff0000u32 as i32);
    let mut i = 0;
    while i < k16 {
        // Even elements of the NR rows against every token, then the odd ones: 12
        // accumulators + NR weight vectors + 1 input vector stay within 16 registers.
        let mut wv = [_mm256_setzero_ps(); NR];
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            prefetch(row.wrapping_add(NR * k));
            wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_loadu_si256(row as *const __m256i),
                16,
            ));
        }
        for t in 0..TR {
            let xv = _mm256_loadu_ps(pp.add(t * k + i));
            for r in 0..NR {
                a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            wv[r] = _mm256_castsi256_ps(_mm256_and_si256(
                _mm256_loadu_si256(row as *const __m256i),
                mask,
            ));
        }
        for t in 0..TR {
            let xv = _mm256_loadu_ps(pp.add(t * k + i + 8));
            for r in 0..NR {
                a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        i += 16;
    }
    for r in 0..NR {
        for t in 0..TR {
            let mut s = hsum(a[r][t]);
            for j in k16..k {
                s += half::bf16::from_bits(*w.add((row0 + r) * k + j)).to_f32() * *x.add(t * k + j);
            }
            acc[r][t] = s;
        }
    }
}

/// NR weight rows of dtype D (from `row0`) × TR f32 token rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the 12 accumulators in registers
unsafe fn tile_n<const D: u8, const NR: usize, const TR: usize>(
    w: *const u8,
    row0: usize,
    x: *const f32,
    k: usize,
    acc: &mut [[f32; super::TILE_TR]; super::TILE_NR],
) {
    let mut a = [[_mm256_setzero_ps(); TR]; NR];
    let k8 = k - k % 8;
    let mut i = 0;
    while i < k8 {
        let mut wv = [_mm256_setzero_ps(); NR];
        for r in 0..NR {
            let e = (row0 + r) * k + i;
            prefetch(w.wrapping_add((e + NR * k) * elem_bytes::<D>()));
            wv[r] = load8::<D>(w, e);
        }
        for t in 0..TR {
            let xv = _mm256_loadu_ps(x.add(t * k + i));
            for r in 0..NR {
                a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        i += 8;
    }
    for r in 0..NR {
        for t in 0..TR {
            let mut s = hsum(a[r][t]);
            for j in k8..k {
                s += load1::<D>(w, (row0 + r) * k + j) * *x.add(t * k + j);
            }
            acc[r][t] = s;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_d<const D: u8>(
    w: *const u8,
    row0: usize,
    nr: usize,
    x: *const f32,
    tr: usize,
    k: usize,
    acc: &mut [[f32; super::TILE_TR]; super::TILE_NR],
) {
    match (nr, tr) {
        (2, 6) => tile_n::<D, 2, 6>(w, row0, x, k, acc),
        (2, 5) => tile_n::<D, 2, 5>(w, row0, x, k, acc),
        (2, 4) => tile_n::<D, 2, 4>(w, row0, x, k, acc),
        (2, 3) => tile_n::<D, 2, 3>(w, row0, x, k, acc),
        (2, 2) => tile_n::<D, 2, 2>(w, row0, x, k, acc),
        (2, 1) => tile_n::<D, 2, 1>(w, row0, x, k, acc),
        (1, 6) => tile_n::<D, 1, 6>(w, row0, x, k, acc),
        (1, 5) => tile_n::<D, 1, 5>(w, row0, x, k, acc),
        (1, 4) => tile_n::<D, 1, 4>(w, row0, x, k, acc),
        (1, 3) => tile_n::<D, 1, 3>(w, row0, x, k, acc),
        (1, 2) => tile_n::<D, 1, 2>(w, row0, x, k, acc),
        (1, 1) => tile_n::<D, 1, 1>(w, row0, x, k, acc),
        _ => {}
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile(
    w: View,
    row0: usize,
    nr: usize,
    x: super::Rows,
    tr: usize,
    k: usize,
    acc: &mut [[f32; super::TILE_TR]; super::TILE_NR],
) {
    let xp = x.x.as_ptr();
    match w {
        // Block types are dequantized into f32 panels before they get here (`matmul`).
        View::Q4_1(_) | View::Q8_0(_) => super::scalar::tile(w, row0, nr, x.x, tr, k, acc),
        View::F32(s) => tile_d::<F32>(s.as_ptr() as *const u8, row0, nr, xp, tr, k, acc),
        View::F16(s) => tile_d::<F16>(s.as_ptr() as *const u8, row0, nr, xp, tr, k, acc),
        View::BF16(s) => {
            let (w, pp) = (s.as_ptr() as *const u16, x.pairs.as_ptr());
            match (nr, tr) {
                (2, 6) => tile_bf16::<2, 6>(w, row0, xp, pp, k, acc),
                (2, 5) => tile_bf16::<2, 5>(w, row0, xp, pp, k, acc),
                (2, 4) => tile_bf16::<2, 4>(w, row0, xp, pp, k, acc),
                (2, 3) => tile_bf16::<2, 3>(w, row0, xp, pp, k, acc),
                (2, 2) => tile_bf16::<2, 2>(w, row0, xp, pp, k, acc),
                (2, 1) => tile_bf16::<2, 1>(w, row0, xp, pp, k, acc),
                (1, 6) => tile_bf16::<1, 6>(w, row0, xp, pp, k, acc),
                (1, 5) => tile_bf16::<1, 5>(w, row0, xp, pp, k, acc),
                (1, 4) => tile_bf16::<1, 4>(w, row0, xp, pp, k, acc),
                (1, 3) => tile_bf16::<1, 3>(w, row0, xp, pp, k, acc),
                (1, 2) => tile_bf16::<1, 2>(w, row0, xp, pp, k, acc),
                (1, 1) => tile_bf16::<1, 1>(w, row0, xp, pp, k, acc),
                _ => {}
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut s0 = _mm256_setzero_ps();
    let mut s1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            s1,
        );
        i += 16;
    }
    while i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len();
    let av = _mm256_set1_ps(a);
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(
            py.add(i),
            _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))),
        );
        i += 8;
    }
    while i < n {
        y[i] += a * x[i];
        i += 1;
    }
}

/// `exp(x)` of 8 lanes with `x <= 0`: the polynomial of `scalar::exp_neg`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_neg8(x: __m256) -> __m256 {
    use super::scalar::{EXP_C, EXP_LN2_HI, EXP_LN2_LO};
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_setzero_ps());
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_C[0]);
    for &c in &EXP_C[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
        _mm256_set1_ps(1.0),
    );
    let scale = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(e, _mm256_castsi256_ps(scale))
}

/// `sum(exp(x - shift))`, 4 × 8 lanes at a time; the tail through the scalar twin.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn sum_exp(x: &[f32], shift: f32) -> f32 {
    let s = _mm256_set1_ps(shift);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut chunks = x.chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_ps(c.as_ptr().add(8 * j));
            *a = _mm256_add_ps(*a, exp_neg8(_mm256_sub_ps(v, s)));
        }
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum::<f32>() + super::scalar::sum_exp(chunks.remainder(), shift)
}

/// `x[i] = exp(x[i] - shift)` for `shift >= max(x)`, 8 at a time; returns their sum. The tail
/// through the scalar twin.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn exp_shift(x: &mut [f32], shift: f32) -> f32 {
    let s = _mm256_set1_ps(shift);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum::<f32>() + super::scalar::exp_shift(chunks.into_remainder(), shift)
}

/// `scalar::rmsnorm_row`: the squares (exact in f64) summed 16 at a time in 4 × 4 f64 lanes,
/// then across them, so the sum can differ from the in-order one in its last f64 bits only;
/// the scaling 8 at a time, the same two f32 products per element.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let (w, out) = (&w[..n], &mut out[..n]);
    let (px, pw, po) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let mut acc = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i + 16 <= n {
        for h in 0..2 {
            let v = _mm256_loadu_ps(px.add(i + 8 * h));
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            acc[2 * h] = _mm256_fmadd_pd(lo, lo, acc[2 * h]);
            acc[2 * h + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * h + 1]);
        }
        i += 16;
    }
    let sum4 = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), sum4);
    let mut sum = lanes.iter().sum::<f64>();
    for &v in &x[i..] {
        sum += (v as f64) * (v as f64);
    }
    let inv = 1.0 / (((sum / n as f64) as f32) + eps).sqrt();
    let iv = _mm256_set1_ps(inv);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_mul_ps(_mm256_loadu_ps(px.add(i)), iv);
        _mm256_storeu_ps(po.add(i), _mm256_mul_ps(_mm256_loadu_ps(pw.add(i)), v));
        i += 8;
    }
    for j in i..n {
        out[j] = w[j] * (x[j] * inv);
    }
}

/// `g[i] = silu(g[i]) * u[i]` (the formula of `scalar::silu`), 8 at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
    let n = g.len().min(u.len());
    let (g, u) = (&mut g[..n], &u[..n]);
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let e = exp_neg8(_mm256_or_ps(x, sign));
        let r = _mm256_div_ps(one, _mm256_add_ps(one, e));
        // The sign bit of `x` picks `e · r` (x < 0) over `r`; 0 below -87.3.
        let s = _mm256_blendv_ps(r, _mm256_mul_ps(e, r), x);
        let s = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3)), s);
        let y = _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u.as_ptr().add(i)));
        _mm256_storeu_ps(g.as_mut_ptr().add(i), y);
        i += 8;
    }
    super::scalar::silu_mul(&mut g[i..], &u[i..]);
}

/// The largest element, 32 at a time (`-inf` for none; NaN if any element is NaN, as the
/// scalar twin). `vmaxps` alone would not do: it returns its second operand when either is
/// NaN, so a NaN would either replace a lane's maximum or be dropped, depending on the order.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn max(x: &[f32]) -> f32 {
    let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut nan = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_ps(c.as_ptr().add(8 * j));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            *a = _mm256_max_ps(*a, v);
        }
    }
    if _mm256_movemask_ps(nan) != 0 {
        return f32::NAN;
    }
    let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let tail = super::scalar::max(chunks.remainder());
    lanes
        .iter()
        .copied()
        .fold(tail, |a, b| if a.is_nan() { a } else { a.max(b) })
}

/// Dequantizes whole Q4_1 blocks (20 bytes → 32 f32 each): `x = q·d + m`, one rounding as in
/// the scalar twin (`q·d` is exact in f32).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q4_1(blocks: &[u8], out: &mut [f32]) {
    let low = _mm_set1_epi8(0x0f);
    for (b, o) in blocks.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let d = _mm256_set1_ps(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
        let m = _mm256_set1_ps(half::f16::from_le_bytes([b[2], b[3]]).to_f32());
        let q = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(q, low);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
        for (i, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), _mm256_fmadd_ps(f, d, m));
        }
    }
}

/// Dequantizes whole Q8_0 blocks (34 bytes → 32 f32 each): `x = q·d` (exact in f32).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q8_0(blocks: &[u8], out: &mut [f32]) {
    for (b, o) in blocks.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = _mm256_set1_ps(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
        for i in 0..4 {
            let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * i) as *const __m128i);
            let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), _mm256_mul_ps(f, d));
        }
    }
}

type PanelAcc = [[f32; super::PANEL]; super::PANEL_TR];

/// One weight panel (`p: [k, 32]` in the layout of `cpu::panels`) × `tr <= 14` token rows
/// `x: [tr, k]`, as two halves of 16 columns × groups of at most 6 token rows: 12
/// accumulators, 2 weight vectors and the broadcast input fill the 16 ymm registers. Each
/// output is one FMA chain over `k`, as on AVX-512 and in the scalar twin.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panel(p: View, k: usize, x: *const f32, tr: usize, acc: &mut PanelAcc) {
    // Block panels keep their scales (and minima) in 4 registers more: groups of 4.
    let groups = tr.div_ceil(if p.is_quantized() { 4 } else { 6 });
    for half in 0..2 {
        let mut t0 = 0;
        for g in 0..groups {
            let n = (tr - t0) / (groups - g);
            let xg = x.add(t0 * k);
            macro_rules! by_tr {
                ($f:ident, $p:expr) => {
                    match n {
                        1 => $f::<1>($p, half, k, xg, t0, acc),
                        2 => $f::<2>($p, half, k, xg, t0, acc),
                        3 => $f::<3>($p, half, k, xg, t0, acc),
                        4 => $f::<4>($p, half, k, xg, t0, acc),
                        5 => $f::<5>($p, half, k, xg, t0, acc),
                        6 => $f::<6>($p, half, k, xg, t0, acc),
                        _ => {}
                    }
                };
            }
            match p {
                View::F32(s) => by_tr!(panel_f32, s.as_ptr()),
                View::F16(s) => by_tr!(panel_f16, s.as_ptr() as *const u16),
                View::BF16(s) => by_tr!(panel_bf16, s.as_ptr() as *const u16),
                View::Q4_1(b) => by_tr!(panel_q4_1, b.as_ptr()),
                View::Q8_0(b) => by_tr!(panel_q8_0, b.as_ptr()),
            }
            t0 += n;
        }
    }
}

/// Generates an AVX2 panel kernel over one half of a panel: `$load(row, half)` gives two
/// vectors of 8 columns, whose first columns are `$cols(half)`.
macro_rules! panel16 {
    ($name:ident, $elem:ty, $load:expr, $cols:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
        unsafe fn $name<const TR: usize>(
            p: *const $elem,
            half: usize,
            k: usize,
            x: *const f32,
            t0: usize,
            acc: &mut PanelAcc,
        ) {
            let mut a = [[_mm256_setzero_ps(); 2]; TR];
            for kk in 0..k {
                let row = p.add(kk * super::PANEL);
                prefetch((row as *const u8).wrapping_add(PANEL_AHEAD + 64 * half));
                let (w0, w1) = $load(row, half);
                for t in 0..TR {
                    let xb = _mm256_set1_ps(*x.add(t * k + kk));
                    a[t][0] = _mm256_fmadd_ps(w0, xb, a[t][0]);
                    a[t][1] = _mm256_fmadd_ps(w1, xb, a[t][1]);
                }
            }
            let (c0, c1): (usize, usize) = $cols(half);
            for t in 0..TR {
                _mm256_storeu_ps(acc[t0 + t].as_mut_ptr().add(c0), a[t][0]);
                _mm256_storeu_ps(acc[t0 + t].as_mut_ptr().add(c1), a[t][1]);
            }
        }
    };
}

panel16!(
    panel_f32,
    f32,
    |r: *const f32, h: usize| (
        _mm256_loadu_ps(r.add(16 * h)),
        _mm256_loadu_ps(r.add(16 * h + 8))
    ),
    |h: usize| (16 * h, 16 * h + 8)
);
panel16!(
    panel_f16,
    u16,
    |r: *const u16, h: usize| (
        _mm256_cvtph_ps(_mm_loadu_si128(r.add(16 * h) as *const __m128i)),
        _mm256_cvtph_ps(_mm_loadu_si128(r.add(16 * h + 8) as *const __m128i))
    ),
    |h: usize| (16 * h, 16 * h + 8)
);
// bf16 panel rows hold column j in the low half of u32 lane j and column 16 + j in its high
// half: half `h` reads lanes 8h..8h + 8, i.e. columns 8h.. (`<< 16`) and 16 + 8h.. (`& mask`).
panel16!(
    panel_bf16,
    u16,
    |r: *const u16, h: usize| {
        let v = _mm256_loadu_si256(r.add(16 * h) as *const __m256i);
        (
            _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xffff0000u32 as i32))),
        )
    },
    |h: usize| (8 * h, 16 + 8 * h)
);

/// FMAs of one half-panel row `(w0, w1)` at input column `kk` into the accumulators.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn panel_row<const TR: usize>(
    a: &mut [[__m256; 2]; TR],
    w0: __m256,
    w1: __m256,
    x: *const f32,
    k: usize,
    kk: usize,
) {
    for t in 0..TR {
        let xb = _mm256_set1_ps(*x.add(t * k + kk));
        a[t][0] = _mm256_fmadd_ps(w0, xb, a[t][0]);
        a[t][1] = _mm256_fmadd_ps(w1, xb, a[t][1]);
    }
}

/// Stores the accumulators of columns `16·half..16·half + 16` of token rows `t0..t0 + TR`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn panel_store<const TR: usize>(
    a: &[[__m256; 2]; TR],
    half: usize,
    t0: usize,
    acc: &mut PanelAcc,
) {
    for t in 0..TR {
        _mm256_storeu_ps(acc[t0 + t].as_mut_ptr().add(16 * half), a[t][0]);
        _mm256_storeu_ps(acc[t0 + t].as_mut_ptr().add(16 * half + 8), a[t][1]);
    }
}

/// Q4_1 half panel (layout in `cpu::panels`, kernel as on AVX-512): columns `16·half..`,
/// `q·d + m` in registers, rows of each block in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4_1<const TR: usize>(
    p: *const u8,
    half: usize,
    k: usize,
    x: *const f32,
    t0: usize,
    acc: &mut PanelAcc,
) {
    let low = _mm256_set1_epi32(0x0f);
    let mut a = [[_mm256_setzero_ps(); 2]; TR];
    for b in 0..k / 32 {
        let blk = p.add(b * 640);
        for l in 0..10 {
            prefetch(blk.wrapping_add(PANEL_AHEAD + 64 * l));
        }
        let h = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(o) as *const __m128i));
        let c = 32 * half;
        let (d0, d1, m0, m1) = (h(c), h(c + 16), h(64 + c), h(64 + c + 16));
        let q = blk.add(128 + 16 * half);
        for j in 0..16 {
            // Row `j`: input columns 2j (low nibbles) and 2j + 1 (high), widened once.
            let row = q.add(32 * j);
            let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row as *const __m128i));
            let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(8) as *const __m128i));
            for high in [false, true] {
                let (n0, n1) = if high {
                    (_mm256_srli_epi32(v0, 4), _mm256_srli_epi32(v1, 4))
                } else {
                    (_mm256_and_si256(v0, low), _mm256_and_si256(v1, low))
                };
                let w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(n0), d0, m0);
                let w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(n1), d1, m1);
                panel_row(&mut a, w0, w1, x, k, 32 * b + 2 * j + high as usize);
            }
        }
    }
    panel_store(&a, half, t0, acc);
}

/// Q8_0 half panel (layout in `cpu::panels`): `q·d` in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q8_0<const TR: usize>(
    p: *const u8,
    half: usize,
    k: usize,
    x: *const f32,
    t0: usize,
    acc: &mut PanelAcc,
) {
    let mut a = [[_mm256_setzero_ps(); 2]; TR];
    for b in 0..k / 32 {
        let blk = p.add(b * 1088);
        let c = 32 * half;
        let d0 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(c) as *const __m128i));
        let d1 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(c + 16) as *const __m128i));
        let q = blk.add(64 + 16 * half);
        for j in 0..32 {
            let row = q.add(32 * j);
            prefetch(row.wrapping_add(PANEL_AHEAD));
            let v0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(row as *const __m128i));
            let v1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(8) as *const __m128i));
            let w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(v0), d0);
            let w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(v1), d1);
            panel_row(&mut a, w0, w1, x, k, 32 * b + j);
        }
    }
    panel_store(&a, half, t0, acc);
}

type GemvAcc = [[f32; super::PANEL]; super::GEMV_PANELS];

/// One token row × `np <= GEMV_PANELS` consecutive panels (`p: [np, k, 32]`, f32, f16 or bf16;
/// block panels one at a time, [`gemv_q4_1`] and [`gemv_q8_0`]), two panels at a time: 4 accumulators per
/// panel (8 independent FMA chains, 4 weight vectors and the broadcast input in the 16 ymm
/// registers) in one pass over each panel, where [`panel`] at one row makes two passes of 2
/// chains. Each output is still one FMA chain over `k` in order: the bits of [`panel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_panels(p: View, np: usize, k: usize, x: *const f32, acc: &mut GemvAcc) {
    let stride = super::PANEL * k;
    let mut g0 = 0;
    while g0 < np {
        let two = np - g0 >= 2;
        let (o, acc) = (g0 * stride, &mut acc[g0..]);
        match (p, two) {
            (View::F32(s), true) => gemv_f32::<2>(s.as_ptr().add(o), k, x, acc),
            (View::F32(s), false) => gemv_f32::<1>(s.as_ptr().add(o), k, x, acc),
            (View::F16(s), true) => gemv_f16::<2>(s.as_ptr().add(o) as *const u16, k, x, acc),
            (View::F16(s), false) => gemv_f16::<1>(s.as_ptr().add(o) as *const u16, k, x, acc),
            (View::BF16(s), true) => gemv_bf16::<2>(s.as_ptr().add(o) as *const u16, k, x, acc),
            (View::BF16(s), false) => gemv_bf16::<1>(s.as_ptr().add(o) as *const u16, k, x, acc),
            (View::Q4_1(b), _) => {
                for (g, acc) in acc.iter_mut().enumerate().take(if two { 2 } else { 1 }) {
                    gemv_q4_1(b.as_ptr().add((g0 + g) * 20 * k), k, x, acc);
                }
            }
            (View::Q8_0(b), _) => {
                for (g, acc) in acc.iter_mut().enumerate().take(if two { 2 } else { 1 }) {
                    gemv_q8_0(b.as_ptr().add((g0 + g) * 34 * k), k, x, acc);
                }
            }
        }
        g0 += if two { 2 } else { 1 };
    }
}

/// One Q4_1 block panel at one token row, its 32 columns in one pass: 4 FMA chains where
/// [`panel`] at one row makes two passes of 2 (the chains' latency bound it), the same
/// dequantization (`q·d + m`, rounded once) and FMAs in the same order, so the bits of
/// [`panel`]. Each row of 16 bytes is widened once for its two input columns (`cpu::panels`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn gemv_q4_1(p: *const u8, k: usize, x: *const f32, acc: &mut [f32; super::PANEL]) {
    let low = _mm256_set1_epi32(0x0f);
    let mut a = [_mm256_setzero_ps(); 4];
    for b in 0..k / 32 {
        let blk = p.add(b * 640);
        for l in 0..10 {
            prefetch(blk.wrapping_add(PANEL_AHEAD + 64 * l));
        }
        let h = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(o) as *const __m128i));
        let d = [h(0), h(16), h(32), h(48)];
        let m = [h(64), h(80), h(96), h(112)];
        for j in 0..16 {
            let row = blk.add(128 + 32 * j);
            let (x0, x1) = (
                _mm256_set1_ps(*x.add(32 * b + 2 * j)),
                _mm256_set1_ps(*x.add(32 * b + 2 * j + 1)),
            );
            for i in 0..4 {
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(8 * i) as *const __m128i));
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                a[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(lo, d[i], m[i]), x0, a[i]);
                a[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(hi, d[i], m[i]), x1, a[i]);
            }
        }
    }
    for i in 0..4 {
        _mm256_storeu_ps(acc.as_mut_ptr().add(8 * i), a[i]);
    }
}

/// One Q8_0 block panel at one token row, its 32 columns in one pass (see [`gemv_q4_1`]):
/// `q·d` (exact) and the FMAs of [`panel`] in the same order, so its bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn gemv_q8_0(p: *const u8, k: usize, x: *const f32, acc: &mut [f32; super::PANEL]) {
    let mut a = [_mm256_setzero_ps(); 4];
    for b in 0..k / 32 {
        let blk = p.add(b * 1088);
        let h = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(o) as *const __m128i));
        let d = [h(0), h(16), h(32), h(48)];
        for j in 0..32 {
            let row = blk.add(64 + 32 * j);
            prefetch(row.wrapping_add(PANEL_AHEAD));
            let xb = _mm256_set1_ps(*x.add(32 * b + j));
            for i in 0..4 {
                let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(8 * i) as *const __m128i));
                a[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), d[i]), xb, a[i]);
            }
        }
    }
    for i in 0..4 {
        _mm256_storeu_ps(acc.as_mut_ptr().add(8 * i), a[i]);
    }
}

/// Generates an AVX2 multi-panel GEMV kernel: `$load(row)` gives the 32 columns of one panel
/// row as four vectors, whose first columns are `$cols`; `$lines` cache lines per row.
macro_rules! gemv32 {
    ($name:ident, $elem:ty, $lines:expr, $cols:expr, $load:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
        unsafe fn $name<const NP: usize>(
            p: *const $elem,
            k: usize,
            x: *const f32,
            acc: &mut [[f32; super::PANEL]],
        ) {
            let stride = super::PANEL * k;
            let bytes = stride * std::mem::size_of::<$elem>();
            let mut a = [[_mm256_setzero_ps(); 4]; NP];
            for kk in 0..k {
                let xb = _mm256_set1_ps(*x.add(kk));
                let off = super::gemv_prefetch_offset(
                    kk,
                    super::PANEL * std::mem::size_of::<$elem>(),
                    bytes,
                    NP,
                );
                for g in 0..NP {
                    let row = p.add(g * stride + kk * super::PANEL);
                    let ahead = (row as *const u8).wrapping_add(off);
                    for l in 0..$lines {
                        prefetch(ahead.wrapping_add(64 * l));
                    }
                    let w: [__m256; 4] = $load(row);
                    for i in 0..4 {
                        a[g][i] = _mm256_fmadd_ps(w[i], xb, a[g][i]);
                    }
                }
            }
            let cols: [usize; 4] = $cols;
            for g in 0..NP {
                for i in 0..4 {
                    _mm256_storeu_ps(acc[g].as_mut_ptr().add(cols[i]), a[g][i]);
                }
            }
        }
    };
}

gemv32!(gemv_f32, f32, 2, [0, 8, 16, 24], |r: *const f32| [
    _mm256_loadu_ps(r),
    _mm256_loadu_ps(r.add(8)),
    _mm256_loadu_ps(r.add(16)),
    _mm256_loadu_ps(r.add(24))
]);
gemv32!(gemv_f16, u16, 1, [0, 8, 16, 24], |r: *const u16| [
    _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i)),
    _mm256_cvtph_ps(_mm_loadu_si128(r.add(8) as *const __m128i)),
    _mm256_cvtph_ps(_mm_loadu_si128(r.add(16) as *const __m128i)),
    _mm256_cvtph_ps(_mm_loadu_si128(r.add(24) as *const __m128i))
]);
// bf16 panel rows: u32 lane j holds column j (low half) and 16 + j (high half); the two
// 8-lane loads give columns 0..8 and 16..24, then 8..16 and 24..32.
gemv32!(gemv_bf16, u16, 1, [0, 16, 8, 24], |r: *const u16| {
    let mask = _mm256_set1_epi32(0xffff0000u32 as i32);
    let v0 = _mm256_loadu_si256(r as *const __m256i);
    let v1 = _mm256_loadu_si256(r.add(16) as *const __m256i);
    [
        _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)),
        _mm256_castsi256_ps(_mm256_and_si256(v0, mask)),
        _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)),
        _mm256_castsi256_ps(_mm256_and_si256(v1, mask)),
    ]
});
