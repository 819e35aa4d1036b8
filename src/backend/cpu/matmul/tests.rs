use super::*;
use crate::tensor::{DType, HostTensor};
use half::f16;

/// Vectors of `n` values uniform in [-1, 1), from a xorshift seeded with `seed`.
fn uniform(s: u64) -> impl FnMut(usize) -> Vec<f32> {
    let mut bits = crate::test_rng::xorshift(s);
    move |n| {
        (0..n)
            .map(|_| crate::test_rng::signed_unit(bits()))
            .collect()
    }
}

/// `count` random Q4_1 blocks (20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles).
fn q4_1_blocks(count: usize, next: &mut dyn FnMut() -> u64) -> Vec<u8> {
    let mut blocks = vec![0u8; count * 20];
    for b in blocks.chunks_exact_mut(20) {
        let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-4);
        let m = f16::from_f32((next() % 2000) as f32 * 1e-4 - 0.1);
        b[..2].copy_from_slice(&d.to_le_bytes());
        b[2..4].copy_from_slice(&m.to_le_bytes());
        b[4..].iter_mut().for_each(|q| *q = next() as u8);
    }
    blocks
}

/// `Activations::Int16` through `matmul_act` and `matmul_silu_mul_act` (Q4_1 panels, a
/// bias, one row, rows in one group, several and past the f32-copy threshold): within
/// 1e-4 of the exact product's scale (the kernel's own bound is tested in `simd::tests`),
/// and each row computed alone gives the bits it has among the others; other ISAs and
/// CPUs without VNNI keep the exact bits.
#[test]
fn int16_activations_through_matmul() {
    let (n, k) = (70, 96);
    let mut next = crate::test_rng::xorshift(0x853c_49e6_748f_ea9b);
    let blocks = q4_1_blocks(n * k / 32, &mut next);
    let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01 - 0.3).collect();
    let w = View::Q4_1(&blocks);
    for isa in Isa::available() {
        let p = super::super::panels::pack(isa, w, n, k);
        for rows in [1, 2, 10, 23, 41] {
            let x: Vec<f32> = (0..rows * k)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let run_rows = |x: &[f32], rows: usize, act: Activations, glu: bool| {
                let mut outs = [vec![0f32; rows * n], vec![0f32; rows * n]];
                let [o0, o1] = &mut outs;
                let job = |out| MatJob {
                    w,
                    panels: Some(p.view()),
                    bias: Some(View::F32(&bias)),
                    n,
                    out,
                };
                let mut jobs = [job(o0.as_mut_slice()), job(o1.as_mut_slice())];
                if glu {
                    matmul_silu_mul_act(isa, x, rows, k, &mut jobs, act);
                } else {
                    matmul_act(isa, x, rows, k, &mut jobs, act);
                }
                outs
            };
            let run = |act: Activations, glu: bool| run_rows(&x, rows, act, glu);
            for glu in [false, true] {
                let exact = run(Activations::Exact, glu);
                let int16 = run(Activations::Int16, glu);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let ctx = format!("{isa:?} rows {rows} glu {glu}");
                if !glu {
                    // Two jobs of the same weights: the second is checked through the
                    // first (a job of a region computed wrong would differ).
                    assert_eq!(bits(&exact[1]), bits(&exact[0]), "{ctx}: job 1");
                    assert_eq!(bits(&int16[1]), bits(&int16[0]), "{ctx}: job 1");
                }
                if isa.runnable() != Isa::Avx512 || !simd::has_vnni() {
                    assert_eq!(bits(&exact[0]), bits(&int16[0]), "{ctx}");
                    continue;
                }
                // A row alone (the one-row path) gives the bits it has in the batch.
                for t in [0, rows / 2, rows - 1] {
                    let alone = run_rows(&x[t * k..(t + 1) * k], 1, Activations::Int16, glu);
                    assert_eq!(
                        bits(&alone[0]),
                        bits(&int16[0][t * n..(t + 1) * n]),
                        "{ctx}: row {t} alone"
                    );
                }
                let scale = exact[0].iter().fold(0f32, |a, v| a.max(v.abs()));
                let worst = exact[0]
                    .iter()
                    .zip(&int16[0])
                    .fold(0f32, |a, (e, i)| a.max((e - i).abs()));
                assert!(
                    worst <= 1e-4 * scale && worst > 0.0,
                    "{ctx}: {worst} of {scale}"
                );
                assert!(int16[0].iter().all(|v| v.is_finite()), "{ctx}");
            }
        }
    }
}

