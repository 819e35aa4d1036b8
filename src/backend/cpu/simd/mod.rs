//! The inner loops of the CPU backend: AVX2+FMA+F16C kernels (`avx2.rs`), AVX-512 GEMV and tile
//! kernels (`avx512.rs`), chosen at run time, and a portable scalar twin of each (`scalar.rs`)
//! that is the reference. `GRAM_SIMD=scalar|avx2|avx512` forces one.
//!
//! - `dot_rows`: up to 4 weight rows (f32/f16/bf16, widened in registers) · one f32 vector.
//! - `tile`: up to `tile_nr(isa)` weight rows (2 on AVX2, 4 on AVX-512; any dtype) × up to 6
//!   f32 token rows.
//! - `panel`: one panel of 32 weight columns (`cpu::panels` layout) × up to 14 f32 token rows,
//!   bit-identical on every ISA.
//! - `gemv_panels`: one f32 row × up to 4 consecutive panels side by side (decode at batch 1:
//!   more FMA chains in flight than one panel gives), the bits of `panel`.
//! - `dot`, `axpy`: f32 vectors (attention).
//! - `max`, `sum_exp`: a log-softmax's normalizer over a vocabulary row (beam search).

use std::sync::OnceLock;

use crate::tensor::View;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod int16;
mod scalar;

/// Instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 + AVX-512 F/BW: the GEMV uses 512-bit kernels, everything else the AVX2 ones.
    Avx512,
}

impl Isa {
    /// Every ISA this machine can run, weakest first (for parity tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// The best the CPU supports, or the one `GRAM_SIMD` names (`scalar`, `avx2`, `avx512`)
    /// when the CPU has it. Detected once.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let available = Isa::available();
            let wanted = match std::env::var("GRAM_SIMD").as_deref() {
                Ok("scalar") => Some(Isa::Scalar),
                Ok("avx2") => Some(Isa::Avx2),
                Ok("avx512") => Some(Isa::Avx512),
                _ => None,
            };
            match wanted {
                Some(isa) if available.contains(&isa) => isa,
                _ => *available.last().expect("scalar is always available"),
            }
        })
    }

    /// AVX2 kernels may run (the AVX-512 ISA includes them).
    fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }

    /// This ISA if the CPU runs it, else the best one below it that it does. Every kernel
    /// entry point calls this, so an `Isa` named by a caller can never run an instruction the
    /// CPU lacks (the variants are public; safe code must not reach undefined behaviour).
    pub fn runnable(self) -> Isa {
        static CPU: OnceLock<(bool, bool)> = OnceLock::new();
        let (avx2, avx512) = *CPU.get_or_init(|| {
            let a = Isa::available();
            (a.contains(&Isa::Avx2), a.contains(&Isa::Avx512))
        });
        match self {
            Isa::Avx512 if avx512 => Isa::Avx512,
            Isa::Avx512 | Isa::Avx2 if avx2 => Isa::Avx2,
            _ => Isa::Scalar,
        }
    }
}

/// Input rows of a matmul kernel: `x: [T, k]` f32 and, for bf16 weights, `pairs`: the same rows
/// with every whole `block`-element block stored as its even elements then its odd ones (see
/// [`bf16_pairs`]). bf16 weights are then widened without a shuffle: read as u32 lanes, the
/// even elements are `lane << 16` and the odd ones `lane & 0xffff0000`. `pairs` is empty (and
/// `block` 0) when no bf16 kernel runs; [`pairs_block`] says which block a kernel reads.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub x: &'a [f32],
    pub pairs: &'a [f32],
    pub block: usize,
}

impl<'a> Rows<'a> {
    /// Plain f32 rows (no bf16 split).
    pub fn plain(x: &'a [f32]) -> Rows<'a> {
        Rows {
            x,
            pairs: &[],
            block: 0,
        }
    }

    /// Rows `t0..t1` of width `k`.
    pub fn slice(&self, t0: usize, t1: usize, k: usize) -> Rows<'a> {
        Rows {
            x: &self.x[t0 * k..t1 * k],
            pairs: if self.pairs.is_empty() {
                &[]
            } else {
                &self.pairs[t0 * k..t1 * k]
            },
            block: self.block,
        }
    }
}

