//! `CpuBackend`: the reference implementation of [`Backend`]. Buffers are `Vec<f32>`, weights
//! are host tensors (usually borrowed from the mapped checkpoint), work is split with `team`
//! over the output dimension (matmul) or over (row, head) pairs (attention). Each op is a plain
//! function a reader can check against the HF code line by line.

pub mod attention;
pub mod matmul;
pub mod panels;
pub mod simd;
pub mod team;

use std::sync::{Mutex, OnceLock};

use self::matmul::MatJob;
use self::simd::Isa;
use super::{AttnShape, Backend, KvRows, LinearRef, RowKv};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::rope::RopeTable;
use crate::tensor::HostTensor;

pub use self::attention::CpuKv;

/// Activation buffers handed back by forward passes, for the next one. A decode step allocates
/// a dozen buffers of up to megabytes; fresh ones cost a page fault and a kernel-zeroed page per
/// 4 KiB (8 % of a beam search's time before this pool).
static SPARE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// Spare buffers kept at most (a forward pass uses 12).
const MAX_SPARE: usize = 48;

/// The CPU backend. `isa` picks the SIMD kernels (detected, or forced for parity tests).
/// `bf16_operands` rounds the activation operand of every GEMM to bf16 first, as the CUDA
/// backend's cuBLAS GEMMs do: the GPU's numerics on the CPU, for parity tests.
/// `activations`: how the Q4_1 products read the token rows
/// ([`matmul::Activations`]); `Exact` unless `GRAM_INT16_ACTIVATIONS=1` (and the CPU has
/// AVX512-VNNI).
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    pub isa: Isa,
    pub bf16_operands: bool,
    pub activations: matmul::Activations,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            isa: Isa::detect(),
            bf16_operands: false,
            activations: default_activations(),
        }
    }
}

/// Whether the model's matrices get panels: yes unless `GRAM_CPU_PANELS=0` (then the many-row
/// matmul reads the rows, to compare; a bf16 row's bits then depend on its batch, `matmul.rs`).
/// Read once.
pub fn panels_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("GRAM_CPU_PANELS").as_deref() != Ok("0"))
}

/// `Int16` where `GRAM_INT16_ACTIVATIONS=1` and the CPU can run it, else `Exact`. Read once.
fn default_activations() -> matmul::Activations {
    static ACT: OnceLock<matmul::Activations> = OnceLock::new();
    *ACT.get_or_init(|| {
        if std::env::var("GRAM_INT16_ACTIVATIONS").is_ok_and(|v| v == "1") && simd::has_vnni() {
            matmul::Activations::Int16
        } else {
            matmul::Activations::Exact
        }
    })
}

impl CpuBackend {
    /// The CPU with the CUDA backend's GEMM rounding (see `bf16_operands`).
    pub fn gpu_numerics() -> Self {
        CpuBackend {
            bf16_operands: true,
            activations: matmul::Activations::Exact,
            ..CpuBackend::default()
        }
    }
}

impl CpuBackend {
    /// The activation operand of a GEMM: `x`, or under `bf16_operands` its bf16 rounding
    /// (kept in `rounded`).
    fn operand<'a>(&self, x: &'a [f32], rounded: &'a mut Vec<f32>) -> &'a [f32] {
        if !self.bf16_operands {
            return x;
        }
        *rounded = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        rounded
    }
}

