//! The CUDA backend against the CPU reference, op by op and on whole searches (issue 7).
//!
//! Every test compares what the GPU computes with what `CpuBackend` computes from the same
//! random inputs (xorshift, fixed seeds; never zeros), element by element. Where no GPU is
//! usable each test prints why and returns; `GRAM_REQUIRE_GPU=1` turns that into a failure (the
//! GPU machine's script sets it, so a broken driver setup cannot pass as a skip).
//!
//! Tolerances. f32 ops (norm, rotary, SwiGLU, attention, gathers): |gpu - cpu| <= 1e-5 +
//! 1e-4 |cpu| (f32 sums in another order, `expf`). Products: cuBLAS rounds the activation
//! operand to bf16 (relative error <= 2^-9), so |gpu - cpu| <= 2^-8 Σ|x||w| + 1e-6 per output
//! element, a bound, not a fit; the small-row kernel keeps f32 activations: 1e-4 Σ|x||w|.
//! Whole models (bf16 weights on both sides): the logits are compared with the plain CPU and
//! with `CpuBackend::gpu_numerics` (the CPU rounding GEMM operands to bf16 as cuBLAS does), by
//! the largest relative difference (|Δ| / max(|cpu|, 1)) and by its root mean square. A value
//! near a bf16 rounding boundary rounds either way depending on the f32 sum order, so no CPU
//! emulation is closer than that noise, and the noise depends on the model: a sharper model
//! amplifies it. So the tolerance is measured per model on the same inputs: the two CPU
//! references' own distance, times 3. Measured: the 3-epoch default model's references 2.9e-2
//! apart, the GPU 3.7e-2 / 4.2e-2 from them (H200); the 8-epoch one 5.9e-2 apart, the GPU
//! 7.84e-2 from the rounding CPU; the 16-epoch one 6.0e-2 apart, the GPU 8.76e-2 (H100; a fixed
//! 8e-2 failed there). Beam search against the plain CPU: the same number of codes; at least
//! 80 % of the codes in both lists; a code in both has
//! scores within 3e-2; and two codes both return, with CPU scores more than 0.1 apart, come in
//! the same order (a near-tie at an intermediate step may prune a code: `compare_codes`).

mod common;

use common::*;
use gram::backend::cpu::CpuBackend;
use gram::backend::cuda::{self, CudaBackend};
use gram::backend::{AttnShape, Backend, KvRows, Linear, RowKv};
use gram::beam::{self, BeamOptions, Normalize, Query};
use gram::config::{ModelConfig, RopeScaling};
use gram::model::rope::RopeTable;
use gram::tensor::{DType, HostTensor};
use gram::trie::{CodeSet, Trie};
use gram::{LoadOptions, Model, Tokenizer};

/// The GPU backend, or `None` (with the reason printed) where there is none.
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0, false) {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("GRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("GRAM_REQUIRE_GPU=1 but the CUDA backend is unavailable: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// The GPU, the CPU reference and a seeded generator for an op test (`None`: no GPU).
fn op_test(seed: u64) -> Option<(CudaBackend, CpuBackend, Rng)> {
    Some((gpu()?, CpuBackend::default(), Rng(seed)))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1), never exactly zero.
    fn f(&mut self) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        let v = 2.0 * u - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn bf16_tensor(values: Vec<f32>, shape: Vec<usize>) -> HostTensor {
    HostTensor::from_f32(values, shape).into_dtype(DType::BF16)
}

/// Every element within `atol + rtol |want|`; names the first one that is not.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}: element {i}: gpu {g} cpu {w} (|Δ| {err:.3e})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: {} elements, max |Δ| {worst:.3e}", got.len());
}

/// The same op on both backends from host inputs, outputs read back.
fn both<FC, FG>(cpu_op: FC, gpu_op: FG) -> (Vec<f32>, Vec<f32>)
where
    FC: FnOnce(&CpuBackend) -> Vec<f32>,
    FG: FnOnce() -> Vec<f32>,
{
    (gpu_op(), cpu_op(&CpuBackend::default()))
}

#[test]
fn elementwise_ops_match_cpu() {
    let Some((g, c, mut rng)) = op_test(0x9e37_79b9_7f4a_7c15) else {
        return;
    };
    // embed: exact (a bf16 widened to f32).
    let (vocab, dim) = (1000, 576);
    let table = rng.vec(vocab * dim, 0.5);
    let ids: Vec<u32> = (0..37).map(|_| rng.below(vocab) as u32).collect();
    let tc = c
        .upload(bf16_tensor(table.clone(), vec![vocab, dim]))
        .unwrap();
    let tg = g.upload(bf16_tensor(table, vec![vocab, dim])).unwrap();
    let mut oc = c.buf(ids.len() * dim);
    c.embed(&tc, &ids, &mut oc);
    let mut og = g.buf(ids.len() * dim);
    g.embed(&tg, &ids, &mut og);
    assert_eq!(g.to_host(og), oc, "embed");

    // rmsnorm over rows of 576 and over heads of 64 (Qwen3's q/k norm).
    for (rows, d) in [(37, 576), (37 * 9, 64), (3, 896)] {
        let x = rng.vec(rows * d, 3.0);
        let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.f()).collect();
        let (wc, wg) = (
            c.upload(bf16_tensor(w.clone(), vec![d])).unwrap(),
            g.upload(bf16_tensor(w, vec![d])).unwrap(),
        );
        let (got, want) = both(
            |c| {
                let mut o = c.buf(rows * d);
                c.rmsnorm(&c.buf_from_host(&x), &wc, 1e-5, d, &mut o);
                o
            },
            || {
                let mut o = g.buf(rows * d);
                g.rmsnorm(&g.buf_from_host(&x), &wg, 1e-5, d, &mut o);
                g.to_host(o)
            },
        );
        assert_close(&format!("rmsnorm {rows}x{d}"), &got, &want, 1e-5, 1e-4);
    }

    // add, silu_mul.
    let n = 37 * 1536;
    let (a, b) = (rng.vec(n, 4.0), rng.vec(n, 4.0));
    let mut acc = g.buf_from_host(&a);
    g.add(&mut acc, &g.buf_from_host(&b));
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_close("add", &g.to_host(acc), &want, 0.0, 0.0);
    let mut gate = g.buf_from_host(&a);
    g.silu_mul(&mut gate, &g.buf_from_host(&b));
    let mut gc = a.clone();
    c.silu_mul(&mut gc, &b);
    assert_close("silu_mul", &g.to_host(gate), &gc, 1e-6, 1e-5);

    // add_rmsnorm (the fused residual add): x and out both.
    let (rows, d) = (37, 576);
    let (x0, delta) = (rng.vec(rows * d, 3.0), rng.vec(rows * d, 1.0));
    let w: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.f()).collect();
    let (wc, wg) = (
        c.upload(bf16_tensor(w.clone(), vec![d])).unwrap(),
        g.upload(bf16_tensor(w, vec![d])).unwrap(),
    );
    let (mut xc, mut oc) = (x0.clone(), c.buf(rows * d));
    c.add_rmsnorm(&mut xc, &delta, &wc, 1e-5, d, &mut oc);
    let (mut xg, mut og) = (g.buf_from_host(&x0), g.buf(rows * d));
    g.add_rmsnorm(&mut xg, &g.buf_from_host(&delta), &wg, 1e-5, d, &mut og);
    assert_close("add_rmsnorm x", &g.to_host(xg), &xc, 0.0, 0.0);
    assert_close("add_rmsnorm out", &g.to_host(og), &oc, 1e-5, 1e-4);

    // gather_rows, with repeats.
    let x = rng.vec(37 * dim, 2.0);
    let pick = vec![36usize, 0, 5, 5, 17];
    let mut og = g.buf(pick.len() * dim);
    g.gather_rows(&g.buf_from_host(&x), dim, &pick, &mut og);
    let mut oc = c.buf(pick.len() * dim);
    c.gather_rows(&x, dim, &pick, &mut oc);
    assert_eq!(g.to_host(og), oc, "gather_rows");
    g.check().unwrap();
}

