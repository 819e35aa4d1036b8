//! The one narrow interface the forward pass runs on. It lists only the ops the decoder uses;
//! the CPU backend (`cpu/`) is the reference, and a CUDA backend implements the same trait with
//! device buffers. Shapes use the short names of ARCHITECTURE.md: `T` rows (tokens) in a batch,
//! `C` hidden size, `H`/`Hkv` query/KV heads, `D` head dim, `V` vocab.

pub mod cpu;
pub mod cuda;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::rope::RopeTable;
use crate::tensor::HostTensor;

/// Which backend a command runs on (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Device {
    /// The CPU backend (the reference).
    Cpu,
    /// The CUDA backend on GPU 0; an error where there is none.
    Cuda,
    /// CUDA when a usable GPU is present, else the CPU (the log says which).
    #[default]
    Auto,
}

/// A linear layer `y = x W^T + b`, `W: [N, K]` as HF stores it.
pub struct Linear<W> {
    pub weight: W,
    pub bias: Option<W>,
}

impl<W> Linear<W> {
    pub fn as_ref(&self) -> LinearRef<'_, W> {
        LinearRef {
            weight: &self.weight,
            bias: self.bias.as_ref(),
        }
    }
}

/// A borrowed [`Linear`] (the tied LM head borrows the embedding).
pub struct LinearRef<'a, W> {
    pub weight: &'a W,
    pub bias: Option<&'a W>,
}

// Copy for any W (a derive would ask W: Copy): it holds references only.
impl<W> Clone for LinearRef<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for LinearRef<'_, W> {}

/// One row of a batch as the KV cache sees it. The cache is an arena of entries (one token's K
/// and V, every layer); a row writes its K/V to `entry` and attends to the entries
/// `span.0..span.1` (contiguous: a prompt, or a whole sequence) followed by
/// `links[link.0..link.1]` of its [`KvRows`] (scattered: a beam's own code tokens, oldest first).
/// Its own entry is the last one of that context. `pos` is the token's rotary position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowKv {
    pub pos: u32,
    pub entry: u32,
    pub span: (u32, u32),
    pub link: (u32, u32),
}

impl RowKv {
    /// A row of a plain sequence stored contiguously from entry `base`: position `pos`
    /// attends to `base..=base + pos`.
    pub fn contiguous(base: u32, pos: u32) -> RowKv {
        RowKv {
            pos,
            entry: base + pos,
            span: (base, base + pos + 1),
            link: (0, 0),
        }
    }

    /// Number of entries the row attends to.
    pub fn context_len(&self) -> usize {
        // Each length in `u32`, their sum in `usize` (the sum alone can pass `u32::MAX`).
        (self.span.1 - self.span.0) as usize + (self.link.1 - self.link.0) as usize
    }

    /// This row is the position after `prev` in the same sequence: same span start and link
    /// start, one more entry of context, and what `prev` reads is a prefix of what it reads
    /// (a prompt's consecutive rows; a device backend tiles them together).
    pub fn follows(&self, prev: &RowKv) -> bool {
        let (a, b) = (prev, self);
        let a_links = a.link.1.saturating_sub(a.link.0);
        let b_links = b.link.1.saturating_sub(b.link.0);
        if b.span.0 != a.span.0 || b.context_len() != a.context_len() + 1 {
            return false;
        }
        if a_links == 0 && b_links == 0 {
            return b.span.1 == a.span.1 + 1;
        }
        b.span == a.span && b.link.0 == a.link.0 && b.link.1 == a.link.1 + 1
    }
}

/// The rows of a batch and the link table their scattered contexts index into.
#[derive(Debug, Clone, Copy)]
pub struct KvRows<'a> {
    pub rows: &'a [RowKv],
    pub links: &'a [u32],
}

