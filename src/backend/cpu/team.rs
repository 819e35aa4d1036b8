//! Fork-join for the forward pass's parallel regions.
//!
//! A decode step forks about 150 times (a few matmuls and an attention per layer), each region
//! tens of microseconds long. Under rayon a thread that runs out of work yields a few dozen
//! times and then sleeps on a futex; on a virtual machine the next region's wake-up (an
//! inter-processor interrupt through the hypervisor) then costs about as much as the region
//! itself. A [`Team`] keeps its workers spinning on one counter for a while after each region,
//! so the next region starts on every core at once: first without giving up the core
//! ([`SPIN_HOT`], the gaps inside a pass), then yielding it every few microseconds to any thread
//! that waits for one (until the team's idle spin, [`DEFAULT_SPIN`] unless [`set_idle_spin`]:
//! the gaps between a search's passes and between one request and the next, where the server's
//! HTTP threads and scorer run on a core kept awake), and only then do they park.
//!
//! The caller of [`Team::run`] works too: a team of `n` threads has `n - 1` workers. Tasks are
//! claimed from one shared word (the region's number, its task count and the next task), so a
//! region's tasks spread over whoever is there first, and the caller waits only for the tasks
//! others claimed, never for a worker that has not shown up (one that lost its core to another
//! thread). In a server ([`set_yield_after_region`]) a worker also yields its core after its
//! share of each region, so that the server's other threads take it between regions, not in
//! the middle of one. Regions nest nowhere and one caller runs at a time; a second caller, or
//! a task that forks again, runs its tasks itself, in order.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next region before it parks: longer than the gap
/// between a beam step's regions and between its steps, and than the server's gap between one
/// request's last step and the next one's first at one client (scoring, writing the answer, the
/// client's turn: about 1 ms on a 2-vCPU Intel VM). A parked worker leaves its core idle, and
/// on a virtual machine an idle vCPU halts: waking any thread onto it (the HTTP thread that
/// answers, the batcher at the next request) then costs 50–80 µs through the hypervisor. 300 µs
/// here gave 0.28–0.33 ms of the server's own time a request at one client on that VM, 1.5 ms
/// 0.17–0.19 ms (docs/PERF.md, "Serving at one client: idle cores"). Still short enough that an
/// idle server stops spinning at once. The cost: while requests come less than this apart, the
/// `threads - 1` workers never park and keep their cores busy yielding (on a host of many cores
/// at light but steady load, most of its cores); [`set_idle_spin`] trades it back.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(1500);

/// The idle spin of teams made from now on, in microseconds ([`set_idle_spin`]).
static IDLE_SPIN_US: AtomicU64 = AtomicU64::new(DEFAULT_SPIN.as_micros() as u64);

/// How long the workers of teams made from now on spin, idle, before they park (process-wide;
/// `gram serve --idle-spin-us`). Zero parks them once they have kept their core 20 µs (the
/// gaps inside a pass still spin).
pub fn set_idle_spin(spin: Duration) {
    let us = u64::try_from(spin.as_micros()).unwrap_or(u64::MAX);
    IDLE_SPIN_US.store(us, Ordering::Relaxed);
}

/// The idle spin new teams get ([`set_idle_spin`]).
pub fn idle_spin() -> Duration {
    Duration::from_micros(IDLE_SPIN_US.load(Ordering::Relaxed))
}

/// Whether the workers of teams made from now on yield their core once after their share of
/// each region ([`set_yield_after_region`]; off unless set).
static YIELD_AFTER_REGION: AtomicBool = AtomicBool::new(false);

/// Makes the workers of teams made from now on yield their core once after their share of each
/// region (process-wide; `gram serve` turns it on). A thread of the same process that waits
/// for a core (an HTTP thread under `SCHED_BATCH`, a scorer) then takes it between regions,
/// instead of at the scheduler's next tick in the middle of one, where the worker would hold
/// up the region's end with a task half done; a worker off its core when the next region starts
/// costs that region its share of the work, never a wait (tasks go to whoever claims them).
/// Measured in the server on 2 vCPUs: +3 % answered and −6 % admitted p99 under twice the
/// saturating rate (docs/SERVER.md, "A yield after each region"). Off elsewhere: on a host
/// shared with other busy processes a worker would hand them its core ~150 times a step.
pub fn set_yield_after_region(on: bool) {
    YIELD_AFTER_REGION.store(on, Ordering::Relaxed);
}

/// How long of the idle spin an idle worker keeps its core without yielding it: the gaps between
/// one pass's regions (norms, RoPE, the residual) are a few microseconds.
const SPIN_HOT: Duration = Duration::from_micros(20);

