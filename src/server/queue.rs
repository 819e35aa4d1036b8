//! The queue in front of the batcher: bounded by depth, and by how long a job would wait for a
//! place in the batch at its recent service rate (`--max-queue-wait-ms`) while jobs come faster
//! than the batch answers them. The batcher ([`super::batcher`]) drains it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::search::{Prepared, Response};

use super::metrics::Metrics;

/// A prepared request waiting for the batch.
pub struct Job {
    pub prepared: Prepared,
    pub reply: oneshot::Sender<Reply>,
    /// When it entered the queue.
    pub enqueued: Instant,
    /// Past this it is no longer admitted (its handler answers 504).
    pub deadline: Instant,
}

/// What the batcher sends back for a job.
pub type Reply = std::result::Result<Done, Failed>;

/// A finished search.
pub struct Done {
    pub response: Response,
    /// Seconds it waited in the queue before its first step.
    pub queue_s: f64,
}

/// Why a job got no response.
#[derive(Debug)]
pub enum Failed {
    /// Its deadline passed before it was admitted.
    Timeout,
    /// The engine refused or failed it: the error's kind (`Error::kind`) and message.
    Engine { kind: &'static str, message: String },
}

impl Failed {
    pub(super) fn engine(e: &Error) -> Failed {
        Failed::Engine {
            kind: e.kind(),
            message: e.client_message(),
        }
    }

    /// A decoder step's failure, answered to every request in the step: never the caller's
    /// fault (each request was checked when it was prepared and admitted), so an `input`
    /// error from inside the step is answered as `internal` (a 500, not a 422).
    pub(super) fn step(e: &Error) -> Failed {
        match e.kind() {
            "input" => Failed::Engine {
                kind: "internal",
                message: e.to_string(),
            },
            _ => Failed::engine(e),
        }
    }
}

/// Why the queue refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It holds `max_queue` jobs already.
    Full,
    /// At the batch's service rate, a job queued now would wait longer than the wait bound
    /// before its first step (`wait_ms`: that estimate).
    TooLong { wait_ms: u64 },
    /// The server is shutting down (or the batcher stopped).
    Closed,
}

/// The bounded queue between the handlers and the batcher thread.
pub struct Queue {
    state: Mutex<QueueState>,
    /// Signalled on every push, drain and close.
    pub(super) changed: Condvar,
    capacity: usize,
    /// The wait bound ([`Queue::with_wait_bound`]): the longest wait.
    wait_bound: Option<Duration>,
    /// Places in the batch (`--max-batch`; [`Queue::set_max_batch`] once the backend is known).
    max_batch: std::sync::atomic::AtomicUsize,
    /// Requests in the batch now (the batcher reports it): with the batch size, how many
    /// queued jobs can enter at its next step without waiting for one to finish.
    in_flight: std::sync::atomic::AtomicUsize,
    /// The batch's recent service rate (the batcher reports every step).
    service: Mutex<ServiceRate>,
    /// Jobs queued, published under the lock at every change ([`Queue::publish_depth`]): what
    /// [`Queue::stalled`] reads without taking the lock.
    depth: std::sync::atomic::AtomicUsize,
    /// No more jobs are taken. Set with the lock held ([`Queue::close`], `fail_all`), so that a
    /// thread that checks it under the lock and waits on `changed` cannot miss it; read without
    /// the lock by [`Queue::is_closed`] (a `/ready` probe must not wait behind pushes).
    closed: std::sync::atomic::AtomicBool,
    /// Its depth gauge, set under the lock.
    pub(super) metrics: Arc<Metrics>,
    /// Progress of the batcher and the scoring threads, for [`Queue::stalled`].
    progress: Progress,
    /// Errors the batcher's next steps give instead of stepping (tests of its failure paths).
    #[cfg(test)]
    pub(super) step_faults: Mutex<VecDeque<crate::Error>>,
    /// How long the batcher's next steps sleep before stepping (tests of a step that hangs).
    #[cfg(test)]
    pub(super) step_sleeps: Mutex<VecDeque<Duration>>,
}

/// When the batcher or a scoring thread last moved on, and how many requests are being scored:
/// what [`Queue::stalled`] reads.
struct Progress {
    born: Instant,
    /// Microseconds from `born` to the last progress.
    last_us: std::sync::atomic::AtomicU64,
    /// Requests handed to the scoring threads and not yet answered.
    scoring: std::sync::atomic::AtomicUsize,
}