/// `x: [T, k]` with each whole `block`-element block of a row reordered as its even elements
/// then its odd ones (`x0 x2 .. x1 x3 ..`); the tail past the last whole block is left as it is.
pub fn bf16_pairs(x: &[f32], k: usize, block: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = block / 2;
    for (src, dst) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (s, d) in src.chunks_exact(block).zip(dst.chunks_exact_mut(block)) {
            for j in 0..half {
                d[j] = s[2 * j];
                d[half + j] = s[2 * j + 1];
            }
        }
    }
    out
}

/// The even/odd block (see [`Rows`]) that the kernels of `isa` read for weights `w`; `None`
/// when they read plain rows.
pub fn pairs_block(isa: Isa, w: View) -> Option<usize> {
    let isa = isa.runnable();
    if !matches!(w, View::BF16(_)) {
        return None;
    }
    match isa {
        Isa::Scalar => None,
        Isa::Avx2 => Some(16),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(avx512::PAIRS_BLOCK),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 => None,
    }
}

fn check_pairs(isa: Isa, w: View, x: &Rows, len: usize) {
    if let Some(block) = pairs_block(isa, w) {
        assert!(
            x.block == block && x.pairs.len() >= len,
            "bf16 kernel needs pairs in blocks of {block}; this is a bug"
        );
    }
}

/// Whether a slice of `len` elements holds `a × b` of them, the product computed without
/// wrapping: the bounds checks of these safe entry points guard unsafe kernels, and a product
/// that wrapped (huge shapes, release builds) would pass them.
pub(crate) fn holds(len: usize, a: usize, b: usize) -> bool {
    a.checked_mul(b).is_some_and(|n| len >= n)
}

/// `acc[r] = W[row0 + r] · x` for `r < nr` (`nr <= 4`), `W: [*, k]`.
pub fn dot_rows(isa: Isa, w: View, row0: usize, nr: usize, k: usize, x: Rows, acc: &mut [f32; 4]) {
    let isa = isa.runnable();
    assert!(
        nr <= 4 && x.x.len() >= k && row0.checked_add(nr).is_some_and(|r| holds(w.len(), r, k)),
        "dot_rows bounds; this is a bug"
    );
    check_pairs(isa, w, &x, k);
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: Avx512 is only chosen when the CPU has avx512f/bw, avx2, fma and f16c; bounds
        // and the pairs layout are checked above.
        Isa::Avx512 => return unsafe { avx512::dot_rows(w, row0, nr, k, x, acc) },
        // SAFETY: Avx2 is only chosen when the CPU has avx2, fma and f16c; as above.
        Isa::Avx2 => return unsafe { avx2::dot_rows(w, row0, nr, k, x, acc) },
        Isa::Scalar => {}
    }
    scalar::dot_rows(w, row0, nr, k, x.x, acc)
}

/// Most weight rows a [`tile`] takes on any ISA (see [`tile_nr`]).
pub const TILE_NR: usize = 4;
/// Token rows per tile of [`tile`].
pub const TILE_TR: usize = 6;

/// Weight rows per [`tile`] on `isa`: 2 on AVX2 (2×6 = 12 accumulators + 2 weight vectors + 1
/// input vector fit its 16 registers without spilling), 4 on AVX-512 (24 + 4 + 1 of 32).
pub fn tile_nr(isa: Isa) -> usize {
    let isa = isa.runnable();
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::TILE_NR,
        _ => 2,
    }
}

/// `acc[r][t] = W[row0 + r] · x[t]` for `r < nr <= tile_nr(isa)`, `t < tr <= 6`; `W: [*, k]`
/// in any dtype (widened in registers), `x: [tr, k]` f32.
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
    let isa = isa.runnable();
    assert!(
        nr <= tile_nr(isa)
            && tr <= TILE_TR
            && row0.checked_add(nr).is_some_and(|r| holds(w.len(), r, k))
            && holds(x.x.len(), tr, k),
        "tile bounds; this is a bug"
    );
    check_pairs(isa, w, &x, tr * k);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: CPU features as in `dot_rows`; bounds and pairs layout checked above.
        unsafe { avx512::tile(w, row0, nr, x, tr, k, acc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; bounds and pairs layout checked above.
        unsafe { avx2::tile(w, row0, nr, x, tr, k, acc) };
        return;
    }
    scalar::tile(w, row0, nr, x.x, tr, k, acc)
}

/// Output features per weight panel (see `cpu::panels`).
pub const PANEL: usize = 32;

