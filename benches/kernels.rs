//! Criterion benchmarks of the CPU kernels at SmolLM2-135M shapes (C = 576, I = 1536,
//! V = 49152): the matmul for decode (T = 1), beam decode (T = 10), prefill (T = 32) and a step
//! of 8 beam queries (T = 80, gate only) in each weight dtype (f32, f16, bf16, Q4_1), on every
//! ISA this machine has; for T > 1 both from row-major weights and from panels (what the model
//! reads, `cpu::panels`). Throughput is reported in weight bytes (T = 1, memory bound) or FLOPs
//! as elements (T > 1, compute bound: 2·T·N·K per call).
//!
//! cargo bench --bench kernels -- 'matmul'
//! cargo bench --bench kernels -- 'decode_step|gemv_panels'   (the one-row path)
//! cargo bench --bench kernels -- 'attention'   (one decode work item: 3 heads × n keys)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gram::backend::cpu::matmul::{matmul, MatJob};
use gram::backend::cpu::panels;
use gram::backend::cpu::simd::Isa;
use gram::tensor::View;
use half::{bf16, f16};

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

/// Random Q4_1 blocks for `elems` weights (SmolLM2's GGUF stores its layer matrices so): per
/// 32 weights an f16 scale, an f16 minimum and 16 bytes of nibbles.
fn q4_1_blocks(elems: usize, seed: u64) -> Vec<u8> {
    rand(elems / 32 * 18, seed)
        .chunks_exact(18)
        .flat_map(|v| {
            let d = f16::from_f32(0.01 + 0.01 * v[0].abs()).to_le_bytes();
            let m = f16::from_f32(-0.1 * v[1]).to_le_bytes();
            d.into_iter()
                .chain(m)
                .chain(v[2..].iter().map(|q| ((q + 1.0) * 127.9) as u8))
        })
        .collect()
}

/// Random Q8_0 blocks for `elems` weights (SmolLM2's GGUF stores its embedding, the tied LM
/// head, so): per 32 weights an f16 scale and 32 signed bytes.
fn q8_0_blocks(elems: usize, seed: u64) -> Vec<u8> {
    rand(elems / 32 * 33, seed)
        .chunks_exact(33)
        .flat_map(|v| {
            let d = f16::from_f32(0.001 + 0.001 * v[0].abs()).to_le_bytes();
            d.into_iter()
                .chain(v[1..].iter().map(|q| ((q * 127.0) as i8) as u8))
        })
        .collect()
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    // (name, N, K): attention output (in L2 at 2 threads), MLP gate+up width, the LM head.
    for (name, n, k) in [
        ("o_576x576", 576, 576),
        ("gate_1536x576", 1536, 576),
        ("down_576x1536", 576, 1536),
        ("lm_head_49152x576", 49152, 576),
    ] {
        let wf = rand(n * k, 1);
        let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wq = q4_1_blocks(n * k, 3);
        for t in [1usize, 10, 32, 80] {
            if t == 80 && !name.starts_with("gate") {
                continue;
            }
            if name.starts_with("lm_head") && t == 32 {
                continue;
            }
            let x = rand(t * k, 2);
            let mut out = vec![0f32; t * n];
            for isa in Isa::available() {
                for (dt, view) in [
                    ("f32", View::F32(&wf)),
                    ("f16", View::F16(&wh)),
                    ("bf16", View::BF16(&wb)),
                    ("q4_1", View::Q4_1(&wq)),
                ] {
                    if t == 1 {
                        let bytes = match dt {
                            "f32" => view.len() * 4,
                            "q4_1" => wq.len(),
                            _ => view.len() * 2,
                        };
                        g.throughput(Throughput::Bytes(bytes as u64));
                    } else {
                        g.throughput(Throughput::Elements((2 * t * n * k) as u64));
                    }
                    let id = BenchmarkId::new(format!("{name}/{dt}/{isa:?}"), format!("T{t}"));
                    g.bench_function(id, |bch| {
                        bch.iter(|| {
                            let mut jobs = [MatJob {
                                w: view,
                                panels: None,
                                bias: None,
                                n,
                                out: &mut out,
                            }];
                            matmul(isa, &x, t, k, &mut jobs);
                        })
                    });
                    // The same matrix in panels (what the model's matmuls read, T = 1 too).
                    if isa != Isa::Scalar {
                        let packed = panels::pack(isa, view, n, k);
                        let id = BenchmarkId::new(
                            format!("{name}/{dt}/{isa:?}/panels"),
                            format!("T{t}"),
                        );
                        g.bench_function(id, |bch| {
                            bch.iter(|| {
                                let mut jobs = [MatJob {
                                    w: view,
                                    panels: Some(packed.view()),
                                    bias: None,
                                    n,
                                    out: &mut out,
                                }];
                                matmul(isa, &x, t, k, &mut jobs);
                            })
                        });
                    }
                }
            }
        }
    }
    g.finish();
}

