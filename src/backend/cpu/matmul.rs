//! `out = x W^T (+ b)` for weights stored in f32, f16 or bf16, widened to f32 in registers, or in
//! ggml blocks (Q4_1, Q8_0), dequantized in registers.
//!
//! Shapes: `x: [T, K]` f32, `W: [N, K]` (HF layout, one output per row), `out: [T, N]`.
//! Work is split over the output dimension `N` (`cpu::team`); several weights that read the
//! same `x` are split together so q/k/v or gate/up share one parallel region.
//!
//! Two layouts of the weights, each kernel with a scalar twin that is the reference:
//! - **Panels** (`cpu::panels`, what the model's matrices carry on the CPU): 32 output
//!   features side by side, k-major. One kernel for every T: 2 × T accumulators (T token rows ×
//!   32 columns), the input broadcast, one FMA chain per output over k. At T = 1 it streams
//!   the weights once (memory bound: the bytes are what matter, and Q4_1 panels are a seventh
//!   of f32's); at T = 10 it is compute bound. Token rows go in near-equal groups of at most
//!   `simd::panel_tr`. One token row reads up to 4 panels side by side (`simd::gemv_panels`),
//!   for more independent chains; each output's chain, and so its bits, is the same.
//! - **Rows** (any `W` without panels: tests, tools, `GRAM_CPU_PANELS=0`): a GEMV
//!   for T = 1 that streams four weight rows at a time, and for T > 1 a register tile of
//!   `simd::tile_nr(isa)` weight rows × up to 6 token rows, summed across lanes at the end;
//!   ggml blocks are dequantized a few rows at a time into L1. bf16 weights are widened
//!   without shuffles against an even/odd split of `x` made once per call (`simd::Rows`).
//!
//! The sparse head ([`picks`]) computes single outputs as the panels do: one FMA chain each, so
//! its logits are the dense head's bits (without panels, where the row kernels sum across
//! lanes, they are not).

use super::simd::int16::QuantRows;
use super::simd::{self, Isa, Rows, GEMV_PANELS, PANEL, PANEL_TR, TILE_NR, TILE_TR};
use super::team;
use crate::tensor::View;

/// One weight applied to the shared input.
pub struct MatJob<'a> {
    pub w: View<'a>,
    /// `w` laid out in panels (`cpu::panels`): the many-row kernel reads these when given.
    pub panels: Option<View<'a>>,
    pub bias: Option<View<'a>>,
    /// Output features (rows of `w`).
    pub n: usize,
    /// `[T, n]`.
    pub out: &'a mut [f32],
}

/// Weight rows per GEMV step (T = 1).
const NR: usize = 4;

/// Passes over a block panel (groups of `simd::panel_tr` token rows) that dequantize it in
/// registers each time; past this many, [`range`] dequantizes it once into an f32 copy.
const COPY_AFTER_PASSES: usize = 4;

/// A raw pointer to an output buffer that tasks write in disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only columns `n0..n1` of its own job's output, and the task ranges
// are disjoint, so no element is written by two threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// How the many-row products read the token rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// As f32: every path gives the bits of the weights' f32 values.
    #[default]
    Exact,
    /// Q4_1 panels under the AVX-512 ISA on CPUs with VNNI: the rows quantized to i16 per
    /// block of 32 (`simd::int16`), the ten-row kernel about 1.75× as fast, within ~2e-5 of
    /// the output's scale. One row takes the same kernel (not the exact GEMV), so a row gives
    /// the same bits alone as in any batch. Everything else (other formats, other ISAs and
    /// CPUs) stays exact.
    Int16,
}

/// Computes every job. `x: [rows, k]`.
pub fn matmul(isa: Isa, x: &[f32], rows: usize, k: usize, jobs: &mut [MatJob]) {
    matmul_with(isa, x, rows, k, jobs, false, Activations::Exact)
}

/// [`matmul`] with the token rows read as `act` says.
pub fn matmul_act(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    jobs: &mut [MatJob],
    act: Activations,
) {
    matmul_with(isa, x, rows, k, jobs, false, act)
}

