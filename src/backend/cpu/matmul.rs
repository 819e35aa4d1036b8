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
//!   Here, unlike panels, bf16 outputs at T = 1 and T > 1 may differ in their last bits (the
//!   GEMV sums the even and odd halves in two chains, the tile in one): a row's bits depend on
//!   its batch only on this path, which the model's matrices take only under
//!   `GRAM_CPU_PANELS=0`.
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
// SAFETY: every task writes only columns `n0..n1` of its own job's output (under `glu` also
// columns `n0..n1` of the up job's, which it reads back: the two jobs have one width, and the
// tasks cover the gate job's columns), and the task ranges are disjoint, so no element is
// written by two threads.
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
        let row = |i: usize| i * k..(i + 1) * k;
        let ws: Vec<&[f32]> = match w {
            View::F32(wf) => picks.iter().map(|&(_, v)| &wf[row(v as usize)]).collect(),
            _ => {
                rows.resize(picks.len() * k, 0.0);
                for (i, &(_, v)) in picks.iter().enumerate() {
                    simd::dequant_rows(isa, w, v as usize, 1, k, &mut rows[row(i)]);
                }
                rows.chunks_exact(k).take(picks.len()).collect()
            }
        };
        let xs: Vec<&[f32]> = picks.iter().map(|&(r, _)| &x[row(r as usize)]).collect();
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
mod tests;
