//! Products: the GEMMs of the CUDA backend and what feeds them. cuBLAS `GemmEx` (and a
//! strided-batched pair for gate/up) in bf16 × bf16 with f32 accumulation, for more than 16
//! rows; the few-row tensor-core kernel (`kernels/linear_rows.cu`, the default for at most 16
//! rows); the bf16 activation operand, cast or read from the "shadow" the op before wrote; and
//! the fused q/k/v weight of a layer.

use super::*;

/// A layer's q, k and v projections as one weight `[q_dim + 2 kv_dim, K]` (and bias).
pub(super) struct FusedQkv {
    pub w: CudaWeight,
    pub bias: Option<CudaWeight>,
    /// Device addresses of the k and v weights and the three biases (0: none) it was made
    /// from.
    sources: [u64; 5],
}

impl CudaBackend {
    /// Whether a GEMM of `rows` rows and inner size `k` goes to `linear_rows_bf16`.
    pub(super) fn rows_gemm(&self, rows: usize, k: usize) -> bool {
        rows <= SMALL_ROWS && k.is_multiple_of(8) && self.rows_gemm_on.load(Ordering::Relaxed)
    }

    /// Launches `linear_rows_bf16` (see the kernel's header): `out = xb w0^T + bias`, or with
    /// `w1`, `out = silu(xb w0^T) * (xb w1^T)`; `out_b` (0: none) gets out's bf16 rounding.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows_gemm_launch(
        &self,
        xb: u64,
        rows: usize,
        (w0, w1): (&CudaWeight, Option<&CudaWeight>),
        bias: Option<&CudaWeight>,
        out: u64,
        out_b: u64,
    ) -> Result<()> {
        let (n, k) = (w0.shape[0], w0.shape[1]);
        // Eight columns a block; its warps split k in blocks of 32, six blocks a warp per round
        // of loads (the kernel's PREFETCH), up to 16 warps.
        let warps = k.div_ceil(32).div_ceil(6).clamp(1, 16) as u32;
        self.launch(
            "linear_rows_bf16",
            (n.div_ceil(8) as u32, 1, 1),
            32 * warps,
            &[
                KArg::U64(xb),
                KArg::U64(self.ptr(&w0.data)),
                KArg::U64(w1.map_or(0, |w| self.ptr(&w.data))),
                KArg::U64(bias.map_or(0, |b| self.ptr(&b.data))),
                KArg::U64(out),
                KArg::U64(out_b),
                KArg::U32(rows as u32),
                KArg::U32(n as u32),
                KArg::U32(k as u32),
            ],
        )
    }

    /// The device address of a bf16 GEMM operand buffer of at least `n` values: `xb`, or with
    /// `second`, `xb2` (for a shadow written by the launch that reads `xb`).
    pub(super) fn xb_buf(&self, s: &mut Scratch, n: usize, second: bool) -> Result<u64> {
        let slot = if second { &mut s.xb2 } else { &mut s.xb };
        if slot.as_ref().is_none_or(|b| b.len() < n) {
            if self.mode() == Mode::Capture {
                self.break_pass(|| "GEMM operand grown during capture".into());
                return Ok(0);
            }
            *slot = Some(
                self.stream
                    .alloc_zeros::<u16>(n.next_power_of_two())
                    .map_err(dev("allocating the GEMM operand"))?,
            );
            s.shadow = None;
        }
        let slot = if second { &s.xb2 } else { &s.xb };
        Ok(self.ptr(slot.as_ref().expect("set above")))
    }

    /// The op being run: [`CudaBackend::run`] counts every op but graph launches.
    pub(super) fn op_seq(&self) -> u64 {
        self.op_seq.load(Ordering::Relaxed)
    }

    /// Where an op that writes `out` (`n` values, f32) should write its bf16 rounding too: the
    /// operand buffer, recorded as a shadow of `out` that the next op's GEMM can read
    /// instead of casting (see [`CudaBackend::cast_bf16`]).
    pub(super) fn shadow_for(&self, s: &mut Scratch, out: &CudaBuf, n: usize) -> Result<u64> {
        self.shadow_into(s, out, n, false)
    }

    /// [`CudaBackend::shadow_for`] into `xb2` (`second`): for a launch that reads `xb`.
    pub(super) fn shadow_into(
        &self,
        s: &mut Scratch,
        out: &CudaBuf,
        n: usize,
        second: bool,
    ) -> Result<u64> {
        let b = self.xb_buf(s, n, second)?;
        s.shadow = Some((self.bptr(out), n, self.op_seq(), b));
        Ok(b)
    }

    /// The bf16 copy of `x` (first `n` values) for a GEMM: the shadow the previous op wrote
    /// alongside `x` when there is one (no op has run since, so nothing has changed `x` or the
    /// shadow), else a cast.
    pub(super) fn cast_bf16(&self, s: &mut Scratch, x: &CudaBuf, n: usize) -> Result<u64> {
        let xp = self.bptr(x);
        if let Some((src, len, seq, b)) = s.shadow {
            if src == xp && len >= n && seq + 1 == self.op_seq() {
                return Ok(b);
            }
        }
        let xb = self.xb_buf(s, n, false)?;
        s.shadow = None;
        let n64 = n as u64;
        self.launch(
            "cast_f32_bf16",
            self.stride_grid(n64),
            256,
            &[KArg::U64(xp), KArg::U64(xb), KArg::U64(n64)],
        )?;
        Ok(xb)
    }

    /// `out[rows, n] = xb[rows, k] · w[n, k]^T` (+ bias), f32 out.
    pub(super) fn gemm(
        &self,
        xb: u64,
        rows: usize,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
        out: u64,
    ) -> Result<()> {
        let (n, k) = (w.shape[0], w.shape[1]);
        if self.rows_gemm(rows, k) {
            return self.rows_gemm_launch(xb, rows, (w, None), bias, out, 0);
        }
        let wp = self.ptr(&w.data);
        let planned = {
            // As `launch`: hashed in Plan and Capture, run in every mode but Plan.
            let mut p = lock(&self.pass);
            let mode = graph::mode_of(&p);
            if matches!(mode, Mode::Plan | Mode::Capture) {
                for v in [0x6765_6d6d, n as u64, rows as u64, k as u64, wp, xb, out] {
                    p.mix_u64(v);
                }
            }
            mode == Mode::Plan
        };
        if !planned {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Column-major view: out^T [n, rows] = W [k, n]^T · x^T [k, rows].
            // SAFETY: pointers and leading dimensions describe the buffers above.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *self.blas.handle(),
                    blas::cublasOperation_t::CUBLAS_OP_T,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    rows as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    blas::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    xb as *const _,
                    blas::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    out as *mut _,
                    blas::cudaDataType::CUDA_R_32F,
                    n as i32,
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(dev("cuBLAS GemmEx"))?;
        }
        if let Some(bias) = bias {
            let total = rows as u64 * n as u64;
            self.launch(
                "bias_add_f32",
                self.stride_grid(total),
                256,
                &[
                    KArg::U64(out),
                    KArg::U64(self.ptr(&bias.data)),
                    KArg::U32(rows as u32),
                    KArg::U32(n as u32),
                ],
            )?;
        }
        Ok(())
    }

    /// The concatenated `[q_proj; k_proj; v_proj]` weight (and bias) of a layer, made on first
    /// use by device copies and kept (keyed by the q weight's address), or `None` where the
    /// three cannot be one GEMM (different input widths, some with a bias and some without),
    /// or where it would be made under graph capture (the plan walk before makes it).
    pub(super) fn fused_qkv(
        &self,
        qkv: [crate::backend::LinearRef<'_, CudaWeight>; 3],
    ) -> Option<Arc<FusedQkv>> {
        // What the fused weight was made from: k, v and the biases (q is its owner).
        let addr = |w: Option<&CudaWeight>| w.map_or(0, |w| self.ptr(&w.data));
        let sources = [
            addr(Some(qkv[1].weight)),
            addr(Some(qkv[2].weight)),
            addr(qkv[0].bias),
            addr(qkv[1].bias),
            addr(qkv[2].bias),
        ];
        if let Some(f) = qkv[0].weight.fused.get() {
            // Made with other k/v weights (not a decoder layer's own): the three GEMMs.
            return (f.sources == sources).then(|| f.clone());
        }
        let kdim = qkv[0].weight.shape[1];
        let biased = qkv.iter().filter(|l| l.bias.is_some()).count();
        if qkv
            .iter()
            .any(|l| l.weight.shape.len() != 2 || l.weight.shape[1] != kdim)
            || (biased != 0 && biased != 3)
            || self.mode() == Mode::Capture
        {
            return None;
        }
        let n: usize = qkv.iter().map(|l| l.weight.shape[0]).sum();
        let concat = |parts: &[&CudaSlice<u16>], len: usize| -> Result<CudaSlice<u16>> {
            // SAFETY: every value is written by the copies below.
            let mut out = unsafe { self.stream.alloc::<u16>(len) }
                .map_err(dev("allocating the fused q/k/v weight"))?;
            let mut at = 0;
            for p in parts {
                let len = p.len();
                self.stream
                    .memcpy_dtod(*p, &mut out.slice_mut(at..at + len))
                    .map_err(dev("copying the fused q/k/v weight"))?;
                at += len;
            }
            Ok(out)
        };
        let weights: Vec<&CudaSlice<u16>> = qkv.iter().map(|l| &l.weight.data).collect();
        let made = concat(&weights, n * kdim).and_then(|w| {
            let biases: Option<Vec<&CudaSlice<u16>>> =
                qkv.iter().map(|l| l.bias.map(|b| &b.data)).collect();
            let bias = match biases {
                Some(b) => Some(concat(&b, n)?),
                None => None,
            };
            Ok(FusedQkv {
                w: CudaWeight::new(w, vec![n, kdim]),
                bias: bias.map(|data| CudaWeight::new(data, vec![n])),
                sources,
            })
        });
        match made {
            Ok(f) => {
                // Kept by the q weight: it lives as long as the layer, and a weight uploaded
                // later at the same address starts without one.
                let f = qkv[0].weight.fused.get_or_init(|| Arc::new(f));
                (f.sources == sources).then(|| f.clone())
            }
            Err(e) => {
                tracing::debug!("q/k/v stay three GEMMs: {e}");
                None
            }
        }
    }

    /// Two products of one operand in one strided-batched GEMM: for `i` in 0..2,
    /// `out + i * rows * n` (`[rows, n]` f32) = `xb[rows, k] · W_i[n, k]^T` with
    /// `W_i = w0 + i * stride` (bf16 elements, stride ≥ 0).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_pair(
        &self,
        xb: u64,
        rows: usize,
        n: usize,
        k: usize,
        w0: u64,
        stride: u64,
        out: u64,
    ) -> Result<()> {
        let planned = {
            let mut p = lock(&self.pass);
            let mode = graph::mode_of(&p);
            if matches!(mode, Mode::Plan | Mode::Capture) {
                for v in [
                    0x6765_6d32,
                    n as u64,
                    rows as u64,
                    k as u64,
                    w0,
                    stride,
                    xb,
                    out,
                ] {
                    p.mix_u64(v);
                }
            }
            mode == Mode::Plan
        };
        if planned {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major, as `gemm`: out_i^T [n, rows] = W_i [k, n]^T · x^T [k, rows].
        // SAFETY: both weights (w0, w0 + stride) are [n, k] bf16, xb holds rows * k bf16, out
        // holds 2 * rows * n f32.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w0 as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                stride as i64,
                xb as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                0,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas::cudaDataType::CUDA_R_32F,
                n as i32,
                (rows * n) as i64,
                2,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(dev("cuBLAS GemmStridedBatchedEx"))
    }
}