/// A row count whose product with `n` wraps around `usize` is refused by the shape checks
/// (in release builds the product wrapped to 0 and the store wrote through an empty
/// buffer's dangling pointer).
#[test]
fn a_wrapping_row_count_is_refused() {
    for isa in Isa::available() {
        let r = std::panic::catch_unwind(|| {
            let mut out: Vec<f32> = Vec::new();
            let mut jobs = [MatJob {
                w: View::F32(&[]),
                panels: None,
                bias: None,
                n: 2,
                out: &mut out,
            }];
            matmul(isa, &[], 1 << (usize::BITS - 1), 0, &mut jobs);
        });
        assert!(r.is_err(), "{isa:?}: a wrapping shape ran");
    }
}

/// Q4_1 weights read in place (dequantized a panel at a time) give bit for bit the matmul of
/// the same weights dequantized up front, for the GEMV, the tiles and the sparse head.
#[test]
fn block_weights_equal_their_f32_values_bit_for_bit() {
    let (n, k) = (37, 96);
    let q8 = |next: &mut dyn FnMut() -> u64| {
        let mut blocks = vec![0u8; n * k / 32 * 34];
        for b in blocks.chunks_exact_mut(34) {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-4);
            b[..2].copy_from_slice(&d.to_le_bytes());
            b[2..].iter_mut().for_each(|q| *q = next() as u8);
        }
        blocks
    };
    let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
    let blocks = q4_1_blocks(n * k / 32, &mut next);
    let blocks8 = q8(&mut next);
    for quant in [View::Q4_1(&blocks), View::Q8_0(&blocks8)] {
        let mut dense = vec![0f32; n * k];
        quant.widen_into(0..n * k, &mut dense);
        for isa in Isa::available() {
            // Block panels against the f32 panels of their values.
            let (pq, pd) = (
                super::super::panels::pack(isa, quant, n, k),
                super::super::panels::pack(isa, View::F32(&dense), n, k),
            );
            // 23 and 40 rows: groups dequantized in registers; 41: the f32 copy.
            for rows in [1, 2, 7, 10, 23, 40, 41] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut a = vec![0f32; rows * n];
                let mut b = vec![0f32; rows * n];
                for (w, p, out) in [(quant, &pq, &mut a), (View::F32(&dense), &pd, &mut b)] {
                    let mut jobs = [MatJob {
                        w,
                        panels: Some(p.view()),
                        bias: None,
                        n,
                        out: out.as_mut_slice(),
                    }];
                    matmul(isa, &x, rows, k, &mut jobs);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{isa:?} panels rows {rows}");
            }
            for rows in [1, 3, 10] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut a = vec![0f32; rows * n];
                let mut b = vec![0f32; rows * n];
                for (w, out) in [(quant, &mut a), (View::F32(&dense), &mut b)] {
                    let mut jobs = [MatJob {
                        w,
                        panels: None,
                        bias: None,
                        n,
                        out: out.as_mut_slice(),
                    }];
                    matmul(isa, &x, rows, k, &mut jobs);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{isa:?} rows {rows}");
                let sel: Vec<(u32, u32)> = (0..rows as u32)
                    .map(|r| (r, (5 * r + 3) % n as u32))
                    .collect();
                let (pa, pb) = (
                    picks(isa, &x, quant, k, &sel),
                    picks(isa, &x, View::F32(&dense), k, &sel),
                );
                assert_eq!(bits(&pa), bits(&pb), "{isa:?} picks");
            }
        }
    }
}