/// The matmul job of one linear layer writing `out`.
fn mat_job<'a>(l: LinearRef<'a, HostTensor>, out: &'a mut [f32]) -> MatJob<'a> {
    MatJob {
        w: l.weight.view(),
        panels: l.weight.panels_view(),
        bias: l.bias.map(|b| b.view()),
        n: l.weight.shape()[0],
        out,
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = HostTensor;
    type Kv = CpuKv;

    fn name(&self) -> &'static str {
        // What runs: an ISA this CPU lacks falls back (a backend made for AVX-512 on an AVX2
        // CPU was labelled `cpu-avx512`).
        match self.isa.runnable() {
            Isa::Avx2 => "cpu-avx2",
            Isa::Avx512 => "cpu-avx512",
            Isa::Scalar => "cpu-scalar",
        }
    }

    fn numerics(&self) -> String {
        format!(
            "{}{}{}{}",
            self.name(),
            if self.bf16_operands {
                "-bf16-operands"
            } else {
                ""
            },
            match self.activations {
                // The int16 kernels run on AVX-512 (with VNNI, which `activations` checked)
                // only; elsewhere the products are exact.
                matmul::Activations::Int16 if self.isa.runnable() == Isa::Avx512 => {
                    // "2": one-row products int16 too (thirty-third session), other numbers
                    // than the first kind's, whose index shards a build must not take.
                    "-int16-activations-2"
                }
                _ => "",
            },
            // Without panels (`GRAM_CPU_PANELS=0`) the many-row products read the rows and sum
            // their lanes in another order: other last bits, which a build resumed under the
            // other setting took from its saved shards.
            if panels_on() { "" } else { "-rows" }
        )
    }

    fn upload(&self, tensor: HostTensor) -> Result<HostTensor> {
        Ok(tensor)
    }

    fn host_panels(&self, t: &HostTensor) -> Option<HostTensor> {
        if !panels_on() {
            return None;
        }
        match *t.shape() {
            [n, k] if n > 0 && k > 0 => Some(panels::pack(self.isa, t.view(), n, k)),
            _ => None,
        }
    }

    fn buf(&self, len: usize) -> Vec<f32> {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        // The smallest spare buffer that fits, zeroed to `len`.
        let fit = (0..spare.len())
            .filter(|&i| spare[i].capacity() >= len)
            .min_by_key(|&i| spare[i].capacity());
        match fit {
            Some(i) => {
                let mut v = spare.swap_remove(i);
                v.clear();
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    fn buf_from_host(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn recycle_host(&self, v: Vec<f32>) {
        self.recycle(v);
    }

    fn recycle(&self, buf: Vec<f32>) {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < MAX_SPARE {
            spare.push(buf);
        }
    }

    fn new_kv(&self, config: &ModelConfig, entries: usize) -> Result<CpuKv> {
        let bytes =
            (config.num_hidden_layers as u128) * entries as u128 * config.kv_dim() as u128 * 2 * 4;
        if entries == 0 || entries > u32::MAX as usize || bytes > (64u128 << 30) {
            return Err(Error::Input(format!(
                "a KV cache of {entries} entries is empty or over 64 GiB"
            )));
        }
        CpuKv::new(
            config.num_hidden_layers,
            entries,
            config.num_key_value_heads,
            config.head_dim,
        )
        .ok_or_else(|| {
            Error::Input(format!(
                "a KV cache of {entries} entries ({:.1} GiB) does not fit in this machine's memory",
                bytes as f64 / (1u64 << 30) as f64
            ))
        })
    }

    fn to_host(&self, x: Vec<f32>) -> Vec<f32> {
        x
    }

    fn embed(&self, table: &HostTensor, ids: &[u32], out: &mut Vec<f32>) {
        let c = table.shape()[1];
        let view = table.view();
        for (t, &id) in ids.iter().enumerate() {
            let start = id as usize * c;
            view.widen_into(start..start + c, &mut out[t * c..(t + 1) * c]);
        }
    }

    fn rmsnorm(&self, x: &Vec<f32>, weight: &HostTensor, eps: f32, dim: usize, out: &mut Vec<f32>) {
        // Norm weights are f32 (`model::weights::load`); a widened copy otherwise.
        let widened: Vec<f32>;
        let w: &[f32] = match weight.view() {
            crate::tensor::View::F32(w) => w,
            v => {
                widened = (0..dim).map(|i| v.get(i)).collect();
                &widened
            }
        };
        for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            simd::rmsnorm_row(self.isa, xr, &w[..dim], eps, or);
        }
    }

    fn add_rmsnorm(
        &self,
        x: &mut Vec<f32>,
        delta: &Vec<f32>,
        weight: &HostTensor,
        eps: f32,
        dim: usize,
        out: &mut Vec<f32>,
    ) {
        // One thread writes `out` after the team read it (simd::prefetch_write); the norm's
        // weights come back from memory. Both asked for before the residual add.
        simd::prefetch_write(out);
        if let crate::tensor::View::F32(w) = weight.view() {
            simd::prefetch_read(w);
        }
        self.add(x, delta);
        self.rmsnorm(x, weight, eps, dim, out);
    }

    fn rope_store(
        &self,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &Vec<f32>,
        kv: &mut CpuKv,
        layer: usize,
        shape: AttnShape,
        rows: &[RowKv],
        table: &RopeTable,
    ) {
        // q and k, written by the team's threads, turned in place by this one
        // (simd::prefetch_write).
        simd::prefetch_write(q);
        simd::prefetch_write(k);
        self.rope(q, shape.heads, rows, table);
        self.rope(k, shape.kv_heads, rows, table);
        self.kv_store(kv, layer, k, v, rows);
    }

    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>) {
        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        rows: usize,
        jobs: &mut [(LinearRef<'_, HostTensor>, &mut Vec<f32>)],
    ) {
        let k = jobs.first().map_or(0, |(l, _)| l.weight.shape()[1]);
        let mut rounded = Vec::new();
        let x = self.operand(x, &mut rounded);
        let mut mj: Vec<MatJob> = jobs.iter_mut().map(|(l, out)| mat_job(*l, out)).collect();
        matmul::matmul_act(self.isa, x, rows, k, &mut mj, self.activations);
    }

    fn gate_up_silu(
        &self,
        x: &Vec<f32>,
        rows: usize,
        gate: LinearRef<'_, HostTensor>,
        up: LinearRef<'_, HostTensor>,
        gate_out: &mut Vec<f32>,
        up_out: &mut Vec<f32>,
    ) {
        let k = gate.weight.shape()[1];
        let mut rounded = Vec::new();
        let x = self.operand(x, &mut rounded);
        let mut mj = [mat_job(gate, gate_out), mat_job(up, up_out)];
        matmul::matmul_silu_mul_act(self.isa, x, rows, k, &mut mj, self.activations);
    }

    fn rope(&self, x: &mut Vec<f32>, heads: usize, rows: &[RowKv], table: &RopeTable) {
        let half = table.half;
        let d = 2 * half;
        for (row, xr) in rows.iter().zip(x.chunks_exact_mut(heads * d)) {
            let pos = row.pos as usize;
            let cos = &table.cos[pos * half..(pos + 1) * half];
            let sin = &table.sin[pos * half..(pos + 1) * half];
            for head in xr.chunks_exact_mut(d) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) {
        // One exp per element: worth both cores from a few thousand elements. The MLP takes
        // `gate_up_silu`, which does this inside the matmul's tasks.
        if gate.len() >= 1 << 12 {
            const CHUNK: usize = 1 << 10;
            team::for_each_chunk(gate, CHUNK, |i, g| {
                simd::silu_mul(self.isa, g, &up[i * CHUNK..i * CHUNK + g.len()])
            });
        } else {
            simd::silu_mul(self.isa, gate, up);
        }
    }

    fn kv_store(&self, kv: &mut CpuKv, layer: usize, k: &Vec<f32>, v: &Vec<f32>, rows: &[RowKv]) {
        kv.store(layer, k, v, rows);
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        kv: &CpuKv,
        layer: usize,
        rows: KvRows<'_>,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) {
        attention::attention(self.isa, q, kv, layer, rows, shape, out);
    }

    fn gather_rows(&self, x: &Vec<f32>, dim: usize, rows: &[usize], out: &mut Vec<f32>) {
        for (i, &r) in rows.iter().enumerate() {
            out[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
    }

    fn linear_picks(&self, x: &Vec<f32>, w: &HostTensor, picks: &[(u32, u32)]) -> Vec<f32> {
        let (n, k) = (w.shape()[0], w.shape()[1]);
        // Under the opt-in int16 activations a Q4_1 matrix's dense product is the integer one
        // (`matmul::Activations::Int16`): the picks are read from it, so that they are its bits.
        let int16 = self.activations == matmul::Activations::Int16
            && w.panels_view().is_some()
            && matches!(w.view(), crate::tensor::View::Q4_1(_));
        if int16 && k > 0 {
            let rows = x.len() / k;
            let mut dense = vec![0f32; rows * n];
            let head = LinearRef {
                weight: w,
                bias: None,
            };
            self.linear(x, rows, &mut [(head, &mut dense)]);
            return picks
                .iter()
                .map(|&(r, v)| dense[r as usize * n + v as usize])
                .collect();
        }
        // The operand `linear` takes, so that a pick is the dense head's logit bit for bit.
        let mut rounded = Vec::new();
        let x = self.operand(x, &mut rounded);
        matmul::picks(self.isa, x, w.view(), k, picks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    /// The label an index build keys its saved shards by names what runs: the ISA the CPU
    /// runs (not the one asked for), the int16 products only where they run (AVX-512), and
    /// the row path when panels are off. Two backends computing other bits never share one.
    #[test]
    fn numerics_name_what_runs() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            let b = CpuBackend {
                isa,
                bf16_operands: false,
                activations: matmul::Activations::Int16,
            };
            let label = b.numerics();
            let ran = isa.runnable();
            assert!(
                label.starts_with(match ran {
                    Isa::Avx512 => "cpu-avx512",
                    Isa::Avx2 => "cpu-avx2",
                    Isa::Scalar => "cpu-scalar",
                }),
                "{isa:?} runs as {ran:?}: {label}"
            );
            assert_eq!(
                label.contains("-int16-activations"),
                ran == Isa::Avx512,
                "{isa:?}: {label}"
            );
            assert_eq!(label.ends_with("-rows"), !panels_on(), "{label}");
            // An ISA the CPU lacks is labelled as the one it falls back to.
            if ran != isa {
                assert_eq!(label, CpuBackend { isa: ran, ..b }.numerics());
            }
        }
    }

    /// The backend's sparse head against its dense head, through `Backend` as the model calls
    /// them: every pick is its dense logit's bits with exact activations, with bf16 operands,
    /// and under the opt-in int16 activations (a Q4_1 head, whose dense rows are integer
    /// products there), at one row and at ten.
    #[test]
    fn linear_picks_equal_linear_bit_for_bit() {
        let (n, k) = (70, 96);
        let mut next = crate::test_rng::xorshift(0x6c62_272e_07bb_0142);
        let mut blocks = vec![0u8; n * k / 32 * 20];
        for b in blocks.chunks_exact_mut(20) {
            let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-4);
            let m = half::f16::from_f32((next() % 2000) as f32 * 1e-4 - 0.1);
            b[..2].copy_from_slice(&d.to_le_bytes());
            b[2..4].copy_from_slice(&m.to_le_bytes());
            b[4..].iter_mut().for_each(|q| *q = next() as u8);
        }
        let isa = Isa::detect();
        let plain = HostTensor::from_blocks(blocks, DType::Q4_1, vec![n, k]);
        let panels = panels::pack(isa, plain.view(), n, k);
        let w = plain.with_panels(Some(panels));
        for (bf16_operands, activations) in [
            (false, matmul::Activations::Exact),
            (true, matmul::Activations::Exact),
            (false, matmul::Activations::Int16),
        ] {
            let b = CpuBackend {
                isa,
                bf16_operands,
                activations,
            };
            for rows in [1, 10] {
                let x: Vec<f32> = (0..rows * k)
                    .map(|_| crate::test_rng::signed_unit(next()))
                    .collect();
                let mut dense = vec![0f32; rows * n];
                let head = LinearRef {
                    weight: &w,
                    bias: None,
                };
                b.linear(&x, rows, &mut [(head, &mut dense)]);
                let all: Vec<(u32, u32)> = (0..rows as u32)
                    .flat_map(|r| (0..n as u32).map(move |v| (r, v)))
                    .collect();
                let got = b.linear_picks(&x, &w, &all);
                for (&(r, v), g) in all.iter().zip(&got) {
                    let want = dense[r as usize * n + v as usize];
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{activations:?} bf16 operands {bf16_operands} rows {rows} ({r}, {v})"
                    );
                }
                // A row's picks alone are its picks in the batch (under int16 the picks are
                // read from the dense rows, so the comparison above checks only the indexing;
                // this one checks that a row's products do not depend on the others).
                let one: Vec<(u32, u32)> = (0..n as u32).map(|v| (0, v)).collect();
                for r in [0, rows / 2, rows - 1] {
                    let alone = b.linear_picks(&x[r * k..(r + 1) * k].to_vec(), &w, &one);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&alone),
                        bits(&got[r * n..(r + 1) * n]),
                        "{activations:?} bf16 operands {bf16_operands} rows {rows}: row {r} alone"
                    );
                }
            }
        }
    }
}