/// The job before the first region.
static NOTHING: fn(usize) = |_| {};

/// A region's tasks: `f(i)` for `i < n`. A thread reads it only after claiming one of its tasks
/// (see [`claim`]), and the region's caller waits for every claimed task, so the borrow it erases
/// outlives every use.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
}

/// Bits of [`Shared::region`]: the next task (low), the task count, the region's number (high).
const TASK_BITS: u32 = 20;
/// Most tasks one region takes; [`Team::run`] groups more.
const MAX_TASKS: usize = (1 << TASK_BITS) - 1;
const EPOCH_MASK: u64 = (1 << (64 - 2 * TASK_BITS)) - 1;

fn pack(epoch: u64, n: usize, next: usize) -> u64 {
    ((epoch & EPOCH_MASK) << (2 * TASK_BITS)) | ((n as u64) << TASK_BITS) | next as u64
}

/// `(epoch, n, next)` of a region word.
fn unpack(w: u64) -> (u64, usize, usize) {
    let low = (1u64 << TASK_BITS) - 1;
    (
        w >> (2 * TASK_BITS),
        ((w >> TASK_BITS) & low) as usize,
        (w & low) as usize,
    )
}

struct Shared {
    /// The current region: its number (moves once per region, and once more to stop the
    /// workers), its task count and the next task to claim. A task is claimed by moving `next`
    /// on with a compare-exchange, so no task of a region runs twice or after its region.
    region: AtomicU64,
    /// The current region's tasks; written by the caller before it publishes `region`.
    job: UnsafeCell<Job>,
    /// Tasks of the current region finished (claimed by anyone).
    done: AtomicUsize,
    /// The first panic of the region's tasks, for the caller to resume.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    stop: AtomicBool,
    /// Workers parked (or about to park) on `wake`.
    parked: AtomicUsize,
    /// How long an idle worker spins before it parks.
    spin: Duration,
    /// Whether a worker yields its core after its share of each region
    /// ([`set_yield_after_region`]).
    yield_after: bool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the one caller `Team::busy` admits, once every task of the
// previous region is done (`done` reached its count; no task is left to claim), so no thread
// reads it then; a thread reads it only after claiming a task of the region that published it
// (Release store, Acquire compare-exchange), before that task counts as done; the closure it
// points to is `Sync`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A caller and its `n - 1` spinning workers; see the module's note.
pub struct Team {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held by the caller of a region: one region at a time.
    busy: Mutex<()>,
}

thread_local! {
    /// The team [`Team::enter`] made current on this thread (null for none).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs a region's tasks: a fork inside one runs inline.
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

impl Team {
    /// A team of `threads` (the caller and `threads - 1` workers named `{name}-{i}`), its
    /// workers spinning [`idle_spin`] when idle before they park.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Team> {
        Team::with_spin(threads, name, idle_spin())
    }

    /// [`Team::new`] with workers that spin `spin` when idle before they park.
    pub fn with_spin(threads: usize, name: &str, spin: Duration) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            spin,
            yield_after: YIELD_AFTER_REGION.load(Ordering::Relaxed),
            region: AtomicU64::new(pack(0, 0, 0)),
            job: UnsafeCell::new(Job { f: &NOTHING }),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut team = Team {
            shared,
            workers: Vec::new(),
            busy: Mutex::new(()),
        };
        for i in 1..threads.max(1) {
            let s = Arc::clone(&team.shared);
            // On an error `team` drops here, which stops the workers already started.
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&s))?;
            team.workers.push(h);
        }
        Ok(team)
    }

    /// Threads that run a region's tasks (the caller included).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f` with this team current on this thread: [`for_each`] and [`threads`] inside it
    /// use the team.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Team);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self)));
        f()
    }

    /// `f(i)` for every `i < n`, on the caller and the workers; returns when all have run. A
    /// panic in a task is resumed here once the region is over.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let busy = if n > 1 && !self.workers.is_empty() && !IN_REGION.with(Cell::get) {
            match self.busy.try_lock() {
                Ok(g) => Some(g),
                // Poisoned only by a panic elsewhere while holding it: the lock is still good.
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        } else {
            None
        };
        let Some(busy) = busy else {
            (0..n).for_each(f);
            return;
        };
        if n > MAX_TASKS {
            drop(busy);
            let per = n.div_ceil(MAX_TASKS);
            return self.run(n.div_ceil(per), &|t| {
                (t * per..n.min((t + 1) * per)).for_each(f)
            });
        }
        let s = &*self.shared;
        // SAFETY: `busy` admits one caller, and every task of the last region is done (its
        // caller waited for `done`), so nothing reads `job` now; the erased borrow is read only
        // by threads that claim a task of this region, and this call waits for those below.
        unsafe {
            let f: *const (dyn Fn(usize) + Sync + '_) = f;
            *s.job.get() = Job {
                f: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(f),
            };
        }
        s.done.store(0, Ordering::Relaxed);
        let (epoch, _, _) = unpack(s.region.load(Ordering::Relaxed));
        s.region.store(pack(epoch + 1, n, 0), Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        // Waits for the claimed tasks even if this thread unwinds: `f` must outlive them.
        let wait = WaitForTasks(s, n);
        claim(s);
        drop(wait);
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Released before a panic resumes, which would poison it.
        drop(busy);
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        let (epoch, _, _) = unpack(s.region.load(Ordering::SeqCst));
        s.region.store(pack(epoch + 1, 0, 0), Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Spins (yielding now and then) until all `.1` tasks of the current region are done, when
/// dropped.
struct WaitForTasks<'a>(&'a Shared, usize);

impl Drop for WaitForTasks<'_> {
    fn drop(&mut self) {
        let mut spins = 0u32;
        while self.0.done.load(Ordering::Acquire) < self.1 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                // A worker that lost its core mid-task needs one to finish it.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// The next task of the current region, claimed, or `None` when all are claimed.
fn next_task(s: &Shared) -> Option<usize> {
    let mut w = s.region.load(Ordering::Acquire);
    loop {
        let (_, n, next) = unpack(w);
        if next >= n {
            return None;
        }
        match s
            .region
            .compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(next),
            Err(now) => w = now,
        }
    }
}

/// Claims and runs the current region's tasks until none is left. Never unwinds: a task's
/// panic is kept for the caller.
fn claim(s: &Shared) {
    IN_REGION.with(|r| r.set(true));
    while let Some(i) = next_task(s) {
        // SAFETY: task `i` is claimed and not yet done, so its region's caller is still
        // waiting: `job` is that region's (published before the word this claim moved) and its
        // closure alive.
        let f = unsafe { &*(*s.job.get()).f };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            let extra = {
                let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                match *slot {
                    None => {
                        *slot = Some(p);
                        None
                    }
                    Some(_) => Some(p),
                }
            };
            // A later panic's payload, dropped outside the lock; its drop may panic too.
            let _ = catch_unwind(AssertUnwindSafe(|| drop(extra)));
        }
        s.done.fetch_add(1, Ordering::Release);
    }
    IN_REGION.with(|r| r.set(false));
}

/// A worker: waits for each region (spinning, then parked), runs its share, checks out.
fn worker(s: &Shared) {
    // The region before any (not a load: a region published before this thread starts is
    // still worth joining).
    let mut seen = 0;
    let epoch = |order| unpack(s.region.load(order)).0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if epoch(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            let idle = start.elapsed();
            if idle <= SPIN_HOT {
                continue;
            }
            if idle <= s.spin {
                // A few microseconds between yields: where other threads wait for this core
                // (an HTTP thread, the scorer), they get it at once.
                std::thread::yield_now();
                continue;
            }
            {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_add(1, Ordering::SeqCst);
                while epoch(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.parked.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
        seen = epoch(Ordering::Acquire);
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        claim(s);
        if s.yield_after {
            // Its share is done: a thread waiting for a core gets this one now, between
            // regions ([`set_yield_after_region`]).
            std::thread::yield_now();
        }
    }
}

/// `f(i)` for every `i < n` in parallel: on the current team (see [`Team::enter`]), else on
/// rayon's pool.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let team = CURRENT.with(Cell::get);
    if IN_REGION.with(Cell::get) {
        (0..n).for_each(f);
    } else if team.is_null() {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(&f);
    } else {
        // SAFETY: `enter` keeps the team alive, and current, for as long as this thread runs
        // inside it; it restores the previous pointer when it returns or unwinds.
        unsafe { &*team }.run(n, &f);
    }
}

/// `f(i, chunk)` for the `i`-th `len`-element chunk of `out` (the last one may be shorter), in
/// parallel as [`for_each`].
pub fn for_each_chunk<T: Send>(out: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(
        len > 0,
        "for_each_chunk: chunks of 0 elements; this is a bug"
    );
    let total = out.len();
    let base = SendPtr(out.as_mut_ptr());
    for_each(total.div_ceil(len), |i| {
        let start = i * len;
        let n = len.min(total - start);
        // SAFETY: chunk `i` is `out[start..start + n]`, in bounds, and each index runs once
        // (`for_each`), so no two calls share an element; `out` is borrowed mutably for the
        // whole call.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.at(start), n) };
        f(i, chunk)
    });
}

/// A raw pointer the tasks of one region share (see [`for_each_chunk`]).
struct SendPtr<T>(*mut T);
// SAFETY: the tasks that share it write disjoint ranges (`for_each_chunk`).
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// `self + i` (a method, so closures capture the whole `Sync` wrapper).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Threads a region gets: the current team's, else rayon's.
pub fn threads() -> usize {
    let team = CURRENT.with(Cell::get);
    if team.is_null() {
        rayon::current_num_threads()
    } else {
        // SAFETY: as in `for_each`.
        unsafe { &*team }.threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once, over many regions back to back and after the workers
    /// have parked, from one team of each size.
    #[test]
    fn every_task_runs_once_in_every_region() {
        for threads in [1, 2, 3, 8] {
            let team = Team::new(threads, "test").unwrap();
            assert_eq!(team.threads(), threads);
            each_task_once(&team, 300, 37, true);
        }
    }

    /// `rounds` regions of `round % modulus` tasks on `team`, each task run exactly once;
    /// with `rest`, a pause long enough for the workers to park every 100 rounds.
    fn each_task_once(team: &Team, rounds: usize, modulus: usize, rest: bool) {
        for round in 0..rounds {
            let n = round % modulus;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            team.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{round}"
            );
            if rest && round % 100 == 99 {
                std::thread::sleep(DEFAULT_SPIN * 4);
            }
        }
    }

    /// Teams made after `set_yield_after_region(true)` yield after each region's share, those
    /// made before (or after it is turned off again) do not, and every task still runs once.
    #[test]
    fn yielding_after_regions_is_taken_at_team_creation_and_changes_no_result() {
        let before = Team::new(2, "test").unwrap();
        set_yield_after_region(true);
        let yielding = Team::new(3, "test").unwrap();
        set_yield_after_region(false);
        let after = Team::new(2, "test").unwrap();
        assert!(!before.shared.yield_after && yielding.shared.yield_after);
        assert!(!after.shared.yield_after);
        each_task_once(&yielding, 200, 29, false);
    }

    /// An idle worker parks once its team's idle spin is over, not before.
    #[test]
    fn a_worker_parks_once_its_idle_spin_is_over() {
        let parked_after_a_region = |spin: Duration, wait: Duration| {
            let team = Team::with_spin(2, "test-spin", spin).unwrap();
            team.run(4, &|_| {});
            let t = Instant::now();
            while t.elapsed() < wait && team.shared.parked.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            team.shared.parked.load(Ordering::SeqCst)
        };
        assert_eq!(
            parked_after_a_region(Duration::ZERO, Duration::from_secs(10)),
            1,
            "no spin: parked at once"
        );
        assert_eq!(
            parked_after_a_region(Duration::from_secs(30), Duration::from_millis(50)),
            0,
            "parked during its spin"
        );
    }

    /// A region of more tasks than one region word holds runs each exactly once (in groups).
    #[test]
    fn more_tasks_than_a_region_holds_run_once_each() {
        let team = Team::new(2, "test").unwrap();
        let n = MAX_TASKS + 5;
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        team.run(n, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    /// A task's panic reaches the caller once the region is over, and the team keeps working.
    #[test]
    fn a_panic_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2, "test").unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(8, &|i| assert!(i != 5, "task five"));
        }));
        let msg = r.expect_err("must panic");
        let msg = (msg.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| msg.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("task five"), "{msg}");
        // The next region still runs on both threads: each task waits (up to 5 s) until two
        // threads have been seen, so a team left serial fails here instead of passing slowly.
        let seen = Mutex::new(std::collections::HashSet::new());
        team.run(8, &|_| {
            seen.lock().unwrap().insert(std::thread::current().id());
            let start = Instant::now();
            while seen.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(5) {
                std::thread::yield_now();
            }
        });
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "the team went serial after a panic"
        );
    }

    /// `for_each` and `threads` use the entered team, a fork inside a task runs inline, and
    /// two callers at once each get all their tasks run.
    #[test]
    fn entered_team_nested_forks_and_concurrent_callers() {
        let team = Team::new(3, "test").unwrap();
        team.enter(|| {
            assert_eq!(threads(), 3);
            let count = AtomicUsize::new(0);
            for_each(6, |_| {
                for_each(4, |_| {
                    count.fetch_add(1, Ordering::Relaxed);
                });
            });
            assert_eq!(count.load(Ordering::Relaxed), 24);
        });
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        team.run(5, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 5);
    }
}
