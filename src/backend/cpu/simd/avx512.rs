//! AVX-512 (F + BW) GEMV kernels: the decode of one row streams every weight byte once, and at
//! that rate the work is bound by instructions per byte, not by DRAM: 64-byte loads halve the
//! instruction count of the AVX2 GEMV. Every function is `unsafe` and requires avx512f,
//! avx512bw, avx2, fma and f16c; every safe entry point of `simd` calls them only through
//! `Isa::runnable()`, which falls back on a CPU without them.

use std::arch::x86_64::*;

use super::avx2::prefetch;
use super::{Rows, PANEL_AHEAD};
use crate::tensor::View;

/// How far ahead (in weight rows) the GEMV prefetches.
const PREFETCH_ROWS: usize = 16;

/// Block of the bf16 even/odd input split these kernels read (see `simd::Rows`).
pub const PAIRS_BLOCK: usize = 32;

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn dot_rows(w: View, row0: usize, nr: usize, k: usize, x: Rows, acc: &mut [f32; 4]) {
    macro_rules! by_nr {
        ($f:ident, $w:expr) => {
            match nr {
                4 => $f::<4>($w, row0, k, x, acc),
                3 => $f::<3>($w, row0, k, x, acc),
                2 => $f::<2>($w, row0, k, x, acc),
                1 => $f::<1>($w, row0, k, x, acc),
                _ => {}
            }
        };
    }
    match w {
        // Block types are dequantized into f32 panels before they get here (`matmul`).
        View::Q4_1(_) | View::Q8_0(_) => super::scalar::dot_rows(w, row0, nr, k, x.x, acc),
        View::F32(s) => by_nr!(rows_f32, s.as_ptr()),
        View::F16(s) => by_nr!(rows_f16, s.as_ptr() as *const u16),
        View::BF16(s) => by_nr!(rows_bf16, s.as_ptr() as *const u16),
    }
}

/// Generates the f32 and f16 GEMV rows: 16 elements per step, weights widened by `$load`,
/// the scalar tail widened by `$get`.
macro_rules! rows16 {
    ($name:ident, $elem:ty, $load:expr, $get:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        unsafe fn $name<const NR: usize>(
            w: *const $elem,
            row0: usize,
            k: usize,
            x: Rows,
            acc: &mut [f32; 4],
        ) {
            let xp = x.x.as_ptr();
            let mut a = [_mm512_setzero_ps(); NR];
            let k16 = k - k % 16;
            let mut i = 0;
            while i < k16 {
                let xv = _mm512_loadu_ps(xp.add(i));
                for (r, ar) in a.iter_mut().enumerate() {
                    let row = w.add((row0 + r) * k + i);
                    prefetch(row.wrapping_add(PREFETCH_ROWS * k));
                    *ar = _mm512_fmadd_ps($load(row), xv, *ar);
                }
                i += 16;
            }
            for (r, ar) in a.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*ar);
                for j in k16..k {
                    s += $get(*w.add((row0 + r) * k + j)) * *xp.add(j);
                }
                acc[r] = s;
            }
        }
    };
}

rows16!(
    rows_f32,
    f32,
    |p: *const f32| _mm512_loadu_ps(p),
    |v: f32| v
);
rows16!(
    rows_f16,
    u16,
    |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    |v: u16| half::f16::from_bits(v).to_f32()
);

/// 32 bf16 per load: even elements `lane << 16`, odd `lane & 0xffff0000`, against the input
/// split in blocks of 32 (16 even then 16 odd).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn rows_bf16<const NR: usize>(
    w: *const u16,
    row0: usize,
    k: usize,
    x: Rows,
    acc: &mut [f32; 4],
) {
    let (xp, pp) = (x.x.as_ptr(), x.pairs.as_ptr());
    let mask = _mm512_set1_epi32(0xffff0000u32 as i32);
    let mut ae = [_mm512_setzero_ps(); NR];
    let mut ao = [_mm512_setzero_ps(); NR];
    let k32 = k - k % 32;
    let mut i = 0;
    while i < k32 {
        let xe = _mm512_loadu_ps(pp.add(i));
        let xo = _mm512_loadu_ps(pp.add(i + 16));
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            prefetch(row.wrapping_add(PREFETCH_ROWS * k));
            let v = _mm512_loadu_si512(row as *const __m512i);
            ae[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, ae[r]);
            ao[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, mask)), xo, ao[r]);
        }
        i += 32;
    }
    for r in 0..NR {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(ae[r], ao[r]));
        for j in k32..k {
            s += half::bf16::from_bits(*w.add((row0 + r) * k + j)).to_f32() * *xp.add(j);
        }
        acc[r] = s;
    }
}

