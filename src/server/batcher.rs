//! The batcher: one dedicated thread that owns the engine's continuous [`Batch`] and drains
//! the bounded queue that handlers push prepared requests into ([`super::queue`]) into it.
//!
//! The thread loop: wait for work; when the batch is idle, hold the first request for the
//! gathering window (or until `max_batch` are queued) so that a burst starts together; admit
//! queued requests in arrival order while fewer than `max_batch` are in flight and their KV fits
//! the arena; run one decoder step over everything in flight; send each finished request's
//! [`Response`] back through its oneshot channel. Requests that arrive while a step runs join
//! the next one (continuous batching), so a long request never holds the others back: each
//! request leaves as soon as its own codes are done.
//!
//! Scoring (postings, S_rele, top K: up to `--max-k` products a request) does not run on the
//! batcher thread: each request whose codes are done goes to a small pool of scoring threads
//! (`--score-threads`), which score it and answer it, while the batcher goes straight on to the
//! next decoder step. Requests with a large `k` finishing together no longer hold up everyone
//! else's next step.
//!
//! A request whose handler has gone (deadline passed, client disconnected) is dropped from the
//! queue before it is admitted; one already admitted is cancelled before the next step (its KV
//! entries free at once for the queue).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::beam::{BeamSearch, Ticket};
use crate::error::{Error, Result};
use crate::search::{Admission, Batch, CodesDone, Engine, Request, Response};

use super::metrics::{Metrics, Stage};

use super::queue::QueueState;
pub use super::queue::{Done, Failed, Job, Queue, Refusal, Reply};

/// How the batcher runs.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most requests in flight at once.
    pub max_batch: usize,
    /// Most decoder rows in a step (0: no bound), see [`fits`].
    pub max_rows: usize,
    /// Gathering window of an idle batch.
    pub batch_wait: Duration,
    /// KV entries of the batch's arena.
    pub arena_entries: usize,
    /// Threads that score the requests whose codes are done (at least 1).
    pub score_threads: usize,
}

/// Prompt tokens allowed for the template's seams around the query (see [`arena_entries`]).
const SEAM_TOKENS: usize = 4;

/// KV entries for `max_batch` requests of the default beam width with the longest query allowed,
/// and at least one request of the widest beam allowed (so any valid request fits alone). A
/// template that leaves no room for the longest query in the model's context is refused here,
/// at startup.
pub fn arena_entries<B: Backend>(
    engine: &Engine<B>,
    max_batch: usize,
    default_beam: usize,
) -> Result<usize> {
    let limits = *engine.limits();
    let probe = |beam: usize| -> Result<usize> {
        let p = engine.prepare(Request {
            beam,
            k: 1,
            ..Request::new("x")
        })?;
        // The probe's one query token stands for up to `max_query_tokens`.
        let longest = (p.prompt_tokens() - 1).saturating_add(limits.max_query_tokens);
        let positions = engine.model().max_positions();
        let new_tokens = engine.index().trie().max_len() + 1;
        // The last new token (a code's EOS) is never run: it takes no position.
        if longest.saturating_add(new_tokens - 1) > positions {
            return Err(Error::Input(format!(
                "a query of {} tokens fills the template to {longest} tokens, and codes of up to \
                 {new_tokens} exceed the model's {positions} positions: lower --max-query-tokens",
                limits.max_query_tokens
            )));
        }
        // A few more: the query's tokens inside the template may not be its tokens alone (merges
        // at the seams).
        Ok(engine.entries_for(&p) - 1 + limits.max_query_tokens + SEAM_TOKENS)
    };
    let typical = probe(default_beam.min(limits.max_beam))?;
    let widest = probe(limits.max_beam)?;
    Ok(typical.saturating_mul(max_batch).max(widest))
}

/// A request admitted to the batch.
struct InFlight {
    ticket: Ticket,
    reply: oneshot::Sender<Reply>,
    /// Its beam width: the most rows it runs in a step after its prefill.
    beam: usize,
    /// Seconds it waited in the queue.
    queue_s: f64,
}

/// The batch holds `n` requests: for the gauge, and for the queue's wait bound.
fn in_flight(queue: &Queue, metrics: &Metrics, n: usize) {
    metrics.set_in_flight(n);
    queue.set_in_flight(n);
}

/// A request whose codes are done, on its way to a scoring thread.
struct ToScore {
    done: CodesDone,
    reply: oneshot::Sender<Reply>,
    queue_s: f64,
}