/// Bytes ahead of the current panel row that the panel kernels prefetch (into L2).
const PANEL_AHEAD: usize = 8192;

/// How far past the current row of its panel a multi-panel GEMV stream prefetches at input
/// column `kk` (`row_bytes` a panel row, `panel_bytes` a panel, `np` panels side by side):
/// [`PANEL_AHEAD`], and once that is past the panel's end, the same stream of the next group
/// (the panel `np` further on). The AVX2 and AVX-512 `gemv_panels` share it.
#[inline(always)]
fn gemv_prefetch_offset(kk: usize, row_bytes: usize, panel_bytes: usize, np: usize) -> usize {
    if kk * row_bytes + PANEL_AHEAD >= panel_bytes {
        PANEL_AHEAD + (np - 1) * panel_bytes
    } else {
        PANEL_AHEAD
    }
}
/// Most token rows one [`panel`] call takes: on AVX-512, 14 rows × 2 accumulators + 2 weight
/// vectors + the broadcast input use 31 of the 32 registers.
pub const PANEL_TR: usize = 14;

/// Where column `c` of a panel row sits among its 32 elements: in order, except for bf16, whose
/// u32 lane `j` holds column `j` (low half) and column `16 + j` (high half), so the kernels widen
/// both without a shuffle.
pub fn panel_slot(p: View, c: usize) -> usize {
    match p {
        View::BF16(_) => bf16_panel_slot(c),
        _ => c,
    }
}

/// [`panel_slot`] for bf16 panels.
pub fn bf16_panel_slot(c: usize) -> usize {
    if c < PANEL / 2 {
        2 * c
    } else {
        2 * (c - PANEL / 2) + 1
    }
}

/// Input column `j`, output column `c` of a Q4_1 panel (`cpu::panels` layout: per block of 32
/// input columns, 32 f16 scales, 32 f16 minima, then 16 rows of 32 bytes, row `r` holding input
/// columns `2r` and `2r + 1` in its low and high nibbles): `(q, d, m)`, the weight `q·d + m`.
pub fn q4_1_panel_parts(b: &[u8], j: usize, c: usize) -> (u8, f32, f32) {
    let f16_at = |o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    let (blk, r) = ((j / 32) * 640, j % 32);
    let byte = b[blk + 128 + (r / 2) * 32 + c];
    let q = if r % 2 == 0 { byte & 15 } else { byte >> 4 };
    (q, f16_at(blk + 2 * c), f16_at(blk + 64 + 2 * c))
}

/// Weight `(j, c)` (input column `j`, panel column `c`) of one panel `p` in the layout of
/// `cpu::panels`, widened to f32: the reference reader of that layout.
pub fn panel_weight(p: View, j: usize, c: usize) -> f32 {
    let f16_at = |b: &[u8], o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    match p {
        View::Q4_1(b) => {
            let (q, d, m) = q4_1_panel_parts(b, j, c);
            q as f32 * d + m
        }
        View::Q8_0(b) => {
            let blk = (j / 32) * 1088;
            b[blk + 64 + (j % 32) * 32 + c] as i8 as f32 * f16_at(b, blk + 2 * c)
        }
        _ => p.get(j * PANEL + panel_slot(p, c)),
    }
}

/// Most token rows one [`panel`] call takes for panel `p`: block panels keep their scales in
/// registers too, so fewer rows fit.
pub fn panel_tr(p: View) -> usize {
    if p.is_quantized() {
        10
    } else {
        PANEL_TR
    }
}

/// `acc[t][c] = Σ_j x[t][j] · P[j][c]` for `t < tr <= panel_tr(p)` and the 32 columns of one
/// panel `p: [k, 32]` (f32, f16, bf16, Q4_1 or Q8_0 laid out by `cpu::panels`; blocks need
/// `k % 32 == 0`), `x: [tr, k]` f32. Each sum is one FMA chain over `j` from 0 in order, so
/// every ISA gives the same bits as the scalar twin, and a block panel the same bits as the
/// f32 panel of its values.
pub fn panel(
    isa: Isa,
    p: View,
    k: usize,
    x: &[f32],
    tr: usize,
    acc: &mut [[f32; PANEL]; PANEL_TR],
) {
    let isa = isa.runnable();
    check_panel(p, k, x, tr);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: CPU features as in `dot_rows`; bounds and the element type checked above;
        // `acc`'s rows are 32 apart and hold `tr` of them.
        unsafe { avx512::panel(p, k, x.as_ptr(), tr, acc.as_mut_ptr().cast(), PANEL) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; bounds and the element type checked above.
        unsafe { avx2::panel(p, k, x.as_ptr(), tr, acc) };
        return;
    }
    scalar::panel(p, k, x, tr, acc)
}