/// A decode step's matmuls alone, at T = 1: SmolLM2-135M's 30 layers (q/k/v in one call, o,
/// gate/up in one call, down) and the tied LM head, each matrix in its own panels, 269 MB in
/// bf16 (538 MB f32) streamed from DRAM per iteration as in `decode_b1`, with the same
/// parallel regions but nothing between them, on huge pages as the model's (`tensor::pack`).
/// Throughput in weight bytes.
fn bench_decode_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    let (d, kv, inter, vocab, layers) = (576usize, 192usize, 1536usize, 49152usize, 30usize);
    // (N, K) per matrix, grouped by the call that reads them together.
    let calls: Vec<Vec<(usize, usize)>> = (0..layers)
        .flat_map(|_| {
            [
                vec![(d, d), (kv, d), (kv, d)],
                vec![(d, d)],
                vec![(inter, d), (inter, d)],
                vec![(d, inter)],
            ]
        })
        .chain([vec![(vocab, d)]])
        .collect();
    let isa = Isa::detect();
    let x = rand(inter, 5);
    for dt in ["bf16", "f16", "f32"] {
        let packed: Vec<Vec<gram::tensor::HostTensor>> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                call.iter()
                    .map(|&(n, k)| {
                        let wf = rand(n * k, 11 + i as u64);
                        let (wh, wb): (Vec<f16>, Vec<bf16>) = match dt {
                            "f16" => (wf.iter().map(|&v| f16::from_f32(v)).collect(), vec![]),
                            "bf16" => (vec![], wf.iter().map(|&v| bf16::from_f32(v)).collect()),
                            _ => (vec![], vec![]),
                        };
                        let view = match dt {
                            "f16" => View::F16(&wh),
                            "bf16" => View::BF16(&wb),
                            _ => View::F32(&wf),
                        };
                        panels::pack(isa, view, n, k)
                    })
                    .collect()
            })
            .collect();
        // On 2 MiB pages, as the model's weights (`tensor::pack`).
        let mut packed = packed;
        gram::tensor::pack(packed.iter_mut().flatten());
        let bytes: usize = calls.iter().flatten().map(|&(n, k)| n * k).sum::<usize>()
            * if dt == "f32" { 4 } else { 2 };
        let mut outs: Vec<Vec<Vec<f32>>> = calls
            .iter()
            .map(|call| call.iter().map(|&(n, _)| vec![0f32; n]).collect())
            .collect();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::new(format!("{dt}/{isa:?}"), "T1"), |bch| {
            bch.iter(|| {
                for ((call, p), out) in calls.iter().zip(&packed).zip(outs.iter_mut()) {
                    let k = call[0].1;
                    let mut jobs: Vec<MatJob> = call
                        .iter()
                        .zip(p)
                        .zip(out.iter_mut())
                        .map(|((&(n, _), p), out)| MatJob {
                            w: p.view(),
                            panels: Some(p.view()),
                            bias: None,
                            n,
                            out,
                        })
                        .collect();
                    matmul(isa, &x[..k], 1, k, &mut jobs);
                }
            })
        });
    }
    g.finish();
}