/// Weight rows per AVX-512 tile: 4 rows × 6 tokens = 24 accumulators + 4 weight vectors + 1
/// input vector fit the 32 zmm registers.
pub const TILE_NR: usize = 4;

type TileAcc = [[f32; super::TILE_TR]; super::TILE_NR];

#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn tile(
    w: View,
    row0: usize,
    nr: usize,
    x: Rows,
    tr: usize,
    k: usize,
    acc: &mut TileAcc,
) {
    macro_rules! by_shape {
        ($f:ident, $w:expr) => {
            match (nr, tr) {
                (4, 6) => $f::<4, 6>($w, row0, x, k, acc),
                (4, 5) => $f::<4, 5>($w, row0, x, k, acc),
                (4, 4) => $f::<4, 4>($w, row0, x, k, acc),
                (4, 3) => $f::<4, 3>($w, row0, x, k, acc),
                (4, 2) => $f::<4, 2>($w, row0, x, k, acc),
                (4, 1) => $f::<4, 1>($w, row0, x, k, acc),
                (3, 6) => $f::<3, 6>($w, row0, x, k, acc),
                (3, 5) => $f::<3, 5>($w, row0, x, k, acc),
                (3, 4) => $f::<3, 4>($w, row0, x, k, acc),
                (3, 3) => $f::<3, 3>($w, row0, x, k, acc),
                (3, 2) => $f::<3, 2>($w, row0, x, k, acc),
                (3, 1) => $f::<3, 1>($w, row0, x, k, acc),
                (2, 6) => $f::<2, 6>($w, row0, x, k, acc),
                (2, 5) => $f::<2, 5>($w, row0, x, k, acc),
                (2, 4) => $f::<2, 4>($w, row0, x, k, acc),
                (2, 3) => $f::<2, 3>($w, row0, x, k, acc),
                (2, 2) => $f::<2, 2>($w, row0, x, k, acc),
                (2, 1) => $f::<2, 1>($w, row0, x, k, acc),
                (1, 6) => $f::<1, 6>($w, row0, x, k, acc),
                (1, 5) => $f::<1, 5>($w, row0, x, k, acc),
                (1, 4) => $f::<1, 4>($w, row0, x, k, acc),
                (1, 3) => $f::<1, 3>($w, row0, x, k, acc),
                (1, 2) => $f::<1, 2>($w, row0, x, k, acc),
                (1, 1) => $f::<1, 1>($w, row0, x, k, acc),
                _ => {}
            }
        };
    }
    match w {
        // Block types are dequantized into f32 panels before they get here (`matmul`).
        View::Q4_1(_) | View::Q8_0(_) => super::scalar::tile(w, row0, nr, x.x, tr, k, acc),
        View::F32(s) => by_shape!(tile_f32, s.as_ptr()),
        View::F16(s) => by_shape!(tile_f16, s.as_ptr() as *const u16),
        View::BF16(s) => by_shape!(tile_bf16, s.as_ptr() as *const u16),
    }
}

/// Sums the accumulators and adds the scalar tail `k0..k` (weights widened by `get`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn finish<const NR: usize, const TR: usize>(
    a: &[[__m512; TR]; NR],
    k0: usize,
    k: usize,
    x: *const f32,
    get: impl Fn(usize, usize) -> f32,
    acc: &mut TileAcc,
) {
    for r in 0..NR {
        for t in 0..TR {
            let mut s = _mm512_reduce_add_ps(a[r][t]);
            for j in k0..k {
                s += get(r, j) * *x.add(t * k + j);
            }
            acc[r][t] = s;
        }
    }
}

/// Generates the f32 and f16 tiles: 16 elements per step, weights widened by `$load`.
macro_rules! tile16 {
    ($name:ident, $elem:ty, $load:expr, $get:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
        unsafe fn $name<const NR: usize, const TR: usize>(
            w: *const $elem,
            row0: usize,
            x: Rows,
            k: usize,
            acc: &mut TileAcc,
        ) {
            let xp = x.x.as_ptr();
            let mut a = [[_mm512_setzero_ps(); TR]; NR];
            let k16 = k - k % 16;
            let mut i = 0;
            while i < k16 {
                let mut wv = [_mm512_setzero_ps(); NR];
                for r in 0..NR {
                    let row = w.add((row0 + r) * k + i);
                    prefetch(row.wrapping_add(NR * k));
                    wv[r] = $load(row);
                }
                for t in 0..TR {
                    let xv = _mm512_loadu_ps(xp.add(t * k + i));
                    for r in 0..NR {
                        a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
                    }
                }
                i += 16;
            }
            finish(&a, k16, k, xp, |r, j| $get(*w.add((row0 + r) * k + j)), acc);
        }
    };
}