/// The bounds [`panel`]'s kernels rely on: `tr` rows of `x` and a whole panel of `k` inputs.
fn check_panel(p: View, k: usize, x: &[f32], tr: usize) {
    assert!(
        tr <= panel_tr(p)
            && holds(p.len(), k, PANEL)
            && holds(x.len(), tr, k)
            && (!p.is_quantized() || k.is_multiple_of(32)),
        "panel bounds; this is a bug"
    );
}

/// [`panel`] with token row `t`'s 32 sums written to `out + t · stride` instead of an
/// accumulator array: on AVX-512 straight from the registers (a matmul's output rows, with no
/// copy after; the copy was 2–5 % of a ten-row step's samples), elsewhere through [`panel`]'s
/// array. The same sums, so the same bits.
///
/// # Safety
/// For every `t < tr`, `out + t · stride .. + 32` must be valid for writes of `f32` (and
/// aligned for `f32`: the non-AVX-512 path copies `f32`s), overlap neither `p` nor `x`, and be read or written by no one else while this
/// runs.
pub unsafe fn panel_into(
    isa: Isa,
    p: View,
    k: usize,
    x: &[f32],
    tr: usize,
    out: *mut f32,
    stride: usize,
) {
    let isa = isa.runnable();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        check_panel(p, k, x, tr);
        // SAFETY: CPU features as in `dot_rows`; bounds and the element type checked above;
        // the output rows are the caller's (this function's contract).
        unsafe { avx512::panel(p, k, x.as_ptr(), tr, out, stride) };
        return;
    }
    let mut acc = [[0f32; PANEL]; PANEL_TR];
    panel(isa, p, k, x, tr, &mut acc);
    for (t, row) in acc.iter().take(tr).enumerate() {
        // SAFETY: row `t` of the output is valid for 32 writes and ours (the contract).
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(t * stride), PANEL) };
    }
}