/// The one-row kernels on one thread (no parallel region): `simd::panel` at T = 1, panel by
/// panel, against `simd::gemv_panels` over 4 panels side by side, `k = 576`, in L2 (4 panels)
/// and from DRAM (~200 MB of huge-page panels), each dtype (the ggml blocks too), every SIMD
/// ISA. Throughput in weight bytes; and `simd::panel` at 10 rows in L2, in FLOPs.
fn bench_gemv_panels(c: &mut Criterion) {
    use gram::backend::cpu::simd::{self, GEMV_PANELS, PANEL, PANEL_TR};
    let mut g = c.benchmark_group("gemv_panels");
    g.sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(2));
    let k = 576;
    let x = rand(k, 3);
    let x10 = rand(10 * k, 4);
    for (place, mb) in [("l2", 0usize), ("dram", 200)] {
        for dt in ["bf16", "f16", "f32", "q4_1", "q8_0"] {
            // Bytes per 32 weights.
            let bytes32 = match dt {
                "f32" => 128,
                "q4_1" => 20,
                "q8_0" => 34,
                _ => 64,
            };
            let np = ((mb << 20) / (PANEL * k / 32 * bytes32)).max(GEMV_PANELS) / GEMV_PANELS
                * GEMV_PANELS;
            let n = np * PANEL;
            // Only the dtype benched is made (the DRAM case is ~200 MB of it).
            let wf = if dt == "f32" || dt == "f16" || dt == "bf16" {
                rand(n * k, 1)
            } else {
                Vec::new()
            };
            let wh: Vec<f16> = match dt {
                "f16" => wf.iter().map(|&v| f16::from_f32(v)).collect(),
                _ => Vec::new(),
            };
            let wb: Vec<bf16> = match dt {
                "bf16" => wf.iter().map(|&v| bf16::from_f32(v)).collect(),
                _ => Vec::new(),
            };
            let (w4, w8) = match dt {
                "q4_1" => (q4_1_blocks(n * k, 1), vec![]),
                "q8_0" => (vec![], q8_0_blocks(n * k, 1)),
                _ => (vec![], vec![]),
            };
            let view = match dt {
                "f16" => View::F16(&wh),
                "bf16" => View::BF16(&wb),
                "q4_1" => View::Q4_1(&w4),
                "q8_0" => View::Q8_0(&w8),
                _ => View::F32(&wf),
            };
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                let mut p = [panels::pack(isa, view, n, k)];
                gram::tensor::pack(p.iter_mut());
                let pv = p[0].view();
                let panel = |i: usize, m: usize| pv.slice(i * PANEL * k..(i + m) * PANEL * k);
                g.throughput(Throughput::Bytes((n * k / 32 * bytes32) as u64));
                let id = |v: &str| BenchmarkId::new(format!("{place}/{dt}/{isa:?}"), v.to_string());
                g.bench_function(id("panel"), |b| {
                    let mut acc = [[0f32; PANEL]; PANEL_TR];
                    b.iter(|| {
                        for i in 0..np {
                            simd::panel(isa, panel(i, 1), k, &x, 1, &mut acc);
                        }
                        acc[0][0]
                    })
                });
                g.bench_function(id("gemv_panels"), |b| {
                    let mut acc = [[0f32; PANEL]; GEMV_PANELS];
                    b.iter(|| {
                        for i in (0..np).step_by(GEMV_PANELS) {
                            let m = GEMV_PANELS;
                            simd::gemv_panels(isa, panel(i, m), m, k, &x, &mut acc);
                        }
                        acc[0][0]
                    })
                });
                // The many-row kernel at a beam step's 10 rows, in L2: compute bound, so
                // throughput in FLOPs (elements), against one core's FMA peak (`tools/floor`).
                if place == "l2" {
                    g.throughput(Throughput::Elements((2 * 10 * n * k) as u64));
                    g.bench_function(id("panel_t10"), |b| {
                        let mut acc = [[0f32; PANEL]; PANEL_TR];
                        b.iter(|| {
                            for i in 0..np {
                                simd::panel(isa, panel(i, 1), k, &x10, 10, &mut acc);
                            }
                            acc[0][0]
                        })
                    });
                    // The same with the rows quantized to i16 (`simd::int16`), Q4_1 only.
                    if dt == "q4_1" && isa == Isa::Avx512 && simd::has_vnni() {
                        let q = simd::int16::QuantRows::new(&x10, 10, k);
                        g.bench_function(id("panel_t10_int16"), |b| {
                            let mut acc = [[0f32; PANEL]; PANEL_TR];
                            b.iter(|| {
                                for i in 0..np {
                                    let p = panel(i, 1);
                                    simd::panel_q4_1_i16(isa, p, k, q.group(0, 10), 10, &mut acc);
                                }
                                acc[0][0]
                            })
                        });
                    }
                }
            }
        }
    }
    g.finish();
}

/// S_rele over one posting list: 10,000 products × a 6-token code, u16 product probabilities,
/// each ISA (elements = product-token terms).
fn bench_score(c: &mut Criterion) {
    let mut g = c.benchmark_group("score_postings");
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    for p in [10_000usize, 500_000] {
        bench_score_list(&mut g, p);
    }
    g.finish();
}