tile16!(
    tile_f32,
    f32,
    |p: *const f32| _mm512_loadu_ps(p),
    |v: f32| v
);
tile16!(
    tile_f16,
    u16,
    |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    |v: u16| half::f16::from_bits(v).to_f32()
);

/// bf16 tile: 32 weights per load, even elements (`<< 16`) against the even half of each input
/// block, then odd ones (`& 0xffff0000`) against the odd half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn tile_bf16<const NR: usize, const TR: usize>(
    w: *const u16,
    row0: usize,
    x: Rows,
    k: usize,
    acc: &mut TileAcc,
) {
    let (xp, pp) = (x.x.as_ptr(), x.pairs.as_ptr());
    let mask = _mm512_set1_epi32(0xffff0000u32 as i32);
    let mut a = [[_mm512_setzero_ps(); TR]; NR];
    let k32 = k - k % 32;
    let mut i = 0;
    while i < k32 {
        let mut wv = [_mm512_setzero_ps(); NR];
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            prefetch(row.wrapping_add(NR * k));
            wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_loadu_si512(row as *const __m512i),
                16,
            ));
        }
        for t in 0..TR {
            let xv = _mm512_loadu_ps(pp.add(t * k + i));
            for r in 0..NR {
                a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        for r in 0..NR {
            let row = w.add((row0 + r) * k + i);
            wv[r] = _mm512_castsi512_ps(_mm512_and_si512(
                _mm512_loadu_si512(row as *const __m512i),
                mask,
            ));
        }
        for t in 0..TR {
            let xv = _mm512_loadu_ps(pp.add(t * k + i + 16));
            for r in 0..NR {
                a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
            }
        }
        i += 32;
    }
    finish(
        &a,
        k32,
        k,
        xp,
        |r, j| half::bf16::from_bits(*w.add((row0 + r) * k + j)).to_f32(),
        acc,
    );
}

type PanelAcc = [[f32; super::PANEL]; super::PANEL_TR];

/// Where a panel kernel stores token row `t`'s 32 sums: `ptr + t · stride`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
}

/// One weight panel (`p: [k, 32]` in the layout of `cpu::panels`) × `tr <= 14` token rows
/// `x: [tr, k]`: 2 × `tr` accumulators (up to 28 of the 32 zmm registers), 2 weight vectors,
/// the input broadcast from memory. No horizontal sums: each output is one FMA chain over `k`.
/// Token row `t`'s 32 sums go to `out + t · stride` (a `PanelAcc`'s rows at stride 32, or
/// straight into a matmul's output rows).
///
/// # Safety
/// The CPU has AVX-512 F/BW, AVX2, FMA and F16C; `p` holds a whole panel of `k` input columns
/// in its layout and `x` points at `tr × k` values; `1 <= tr <= 14` (any other `tr` writes
/// nothing); for every `t < tr`, `out + t · stride .. + 32` is valid for writes, apart from
/// `p` and `x`, and no one else's while this runs.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn panel(p: View, k: usize, x: *const f32, tr: usize, out: *mut f32, stride: usize) {
    let acc = Out { ptr: out, stride };
    macro_rules! by_tr {
        ($f:ident, $p:expr) => {
            match tr {
                1 => $f::<1>($p, k, x, acc),
                2 => $f::<2>($p, k, x, acc),
                3 => $f::<3>($p, k, x, acc),
                4 => $f::<4>($p, k, x, acc),
                5 => $f::<5>($p, k, x, acc),
                6 => $f::<6>($p, k, x, acc),
                7 => $f::<7>($p, k, x, acc),
                8 => $f::<8>($p, k, x, acc),
                9 => $f::<9>($p, k, x, acc),
                10 => $f::<10>($p, k, x, acc),
                11 => $f::<11>($p, k, x, acc),
                12 => $f::<12>($p, k, x, acc),
                13 => $f::<13>($p, k, x, acc),
                14 => $f::<14>($p, k, x, acc),
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
}

/// FMAs of one panel row `(w0, w1)` (columns 0..16, 16..32) at input column `kk` into the
/// accumulators. Each FMA broadcasts its input from memory itself (`{1to16}`, an embedded
/// broadcast: the load unit's work) where `_mm512_set1_ps` shared by the two FMAs costs a
/// vector-pipe op per token row that the block panels' dequantization competes for (Q4_1 at
/// T = 10, one Zen 4 core in L1/L2: 92 -> 98 GFLOP/s, and 104 with two panel rows per step).
/// The same FMAs, so the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn panel_row<const TR: usize>(
    a: &mut [[__m512; 2]; TR],
    w0: __m512,
    w1: __m512,
    x: *const f32,
    k: usize,
    kk: usize,
) {
    for t in 0..TR {
        let p = x.add(t * k + kk);
        // SAFETY: `p` is in `x` (the caller's bounds); the asm reads 4 bytes there and writes
        // only the two accumulator registers.
        std::arch::asm!(
            "vfmadd231ps {a0}, {w0}, dword ptr [{p}]{{1to16}}",
            "vfmadd231ps {a1}, {w1}, dword ptr [{p}]{{1to16}}",
            a0 = inout(zmm_reg) a[t][0],
            a1 = inout(zmm_reg) a[t][1],
            w0 = in(zmm_reg) w0,
            w1 = in(zmm_reg) w1,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
}

/// Stores the accumulators (columns 0..16, 16..32 of each token row).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn panel_store<const TR: usize>(a: &[[__m512; 2]; TR], out: Out) {
    for t in 0..TR {
        let row = out.ptr.add(t * out.stride);
        _mm512_storeu_ps(row, a[t][0]);
        _mm512_storeu_ps(row.add(16), a[t][1]);
    }
}

/// Q4_1 panel (layout in `cpu::panels`): per block of 32 input columns, the 32 scales and
/// minima, then 16 rows of 32 bytes, row `j` holding input column `2j` in its low nibbles and
/// `2j + 1` in its high ones. Dequantized in registers, `q·d + m` (one rounding: `q·d` is
/// exact), the values of `View::get`; rows in order, so the FMA chains are those of the f32
/// panels. See [`q4_1_pair`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn panel_q4_1<const TR: usize>(p: *const u8, k: usize, x: *const f32, acc: Out) {
    let mut a = [[_mm512_setzero_ps(); 2]; TR];
    for b in 0..k / 32 {
        let blk = p.add(b * 640);
        for l in 0..10 {
            prefetch(blk.wrapping_add(PANEL_AHEAD + 64 * l));
        }
        let dm = q4_1_scales(blk);
        for j in 0..16 {
            let w = q4_1_pair(blk.add(128 + 32 * j), &dm);
            let kk = 32 * b + 2 * j;
            panel_row(&mut a, w[0], w[1], x, k, kk);
            panel_row(&mut a, w[2], w[3], x, k, kk + 1);
        }
    }
    panel_store(&a, acc);
}

/// The 32 scales and minima of a Q4_1 panel block, widened: `[d0, d1, m0, m1]` (columns
/// 0..16, 16..32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q4_1_scales(blk: *const u8) -> [__m512; 4] {
    let h = |o: usize| _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(o) as *const __m256i));
    [h(0), h(32), h(64), h(96)]
}