/// The SwiGLU MLP's first half: `jobs = [gate, up]` (the same `n`), then `gate.out =
/// silu(gate.out) * up.out` ([`simd::silu_mul`]); `up.out` is scratch. Each task computes the gate
/// and up columns of one range and multiplies them while they are in L1: no second parallel
/// pass over `[rows, n]`. The same values as [`matmul`] then [`simd::silu_mul`], bit for bit.
pub fn matmul_silu_mul(isa: Isa, x: &[f32], rows: usize, k: usize, jobs: &mut [MatJob; 2]) {
    matmul_silu_mul_act(isa, x, rows, k, jobs, Activations::Exact)
}

/// [`matmul_silu_mul`] with the token rows read as `act` says.
pub fn matmul_silu_mul_act(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    jobs: &mut [MatJob; 2],
    act: Activations,
) {
    assert!(
        jobs[0].n == jobs[1].n,
        "matmul_silu_mul: gate and up differ in width; this is a bug"
    );
    matmul_with(isa, x, rows, k, jobs, true, act)
}

/// [`matmul`], or with `glu` [`matmul_silu_mul`].
fn matmul_with(
    isa: Isa,
    x: &[f32],
    rows: usize,
    k: usize,
    jobs: &mut [MatJob],
    glu: bool,
    act: Activations,
) {
    assert!(
        simd::holds(x.len(), rows, k),
        "matmul: x holds {} values, needs {rows}×{k}; this is a bug",
        x.len()
    );
    for j in jobs.iter() {
        assert!(
            j.n.checked_mul(k) == Some(j.w.len()) && simd::holds(j.out.len(), rows, j.n),
            "matmul: job shape mismatch; this is a bug"
        );
    }
    for j in jobs.iter_mut() {
        if j.panels
            .is_some_and(|p| p.len() < j.n.next_multiple_of(PANEL) * k)
        {
            j.panels = None;
        }
    }
    // Under `glu`, tasks range over the gate's columns, each computing the up job's too.
    let split = if glu { &jobs[..1] } else { &jobs[..] };
    let total: usize = split.iter().map(|j| j.n).sum();
    let threads = team::threads().max(1);
    // About four tasks per thread for balance, in whole tiles (NR divides every tile height) or
    // whole panels, never tiny. One a thread for block weights at one row: each thread then
    // streams one run of panels, and the stored b1 decode gained 2-11 % (17 of 17 alternated
    // pairs, docs/PERF.md "One task a thread at one row"); f32 at one row and the many-row
    // shapes measured the same or slower that way.
    let unit = if jobs.iter().any(|j| j.panels.is_some()) {
        PANEL
    } else {
        NR
    };
    let per_thread = if rows == 1 && jobs.iter().all(|j| j.w.is_quantized()) {
        1
    } else {
        4
    };
    let chunk = (total.div_ceil(threads * per_thread))
        .next_multiple_of(unit)
        .max(16);
    let mut tasks = Vec::new();
    for (ji, j) in split.iter().enumerate() {
        let mut n0 = 0;
        while n0 < j.n {
            let n1 = (n0 + chunk).min(j.n);
            tasks.push((ji, n0, n1));
            n0 = n1;
        }
    }
    let outs: Vec<OutPtr> = jobs
        .iter_mut()
        .map(|j| OutPtr(j.out.as_mut_ptr()))
        .collect();
    // bf16 kernels read the input split into even/odd halves: made once, shared by all jobs.
    let block = jobs
        .iter()
        .filter(|j| j.panels.is_none())
        .find_map(|j| simd::pairs_block(isa, j.w))
        .unwrap_or(0);
    let pairs = if block > 0 {
        simd::bf16_pairs(&x[..rows * k], k, block)
    } else {
        Vec::new()
    };
    // Int16 rows for the Q4_1 panels: made once, shared by all jobs. Only where the VNNI
    // kernel runs (elsewhere its twin would: the same bits, far slower).
    let quant = (act == Activations::Int16
        && isa.runnable() == Isa::Avx512
        && simd::has_vnni()
        && jobs.iter().any(|j| matches!(j.panels, Some(View::Q4_1(_)))))
    .then(|| QuantRows::new(&x[..rows * k], rows, k));
    let quant = quant.as_ref();
    let x = Rows {
        x: &x[..rows * k],
        pairs: &pairs,
        block,
    };
    let jobs = &*jobs;
    let run = |&(ji, n0, n1): &(usize, usize, usize)| {
        range(isa, x, quant, rows, k, &jobs[ji], n0, n1, outs[ji]);
        if glu {
            range(isa, x, quant, rows, k, &jobs[1], n0, n1, outs[1]);
            let n = jobs[0].n;
            for t in 0..rows {
                // SAFETY: columns `n0..n1` of row `t` of both outputs (`rows * n` elements
                // each, checked above) belong to this task alone, and `gate.out` and `up.out`
                // are distinct buffers.
                let (g, u) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(outs[0].0.add(t * n + n0), n1 - n0),
                        std::slice::from_raw_parts(outs[1].0.add(t * n + n0), n1 - n0),
                    )
                };
                simd::silu_mul(isa, g, u);
            }
        }
    };
    // Under `glu` each task also computes the up job's columns: twice `total`'s work.
    let work = total * k * rows * if glu { 2 } else { 1 };
    if tasks.len() == 1 || work < 32 * 1024 {
        tasks.iter().for_each(run);
    } else {
        team::for_each(tasks.len(), |i| run(&tasks[i]));
    }
}

