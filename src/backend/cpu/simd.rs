//! The inner loops of the CPU backend, each in two versions: AVX2+FMA+F16C (chosen at run time)
//! and a portable scalar twin that is the reference. `GRAM_SIMD=scalar` forces the twin.
//!
//! - `dot_rows`: up to 4 weight rows (f32/f16/bf16, widened in registers) · one f32 vector.
//! - `tile`: up to 2 weight rows (any dtype) × up to 6 f32 token rows, 12 accumulators.
//! - `dot`, `axpy`: f32 vectors (attention).

use std::sync::OnceLock;

use crate::tensor::View;

/// Instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// The best the CPU supports, unless `GRAM_SIMD=scalar`. Detected once.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("GRAM_SIMD").is_ok_and(|v| v == "scalar") {
                return Isa::Scalar;
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    /// Every ISA this machine can run (for parity tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
        }
        v
    }
}

/// Input rows of a matmul kernel: `x: [T, k]` f32 and, for bf16 weights on AVX2, `pairs`: the
/// same rows with every whole 16-element block stored as its 8 even elements then its 8 odd
/// ones (see [`bf16_pairs`]). bf16 weights are then widened without a shuffle: 16 of them read
/// as 8 u32 lanes give the even elements as `lane << 16` and the odd ones as
/// `lane & 0xffff0000`. `pairs` is empty when no bf16 kernel runs.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub x: &'a [f32],
    pub pairs: &'a [f32],
}

impl<'a> Rows<'a> {
    /// Rows `t0..t1` of width `k`.
    pub fn slice(&self, t0: usize, t1: usize, k: usize) -> Rows<'a> {
        Rows {
            x: &self.x[t0 * k..t1 * k],
            pairs: if self.pairs.is_empty() {
                &[]
            } else {
                &self.pairs[t0 * k..t1 * k]
            },
        }
    }
}

/// `x: [T, k]` with each whole 16-element block of a row reordered as
/// `x0 x2 .. x14 x1 x3 .. x15`; the tail past the last whole block is left as it is.
pub fn bf16_pairs(x: &[f32], k: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            for j in 0..8 {
                d[j] = s[2 * j];
                d[8 + j] = s[2 * j + 1];
            }
        }
    }
    out
}

/// Whether a kernel for `w` wants [`Rows::pairs`].
pub fn wants_pairs(isa: Isa, w: View) -> bool {
    isa == Isa::Avx2 && matches!(w, View::BF16(_))
}

/// `acc[r] = W[row0 + r] · x` for `r < nr` (`nr <= 4`), `W: [*, k]`.
pub fn dot_rows(isa: Isa, w: View, row0: usize, nr: usize, k: usize, x: Rows, acc: &mut [f32; 4]) {
    assert!(
        nr <= 4 && x.x.len() >= k && w.len() >= (row0 + nr) * k,
        "dot_rows bounds; this is a bug"
    );
    assert!(
        !wants_pairs(isa, w) || x.pairs.len() >= k,
        "dot_rows: bf16 needs pairs; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: Avx2 is only chosen when the CPU has avx2, fma and f16c; bounds are checked
        // above (rows row0..row0+nr of w and k elements of x exist).
        unsafe { avx2::dot_rows(w, row0, nr, k, x, acc) };
        return;
    }
    let _ = isa;
    scalar::dot_rows(w, row0, nr, k, x.x, acc)
}

/// Weight rows per tile of [`tile`].
pub const TILE_NR: usize = 2;
/// Token rows per tile of [`tile`].
pub const TILE_TR: usize = 6;

/// `acc[r][t] = W[row0 + r] · x[t]` for `r < nr <= 2`, `t < tr <= 6`; `W: [*, k]` in any
/// dtype (widened in registers), `x: [tr, k]` f32. 2×6 = 12 accumulators + 2 weight vectors + 1
/// input vector fit the 16 AVX2 registers without spilling.
#[allow(clippy::too_many_arguments)]
pub fn tile(
    isa: Isa,
    w: View,
    row0: usize,
    nr: usize,
    x: Rows,
    tr: usize,
    k: usize,
    acc: &mut [[f32; TILE_TR]; TILE_NR],
) {
    assert!(
        nr <= TILE_NR && tr <= TILE_TR && w.len() >= (row0 + nr) * k && x.x.len() >= tr * k,
        "tile bounds; this is a bug"
    );
    assert!(
        !wants_pairs(isa, w) || x.pairs.len() >= tr * k,
        "tile: bf16 needs pairs; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: CPU features as in `dot_rows`; bounds asserted above.
        unsafe { avx2::tile(w, row0, nr, x, tr, k, acc) };
        return;
    }
    let _ = isa;
    scalar::tile(w, row0, nr, x.x, tr, k, acc)
}