/// The weights of one Q4_1 panel row (32 bytes: input columns `2j` and `2j + 1` of 32 output
/// columns), `[2j: 0..16, 2j: 16..32, 2j+1: 0..16, 2j+1: 16..32]`, each `q·d + m` rounded once.
/// A byte widened once to a lane holds both quants: a mask gives the low one, a shift the high
/// one. (A `vpermps` lookup of the low nibble in the table 0.0..15.0, which needs no mask,
/// measured the same; docs/PERF.md "Block panels at one row".)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q4_1_pair(row: *const u8, dm: &[__m512; 4]) -> [__m512; 4] {
    let v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row as *const __m128i));
    let v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(16) as *const __m128i));
    let low = |v| _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)));
    let high = |v| _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    [
        _mm512_fmadd_ps(low(v0), dm[0], dm[2]),
        _mm512_fmadd_ps(low(v1), dm[1], dm[3]),
        _mm512_fmadd_ps(high(v0), dm[0], dm[2]),
        _mm512_fmadd_ps(high(v1), dm[1], dm[3]),
    ]
}

/// Q8_0 panel (layout in `cpu::panels`): per block of 32 input columns, the 32 scales, then 32
/// rows of 32 signed bytes. `q·d` (exact), the values of `View::get`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn panel_q8_0<const TR: usize>(p: *const u8, k: usize, x: *const f32, acc: Out) {
    let mut a = [[_mm512_setzero_ps(); 2]; TR];
    for b in 0..k / 32 {
        let blk = p.add(b * 1088);
        let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
        let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i));
        let q = blk.add(64);
        for j in 0..32 {
            let row = q.add(32 * j);
            prefetch(row.wrapping_add(PANEL_AHEAD));
            let v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row as *const __m128i));
            let v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row.add(16) as *const __m128i));
            let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(v0), d0);
            let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(v1), d1);
            panel_row(&mut a, w0, w1, x, k, 32 * b + j);
        }
    }
    panel_store(&a, acc);
}