#[test]
fn rope_matches_cpu() {
    let Some((g, c, mut rng)) = op_test(77) else {
        return;
    };
    for (heads, d, theta) in [(9, 64, 100_000.0f32), (14, 64, 1e6), (8, 128, 10_000.0)] {
        let table = RopeTable::new(d, theta, RopeScaling::None, 4096);
        let t = 41;
        let rows: Vec<RowKv> = (0..t)
            .map(|i| RowKv {
                pos: if i % 3 == 0 {
                    rng.below(4096) as u32
                } else {
                    i as u32
                },
                entry: i as u32,
                span: (0, i as u32 + 1),
                link: (0, 0),
            })
            .collect();
        let x = rng.vec(t * heads * d, 2.0);
        let mut xc = x.clone();
        c.rope(&mut xc, heads, &rows, &table);
        let mut xg = g.buf_from_host(&x);
        g.rope(&mut xg, heads, &rows, &table);
        assert_close(
            &format!("rope H{heads} D{d}"),
            &g.to_host(xg),
            &xc,
            1e-5,
            1e-4,
        );
    }
    // rope_store: q and k rotated and k, v stored in one launch; the store is read back
    // through attention (one row attending to exactly the stored entries).
    let (heads, kv_heads, d) = (9, 3, 64);
    let cfg = config(heads, kv_heads, d);
    let table = RopeTable::new(d, 100_000.0, RopeScaling::None, 4096);
    let t = 23;
    let rows: Vec<RowKv> = (0..t as u32).map(|i| RowKv::contiguous(0, i)).collect();
    let (q, k, v) = (
        rng.vec(t * heads * d, 2.0),
        rng.vec(t * kv_heads * d, 2.0),
        rng.vec(t * kv_heads * d, 2.0),
    );
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    };
    let (mut qc, mut kc) = (q.clone(), k.clone());
    let mut kvc = c.new_kv(&cfg, 64).unwrap();
    c.rope_store(&mut qc, &mut kc, &v, &mut kvc, 1, shape, &rows, &table);
    let (mut qg, mut kg) = (g.buf_from_host(&q), g.buf_from_host(&k));
    let mut kvg = g.new_kv(&cfg, 64).unwrap();
    g.rope_store(
        &mut qg,
        &mut kg,
        &g.buf_from_host(&v),
        &mut kvg,
        1,
        shape,
        &rows,
        &table,
    );
    assert_close("rope_store q", &g.to_host(qg), &qc, 1e-5, 1e-4);
    assert_close("rope_store k", &g.to_host(kg), &kc, 1e-5, 1e-4);
    let last = [RowKv::contiguous(0, t as u32 - 1)];
    let kvr = KvRows {
        rows: &last,
        links: &[],
    };
    let q1 = q[..heads * d].to_vec();
    // Layer 1 holds what was stored; layer 0 must still be the arena's zeros (a wrong layer
    // offset shared by the store and the attention would pass the first check, not this one).
    for layer in [1, 0] {
        let mut oc = c.buf(heads * d);
        c.attention(&q1, &kvc, layer, kvr, shape, &mut oc);
        let mut og = g.buf(heads * d);
        g.attention(&g.buf_from_host(&q1), &kvg, layer, kvr, shape, &mut og);
        assert_close(
            &format!("rope_store kv layer {layer} (via attention)"),
            &g.to_host(og),
            &oc,
            1e-5,
            1e-4,
        );
    }
    g.check().unwrap();
}

#[test]
fn linear_and_heads_match_cpu_within_the_bf16_operand_bound() {
    let Some((g, c, mut rng)) = op_test(4242) else {
        return;
    };
    for (rows, k, n, bias) in [
        (1, 576, 1536, false),
        (10, 896, 128, true),
        // k not a multiple of the rows kernel's 32-value blocks, n not of its 8-column tiles.
        (5, 200, 75, true),
        (67, 192, 4096, false),
        // An odd vocabulary (not a multiple of 8) without bias: the head picks' log-sum-exp
        // runs its scalar tail (`row_logsumexp`), which no other case reaches.
        (3, 64, 1001, false),
    ] {
        let x = rng.vec(rows * k, 2.0);
        let w = rng.vec(n * k, 0.1);
        let bv = rng.vec(n, 0.5);
        let lc = Linear {
            weight: c.upload(bf16_tensor(w.clone(), vec![n, k])).unwrap(),
            bias: bias.then(|| c.upload(bf16_tensor(bv.clone(), vec![n])).unwrap()),
        };
        let lg = Linear {
            weight: g.upload(bf16_tensor(w.clone(), vec![n, k])).unwrap(),
            bias: bias.then(|| g.upload(bf16_tensor(bv.clone(), vec![n])).unwrap()),
        };
        let mut oc = c.buf(rows * n);
        c.linear(&x, rows, &mut [(lc.as_ref(), &mut oc)]);
        let xg = g.buf_from_host(&x);
        let wb: Vec<f32> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        // Both paths: cuBLAS (the activation operand rounded to bf16: |Δ| <= 2^-8 Σ|x||w|) and,
        // for rows <= SMALL_ROWS, our small-row kernel (f32 activations: only the summation
        // order differs, |Δ| <= 1e-4 Σ|x||w|).
        // And our few-row bf16 kernel (linear_rows_bf16: the cuBLAS path's operands, bias in
        // the same launch).
        let few = rows <= cuda::SMALL_ROWS;
        for path in ["cuBLAS", "small-row kernel", "rows kernel"] {
            if path != "cuBLAS" && !few {
                continue;
            }
            g.set_small_gemm(path == "small-row kernel");
            g.set_rows_gemm(path == "rows kernel");
            let mut og = g.buf(rows * n);
            g.linear(&xg, rows, &mut [(lg.as_ref(), &mut og)]);
            let got = g.to_host(og);
            let bound = if path == "small-row kernel" {
                1e-4f32
            } else {
                1.0 / 256.0
            };
            let mut worst = 0.0f64;
            for r in 0..rows {
                for j in 0..n {
                    let mag: f32 = (0..k).map(|i| (x[r * k + i] * wb[j * k + i]).abs()).sum();
                    let (gv, cv) = (got[r * n + j], oc[r * n + j]);
                    let err = (gv - cv).abs();
                    assert!(
                        err <= mag * bound + 1e-6,
                        "linear {path} {rows}x{k}x{n} [{r},{j}]: gpu {gv} cpu {cv} bound {}",
                        mag * bound
                    );
                    worst = worst.max((err / mag.max(1e-12)) as f64);
                }
            }
            eprintln!(
                "linear {path} {rows}x{k}x{n}: max |Δ| / Σ|x||w| = {worst:.3e} (bound {bound:.1e})"
            );
        }
        g.set_small_gemm(false);
        g.set_rows_gemm(false);

        // The sparse head and the full head's picks + log-sum-exp.
        let picks: Vec<(u32, u32)> = (0..3 * rows)
            .map(|_| (rng.below(rows) as u32, rng.below(n) as u32))
            .collect();
        let pc = c.linear_picks(&x, &lc.weight, &picks);
        let pg = g.linear_picks(&xg, &lg.weight, &picks);
        assert_close(&format!("linear_picks {rows}x{k}"), &pg, &pc, 1e-5, 1e-4);
        if !bias {
            let (gp, gl) = g.head_picks_lse(&xg, rows, lg.as_ref(), n, &picks);
            let (cp, cl) = c.head_picks_lse(&x, rows, lc.as_ref(), n, &picks);
            // GEMM logits: the operand bound, loosely (2^-8 of the largest magnitude).
            let scale = cl.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert_close(
                &format!("head picks {rows}x{k}x{n}"),
                &gp,
                &cp,
                scale / 256.0,
                0.0,
            );
            assert_close(
                &format!("head lse {rows}x{k}x{n}"),
                &gl,
                &cl,
                scale / 256.0,
                0.0,
            );
        }
    }
    g.check().unwrap();
}