/// The sparse head's picks against the dense head: every pick equals the panel matmul's
/// output for its row and column bit for bit, for every dtype (f32, f16, bf16, Q4_1,
/// Q8_0), rows at one (the GEMV), in a group, over several and past the f32 copy, picks in
/// groups of up to 8 and over the team's threshold, on every ISA. (Each weight row read
/// through the old four-accumulator dot product gave other bits: a query normalized over
/// its children scored differently alone and beside a fully normalized one.)
#[test]
fn picks_equal_the_dense_panels_bit_for_bit() {
    let (n, k) = (75, 96);
    let mut next = crate::test_rng::xorshift(0x9b05_688c_2b3e_6c1f);
    let mut rnd = uniform(0x1f83_d9ab_fb41_bd6b);
    let wf = rnd(n * k);
    let q4 = q4_1_blocks(n * k / 32, &mut next);
    let mut q8 = vec![0u8; n * k / 32 * 34];
    for b in q8.chunks_exact_mut(34) {
        let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-4);
        b[..2].copy_from_slice(&d.to_le_bytes());
        b[2..].iter_mut().for_each(|q| *q = next() as u8);
    }
    let dense: Vec<HostTensor> = [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .map(|dt| HostTensor::from_f32(wf.clone(), vec![n, k]).into_dtype(dt))
        .collect();
    let mut views: Vec<(&str, View)> = ["f32", "f16", "bf16"]
        .into_iter()
        .zip(dense.iter().map(|t| t.view()))
        .collect();
    views.extend([("q4_1", View::Q4_1(&q4)), ("q8_0", View::Q8_0(&q8))]);
    for (name, w) in views {
        for isa in Isa::available() {
            let p = super::super::panels::pack(isa, w, n, k);
            for rows in [1, 3, 10, 41] {
                let x = rnd(rows * k);
                let mut out = vec![f32::NAN; rows * n];
                let mut jobs = [MatJob {
                    w,
                    panels: Some(p.view()),
                    bias: None,
                    n,
                    out: &mut out,
                }];
                matmul(isa, &x, rows, k, &mut jobs);
                // Every (row, column) once, shuffled, then a short run of a few.
                let mut sel: Vec<(u32, u32)> = (0..rows as u32)
                    .flat_map(|r| (0..n as u32).map(move |v| (r, v)))
                    .collect();
                for i in (1..sel.len()).rev() {
                    sel.swap(i, (next() % (i as u64 + 1)) as usize);
                }
                for sel in [&sel[..], &sel[..5]] {
                    let got = picks(isa, &x, w, k, sel);
                    for (&(r, v), g) in sel.iter().zip(&got) {
                        let want = out[r as usize * n + v as usize];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{isa:?} {name} rows {rows} pick ({r}, {v}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// The same bits whatever the team's size: the split into tasks changes which thread runs
/// a column, never the FMA chain of an output. f32, bf16 and Q4_1 weights, with and without
/// panels and a bias, `n` not a multiple of 32, rows at one (the GEMV), in one group, over
/// several and past the f32 copy, on teams of 1, 2 and 3 threads.
#[test]
fn outputs_do_not_depend_on_the_team_size() {
    let (n, k) = (203, 96);
    let mut rnd = uniform(0x510e_527f_ade6_82d1);
    let mut next = crate::test_rng::xorshift(0x9b05_688c_2b3e_6c1f);
    let dense = rnd(n * k);
    let bias = rnd(n);
    let bf = HostTensor::from_f32(dense.clone(), vec![n, k]).into_dtype(DType::BF16);
    let blocks = q4_1_blocks(n * k / 32, &mut next);
    let teams: Vec<team::Team> = [1, 2, 3]
        .iter()
        .map(|&t| team::Team::new(t, "size-test").unwrap())
        .collect();
    for isa in Isa::available() {
        for (name, w) in [
            ("f32", View::F32(&dense)),
            ("bf16", bf.view()),
            ("q4_1", View::Q4_1(&blocks)),
        ] {
            let packed = super::super::panels::pack(isa, w, n, k);
            for rows in [1, 3, 10, 41] {
                let x = rnd(rows * k);
                for (panels, with_bias) in [(true, false), (true, true), (false, true)] {
                    let outs: Vec<Vec<u32>> = teams
                        .iter()
                        .map(|t| {
                            let mut out = vec![0f32; rows * n];
                            let mut jobs = [MatJob {
                                w,
                                panels: panels.then(|| packed.view()),
                                bias: with_bias.then_some(View::F32(&bias)),
                                n,
                                out: &mut out,
                            }];
                            t.enter(|| {
                                assert_eq!(team::threads(), t.threads(), "the team in use");
                                matmul(isa, &x, rows, k, &mut jobs)
                            });
                            out.iter().map(|v| v.to_bits()).collect()
                        })
                        .collect();
                    for (t, o) in outs.iter().enumerate().skip(1) {
                        assert!(
                            *o == outs[0],
                            "{isa:?} {name} rows {rows} panels {panels} bias {with_bias}: \
                             {} threads differ from 1",
                            t + 1
                        );
                    }
                }
            }
        }
    }
}

/// One token row through panels (several panels per kernel call, tasks ending in a
/// partial group and a partial panel): every output bit for bit the scalar twin's and the
/// first row of a two-row call's (the many-row kernel), and within f32 rounding of an f64
/// reference, for `n` not a multiple of 32, 64 or 128, odd `k` and every dtype.
#[test]
fn one_row_panels_equal_the_scalar_twin_and_the_tile_and_match_f64() {
    let mut rnd = uniform(0x6a09_e667_f3bc_c909u64);
    for (n, k) in [
        (1, 7),
        (45, 93),
        (161, 1),
        (230, 47),
        (1043, 93),
        (3001, 35),
    ] {
        let wf = rnd(n * k);
        let bias = rnd(n);
        let x = rnd(2 * k);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let m = HostTensor::from_f32(wf.clone(), vec![n, k]).into_dtype(dt);
            let w = m.view();
            let run = |isa: Isa, rows: usize| {
                let p = super::super::panels::pack(isa, w, n, k);
                let mut out = vec![f32::NAN; rows * n];
                let mut jobs = [MatJob {
                    w,
                    panels: Some(p.view()),
                    bias: Some(View::F32(&bias)),
                    n,
                    out: &mut out,
                }];
                matmul(isa, &x, rows, k, &mut jobs);
                out.truncate(n);
                out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            };
            let want = run(Isa::Scalar, 1);
            for (c, &bits) in want.iter().enumerate() {
                let r = (0..k)
                    .map(|j| w.get(c * k + j) as f64 * x[j] as f64)
                    .sum::<f64>()
                    + bias[c] as f64;
                let got = f32::from_bits(bits) as f64;
                assert!(
                    (got - r).abs() <= 1e-5 * (1.0 + r.abs()) * (k as f64).sqrt(),
                    "{dt:?} n={n} k={k} col {c}: {got} vs {r}"
                );
            }
            for isa in Isa::available() {
                assert!(run(isa, 1) == want, "{isa:?} {dt:?} n={n} k={k}: one row");
                assert!(run(isa, 2) == want, "{isa:?} {dt:?} n={n} k={k}: two rows");
            }
        }
    }
}

/// The panel path (several jobs sharing a region, one row job beside them, with and
/// without bias, `n` not a multiple of 32, token counts over one group): the panel jobs
/// bit-identical on every ISA, every job within f32 rounding of an f64 reference, for each
/// dtype.
#[test]
fn panels_match_f64_and_are_the_same_bits_on_every_isa() {
    let k = 80;
    let ns = [45usize, 32, 7];
    let mut rnd = uniform(0x9e37_79b9_7f4a_7c15u64);
    let ws: Vec<Vec<f32>> = ns.iter().map(|&n| rnd(n * k)).collect();
    let biases: Vec<Vec<f32>> = ns.iter().map(|&n| rnd(n)).collect();
    for (rows, with_bias) in [1, 2, 10, 15, 31]
        .into_iter()
        .flat_map(|r| [(r, true), (r, false)])
    {
        let x = rnd(rows * k);
        let bias = |i: usize, c: usize| if with_bias { biases[i][c] as f64 } else { 0.0 };
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let mats: Vec<HostTensor> = ws
                .iter()
                .zip(ns)
                .map(|(w, n)| HostTensor::from_f32(w.clone(), vec![n, k]).into_dtype(dt))
                .collect();
            let mut first: Option<Vec<Vec<u32>>> = None;
            for isa in Isa::available() {
                let packed: Vec<HostTensor> = mats
                    .iter()
                    .zip(ns)
                    .map(|(m, n)| super::super::panels::pack(isa, m.view(), n, k))
                    .collect();
                let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0.0; rows * n]).collect();
                let mut jobs: Vec<MatJob> = outs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, out)| MatJob {
                        w: mats[i].view(),
                        // The last job reads rows: panel and row jobs share the call.
                        panels: (i < 2).then(|| packed[i].view()),
                        bias: with_bias.then(|| View::F32(&biases[i])),
                        n: ns[i],
                        out,
                    })
                    .collect();
                matmul(isa, &x, rows, k, &mut jobs);
                for (i, out) in outs.iter().enumerate() {
                    let w = mats[i].view();
                    for t in 0..rows {
                        for c in 0..ns[i] {
                            let want: f64 = (0..k)
                                .map(|j| w.get(c * k + j) as f64 * x[t * k + j] as f64)
                                .sum::<f64>()
                                + bias(i, c);
                            let got = out[t * ns[i] + c] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()) * 9.0,
                                "{isa:?} {dt:?} rows {rows} bias {with_bias} job {i} ({t},{c})"
                            );
                        }
                    }
                }
                let bits: Vec<Vec<u32>> = outs[..2]
                    .iter()
                    .map(|o| o.iter().map(|v| v.to_bits()).collect())
                    .collect();
                match &first {
                    None => first = Some(bits),
                    Some(f) => assert!(
                        *f == bits,
                        "{isa:?} {dt:?} rows {rows} bias {with_bias}: bits differ"
                    ),
                }
            }
        }
    }
}

