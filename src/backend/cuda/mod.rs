//! `CudaBackend`: the [`Backend`] ops on an NVIDIA GPU, through `cudarc` (the driver, NVRTC and
//! cuBLAS are loaded at run time, so gram builds and runs where no CUDA is installed).
//!
//! Storage: weights are bf16 on the device (any stored dtype is converted once at upload); the
//! activation buffers and the KV arena are f32, as on the CPU, so the only rounding the GPU adds
//! is the bf16 activation operand of each cuBLAS GEMM (bf16 × bf16, f32 accumulation and
//! output) and the order of f32 sums. Every op is one or two kernel launches on one stream; the
//! host reads back only what the trait returns (the LM-head picks, log-sum-exps, `to_host`).
//!
//! Kernels (`kernels/*.cu`) are compiled by NVRTC for the device's architecture at
//! [`CudaBackend::new`] and cached on disk ([`nvrtc`]). Ops cannot return errors (the trait is
//! infallible, as the CPU's ops are); a failed launch or copy is recorded, later ops are skipped,
//! and [`Backend::check`] (called after every forward pass) returns it. Nothing here panics on
//! a missing driver: [`probe`] checks for the libraries before cudarc touches them.

mod attention;
pub mod beam_step;
mod gemm;
use gemm::FusedQkv;
mod graph;
pub mod nvrtc;
mod ops;
pub mod plan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{sys as blas, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
};

use super::{AttnShape, KvRows, RowKv};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::rope::RopeTable;
use crate::tensor::{HostTensor, View};

pub use self::graph::GraphStats;
use self::graph::{KArg, Mode, Pass};
pub use self::plan::{plan_attention, AttnPlan, AttnRun};

/// Events that record time (cudarc's default disables timing).
const TIMED: cudarc::driver::sys::CUevent_flags =
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;

/// Rows up to which `linear` can use `linear_small_f32` (kernels/linear_small.cu) rather than
/// cuBLAS, when [`CudaBackend::set_small_gemm`] is on: f32 activations, each weight read once.
pub const SMALL_ROWS: usize = 16;

/// The oldest driver API version the backend runs on (12.8: `cuEventElapsedTime_v2`).
const MIN_DRIVER: i32 = 12080;

/// Head dims the attention kernels are instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Why no GPU can be used, or `Ok(device count)`. Looks for the driver library before cudarc
/// does (cudarc panics when it cannot load `libcuda`).
pub fn probe() -> Result<usize> {
    // SAFETY: only dlopen()s the library by its usual names; no CUDA call yet.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::Device(
            "no CUDA driver (libcuda.so) found: no NVIDIA GPU here, or the driver is not installed"
                .into(),
        ));
    }
    let mut version = 0;
    // SAFETY: one out-parameter; the library is present (checked above).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| Error::Device(format!("the CUDA driver does not answer: {e:?}")))?;
    // The bindings are CUDA 13's: a driver older than 12.8 lacks entry points they use (a
    // missing symbol would panic inside cudarc), so refuse it here.
    if version < MIN_DRIVER {
        return Err(Error::Device(format!(
            "the CUDA driver supports CUDA {}.{}; gram's CUDA backend needs {}.{} or newer",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER / 1000,
            MIN_DRIVER % 1000 / 10
        )));
    }
    let n = CudaContext::device_count()
        .map_err(|e| Error::Device(format!("the CUDA driver failed to start: {e:?}")))?;
    if n <= 0 {
        return Err(Error::Device("the CUDA driver sees no GPU".into()));
    }
    Ok(n as usize)
}

fn dev<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// `#[repr(C)]` twin of `AttnParams<T>` (kernels/attention.cuh); pointers as device addresses.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AttnParams {
    q: u64,
    out: u64,
    k_cache: u64,
    v_cache: u64,
    rows: u64,
    links: u64,
    groups: u64,
    part_o: u64,
    part_ml: u64,
    out_b: u64,
    n_rows: u32,
    n_links: u32,
    n_groups: u32,
    entries: u32,
    heads: u32,
    kv_heads: u32,
    rows_per_block: u32,
    row_slices: u32,
    n_chunks: u32,
    scale: f32,
}
// SAFETY: plain old data with the C layout the kernel reads.
unsafe impl DeviceRepr for AttnParams {}

/// `#[repr(C)]` twin of `RopeParams<T>` (kernels/rope.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RopeParams {
    q: u64,
    k: u64,
    rows: u64,
    cos: u64,
    sin: u64,
    q_norm: u64,
    k_norm: u64,
    v: u64,
    k_cache: u64,
    v_cache: u64,
    q_out: u64,
    n_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    max_pos: u32,
    entries: u32,
    eps: f32,
    row_stride: u32,
}
// SAFETY: as above.
unsafe impl DeviceRepr for RopeParams {}