/// A scoring thread: scores each request it is handed with `score` and answers it, until the
/// batcher hangs up. A request whose handler has gone is not scored. A panic while scoring (a
/// bug) answers that request 500 and the thread goes on.
fn scorer(
    jobs: &Mutex<std::sync::mpsc::Receiver<ToScore>>,
    score: &(dyn Fn(CodesDone) -> Response + Sync),
    queue: &Queue,
    metrics: &Metrics,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(ToScore {
            done,
            reply,
            queue_s,
        }) = job
        else {
            return; // the batcher stopped, every request scored
        };
        metrics.scoring_backlog_add(false);
        // Counted out of the scoring when it ends, however it ends (a panic outside the
        // scoring's own guard too): a count left behind would make an idle server `stalled`.
        let _answered = Answered(queue);
        if reply.is_closed() {
            continue;
        }
        let codes_only = done.request().codes_only;
        let scored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| score(done)));
        let answer = match scored {
            Ok(response) => {
                record_stages(metrics, &response, codes_only);
                Ok(Done { response, queue_s })
            }
            Err(_) => {
                tracing::error!("scoring panicked: this is a bug");
                Err(Failed::Engine {
                    kind: "internal",
                    message: "scoring failed".into(),
                })
            }
        };
        // The handler may be gone (deadline, client left): nothing to do then.
        let _ = reply.send(answer);
    }
}

/// A request handed to a scoring thread, answered (or dropped) when this drops.
struct Answered<'a>(&'a Queue);

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.0.scoring(false);
    }
}

/// Runs the batcher over `engine` until the queue is closed, empty and nothing is in flight or
/// being scored; requests whose codes are done are scored with `score` (`Engine::score`) on
/// `config.score_threads` threads of their own. Errors when the batch cannot be made (its
/// arena), or when [`FAILED_STEPS_FATAL`] decoder steps in a row fail on the device.
pub fn run<B: Backend>(
    engine: &Engine<B>,
    queue: &Queue,
    config: BatcherConfig,
    metrics: &Metrics,
    started: impl FnOnce(),
    score: &(dyn Fn(CodesDone) -> Response + Sync),
) -> Result<()> {
    let mut search = BeamSearch::new();
    let mut batch = engine.batch(&mut search, config.arena_entries)?;
    metrics.set_arena_entries(config.arena_entries);
    // Bounded: when scoring is slower than decoding (a large `k`, few scoring threads, a GPU
    // decoder), finished requests wait here, out of the queue's sight. At most one batch of
    // them; past it the batcher waits to hand off, and that wait counts in the service rate
    // the wait bound estimates from, so the queue refuses at once instead of answering late.
    let (to_score, jobs) = std::sync::mpsc::sync_channel::<ToScore>(config.max_batch.max(1));
    let jobs = Mutex::new(jobs);
    std::thread::scope(|scope| {
        // Each scoring thread says when it runs, under its policy: the server is ready only
        // then (a thread spawned may not have started yet on a busy host, and a test that
        // read the threads' policies at `/ready` saw one still under the default).
        let (up, running) = std::sync::mpsc::channel::<()>();
        let threads = config.score_threads.max(1);
        for i in 0..threads {
            let (jobs, up) = (&jobs, up.clone());
            std::thread::Builder::new()
                .name(format!("gram-score-{i}"))
                .spawn_scoped(scope, move || {
                    super::priority::give_way_to_decoder();
                    let _ = up.send(());
                    // Not held while scoring: a thread that dies before its send must end the
                    // wait below, not leave it waiting on the others' senders.
                    drop(up);
                    scorer(jobs, score, queue, metrics)
                })
                .map_err(|e| Error::io("spawning a scoring thread", e))?;
        }
        drop(up);
        for _ in 0..threads {
            if running.recv().is_err() {
                // A scoring thread died before it ran (a bug): never ready without it. The
                // others end once `to_score` is dropped with this closure; the scope's join
                // then reports the panic.
                return Err(Error::Internal(
                    "a scoring thread ended before it started".into(),
                ));
            }
        }
        started();
        // On the model's thread pool, so that each step's forward runs there without a
        // hand-off from this thread (see `Model::install`).
        let stepped = engine
            .model()
            .install(|| step_loop(&mut batch, queue, &config, metrics, &to_score));
        // Hanging up ends the scoring threads once they have answered every request handed to
        // them; the scope waits for them.
        drop(to_score);
        stepped
    })
}