/// Generates a panel kernel: `$load(row)` gives the 32 columns of one panel row as two vectors
/// (columns 0..16 and 16..32).
macro_rules! panel32 {
    ($name:ident, $elem:ty, $load:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
        unsafe fn $name<const TR: usize>(p: *const $elem, k: usize, x: *const f32, acc: Out) {
            let mut a = [[_mm512_setzero_ps(); 2]; TR];
            for kk in 0..k {
                let row = p.add(kk * super::PANEL);
                let ahead = (row as *const u8).wrapping_add(PANEL_AHEAD);
                prefetch(ahead);
                prefetch(ahead.wrapping_add(64));
                let (w0, w1) = $load(row);
                for t in 0..TR {
                    let xb = _mm512_set1_ps(*x.add(t * k + kk));
                    a[t][0] = _mm512_fmadd_ps(w0, xb, a[t][0]);
                    a[t][1] = _mm512_fmadd_ps(w1, xb, a[t][1]);
                }
            }
            panel_store(&a, acc);
        }
    };
}

panel32!(panel_f32, f32, |r: *const f32| (
    _mm512_loadu_ps(r),
    _mm512_loadu_ps(r.add(16))
));
panel32!(panel_f16, u16, |r: *const u16| (
    _mm512_cvtph_ps(_mm256_loadu_si256(r as *const __m256i)),
    _mm512_cvtph_ps(_mm256_loadu_si256(r.add(16) as *const __m256i))
));
// bf16 panel rows hold column j in the low half of u32 lane j and column 16 + j in its high
// half: `lane << 16` and `lane & 0xffff0000` are the two vectors, no shuffle.
panel32!(panel_bf16, u16, |r: *const u16| {
    let v = _mm512_loadu_si512(r as *const __m512i);
    (
        _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
        _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xffff0000u32 as i32))),
    )
});

type GemvAcc = [[f32; super::PANEL]; super::GEMV_PANELS];

/// One token row × `np <= GEMV_PANELS` consecutive panels (`p: [np, k, 32]`, f32, bf16 or
/// ggml blocks; f16 goes to the AVX2 kernel): 2 × `np` accumulators, so up to 8
/// independent FMA chains where one panel gives 2 (chain latency bounds those), the input
/// broadcast once per input column for all panels. Each output is still one FMA chain over
/// `k` in order: the bits of [`panel`] at one row.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn gemv_panels(p: View, np: usize, k: usize, x: *const f32, acc: &mut GemvAcc) {
    macro_rules! by_np {
        ($f:ident, $p:expr) => {
            match np {
                1 => $f::<1>($p, k, x, acc),
                2 => $f::<2>($p, k, x, acc),
                3 => $f::<3>($p, k, x, acc),
                4 => $f::<4>($p, k, x, acc),
                _ => {}
            }
        };
    }
    match p {
        View::F32(s) => by_np!(gemv_f32, s.as_ptr()),
        // The AVX2 kernel: with 256-bit `vcvtph2ps` it reads 86 GB/s in L2 on one Zen 4 core,
        // a 512-bit version of it 58 (docs/PERF.md); the same bits.
        View::F16(_) => super::avx2::gemv_panels(p, np, k, x, acc),
        View::BF16(s) => by_np!(gemv_bf16, s.as_ptr() as *const u16),
        View::Q4_1(b) => by_np!(gemv_q4_1, b.as_ptr()),
        View::Q8_0(b) => by_np!(gemv_q8_0, b.as_ptr()),
    }
}

/// Stores a multi-panel GEMV's accumulators (columns 0..16, 16..32 of each panel).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn gemv_store<const NP: usize>(a: &[[__m512; 2]; NP], acc: &mut GemvAcc) {
    for g in 0..NP {
        _mm512_storeu_ps(acc[g].as_mut_ptr(), a[g][0]);
        _mm512_storeu_ps(acc[g].as_mut_ptr().add(16), a[g][1]);
    }
}

/// [`panel_q4_1`] at one token row over `NP` consecutive block panels side by side: the same
/// dequantization and the same FMA per weight in the same order (so the same bits), with
/// 2 × `NP` chains in flight where one panel has 2. At one panel the chains' latency was the
/// bound: 8 weights a cycle, 34 G weights/s on one Zen 5 core from L2.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn gemv_q4_1<const NP: usize>(p: *const u8, k: usize, x: *const f32, acc: &mut GemvAcc) {
    // Bytes of one panel: k / 32 blocks of 640.
    let stride = 20 * k;
    let mut a = [[_mm512_setzero_ps(); 2]; NP];
    for b in 0..k / 32 {
        let off = super::gemv_prefetch_offset(b, 640, stride, NP);
        let mut blk = [p; NP];
        let mut dm = [[_mm512_setzero_ps(); 4]; NP];
        for g in 0..NP {
            blk[g] = p.add(g * stride + b * 640);
            for l in 0..10 {
                prefetch(blk[g].wrapping_add(off + 64 * l));
            }
            dm[g] = q4_1_scales(blk[g]);
        }
        for j in 0..16 {
            let kk = 32 * b + 2 * j;
            let (x0, x1) = (_mm512_set1_ps(*x.add(kk)), _mm512_set1_ps(*x.add(kk + 1)));
            for g in 0..NP {
                let w = q4_1_pair(blk[g].add(128 + 32 * j), &dm[g]);
                a[g][0] = _mm512_fmadd_ps(w[0], x0, a[g][0]);
                a[g][1] = _mm512_fmadd_ps(w[1], x0, a[g][1]);
                a[g][0] = _mm512_fmadd_ps(w[2], x1, a[g][0]);
                a[g][1] = _mm512_fmadd_ps(w[3], x1, a[g][1]);
            }
        }
    }
    gemv_store(&a, acc);
}

