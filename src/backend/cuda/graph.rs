//! Kernel launches, and a decoder pass as a CUDA graph.
//!
//! Every launch and GEMM of the backend goes through [`CudaBackend::launch`] /
//! [`CudaBackend::gemm`], so a pass (the decoder body of one forward: embedding → layers → final
//! norm, see `model::forward`) can be run three ways without the model code knowing:
//!
//! 1. **Plan**: the pass runs on the host with every upload and allocation done, but launches
//!    are only hashed (kernel, grid, every argument byte: pointers, sizes, parameter structs).
//!    Activation buffers come from per-pass slots (the i-th buffer a pass asks for is always
//!    the same allocation), so the hash names exactly the work the GPU would do.
//! 2. If a graph with that hash exists, it is **replayed** (one `cuGraphLaunch`): the uploads
//!    the plan made are already on the stream, ahead of it.
//! 3. Else the pass runs again under **stream capture** (uploads now find their data already on
//!    the device and copy nothing), the graph is instantiated, cached by the hash and launched.
//!
//! A decode step of a batch keeps its shape from step to step (rows, groups, buffers), so it is
//! captured once and replayed: the host cost of a step becomes the plan walk plus one launch.
//! A pass whose shape (`Backend::run_pass`'s hint: rows, spans) was seen fewer than
//! `GRAM_CUDA_CAPTURE_AFTER` times (default 3) runs as plain launches, unplanned: a batch that
//! changes shape every few steps (queries finishing at different steps) would otherwise pay a
//! plan walk, a capture walk with the GPU idle and an instantiation for graphs it never replays.
//! Anything a graph cannot hold (an upload that changes inside the pass, an allocation during
//! capture, a failed capture) runs the pass **directly** instead, and counts it.

use std::sync::atomic::Ordering;

use cudarc::driver::sys as drv;
use cudarc::driver::CudaGraph;

use super::*;

/// A kernel argument, as the kernel's parameter list takes it.
#[derive(Clone, Copy)]
pub(super) enum KArg<'a> {
    U64(u64),
    U32(u32),
    F32(f32),
    Attn(&'a AttnParams),
    Rope(&'a RopeParams),
    /// A `#[repr(C)]` parameter struct with no implicit padding, as its bytes (the beam step's).
    Pod(&'a [u8]),
}

/// The bytes of `v` (a `#[repr(C)]` plain-data parameter struct).
fn raw<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is plain old data with no padding (AttnParams: 10 pointers + 10 four-byte fields;
    // RopeParams: 11 pointers + 8 four-byte fields), so every byte read is initialized.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// How launches are treated right now (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(super) enum Mode {
    /// Outside a pass: launch, pooled buffers.
    #[default]
    Eager,
    /// Hash launches, do uploads; pass slots.
    Plan,
    /// Launch under stream capture; uploads must be no-ops; pass slots.
    Capture,
    /// Launch; pass slots (a pass that cannot be a graph).
    Direct,
}

/// The state of the pass being run.
#[derive(Default)]
pub(super) struct Pass {
    /// The mode, for `owner` only: every other thread sees `Eager` (a test or a tool calling
    /// an op while another thread plans a pass must not have its launch merely hashed; such a
    /// call is still not safe during a capture: see [`super::CudaBackend`]).
    pub mode: Mode,
    pub owner: Option<std::thread::ThreadId>,
    /// Every launch of the walk, hashed (Plan and Capture).
    pub hasher: std::hash::DefaultHasher,
    /// Activation buffers of passes, by the order a pass asks for them.
    pub slots: Vec<CudaSlice<f32>>,
    pub next: usize,
    /// Upload slots written in this pass (a second, different upload of one slot cannot be a
    /// graph: the graph would read only the last).
    pub uploaded: Vec<Slot>,
    /// Why this pass cannot be captured.
    pub broken: Option<String>,
}

impl Pass {
    pub(super) fn mix_u64(&mut self, v: u64) {
        std::hash::Hasher::write_u64(&mut self.hasher, v);
    }

    fn mix(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.hasher, bytes);
    }

    fn hash(&self) -> u64 {
        std::hash::Hasher::finish(&self.hasher)
    }
}

/// How passes ran: graphs captured, replayed, passes run directly after a plan, passes of a
/// shape seen for the first time (fewer than `GRAM_CUDA_CAPTURE_AFTER` times) run without a
/// plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub captured: usize,
    pub replayed: usize,
    pub direct: usize,
    pub unplanned: usize,
    /// Captures abandoned (the pass then ran directly): a non-zero count is worth a look.
    pub failed_captures: usize,
    /// Host time, nanoseconds: plan walks (hashing a pass's launches before a replay or a
    /// capture), other walks of a pass (launching it: unplanned, captured, direct, graphs
    /// off), and waiting for the GPU in read-backs (the head's results).
    pub plan_ns: u64,
    pub walk_ns: u64,
    pub wait_ns: u64,
    /// Host time ending captures (the graph's instantiation).
    pub instantiate_ns: u64,
}