/// `a · b`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot lengths; this is a bug");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: CPU features as in `dot_rows`; equal lengths asserted above.
        return unsafe { avx2::dot(a, b) };
    }
    let _ = isa;
    scalar::dot(a, b)
}

/// `y += a * x`.
pub fn axpy(isa: Isa, a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy lengths; this is a bug");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: CPU features as in `dot_rows`; equal lengths asserted above.
        unsafe { avx2::axpy(a, x, y) };
        return;
    }
    let _ = isa;
    scalar::axpy(a, x, y)
}

/// The portable twins: plain loops with 8 partial sums (which LLVM maps onto SSE2).
mod scalar {
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::tensor::View;

    const F32: u8 = 0;
    const F16: u8 = 1;

    /// How far ahead (in weight rows) the GEMV prefetches: about DRAM latency's worth of work.
    const PREFETCH_ROWS: usize = 16;

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
    unsafe fn hsum(v: __m256) -> f32 {
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
                _mm_prefetch::<_MM_HINT_T0>(
                    w.add((e + PREFETCH_ROWS * k) * elem_bytes::<D>()) as *const i8
                );
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
                _mm_prefetch::<_MM_HINT_T0>(row.add(PREFETCH_ROWS * k) as *const i8);
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
                _mm_prefetch::<_MM_HINT_T0>(row.add(NR * k) as *const i8);
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
                    s += half::bf16::from_bits(*w.add((row0 + r) * k + j)).to_f32()
                        * *x.add(t * k + j);
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
                _mm_prefetch::<_MM_HINT_T0>(w.add((e + NR * k) * elem_bytes::<D>()) as *const i8);
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
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Deterministic pseudo-random values in [-1, 1) (xorshift), never all zeros.
    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn dot_rows_matches_f64_for_every_dtype_isa_and_tail() {
        for isa in Isa::available() {
            for k in [1, 7, 8, 9, 16, 31, 33, 64, 100, 576] {
                let wf = rand(4 * k + 3 * k, k as u64);
                let x = rand(k, 99 + k as u64);
                let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
                let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
                for view in [View::F32(&wf), View::F16(&w16), View::BF16(&wb16)] {
                    for nr in 1..=4 {
                        let row0 = 2;
                        let mut acc = [f32::NAN; 4];
                        let pairs = bf16_pairs(&x, k);
                        dot_rows(
                            isa,
                            view,
                            row0,
                            nr,
                            k,
                            Rows {
                                x: &x,
                                pairs: &pairs,
                            },
                            &mut acc,
                        );
                        for r in 0..nr {
                            let row: Vec<f32> =
                                (0..k).map(|i| view.get((row0 + r) * k + i)).collect();
                            let want = dot64(&row, &x);
                            assert!(
                                (acc[r] as f64 - want).abs()
                                    <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "{isa:?} k={k} nr={nr} r={r}: {} vs {want}",
                                acc[r]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tile_matches_f64_for_every_shape_and_dtype() {
        for isa in Isa::available() {
            for k in [3, 8, 16, 17, 47, 64, 1536] {
                let wf = rand(5 * k, 7 + k as u64);
                let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
                let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
                let x = rand(TILE_TR * k, 11 + k as u64);
                for view in [View::F32(&wf), View::F16(&w16), View::BF16(&wb16)] {
                    for nr in 1..=TILE_NR {
                        for tr in 1..=TILE_TR {
                            let row0 = 3;
                            let mut acc = [[f32::NAN; TILE_TR]; TILE_NR];
                            let pairs = bf16_pairs(&x, k);
                            let rows = Rows {
                                x: &x,
                                pairs: &pairs,
                            }
                            .slice(0, tr, k);
                            tile(isa, view, row0, nr, rows, tr, k, &mut acc);
                            for r in 0..nr {
                                let row: Vec<f32> =
                                    (0..k).map(|i| view.get((row0 + r) * k + i)).collect();
                                for t in 0..tr {
                                    let want = dot64(&row, &x[t * k..(t + 1) * k]);
                                    let got = acc[r][t] as f64;
                                    assert!(
                                        (got - want).abs()
                                            <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                        "{isa:?} k={k} {nr}x{tr}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_and_axpy_match_reference() {
        for isa in Isa::available() {
            for n in [0, 1, 5, 8, 15, 16, 33, 64, 200] {
                let a = rand(n, 3 + n as u64);
                let b = rand(n, 5 + n as u64);
                let want = dot64(&a, &b);
                assert!((dot(isa, &a, &b) as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
                let mut y = b.clone();
                axpy(isa, 0.37, &a, &mut y);
                for i in 0..n {
                    assert!((y[i] - (b[i] + 0.37 * a[i])).abs() <= 1e-6);
                }
            }
        }
    }
}