/// [`panel_q8_0`] at one token row over `NP` consecutive block panels side by side (see
/// [`gemv_q4_1`]): the same values and FMAs in the same order, so the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn gemv_q8_0<const NP: usize>(p: *const u8, k: usize, x: *const f32, acc: &mut GemvAcc) {
    // Bytes of one panel: k / 32 blocks of 1088.
    let stride = 34 * k;
    let mut a = [[_mm512_setzero_ps(); 2]; NP];
    for b in 0..k / 32 {
        let mut blk = [p; NP];
        let mut d = [[_mm512_setzero_ps(); 2]; NP];
        for g in 0..NP {
            blk[g] = p.add(g * stride + b * 1088);
            let h = |o: usize| _mm512_cvtph_ps(_mm256_loadu_si256(blk[g].add(o) as *const __m256i));
            d[g] = [h(0), h(32)];
        }
        for j in 0..32 {
            let kk = 32 * b + j;
            let xb = _mm512_set1_ps(*x.add(kk));
            let off = super::gemv_prefetch_offset(kk, 34, stride, NP);
            for g in 0..NP {
                let row = blk[g].add(64 + 32 * j);
                prefetch(row.wrapping_add(off));
                let v0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row as *const __m128i));
                let v1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(row.add(16) as *const __m128i));
                let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(v0), d[g][0]);
                let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(v1), d[g][1]);
                a[g][0] = _mm512_fmadd_ps(w0, xb, a[g][0]);
                a[g][1] = _mm512_fmadd_ps(w1, xb, a[g][1]);
            }
        }
    }
    gemv_store(&a, acc);
}

/// Generates a multi-panel GEMV kernel: `$load(row)` gives the 32 columns of one panel row as
/// two vectors (columns 0..16 and 16..32). No software prefetch: on the Zen 5 host the hardware
/// prefetchers alone stream these 2 MiB-paged panels faster (one-row decode, alternated A/B:
/// f32 +4–7 %, bf16 +6 % without it; docs/PERF.md "Block panels at one row"), where the block
/// kernels, slower per byte, lose 17 % without theirs and keep it.
macro_rules! gemv32 {
    ($name:ident, $elem:ty, $load:expr) => {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        #[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
        unsafe fn $name<const NP: usize>(
            p: *const $elem,
            k: usize,
            x: *const f32,
            acc: &mut GemvAcc,
        ) {
            let stride = super::PANEL * k;
            let mut a = [[_mm512_setzero_ps(); 2]; NP];
            for kk in 0..k {
                let xb = _mm512_set1_ps(*x.add(kk));
                for g in 0..NP {
                    let (w0, w1) = $load(p.add(g * stride + kk * super::PANEL));
                    a[g][0] = _mm512_fmadd_ps(w0, xb, a[g][0]);
                    a[g][1] = _mm512_fmadd_ps(w1, xb, a[g][1]);
                }
            }
            gemv_store(&a, acc);
        }
    };
}

gemv32!(gemv_f32, f32, |r: *const f32| (
    _mm512_loadu_ps(r),
    _mm512_loadu_ps(r.add(16))
));
gemv32!(gemv_bf16, u16, |r: *const u16| {
    let v = _mm512_loadu_si512(r as *const __m512i);
    (
        _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
        _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xffff0000u32 as i32))),
    )
});

/// How many keys ahead [`attn_scores`] and [`attn_pv`] prefetch a key or value row (the first
/// ones before they start): a context's rows lie apart in the cache (each entry holds every KV
/// head, beams link theirs from anywhere), and at b10 decode the loads of those rows held 70 %
/// of the kernels' samples. 4 ahead: b10 +6 % at one thread; 16 with the first ones: +2 % more.
const ATTN_AHEAD: usize = 16;