/// A config with the given attention shape (2 layers).
/// The fused MLP half (`gate_up_silu`: one strided-batched GEMM for gate and up, SwiGLU
/// writing a bf16 copy of its output) against the same ops unfused on the GPU and against the
/// CPU; and the bf16 copies a norm or SwiGLU leaves for the next GEMM ("shadows") give bit for
/// bit what casting gives, and are used only by the op right after, for that buffer.
#[test]
fn fused_mlp_and_bf16_shadows_match_unfused_launches() {
    let Some((g, c, mut rng)) = op_test(777) else {
        return;
    };
    g.set_small_gemm(false);
    let (k, n) = (576, 1536);
    let wg = rng.vec(n * k, 0.1);
    let wu = rng.vec(n * k, 0.1);
    let wd = rng.vec(k * n, 0.1);
    let norm_w = rng.vec(k, 1.0);
    let up_c = |w: &Vec<f32>, shape: Vec<usize>| c.upload(bf16_tensor(w.clone(), shape)).unwrap();
    let up_g = |w: &Vec<f32>, shape: Vec<usize>| g.upload(bf16_tensor(w.clone(), shape)).unwrap();
    fn lin<W>(weight: W) -> Linear<W> {
        Linear { weight, bias: None }
    }
    let (gc, uc) = (lin(up_c(&wg, vec![n, k])), lin(up_c(&wu, vec![n, k])));
    let (gg, ug, dg) = (
        lin(up_g(&wg, vec![n, k])),
        lin(up_g(&wu, vec![n, k])),
        lin(up_g(&wd, vec![k, n])),
    );
    let ng = up_g(&norm_w, vec![k]);
    for (rows, rows_kernel) in [
        (1, false),
        (10, false),
        (37, false),
        (1, true),
        (10, true),
        (16, true),
    ] {
        // Few rows: the batched cuBLAS GEMM + SwiGLU launch, or linear_rows_bf16 (both
        // products and the SwiGLU in one launch).
        g.set_rows_gemm(rows_kernel);
        let x = rng.vec(rows * k, 2.0);
        let xg = g.buf_from_host(&x);
        // Fused against unfused, both on the GPU, and against the CPU.
        let (mut a, mut a_up) = (g.buf(rows * n), g.buf(rows * n));
        g.gate_up_silu(&xg, rows, gg.as_ref(), ug.as_ref(), &mut a, &mut a_up);
        let (mut b, mut b_up) = (g.buf(rows * n), g.buf(rows * n));
        g.linear(
            &xg,
            rows,
            &mut [(gg.as_ref(), &mut b), (ug.as_ref(), &mut b_up)],
        );
        g.silu_mul(&mut b, &b_up);
        let (mut cc, mut cc_up) = (c.buf(rows * n), c.buf(rows * n));
        c.gate_up_silu(&x, rows, gc.as_ref(), uc.as_ref(), &mut cc, &mut cc_up);
        let (fused, unfused) = (g.to_host(a), g.to_host(b));
        let scale = cc.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("gate_up_silu fused vs unfused {rows}x{k}x{n} rows kernel {rows_kernel}"),
            &fused,
            &unfused,
            1e-4 * scale,
            1e-5,
        );
        assert_close(
            &format!("gate_up_silu vs cpu {rows}x{k}x{n}"),
            &fused,
            &cc,
            scale / 64.0,
            0.0,
        );

        // Shadows: norm → GEMM, SwiGLU → GEMM and fused MLP → GEMM read the bf16 copy; with an
        // op in between they cast. Bit-identical either way.
        let run = |between: bool, src: &str| -> Vec<f32> {
            let mut x_res = g.buf_from_host(&x);
            let delta = g.buf_from_host(&x);
            let mut hn = g.buf(rows * k);
            let mut other = g.buf_from_host(&x);
            let (mut gate, mut up) = (g.buf(rows * n), g.buf(rows * n));
            let mut out = g.buf(rows * k);
            match src {
                "norm" => {
                    g.add_rmsnorm(&mut x_res, &delta, &ng, 1e-5, k, &mut hn);
                    if between {
                        g.add(&mut other, &delta);
                    }
                    g.linear(&hn, rows, &mut [(gg.as_ref(), &mut gate)]);
                    return g.to_host(gate);
                }
                "silu" => {
                    g.linear(
                        &xg,
                        rows,
                        &mut [(gg.as_ref(), &mut gate), (ug.as_ref(), &mut up)],
                    );
                    g.silu_mul(&mut gate, &up);
                }
                _ => g.gate_up_silu(&xg, rows, gg.as_ref(), ug.as_ref(), &mut gate, &mut up),
            }
            if between {
                g.add(&mut other, &delta);
            }
            g.linear(&gate, rows, &mut [(dg.as_ref(), &mut out)]);
            g.to_host(out)
        };
        for src in ["norm", "silu", "fused"] {
            let (shadowed, cast) = (run(false, src), run(true, src));
            assert!(
                shadowed
                    .iter()
                    .zip(&cast)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{src} → GEMM, {rows} rows: the shadow differs from the cast"
            );
        }
        // A GEMM right after a norm but on another buffer casts that buffer.
        let mut x_res = g.buf_from_host(&x);
        let mut hn = g.buf(rows * k);
        let z = rng.vec(rows * k, 1.0);
        let zg = g.buf_from_host(&z);
        g.rmsnorm(&x_res, &ng, 1e-5, k, &mut hn);
        let mut o1 = g.buf(rows * n);
        g.linear(&zg, rows, &mut [(gg.as_ref(), &mut o1)]);
        g.add(&mut x_res, &zg);
        let mut o2 = g.buf(rows * n);
        g.linear(&zg, rows, &mut [(gg.as_ref(), &mut o2)]);
        let (o1, o2) = (g.to_host(o1), g.to_host(o2));
        assert!(
            o1.iter().zip(&o2).all(|(a, b)| a.to_bits() == b.to_bits()),
            "a GEMM after a norm of another buffer read the norm's shadow"
        );
        // A failed launch skips every later op and reads back zeros, which would compare
        // equal above: the bit-equality means something only if nothing failed.
        g.check().unwrap();
        eprintln!("shadows, {rows} rows: bit-identical to casts");
    }
}