/// Output columns `n0..n1` of one job, for all rows. `quant`: the rows as i16, for Q4_1
/// panels (`Activations::Int16`).
#[allow(clippy::too_many_arguments)]
fn range(
    isa: Isa,
    x: Rows,
    quant: Option<&QuantRows>,
    rows: usize,
    k: usize,
    job: &MatJob,
    n0: usize,
    n1: usize,
    out: OutPtr,
) {
    let n = job.n;
    let store = |t: usize, col: usize, v: f32| {
        let b = job.bias.map_or(0.0, |b| b.get(col));
        // SAFETY: `col` is in this task's range `n0..n1`, `t < rows`, and `out` has `rows * n`
        // elements (checked in `matmul`), so the write is in bounds and not shared.
        unsafe { *out.0.add(t * n + col) = v + b };
    };
    if let Some(p) = job.panels {
        // Tasks split panel jobs at panel boundaries (`matmul`): a task never writes another's
        // columns.
        assert!(
            n0.is_multiple_of(PANEL),
            "panel task starts inside a panel; this is a bug"
        );
        // Biases are f32 vectors (`model::weights::load`); a widened copy otherwise.
        let widened: Vec<f32>;
        let bias: Option<&[f32]> = match job.bias {
            None => None,
            Some(View::F32(b)) => Some(b),
            Some(b) => {
                widened = (0..n).map(|i| b.get(i)).collect();
                Some(&widened)
            }
        };
        // Token rows in near-equal groups of at most `panel_tr`, each sweeping a whole panel
        // (`n0` is a multiple of PANEL: see `matmul`).
        // Block panels: dequantized in registers for up to `COPY_AFTER_PASSES` passes (a prompt
        // of up to 40 rows; faster than the copy, docs/PERF.md "Prompts without the f32
        // copy"); for more, once into an f32 copy that every pass reads. The same values, so
        // the same bits either way.
        let int16 = quant.filter(|_| matches!(p, View::Q4_1(_)));
        let copy =
            int16.is_none() && p.is_quantized() && rows > COPY_AFTER_PASSES * simd::panel_tr(p);
        let mut f32_panel = if copy {
            vec![0f32; PANEL * k]
        } else {
            Vec::new()
        };
        let write = |t: usize, cols: std::ops::Range<usize>, acc_t: &[f32]| {
            let acc_t = &acc_t[..cols.len()];
            // SAFETY: columns `cols` lie in this task's range `n0..n1`, `t < rows`, and `out`
            // has `rows * n` elements (checked in `matmul`): in bounds and written by this
            // task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.0.add(t * n + cols.start), cols.len())
            };
            match bias {
                Some(b) => {
                    for ((d, &a), &b) in dst.iter_mut().zip(acc_t).zip(&b[cols]) {
                        *d = a + b;
                    }
                }
                // A whole panel: a copy of known length, inlined (a `memmove` call per row
                // and panel was ~2 % of a ten-row step's samples).
                None if dst.len() == PANEL => {
                    let dst: &mut [f32; PANEL] = dst.try_into().expect("PANEL columns");
                    *dst = acc_t.try_into().expect("PANEL columns");
                }
                None => dst.copy_from_slice(acc_t),
            }
        };
        // Under int16 one row takes the many-row kernel below: its per-row sums do not depend
        // on the rows beside it, so a row alone and in a batch give the same bits.
        if rows == 1 && int16.is_none() {
            // One row: several panels side by side, for more FMA chains in flight.
            let mut acc = [[0f32; PANEL]; GEMV_PANELS];
            let (p0, p1) = (n0 / PANEL, n1.div_ceil(PANEL));
            let mut pi = p0;
            while pi < p1 {
                let np = (p1 - pi).min(GEMV_PANELS);
                let ps = p.slice(pi * PANEL * k..(pi + np) * PANEL * k);
                simd::gemv_panels(isa, ps, np, k, &x.x[..k], &mut acc);
                for (g, acc_g) in acc.iter().take(np).enumerate() {
                    let c0 = (pi + g) * PANEL;
                    write(0, c0..(c0 + PANEL).min(n1), acc_g);
                }
                pi += np;
            }
            return;
        }
        let groups = rows.div_ceil(if copy { PANEL_TR } else { simd::panel_tr(p) });
        let mut acc = [[0f32; PANEL]; PANEL_TR];
        for pi in n0 / PANEL..n1.div_ceil(PANEL) {
            let mut panel = p.slice(pi * PANEL * k..(pi + 1) * PANEL * k);
            if copy {
                super::panels::dequantize(isa, panel, k, &mut f32_panel);
                panel = View::F32(&f32_panel);
            }
            let cols = pi * PANEL..((pi + 1) * PANEL).min(n1);
            // A whole panel with no bias: the kernel writes the output rows itself.
            let direct = int16.is_none() && bias.is_none() && cols.len() == PANEL;
            let mut t = 0;
            for g in 0..groups {
                let tr = (rows - t) / (groups - g);
                let xs = &x.x[t * k..(t + tr) * k];
                if direct {
                    // SAFETY: token rows `t..t + tr` are below `rows` (the groups' `tr` add
                    // up to `rows`), the 32 columns `cols` lie in this task's `n0..n1`, within
                    // `0..n`, and `out` has `rows * n` elements (checked in `matmul`), a buffer
                    // apart from `x` and the weights: every write is in bounds, and these
                    // values are this task's alone.
                    unsafe {
                        simd::panel_into(isa, panel, k, xs, tr, out.0.add(t * n + cols.start), n)
                    };
                    t += tr;
                    continue;
                }
                match int16 {
                    Some(q) => simd::panel_q4_1_i16(isa, panel, k, q.group(t, tr), tr, &mut acc),
                    None => simd::panel(isa, panel, k, xs, tr, &mut acc),
                }
                for (i, acc_t) in acc.iter().take(tr).enumerate() {
                    write(t + i, cols.clone(), acc_t);
                }
                t += tr;
            }
        }
        return;
    }
    // ggml block weights: each panel of rows is dequantized into L1 once and read from there
    // by the f32 kernels, for every token group (the values are those of a load-time
    // dequantization, at a seventh of the bytes streamed).
    let mut panel = Vec::new();
    if rows == 1 {
        let mut col = n0;
        while col < n1 {
            let nr = (n1 - col).min(NR);
            let mut acc = [0f32; NR];
            let (w, row0) = rows_of(isa, job.w, col, nr, k, &mut panel);
            simd::dot_rows(isa, w, row0, nr, k, x, &mut acc);
            for (r, &a) in acc.iter().take(nr).enumerate() {
                store(0, col + r, a);
            }
            col += nr;
        }
        return;
    }
    // Token rows in near-equal groups of at most TILE_TR (10 rows → 5 + 5, not 6 + 4).
    let groups = rows.div_ceil(TILE_TR);
    let mut col = n0;
    while col < n1 {
        let nr = (n1 - col).min(simd::tile_nr(isa));
        let (w, row0) = rows_of(isa, job.w, col, nr, k, &mut panel);
        let mut t = 0;
        for g in 0..groups {
            let tr = (rows - t) / (groups - g);
            let mut acc = [[0f32; TILE_TR]; TILE_NR];
            simd::tile(isa, w, row0, nr, x.slice(t, t + tr, k), tr, k, &mut acc);
            for (r, row) in acc.iter().take(nr).enumerate() {
                for (i, &a) in row.iter().take(tr).enumerate() {
                    store(t + i, col + r, a);
                }
            }
            t += tr;
        }
        col += nr;
    }
}