/// One list of `p` products (500,000: a paper-scale long list, scored through the per-token
/// table).
fn bench_score_list(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    p: usize,
) {
    let n = 6usize;
    let r = rand(n * p + 2 * n, 7);
    let pq: Vec<f32> = r[..n].iter().map(|v| v.abs()).collect();
    let w: Vec<f32> = r[n..2 * n].to_vec();
    let pt: Vec<u16> = r[2 * n..]
        .iter()
        .map(|v| (v.abs() * 65535.0) as u16)
        .collect();
    g.throughput(Throughput::Elements((n * p) as u64));
    for isa in Isa::available() {
        let mut out = vec![0f32; p];
        g.bench_function(BenchmarkId::new(format!("{isa:?}"), p), |b| {
            b.iter(|| gram::score::score_postings(isa, &pq, &w, &pt, &mut out))
        });
    }
}

/// The SwiGLU MLP's first half at beam-step shapes (I = 1536, C = 576, Q4_1 panels, rayon's
/// default pool: every core, 2 on the project's box): gate and up in one `matmul`, then `silu(gate) * up` in a second parallel pass
/// (`separate`, the backend's default), against `matmul_silu_mul` (`fused`: each task
/// multiplies its own columns). Throughput in FLOPs of both products.
fn bench_gate_up(c: &mut Criterion) {
    use gram::backend::cpu::matmul::matmul_silu_mul;
    use gram::backend::Backend;
    let mut g = c.benchmark_group("gate_up_silu");
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    let (n, k) = (1536usize, 576usize);
    let isa = Isa::detect();
    let cpu = gram::backend::cpu::CpuBackend::default();
    let (wg, wu) = (q4_1_blocks(n * k, 7), q4_1_blocks(n * k, 8));
    let (pg, pu) = (
        panels::pack(isa, View::Q4_1(&wg), n, k),
        panels::pack(isa, View::Q4_1(&wu), n, k),
    );
    for t in [8usize, 10] {
        let x = rand(t * k, 9);
        let (mut og, mut ou) = (vec![0f32; t * n], vec![0f32; t * n]);
        g.throughput(Throughput::Elements((4 * t * n * k) as u64));
        for fused in [false, true] {
            let name = if fused { "fused" } else { "separate" };
            g.bench_function(BenchmarkId::new(format!("q4_1/{isa:?}/{name}"), t), |b| {
                b.iter(|| {
                    let mut jobs = [
                        MatJob {
                            w: View::Q4_1(&wg),
                            panels: Some(pg.view()),
                            bias: None,
                            n,
                            out: &mut og,
                        },
                        MatJob {
                            w: View::Q4_1(&wu),
                            panels: Some(pu.view()),
                            bias: None,
                            n,
                            out: &mut ou,
                        },
                    ];
                    if fused {
                        matmul_silu_mul(isa, &x, t, k, &mut jobs);
                    } else {
                        matmul(isa, &x, t, k, &mut jobs);
                        cpu.silu_mul(&mut og, &ou);
                    }
                })
            });
        }
    }
    g.finish();
}

/// One attention work item of a decode step at SmolLM2's shape: the 3 query heads of a KV head
/// (D = 64) against `n` keys at scattered rows of the cache (beams link their own entries):
/// scores, softmax, weighted values. Throughput in FLOPs of the two products (4·3·n·64).
fn bench_attention(c: &mut Criterion) {
    use gram::backend::cpu::simd::{attn_pv, attn_scores, exp_shift, max};
    let mut g = c.benchmark_group("attention");
    g.sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    let (d, per) = (64usize, 3usize);
    let slab = rand(4096 * 3 * d, 11);
    let q = rand(per * d, 12);
    for n in [24usize, 64, 256] {
        // Every 7th entry of a cache of 3 KV heads: rows apart, as a layer's cache of beams has them.
        let offs: Vec<usize> = (0..n).map(|j| (j * 7 % 4096) * 3 * d).collect();
        g.throughput(Throughput::Elements((4 * per * n * d) as u64));
        for isa in Isa::available() {
            let (mut scores, mut out) = (vec![0f32; per * n], vec![0f32; per * d]);
            g.bench_function(BenchmarkId::new(format!("{isa:?}"), n), |b| {
                b.iter(|| {
                    attn_scores(isa, &q, &slab, &offs, d, 0.125, &mut scores);
                    let mut sums = [0f32; 3];
                    for (sh, s) in scores.chunks_exact_mut(n).zip(sums.iter_mut()) {
                        *s = exp_shift(isa, sh, max(isa, sh));
                    }
                    for (sh, &s) in scores.chunks_exact_mut(n).zip(&sums) {
                        sh.iter_mut().for_each(|p| *p /= s);
                    }
                    attn_pv(isa, &scores, &slab, &offs, d, &mut out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_attention,
    bench_gate_up,
    bench_decode_step,
    bench_gemv_panels,
    bench_score
);
criterion_main!(benches);