/// `qkv_rope_store` on the GPU (one GEMM over the concatenated q/k/v weight, the rotation
/// reading its packed output) against the same ops unfused on the GPU and against the CPU:
/// the rotated q, and the stored K/V read back through attention. With and without biases.
#[test]
fn fused_qkv_rope_store_matches_unfused_and_cpu() {
    let Some((g, c, mut rng)) = op_test(31337) else {
        return;
    };
    g.set_small_gemm(false);
    let (heads, kv_heads, d) = (14, 2, 64);
    let (q_dim, kv_dim) = (heads * d, kv_heads * d);
    let kdim = 896;
    let cfg = config(heads, kv_heads, d);
    let table = RopeTable::new(d, 1_000_000.0, RopeScaling::None, 4096);
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
    };
    for (t, bias, rows_kernel) in [
        (1, false, false),
        (10, true, false),
        (23, false, false),
        (37, true, false),
        (1, false, true),
        (10, true, true),
    ] {
        // The GEMMs by cuBLAS, or by linear_rows_bf16 (bias in the same launch).
        g.set_rows_gemm(rows_kernel);
        let rows: Vec<RowKv> = (0..t as u32).map(|i| RowKv::contiguous(0, i)).collect();
        let x = rng.vec(t * kdim, 2.0);
        let ws: Vec<(Vec<f32>, Vec<f32>, usize)> = [q_dim, kv_dim, kv_dim]
            .iter()
            .map(|&n| (rng.vec(n * kdim, 0.05), rng.vec(n, 0.5), n))
            .collect();
        let lc: Vec<Linear<HostTensor>> = ws
            .iter()
            .map(|(w, b, n)| Linear {
                weight: c.upload(bf16_tensor(w.clone(), vec![*n, kdim])).unwrap(),
                bias: bias.then(|| c.upload(bf16_tensor(b.clone(), vec![*n])).unwrap()),
            })
            .collect();
        let lg: Vec<Linear<cuda::CudaWeight>> = ws
            .iter()
            .map(|(w, b, n)| Linear {
                weight: g.upload(bf16_tensor(w.clone(), vec![*n, kdim])).unwrap(),
                bias: bias.then(|| g.upload(bf16_tensor(b.clone(), vec![*n])).unwrap()),
            })
            .collect();
        let refs_g = [lg[0].as_ref(), lg[1].as_ref(), lg[2].as_ref()];
        // CPU: the trait's default (linear, then rope_store).
        let (mut qc, mut kc, mut vc) = (c.buf(t * q_dim), c.buf(t * kv_dim), c.buf(t * kv_dim));
        let mut kvc = c.new_kv(&cfg, 64).unwrap();
        let refs_c = [lc[0].as_ref(), lc[1].as_ref(), lc[2].as_ref()];
        c.qkv_rope_store(
            &x, refs_c, &mut qc, &mut kc, &mut vc, &mut kvc, 1, shape, &rows, &table,
        );
        // GPU fused, and GPU unfused (linear + rope_store).
        let xg = g.buf_from_host(&x);
        let (mut q1, mut k1, mut v1) = (g.buf(t * q_dim), g.buf(t * kv_dim), g.buf(t * kv_dim));
        let mut kv1 = g.new_kv(&cfg, 64).unwrap();
        g.qkv_rope_store(
            &xg, refs_g, &mut q1, &mut k1, &mut v1, &mut kv1, 1, shape, &rows, &table,
        );
        let (mut q2, mut k2, mut v2) = (g.buf(t * q_dim), g.buf(t * kv_dim), g.buf(t * kv_dim));
        let mut kv2 = g.new_kv(&cfg, 64).unwrap();
        g.linear(
            &xg,
            t,
            &mut [
                (refs_g[0], &mut q2),
                (refs_g[1], &mut k2),
                (refs_g[2], &mut v2),
            ],
        );
        g.rope_store(&mut q2, &mut k2, &v2, &mut kv2, 1, shape, &rows, &table);
        let (q1, q2) = (g.to_host(q1), g.to_host(q2));
        let scale = qc.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("fused q vs unfused, {t} rows, bias {bias}, rows kernel {rows_kernel}"),
            &q1,
            &q2,
            1e-4 * scale,
            1e-5,
        );
        assert_close(
            &format!("fused q vs cpu, {t} rows, bias {bias}"),
            &q1,
            &qc,
            scale / 64.0,
            0.0,
        );
        // The stored K/V, through attention of the last row over the whole prompt.
        let last = [RowKv::contiguous(0, t as u32 - 1)];
        let kvr = KvRows {
            rows: &last,
            links: &[],
        };
        let qa = rng.vec(q_dim, 1.0);
        let mut oc = c.buf(q_dim);
        c.attention(&qa, &kvc, 1, kvr, shape, &mut oc);
        let mut outs = Vec::new();
        for kv in [&kv1, &kv2] {
            let mut og = g.buf(q_dim);
            g.attention(&g.buf_from_host(&qa), kv, 1, kvr, shape, &mut og);
            outs.push(g.to_host(og));
        }
        let scale = oc.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert_close(
            &format!("fused kv vs unfused, {t} rows"),
            &outs[0],
            &outs[1],
            1e-4 * scale,
            1e-5,
        );
        assert_close(
            &format!("fused kv vs cpu, {t} rows"),
            &outs[0],
            &oc,
            scale / 64.0,
            0.0,
        );
    }
    g.check().unwrap();
}

fn config(heads: usize, kv_heads: usize, d: usize) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {h},
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": {heads},
            "num_key_value_heads": {kv_heads}, "head_dim": {d}, "vocab_size": 64,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "eos_token_id": 2, "bos_token_id": 1, "tie_word_embeddings": true}}"#,
        h = heads * d
    ))
    .unwrap()
}

#[test]
fn attention_matches_cpu_on_prompts_beams_and_mixed_batches() {
    let Some((g, c, mut rng)) = op_test(31337) else {
        return;
    };
    for (heads, kv_heads, d) in [(9, 3, 64), (14, 2, 64), (8, 2, 128), (4, 4, 64)] {
        let cfg = config(heads, kv_heads, d);
        let kv_dim = kv_heads * d;
        let entries = 256;
        let mut kc = c.new_kv(&cfg, entries).unwrap();
        let mut kg = g.new_kv(&cfg, entries).unwrap();
        // Fill both layers of the arena with random K/V.
        let fill: Vec<RowKv> = (0..entries as u32)
            .map(|e| RowKv::contiguous(0, e))
            .collect();
        for layer in 0..2 {
            let (k, v) = (
                rng.vec(entries * kv_dim, 1.5),
                rng.vec(entries * kv_dim, 1.0),
            );
            c.kv_store(&mut kc, layer, &k, &v, &fill);
            g.kv_store(
                &mut kg,
                layer,
                &g.buf_from_host(&k),
                &g.buf_from_host(&v),
                &fill,
            );
        }
        // The rows: a 20-token prompt at 0; a shared-prefix prompt (span 0..7 + own links);
        // 6 beams over the first prompt with 0..5 links each; a lone row with a long span
        // (past one shared-memory chunk); 3 beams of a second query; then a prompt again.
        let mut rows = Vec::new();
        let mut links: Vec<u32> = Vec::new();
        rows.extend((0..20).map(|p| RowKv::contiguous(0, p)));
        let l0 = links.len() as u32;
        links.extend(100..110);
        rows.extend((0..10u32).map(|i| RowKv {
            pos: 7 + i,
            entry: 100 + i,
            span: (0, 7),
            link: (l0, l0 + i + 1),
        }));
        for _ in 0..6 {
            let n = rng.below(6) as u32;
            let l = links.len() as u32;
            links.extend((0..n).map(|_| 120 + rng.below(100) as u32));
            rows.push(RowKv {
                pos: 20 + n,
                entry: *links.last().unwrap_or(&5),
                span: (0, 20),
                link: (l, l + n),
            });
        }
        rows.push(RowKv {
            pos: 75,
            entry: 230,
            span: (30, 105),
            link: (l0, l0 + 3),
        });
        for j in 0..3u32 {
            let l = links.len() as u32;
            links.extend([240 + j, 250]);
            rows.push(RowKv {
                pos: 40,
                entry: 240 + j,
                span: (200, 238),
                link: (l, l + 2),
            });
        }
        rows.extend((0..5).map(|p| RowKv::contiguous(150, p)));
        let kvr = KvRows {
            rows: &rows,
            links: &links,
        };
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        };
        let q = rng.vec(rows.len() * heads * d, 1.0);
        for layer in 0..2 {
            let mut oc = c.buf(rows.len() * heads * d);
            c.attention(&q, &kc, layer, kvr, shape, &mut oc);
            let mut og = g.buf(rows.len() * heads * d);
            g.attention(&g.buf_from_host(&q), &kg, layer, kvr, shape, &mut og);
            assert_close(
                &format!("attention H{heads}/{kv_heads} D{d} layer {layer}"),
                &g.to_host(og),
                &oc,
                1e-5,
                1e-4,
            );
        }
        // The bf16 copy attention leaves for o_proj (every run writes its own rows of it): a
        // GEMM right after reads it, bit for bit what casting the output gives.
        let qd = heads * d;
        let w = Linear {
            weight: g
                .upload(bf16_tensor(rng.vec(32 * qd, 0.1), vec![32, qd]))
                .unwrap(),
            bias: None,
        };
        let gemm_after_attention = |cast: bool| -> Vec<f32> {
            let mut og = g.buf(rows.len() * qd);
            g.attention(&g.buf_from_host(&q), &kg, 1, kvr, shape, &mut og);
            if cast {
                let mut other = g.buf_from_host(&q);
                g.add(&mut other, &og);
            }
            let mut y = g.buf(rows.len() * 32);
            g.linear(&og, rows.len(), &mut [(w.as_ref(), &mut y)]);
            g.to_host(y)
        };
        let (shadowed, cast) = (gemm_after_attention(false), gemm_after_attention(true));
        assert!(
            shadowed
                .iter()
                .zip(&cast)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "attention → GEMM, mixed batch D{d}: the bf16 copy differs from the cast"
        );
        // Beams alone (a decode step), and one prompt alone (a prefill).
        for (what, sub) in [("decode", 30..36), ("prefill", 0..20)] {
            let q1 = q[sub.start * heads * d..sub.end * heads * d].to_vec();
            let kvr1 = KvRows {
                rows: &rows[sub.clone()],
                links: &links,
            };
            let mut oc = c.buf(q1.len());
            c.attention(&q1, &kc, 1, kvr1, shape, &mut oc);
            let mut og = g.buf(q1.len());
            g.attention(&g.buf_from_host(&q1), &kg, 1, kvr1, shape, &mut og);
            assert_close(
                &format!("attention {what} H{heads}/{kv_heads} D{d}"),
                &g.to_host(og),
                &oc,
                1e-5,
                1e-4,
            );
        }
        g.check().unwrap();
    }
}