/// Where the f32 kernels read weight rows `col..col + nr`: in place (`w` from row `col`), or,
/// for ggml blocks, from `panel` (from row 0) after dequantizing them there.
fn rows_of<'a>(
    isa: Isa,
    w: View<'a>,
    col: usize,
    nr: usize,
    k: usize,
    panel: &'a mut Vec<f32>,
) -> (View<'a>, usize) {
    if !w.is_quantized() {
        return (w, col);
    }
    panel.resize(nr * k, 0.0);
    simd::dequant_rows(isa, w, col, nr, k, panel);
    (View::F32(panel), 0)
}

/// The sparse head: `out[i] = x[r_i] · w[v_i]` for each pick `(r_i, v_i)`; `x: [R, k]`,
/// `w: [V, k]`. Each pick is one FMA chain over `k` in order (`simd::dot_chains`) on the
/// weights' f32 values: the bits the panel kernels give the same output whatever the rows
/// beside it, so that a logit is the same whether the step took the dense head or these picks
/// (a query's answer must not depend on the queries that share its steps).
pub fn picks(isa: Isa, x: &[f32], w: View, k: usize, picks: &[(u32, u32)]) -> Vec<f32> {
    let rows_in = x.len() / k.max(1);
    let vocab = w.len() / k.max(1);
    assert!(
        picks
            .iter()
            .all(|&(r, v)| (r as usize) < rows_in && (v as usize) < vocab),
        "picks outside x or w; this is a bug"
    );
    // Up to `CHAINS` picks at a time: their weight rows as f32 (in place, or widened into
    // `rows`), their chains side by side.
    let group = |picks: &[(u32, u32)], out: &mut [f32], rows: &mut Vec<f32>| {
        if let View::F32(wf) = w {
            let ws: Vec<&[f32]> = picks
                .iter()
                .map(|&(_, v)| &wf[v as usize * k..(v as usize + 1) * k])
                .collect();
            let xs: Vec<&[f32]> = picks
                .iter()
                .map(|&(r, _)| &x[r as usize * k..(r as usize + 1) * k])
                .collect();
            simd::dot_chains(isa, &ws, &xs, out);
            return;
        }
        rows.resize(picks.len() * k, 0.0);
        for (i, &(_, v)) in picks.iter().enumerate() {
            simd::dequant_rows(isa, w, v as usize, 1, k, &mut rows[i * k..(i + 1) * k]);
        }
        let ws: Vec<&[f32]> = rows.chunks_exact(k.max(1)).take(picks.len()).collect();
        let xs: Vec<&[f32]> = picks
            .iter()
            .map(|&(r, _)| &x[r as usize * k..(r as usize + 1) * k])
            .collect();
        simd::dot_chains(isa, &ws, &xs, out);
    };
    let run = |picks: &[(u32, u32)], out: &mut [f32]| {
        let mut rows = Vec::new();
        for (p, o) in picks.chunks(simd::CHAINS).zip(out.chunks_mut(simd::CHAINS)) {
            group(p, o, &mut rows);
        }
    };
    let mut out = vec![0f32; picks.len()];
    if k == 0 {
        return out;
    }
    // One pick reads k weights (a few KiB): worth both cores from a few dozen.
    if picks.len() >= 64 {
        team::for_each_chunk(&mut out, 32, |i, o| {
            run(&picks[32 * i..32 * i + o.len()], o)
        });
    } else {
        run(picks, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
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
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
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
}
