//! Tests of the SIMD kernels against their scalar twins and f64 references, on every ISA the
//! machine runs.
#![allow(clippy::needless_range_loop)]

use super::*;
use half::{bf16, f16};

/// Deterministic pseudo-random values in [-1, 1) (xorshift), never all zeros.
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut bits = crate::test_rng::xorshift(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    (0..n)
        .map(|_| crate::test_rng::signed_unit(bits()))
        .collect()
}

/// The bf16 even/odd split the kernels of `isa` want, if any.
fn split(isa: Isa, view: View, x: &[f32], k: usize) -> (Vec<f32>, usize) {
    match pairs_block(isa, view) {
        Some(block) => (bf16_pairs(x, k, block), block),
        None => (Vec::new(), 0),
    }
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The prefetch hints read and write nothing: every length (none, a part of a line, many
/// lines), every start within a line, and a buffer that is then written and read as usual.
#[test]
fn prefetch_hints_leave_buffers_as_they_were() {
    let data = rand(300, 0x9e37_79b9);
    for start in 0..17 {
        for len in [0, 1, 15, 16, 17, 100, 300 - start] {
            let view = &data[start..start + len];
            let before = view.to_vec();
            super::prefetch_write(view);
            super::prefetch_read(view);
            assert_eq!(view, &before[..], "start {start} len {len}");
        }
    }
    let mut out = vec![0f32; 576];
    super::prefetch_write(&out);
    let w = rand(576, 7);
    super::prefetch_read(&w);
    rmsnorm_row(
        Isa::detect(),
        &data[..276].repeat(3)[..576],
        &w,
        1e-5,
        &mut out,
    );
    assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|&v| v != 0.0));
}

/// RMSNorm rows against the scalar twin and an f64 reference, on every ISA: lengths below,
/// at and past a vector, SmolLM2's head and hidden size, a Qwen3 head (128), values spread over
/// 2^±8; and a row whose small squares an f32 running sum would drop (16 ones, then 2^-12s).
/// On these inputs the SIMD kernels match the twin bit for bit (the f64 sum's order differs,
/// and another input could move `inv` by an ulp; then this test needs a new seed, not a
/// tolerance).
#[test]
fn rmsnorm_rows_match_the_scalar_twin_and_f64() {
    let mut rows: Vec<Vec<f32>> = [1, 7, 8, 15, 16, 17, 64, 128, 576, 1000]
        .iter()
        .map(|&n| {
            rand(n, n as u64)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (2f32).powi((i % 17) as i32 - 8))
                .collect()
        })
        .collect();
    rows.push(
        (0..4096)
            .map(|i| if i < 16 { 1.0 } else { 1.0 / 4096.0 })
            .collect(),
    );
    for x in &rows {
        let n = x.len();
        let w: Vec<f32> = rand(n, 1000 + n as u64).iter().map(|v| 1.0 + v).collect();
        let eps = 1e-5;
        let mut twin = vec![0f32; n];
        scalar::rmsnorm_row(x, &w, eps, &mut twin);
        let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for isa in Isa::available() {
            let mut got = rand(n, 7); // overwritten
            rmsnorm_row(isa, x, &w, eps, &mut got);
            for i in 0..n {
                assert_eq!(
                    got[i].to_bits(),
                    twin[i].to_bits(),
                    "{isa:?} n {n} at {i}: {} vs twin {}",
                    got[i],
                    twin[i]
                );
                let exact = w[i] as f64 * x[i] as f64 * inv;
                assert!(
                    (got[i] as f64 - exact).abs() <= 4e-7 * exact.abs() + 1e-30,
                    "{isa:?} n {n} at {i}: {} vs f64 {exact}",
                    got[i]
                );
            }
        }
    }
}