/// Models for the whole-path tests: the bundled default, plus any listed in
/// `GRAM_GPU_MODELS` (colon-separated directories, e.g. the shaped checkpoints of tools/gpu).
fn models() -> Vec<std::path::PathBuf> {
    let mut v = vec![model_dir("gram-icecat-2m")];
    if let Ok(extra) = std::env::var("GRAM_GPU_MODELS") {
        v.extend(extra.split(':').filter(|s| !s.is_empty()).map(Into::into));
    }
    v
}

/// The model on the CPU (bf16 weights, `cpu` numerics) and on the GPU.
fn load_pair(
    dir: &std::path::Path,
    cpu: CpuBackend,
    g: CudaBackend,
) -> (Model, Model<CudaBackend>) {
    let opts = LoadOptions {
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    let cpu = Model::load_on(cpu, dir, &opts).unwrap();
    let gpu = Model::load_on(
        g,
        dir,
        &LoadOptions {
            dtype: Some(DType::BF16),
            threads: Some(1),
        },
    )
    .unwrap();
    (cpu, gpu)
}

/// Root-mean-square of `max_rel_err`'s per-element terms: where max catches one bad logit,
/// this catches a small error spread over all of them.
fn rms_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let sum: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| ((g as f64 - w as f64) / (w.abs() as f64).max(1.0)).powi(2))
        .sum();
    (sum / got.len().max(1) as f64).sqrt()
}

/// The GPU's logits may be at most this many times as far from each CPU reference as the two
/// references are from each other (module docs).
const SPREAD_FACTOR: f64 = 3.0;

/// The largest distance between the two CPU references that is taken as bf16 rounding noise:
/// 2.5 times the largest measured (6.0e-2, the 16-epoch default; module docs). A wider one means
/// the rounding CPU itself is wrong, and would widen the GPU's tolerance with it.
const SPREAD_CEILING: f64 = 0.15;

#[test]
fn model_logits_match_cpu() {
    // Against the CPU with the GPU's GEMM rounding and against the plain f32-activation CPU.
    // The tolerance is measured, per model, on the same inputs: how far rounding the GEMM
    // operands to bf16 moves this model's logits on the CPU alone (the spread between the two
    // references), times SPREAD_FACTOR, for the largest element and for the root mean square.
    for dir in models() {
        let Some(g) = gpu() else { return };
        let opts = LoadOptions {
            dtype: Some(DType::BF16),
            ..Default::default()
        };
        let rounded = Model::load_on(CpuBackend::gpu_numerics(), &dir, &opts).unwrap();
        let (plain, gpu) = load_pair(&dir, CpuBackend::default(), g);
        let vocab = plain.config.vocab_size;
        let mut rng = Rng(5);
        // Two sequences: a 32-token prefill each, then 3 decode steps of both.
        let prompt: Vec<u32> = (0..64)
            .map(|_| 3 + rng.below(vocab.min(49_000) - 3) as u32)
            .collect();
        let slots: Vec<usize> = (0..64).map(|i| i / 32).collect();
        let mut phases: Vec<(Vec<u32>, Vec<usize>, Vec<usize>)> =
            vec![(prompt, slots, vec![31, 63])];
        for step in 0..3u32 {
            phases.push((vec![5 + step, 9 + step], vec![0, 1], vec![0, 1]));
        }
        let mut cr = rounded.new_cache(2, 64).unwrap();
        let mut cp = plain.new_cache(2, 64).unwrap();
        let mut cg = gpu.new_cache(2, 64).unwrap();
        let mut logits = Vec::new();
        for (toks, slots, last) in &phases {
            let r = rounded.forward(&mut cr, toks, slots, last).unwrap();
            let p = plain.forward(&mut cp, toks, slots, last).unwrap();
            let g = gpu.forward(&mut cg, toks, slots, last).unwrap();
            logits.push((r, p, g));
        }
        let (mut spread_max, mut spread_rms) = (0f64, 0f64);
        for (r, p, _) in &logits {
            spread_max = spread_max.max(max_rel_err(r, p));
            spread_rms = spread_rms.max(rms_rel_err(r, p));
        }
        assert!(
            spread_max > 0.0 && spread_rms > 0.0,
            "{}: rounding the operands to bf16 changed no logit: the rounding CPU is not rounding",
            dir.display()
        );
        assert!(
            spread_max <= SPREAD_CEILING,
            "{}: the CPU references differ by {spread_max:.3e}, past {SPREAD_CEILING}: \
             CpuBackend::gpu_numerics is off, not just rounding",
            dir.display()
        );
        let (tol_max, tol_rms) = (SPREAD_FACTOR * spread_max, SPREAD_FACTOR * spread_rms);
        eprintln!(
            "{}: the CPU references differ by max {spread_max:.3e} / rms {spread_rms:.3e}; \
             tolerances {tol_max:.3e} / {tol_rms:.3e}",
            dir.display()
        );
        for (phase, (r, p, g)) in logits.iter().enumerate() {
            let what = if phase == 0 {
                "prefill".to_string()
            } else {
                format!("decode step {}", phase - 1)
            };
            for (numerics, want) in [("gpu-numerics", r), ("f32-activations", p)] {
                let (m, q) = (max_rel_err(g, want), rms_rel_err(g, want));
                eprintln!(
                    "{} vs cpu {numerics}: {what} logits rel err max {m:.3e} rms {q:.3e}",
                    dir.display()
                );
                assert!(
                    m <= tol_max && q <= tol_rms,
                    "{} vs cpu {numerics}: {what}: max {m:.3e} (tolerance {tol_max:.3e}), \
                     rms {q:.3e} (tolerance {tol_rms:.3e})",
                    dir.display()
                );
            }
        }
    }
}

/// Compares two searches' outputs as the module doc says; returns (codes, identical in place).
fn compare_codes(
    what: &str,
    cpu: &[beam::Output],
    gpu: &[beam::Output],
    strict: bool,
) -> (usize, usize) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: outputs (queries)");
    let (mut total, mut same) = (0, 0);
    for (qi, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        total += c.codes.len();
        same += c
            .codes
            .iter()
            .zip(&g.codes)
            .filter(|(a, b)| a.code == b.code)
            .count();
        if !strict {
            continue;
        }
        assert_eq!(
            c.codes.len(),
            g.codes.len(),
            "{what} query {qi}: code counts"
        );
        let mut common = 0;
        for cc in &c.codes {
            if let Some(gc) = g.codes.iter().find(|gc| gc.code == cc.code) {
                common += 1;
                assert!(
                    (cc.score - gc.score).abs() <= 3e-2,
                    "{what} query {qi} code {:?}: scores cpu {} gpu {}",
                    cc.code,
                    cc.score,
                    gc.score
                );
            }
        }
        assert!(
            common * 5 >= c.codes.len() * 4,
            "{what} query {qi}: only {common} of {} codes in common",
            c.codes.len()
        );
        if common < c.codes.len() {
            let show = |o: &beam::Output| {
                o.codes
                    .iter()
                    .map(|x| format!("{:?} {:.3} {:?}", x.code, x.score, x.token_logprobs))
                    .collect::<Vec<_>>()
                    .join("\n    ")
            };
            eprintln!(
                "{what} query {qi}: {common} of {} codes in common\n  cpu:\n    {}\n  gpu:\n    {}",
                c.codes.len(),
                show(c),
                show(g)
            );
        }
        // Order: two codes both searches returned, with CPU scores more than 0.1 apart, come
        // in the same order. A code the CPU returns and the GPU does not is allowed (within
        // the 80 % above) and printed with both lists: a running beam is pruned on its summed
        // log-probability at every step, so a near-tie there drops a code however clear its
        // final score is, and every code after it moves up a place. (The 8-epoch default
        // model, "wireless mouse", children normalization: the prefix of code 12614 is the
        // 10th running beam of step 3 on the CPU, 0.033 ahead of the 11th; the GPU keeps the
        // other one, so 12614 is missing there and code 12860, 0.13 clear of both final
        // neighbours, is 6th instead of 7th, in every GPU setting tried: H100, fourteenth
        // session.)
        let place = |code: Option<u32>| g.codes.iter().position(|gc| gc.code == code);
        for (i, a) in c.codes.iter().enumerate() {
            for b in &c.codes[i + 1..] {
                if a.score - b.score <= 0.1 {
                    continue;
                }
                if let (Some(pa), Some(pb)) = (place(a.code), place(b.code)) {
                    assert!(
                        pa < pb,
                        "{what} query {qi}: codes {:?} ({}) and {:?} ({}) are more than 0.1 \
                         apart on the CPU but in the other order on the GPU",
                        a.code,
                        a.score,
                        b.code,
                        b.score
                    );
                }
            }
        }
    }
    eprintln!("{what}: {same}/{total} codes identical in place");
    (total, same)
}