/// Decoder steps failing in a row with a device error that stop the engine (see `step_loop`).
pub const FAILED_STEPS_FATAL: u32 = 3;

/// The batcher's loop (see the module's documentation), until the queue is closed, empty and
/// nothing is in flight; or until [`FAILED_STEPS_FATAL`] steps in a row fail with a device
/// error (that error).
fn step_loop<B: Backend>(
    batch: &mut Batch<'_, B>,
    queue: &Queue,
    config: &BatcherConfig,
    metrics: &Metrics,
    to_score: &std::sync::mpsc::SyncSender<ToScore>,
) -> Result<()> {
    let mut flying: Vec<InFlight> = Vec::new();
    // Whether the last admission left jobs queued.
    let mut held_back = false;
    // Decoder steps failed in a row.
    let mut failures = 0;
    // Whether the last turn of the loop ran a step.
    let mut stepped = false;
    loop {
        queue.progressed();
        let after_step = std::mem::take(&mut stepped);
        {
            let mut st = queue.lock();
            if flying.is_empty() {
                // Jobs the last admission held back, or that came while the last step ran,
                // have waited enough.
                let waited = held_back || after_step;
                st = match wait_for_work(queue, st, config, waited) {
                    Some(st) => st,
                    None => return Ok(()), // closed, drained, idle
                };
            }
            admit(&mut st, batch, &mut flying, config, metrics);
            held_back = !st.jobs.is_empty();
            queue.publish_depth(st.jobs.len());
            // Published under the lock: a push never sees the admitted jobs gone from the
            // queue and not yet in the batch (it would count their places as free).
            in_flight(queue, metrics, flying.len());
        }
        if flying.is_empty() {
            continue;
        }
        // A request whose handler has gone (deadline, client left) takes no further step.
        flying.retain(|f| {
            let gone = f.reply.is_closed();
            if gone {
                batch.cancel(f.ticket);
            }
            !gone
        });
        in_flight(queue, metrics, flying.len());
        if flying.is_empty() {
            continue;
        }
        stepped = true;
        let t = Instant::now();
        let result = match queue.step_fault() {
            // A test's fault: the requests in flight leave the batch as a failed step's do.
            Some(e) => {
                for f in &flying {
                    batch.cancel(f.ticket);
                }
                Err(e)
            }
            None => batch.step_codes(),
        };
        let requests = flying.len();
        let step_s = t.elapsed().as_secs_f64();
        let rows = result.as_ref().ok().map(|_| batch.last_step_rows());
        metrics.record_step(step_s, requests, rows);
        let answered = result.as_ref().map_or(0, |done| done.len());
        match result {
            Ok(done) => {
                let mut finished = Vec::with_capacity(done.len());
                let mut failed = Vec::new();
                for (ticket, done) in done {
                    let at = flying
                        .iter()
                        .position(|f| f.ticket == ticket)
                        .expect("every finished ticket is in flight; this is a bug");
                    let f = flying.swap_remove(at);
                    match done {
                        Ok(done) => finished.push(ToScore {
                            done,
                            reply: f.reply,
                            queue_s: f.queue_s,
                        }),
                        // This request's own rows failed (a log-probability that is not
                        // finite); the others of the step go on.
                        Err(e) => failed.push((f.reply, e)),
                    }
                }
                // Their places are free before any is answered: a client that sends its next
                // request as soon as it has an answer must find its place free, not be
                // counted as waiting behind itself (the wait bound would refuse it).
                in_flight(queue, metrics, flying.len());
                for (reply, e) in failed {
                    tracing::error!(error = %e, "a request's decoder rows failed");
                    let _ = reply.send(Err(Failed::step(&e)));
                }
                for job in finished {
                    metrics.scoring_backlog_add(true);
                    queue.scoring(true);
                    if let Err(std::sync::mpsc::SendError(job)) = to_score.send(job) {
                        // Not reached while this function holds the receiver (`jobs`, shared
                        // by the scorers under a lock): a guard, not a fallback. Scorers never
                        // exit while the batcher runs; a scorer's panic is caught per job.
                        metrics.scoring_backlog_add(false);
                        queue.scoring(false);
                        let _ = job.reply.send(Err(Failed::Engine {
                            kind: "internal",
                            message: "no scoring thread".into(),
                        }));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = flying.len(), "decoder step failed");
                let failed = std::mem::take(&mut flying);
                in_flight(queue, metrics, 0);
                for f in failed {
                    let _ = f.reply.send(Err(Failed::step(&e)));
                }
                // A device fault that does not go away (a lost or wedged GPU) would answer 500
                // to every request for ever while `/ready` says ready: after a few such steps in
                // a row the engine stops, and the server with it, for a supervisor to restart.
                // Other errors (a numeric one some input may provoke) never stop it: a client
                // must not be able to take the server down by repeating a request.
                failures = if e.kind() == "device" {
                    failures + 1
                } else {
                    0
                };
                if failures >= FAILED_STEPS_FATAL {
                    return Err(e);
                }
                queue.stepped(0, t.elapsed().as_secs_f64());
                continue;
            }
        }
        failures = 0;
        // The step and the hand-off to scoring: a hand-off that waited for a scoring thread
        // makes the batch's answers that much slower.
        queue.stepped(answered, t.elapsed().as_secs_f64());
    }
}

/// An idle batch's wait for work: until a job is queued (`None` once the queue is closed with
/// none). The gathering window then runs for jobs that came to an idle batch: not for those
/// queued before it went idle that have `waited` already (held back by the last admission, or
/// come while the last step ran), which join the next step at once.
fn wait_for_work<'q>(
    queue: &'q Queue,
    mut st: MutexGuard<'q, QueueState>,
    config: &BatcherConfig,
    waited: bool,
) -> Option<MutexGuard<'q, QueueState>> {
    let slept = st.jobs.is_empty();
    while st.jobs.is_empty() && !queue.is_closed() {
        st = queue.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.jobs.is_empty() {
        return None;
    }
    Some(if slept || !waited {
        gather(queue, st, config)
    } else {
        st
    })
}