/// The attention kernels against their twins (per-key `dot` and `axpy`, the code they
/// replace) bit for bit on every ISA, and against f64 sums: head dims with and without an
/// AVX-512 kernel, 1 to 9 heads per KV head (more than one register pass holds), 0 to 37
/// keys at scattered offsets.
#[test]
fn attention_kernels_match_per_key_dots_and_axpys() {
    let slab = rand(64 * 160, 5);
    // 80 and 112 reach the AVX-512 kernels of 5 and 7 vectors a row; 16 heads a KV head, more
    // than one pass of them.
    for d in [8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144] {
        for per in [1, 2, 3, 5, 7, 9, 16] {
            for n in [0, 1, 5, 37] {
                let seed = (d * 100 + per * 10 + n) as u64;
                let q = rand(per * d, seed);
                // Scattered key rows, some repeated, none aligned to 16 floats.
                let offs: Vec<usize> = (0..n).map(|j| (j * 7919 + 3) % (slab.len() - d)).collect();
                let scale = 1.0 / (d as f32).sqrt();
                for isa in Isa::available() {
                    let mut got = vec![0f32; per * n];
                    attn_scores(isa, &q, &slab, &offs, d, scale, &mut got);
                    for h in 0..per {
                        for (j, &o) in offs.iter().enumerate() {
                            let qh = &q[h * d..(h + 1) * d];
                            let want = dot(isa, qh, &slab[o..o + d]) * scale;
                            assert_eq!(
                                got[h * n + j].to_bits(),
                                want.to_bits(),
                                "{isa:?} d {d} per {per} n {n}"
                            );
                            let exact = dot64(qh, &slab[o..o + d]) * scale as f64;
                            assert!((got[h * n + j] as f64 - exact).abs() < 1e-5 * d as f64);
                        }
                    }
                    let p: Vec<f32> = rand(per * n, seed + 1)
                        .iter()
                        .map(|v| v.abs() + 0.01)
                        .collect();
                    let sums: Vec<f32> = (0..per)
                        .map(|h| p[h * n..(h + 1) * n].iter().sum::<f32>() + 0.5)
                        .collect();
                    let mut out = rand(per * d, seed + 2); // overwritten, not added to
                    let mut w = p.clone();
                    for (wh, &sum) in w.chunks_exact_mut(n.max(1)).zip(&sums) {
                        wh.iter_mut().for_each(|x| *x /= sum);
                    }
                    attn_pv(isa, &w, &slab, &offs, d, &mut out);
                    let mut want = vec![0f32; per * d];
                    for (j, &o) in offs.iter().enumerate() {
                        for h in 0..per {
                            let wh = &mut want[h * d..(h + 1) * d];
                            axpy(isa, p[h * n + j] / sums[h], &slab[o..o + d], wh);
                        }
                    }
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{isa:?} d {d} per {per} n {n} at {i}"
                        );
                        let (h, c) = (i / d, i % d);
                        let exact: f64 = offs
                            .iter()
                            .enumerate()
                            .map(|(j, &o)| (p[h * n + j] / sums[h]) as f64 * slab[o + c] as f64)
                            .sum();
                        assert!((*g as f64 - exact).abs() < 1e-5);
                    }
                }
            }
        }
    }
}

/// Random Q4_1 / Q8_0 blocks with finite f16 scales.
fn blocks(n: usize, bytes: usize, seed: u64) -> Vec<u8> {
    let r = rand(n * bytes, seed);
    let mut out: Vec<u8> = r.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
    for (i, b) in out.chunks_exact_mut(bytes).enumerate() {
        let d = f16::from_f32(0.01 + 0.05 * r[i].abs()).to_le_bytes();
        let m = f16::from_f32(-0.3 * r[i + 1]).to_le_bytes();
        b[..2].copy_from_slice(&d);
        if bytes == 20 {
            b[2..4].copy_from_slice(&m);
        }
    }
    out
}