/// Prefetches into L1 the `16 V` floats of row `offs[j]` of `kv`, if there is one: the line of
/// each 16 and that of the last float (a row need not start on a line, so it can touch V + 1).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn prefetch_row<const V: usize>(kv: &[f32], offs: &[usize], j: usize) {
    if let Some(&o) = offs.get(j) {
        // A hint: it cannot fault; `o + 16 V <= kv.len()` is checked by the callers anyway.
        let row = kv.as_ptr().wrapping_add(o);
        for b in 0..V {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16 * b) as *const i8);
        }
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16 * V - 1) as *const i8);
    }
}

/// Query heads one pass of [`attn_scores`] / [`attn_pv`] keeps in registers: `heads × d / 16`
/// accumulators (at most 16 of the 32 zmm).
const fn attn_heads(v: usize) -> usize {
    16 / v
}

/// Calls `$f::<V, { attn_heads(V) }>$args` for `d = 16 V`, `V` in 1..=8 (the callers check `d`).
macro_rules! by_v {
    ($d:expr, $f:ident, ($($a:expr),*)) => {
        match $d / 16 {
            1 => $f::<1, { attn_heads(1) }>($($a),*),
            2 => $f::<2, { attn_heads(2) }>($($a),*),
            3 => $f::<3, { attn_heads(3) }>($($a),*),
            4 => $f::<4, { attn_heads(4) }>($($a),*),
            5 => $f::<5, { attn_heads(5) }>($($a),*),
            6 => $f::<6, { attn_heads(6) }>($($a),*),
            7 => $f::<7, { attn_heads(7) }>($($a),*),
            8 => $f::<8, { attn_heads(8) }>($($a),*),
            _ => unreachable!("attention kernel for d = {}; the caller checks d", $d),
        }
    };
}

/// `simd::attn_scores` for `d = 16 V`, `V <= 8`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn attn_scores(
    q: &[f32],
    kv: &[f32],
    offs: &[usize],
    d: usize,
    scale: f32,
    scores: &mut [f32],
) {
    by_v!(d, attn_scores_v, (q, kv, offs, scale, scores))
}

/// The sum of `avx2::dot`'s two 8-lane accumulators, which are the low and high halves of `v`,
/// by its own final sum.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn dot_sum(v: __m512) -> f32 {
    // The high half through the f64 view: `vextractf64x4` is AVX-512F (`vextractf32x8` is DQ).
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    super::avx2::hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn attn_scores_v<const V: usize, const HC: usize>(
    q: &[f32],
    kv: &[f32],
    offs: &[usize],
    scale: f32,
    scores: &mut [f32],
) {
    let d = 16 * V;
    let (per, n) = (q.len() / d, offs.len());
    for j in 0..ATTN_AHEAD.min(n) {
        prefetch_row::<V>(kv, offs, j);
    }
    let mut h0 = 0;
    while h0 < per {
        let hc = (per - h0).min(HC);
        let qp = q.as_ptr().add(h0 * d);
        for (j, &o) in offs.iter().enumerate() {
            prefetch_row::<V>(kv, offs, j + ATTN_AHEAD);
            let kp = kv.as_ptr().add(o);
            let mut kr = [_mm512_setzero_ps(); V];
            for b in 0..V {
                kr[b] = _mm512_loadu_ps(kp.add(16 * b));
            }
            for h in 0..HC {
                if h < hc {
                    // `avx2::dot`'s chains: block b's FMA follows block b - 1's, from zero.
                    let mut acc = _mm512_setzero_ps();
                    for b in 0..V {
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(h * d + 16 * b)), kr[b], acc);
                    }
                    *scores.get_unchecked_mut((h0 + h) * n + j) = dot_sum(acc) * scale;
                }
            }
        }
        h0 += hc;
    }
}

/// `simd::attn_pv` for `d = 16 V`, `V <= 8`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn attn_pv(w: &[f32], kv: &[f32], offs: &[usize], d: usize, out: &mut [f32]) {
    by_v!(d, attn_pv_v, (w, kv, offs, out))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn attn_pv_v<const V: usize, const HC: usize>(
    w: &[f32],
    kv: &[f32],
    offs: &[usize],
    out: &mut [f32],
) {
    let d = 16 * V;
    let (per, n) = (out.len() / d, offs.len());
    for j in 0..ATTN_AHEAD.min(n) {
        prefetch_row::<V>(kv, offs, j);
    }
    let mut h0 = 0;
    while h0 < per {
        let hc = (per - h0).min(HC);
        let mut acc = [[_mm512_setzero_ps(); V]; HC];
        for (j, &o) in offs.iter().enumerate() {
            prefetch_row::<V>(kv, offs, j + ATTN_AHEAD);
            let vp = kv.as_ptr().add(o);
            let mut vr = [_mm512_setzero_ps(); V];
            for b in 0..V {
                vr[b] = _mm512_loadu_ps(vp.add(16 * b));
            }
            for h in 0..HC {
                if h < hc {
                    // `axpy`'s FMA: `a * v + o`, `a` the key's weight.
                    let a = _mm512_set1_ps(*w.get_unchecked((h0 + h) * n + j));
                    for b in 0..V {
                        acc[h][b] = _mm512_fmadd_ps(a, vr[b], acc[h][b]);
                    }
                }
            }
        }
        for h in 0..hc {
            for b in 0..V {
                _mm512_storeu_ps(out.as_mut_ptr().add((h0 + h) * d + 16 * b), acc[h][b]);
            }
        }
        h0 += hc;
    }
}