/// `compare_codes` without a GPU: a code pruned at an intermediate step (the rest move up a
/// place) passes; two codes more than 0.1 apart in the other order fail.
#[test]
fn compare_codes_allows_a_pruned_code_not_a_swap() {
    let out = |codes: &[(u32, f32)]| beam::Output {
        codes: codes
            .iter()
            .map(|&(code, score)| beam::Code {
                code: Some(code),
                tokens: vec![code],
                score,
                token_logprobs: vec![score],
            })
            .collect(),
        invalid: 0,
        truncated: 0,
        steps: 1,
        rows: 1,
        head_logits: 1,
        prefill_s: 0.0,
        decode_s: 0.0,
    };
    let cpu = out(&[
        (1, -0.2),
        (2, -0.3),
        (3, -0.9),
        (4, -1.6),
        (5, -1.9),
        (6, -2.0),
    ]);
    // Code 4 pruned; 7 joins at the end; scores within 3e-2.
    let gpu = out(&[
        (1, -0.2),
        (2, -0.31),
        (3, -0.9),
        (5, -1.89),
        (6, -2.0),
        (7, -2.1),
    ]);
    assert_eq!(
        compare_codes("pruned", std::slice::from_ref(&cpu), &[gpu], true),
        (6, 3)
    );
    // Every score right, but codes 3 and 4 (0.7 apart) in the other order.
    let swapped = out(&[
        (1, -0.2),
        (2, -0.3),
        (4, -1.6),
        (3, -0.9),
        (5, -1.9),
        (6, -2.0),
    ]);
    let r = std::panic::catch_unwind(|| compare_codes("swapped", &[cpu], &[swapped], true));
    let msg = r.expect_err("a swap must fail");
    let msg = msg
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or("");
    assert!(msg.contains("in the other order"), "{msg}");
}