impl<'a> KvRows<'a> {
    /// The `i`-th entry `row` attends to.
    #[inline]
    pub fn context(&self, row: &RowKv) -> impl Iterator<Item = usize> + 'a {
        let links = &self.links[row.link.0 as usize..row.link.1 as usize];
        (row.span.0..row.span.1)
            .map(|e| e as usize)
            .chain(links.iter().map(|&e| e as usize))
    }
}

/// Attention geometry of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// The score scale: HF's `head_dim ** -0.5`, a Python float (f64) that multiplies f32
    /// scores, so rounded once to f32. `1 / sqrt(d)` in f32 rounds twice and is 1 ulp off for
    /// some head sizes (96, 112).
    pub fn scale(&self) -> f32 {
        (self.head_dim as f64).powf(-0.5) as f32
    }
}

/// The ops of a decoder forward pass. Activation buffers are f32, row-major.
pub trait Backend: Send + Sync {
    /// An activation buffer (host `Vec<f32>` on the CPU, device memory on a GPU).
    type Buf: Send;
    /// A weight tensor as this backend keeps it.
    type Weight: Send + Sync;
    /// The KV cache: an arena of entries, every layer (see [`RowKv`]).
    type Kv: Send;

    fn name(&self) -> &'static str;
    /// What decides this backend's numbers beyond its name (the CPU's optional bf16 operands
    /// and int16 activations), so that a saved build shard made with other numerics is not
    /// taken.
    fn numerics(&self) -> String {
        self.name().to_string()
    }
    /// Takes a host weight (mapped or owned) into the backend's storage.
    fn upload(&self, tensor: HostTensor) -> Result<Self::Weight>;
    /// A host-side re-layout of matrix `tensor` that this backend's kernels read, made at load
    /// before [`Backend::upload`] (the CPU's panels for its many-row matmul); default none.
    fn host_panels(&self, tensor: &HostTensor) -> Option<HostTensor> {
        let _ = tensor;
        None
    }
    /// A buffer of `len` f32 whose contents are unspecified until written.
    fn buf(&self, len: usize) -> Self::Buf;
    /// A buffer holding `data` (tests and tools; the forward pass makes its own).
    fn buf_from_host(&self, data: &[f32]) -> Self::Buf;
    /// A KV arena of `entries` tokens.
    fn new_kv(&self, config: &ModelConfig, entries: usize) -> Result<Self::Kv>;
    /// Hands a buffer back for a later [`Backend::buf`] to reuse (default: drops it).
    fn recycle(&self, buf: Self::Buf) {
        drop(buf);
    }
    /// Hands back a host vector that [`Backend::to_host`] returned, once read (default: drops
    /// it; the CPU backend reuses it as a buffer).
    fn recycle_host(&self, v: Vec<f32>) {
        drop(v);
    }
    /// The buffer's contents on the host (consumes it: no copy where it already is there).
    fn to_host(&self, x: Self::Buf) -> Vec<f32>;

