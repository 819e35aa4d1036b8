//! The [`Backend`] ops of [`CudaBackend`]: each op is one or two launches (or a cuBLAS GEMM)
//! through [`CudaBackend::launch`], so a decoder pass can be planned, captured and replayed
//! (`graph.rs`). The machinery they share (uploads, casts, GEMMs, attention plans, read-backs)
//! is in `mod.rs` (attention launches: `attention.rs`).

use std::sync::atomic::Ordering;

use cudarc::driver::CudaSlice;

use super::graph::KArg;
use super::*;
use crate::backend::{AttnShape, Backend, KvRows, LinearRef, RowKv};

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type Kv = CudaKv;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload(&self, tensor: HostTensor) -> Result<CudaWeight> {
        // bf16 on the device: a bf16 tensor (mapped) is copied as it is, others converted.
        let tensor = tensor.into_dtype(crate::tensor::DType::BF16);
        let View::BF16(values) = tensor.view() else {
            return Err(Error::Device(format!(
                "a {:?} weight did not convert to bf16",
                tensor.shape()
            )));
        };
        let bits: &[u16] = bytemuck::cast_slice(values);
        self.ctx
            .bind_to_thread()
            .map_err(dev("binding the context"))?;
        let data = self
            .stream
            .clone_htod(bits)
            .map_err(dev(&format!("uploading a {:?} weight", tensor.shape())))?;
        self.weight_bytes
            .fetch_add(bits.len() * 2, Ordering::Relaxed);
        Ok(CudaWeight::new(data, tensor.shape().to_vec()))
    }

    fn buf(&self, len: usize) -> CudaBuf {
        if let Some(b) = self.pass_buf(len) {
            return b;
        }
        let cap = len.max(256).next_power_of_two();
        if let Some(data) = lock(&self.pool).get_mut(&cap).and_then(|v| v.pop()) {
            return CudaBuf {
                mem: BufMem::Owned(data),
                len,
            };
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the contents are unspecified until written, as the trait says.
        match unsafe { self.stream.alloc::<f32>(cap) } {
            Ok(data) => CudaBuf {
                mem: BufMem::Owned(data),
                len,
            },
            Err(e) => {
                // Out of memory: record it; later ops are skipped and `check` reports it.
                self.run("alloc", || {
                    Err(Error::Device(format!("allocating {cap} floats: {e:?}")))
                });
                CudaBuf {
                    mem: BufMem::Pass { ptr: 0 },
                    len: 0,
                }
            }
        }
    }

    fn buf_from_host(&self, data: &[f32]) -> CudaBuf {
        let b = self.buf(data.len());
        if b.len == data.len() && !data.is_empty() {
            let dst = self.bptr(&b);
            self.run("buf_from_host", || {
                // SAFETY: `dst` holds at least data.len() floats.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(dst, data, self.stream.cu_stream())
                }
                .map_err(dev("copying to the device"))?;
                self.synchronize()
            });
        }
        b
    }

    fn recycle(&self, buf: CudaBuf) {
        if let BufMem::Owned(data) = buf.mem {
            let cap = data.len();
            let mut pool = lock(&self.pool);
            let v = pool.entry(cap).or_default();
            if v.len() < 16 {
                v.push(data);
            }
        }
    }

    fn new_kv(&self, config: &ModelConfig, entries: usize) -> Result<CudaKv> {
        if !HEAD_DIMS.contains(&config.head_dim) {
            return Err(Error::Device(format!(
                "head dim {}: the CUDA attention kernels are built for {HEAD_DIMS:?}",
                config.head_dim
            )));
        }
        let n = config.num_hidden_layers as u128 * entries as u128 * config.kv_dim() as u128;
        if entries == 0 || entries > u32::MAX as usize || n * 8 > (64u128 << 30) {
            return Err(Error::Input(format!(
                "a KV cache of {entries} entries is empty or over 64 GiB"
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(dev("binding the context"))?;
        let k = self
            .stream
            .alloc_zeros::<f32>(n as usize)
            .map_err(dev("allocating the KV arena"))?;
        let v = self
            .stream
            .alloc_zeros::<f32>(n as usize)
            .map_err(dev("allocating the KV arena"))?;
        Ok(CudaKv {
            k,
            v,
            entries,
            kv_dim: config.kv_dim(),
        })
    }

    fn check(&self) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(Error::Device(e)),
            None => Ok(()),
        }
    }

    fn run_pass<T>(&self, shape: u64, f: &mut dyn FnMut() -> T) -> T {
        self.pass(shape, f)
    }

    fn stable_beam_rows(&self) -> usize {
        self.stable_beam_rows
    }

    fn hold_finished_rows(&self) -> usize {
        self.hold_finished_rows
    }

    fn run_forward<T>(&self, f: &mut dyn FnMut() -> T) -> T {
        let _one = lock(&self.forward_lock);
        f()
    }

    fn to_host(&self, x: CudaBuf) -> Vec<f32> {
        let mut out = vec![0.0f32; x.len];
        let src = self.bptr(&x);
        self.run("to_host", || self.read_back(src, &mut out));
        self.recycle(x);
        out
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaBuf) {
        self.run("embed", || {
            let (vocab, dim) = (table.shape[0] as u32, table.shape[1] as u32);
            let idp = self.upload(&mut lock(&self.scratch), Slot::Ids, ids)?;
            let n = ids.len() as u32;
            self.launch(
                "embed_f32",
                (n, 1, 1),
                128,
                &[
                    KArg::U64(self.ptr(&table.data)),
                    KArg::U64(idp),
                    KArg::U64(self.bptr(out)),
                    KArg::U32(n),
                    KArg::U32(vocab),
                    KArg::U32(dim),
                ],
            )
        });
    }

    fn rmsnorm(&self, x: &CudaBuf, weight: &CudaWeight, eps: f32, dim: usize, out: &mut CudaBuf) {
        // No delta: x is only read.
        self.run("rmsnorm", || {
            self.rmsnorm_launch(x, 0, weight, eps, dim, out)
        });
    }

    fn add(&self, acc: &mut CudaBuf, x: &CudaBuf) {
        self.in_place("add", "add_f32", acc, x);
    }

    fn add_rmsnorm(
        &self,
        x: &mut CudaBuf,
        delta: &CudaBuf,
        weight: &CudaWeight,
        eps: f32,
        dim: usize,
        out: &mut CudaBuf,
    ) {
        // x += delta (written back), out = norm(x): one launch.
        let dp = self.bptr(delta);
        self.run("add_rmsnorm", || {
            self.rmsnorm_launch(x, dp, weight, eps, dim, out)
        });
    }

    fn linear(
        &self,
        x: &CudaBuf,
        rows: usize,
        jobs: &mut [(LinearRef<'_, CudaWeight>, &mut CudaBuf)],
    ) {
        self.run("linear", || {
            let Some(k) = jobs.first().map(|(l, _)| l.weight.shape[1]) else {
                return Ok(());
            };
            if rows <= SMALL_ROWS && k % 8 == 0 && self.small_gemm_on.load(Ordering::Relaxed) {
                for (l, out) in jobs.iter_mut() {
                    let n = l.weight.shape[0];
                    self.launch(
                        "linear_small_f32",
                        (n.div_ceil(8) as u32, 1, 1),
                        256,
                        &[
                            KArg::U64(self.bptr(x)),
                            KArg::U64(self.ptr(&l.weight.data)),
                            KArg::U64(l.bias.map_or(0, |b| self.ptr(&b.data))),
                            KArg::U64(self.bptr(out)),
                            KArg::U32(rows as u32),
                            KArg::U32(n as u32),
                            KArg::U32(k as u32),
                        ],
                    )?;
                }
                return Ok(());
            }
            let xb = self.cast_bf16(&mut lock(&self.scratch), x, rows * k)?;
            for (l, out) in jobs.iter_mut() {
                self.gemm(xb, rows, l.weight, l.bias, self.bptr(out))?;
            }
            Ok(())
        });
    }

    fn qkv_rope_store(
        &self,
        x: &CudaBuf,
        qkv: [LinearRef<'_, CudaWeight>; 3],
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &mut CudaBuf,
        kv: &mut CudaKv,
        layer: usize,
        shape: AttnShape,
        rows: &[RowKv],
        table: &RopeTable,
    ) {
        let t = rows.len();
        let small = t <= SMALL_ROWS && self.small_gemm_on.load(Ordering::Relaxed);
        let (q_dim, kv_dim) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        // The rotation finds q, k and v at these column offsets of the packed output.
        let fused = if small { None } else { self.fused_qkv(qkv) }
            .filter(|f| f.w.shape[0] == q_dim + 2 * kv_dim && qkv[0].weight.shape[0] == q_dim);
        let Some(f) = fused else {
            let [qp, kp, vp] = qkv;
            self.linear(x, t, &mut [(qp, &mut *q), (kp, &mut *k), (vp, &mut *v)]);
            self.rope_store(q, k, v, kv, layer, shape, rows, table);
            return;
        };
        let (kdim, ntot) = (f.w.shape[1], f.w.shape[0]);
        // One GEMM into [T, q_dim + 2 kv_dim]; the rotation reads q, k, v out of it, writes
        // the rotated q into `q` and k, v into the cache.
        let packed = self.buf(t * ntot);
        self.run("qkv_rope_store", || {
            let mut s = lock(&self.scratch);
            let xb = self.cast_bf16(&mut s, x, t * kdim)?;
            let pp = self.bptr(&packed);
            self.gemm(xb, t, &f.w, f.bias.as_ref(), pp)?;
            let rows_p = self.upload_rows(&mut s, rows)?;
            let (cos, sin, max_pos) = self.rope_table(&mut s, table)?;
            drop(s);
            let off = (layer * kv.entries * kv.kv_dim * 4) as u64;
            let p = RopeParams {
                q: pp,
                k: pp + q_dim as u64 * 4,
                v: pp + (q_dim + kv_dim) as u64 * 4,
                q_out: self.bptr(q),
                row_stride: ntot as u32,
                rows: rows_p,
                cos,
                sin,
                k_cache: self.ptr(&kv.k) + off,
                v_cache: self.ptr(&kv.v) + off,
                n_rows: t as u32,
                heads: shape.heads as u32,
                kv_heads: shape.kv_heads as u32,
                head_dim: (2 * table.half) as u32,
                max_pos: max_pos as u32,
                entries: kv.entries as u32,
                ..Default::default()
            };
            let warps = t as u32 * (shape.heads + shape.kv_heads) as u32;
            self.launch(
                "rope_f32",
                (warps.div_ceil(4), 1, 1),
                128,
                &[KArg::Rope(&p)],
            )
        });
        self.recycle(packed);
    }

    fn gate_up_silu(
        &self,
        x: &CudaBuf,
        rows: usize,
        gate: LinearRef<'_, CudaWeight>,
        up: LinearRef<'_, CudaWeight>,
        gate_out: &mut CudaBuf,
        up_out: &mut CudaBuf,
    ) {
        let (n, k) = (gate.weight.shape[0], gate.weight.shape[1]);
        let small = rows <= SMALL_ROWS && self.small_gemm_on.load(Ordering::Relaxed);
        if small || gate.bias.is_some() || up.bias.is_some() || up.weight.shape != gate.weight.shape
        {
            self.linear(x, rows, &mut [(gate, &mut *gate_out), (up, &mut *up_out)]);
            self.silu_mul(gate_out, up_out);
            return;
        }
        if self.rows_gemm(rows, k) {
            // Few rows: one launch computes both products and the SwiGLU.
            self.run("gate_up_silu", || {
                let mut s = lock(&self.scratch);
                let xb = self.cast_bf16(&mut s, x, rows * k)?;
                // The launch reads xb (or a shadow in xb2): its own shadow goes to the other.
                let second = xb == self.xb_buf(&mut s, 0, false)?;
                let out_b = self.shadow_into(&mut s, gate_out, rows * n, second)?;
                drop(s);
                self.rows_gemm_launch(
                    xb,
                    rows,
                    (gate.weight, Some(up.weight)),
                    None,
                    self.bptr(gate_out),
                    out_b,
                )
            });
            return;
        }
        // Both products in one strided-batched GEMM: batch i reads the weight at
        // `w0 + i * stride` (the two weights' address difference, taken from the lower one so
        // the stride is positive) and writes `[T, N]` at `pair + i * T * N`.
        let pair = self.buf(2 * rows * n);
        self.run("gate_up_silu", || {
            let mut s = lock(&self.scratch);
            let xb = self.cast_bf16(&mut s, x, rows * k)?;
            let (gp, upp) = (self.ptr(&gate.weight.data), self.ptr(&up.weight.data));
            let (w0, stride_bytes, gate_first) = if gp <= upp {
                (gp, upp - gp, true)
            } else {
                (upp, gp - upp, false)
            };
            let pp = self.bptr(&pair);
            self.gemm_pair(xb, rows, n, k, w0, stride_bytes / 2, pp)?;
            let half = (rows * n * 4) as u64;
            let (g_half, u_half) = if gate_first {
                (pp, pp + half)
            } else {
                (pp + half, pp)
            };
            let out_b = self.shadow_for(&mut s, gate_out, rows * n)?;
            drop(s);
            let total = (rows * n) as u64;
            self.launch(
                "silu_mul_pair_f32",
                self.stride_grid(total),
                256,
                &[
                    KArg::U64(g_half),
                    KArg::U64(u_half),
                    KArg::U64(self.bptr(gate_out)),
                    KArg::U64(out_b),
                    KArg::U64(total),
                ],
            )
        });
        self.recycle(pair);
    }

    fn rope(&self, x: &mut CudaBuf, heads: usize, rows: &[RowKv], table: &RopeTable) {
        self.run("rope", || {
            let mut s = lock(&self.scratch);
            let rows_p = self.upload_rows(&mut s, rows)?;
            let (cos, sin, max_pos) = self.rope_table(&mut s, table)?;
            drop(s);
            let p = RopeParams {
                q: self.bptr(x),
                rows: rows_p,
                cos,
                sin,
                n_rows: rows.len() as u32,
                heads: heads as u32,
                head_dim: (2 * table.half) as u32,
                max_pos: max_pos as u32,
                ..Default::default()
            };
            let warps = rows.len() as u32 * heads as u32;
            self.launch(
                "rope_f32",
                (warps.div_ceil(4), 1, 1),
                128,
                &[KArg::Rope(&p)],
            )
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn rope_store(
        &self,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        kv: &mut CudaKv,
        layer: usize,
        shape: AttnShape,
        rows: &[RowKv],
        table: &RopeTable,
    ) {
        self.run("rope_store", || {
            let mut s = lock(&self.scratch);
            let rows_p = self.upload_rows(&mut s, rows)?;
            let (cos, sin, max_pos) = self.rope_table(&mut s, table)?;
            drop(s);
            let off = (layer * kv.entries * kv.kv_dim * 4) as u64;
            // q and k rotated, k and v stored into the arena: one launch.
            let p = RopeParams {
                q: self.bptr(q),
                k: self.bptr(k),
                rows: rows_p,
                cos,
                sin,
                v: self.bptr(v),
                k_cache: self.ptr(&kv.k) + off,
                v_cache: self.ptr(&kv.v) + off,
                n_rows: rows.len() as u32,
                heads: shape.heads as u32,
                kv_heads: shape.kv_heads as u32,
                head_dim: (2 * table.half) as u32,
                max_pos: max_pos as u32,
                entries: kv.entries as u32,
                ..Default::default()
            };
            let warps = rows.len() as u32 * (shape.heads + shape.kv_heads) as u32;
            self.launch(
                "rope_f32",
                (warps.div_ceil(4), 1, 1),
                128,
                &[KArg::Rope(&p)],
            )
        });
    }

    fn silu_mul(&self, gate: &mut CudaBuf, up: &CudaBuf) {
        self.run("silu_mul", || {
            let n = gate.len;
            let out_b = self.shadow_for(&mut lock(&self.scratch), gate, n)?;
            let n = n as u64;
            self.launch(
                "silu_mul_f32",
                self.stride_grid(n),
                256,
                &[
                    KArg::U64(self.bptr(gate)),
                    KArg::U64(self.bptr(up)),
                    KArg::U64(n),
                    KArg::U64(out_b),
                ],
            )
        });
    }

    fn kv_store(&self, kv: &mut CudaKv, layer: usize, k: &CudaBuf, v: &CudaBuf, rows: &[RowKv]) {
        self.run("kv_store", || {
            let rows_p = self.upload_rows(&mut lock(&self.scratch), rows)?;
            let off = (layer * kv.entries * kv.kv_dim * 4) as u64;
            let n = rows.len() as u32;
            self.launch(
                "kv_store_f32",
                (n, 1, 1),
                128,
                &[
                    KArg::U64(self.ptr(&kv.k) + off),
                    KArg::U64(self.ptr(&kv.v) + off),
                    KArg::U64(self.bptr(k)),
                    KArg::U64(self.bptr(v)),
                    KArg::U64(rows_p),
                    KArg::U32(n),
                    KArg::U32(kv.kv_dim as u32),
                    KArg::U32(kv.entries as u32),
                ],
            )
        });
    }

    fn attention(
        &self,
        q: &CudaBuf,
        kv: &CudaKv,
        layer: usize,
        rows: KvRows<'_>,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) {
        self.run("attention", || {
            self.attention_impl(q, kv, layer, rows, shape, out)
        });
    }

    fn gather_rows(&self, x: &CudaBuf, dim: usize, rows: &[usize], out: &mut CudaBuf) {
        self.run("gather_rows", || {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            let ip = self.upload(&mut lock(&self.scratch), Slot::Gather, &idx)?;
            let n = idx.len() as u32;
            self.launch(
                "gather_rows_f32",
                (n.max(1), 1, 1),
                128,
                &[
                    KArg::U64(self.bptr(x)),
                    KArg::U64(ip),
                    KArg::U64(self.bptr(out)),
                    KArg::U32(n),
                    KArg::U32((x.len / dim) as u32),
                    KArg::U32(dim as u32),
                ],
            )
        });
    }

    fn linear_picks(&self, x: &CudaBuf, w: &CudaWeight, picks: &[(u32, u32)]) -> Vec<f32> {
        let mut out = vec![0.0f32; picks.len()];
        if picks.is_empty() {
            return out;
        }
        self.run("linear_picks", || {
            let flat: Vec<u32> = picks.iter().flat_map(|&(r, v)| [r, v]).collect();
            let mut s = lock(&self.scratch);
            let pp = self.upload(&mut s, Slot::Picks, &flat)?;
            let dp = self.ptr(scratch_f32(self, &mut s.picks_out, picks.len())?);
            drop(s);
            let (dim, vocab) = (w.shape[1] as u32, w.shape[0] as u32);
            let n = picks.len() as u32;
            self.launch(
                "linear_picks_f32",
                ((n as u64 * 32).div_ceil(256) as u32, 1, 1),
                256,
                &[
                    KArg::U64(self.bptr(x)),
                    KArg::U64(self.ptr(&w.data)),
                    KArg::U64(pp),
                    KArg::U64(dp),
                    KArg::U32(n),
                    KArg::U32(x.len as u32 / dim),
                    KArg::U32(vocab),
                    KArg::U32(dim),
                ],
            )?;
            self.read_back(dp, &mut out)
        });
        out
    }

    fn head_picks_lse(
        &self,
        x: &CudaBuf,
        rows: usize,
        head: LinearRef<'_, CudaWeight>,
        vocab: usize,
        picks: &[(u32, u32)],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut logits = self.buf(rows * vocab);
        self.linear(x, rows, &mut [(head, &mut logits)]);
        // One buffer, one read-back: the picks' logits, then the rows' log-sum-exps.
        let n = picks.len();
        let mut out = vec![0.0f32; n + rows];
        let lp = self.bptr(&logits);
        self.run("head_lse", || {
            let (r32, v32) = (rows as u32, vocab as u32);
            let mut s = lock(&self.scratch);
            let flat: Vec<u32> = picks.iter().flat_map(|&(r, v)| [r, v]).collect();
            let pp = self.upload(&mut s, Slot::Picks, &flat)?;
            let dp = self.ptr(scratch_f32(self, &mut s.picks_out, n + rows)?);
            drop(s);
            let lse_p = dp + n as u64 * 4;
            self.launch(
                "row_logsumexp_f32",
                (r32, 1, 1),
                256,
                &[
                    KArg::U64(lp),
                    KArg::U64(lse_p),
                    KArg::U32(r32),
                    KArg::U32(v32),
                ],
            )?;
            if n > 0 {
                self.launch(
                    "gather_picks_f32",
                    self.stride_grid(n as u64),
                    256,
                    &[
                        KArg::U64(lp),
                        KArg::U64(pp),
                        KArg::U64(dp),
                        KArg::U32(n as u32),
                        KArg::U32(r32),
                        KArg::U32(v32),
                    ],
                )?;
            }
            self.read_back(dp, &mut out)
        });
        let lse = out.split_off(n);
        self.recycle(logits);
        (out, lse)
    }
}

/// A growing f32 scratch buffer of at least `n` values.
fn scratch_f32<'a>(
    b: &CudaBackend,
    slot: &'a mut Option<CudaSlice<f32>>,
    n: usize,
) -> Result<&'a CudaSlice<f32>> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = Some(
            b.stream
                .alloc_zeros::<f32>(n.max(256).next_power_of_two())
                .map_err(dev("allocating device scratch"))?,
        );
    }
    Ok(slot.as_ref().expect("set above"))
}