impl Progress {
    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// The wait bound's decision for a job that finds `depth` jobs queued and `free` places in the
/// batch, at `rate` answers a second: the first `free` queued jobs (it among them) enter at the
/// next step; each one past them waits for an answer to free a place, so the job waits about
/// `(depth + 1 - free) / rate`. `None`: no wait, or too few answers to estimate (then only the
/// depth bound applies).
fn wait_refusal(
    depth: usize,
    free: usize,
    rate: Option<f64>,
    max_wait: Duration,
) -> Option<Refusal> {
    let waiting = (depth + 1).saturating_sub(free);
    if waiting == 0 {
        return None;
    }
    let wait = waiting as f64 / rate.filter(|r| *r > 0.0)?;
    (wait > max_wait.as_secs_f64()).then(|| Refusal::TooLong {
        wait_ms: (wait * 1e3).round() as u64,
    })
}

/// The batch's recent service rate: answers per second of stepping, over the steps that
/// answered the last [`ServiceRate::KEEP`] requests (none older than
/// [`ServiceRate::MAX_AGE`]). Idle time does not count, so after a quiet spell the rate is
/// still what the batch can do, not what the traffic asked of it. Queued jobs leave at about
/// this rate while the batch is busy, so a job queued behind `d` others waits about
/// `d / rate`.
#[derive(Default)]
pub struct ServiceRate {
    /// `(when, answers, seconds of stepping since the entry before)`, oldest first.
    steps: VecDeque<(Instant, usize, f64)>,
    answers: usize,
    /// Stepping not yet attributed to an answer (steps that finished no request).
    pending_s: f64,
}

impl ServiceRate {
    const KEEP: usize = 64;
    const MAX_AGE: Duration = Duration::from_secs(30);

    /// A step of `seconds` finished at `now` and answered `n` requests.
    pub fn stepped(&mut self, n: usize, seconds: f64, now: Instant) {
        self.pending_s += seconds.max(0.0);
        if n == 0 {
            return;
        }
        self.steps.push_back((now, n, self.pending_s));
        self.answers += n;
        self.pending_s = 0.0;
        // Keep the fewest newest steps that still hold KEEP answers.
        while self
            .steps
            .front()
            .is_some_and(|&(_, m, _)| self.answers - m >= Self::KEEP)
        {
            let (_, m, _) = self.steps.pop_front().expect("checked above");
            self.answers -= m;
        }
    }

    /// Answers per second of stepping at `now`, or `None` with fewer than 8 answers in the
    /// last [`ServiceRate::MAX_AGE`] (too few to say).
    pub fn per_second(&mut self, now: Instant) -> Option<f64> {
        while let Some(&(t, m, _)) = self.steps.front() {
            if now.saturating_duration_since(t) <= Self::MAX_AGE {
                break;
            }
            self.steps.pop_front();
            self.answers -= m;
        }
        if self.answers < 8 {
            return None;
        }
        // At least 1 ms of stepping: answers in no measured time are not an infinite rate.
        let busy: f64 = self.steps.iter().map(|&(_, _, s)| s).sum::<f64>().max(1e-3);
        Some(self.answers as f64 / busy)
    }
}

/// The rate jobs are offered at (admitted or refused): the last [`ArrivalRate::KEEP`]
/// arrival times, none older than [`ArrivalRate::MAX_AGE`], measured up to now (so the rate
/// falls when traffic stops). The age bound keeps a quiet spell out of a burst's rate: with
/// the arrivals before the spell still counted, the first hundred of a burst looked slow, the
/// wait bound stood aside and the queue filled to `--max-queue`.
#[derive(Default)]
pub struct ArrivalRate {
    times: VecDeque<Instant>,
}

impl ArrivalRate {
    const KEEP: usize = 128;
    const MAX_AGE: Duration = Duration::from_secs(1);

    /// A job was offered at `now`.
    pub fn arrived(&mut self, now: Instant) {
        self.times.push_back(now);
        if self.times.len() > Self::KEEP {
            self.times.pop_front();
        }
    }