/// Whether this CPU has `prefetchw` (CPUID 8000_0001h ECX bit 8, PRFCHW). Detected once.
fn has_prefetchw() -> bool {
    static PRFCHW: OnceLock<bool> = OnceLock::new();
    *PRFCHW.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // Leaf 8000_0001h, where the highest extended leaf (8000_0000h's EAX) reaches it.
            let ext = std::arch::x86_64::__cpuid(0x8000_0000);
            ext.eax >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Asks for every cache line of `buf` in the state a write needs (`prefetchw`), ahead of a
/// pass that writes them. The lines a single-threaded step writes (the norm's output, the rows
/// RoPE turns in place) were last read or written by the team's other thread: each store then
/// waits for that thread's copy to be invalidated, one line after another, and on a 2-vCPU VM
/// whose vCPUs sit on different dies that is ~30 ns a line (a 10-row norm's 23 KB: 9 µs, of
/// ~1 µs of arithmetic). Asked for together, the invalidations overlap. A hint: nothing is
/// read or written, and the values are the same with it or without (a CPU without PRFCHW
/// skips it).
pub fn prefetch_write(buf: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_prefetchw() {
        for i in (0..buf.len()).step_by(16) {
            // SAFETY: `prefetchw` of an address inside `buf` (the CPU has it: checked above):
            // a hint that reads and writes nothing and cannot fault.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{p}]",
                    p = in(reg) buf.as_ptr().add(i),
                    options(nostack, preserves_flags, readonly)
                )
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = buf;
}

/// Asks for every cache line of `buf` for reading (`prefetcht0`), ahead of a pass that reads
/// it: a norm's weights, evicted by the matrices streamed since its last use. A hint.
pub fn prefetch_read(buf: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..buf.len()).step_by(16) {
        // SAFETY: SSE is part of x86-64; a prefetch of an address inside `buf` cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                buf.as_ptr().add(i).cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = buf;
}

/// This CPU can run [`panel_q4_1_i16`]'s VNNI kernel (AVX-512 F/BW and VNNI). Detected once.
pub fn has_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            Isa::available().contains(&Isa::Avx512) && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// One Q4_1 panel × `tr <= panel_tr(p)` (10) token rows quantized to i16 (`int16::QuantRows::group`):
/// the VNNI kernel under the AVX-512 ISA where [`has_vnni`], else its slow twin (the same
/// bits).
pub fn panel_q4_1_i16(
    isa: Isa,
    p: View,
    k: usize,
    x: (&[i16], &[f32], &[f32]),
    tr: usize,
    acc: &mut [[f32; PANEL]; PANEL_TR],
) {
    let isa = isa.runnable();
    let nb = k / 32;
    assert!(
        matches!(p, View::Q4_1(_))
            && tr <= panel_tr(p)
            && k.is_multiple_of(32)
            && holds(p.len(), k, PANEL)
            && holds(x.0.len(), tr, k)
            && holds(x.1.len(), tr, nb)
            && holds(x.2.len(), tr, nb),
        "int16 panel bounds; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && has_vnni() {
        let View::Q4_1(b) = p else { unreachable!() };
        // SAFETY: AVX-512 F/BW and VNNI detected; bounds and the element type checked above.
        unsafe { avx512::panel_q4_1_i16(b.as_ptr(), k, x, tr, acc) };
        return;
    }
    int16::panel_q4_1_twin(p, k, x, tr, acc)
}

/// Panels one [`gemv_panels`] call reads side by side.
pub const GEMV_PANELS: usize = 4;

/// One token row against `np <= GEMV_PANELS` consecutive panels: `acc[g][c] = Σ_j x[j] ·
/// P_g[j][c]`, `p: [np, k, 32]` (panel `g` at `g · 32 · k`, as `cpu::panels` lays them out).
/// The bits of [`panel`] at `tr = 1` on each panel (every output one FMA chain over `j` in
/// order); the panels' chains run side by side (on AVX-512, 2 per panel where [`panel`] at one
/// row has only 2 in flight and waits on FMA latency; on AVX2, 4 per panel, two panels at a
/// time, in one pass where [`panel`] makes two).
pub fn gemv_panels(
    isa: Isa,
    p: View,
    np: usize,
    k: usize,
    x: &[f32],
    acc: &mut [[f32; PANEL]; GEMV_PANELS],
) {
    let isa = isa.runnable();
    assert!(
        np <= GEMV_PANELS
            && np
                .checked_mul(k)
                .is_some_and(|nk| holds(p.len(), nk, PANEL))
            && x.len() >= k
            && (!p.is_quantized() || k.is_multiple_of(32)),
        "gemv_panels bounds; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: CPU features as in `dot_rows`; bounds and the element type checked above.
        unsafe { avx512::gemv_panels(p, np, k, x.as_ptr(), acc) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; bounds and the element type checked above.
        unsafe { avx2::gemv_panels(p, np, k, x.as_ptr(), acc) };
        return;
    }
    let mut one = [[0f32; PANEL]; PANEL_TR];
    for (g, acc) in acc.iter_mut().enumerate().take(np) {
        panel(
            isa,
            p.slice(g * PANEL * k..(g + 1) * PANEL * k),
            k,
            x,
            1,
            &mut one,
        );
        *acc = one[0];
    }
}

/// Attention scores of `per` query heads against the keys of one KV head:
/// `scores[h * n + j] = (q[h] · kv[offs[j]..offs[j] + d]) * scale` for `q: [per, d]` and
/// `n = offs.len()`. The bits of [`dot`] on every ISA: on AVX-512 (`d` a multiple of 16, at most
/// 128) each key row is loaded once for all heads and the dot products keep [`dot`]'s AVX2 lanes
/// (an accumulator of 16 is its two of 8 side by side) and its final sum.
pub fn attn_scores(
    isa: Isa,
    q: &[f32],
    kv: &[f32],
    offs: &[usize],
    d: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let isa = isa.runnable();
    let (per, n) = (q.len() / d.max(1), offs.len());
    assert!(
        d > 0
            && q.len() == per * d
            && holds(scores.len(), per, n)
            && offs
                .iter()
                .all(|&o| o.checked_add(d).is_some_and(|e| e <= kv.len())),
        "attn_scores bounds; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && d.is_multiple_of(16) && d <= 128 {
        // SAFETY: Avx512 is only chosen when the CPU has it; every key row `offs[j]..+d` is in
        // `kv`, `q` holds `per` heads of `d` and `scores` `per * n` values (asserted above).
        unsafe { avx512::attn_scores(q, kv, offs, d, scale, scores) };
        return;
    }
    for (h, qh) in q.chunks_exact(d).enumerate() {
        for (j, &o) in offs.iter().enumerate() {
            scores[h * n + j] = dot(isa, qh, &kv[o..o + d]) * scale;
        }
    }
}

/// The attention output of `per` query heads over the values of one KV head:
/// `out[h] = Σ_j w[h * n + j] · kv[offs[j]..offs[j] + d]`, summed in key order from zero,
/// `out: [per, d]`, `w: [per, n]` the softmax's weights (its numerators already divided by
/// their sum: one vector division a row, the same IEEE quotients as one a key). The bits of
/// [`axpy`] key after key on every ISA: on AVX-512 (`d` a multiple of 16, at most 128) the
/// output rows stay in registers across the keys (the same FMA per element, in the same order)
/// instead of being loaded and stored for each key.
pub fn attn_pv(isa: Isa, w: &[f32], kv: &[f32], offs: &[usize], d: usize, out: &mut [f32]) {
    let isa = isa.runnable();
    assert!(d > 0, "attn_pv with d = 0; this is a bug");
    let (per, n) = (out.len() / d, offs.len());
    assert!(
        per * d == out.len()
            && holds(w.len(), per, n)
            && offs
                .iter()
                .all(|&o| o.checked_add(d).is_some_and(|e| e <= kv.len())),
        "attn_pv bounds; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && d.is_multiple_of(16) && d <= 128 {
        // SAFETY: as in `attn_scores`; `w` holds `per * n` weights and `out` `per * d` values.
        unsafe { avx512::attn_pv(w, kv, offs, d, out) };
        return;
    }
    out.fill(0.0);
    for (j, &o) in offs.iter().enumerate() {
        let vr = &kv[o..o + d];
        for (h, oh) in out.chunks_exact_mut(d).enumerate() {
            axpy(isa, w[h * n + j], vr, oh);
        }
    }
}

/// `a · b`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    let isa = isa.runnable();
    assert_eq!(a.len(), b.len(), "dot lengths; this is a bug");
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; equal lengths asserted above.
        return unsafe { avx2::dot(a, b) };
    }
    scalar::dot(a, b)
}

/// `y += a * x`.
pub fn axpy(isa: Isa, a: f32, x: &[f32], y: &mut [f32]) {
    let isa = isa.runnable();
    assert_eq!(x.len(), y.len(), "axpy lengths; this is a bug");
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; equal lengths asserted above.
        unsafe { avx2::axpy(a, x, y) };
        return;
    }
    scalar::axpy(a, x, y)
}