impl GraphStats {
    /// The counts and times since `earlier`.
    pub fn since(&self, earlier: &GraphStats) -> GraphStats {
        GraphStats {
            captured: self.captured - earlier.captured,
            replayed: self.replayed - earlier.replayed,
            direct: self.direct - earlier.direct,
            unplanned: self.unplanned - earlier.unplanned,
            failed_captures: self.failed_captures - earlier.failed_captures,
            plan_ns: self.plan_ns - earlier.plan_ns,
            walk_ns: self.walk_ns - earlier.walk_ns,
            wait_ns: self.wait_ns - earlier.wait_ns,
            instantiate_ns: self.instantiate_ns - earlier.instantiate_ns,
        }
    }
}

/// The mode of `p` as the calling thread sees it.
pub(super) fn mode_of(p: &Pass) -> Mode {
    if p.owner == Some(std::thread::current().id()) {
        p.mode
    } else {
        Mode::Eager
    }
}

/// Ends a pass however `f` leaves it: Eager mode, and the stream out of capture.
struct ResetOnDrop<'a>(&'a CudaBackend);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.mode() == Mode::Capture {
            let _ = self.0.stream.end_capture(drv::CUgraphInstantiate_flags(0));
        }
        self.0.set_mode(Mode::Eager);
    }
}

/// A captured, instantiated graph. Launched only from inside [`CudaBackend::pass`], which holds
/// the pass lock: never two launches of one graph at once.
pub(super) struct Graph(pub(super) CudaGraph);
// SAFETY: the driver handles are usable from any thread; every use is serialized by the pass
// lock (CUDA's rule for graphs: no concurrent use of one graph object).
unsafe impl Send for Graph {}
// SAFETY: as above.
unsafe impl Sync for Graph {}

/// Graphs kept at most (a new shape past this clears the cache).
const MAX_GRAPHS: usize = 64;

impl CudaBackend {
    /// The mode as this thread sees it.
    pub(super) fn mode(&self) -> Mode {
        mode_of(&lock(&self.pass))
    }

    /// Marks the current pass as not capturable (a no-op outside Plan / Capture).
    pub(super) fn break_pass(&self, why: impl FnOnce() -> String) {
        let mut p = lock(&self.pass);
        if matches!(mode_of(&p), Mode::Plan | Mode::Capture) && p.broken.is_none() {
            p.broken = Some(why());
        }
    }