#[test]
fn dequant_rows_is_bit_identical_to_the_scalar_twin() {
    let k = 576;
    let (q41, q80) = (blocks(10 * k / 32, 20, 5), blocks(10 * k / 32, 34, 6));
    for isa in Isa::available() {
        for view in [View::Q4_1(&q41), View::Q8_0(&q80)] {
            for (row0, nr) in [(0, 1), (3, 4), (9, 1), (0, 10)] {
                let mut got = vec![f32::NAN; nr * k];
                dequant_rows(isa, view, row0, nr, k, &mut got);
                let mut want = vec![0f32; nr * k];
                view.widen_into(row0 * k..(row0 + nr) * k, &mut want);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} rows {row0}+{nr}");
            }
        }
    }
    // The scalar twin against the GGUF formula, element by element.
    let b = &q41[..20];
    let (d, m) = (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        f16::from_le_bytes([b[2], b[3]]).to_f32(),
    );
    for j in 0..16 {
        assert_eq!(View::Q4_1(b).get(j), (b[4 + j] & 15) as f32 * d + m);
        assert_eq!(View::Q4_1(b).get(j + 16), (b[4 + j] >> 4) as f32 * d + m);
    }
    let b = &q80[..34];
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    for j in 0..32 {
        assert_eq!(View::Q8_0(b).get(j), b[2 + j] as i8 as f32 * d);
    }
}

#[test]
fn max_and_sum_exp_match_f64_on_every_isa() {
    for isa in Isa::available() {
        for n in [0, 1, 7, 31, 32, 33, 100, 49152] {
            let x: Vec<f32> = rand(n, n as u64 + 3).iter().map(|v| v * 30.0).collect();
            let m = max(isa, &x);
            assert_eq!(
                m,
                x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "{isa:?} {n}"
            );
            if n == 0 {
                assert_eq!(sum_exp(isa, &x, 0.0), 0.0);
                continue;
            }
            // A NaN anywhere (in a vector chunk, first or last, or in the tail) makes the
            // maximum NaN; infinities are ordinary elements. (AVX2's `vmaxps` dropped the
            // lane's maximum after a NaN: 100 at 0, NaN at 32 gave 0.)
            for at in [0, n / 2, n - 1, n.saturating_sub(33)] {
                let mut y = x.clone();
                y[at] = f32::NAN;
                assert!(max(isa, &y).is_nan(), "{isa:?} n={n} NaN at {at}");
                y[at] = f32::INFINITY;
                assert_eq!(max(isa, &y), f32::INFINITY, "{isa:?} n={n} inf at {at}");
                y[at] = f32::NEG_INFINITY;
                let want = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(isa, &y), want, "{isa:?} n={n} -inf at {at}");
            }
            if n >= 64 {
                let mut y = vec![0.0f32; n];
                (y[0], y[32]) = (100.0, f32::NAN);
                assert!(max(isa, &y).is_nan(), "{isa:?} n={n}");
            }
            let want: f64 = x.iter().map(|&v| (v as f64 - m as f64).exp()).sum();
            let got = sum_exp(isa, &x, m) as f64;
            assert!(
                ((got - want) / want).abs() < 2e-6,
                "{isa:?} n={n}: {got} vs {want}"
            );
        }
        // Every term, across the whole range the polynomial covers: 32 copies, so that the
        // vector `exp` computes them (a lone value is the scalar remainder's).
        for i in 0..=2000 {
            let v = -87.0 * i as f32 / 2000.0;
            let got = sum_exp(isa, &[v; 32], 0.0) as f64 / 32.0;
            let want = (v as f64).exp();
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "{isa:?} exp({v}): {got} vs {want}"
            );
        }
    }
}