// The C layouts (kernels/attention.cuh, kernels/rope.cu): 8-byte pointers first, then 4-byte
// fields, no padding left implicit (the graph hash reads every byte).
const _: () = assert!(std::mem::size_of::<AttnParams>() == 10 * 8 + 10 * 4);
const _: () = assert!(std::mem::size_of::<RopeParams>() == 11 * 8 + 8 * 4);

/// An f32 activation buffer: `len` values at the front of a pooled allocation, or of a pass
/// slot (see `graph.rs`: the buffers of a decoder pass are the same allocations every pass).
pub struct CudaBuf {
    mem: BufMem,
    len: usize,
}

enum BufMem {
    Owned(CudaSlice<f32>),
    Pass { ptr: u64 },
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A weight on the device, bf16, with its HF shape (`[N, K]`, or `[N]`).
pub struct CudaWeight {
    data: CudaSlice<u16>,
    shape: Vec<usize>,
    /// For a q projection: the layer's fused q/k/v weight, once made
    /// ([`CudaBackend::fused_qkv`]).
    fused: std::sync::OnceLock<Arc<FusedQkv>>,
}

impl CudaWeight {
    pub(super) fn new(data: CudaSlice<u16>, shape: Vec<usize>) -> CudaWeight {
        CudaWeight {
            data,
            shape,
            fused: Default::default(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// The KV arena: per layer, K and V blocks of `[entries, Hkv * D]` f32.
pub struct CudaKv {
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    entries: usize,
    kv_dim: usize,
}

/// The small per-op inputs uploaded from the host, one growing device buffer each; an upload
/// equal to the last one of its slot is skipped (a forward pass uses the same rows in every
/// layer).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(super) enum Slot {
    Ids,
    Rows,
    Links,
    Groups,
    Gather,
    Picks,
}

struct Upload {
    dev: CudaSlice<u32>,
    last: Vec<u32>,
}

#[derive(Default)]
struct Scratch {
    uploads: HashMap<Slot, Upload>,
    /// The bf16 copy of a GEMM's activation operand.
    xb: Option<CudaSlice<u16>>,
    /// A second operand buffer, for the shadow of a launch that reads `xb`.
    xb2: Option<CudaSlice<u16>>,
    /// `(f32 buffer address, values, op, bf16 address)`: the bf16 rounding of that buffer (in
    /// `xb` or `xb2`), written by op number `op` (a norm, SwiGLU or attention writing it for
    /// the GEMM that reads its output next).
    shadow: Option<(u64, usize, u64, u64)>,
    /// The rotary table of the model being run: `(RopeTable::id, cos, sin, max_pos)`.
    rope: Option<(u64, CudaSlice<f32>, CudaSlice<f32>, usize)>,
    /// The head's outputs: the picks' logits (then, for the full head, each row's
    /// log-sum-exp), read back in one copy.
    picks_out: Option<CudaSlice<f32>>,
    /// The batch rows of the last `upload_rows` and their flat form: every op of a pass uploads
    /// the same rows, which are then neither flattened nor allocated again.
    rows_last: Vec<RowKv>,
    rows_flat: Vec<u32>,
    /// The pass being run (`CudaBackend::pass`), 0 outside one. Within a pass the model's
    /// batch (rows, links) is one borrowed, unchanging value.
    pass_gen: u64,
    /// The attention plan and uploads of pass `pass_gen` (every layer attends over the same
    /// rows): made by the first layer, reused by the others.
    attn: Option<AttnMemo>,
}

/// What `attention_impl` prepares once per pass: the plan and the device addresses of its
/// uploads, for the batch at `key` (the rows' and links' host addresses and lengths).
struct AttnMemo {
    gen: u64,
    key: [usize; 4],
    plan: std::sync::Arc<AttnPlan>,
    rows_p: u64,
    links_p: u64,
    links_cap: usize,
    groups_p: u64,
}

/// Per-op GPU time, from CUDA events around each op (only when profiling is on).
#[derive(Default)]
struct Profile {
    spans: Vec<(&'static str, CudaEvent, CudaEvent)>,
}

/// The CUDA backend. One context, one stream. A forward pass holds the backend alone
/// (`run_forward`); the pass mode (plan, capture, direct) belongs to the thread running the
/// pass, so an op another thread calls meanwhile is not merely hashed. That does not make such
/// a call safe: both threads share the stream (a capture records whatever is launched on it)
/// and the scratch buffers (`xb`, the upload slots). Use one backend from one thread at a time,
/// as the engine and the server do (one batcher thread).
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: HashMap<&'static str, CudaFunction>,
    scratch: Mutex<Scratch>,
    pool: Mutex<HashMap<usize, Vec<CudaSlice<f32>>>>,
    error: Mutex<Option<String>>,
    pass: Mutex<Pass>,
    graphs: Mutex<HashMap<u64, graph::Graph>>,
    pass_lock: Mutex<()>,
    /// Held for a whole forward pass (body and head): the head reads the body's pass slots.
    forward_lock: Mutex<()>,
    /// Pass shapes (`Backend::run_pass`) seen, and how often: one seen fewer than
    /// `capture_after` times runs without a plan.
    shapes: Mutex<HashMap<u64, u32>>,
    /// The sighting of a shape at which its pass is planned (and captured when no graph has its
    /// launches): 3 by default (`GRAM_CUDA_CAPTURE_AFTER=N`: 1 plans every pass). A capture
    /// costs a plan walk, a capture walk with the GPU idle and an instantiation; a batch whose
    /// shape changes every few steps (queries finishing at different steps) paid that for
    /// graphs it never replayed: on an H100, 3 instead of 2 took batches of 16 queries from
    /// 69 to 38 ms (SmolLM2-shaped, beam 10) and left batches of 1 and 64 as they were
    /// (docs/PERF.md).
    capture_after: u32,
    /// Beam search pads each query's decode rows to its beam width while a step has at most
    /// this many rows (`Backend::stable_beam_rows`; 1024 by default, `GRAM_CUDA_STABLE_BEAMS=N`
    /// sets it, 0 turns it off). On an H100, padding took SmolLM2-shaped batches of 16 queries
    /// from 49.8 to 41.5 ms (beam 10) and 79 to 65 ms (beam 64), and cost 8–17 % at 64 queries
    /// of beam 64 (4,096 rows: a pass that is compute-bound, where fillers cost their FLOPs).
    stable_beam_rows: usize,
    /// `Backend::hold_finished_rows`: 256 by default, `GRAM_CUDA_HOLD_FINISHED=N` sets it, 0
    /// turns it off. On an H100 (twentieth session, docs/PERF.md), holding took batches of 16
    /// queries at beam 10 (160 rows) from 41 to 26 ms (SmolLM2-shaped) and 56 to 32 ms
    /// (Qwen2.5-0.5B-shaped), and made 64 queries at beam 10 (640 rows, where a row costs
    /// its FLOPs) 17–19 % slower; 16 at beam 64 (1,024 rows) moved −8 / +6 %.
    hold_finished_rows: usize,
    /// How decode attention splits a query's beam rows over blocks (`GRAM_CUDA_DECODE_ROWS`).
    decode_rows: attention::DecodeRows,
    /// Ops that launch nothing (`GRAM_CUDA_SKIP_OPS=attention,linear,...`, op names as in
    /// `--profile`): a measuring knob only, their outputs are stale, so results are wrong. A
    /// replayed pass without an op, against one with it, is that op's cost inside the graph,
    /// where kernels overlap (per-op events drain the stream around each op instead).
    skip_ops: Vec<String>,
    graphs_on: AtomicBool,
    /// Products of at most [`SMALL_ROWS`] rows by our memory-bound kernel instead of cuBLAS.
    small_gemm_on: AtomicBool,
    /// GEMMs of at most [`SMALL_ROWS`] rows by `linear_rows_bf16` instead of cuBLAS (default).
    rows_gemm_on: AtomicBool,
    /// Kernels launched with programmatic stream serialization (compute capability 9.0 and
    /// later; on by default, `GRAM_CUDA_PDL=0` off): a kernel's blocks start while the kernel
    /// before it finishes and wait for it on the device (kernels/common.cuh), hiding the launch
    /// gap between dependent kernels and, in `linear_rows_bf16`, the first weight loads.
    pdl_on: AtomicBool,
    /// The device's compute capability supports that.
    pdl_capable: bool,
    graph_stats: Mutex<GraphStats>,
    /// Passes begun (`Scratch::pass_gen`).
    pass_gens: AtomicU64,
    /// Ops run ([`CudaBackend::op_seq`]).
    op_seq: AtomicU64,
    /// cuBLAS's workspace, set once so that captured GEMMs allocate nothing.
    _blas_workspace: CudaSlice<u8>,
    profile: Mutex<Profile>,
    profiling: AtomicBool,
    /// Profiling waits for the stream before and after each op, so a span is that op alone.
    profile_sync: AtomicBool,
    weight_bytes: AtomicUsize,
    device_name: String,
    sms: u32,
}

/// The ops of `GRAM_CUDA_SKIP_OPS` (comma-separated; blanks ignored), with a warning: results
/// are wrong while any op is skipped.
fn skip_ops_from(var: Option<&str>) -> Vec<String> {
    let ops: Vec<String> = var
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if !ops.is_empty() {
        tracing::warn!(
            "GRAM_CUDA_SKIP_OPS={}: these ops launch nothing; results are wrong (timing only)",
            ops.join(",")
        );
        eprintln!("warning: GRAM_CUDA_SKIP_OPS skips {ops:?}: results are wrong (timing only)");
    }
    ops
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The virtual architecture the kernels are compiled for. A GPU newer than the table gets
/// compute_90's PTX (JIT-compiled forward by the driver), not compute_80's: the programmatic
/// launches' waits (`gram_pdl_wait`) exist only from compute_90 on, and those launches are
/// switched on for every GPU of capability 9 or more ([`pdl_compiled`]). `nvrtc` is the NVRTC
/// library's version: compute_100 and compute_120 need 12.8 or newer, and an older one gets
/// compute_90's PTX for them too (it failed to compile, and `--device auto` fell back to the CPU).
fn arch_of(cc: (i32, i32), nvrtc: (i32, i32)) -> Result<&'static str> {
    let blackwell = nvrtc >= (12, 8);
    Ok(match cc {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) if blackwell => "compute_100",
        (12, 0) if blackwell => "compute_120",
        (m, _) if m >= 9 => "compute_90",
        (m, _) if m >= 8 => "compute_80",
        (m, n) => {
            return Err(Error::Device(format!(
                "compute capability {m}.{n}: the kernels need bf16 (8.0 or newer)"
            )))
        }
    })
}

/// Whether kernels compiled for `arch` carry the programmatic launches' waits (compute_90 and
/// newer: `common.cuh`'s `gram_pdl_wait` is empty below): a kernel launched early without its
/// wait could read what the kernel before it has not written yet.
fn pdl_compiled(arch: &str) -> bool {
    arch.strip_prefix("compute_")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n >= 90)
}

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads cached) kernels, starts cuBLAS. `profile` turns
    /// on per-op event timing ([`CudaBackend::profile_report`]).
    pub fn new(ordinal: usize, profile: bool) -> Result<CudaBackend> {
        let n = probe()?;
        if ordinal >= n {
            return Err(Error::Device(format!(
                "GPU {ordinal} asked for, {n} present"
            )));
        }
        // SAFETY: dlopen() probes, as in `probe`.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Device(
                "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and add its lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "cuBLAS (libcublas.so) not found: add the CUDA toolkit's lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev("creating a CUDA context"))?;
        // One stream: in-stream order is all the synchronization the ops need.
        // SAFETY: every buffer is used on this one stream only.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(dev("starting cuBLAS"))?;
        let blas_workspace = stream
            .alloc_zeros::<u8>(32 << 20)
            .map_err(dev("allocating cuBLAS's workspace"))?;
        {
            let (wp, _sync) = blas_workspace.device_ptr(&stream);
            // SAFETY: a live 32 MiB device buffer, kept as long as the handle.
            unsafe { blas::cublasSetWorkspace_v2(*blas.handle(), wp as *mut _, 32 << 20) }
                .result()
                .map_err(dev("setting cuBLAS's workspace"))?;
        }
        let cc = ctx
            .compute_capability()
            .map_err(dev("reading the compute capability"))?;
        let arch = arch_of(cc, nvrtc::version()?)?;
        let device_name = ctx.name().map_err(dev("reading the device name"))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev("reading the SM count"))? as u32;
        let include = nvrtc::cuda_include_dir()?;
        let mut kernels = HashMap::new();
        for &(file, source) in nvrtc::SOURCES {
            let ptx = nvrtc::compile(file, source, arch, &include)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
                .map_err(|e| {
                    let mut driver = 0;
                    // SAFETY: one out-parameter; the driver is loaded (the context exists).
                    let _ = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
                    let hint =
                        nvrtc::version().map_or(String::new(), |v| nvrtc::ptx_hint(v, driver));
                    Error::Device(format!("loading kernels/{file}: {e:?}{hint}"))
                })?;
            for name in entry_points(&ptx) {
                let f = module
                    .load_function(name)
                    .map_err(dev(&format!("kernel {name} of kernels/{file}")))?;
                let name: &'static str = Box::leak(name.to_string().into_boxed_str());
                kernels.insert(name, f);
            }
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            scratch: Mutex::new(Scratch::default()),
            pool: Mutex::new(HashMap::new()),
            error: Mutex::new(None),
            pass: Mutex::new(Pass::default()),
            graphs: Mutex::new(HashMap::new()),
            pass_lock: Mutex::new(()),
            forward_lock: Mutex::new(()),
            shapes: Mutex::new(Default::default()),
            capture_after: std::env::var("GRAM_CUDA_CAPTURE_AFTER")
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(3)
                .max(1),
            stable_beam_rows: std::env::var("GRAM_CUDA_STABLE_BEAMS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024),
            hold_finished_rows: std::env::var("GRAM_CUDA_HOLD_FINISHED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256),
            decode_rows: attention::DecodeRows::from_env(),
            skip_ops: skip_ops_from(std::env::var("GRAM_CUDA_SKIP_OPS").ok().as_deref()),
            graphs_on: AtomicBool::new(
                std::env::var("GRAM_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            ),
            graph_stats: Mutex::new(GraphStats::default()),
            pass_gens: AtomicU64::new(0),
            op_seq: AtomicU64::new(0),
            small_gemm_on: AtomicBool::new(
                std::env::var("GRAM_CUDA_SMALL_GEMM").is_ok_and(|v| v == "1"),
            ),
            rows_gemm_on: AtomicBool::new(
                std::env::var("GRAM_CUDA_ROWS_GEMM").map_or(true, |v| v != "0"),
            ),
            pdl_on: AtomicBool::new(
                cc.0 >= 9
                    && pdl_compiled(arch)
                    && std::env::var("GRAM_CUDA_PDL").map_or(true, |v| v != "0"),
            ),
            pdl_capable: cc.0 >= 9 && pdl_compiled(arch),
            _blas_workspace: blas_workspace,
            profile: Mutex::new(Profile::default()),
            profiling: AtomicBool::new(profile),
            profile_sync: AtomicBool::new(false),
            weight_bytes: AtomicUsize::new(0),
            device_name,
            sms,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev("synchronizing"))
    }

    /// Turns the small-row product kernel on or off (default off: on the H200 it made decode
    /// steps slower than cuBLAS, see docs/PERF.md; `GRAM_CUDA_SMALL_GEMM=1` starts it on). It
    /// keeps f32 activations, so it is also the exact path.
    pub fn set_small_gemm(&self, on: bool) {
        self.small_gemm_on.store(on, Ordering::Relaxed);
    }

    /// Turns the few-row GEMM kernel on or off (`kernels/linear_rows.cu`: tensor-core mmas on
    /// the cuBLAS path's bf16 operand, each weight read once, bias and SwiGLU in the same
    /// launch, weights loaded before the programmatic-launch wait; default on,
    /// `GRAM_CUDA_ROWS_GEMM=0` starts it off: cuBLAS for every product). On an H100 a replayed
    /// 10-row SmolLM2-shaped pass took 1.03 ms with it and 1.12 ms with cuBLAS (docs/PERF.md).
    pub fn set_rows_gemm(&self, on: bool) {
        self.rows_gemm_on.store(on, Ordering::Relaxed);
    }

    /// Turns programmatic dependent launches on or off (see `pdl_on`); on a device before
    /// compute capability 9.0 they stay off. Returns whether they are on.
    pub fn set_pdl(&self, on: bool) -> bool {
        let on = on && self.pdl_capable;
        self.pdl_on.store(on, Ordering::Relaxed);
        on
    }

    /// Turns per-op event timing on or off. With `sync`, the stream is drained before and
    /// after every op, so an op's span is its own launch and GPU time (not the queue in front
    /// of it); without, spans overlap the host's run-ahead.
    pub fn set_profiling(&self, on: bool, sync: bool) {
        self.profiling.store(on, Ordering::Relaxed);
        self.profile_sync.store(sync, Ordering::Relaxed);
    }

    /// Bytes of weights uploaded so far (bf16).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes.load(Ordering::Relaxed)
    }

    /// Device-to-device copy bandwidth, bytes read + written per second: the best of 10 copies
    /// of 1 GiB (256 MiB where memory is short), timed with events.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        self.ctx
            .bind_to_thread()
            .map_err(dev("binding the context"))?;
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(dev("reading free memory"))?;
        let bytes: usize = if free > 8 << 30 { 1 << 30 } else { 256 << 20 };
        let n = bytes / 4;
        let src = self
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(dev("allocating"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(dev("allocating"))?;
        let mut best = f64::INFINITY;
        for i in 0..12 {
            let a = self.ctx.new_event(Some(TIMED)).map_err(dev("event"))?;
            let b = self.ctx.new_event(Some(TIMED)).map_err(dev("event"))?;
            a.record(&self.stream).map_err(dev("event"))?;
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(dev("copying"))?;
            b.record(&self.stream).map_err(dev("event"))?;
            b.synchronize().map_err(dev("event"))?;
            let ms = a.elapsed_ms(&b).map_err(dev("event"))? as f64;
            if i >= 2 {
                best = best.min(ms);
            }
        }
        Ok(2.0 * bytes as f64 / (best / 1e3))
    }

    /// Per-op GPU milliseconds since the last report, `(op, calls, ms)` by time spent; empty
    /// unless profiling was on.
    pub fn profile_report(&self) -> Result<Vec<(&'static str, usize, f64)>> {
        self.synchronize()?;
        let spans = std::mem::take(&mut lock(&self.profile).spans);
        let mut by: HashMap<&'static str, (usize, f64)> = HashMap::new();
        for (name, a, b) in spans {
            let ms = a.elapsed_ms(&b).map_err(dev("reading an event"))? as f64;
            let e = by.entry(name).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let mut out: Vec<_> = by.into_iter().map(|(n, (c, ms))| (n, c, ms)).collect();
        out.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(out)
    }

    /// Runs `f` unless an earlier op failed; records its error. With profiling, brackets it
    /// with events.
    fn run(&self, name: &'static str, f: impl FnOnce() -> Result<()>) {
        if lock(&self.error).is_some() {
            return;
        }
        if name != "graph" {
            // A graph launch runs ops already counted by the pass's plan walk.
            self.op_seq.fetch_add(1, Ordering::Relaxed);
        }
        if self.skip_ops.iter().any(|op| op == name) {
            return;
        }
        let profiling = self.profiling.load(Ordering::Relaxed) && self.mode() == Mode::Eager;
        let sync = profiling && self.profile_sync.load(Ordering::Relaxed);
        if sync {
            let _ = self.stream.synchronize();
        }
        let events = if profiling {
            let _ = self.ctx.bind_to_thread();
            let a = self.ctx.new_event(Some(TIMED)).ok();
            if let Some(a) = &a {
                let _ = a.record(&self.stream);
            }
            a
        } else {
            None
        };
        let r = self
            .ctx
            .bind_to_thread()
            .map_err(dev("binding the context"))
            .and_then(|()| f());
        if let Some(a) = events {
            if let Ok(b) = self.ctx.new_event(Some(TIMED)) {
                if b.record(&self.stream).is_ok() {
                    lock(&self.profile).spans.push((name, a, b));
                }
                if sync {
                    let _ = self.stream.synchronize();
                }
            }
        }
        if let Err(e) = r {
            let mut err = lock(&self.error);
            if err.is_none() {
                *err = Some(format!("{name}: {e}"));
            }
        }
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.kernels
            .get(name)
            .ok_or_else(|| Error::Device(format!("kernel {name} not loaded")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// Grid of a grid-stride kernel over `n` elements (block 256).
    fn stride_grid(&self, n: u64) -> (u32, u32, u32) {
        (n.div_ceil(256).clamp(1, 8 * self.sms as u64) as u32, 1, 1)
    }

    /// `kernel(a, b, n)`: an element-wise op writing `a` in place from `a` and `b` (`add`),
    /// grid-stride over `a`'s values.
    fn in_place(&self, op: &'static str, kernel: &'static str, a: &mut CudaBuf, b: &CudaBuf) {
        self.run(op, || {
            let n = a.len as u64;
            let args = [
                KArg::U64(self.bptr(a)),
                KArg::U64(self.bptr(b)),
                KArg::U64(n),
            ];
            self.launch(kernel, self.stride_grid(n), 256, &args)
        });
    }

    /// `rmsnorm_f32` over the rows of `x` (width `dim`), adding `delta` (a device address, or 0
    /// for none) into `x` first.
    fn rmsnorm_launch(
        &self,
        x: &CudaBuf,
        delta: u64,
        weight: &CudaWeight,
        eps: f32,
        dim: usize,
        out: &CudaBuf,
    ) -> Result<()> {
        let rows = (x.len / dim) as u32;
        let out_b = self.shadow_for(&mut lock(&self.scratch), out, rows as usize * dim)?;
        let args = [
            KArg::U64(self.bptr(x)),
            KArg::U64(delta),
            KArg::U64(self.ptr(&weight.data)),
            KArg::U64(self.bptr(out)),
            KArg::U64(0), // no row index
            KArg::U32(rows),
            KArg::U32(dim as u32),
            KArg::F32(eps),
            KArg::U64(out_b),
        ];
        self.launch("rmsnorm_f32", (rows, 1, 1), 256, &args)
    }

    /// Device address of a buffer's first value.
    fn bptr(&self, b: &CudaBuf) -> u64 {
        match &b.mem {
            BufMem::Owned(s) => self.ptr(s),
            BufMem::Pass { ptr, .. } => *ptr,
        }
    }

    /// Copies the first `out.len()` values of device address `src` to the host (waits).
    fn read_back(&self, src: u64, out: &mut [f32]) -> Result<()> {
        if matches!(self.mode(), Mode::Plan | Mode::Capture) {
            // Not capturable: the pass will run directly, and read then.
            self.break_pass(|| "a read-back inside a pass".into());
            return Ok(());
        }
        // SAFETY: `src` holds at least out.len() floats (the caller's buffer).
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .map_err(dev("copying to the host"))?;
        let t0 = std::time::Instant::now();
        let r = self.synchronize();
        lock(&self.graph_stats).wait_ns += t0.elapsed().as_nanos() as u64;
        r
    }

    /// Uploads `data` into `slot`'s device buffer (skipped when equal to the last upload) and
    /// returns its address.
    fn upload(&self, s: &mut Scratch, slot: Slot, data: &[u32]) -> Result<u64> {
        let need = data.len().max(1);
        let fresh = match s.uploads.get(&slot) {
            Some(u) => u.dev.len() < need,
            None => true,
        };
        if fresh && self.mode() == Mode::Capture {
            // No allocation under capture: the capture is abandoned (its launches never run).
            self.break_pass(|| format!("{slot:?} grown during capture"));
            return Ok(0);
        }
        if fresh {
            let dev_buf = self
                .stream
                .alloc_zeros::<u32>(need.next_power_of_two().max(256))
                .map_err(dev("allocating device scratch"))?;
            s.uploads.insert(
                slot,
                Upload {
                    dev: dev_buf,
                    last: Vec::new(),
                },
            );
        }
        let u = s.uploads.get_mut(&slot).expect("inserted above");
        let changed = fresh || u.last != data;
        match self.mode() {
            Mode::Capture if changed => {
                self.break_pass(|| format!("{slot:?} upload during capture"));
                return Ok(self.ptr(&u.dev));
            }
            Mode::Plan | Mode::Capture => {
                let mut p = lock(&self.pass);
                if p.uploaded.contains(&slot) && changed {
                    p.broken
                        .get_or_insert_with(|| format!("{slot:?} uploaded twice in one pass"));
                }
                p.uploaded.push(slot);
            }
            _ => {}
        }
        if changed && matches!(slot, Slot::Rows | Slot::Links | Slot::Groups) {
            // What the attention memo points at was overwritten.
            s.attn = None;
        }
        if changed {
            if !data.is_empty() {
                let mut view = u.dev.slice_mut(..data.len());
                self.stream
                    .memcpy_htod(data, &mut view)
                    .map_err(dev("copying to the device"))?;
            }
            u.last.clear();
            u.last.extend_from_slice(data);
        }
        Ok(self.ptr(&u.dev))
    }

    fn upload_rows(&self, s: &mut Scratch, rows: &[RowKv]) -> Result<u64> {
        let mut flat = std::mem::take(&mut s.rows_flat);
        if s.rows_last != rows {
            flat.clear();
            flat.extend(
                rows.iter()
                    .flat_map(|r| [r.pos, r.entry, r.span.0, r.span.1, r.link.0, r.link.1]),
            );
            s.rows_last.clear();
            s.rows_last.extend_from_slice(rows);
        }
        let p = self.upload(s, Slot::Rows, &flat);
        s.rows_flat = flat;
        p
    }

    fn rope_table(&self, s: &mut Scratch, table: &RopeTable) -> Result<(u64, u64, usize)> {
        if s.rope.as_ref().map(|r| r.0) != Some(table.id) {
            if self.mode() == Mode::Capture {
                self.break_pass(|| "rotary table uploaded during capture".into());
                return Ok((0, 0, 0));
            }
            let cos = self
                .stream
                .clone_htod(&table.cos)
                .map_err(dev("uploading the rotary table"))?;
            let sin = self
                .stream
                .clone_htod(&table.sin)
                .map_err(dev("uploading the rotary table"))?;
            s.rope = Some((table.id, cos, sin, table.max_pos()));
        }
        let (_, cos, sin, max_pos) = s.rope.as_ref().expect("set above");
        Ok((self.ptr(cos), self.ptr(sin), *max_pos))
    }
}

/// The `.entry` names of a PTX module.
fn entry_points(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split(['(', ' ']).next().unwrap_or(rest))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_of_ptx() {
        let ptx = ".visible .entry add_f32(\n.param .u64 a\n)\n.entry other (\n";
        assert_eq!(entry_points(ptx), vec!["add_f32", "other"]);
    }

    #[test]
    fn includes_expand_once() {
        let src = "#include \"attention.cuh\"\n#include \"common.cuh\"\nint x;\n";
        let out = nvrtc::expand(src).unwrap();
        assert_eq!(out.matches("struct RowKv {").count(), 1);
        assert!(out.contains("struct AttnParams"));
        assert!(!out.contains("#include \"common.cuh\""));
        assert!(nvrtc::expand("#include \"nope.cuh\"\n").is_err());
    }

    #[test]
    fn programmatic_launches_only_where_their_waits_are_compiled() {
        for (cc, arch, pdl) in [
            ((8, 0), "compute_80", false),
            ((8, 9), "compute_89", false),
            ((9, 0), "compute_90", true),
            ((10, 0), "compute_100", true),
            ((10, 3), "compute_90", true),
            ((11, 0), "compute_90", true),
            ((12, 1), "compute_90", true),
        ] {
            let a = arch_of(cc, (12, 8)).unwrap();
            assert_eq!((a, pdl_compiled(a)), (arch, pdl), "{cc:?}");
        }
        assert!(arch_of((7, 5), (12, 8)).is_err());
        // An NVRTC older than 12.8 cannot compile for compute_100 / compute_120: those GPUs
        // get compute_90's PTX, which the driver JIT-compiles forward.
        for nvrtc in [(12, 4), (12, 7)] {
            assert_eq!(arch_of((10, 0), nvrtc).unwrap(), "compute_90");
            assert_eq!(arch_of((12, 0), nvrtc).unwrap(), "compute_90");
            assert_eq!(arch_of((8, 9), nvrtc).unwrap(), "compute_89");
        }
        assert_eq!(arch_of((12, 0), (13, 0)).unwrap(), "compute_120");
    }

    #[test]
    fn skip_ops_parse() {
        assert!(skip_ops_from(None).is_empty());
        assert!(skip_ops_from(Some(" , ")).is_empty());
        assert_eq!(
            skip_ops_from(Some("attention, linear,,")),
            vec!["attention".to_string(), "linear".to_string()]
        );
    }
}

/// Compiles every kernel through the same path the backend takes (include expansion, NVRTC,
/// the cache), where NVRTC and the CUDA headers are present: no GPU is needed. CI's
/// `tools/check_kernels.py` covers machines without them.
#[cfg(test)]
mod nvrtc_tests {
    /// Says why the test cannot run, and returns (a skip), unless `GRAM_REQUIRE_GPU=1` (the
    /// GPU machine's runs) makes it a failure; CI fails on the word "skipping" in its log.
    fn skip(why: &str) {
        if std::env::var("GRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("GRAM_REQUIRE_GPU=1 but {why}");
        }
        eprintln!("skipping: {why}");
    }

    #[test]
    fn every_kernel_compiles_through_the_backend_path() {
        // SAFETY: dlopen() probe only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return skip("no libnvrtc on the library path");
        }
        let Ok(include) = super::nvrtc::cuda_include_dir() else {
            return skip("no CUDA headers (set GRAM_CUDA_INCLUDE)");
        };
        for &(file, source) in super::nvrtc::SOURCES {
            let ptx = super::nvrtc::compile(file, source, "compute_90", &include)
                .unwrap_or_else(|e| panic!("{e}"));
            let entries = super::entry_points(&ptx);
            let declared = source.matches("extern \"C\" __global__").count();
            assert_eq!(entries.len(), declared, "{file}: entry points {entries:?}");
            // Programmatic launches (kernels/common.cuh) are safe only if every kernel waits
            // for the one before it.
            for body in ptx.split(".entry ").skip(1) {
                let name = body.split(['(', ' ']).next().unwrap_or(body);
                assert!(
                    body.contains("griddepcontrol.wait"),
                    "{file}: kernel {name} never calls gram_pdl_wait"
                );
            }
        }
    }
}