/// The fused gate/up (`matmul_silu_mul`) gives bit for bit `matmul` of both, then
/// `silu_mul`: panels and rows, with biases, `n` not a multiple of 32, one row and several
/// groups, on every ISA.
#[test]
fn fused_silu_mul_equals_matmul_then_silu_mul() {
    let mut rnd = uniform(0xbb67_ae85_84ca_a73bu64);
    for (n, k) in [(45, 16), (1000, 64)] {
        let (wg, wu, bg, bu) = (rnd(n * k), rnd(n * k), rnd(n), rnd(n));
        for rows in [1, 3, 10, 23] {
            let x = rnd(rows * k);
            for isa in Isa::available() {
                for dt in [DType::F32, DType::BF16] {
                    let g = HostTensor::from_f32(wg.clone(), vec![n, k]).into_dtype(dt);
                    let u = HostTensor::from_f32(wu.clone(), vec![n, k]).into_dtype(dt);
                    let (pg, pu) = (
                        super::super::panels::pack(isa, g.view(), n, k),
                        super::super::panels::pack(isa, u.view(), n, k),
                    );
                    for with_panels in [false, true] {
                        let mut outs = [
                            vec![f32::NAN; rows * n],
                            vec![f32::NAN; rows * n],
                            vec![f32::NAN; rows * n],
                            vec![f32::NAN; rows * n],
                        ];
                        let [g0, u0, g1, u1] = &mut outs;
                        macro_rules! jobs {
                            ($og:expr, $ou:expr) => {
                                [
                                    MatJob {
                                        w: g.view(),
                                        panels: with_panels.then(|| pg.view()),
                                        bias: Some(View::F32(&bg)),
                                        n,
                                        out: $og.as_mut_slice(),
                                    },
                                    MatJob {
                                        w: u.view(),
                                        panels: with_panels.then(|| pu.view()),
                                        bias: Some(View::F32(&bu)),
                                        n,
                                        out: $ou.as_mut_slice(),
                                    },
                                ]
                            };
                        }
                        matmul(isa, &x, rows, k, &mut jobs!(g0, u0));
                        simd::silu_mul(isa, g0, u0);
                        matmul_silu_mul(isa, &x, rows, k, &mut jobs!(g1, u1));
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert!(
                            bits(g0) == bits(g1),
                            "{isa:?} {dt:?} n={n} rows={rows} panels={with_panels}"
                        );
                    }
                }
            }
        }
    }
}