/// The Q4_1 panel × `tr <= 10` token rows quantized to i16 (`super::int16`): per block, `TR`
/// × 2 exact i32 sums by `vpdpwssd` (in registers: 20 at ten rows), then folded into the f32
/// outputs, which stay in `acc` (read and written once a block), as
/// [`super::int16::panel_q4_1_twin`] does, bit for bit. A panel row's byte holds input columns
/// `2j` (low nibble) and `2j + 1` (high): widened to a lane, `(v << 12 | v) & 0x000f000f` puts
/// them in the two 16-bit halves `vpdpwssd` pairs with the row's two values.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn panel_q4_1_i16(
    p: *const u8,
    k: usize,
    (xq, scale, sum): (&[i16], &[f32], &[f32]),
    tr: usize,
    acc: &mut PanelAcc,
) {
    macro_rules! by_tr {
        ($($n:literal)*) => {
            match tr {
                $($n => q4_1_i16::<$n>(p, k, xq.as_ptr(), scale.as_ptr(), sum.as_ptr(), acc),)*
                _ => {}
            }
        };
    }
    by_tr!(1 2 3 4 5 6 7 8 9 10);
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // index loops keep the accumulators in registers
unsafe fn q4_1_i16<const TR: usize>(
    p: *const u8,
    k: usize,
    xq: *const i16,
    scale: *const f32,
    sum: *const f32,
    acc: &mut PanelAcc,
) {
    let nb = k / 32;
    let nibbles = _mm512_set1_epi32(0x000f_000f);
    for acc_t in acc.iter_mut().take(TR) {
        *acc_t = [0.0; super::PANEL];
    }
    for b in 0..nb {
        let blk = p.add(b * 640);
        for l in 0..10 {
            prefetch(blk.wrapping_add(PANEL_AHEAD + 64 * l));
        }
        let mut a = [[_mm512_setzero_si512(); 2]; TR];
        for j in 0..16 {
            let row = blk.add(128 + 32 * j);
            let v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row as *const __m128i));
            let v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(16) as *const __m128i));
            // (A | B) & C: truth table 0xa8.
            let w0 = _mm512_ternarylogic_epi32::<0xa8>(_mm512_slli_epi32(v0, 12), v0, nibbles);
            let w1 = _mm512_ternarylogic_epi32::<0xa8>(_mm512_slli_epi32(v1, 12), v1, nibbles);
            for t in 0..TR {
                // Input columns 2j and 2j + 1 of row t (one i32), broadcast from memory by
                // the instruction itself. In asm: LLVM's generic tuning splits the
                // intrinsic into `vpmaddwd` + `vpaddd`, two vector ops where one does.
                let x2 = xq.add(t * k + 32 * b + 2 * j);
                // SAFETY: `x2` and the next i16 lie in row t's block (bounds checked by the
                // caller); the asm reads those 4 bytes and writes only the two accumulators.
                std::arch::asm!(
                    "vpdpwssd {a0}, {w0}, dword ptr [{p}]{{1to16}}",
                    "vpdpwssd {a1}, {w1}, dword ptr [{p}]{{1to16}}",
                    a0 = inout(zmm_reg) a[t][0],
                    a1 = inout(zmm_reg) a[t][1],
                    w0 = in(zmm_reg) w0,
                    w1 = in(zmm_reg) w1,
                    p = in(reg) x2,
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
        }
        let [d0, d1, m0, m1] = q4_1_scales(blk);
        for t in 0..TR {
            let s = _mm512_set1_ps(*scale.add(t * nb + b));
            let su = _mm512_set1_ps(*sum.add(t * nb + b));
            let y = acc[t].as_mut_ptr();
            let y0 = _mm512_loadu_ps(y);
            let y1 = _mm512_loadu_ps(y.add(16));
            let y0 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][0]),
                _mm512_mul_ps(d0, s),
                _mm512_fmadd_ps(m0, su, y0),
            );
            let y1 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(a[t][1]),
                _mm512_mul_ps(d1, s),
                _mm512_fmadd_ps(m1, su, y1),
            );
            _mm512_storeu_ps(y, y0);
            _mm512_storeu_ps(y.add(16), y1);
        }
    }
}