/// The default model's code set: the trie of the whole-search tests, on every model.
fn default_codes() -> Vec<String> {
    let codes_file = model_dir("gram-icecat-2m").join("codes.txt");
    std::fs::read_to_string(&codes_file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn beam_search_matches_cpu() {
    let texts = default_codes();
    let queries_text = [
        "laptop",
        "usb cable 2m black",
        "wireless mouse",
        "hp toner cartridge",
        "monitor 27 inch",
    ];
    for (mi, dir) in models().into_iter().enumerate() {
        let Some(g) = gpu() else { return };
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        let (cpu, gpu) = load_pair(&dir, CpuBackend::default(), g);
        let eos = cpu.config.eos_token_ids[0];
        let set = CodeSet::from_texts(texts.clone(), &tok, eos).unwrap();
        let trie = Trie::build(&set, cpu.config.vocab_size, eos).unwrap();
        // The default model: three settings; extra (bigger, random) models: one, to keep the
        // CPU side of the comparison short.
        let settings: &[(usize, Normalize)] = if mi == 0 {
            &[
                (10, Normalize::Full),
                (10, Normalize::Children),
                (64, Normalize::Full),
            ]
        } else {
            &[(10, Normalize::Full)]
        };
        for &(beam_w, normalize) in settings {
            let queries: Vec<Query> = queries_text
                .iter()
                .map(|q| Query {
                    prompt: tok.encode(&format!("Q: {q}\n")).unwrap(),
                    options: BeamOptions {
                        beam: beam_w,
                        normalize,
                        ..Default::default()
                    },
                })
                .collect();
            let want = beam::search(&cpu, &trie, &queries).unwrap();
            let got = beam::search(&gpu, &trie, &queries).unwrap();
            // The trained default model is strict; random-weight shaped models report only
            // (near-uniform logits make near-ties everywhere).
            compare_codes(
                &format!("{} beam {beam_w} {normalize:?}", dir.display()),
                &want,
                &got,
                mi == 0,
            );
        }
    }
}

/// The model of `dir` on the GPU (bf16 weights), the trie of `codes` under its tokenizer, and
/// `prompts` as beam-search queries with the default options.
fn gpu_search_setup(
    dir: &std::path::Path,
    g: CudaBackend,
    codes: &[String],
    prompts: &[&str],
) -> (Model<CudaBackend>, Trie, Vec<Query>) {
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = Model::load_on(
        g,
        dir,
        &LoadOptions {
            dtype: Some(DType::BF16),
            threads: Some(1),
        },
    )
    .unwrap();
    let eos = model.config.eos_token_ids[0];
    let set = CodeSet::from_texts(codes.to_vec(), &tok, eos).unwrap();
    let trie = Trie::build(&set, model.config.vocab_size, eos).unwrap();
    let queries = prompts
        .iter()
        .map(|q| Query {
            prompt: tok.encode(&format!("Q: {q}\n")).unwrap(),
            options: BeamOptions::default(),
        })
        .collect();
    (model, trie, queries)
}

/// The decoder pass replayed as a CUDA graph computes exactly what it computes launched op by
/// op: the same codes and bit-identical scores, and graphs were captured and replayed.
#[test]
fn graph_replay_matches_eager_launches() {
    let texts = default_codes();
    for dir in models() {
        let Some(g) = gpu() else { return };
        let (model, trie, queries) =
            gpu_search_setup(&dir, g, &texts, &["laptop bag", "usb hub", "black ink"]);
        model.backend.set_graphs(false);
        let eager = beam::search(&model, &trie, &queries).unwrap();
        assert_eq!(eager.len(), queries.len());
        model.backend.set_graphs(true);
        let mut search = beam::BeamSearch::new();
        // A shape's pass is planned (captured) at its `capture_after`-th sighting: the rounds
        // before the last see every shape that often.
        let rounds = model.backend.capture_after().max(2) as usize;
        let mut after_first = model.backend.graph_stats();
        for round in 0..rounds {
            let graphed = search.run(&model, &trie, &queries).unwrap();
            if round + 2 == rounds {
                after_first = model.backend.graph_stats();
            }
            assert_eq!(graphed.len(), eager.len(), "round {round}");
            for (qi, (e, gr)) in eager.iter().zip(&graphed).enumerate() {
                assert_eq!(
                    e.codes,
                    gr.codes,
                    "{} round {round} query {qi}",
                    dir.display()
                );
            }
        }
        let stats = model.backend.graph_stats();
        eprintln!("{}: graphs {stats:?}", dir.display());
        // The last round repeats the earlier rounds' passes: every shape was seen often enough,
        // so none runs unplanned, and graphs captured before are replayed. No capture failed,
        // no planned pass fell back.
        assert!(stats.captured > 0, "{stats:?}");
        assert_eq!(stats.unplanned, after_first.unplanned, "{stats:?}");
        assert!(stats.replayed > after_first.replayed, "{stats:?}");
        assert_eq!((stats.direct, stats.failed_captures), (0, 0), "{stats:?}");
    }
}

/// Programmatic dependent launches (`GRAM_CUDA_PDL`: each kernel may start while the one
/// before it finishes, and waits for it on the device) change when kernels start, never what
/// they compute: the same searches with them off and on, eager and replayed from graphs, give
/// the same codes with bit-identical per-token log-probabilities. The few-row GEMM kernel
/// (which loads its first weights before the wait) runs in the second half.
#[test]
fn programmatic_launches_match_serialized_launches() {
    let texts = default_codes();
    for dir in models() {
        let Some(g) = gpu() else { return };
        if !g.set_pdl(true) {
            eprintln!("skipping: programmatic dependent launch needs compute capability 9.0");
            return;
        }
        let (model, trie, queries) = gpu_search_setup(
            &dir,
            g,
            &texts,
            &["wireless mouse", "hp toner", "laptop bag 15 inch"],
        );
        let bits = |out: &[beam::Output]| -> Vec<(Vec<u32>, Vec<u32>)> {
            out.iter()
                .flat_map(|o| &o.codes)
                .map(|c| {
                    let lp = c.token_logprobs.iter().map(|v| v.to_bits()).collect();
                    (c.tokens.clone(), lp)
                })
                .collect()
        };
        for rows_kernel in [false, true] {
            let b = &model.backend;
            b.set_rows_gemm(rows_kernel);
            b.set_graphs(false);
            b.set_pdl(false);
            let serial = bits(&beam::search(&model, &trie, &queries).unwrap());
            b.set_pdl(true);
            let eager = bits(&beam::search(&model, &trie, &queries).unwrap());
            assert_eq!(
                serial,
                eager,
                "{}: eager, rows kernel {rows_kernel}",
                dir.display()
            );
            b.set_graphs(true);
            let mut search = beam::BeamSearch::new();
            for round in 0..b.capture_after().max(2) + 1 {
                let graphed = bits(&search.run(&model, &trie, &queries).unwrap());
                assert_eq!(
                    serial,
                    graphed,
                    "{}: graphs round {round}, rows kernel {rows_kernel}",
                    dir.display()
                );
            }
            eprintln!(
                "{}: {} codes bit-identical with and without programmatic launches \
                 (rows kernel {rows_kernel}; graphs {:?})",
                dir.display(),
                serial.len(),
                b.graph_stats()
            );
            model.backend.check().unwrap();
        }
        model.backend.set_rows_gemm(false);
    }
}

#[test]
fn no_gpu_is_a_clear_error_not_a_panic() {
    // Wherever this runs, asking for a GPU that is not there is an error value.
    let r = CudaBackend::new(usize::MAX, false);
    let msg = r.err().expect("GPU usize::MAX cannot exist").to_string();
    assert!(msg.starts_with("device: "), "{msg}");
    // And the probe answers either way without panicking.
    let _ = cuda::probe();
}

/// Random logits of running beam `j` of query `q` at step `s` (uniform in ±6, never zero).
fn step_logits(q: usize, s: usize, j: usize, vocab: usize) -> Vec<f32> {
    let seed = ((q as u64) << 40 | (s as u64) << 20 | j as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1);
    r.next();
    r.vec(vocab, 6.0)
}

/// The default model's code trie (its vocabulary, its EOS) and its vocabulary size.
fn default_trie() -> (Trie, usize) {
    let dir = model_dir("gram-icecat-2m");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let cpu = Model::load(&dir, &Default::default()).unwrap();
    let (vocab, eos) = (cpu.config.vocab_size, cpu.config.eos_token_ids[0]);
    let set = CodeSet::from_texts(default_codes(), &tok, eos).unwrap();
    (Trie::build(&set, vocab, eos).unwrap(), vocab)
}

/// A log-prob that is not finite stops the device beam step's query with a numeric error,
/// as `beam::search` and its twin `search_logits` fail (tests/beam.rs): one NaN among the
/// root's allowed tokens, and a +inf logit (every other allowed token then gets -inf).
#[test]
fn device_beam_step_refuses_log_probs_that_are_not_finite() {
    use gram::backend::cuda::beam_step::DeviceBeams;
    let Some(g) = gpu() else { return };
    let (trie, vocab) = default_trie();
    let root_child = *trie
        .children(Trie::ROOT)
        .0
        .first()
        .expect("the root has children");
    for (bad, host_lse) in [(f32::NAN, true), (f32::NAN, false), (f32::INFINITY, false)] {
        let opts = [BeamOptions {
            beam: 1,
            ..Default::default()
        }];
        let mut logits = step_logits(0, 0, 0, vocab);
        logits[root_child as usize] = bad;
        let twin = beam::search_logits(&trie, opts[0], |_, _, _| logits.clone());
        assert!(
            matches!(twin, Err(gram::Error::Numeric(_))),
            "{bad}: {twin:?}"
        );
        let mut d = DeviceBeams::new(&g, &trie, vocab, &opts, &[5]).unwrap();
        let dev = d.upload(&logits).unwrap();
        let lse = [beam::select::logsumexp(&logits)];
        let lse = d.upload(&lse).unwrap();
        d.step(&dev, host_lse.then_some(&lse)).unwrap();
        assert_eq!(d.states().unwrap()[0].error, 6, "{bad}: BEAM_ERR_NUMERIC");
        let e = d.outputs(&trie).unwrap_err();
        assert!(matches!(e, gram::Error::Numeric(_)), "{bad}: {e}");
    }
}

/// While the backend's stream captures a graph (as a decoder pass does on the thread that runs
/// it), the device beam step refuses to launch or read back: its launches would join the graph
/// and not run. After the capture ends, the same step runs.
#[test]
fn device_beam_step_refuses_to_run_inside_a_capture() {
    use gram::backend::cuda::beam_step::DeviceBeams;
    let Some(g) = gpu() else { return };
    let (trie, vocab) = default_trie();
    let opts = [BeamOptions {
        beam: 4,
        ..Default::default()
    }];
    let mut d = DeviceBeams::new(&g, &trie, vocab, &opts, &[5]).unwrap();
    let logits = d.upload(&step_logits(0, 0, 0, vocab)).unwrap();
    g.stream()
        .begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    let e = d.step(&logits, None).unwrap_err().to_string();
    assert!(e.contains("capturing a graph"), "{e}");
    let e = d.states().unwrap_err().to_string();
    assert!(e.contains("capturing a graph"), "{e}");
    let _ = g
        .stream()
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
    d.step(&logits, None).unwrap();
    assert_eq!(d.states().unwrap()[0].error, 0);
}

/// The device beam step (kernels/beam_step.cu: `beam_select_f32`, `beam_feed`,
/// `row_logsumexp_f32`; `cuda::beam_step::DeviceBeams`) against its slow twin
/// `beam::search_logits`, on random logits over the default model's trie (25,786 codes,
/// vocabulary 4,096; 344 children at the root), in one mixed batch: widths 1 to 512 (a top
/// K of 1,024 over up to 512 beams' children), both normalizations, length penalties 0.6 to
/// 2, limits of 3 to 16 tokens (codes cut at the limit). Run 1 gives full normalization the host's log-sum-exp, so
/// those queries must match bit for bit (codes, order, scores, per-token log-probs); over
/// children the kernel's own `expf` sums differ from the CPU's in the last bits (1e-5). After
/// every step, `beam_feed`'s rows must be the CPU's running beams: token, position, entry,
/// span, and a link list holding the entry of each of its ancestors (the twin's beam with its
/// tokens' prefix, at that step's slot), its own last; a slot with no beam, a dummy row on its
/// scratch entry. Run 2 lets the device
/// compute the full normalizers: every row within 2e-6 of the host's, the same codes.
#[test]
fn device_beam_step_matches_search_logits() {
    use gram::backend::cuda::beam_step::DeviceBeams;
    let Some(g) = gpu() else { return };
    let (trie, vocab) = default_trie();
    let cases: [(usize, Normalize, f64, usize); 6] = [
        (10, Normalize::Full, 1.0, 16),
        (64, Normalize::Children, 1.0, 16),
        (1, Normalize::Full, 1.0, 16),
        (512, Normalize::Full, 0.6, 16),
        (16, Normalize::Children, 2.0, 3),
        (7, Normalize::Full, 1.0, 5),
    ];
    let opts: Vec<BeamOptions> = cases
        .iter()
        .map(
            |&(beam, normalize, length_penalty, max_new_tokens)| BeamOptions {
                beam,
                normalize,
                length_penalty,
                max_new_tokens,
                ..Default::default()
            },
        )
        .collect();
    // The twin, recording every running beam's tokens at every step.
    let mut seen: Vec<Vec<Vec<Vec<u32>>>> = vec![Vec::new(); opts.len()];
    let want: Vec<beam::Output> = opts
        .iter()
        .enumerate()
        .map(|(q, &o)| {
            beam::search_logits(&trie, o, |s, j, tokens| {
                if seen[q].len() <= s {
                    seen[q].push(Vec::new());
                }
                seen[q][s].push(tokens.to_vec());
                step_logits(q, s, j, vocab)
            })
            .unwrap()
        })
        .collect();
    for (q, w) in want.iter().enumerate() {
        eprintln!(
            "query {q} {:?}: {} codes, {} cut, {} steps",
            cases[q],
            w.codes.len(),
            w.truncated,
            w.steps
        );
    }
    let prompt_lens: Vec<u32> = (0..opts.len() as u32).map(|q| 5 + 3 * q).collect();
    for host_lse in [true, false] {
        let mut d = DeviceBeams::new(&g, &trie, vocab, &opts, &prompt_lens).unwrap();
        let rows = d.logit_rows();
        let layout = d.layout().to_vec();
        for s in 0..16 {
            if !d.states().unwrap().iter().any(|st| st.active()) {
                break;
            }
            let mut host = Vec::with_capacity(rows * vocab);
            for (q, o) in opts.iter().enumerate() {
                for j in 0..o.beam {
                    host.extend(step_logits(q, s, j, vocab));
                }
            }
            let logits = d.upload(&host).unwrap();
            let lse: Vec<f32> = host
                .chunks_exact(vocab)
                .map(beam::select::logsumexp)
                .collect();
            if host_lse {
                d.step(&logits, Some(&d.upload(&lse).unwrap())).unwrap();
            } else {
                if s == 0 && rows >= 3 {
                    // Rows that are not finite read as the CPU's: NaN beside +inf is NaN (the
                    // kernel once returned +inf there), +inf twice is +inf, all -inf is -inf.
                    let mut bad = host.clone();
                    (bad[vocab / 3], bad[vocab - 1]) = (f32::NAN, f32::INFINITY);
                    (bad[vocab + 5], bad[vocab + 7]) = (f32::INFINITY, f32::INFINITY);
                    bad[2 * vocab..3 * vocab].fill(f32::NEG_INFINITY);
                    let want: Vec<f32> = bad
                        .chunks_exact(vocab)
                        .map(beam::select::logsumexp)
                        .collect();
                    let got = d.row_logsumexp(&d.upload(&bad).unwrap()).unwrap();
                    assert_eq!(got.len(), want.len());
                    for (r, (a, b)) in got.iter().zip(&want).enumerate() {
                        let same = (a.is_nan() && b.is_nan())
                            || a == b
                            || (a - b).abs() <= 2e-6 * b.abs().max(1.0);
                        assert!(same, "row {r} with non-finite logits: lse {a} vs {b}");
                    }
                    assert!(want[0].is_nan() && want[1] == f32::INFINITY);
                }
                let dev_lse = d.row_logsumexp(&logits).unwrap();
                assert_eq!(dev_lse.len(), lse.len(), "step {s}");
                for (r, (a, b)) in dev_lse.iter().zip(&lse).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                        "step {s} row {r}: lse {a} vs {b}"
                    );
                }
                d.step(&logits, None).unwrap();
            }
            // beam_feed's rows for step s + 1 against the twin's running beams there.
            let (st, fed) = (d.states().unwrap(), d.fed().unwrap());
            for (q, l) in layout.iter().enumerate() {
                let running: &[Vec<u32>] = seen[q].get(s + 1).map_or(&[], |v| v.as_slice());
                assert_eq!(st[q].error, 0, "query {q} step {s}: device error");
                assert_eq!(
                    st[q].gen_len as usize,
                    (s + 1).min(want[q].steps),
                    "query {q} step {s}"
                );
                if st[q].gen_len as usize != s + 1 {
                    continue; // done before this step: nothing fed
                }
                assert_eq!(
                    st[q].active(),
                    !running.is_empty(),
                    "query {q} after step {s}"
                );
                if !st[q].active() {
                    continue;
                }
                assert_eq!(
                    st[q].running as usize,
                    running.len(),
                    "query {q} after step {s}"
                );
                let b = opts[q].beam as u32;
                for j in 0..b {
                    let row = (l.slot0 + j) as usize;
                    let r = fed.rows[row];
                    assert_eq!(r.span, (l.base, l.base + l.prompt_len), "query {q} row {j}");
                    let list = &fed.links[r.link.0 as usize..r.link.1 as usize];
                    if let Some(tokens) = running.get(j as usize) {
                        let what = format!("query {q} step {s} beam {j}");
                        assert_eq!(fed.tokens[row], *tokens.last().unwrap(), "{what}");
                        assert_eq!(r.pos, l.prompt_len + s as u32, "{what}");
                        assert_eq!(r.entry, l.entry0 + s as u32 * b + j, "{what}");
                        assert_eq!(list.len(), s + 1, "{what}: {list:?}");
                        assert_eq!(*list.last().unwrap(), r.entry, "{what}");
                        for (k, &e) in list.iter().enumerate() {
                            // The ancestor fed after step k: the twin's beam at step k + 1
                            // whose tokens are this beam's first k + 1.
                            let i = seen[q][k + 1]
                                .iter()
                                .position(|t| t[..] == tokens[..k + 1])
                                .unwrap();
                            assert_eq!(e, l.entry0 + k as u32 * b + i as u32, "{what}: link {k}");
                        }
                    } else {
                        let what = format!("query {q} step {s} dummy row {j}");
                        assert_eq!((fed.tokens[row], r.pos), (0, 0), "{what}");
                        assert_eq!(r.entry, d.scratch0() + l.slot0 + j, "{what}");
                        assert!(list.is_empty(), "{what}");
                    }
                }
            }
        }
        let got = d.outputs(&trie).unwrap();
        assert_eq!(got.len(), want.len(), "one output per query");
        for (q, (g, w)) in got.iter().zip(&want).enumerate() {
            let what = format!(
                "run {} query {q} {:?}",
                if host_lse { 1 } else { 2 },
                cases[q]
            );
            assert_eq!((g.steps, g.truncated), (w.steps, w.truncated), "{what}");
            let codes = |o: &beam::Output| o.codes.iter().map(|c| c.code).collect::<Vec<_>>();
            assert_eq!(codes(g), codes(w), "{what}");
            let exact = host_lse && opts[q].normalize == Normalize::Full;
            for (a, b) in g.codes.iter().zip(&w.codes) {
                assert_eq!(a.tokens, b.tokens, "{what}");
                if exact {
                    assert_eq!(
                        a.score.to_bits(),
                        b.score.to_bits(),
                        "{what}: {a:?} vs {b:?}"
                    );
                    assert_eq!(a.token_logprobs, b.token_logprobs, "{what}");
                } else {
                    assert!((a.score - b.score).abs() <= 1e-5, "{what}: {a:?} vs {b:?}");
                    for (x, y) in a.token_logprobs.iter().zip(&b.token_logprobs) {
                        assert!((x - y).abs() <= 1e-5, "{what}: {a:?} vs {b:?}");
                    }
                }
            }
        }
        eprintln!("device beam step, run with host lse {host_lse}: every query as the twin");
    }
    // Bad input: an error value, before any launch.
    assert!(DeviceBeams::new(&g, &trie, vocab, &opts, &prompt_lens[..2]).is_err());
    assert!(DeviceBeams::new(&g, &trie, vocab - 1, &opts, &prompt_lens).is_err());
    let mut d = DeviceBeams::new(&g, &trie, vocab, &opts[..1], &prompt_lens[..1]).unwrap();
    assert!(d
        .outputs(&trie)
        .unwrap_err()
        .to_string()
        .contains("still running"));
    let short = d.upload(&[0.5; 7]).unwrap();
    assert!(d
        .step(&short, None)
        .unwrap_err()
        .to_string()
        .contains("logits"));
}