#[test]
fn exp_shift_and_silu_mul_match_f64_on_every_isa() {
    for isa in Isa::available() {
        for n in [0, 1, 7, 8, 9, 31, 33, 100, 1541] {
            let x: Vec<f32> = rand(n, n as u64 + 11).iter().map(|v| v * 40.0).collect();
            let m = x.iter().copied().fold(0f32, f32::max);
            let mut e = x.clone();
            let sum = exp_shift(isa, &mut e, m) as f64;
            let mut want_sum = 0f64;
            for (i, (&v, &got)) in x.iter().zip(&e).enumerate() {
                let want = ((v - m) as f64).exp();
                want_sum += want;
                // Terms below exp(-87.3) come out as ~1e-38.
                let tol = 1e-6 * want + 2e-38;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{isa:?} n={n} [{i}] exp({v} - {m}): {got} vs {want}"
                );
            }
            assert!(
                (sum - want_sum).abs() <= 2e-6 * want_sum + 1e-37,
                "{isa:?} n={n}: sum {sum} vs {want_sum}"
            );
            let u = rand(n, n as u64 + 12);
            let mut g = x.clone();
            silu_mul(isa, &mut g, &u);
            for i in 0..n {
                let (v, w) = (x[i] as f64, u[i] as f64);
                let want = v / (1.0 + (-v).exp()) * w;
                assert!(
                    (g[i] as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                    "{isa:?} n={n} [{i}] silu({v}) * {w}: {} vs {want}",
                    g[i]
                );
            }
        }
        // Large magnitudes: no overflow, the limits; the SIMD lanes and the scalar tail agree.
        let big = [-200.0, -90.0, -0.0, 0.0, 90.0, 200.0, 1e30, -1e30];
        let mut g: Vec<f32> = big.iter().chain(&big).copied().collect();
        silu_mul(isa, &mut g, &[1.0; 16][..15]);
        let want = [-0.0, -0.0, -0.0, 0.0, 90.0, 200.0, 1e30, -0.0];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&g[..8]), bits(&want), "{isa:?} {:?}", &g[..8]);
        assert_eq!(bits(&g[8..15]), bits(&want[..7]), "{isa:?} {:?}", &g[8..]);
        assert_eq!(g[15], -1e30, "{isa:?}: past u's end");
        // Lanes and tails give the same bits: random values through both.
        let x: Vec<f32> = rand(64, 5).iter().map(|v| v * 20.0).collect();
        let u = rand(64, 6);
        let mut simd = x.clone();
        silu_mul(isa, &mut simd, &u);
        for i in 0..64 {
            let mut one = [x[i]];
            silu_mul(isa, &mut one, &u[i..i + 1]);
            assert_eq!(one[0].to_bits(), simd[i].to_bits(), "{isa:?} [{i}]");
            let mut e = x.clone();
            let mut t = [x[i]];
            exp_shift(isa, &mut e, 20.0);
            exp_shift(isa, &mut t, 20.0);
            assert_eq!(t[0].to_bits(), e[i].to_bits(), "{isa:?} exp [{i}]");
        }
    }
}