    /// Launches kernel `name` (or hashes the launch in a plan walk).
    pub(super) fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KArg],
    ) -> Result<()> {
        let f = self.func(name)?;
        {
            // Plan: hash only. Capture: hash too (compared with the plan's afterwards), and
            // launch into the graph.
            let mut p = lock(&self.pass);
            let mode = mode_of(&p);
            if matches!(mode, Mode::Plan | Mode::Capture) {
                p.mix(name.as_bytes());
                // A graph captured with programmatic launches is not replayed without them.
                p.mix(&[self.pdl_on.load(Ordering::Relaxed) as u8]);
                p.mix(raw(&grid));
                p.mix(raw(&block));
                for a in args {
                    match a {
                        KArg::U64(v) => p.mix(raw(v)),
                        KArg::U32(v) => p.mix(raw(v)),
                        KArg::F32(v) => p.mix(raw(&v.to_bits())),
                        KArg::Attn(v) => p.mix(raw(*v)),
                        KArg::Rope(v) => p.mix(raw(*v)),
                        KArg::Pod(v) => p.mix(v),
                    }
                }
            }
            if mode == Mode::Plan {
                return Ok(());
            }
        }
        // Each parameter as the driver wants it: a pointer to its value.
        let mut scalars = [0u64; 16];
        let mut params: Vec<*mut std::ffi::c_void> = Vec::with_capacity(args.len());
        if args.len() > scalars.len() {
            return Err(Error::Device(format!("{name}: too many kernel arguments")));
        }
        for (i, a) in args.iter().enumerate() {
            let p = match a {
                KArg::U64(v) => {
                    scalars[i] = *v;
                    &mut scalars[i] as *mut u64 as *mut _
                }
                KArg::U32(v) => {
                    scalars[i] = *v as u64; // little-endian: the low 4 bytes are the u32
                    &mut scalars[i] as *mut u64 as *mut _
                }
                KArg::F32(v) => {
                    scalars[i] = v.to_bits() as u64;
                    &mut scalars[i] as *mut u64 as *mut _
                }
                KArg::Attn(v) => *v as *const AttnParams as *mut _,
                KArg::Rope(v) => *v as *const RopeParams as *mut _,
                KArg::Pod(v) => v.as_ptr() as *mut _,
            };
            params.push(p);
        }
        // `params` points at values that outlive the launch, one per kernel parameter, in the
        // kernel's order and types (each op builds them from the kernel's signature).
        if !self.pdl_on.load(Ordering::Relaxed) {
            // SAFETY: `params` as said above.
            return unsafe {
                cudarc::driver::result::launch_kernel(
                    f.cu_function(),
                    grid,
                    (block, 1, 1),
                    0,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(dev(name));
        }
        // Programmatic dependent launch: the kernel may start while the one before it on the
        // stream finishes; it waits for it in `gram_pdl_wait` (every kernel of kernels/ does,
        // before it reads or writes what another kernel touches: kernels/common.cuh).
        // SAFETY: a plain C union of integers and structs of integers; all zeros is valid.
        let mut value: drv::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = drv::CUlaunchAttribute {
            id: drv::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = drv::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: `params` as said above; `config` and `attr` outlive the call.
        unsafe {
            drv::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(dev(name))
    }

    /// The next pass slot of at least `len` floats, or `None` outside a pass.
    pub(super) fn pass_buf(&self, len: usize) -> Option<CudaBuf> {
        let mut p = lock(&self.pass);
        let mode = mode_of(&p);
        if mode == Mode::Eager {
            return None;
        }
        let i = p.next;
        p.next += 1;
        let cap = len.max(256).next_power_of_two();
        let fits = p.slots.get(i).is_some_and(|s| s.len() >= cap);
        if !fits {
            if mode == Mode::Capture {
                // Never allocate under capture (it would become a graph allocation, gone with
                // the discarded graph): the capture is abandoned; its launches never run, so a
                // null buffer is safe until the direct walk.
                p.broken
                    .get_or_insert_with(|| "a buffer was needed during capture".into());
                return Some(CudaBuf {
                    mem: BufMem::Pass { ptr: 0 },
                    len,
                });
            }
            // SAFETY: contents unspecified until written, as `Backend::buf` says.
            let fresh = match unsafe { self.stream.alloc::<f32>(cap) } {
                Ok(s) => s,
                Err(e) => {
                    p.broken
                        .get_or_insert_with(|| format!("allocating {cap} floats: {e:?}"));
                    // The index back: slots stay one per index below `next`, so the next
                    // buffer of this walk that does allocate lands at its index (skipped, it
                    // was pushed one place short and the lookup below panicked).
                    p.next = i;
                    return None;
                }
            };
            debug_assert!(
                i <= p.slots.len(),
                "pass slots skipped an index; this is a bug"
            );
            if i < p.slots.len() {
                p.slots[i] = fresh;
            } else {
                p.slots.push(fresh);
            }
        }
        let ptr = self.ptr(&p.slots[i]);
        Some(CudaBuf {
            mem: BufMem::Pass { ptr },
            len,
        })
    }

    /// Turns graph capture of decoder passes on or off (default on; `GRAM_CUDA_GRAPHS=0` starts
    /// it off).
    pub fn set_graphs(&self, on: bool) {
        self.graphs_on.store(on, Ordering::Relaxed);
    }

    /// The sighting of a pass shape at which it is planned and captured (see `CudaBackend`'s
    /// `GRAM_CUDA_CAPTURE_AFTER`).
    pub fn capture_after(&self) -> u32 {
        self.capture_after
    }

    pub fn graph_stats(&self) -> GraphStats {
        *lock(&self.graph_stats)
    }

    fn set_mode(&self, mode: Mode) {
        let mut p = lock(&self.pass);
        p.mode = mode;
        p.owner = (mode != Mode::Eager).then(|| std::thread::current().id());
        p.next = 0;
        p.uploaded.clear();
        if matches!(mode, Mode::Plan | Mode::Capture) {
            p.hasher = Default::default();
        }
        if mode == Mode::Plan {
            p.broken = None;
        }
    }

    /// Runs `f`, one walk of a pass, adding its host time to `walk_ns` (or `plan_ns`).
    fn walk<T>(&self, plan: bool, f: &mut dyn FnMut() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        let ns = t0.elapsed().as_nanos() as u64;
        let mut st = lock(&self.graph_stats);
        if plan {
            st.plan_ns += ns;
        } else {
            st.walk_ns += ns;
        }
        out
    }

    /// Runs one decoder pass `f` as described in the module doc. Every walk of the pass sees
    /// one pass generation: per-pass work (the attention plan and its uploads, the same for
    /// every layer) is done once and reused while the generation lasts.
    pub(super) fn pass<T>(&self, shape: u64, f: &mut dyn FnMut() -> T) -> T {
        struct EndGen<'a>(&'a CudaBackend);
        impl Drop for EndGen<'_> {
            fn drop(&mut self) {
                lock(&self.0.scratch).pass_gen = 0;
            }
        }
        lock(&self.scratch).pass_gen = self.pass_gens.fetch_add(1, Ordering::Relaxed) + 1;
        let _end = EndGen(self);
        self.pass_inner(shape, f)
    }

    fn pass_inner<T>(&self, shape: u64, f: &mut dyn FnMut() -> T) -> T {
        if !self.graphs_on.load(Ordering::Relaxed) || lock(&self.error).is_some() {
            return self.walk(false, f);
        }
        // A shape seen for the first time (a batch that changes every step, a one-off
        // prompt) runs as plain launches: planning it would cost a second walk for nothing.
        // The default also waits out shapes seen twice: a capture and its instantiation cost
        // more than a plain walk, and pay only when the shape recurs.
        {
            let mut shapes = lock(&self.shapes);
            if shapes.len() >= 16 * MAX_GRAPHS {
                shapes.clear();
            }
            let seen = shapes.entry(shape).or_insert(0);
            *seen = seen.saturating_add(1);
            if *seen < self.capture_after {
                drop(shapes);
                lock(&self.graph_stats).unplanned += 1;
                return self.walk(false, f);
            }
        }
        // One pass at a time: the pass state, the slots and the graphs are shared.
        let _one = lock(&self.pass_lock);
        // Whatever happens in `f` (a panic included), the pass ends in Eager mode and the
        // stream leaves capture.
        let _reset = ResetOnDrop(self);
        self.set_mode(Mode::Plan);
        let planned = self.walk(true, f);
        let (hash, broken) = {
            let mut p = lock(&self.pass);
            (p.hash(), p.broken.take())
        };
        if broken.is_some() || lock(&self.error).is_some() {
            return self.direct(f);
        }
        let replay = lock(&self.graphs).get(&hash).map(|g| g.0.cu_graph_exec());
        if let Some(exec) = replay {
            self.set_mode(Mode::Eager);
            self.run("graph", || {
                // SAFETY: the exec is owned by `self.graphs` and alive; same stream.
                unsafe { cudarc::driver::result::graph::launch(exec, self.stream.cu_stream()) }
                    .map_err(dev("replaying a CUDA graph"))
            });
            lock(&self.graph_stats).replayed += 1;
            return planned;
        }
        drop(planned);
        self.set_mode(Mode::Capture);
        if let Err(e) = self
            .stream
            .begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            tracing::debug!("stream capture refused: {e:?}");
            return self.direct(f);
        }
        let out = self.walk(false, f);
        let (broken, captured_hash) = {
            let mut p = lock(&self.pass);
            (p.broken.take(), p.hash())
        };
        let t_end = std::time::Instant::now();
        let graph = self.stream.end_capture(drv::CUgraphInstantiate_flags(0));
        lock(&self.graph_stats).instantiate_ns += t_end.elapsed().as_nanos() as u64;
        self.set_mode(Mode::Eager);
        let failed = lock(&self.error).take();
        // The capture walk must have issued exactly the planned launches.
        let broken = broken.or_else(|| {
            (captured_hash != hash).then(|| "the capture walk differs from the plan".to_string())
        });
        match (broken, failed, graph) {
            (None, None, Ok(Some(g))) => {
                let exec = g.cu_graph_exec();
                self.run("graph", || {
                    // SAFETY: as above; `g` is kept in the cache below.
                    unsafe { cudarc::driver::result::graph::launch(exec, self.stream.cu_stream()) }
                        .map_err(dev("launching a captured CUDA graph"))
                });
                let mut graphs = lock(&self.graphs);
                if graphs.len() >= MAX_GRAPHS {
                    graphs.clear();
                }
                graphs.insert(hash, Graph(g));
                lock(&self.graph_stats).captured += 1;
                out
            }
            (broken, failed, graph) => {
                let first = lock(&self.graph_stats).failed_captures == 0;
                lock(&self.graph_stats).failed_captures += 1;
                let why = format!("{:?} {:?} {:?}", broken, failed, graph.err());
                if first {
                    tracing::warn!(
                        "a decoder pass could not be captured ({why}); it runs directly"
                    );
                } else {
                    tracing::debug!("pass not captured: {why}");
                }
                drop(out);
                self.direct(f)
            }
        }
    }

    fn direct<T>(&self, f: &mut dyn FnMut() -> T) -> T {
        self.set_mode(Mode::Direct);
        let out = self.walk(false, f);
        self.set_mode(Mode::Eager);
        lock(&self.graph_stats).direct += 1;
        out
    }
}