    /// `out[t] = table[ids[t]]`; `table: [V, C]`, `out: [T, C]`.
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf);
    /// `out[r] = x[r] / rms(x[r]) * weight` over rows of width `dim`.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        weight: &Self::Weight,
        eps: f32,
        dim: usize,
        out: &mut Self::Buf,
    );
    /// `acc += x`.
    fn add(&self, acc: &mut Self::Buf, x: &Self::Buf);
    /// `x += delta; out = rmsnorm(x) * weight` (the residual add fused into the next norm).
    fn add_rmsnorm(
        &self,
        x: &mut Self::Buf,
        delta: &Self::Buf,
        weight: &Self::Weight,
        eps: f32,
        dim: usize,
        out: &mut Self::Buf,
    ) {
        self.add(x, delta);
        self.rmsnorm(x, weight, eps, dim, out);
    }
    /// For each `(layer, out)`: `out = x W^T + b`, `x: [T, K]`, `out: [T, N]`. Several layers
    /// that read the same `x` (q/k/v, gate/up) go in one call so they share one parallel region.
    fn linear(
        &self,
        x: &Self::Buf,
        rows: usize,
        jobs: &mut [(LinearRef<'_, Self::Weight>, &mut Self::Buf)],
    );
    /// Rotates each head of `x: [T, heads * D]` by its row's position (HF rotate-half layout).
    fn rope(&self, x: &mut Self::Buf, heads: usize, rows: &[RowKv], table: &RopeTable);
    /// Rotary positions on q (`shape.heads` heads) and k (`shape.kv_heads`), then k and v
    /// into `layer` of the cache: [`Backend::rope`] twice and [`Backend::kv_store`], fused
    /// where the backend can.
    #[allow(clippy::too_many_arguments)]
    fn rope_store(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        kv: &mut Self::Kv,
        layer: usize,
        shape: AttnShape,
        rows: &[RowKv],
        table: &RopeTable,
    ) {
        self.rope(q, shape.heads, rows, table);
        self.rope(k, shape.kv_heads, rows, table);
        self.kv_store(kv, layer, k, v, rows);
    }
    /// The attention block's input half: `q, k, v = x W^T (+ b)` for the three projections
    /// `qkv`, then [`Backend::rope_store`]: `q: [T, H * D]` gets the rotated queries, k and v
    /// go into the cache; `k` and `v` are scratch (unspecified afterwards). The default is
    /// [`Backend::linear`] of the three, then `rope_store`; the CUDA backend runs the three
    /// products as one GEMM over the concatenated weight, and the rotation reads its output.
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_store(
        &self,
        x: &Self::Buf,
        qkv: [LinearRef<'_, Self::Weight>; 3],
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &mut Self::Buf,
        kv: &mut Self::Kv,
        layer: usize,
        shape: AttnShape,
        rows: &[RowKv],
        table: &RopeTable,
    ) {
        let [qp, kp, vp] = qkv;
        self.linear(
            x,
            rows.len(),
            &mut [(qp, &mut *q), (kp, &mut *k), (vp, &mut *v)],
        );
        self.rope_store(q, k, v, kv, layer, shape, rows, table);
    }
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Buf, up: &Self::Buf);
    /// The SwiGLU MLP's first half: `gate_out = silu(x Wg^T) * (x Wu^T)`, `x: [T, K]`, both
    /// outputs `[T, N]`; `up_out` is scratch (what it holds afterwards is unspecified). The
    /// default is [`Backend::linear`] of both, then [`Backend::silu_mul`]; the CPU backend
    /// multiplies each task's own columns in the matmul (`matmul_silu_mul`), the CUDA backend
    /// runs both products as one batched GEMM.
    fn gate_up_silu(
        &self,
        x: &Self::Buf,
        rows: usize,
        gate: LinearRef<'_, Self::Weight>,
        up: LinearRef<'_, Self::Weight>,
        gate_out: &mut Self::Buf,
        up_out: &mut Self::Buf,
    ) {
        self.linear(x, rows, &mut [(gate, &mut *gate_out), (up, &mut *up_out)]);
        self.silu_mul(gate_out, up_out);
    }
    /// Writes this batch's K and V (`[T, Hkv * D]`) into `layer` of the cache at each row's
    /// entry.
    fn kv_store(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        rows: &[RowKv],
    );
    /// GQA attention: row `t` attends to the entries of its context ([`KvRows::context`]).
    /// `q: [T, H * D]` → `out: [T, H * D]`.
    fn attention(
        &self,
        q: &Self::Buf,
        kv: &Self::Kv,
        layer: usize,
        rows: KvRows<'_>,
        shape: AttnShape,
        out: &mut Self::Buf,
    );
    /// `out[i] = x[rows[i]]` for rows of width `dim`.
    fn gather_rows(&self, x: &Self::Buf, dim: usize, rows: &[usize], out: &mut Self::Buf);
    /// The sparse LM head: `out[i] = x[r_i] · W[v_i]` for each pick `(r_i, v_i)`; `x: [R, C]`,
    /// `W: [V, C]`. Evaluates only the vocabulary rows a trie allows.
    fn linear_picks(&self, x: &Self::Buf, w: &Self::Weight, picks: &[(u32, u32)]) -> Vec<f32>;

    /// The full-vocabulary head without the logits leaving the backend: for `x: [R, C]`, the
    /// logits of each pick `(r, v)` and the log-sum-exp of each of the `R` rows (full
    /// normalization of a trie-constrained step). The default computes the logits, copies
    /// them to the host and reduces there (what the CPU does anyway).
    fn head_picks_lse(
        &self,
        x: &Self::Buf,
        rows: usize,
        head: LinearRef<'_, Self::Weight>,
        vocab: usize,
        picks: &[(u32, u32)],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut logits = self.buf(rows * vocab);
        self.linear(x, rows, &mut [(head, &mut logits)]);
        let logits = self.to_host(logits);
        // The rows of a beam step on every core of the pass's pool instead of one (22 µs a
        // row at V = 49152); each row's sum is the same.
        let mut lse = vec![0f32; rows];
        cpu::team::for_each_chunk(&mut lse, 1, |r, l| {
            l[0] = crate::beam::select::logsumexp(&logits[r * vocab..(r + 1) * vocab])
        });
        let picked = picks
            .iter()
            .map(|&(r, v)| logits[r as usize * vocab + v as usize])
            .collect();
        self.recycle_host(logits);
        (picked, lse)
    }

    /// The first error an op met since the last call (device backends record launch failures
    /// here, since ops return nothing); the model calls it after every forward pass.
    fn check(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `f`, one decoder pass (the model's body, from the embedding to the final norm),
    /// the backend's best way: the CUDA backend replays it as a CUDA graph when its shape was
    /// seen before, and may call `f` more than once (a plan walk, a capture); `f` must issue
    /// the same ops each time. `shape` is a hash of what decides the pass's launches apart
    /// from its data (rows, spans), equal for the steps of a stable batch: a backend may run a
    /// pass of a shape it has not seen before without preparing a graph. The default calls
    /// `f` once.
    fn run_pass<T>(&self, shape: u64, f: &mut dyn FnMut() -> T) -> T {
        let _ = shape;
        f()
    }

    /// Up to how many rows a beam-search step keeps every query's decode rows at its full beam
    /// width (rows for beams that fell out of the running repeat a running one and are
    /// ignored), so that a batch keeps one pass shape from step to step: worth it where a pass
    /// of a new shape costs more than its extra rows (the CUDA backend's graphs, while a pass
    /// is latency-bound). The default, 0: never.
    fn stable_beam_rows(&self) -> usize {
        0
    }

    /// A batch admitted at once, with stable rows on, also keeps running its finished queries'
    /// last rows ([`crate::beam::Batcher::set_hold_finished`]: one pass shape for the whole
    /// batch) while all its queries' beam slots come to at most this many rows. The default,
    /// 0: never.
    fn hold_finished_rows(&self) -> usize {
        0
    }

    /// Runs `f`, a whole forward pass (body and head), alone: the CUDA backend's passes share
    /// state (slots, graphs) that the head still reads after the body's pass. The default
    /// calls it.
    fn run_forward<T>(&self, f: &mut dyn FnMut() -> T) -> T {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::AttnShape;

    /// Bits of `numpy.float32(d ** -0.5)` (Python's `head_dim**-0.5`, rounded once to f32).
    #[test]
    fn score_scale_is_hfs_rounded_once() {
        for (d, bits) in [
            (64, 0x3e00_0000u32),
            (80, 0x3de4_f92e),
            (96, 0x3dd1_05ec),
            (112, 0x3dc1_848f),
            (128, 0x3db5_04f3),
        ] {
            let s = AttnShape {
                heads: 1,
                kv_heads: 1,
                head_dim: d,
            };
            assert_eq!(s.scale().to_bits(), bits, "head_dim {d}");
        }
    }
}