    /// Jobs offered per second at `now`: from the first kept arrival to now, or, with fewer
    /// than 16 in the last [`ArrivalRate::MAX_AGE`], their count over that window (a rate that
    /// slow is not worth a finer estimate, and "unknown" would apply the wait bound to every
    /// quiet server). `None` before any arrival.
    pub fn per_second(&mut self, now: Instant) -> Option<f64> {
        while self
            .times
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > Self::MAX_AGE)
        {
            self.times.pop_front();
        }
        let first = *self.times.front()?;
        let n = self.times.len();
        if n < 16 {
            return Some(n as f64 / Self::MAX_AGE.as_secs_f64());
        }
        let span = now.saturating_duration_since(first).as_secs_f64().max(1e-6);
        Some((n - 1) as f64 / span)
    }
}

/// Whether the wait bound applies: traffic comes faster than the batch answers (or either rate
/// is unknown). Below that, a queue that builds up (a burst, or a run of slow queries filling
/// the batch) drains by itself, and refusing would turn away requests the server has the
/// capacity for (0.23 % of them at 82 % of the saturating rate, docs/SERVER.md).
fn overloaded(arrivals: Option<f64>, service: Option<f64>) -> bool {
    match (arrivals, service) {
        (Some(a), Some(s)) => a > s,
        _ => true,
    }
}