#[test]
fn dot_rows_matches_f64_for_every_dtype_isa_and_tail() {
    for isa in Isa::available() {
        for k in [1, 7, 8, 9, 16, 31, 32, 33, 64, 100, 576] {
            let wf = rand(4 * k + 3 * k, k as u64);
            let x = rand(k, 99 + k as u64);
            let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            for view in [View::F32(&wf), View::F16(&w16), View::BF16(&wb16)] {
                for nr in 1..=4 {
                    let row0 = 2;
                    let mut acc = [f32::NAN; 4];
                    let (pairs, block) = split(isa, view, &x, k);
                    let rows = Rows {
                        x: &x,
                        pairs: &pairs,
                        block,
                    };
                    dot_rows(isa, view, row0, nr, k, rows, &mut acc);
                    for r in 0..nr {
                        let row: Vec<f32> = (0..k).map(|i| view.get((row0 + r) * k + i)).collect();
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
            let wf = rand((3 + TILE_NR) * k, 7 + k as u64);
            let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            let x = rand(TILE_TR * k, 11 + k as u64);
            for view in [View::F32(&wf), View::F16(&w16), View::BF16(&wb16)] {
                for nr in 1..=tile_nr(isa) {
                    for tr in 1..=TILE_TR {
                        let row0 = 3;
                        let mut acc = [[f32::NAN; TILE_TR]; TILE_NR];
                        let (pairs, block) = split(isa, view, &x, k);
                        let rows = Rows {
                            x: &x,
                            pairs: &pairs,
                            block,
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

/// Random Q4_1 and Q8_0 matrices `[n, k]` (seeds `seed`, `seed + 2`) packed into panels, named
/// by dtype; none where `k` is not a multiple of the 32-weight block.
fn block_panels(n: usize, k: usize, seed: u64) -> Vec<(&'static str, crate::tensor::HostTensor)> {
    if !k.is_multiple_of(32) {
        return Vec::new();
    }
    let (q41, q80) = (
        blocks(n * k / 32, 20, seed),
        blocks(n * k / 32, 34, seed + 2),
    );
    let pack = |v| crate::backend::cpu::panels::pack(Isa::Scalar, v, n, k);
    vec![
        ("q4_1", pack(View::Q4_1(&q41))),
        ("q8_0", pack(View::Q8_0(&q80))),
    ]
}

/// The panel kernels: bit for bit the scalar twin on every ISA, and within f32 rounding of
/// an f64 reference, for every token count and dtype, on random panels.
#[test]
fn panel_is_bit_identical_across_isas_and_matches_f64() {
    for k in [1, 5, 16, 47, 64, 576] {
        let wf = rand(PANEL * k, 21 + k as u64);
        let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rand(PANEL_TR * k, 23 + k as u64);
        let mut views = vec![
            ("f32", View::F32(&wf)),
            ("f16", View::F16(&w16)),
            ("bf16", View::BF16(&wb16)),
        ];
        // The ggml block panels (the many-row kernels beam search runs), where `k` is a
        // multiple of 32, up to their own `panel_tr` rows.
        let packed = block_panels(PANEL, k, 25);
        views.extend(packed.iter().map(|(dt, t)| (*dt, t.view())));
        for (dt, view) in views {
            for tr in 1..=panel_tr(view) {
                let mut want = [[f32::NAN; PANEL]; PANEL_TR];
                scalar::panel(view, k, &x, tr, &mut want);
                for t in 0..tr {
                    for c in 0..PANEL {
                        let x = &x[t * k..(t + 1) * k];
                        assert_panel_f64(view, k, c, x, want[t][c], "scalar", tr, t);
                    }
                }
                for isa in Isa::available() {
                    let mut got = [[f32::NAN; PANEL]; PANEL_TR];
                    panel(isa, view, k, &x, tr, &mut got);
                    assert_rows_bits(&got[..tr], &want[..tr], |t, c| {
                        format!("{isa:?} {dt} k={k} tr={tr} ({t},{c})")
                    });
                }
            }
        }
    }
}

/// `panel_into` writes each token row's 32 sums at its stride, bit for bit `panel`'s, on every
/// ISA and panel type, and nothing around them: the output is a NaN-filled matrix of 45
/// columns, the panel's at columns 7..39, and every other value must stay NaN.
#[test]
fn panel_into_writes_its_rows_at_the_stride_and_nothing_else() {
    const STRIDE: usize = 45;
    const AT: usize = 7;
    for k in [5, 64] {
        let wf = rand(PANEL * k, 31 + k as u64);
        let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rand(PANEL_TR * k, 33 + k as u64);
        let mut views = vec![("f32", View::F32(&wf)), ("bf16", View::BF16(&wb16))];
        let packed = block_panels(PANEL, k, 35);
        views.extend(packed.iter().map(|(dt, t)| (*dt, t.view())));
        for (dt, view) in views {
            for tr in 1..=panel_tr(view) {
                let mut want = [[f32::NAN; PANEL]; PANEL_TR];
                panel(Isa::Scalar, view, k, &x, tr, &mut want);
                for isa in Isa::available() {
                    // One row more than the panel's, so a store past the last row shows.
                    let mut out = vec![f32::NAN; (tr + 1) * STRIDE];
                    // SAFETY: rows `t < tr` at `AT + t · STRIDE` hold 32 values of `out`,
                    // which nothing else touches.
                    unsafe { panel_into(isa, view, k, &x, tr, out[AT..].as_mut_ptr(), STRIDE) };
                    for (i, v) in out.iter().enumerate() {
                        let (t, c) = (i / STRIDE, i % STRIDE);
                        if t < tr && (AT..AT + PANEL).contains(&c) {
                            assert_eq!(
                                v.to_bits(),
                                want[t][c - AT].to_bits(),
                                "{isa:?} {dt} k={k} tr={tr} ({t},{c})"
                            );
                        } else {
                            assert!(v.is_nan(), "{isa:?} {dt} k={k} tr={tr}: wrote ({t},{c})");
                        }
                    }
                }
            }
        }
    }
}

/// Every value of `got` bit for bit `want`'s (rows of one panel's columns); `at(row, col)`
/// names a mismatch.
fn assert_rows_bits(
    got: &[[f32; PANEL]],
    want: &[[f32; PANEL]],
    at: impl Fn(usize, usize) -> String,
) {
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        for c in 0..PANEL {
            assert_eq!(g[c].to_bits(), w[c].to_bits(), "{}", at(r, c));
        }
    }
}

/// `got`, column `c` of panel `p: [k, 32]` against `x: [k]`, within f32 rounding of the
/// f64 dot product (`what`, `n`, `i`: which case, for the message).
#[allow(clippy::too_many_arguments)]
fn assert_panel_f64(
    p: View,
    k: usize,
    c: usize,
    x: &[f32],
    got: f32,
    what: &str,
    n: usize,
    i: usize,
) {
    let col: Vec<f32> = (0..k).map(|j| super::panel_weight(p, j, c)).collect();
    let r = dot64(&col, x);
    assert!(
        (got as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt(),
        "{what} k={k} n={n} i={i} col {c}: {got} against {r}"
    );
}

/// The one-row kernel over several panels side by side: every output bit for bit the
/// scalar twin's (`scalar::panel` at one row, panel by panel) on every ISA, and within f32
/// rounding of an f64 reference, for 1 to `GEMV_PANELS` panels, odd `k` and every dtype (the
/// ggml block panels where `k` is a multiple of 32).
#[test]
fn gemv_panels_is_bit_identical_to_the_scalar_twin_and_matches_f64() {
    // 32 and 64: one or two blocks, where the block kernels' prefetch turns to the next group
    // at once.
    for k in [1, 3, 32, 47, 64, 93, 576, 1536] {
        let n = GEMV_PANELS * PANEL;
        let wf = rand(n * k, 31 + k as u64);
        let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rand(k, 37 + k as u64);
        let mut views = vec![
            ("f32", View::F32(&wf)),
            ("f16", View::F16(&w16)),
            ("bf16", View::BF16(&wb16)),
        ];
        let packed = block_panels(n, k, 41);
        views.extend(packed.iter().map(|(dt, t)| (*dt, t.view())));
        for (dt, view) in views {
            for np in 1..=GEMV_PANELS {
                let panel_of = |g: usize| view.slice(g * PANEL * k..(g + 1) * PANEL * k);
                let mut want = [[f32::NAN; PANEL]; GEMV_PANELS];
                for (g, want) in want.iter_mut().enumerate().take(np) {
                    let mut one = [[f32::NAN; PANEL]; PANEL_TR];
                    scalar::panel(panel_of(g), k, &x, 1, &mut one);
                    *want = one[0];
                    for c in 0..PANEL {
                        assert_panel_f64(panel_of(g), k, c, &x, want[c], dt, np, g);
                    }
                }
                for isa in Isa::available() {
                    let mut got = [[f32::NAN; PANEL]; GEMV_PANELS];
                    // Only the first `np` panels are given: none read past them.
                    gemv_panels(isa, view.slice(0..np * PANEL * k), np, k, &x, &mut got);
                    assert_rows_bits(&got[..np], &want[..np], |g, c| {
                        format!("{isa:?} {dt} k={k} np={np} ({g},{c})")
                    });
                }
            }
        }
    }
}

/// The one-row kernels read nothing past the panels they are given: the panels end where the
/// last page of a file mapping, one past the end of its file, begins (any access there is a
/// SIGBUS, which kills the test process), for every dtype, 1 to `GEMV_PANELS` panels and every
/// ISA, each result bit for bit the same call's on an ordinary buffer.
#[cfg(unix)]
#[test]
fn gemv_panels_read_nothing_past_their_panels() {
    use crate::tensor::{DType, HostTensor};
    use std::sync::Arc;
    // At least any page size this runs on.
    const GUARD: usize = 1 << 16;
    let dir = std::env::temp_dir().join(format!("gram-gemv-guard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for k in [32, 64, 576] {
        let n = GEMV_PANELS * PANEL;
        let wf = rand(n * k, 51 + k as u64);
        let w16: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb16: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let (q41, q80) = (blocks(n * k / 32, 20, 53), blocks(n * k / 32, 34, 59));
        let pack = |v| crate::backend::cpu::panels::pack(Isa::Scalar, v, n, k);
        let (p41, p80) = (pack(View::Q4_1(&q41)), pack(View::Q8_0(&q80)));
        let x = rand(k, 61 + k as u64);
        for (dtype, view) in [
            (DType::F32, View::F32(&wf)),
            (DType::F16, View::F16(&w16)),
            (DType::BF16, View::BF16(&wb16)),
            (DType::Q4_1, p41.view()),
            (DType::Q8_0, p80.view()),
        ] {
            for np in 1..=GEMV_PANELS {
                let part = view.slice(0..np * PANEL * k);
                let bytes: &[u8] = match part {
                    View::F32(s) => bytemuck::cast_slice(s),
                    View::F16(s) => bytemuck::cast_slice(s),
                    View::BF16(s) => bytemuck::cast_slice(s),
                    View::Q4_1(b) | View::Q8_0(b) => b,
                };
                let len = bytes.len().next_multiple_of(GUARD);
                let mut file = vec![0u8; len];
                file[len - bytes.len()..].copy_from_slice(bytes);
                let path = dir.join(format!("{}-{k}-{np}", dtype.name()));
                std::fs::write(&path, &file).unwrap();
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: the file is this test's own and is not changed while mapped; the map
                // is one guard's length longer than the file, so that page is past its end.
                let map = unsafe { memmap2::MmapOptions::new().len(len + GUARD).map(&f) };
                let map = Arc::new(map.unwrap());
                let t =
                    HostTensor::mapped(&map, len - bytes.len()..len, dtype, vec![np * PANEL, k]);
                assert!(
                    t.is_mapped(),
                    "{dtype:?}: the test needs the mapped bytes themselves"
                );
                for isa in Isa::available() {
                    let mut want = [[f32::NAN; PANEL]; GEMV_PANELS];
                    gemv_panels(isa, part, np, k, &x, &mut want);
                    let mut got = [[f32::NAN; PANEL]; GEMV_PANELS];
                    gemv_panels(isa, t.view(), np, k, &x, &mut got);
                    assert_rows_bits(&got[..np], &want[..np], |g, c| {
                        format!("{isa:?} {dtype:?} k={k} np={np} ({g},{c})")
                    });
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
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

/// The int16-activation Q4_1 panel (`int16`): the VNNI kernel gives its twin's bits for every
/// token count, and the twin is within the quantization bound of an f64 sum over the exact
/// weights and the unquantized rows: per block `Σ |w|·s/2` (each value off by at most half a
/// step), plus f32 rounding. Rows of mixed magnitudes, one all-zero block (scale 0).
#[test]
fn int16_panel_matches_its_twin_and_the_quantization_bound() {
    use super::int16::{panel_q4_1_twin, QuantRows};
    if !super::has_vnni() {
        eprintln!("no AVX-512 VNNI: the int16 panel is its twin here; only the bound is checked");
    }
    for k in [32, 64, 576] {
        let n = 3 * PANEL;
        let q41 = blocks(n * k / 32, 20, 61 + k as u64);
        let packed = crate::backend::cpu::panels::pack(Isa::Scalar, View::Q4_1(&q41), n, k);
        let tr_max = panel_tr(View::Q4_1(&q41));
        let mut x = rand(tr_max * k, 67 + k as u64);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= [1.0, 30.0, 1e-3][(i / 7) % 3];
        }
        x[k..k + 32].fill(0.0);
        let q = QuantRows::new(&x, tr_max, k);
        assert!(q.scale[k / 32] == 0.0 && q.sum[k / 32] == 0.0);
        for g in 0..n / PANEL {
            let view = packed.view().slice(g * PANEL * k..(g + 1) * PANEL * k);
            for tr in 1..=tr_max {
                for t0 in [0, tr_max - tr] {
                    let rows = q.group(t0, tr);
                    let mut want = [[f32::NAN; PANEL]; PANEL_TR];
                    panel_q4_1_twin(view, k, rows, tr, &mut want);
                    for t in 0..tr {
                        let xr = &x[(t0 + t) * k..(t0 + t + 1) * k];
                        for c in 0..PANEL {
                            let w: Vec<f32> = (0..k).map(|j| panel_weight(view, j, c)).collect();
                            let exact = dot64(&w, xr);
                            let mut bound = 0f64;
                            let mut mag = 0f64;
                            for b in 0..k / 32 {
                                let s = q.scale[(t0 + t) * (k / 32) + b] as f64;
                                for j in 32 * b..32 * b + 32 {
                                    bound += w[j].abs() as f64 * s / 2.0;
                                    mag += (w[j] as f64 * xr[j] as f64).abs();
                                }
                            }
                            let got = want[t][c] as f64;
                            assert!(
                                (got - exact).abs() <= bound * 1.0001 + 1e-6 * mag + 1e-7,
                                "k={k} tr={tr} t0={t0} ({t},{c}): {got} vs {exact}, bound {bound}"
                            );
                        }
                    }
                    for isa in Isa::available() {
                        let mut got = [[f32::NAN; PANEL]; PANEL_TR];
                        super::panel_q4_1_i16(isa, view, k, rows, tr, &mut got);
                        assert_rows_bits(&got[..tr], &want[..tr], |t, c| {
                            format!("{isa:?} vnni {} k={k} tr={tr} ({t},{c})", super::has_vnni())
                        });
                    }
                }
            }
        }
    }
}

/// Shapes whose bounds products wrap around `usize` are refused by the safe entry points'
/// checks (a panic), never passed to the unsafe kernels (which read before the slices or
/// wrote through a dangling pointer in release builds, where the product wrapped to 0).
#[test]
fn wrapping_shapes_are_refused_not_run() {
    let refused = |what: &str, f: &mut dyn FnMut()| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        assert!(r.is_err(), "{what}: a wrapping shape ran");
    };
    let w = rand(64, 1);
    let x = rand(8, 2);
    for isa in Isa::available() {
        refused("dot_rows", &mut || {
            let mut acc = [0f32; 4];
            dot_rows(
                isa,
                View::F32(&w),
                (1 << 61) - 1,
                1,
                8,
                Rows::plain(&x),
                &mut acc,
            );
        });
        refused("attn_scores", &mut || {
            let mut scores = [0f32; 1];
            attn_scores(isa, &w[..16], &w, &[usize::MAX - 15], 16, 1.0, &mut scores);
        });
        refused("panel", &mut || {
            let mut acc = [[0f32; PANEL]; PANEL_TR];
            panel(
                isa,
                View::F32(&[]),
                1 << (usize::BITS - 1),
                &[],
                2,
                &mut acc,
            );
        });
        // `row0 · k` wraps to 0 here: it read row 0's values before.
        refused("dequant_rows", &mut || {
            let mut out = [0f32; 32];
            dequant_rows(isa, View::F32(&w), 1 << 59, 1, 32, &mut out);
        });
    }
}