/// Rows `row0..row0 + nr` of `w: [*, k]` widened to f32 into `out: [nr, k]`: the panel the
/// matmul hands its f32 kernels for ggml block weights (and a plain widening for the others).
/// Bit-identical to [`View::widen_into`], its scalar twin.
pub fn dequant_rows(isa: Isa, w: View, row0: usize, nr: usize, k: usize, out: &mut [f32]) {
    let isa = isa.runnable();
    // Checked products, as every bound here: a wrapping `row0 · k` would read row 0 instead.
    let rows = row0.checked_add(nr);
    assert!(
        rows.is_some_and(|r| holds(w.len(), r, k)) && holds(out.len(), nr, k),
        "dequant_rows bounds; this is a bug"
    );
    let (start, end) = (row0 * k, (row0 + nr) * k);
    let out = &mut out[..nr * k];
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() && k.is_multiple_of(32) {
        match w {
            // SAFETY: CPU features as in `dot_rows`; whole blocks, bounds checked above (a row
            // of k elements is k / 32 blocks).
            View::Q4_1(b) => {
                return unsafe { avx2::dequant_q4_1(&b[start / 32 * 20..end / 32 * 20], out) }
            }
            // SAFETY: as above.
            View::Q8_0(b) => {
                return unsafe { avx2::dequant_q8_0(&b[start / 32 * 34..end / 32 * 34], out) }
            }
            _ => {}
        }
    }
    w.widen_into(start..end, out)
}