pub(super) struct QueueState {
    pub(super) jobs: VecDeque<Job>,
    /// Jobs offered, for [`overloaded`].
    pub(super) arrivals: ArrivalRate,
    /// Shutting down: no gathering window (jobs are still taken).
    pub(super) draining: bool,
    /// When the job at the head, waiting although places are free for decoder rows
    /// (`--max-batch-rows`) or for KV entries of the arena (a wide beam), was queued. Jobs
    /// behind it pass it while it is younger than `batcher::HEAD_PASS`; after that nothing
    /// does, and no place counts as free for the wait bound until it joins.
    pub(super) head_blocked: Option<Instant>,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                arrivals: ArrivalRate::default(),
                draining: false,
                head_blocked: None,
            }),
            changed: Condvar::new(),
            capacity,
            wait_bound: None,
            max_batch: 1.into(),
            in_flight: Default::default(),
            service: Mutex::new(ServiceRate::default()),
            depth: 0.into(),
            closed: false.into(),
            metrics,
            progress: Progress {
                born: Instant::now(),
                last_us: 0.into(),
                scoring: 0.into(),
            },
            #[cfg(test)]
            step_faults: Default::default(),
            #[cfg(test)]
            step_sleeps: Default::default(),
        }
    }

    /// The error the batcher's next step gives instead of stepping, after a sleep: each one a
    /// test queued, never one outside tests.
    #[cfg(test)]
    pub(super) fn step_fault(&self) -> Option<crate::Error> {
        let sleep = self.step_sleeps.lock().unwrap().pop_front();
        if let Some(d) = sleep {
            std::thread::sleep(d);
        }
        self.step_faults.lock().unwrap().pop_front()
    }

    #[cfg(not(test))]
    #[inline(always)]
    pub(super) fn step_fault(&self) -> Option<crate::Error> {
        None
    }

    /// Also refuses a job that, at the batch's recent service rate, would wait longer than
    /// `max_wait` for a place in the batch ([`Queue::set_max_batch`] places;
    /// [`Queue::set_in_flight`] says how many are taken): under overload, admitted requests keep
    /// their latency and the rest get 503 at once, whatever the model's speed (a fixed depth
    /// means 40 ms of waiting for one model and 30 s for another). A job that finds a free
    /// place does not wait, and none is refused this way while jobs come slower than the batch
    /// answers them ([`overloaded`]): then only `capacity` bounds the queue.
    pub fn with_wait_bound(mut self, max_wait: Duration) -> Queue {
        self.wait_bound = Some(max_wait);
        self
    }

    /// The batch has `n` places (`--max-batch`).
    pub fn set_max_batch(&self, n: usize) {
        self.max_batch
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The batch now holds `n` requests.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The batcher ran a step of `seconds` that answered `n` requests (the service rate the
    /// wait bound estimates from).
    pub fn stepped(&self, n: usize, seconds: f64) {
        self.progressed();
        self.service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stepped(n, seconds, Instant::now());
    }

    /// The batcher or a scoring thread moved on: a turn of the batcher's loop, a step, an
    /// answer.
    pub fn progressed(&self) {
        let p = &self.progress;
        // The latest wins: a thread paused between reading the clock and storing it must not
        // put an older time over a newer one.
        p.last_us
            .fetch_max(p.now_us(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A request goes to the scoring threads (`true`), or has been answered by one (`false`,
    /// which is progress).
    pub fn scoring(&self, handed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if handed {
            self.progress.scoring.fetch_add(1, Relaxed);
        } else {
            self.progress.scoring.fetch_sub(1, Relaxed);
            self.progressed();
        }
    }

    /// How long requests have waited with no progress, where that is longer than `limit`:
    /// requests are queued, in the batch or being scored, and neither the batcher nor a
    /// scoring thread has moved on for that long (a decoder step that does not return, a device
    /// that hangs instead of failing, scoring stuck). `/ready` reports it, so that a load
    /// balancer sends traffic elsewhere. The clock starts again when work arrives at an idle
    /// batcher ([`Queue::push`]), so a long quiet spell does not count.
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        // Not the lock: a `/ready` probe must not wait behind pushes and the batcher. Acquire:
        // a push's `progressed` (before its `publish_depth`) is seen with its job.
        let queued = self.depth.load(std::sync::atomic::Ordering::Acquire) > 0;
        let p = &self.progress;
        let busy = queued || self.in_flight.load(Relaxed) > 0 || p.scoring.load(Relaxed) > 0;
        let since = Duration::from_micros(p.now_us().saturating_sub(p.last_us.load(Relaxed)));
        (busy && since > limit).then_some(since)
    }

    /// The queue now holds `n` jobs: the depth gauge and [`Queue::stalled`]'s count. Called
    /// under the lock, after every change to the jobs.
    pub(super) fn publish_depth(&self, n: usize) {
        self.depth.store(n, std::sync::atomic::Ordering::Release);
        self.metrics.set_queue_depth(n);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The state is a plain list: a panic elsewhere while holding the lock leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`, or refuses it at once (the job is dropped). Returns the new depth.
    ///
    /// Jobs whose handler has gone (deadline passed, client left) are dropped first: the batcher
    /// drops them only between steps, and during a long step they would otherwise fill the
    /// queue and turn live requests away.
    pub fn push(&self, job: Job) -> std::result::Result<usize, Refusal> {
        let mut st = self.lock();
        if self.is_closed() {
            return Err(Refusal::Closed);
        }
        self.drop_gone(&mut st);
        // Every job offered counts toward the arrival rate, a full queue's refusals too.
        let now = Instant::now();
        st.arrivals.arrived(now);
        if let Some(refusal) = self.refusal(&mut st, now) {
            return Err(refusal);
        }
        // Work arriving at an idle batcher: the stall clock starts now, not at its last step.
        let idle = st.jobs.is_empty()
            && self.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
            && self
                .progress
                .scoring
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0;
        if idle {
            self.progressed();
        }
        st.jobs.push_back(job);
        let depth = st.jobs.len();
        self.publish_depth(depth);
        drop(st);
        self.changed.notify_one();
        Ok(depth)
    }

    /// Whether a job offered now would be refused, and why: checked before a request is
    /// prepared, so that under overload a refused request costs no tokenization. A refusal
    /// counts as an offer (an arrival); an admission counts nothing, since [`Queue::push`]
    /// offers the job and checks again. Counting the arrival only then, this check sees a
    /// rate no higher than `push` does, so it refuses nothing `push` would take.
    pub fn refuses_now(&self) -> Option<Refusal> {
        let mut st = self.lock();
        if self.is_closed() {
            return Some(Refusal::Closed);
        }
        self.drop_gone(&mut st);
        let now = Instant::now();
        let refusal = self.refusal(&mut st, now);
        if refusal.is_some() {
            st.arrivals.arrived(now);
        }
        refusal
    }

    /// Drops the jobs whose handler has gone (see [`Queue::push`]); the wait of each goes into
    /// the queue histogram (a request that left unserved waited too).
    fn drop_gone(&self, st: &mut QueueState) {
        let before = st.jobs.len();
        // Read only when a job has gone (this runs on every push).
        let mut now = None;
        st.jobs.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                // To its deadline at most (its handler may have answered a 504 a while ago).
                let waited = (*now.get_or_insert_with(Instant::now))
                    .min(j.deadline)
                    .saturating_duration_since(j.enqueued)
                    .as_secs_f64();
                self.metrics
                    .record_stage(super::metrics::Stage::Queue, waited);
            }
            !gone
        });
        if st.jobs.len() != before {
            self.publish_depth(st.jobs.len());
            // The job that held places may be one of those gone: then nothing holds them (it
            // held the wait bound's free places at 0, refusing arrivals, until the batcher's
            // next admission).
            let blocked = st.head_blocked;
            if blocked.is_some() && !st.jobs.iter().any(|j| Some(j.enqueued) == blocked) {
                st.head_blocked = None;
            }
        }
    }

    /// Why a job offered at `now` is refused, if it is: the queue is full, or (under the wait
    /// bound, while jobs come faster than the batch answers them) the wait would be too long.
    fn refusal(&self, st: &mut QueueState, now: Instant) -> Option<Refusal> {
        if st.jobs.len() >= self.capacity {
            return Some(Refusal::Full);
        }
        let max_wait = self.wait_bound?;
        let depth = st.jobs.len();
        let max_batch = self.max_batch.load(std::sync::atomic::Ordering::Relaxed);
        let in_flight = self.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let held = holds_places(st.head_blocked, now);
        let free = free_places(max_batch, in_flight, held);
        if depth < free {
            return None;
        }
        let rate = self
            .service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .per_second(now);
        let arrivals = st.arrivals.per_second(now);
        if overloaded(arrivals, rate) {
            let refusal = wait_refusal(depth, free, rate, max_wait);
            if refusal.is_some() {
                // Why, for an operator who sees 503s below the rate they expect
                // (`RUST_LOG=gram::server::queue=debug`).
                tracing::debug!(
                    depth,
                    free,
                    in_flight,
                    max_batch,
                    head_blocked = held,
                    arrivals = ?arrivals,
                    rate = ?rate,
                    "refused: the wait would be too long"
                );
            }
            refusal
        } else {
            None
        }
    }

    /// Ends the gathering window for good (shutdown has begun); jobs are still taken.
    pub fn drain(&self) {
        self.lock().draining = true;
        self.changed.notify_all();
    }

    /// Refuses new jobs; the batcher finishes those queued and in flight, then stops.
    pub fn close(&self) {
        let st = self.lock();
        self.set_closed(&st);
        drop(st);
        self.changed.notify_all();
    }

    /// Closes the queue; `_held`: its lock, held by the caller (see `closed`).
    pub(super) fn set_closed(&self, _held: &MutexGuard<'_, QueueState>) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether [`Queue::close`] has run; lock-free, for `/ready`.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Whether a blocked head (queued at `since`) holds every place at `now`: once nothing may pass
/// it any more (`batcher::HEAD_PASS`); before that, jobs that fit join past it.
fn holds_places(head_blocked: Option<Instant>, now: Instant) -> bool {
    head_blocked
        .is_some_and(|since| now.saturating_duration_since(since) >= super::batcher::HEAD_PASS)
}

/// Places a job queued now may take at the next step: none while the head waits for decoder
/// rows (`--max-batch-rows`) or arena entries and nothing may pass it any more
/// (`batcher::HEAD_PASS`).
fn free_places(max_batch: usize, in_flight: usize, head_blocked: bool) -> usize {
    if head_blocked {
        0
    } else {
        max_batch.saturating_sub(in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::{
        free_places, holds_places, overloaded, wait_refusal, ArrivalRate, Refusal, ServiceRate,
    };
    use std::time::{Duration, Instant};

    /// A blocked head holds the places only once nothing may pass it: while it is younger than
    /// `HEAD_PASS`, jobs that fit join past it, and the wait bound counts their places (it
    /// refused every arrival in that window before).
    #[test]
    fn a_blocked_head_holds_the_places_only_once_it_may_not_be_passed() {
        let now = Instant::now();
        let pass = crate::server::batcher::HEAD_PASS;
        assert!(!holds_places(None, now));
        assert!(!holds_places(Some(now), now));
        assert!(!holds_places(Some(now - pass / 2), now));
        assert!(holds_places(Some(now - pass), now));
        assert!(holds_places(Some(now - 3 * pass), now));
    }

    #[test]
    fn no_place_is_free_while_the_head_waits() {
        // While the head waits for rows or arena entries, no place is free for the wait
        // bound's estimate.
        assert_eq!(free_places(16, 5, false), 11);
        assert_eq!(free_places(16, 5, true), 0);
        assert_eq!(free_places(16, 20, false), 0);
    }

    #[test]
    fn the_wait_bound_applies_only_when_jobs_come_faster_than_answers() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut a = ArrivalRate::default();
        assert_eq!(a.per_second(ms(0)), None);
        // Fewer than 16 in the last second: their count over that second.
        for i in 0..15 {
            a.arrived(ms(i * 10));
        }
        assert_eq!(a.per_second(ms(150)), Some(15.0));
        assert!(!overloaded(a.per_second(ms(150)), Some(50.0)));
        // One every 10 ms: 100/s, measured to now.
        a.arrived(ms(150));
        let r = a.per_second(ms(150)).unwrap();
        assert!((r - 100.0).abs() < 1e-6, "{r}");
        assert!(!overloaded(Some(r), Some(120.0)));
        assert!(overloaded(Some(r), Some(80.0)));
        assert!(overloaded(Some(r), None));
        // Traffic stops: the rate falls with time (at 1.1 s, the six of 100..150 ms are left).
        assert_eq!(a.per_second(ms(1_100)), Some(6.0));
        // A burst after a quiet spell is measured alone: 20 in 19 ms is 1,000/s, where the
        // arrivals of ten seconds before, still counted, made it 3.5/s and the bound stood
        // aside while the queue filled.
        for i in 0..20 {
            a.arrived(ms(10_000 + i));
        }
        let burst = a.per_second(ms(10_019)).unwrap();
        assert!((burst - 1_000.0).abs() < 1e-6, "{burst}");
        assert!(overloaded(Some(burst), Some(300.0)));
        // Only the newest 128 count: of a burst of 200 in 20 ms, they came in the last 12 ms.
        let mut b = ArrivalRate::default();
        for i in 0..200 {
            b.arrived(ms(1_000 + i / 10));
        }
        let burst = b.per_second(ms(1_019)).unwrap();
        assert!((burst - 127.0 / 0.012).abs() < 1.0, "{burst}");
    }

    #[test]
    fn a_job_is_refused_only_past_the_wait_bound_at_a_known_rate() {
        let bound = Duration::from_millis(100);
        // A full batch (no free place): 19 queued ahead at 200/s, the job is the 20th to wait
        // for a place: 100 ms, not over.
        assert_eq!(wait_refusal(19, 0, Some(200.0), bound), None);
        // 20 ahead: 105 ms.
        assert_eq!(
            wait_refusal(20, 0, Some(200.0), bound),
            Some(Refusal::TooLong { wait_ms: 105 })
        );
        // 4 free places: the first 4 queued enter at the next step, so 23 ahead is the 20th
        // to wait.
        assert_eq!(wait_refusal(23, 4, Some(200.0), bound), None);
        assert_eq!(
            wait_refusal(24, 4, Some(200.0), bound),
            Some(Refusal::TooLong { wait_ms: 105 })
        );
        // A slow model (2/s): with a full batch, the first to wait is already 500 ms...
        assert_eq!(
            wait_refusal(0, 0, Some(2.0), bound),
            Some(Refusal::TooLong { wait_ms: 500 })
        );
        // ...and a job that finds a free place waits for no answer, however slow the model.
        assert_eq!(wait_refusal(0, 1, Some(2.0), bound), None);
        assert_eq!(wait_refusal(15, 16, Some(0.5), bound), None);
        // No estimate (or a zero rate): only the depth bound applies.
        assert_eq!(wait_refusal(1_000, 0, None, bound), None);
        assert_eq!(wait_refusal(1_000, 0, Some(0.0), bound), None);
    }

    #[test]
    fn the_service_rate_is_answers_per_second_of_stepping() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut r = ServiceRate::default();
        // Too few answers to say.
        r.stepped(7, 0.05, ms(0));
        assert_eq!(r.per_second(ms(10)), None);
        // Steps that answer nothing count their time toward the next answer: 16 answers over
        // 0.05 + 0.02 + 0.01 s of stepping = 200/s, however long the batch sat idle between.
        r.stepped(0, 0.02, ms(5_000));
        r.stepped(9, 0.01, ms(9_000));
        let rate = r.per_second(ms(9_000)).unwrap();
        assert!((rate - 200.0).abs() < 1e-6, "{rate}");
        // Answers in no measured time: at least 1 ms of stepping.
        let mut b = ServiceRate::default();
        b.stepped(10, 0.0, ms(0));
        assert_eq!(b.per_second(ms(0)), Some(10_000.0));
        // The newest steps that hold 64 answers count, and none older than 30 s.
        let mut c = ServiceRate::default();
        for i in 0..20 {
            c.stepped(10, 1.0, ms(i));
        }
        assert_eq!(c.per_second(ms(20)), Some(70.0 / 7.0));
        assert_eq!(c.per_second(ms(30_020)), None);
    }
}