/// The gathering window of an idle batch: waits until `max_batch` jobs are queued, shutdown
/// begins, or the window ends.
fn gather<'q>(
    queue: &'q Queue,
    mut st: MutexGuard<'q, QueueState>,
    config: &BatcherConfig,
) -> MutexGuard<'q, QueueState> {
    if config.batch_wait.is_zero() {
        return st;
    }
    let until = Instant::now() + config.batch_wait;
    while st.jobs.len() < config.max_batch && !queue.is_closed() && !st.draining {
        let now = Instant::now();
        if now >= until {
            break;
        }
        st = queue
            .changed
            .wait_timeout(st, until - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    st
}

/// Drops queued jobs whose handler is gone, answers those past their deadline, then admits the
/// rest in arrival order while the batch has room.
fn admit<B: Backend>(
    st: &mut QueueState,
    batch: &mut Batch<'_, B>,
    flying: &mut Vec<InFlight>,
    config: &BatcherConfig,
    metrics: &Metrics,
) {
    let now = Instant::now();
    st.head_blocked = None;
    let jobs = std::mem::take(&mut st.jobs);
    for job in jobs {
        // A request that leaves the queue unserved waited too: its wait goes into the queue
        // histogram (left out, the histogram showed short waits just when they were long).
        // (To its deadline at most: a job the handler answered with a 504 is only noticed
        // here, up to a step later.)
        let waited = || {
            now.min(job.deadline)
                .saturating_duration_since(job.enqueued)
                .as_secs_f64()
        };
        if job.reply.is_closed() {
            // The handler answered already (deadline) or the client left.
            metrics.record_stage(Stage::Queue, waited());
            continue;
        }
        if now >= job.deadline {
            metrics.record_stage(Stage::Queue, waited());
            let _ = job.reply.send(Err(Failed::Timeout));
            continue;
        }
        st.jobs.push_back(job);
    }
    // Rows of the next step so far (the beams running, then the prompts joining) and of the
    // steps after it (every beam).
    let mut beams: usize = flying.iter().map(|f| f.beam).sum();
    let mut next = beams;
    // In arrival order. A job that cannot join yet (rows, or the arena's entries) keeps its
    // place, and the jobs behind it that can join do, while it is younger than [`HEAD_PASS`]:
    // the first such job is the oldest waiting, and once it is older nothing passes it, so the
    // batch drains until it fits.
    let mut at = 0;
    while flying.len() < config.max_batch && at < st.jobs.len() {
        let job = st
            .jobs
            .remove(at)
            .expect("a job at an index below the length");
        let (prompt, beam) = (job.prepared.prompt_tokens(), job.prepared.request().beam);
        // Puts a job that cannot join back in its place: true when the jobs behind may pass.
        let hold = |st: &mut QueueState, job: Job| {
            let young = now.saturating_duration_since(job.enqueued) < HEAD_PASS;
            if at == 0 {
                st.head_blocked = Some(job.enqueued);
            }
            st.jobs.insert(at, job);
            young
        };
        if !fits(
            config.max_rows,
            flying.is_empty(),
            next,
            beams,
            prompt,
            beam,
        ) {
            if !hold(st, job) {
                break;
            }
            at += 1;
            continue;
        }
        let Job {
            prepared,
            reply,
            enqueued,
            deadline,
        } = job;
        match batch.admit(prepared) {
            Admission::Admitted(ticket) => {
                let queue_s = now.duration_since(enqueued).as_secs_f64();
                metrics.record_stage(Stage::Queue, queue_s);
                next += prompt;
                beams += beam;
                flying.push(InFlight {
                    ticket,
                    reply,
                    beam,
                    queue_s,
                });
            }
            Admission::Wait(prepared) => {
                // The arena cannot hold it until requests in flight finish (beam 64 takes
                // ~4.4 times a beam-10 request's entries).
                let job = Job {
                    prepared,
                    reply,
                    enqueued,
                    deadline,
                };
                if !hold(st, job) {
                    break;
                }
                at += 1;
            }
            Admission::Refused(e) => {
                // It leaves the queue unserved, having waited like the others.
                metrics.record_stage(Stage::Queue, now.duration_since(enqueued).as_secs_f64());
                let _ = reply.send(Err(Failed::engine(&e)));
            }
        }
    }
}

/// How long a queued job that cannot join yet (the row bound, or the arena's free entries: a
/// wide beam) may be passed by later jobs that can. Without passing, one wide request held
/// every request behind it until the batch had drained enough for it; with no bound on it, a
/// stream of small requests could keep the wide one waiting for ever. Past it, nothing passes
/// the job, and the batch drains until it joins: its extra wait is about this plus the run of
/// the requests that passed it last.
pub const HEAD_PASS: Duration = Duration::from_millis(50);

/// Whether a request of `prompt` tokens and beam `beam` may join the batch under the row bound
/// `max_rows` (0: none), the next step already holding `next` rows and the steps after it
/// `beams`: it joins the next step with its prompt and runs at most `beam` rows in each later
/// one. A request joins an empty batch whatever its size, so none waits for ever (and one that
/// does not fit is passed by smaller ones only for [`HEAD_PASS`]).
fn fits(
    max_rows: usize,
    empty: bool,
    next: usize,
    beams: usize,
    prompt: usize,
    beam: usize,
) -> bool {
    max_rows == 0
        || empty
        || (next.saturating_add(prompt) <= max_rows && beams.saturating_add(beam) <= max_rows)
}

/// Each stage of a finished search into its histogram; a codes-only request (`/v1/codes`) ran
/// no postings or scoring, and puts no zeros into theirs.
fn record_stages(metrics: &Metrics, r: &Response, codes_only: bool) {
    let t = &r.timings_ms;
    for (stage, ms) in [
        (Stage::Tokenize, t.tokenize),
        (Stage::Prefill, t.prefill),
        (Stage::Decode, t.decode),
        (Stage::Postings, t.postings),
        (Stage::Scoring, t.scoring),
    ] {
        if codes_only && matches!(stage, Stage::Postings | Stage::Scoring) {
            continue;
        }
        metrics.record_stage(stage, ms / 1e3);
    }
}

/// Every queued job's handler gets `failed`, and the queue closes (the batcher is gone: what
/// it held in flight went with it, so the gauges read zero).
pub fn fail_all(queue: &Queue) {
    let mut st = queue.lock();
    queue.set_closed(&st);
    let now = Instant::now();
    for job in st.jobs.drain(..) {
        // Its wait, as every job that leaves the queue unserved (to its deadline at most).
        let waited = now
            .min(job.deadline)
            .saturating_duration_since(job.enqueued);
        queue
            .metrics
            .record_stage(Stage::Queue, waited.as_secs_f64());
        let _ = job.reply.send(Err(Failed::Engine {
            kind: "internal",
            message: "the batcher stopped".into(),
        }));
    }
    queue.publish_depth(0);
    in_flight(queue, &queue.metrics, 0);
}

#[cfg(test)]
pub(super) mod tests;