/// Most pairs one [`dot_chains`] call takes.
pub const CHAINS: usize = 8;

/// `out[i] = ws[i] · xs[i]` for up to [`CHAINS`] pairs of f32 rows of one length, each one
/// `mul_add` chain over the row from 0, in order: the bits the panel kernels give that output
/// (each of their outputs is such a chain), so that the sparse head's picks equal the dense
/// head's logits bit for bit. The pairs' chains run side by side (one alone is bound by the
/// FMA's latency).
pub fn dot_chains(isa: Isa, ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let n = ws.len();
    let k = ws.first().map_or(0, |w| w.len());
    assert!(
        n <= CHAINS
            && xs.len() == n
            && out.len() == n
            && ws.iter().zip(xs).all(|(w, x)| w.len() == k && x.len() == k),
        "dot_chains shapes; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.runnable().has_avx2() {
        // SAFETY: `runnable` keeps the AVX2 and AVX-512 ISAs only on CPUs with FMA.
        return unsafe { dot_chains_fma(ws, xs, out) };
    }
    let _ = isa;
    dot_chains_in_order(ws, xs, out)
}

/// [`dot_chains`] compiled with FMA instructions (`mul_add` is one `vfmadd`, not a call).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn dot_chains_fma(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    dot_chains_in_order(ws, xs, out)
}

#[inline(always)]
fn dot_chains_in_order(ws: &[&[f32]], xs: &[&[f32]], out: &mut [f32]) {
    let mut acc = [0f32; CHAINS];
    let k = ws.first().map_or(0, |w| w.len());
    for j in 0..k {
        for ((a, w), x) in acc.iter_mut().zip(ws).zip(xs) {
            *a = w[j].mul_add(x[j], *a);
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// The largest element of `x` (`-inf` when empty, NaN when any element is NaN).
pub fn max(isa: Isa, x: &[f32]) -> f32 {
    let isa = isa.runnable();
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; only in-bounds loads of `x`.
        return unsafe { avx2::max(x) };
    }
    scalar::max(x)
}

/// `sum(exp(x - shift))` for `shift >= max(x)`, with a polynomial `exp` (relative error ~1e-7
/// per term; terms below `exp(-87.3)` count as ~1e-38).
pub fn sum_exp(isa: Isa, x: &[f32], shift: f32) -> f32 {
    let isa = isa.runnable();
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; only in-bounds loads of `x`.
        return unsafe { avx2::sum_exp(x, shift) };
    }
    scalar::sum_exp(x, shift)
}

/// `x[i] = exp(x[i] - shift)` for `shift >= max(x)` (the polynomial of [`sum_exp`]); returns
/// their sum: a softmax's numerators and denominator in one pass.
pub fn exp_shift(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    let isa = isa.runnable();
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; only in-bounds loads and stores of `x`.
        return unsafe { avx2::exp_shift(x, shift) };
    }
    scalar::exp_shift(x, shift)
}

/// One row of RMSNorm: `out = w * (x * inv)`, `inv = 1 / sqrt(mean(x²) + eps)` in f32 with the
/// mean summed in f64. Each element's scaling is the scalar twin's two f32 products; the f64
/// sum's order differs by ISA, which can move `inv` by an ulp (when the f64 mean lies within
/// its last bits of an f32 rounding boundary).
pub fn rmsnorm_row(isa: Isa, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let isa = isa.runnable();
    assert!(
        !x.is_empty() && w.len() == x.len() && out.len() == x.len(),
        "rmsnorm_row lengths; this is a bug"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; `x`, `w` and `out` have equal lengths
        // (asserted above) and only indices below it are read or written.
        return unsafe { avx2::rmsnorm_row(x, w, eps, out) };
    }
    scalar::rmsnorm_row(x, w, eps, out)
}

/// `g[i] = silu(g[i]) * u[i]` for `i < min(len)`, `silu(g) = g · sigmoid(g)` through the
/// polynomial `exp` (relative error ~1e-7 against f64).
pub fn silu_mul(isa: Isa, g: &mut [f32], u: &[f32]) {
    let isa = isa.runnable();
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: CPU features as in `dot_rows`; only in-bounds loads of `g`, `u` and stores
        // of `g`.
        return unsafe { avx2::silu_mul(g, u) };
    }
    scalar::silu_mul(g, u)
}

#[cfg(test)]
mod tests;
