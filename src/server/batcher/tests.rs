use super::{fits, Metrics};
use std::time::{Duration, Instant};

#[test]
fn the_row_bound() {
    // No bound: anything fits.
    assert!(fits(0, false, 1000, 1000, 64, 64));
    // An empty batch takes a request larger than the bound.
    assert!(fits(32, true, 0, 0, 40, 64));
    // The next step: 20 running beams + a 12-token prompt = 32 fits, 13 does not.
    assert!(fits(32, false, 20, 20, 12, 10));
    assert!(!fits(32, false, 20, 20, 13, 10));
    // The steps after: 20 beams + 12 more = 32 fits, 13 does not, whatever the prompt.
    assert!(fits(32, false, 20, 20, 1, 12));
    assert!(!fits(32, false, 20, 20, 1, 13));
    // Prompts joining this step count against it, not against the later ones.
    assert!(!fits(32, false, 30, 10, 3, 1));
    assert!(fits(32, false, 29, 10, 3, 1));
    // No overflow at the edges.
    assert!(!fits(32, false, usize::MAX, 0, 1, 1));
}

/// An engine over a two-product index of the repository's tiny-llama, built in-process.
fn tiny_engine(tag: &str) -> crate::search::Engine {
    let dir = tiny_index(tag);
    let engine = crate::search::Engine::open(&dir, None, &Default::default()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    engine
}

/// An index of two products over `models/tiny-llama`, in a fresh temporary directory (the
/// caller removes it).
pub(in crate::server) fn tiny_index(tag: &str) -> std::path::PathBuf {
    use crate::search::{build_settings, index_file, model_fingerprint};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_dir = root.join("models/tiny-llama");
    let dir = std::env::temp_dir().join(format!("gram-batcher-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let items: Vec<crate::catalog::Item> = [("p0", "oak desk", "desk"), ("p1", "wool rug", "rug")]
        .into_iter()
        .map(|(id, title, code)| crate::catalog::Item {
            id: id.into(),
            title: title.into(),
            attributes: Default::default(),
            codes: vec![
                code.into(),
                format!("{code} | {}", &title[..title.find(' ').unwrap()]),
            ],
            line: 0,
        })
        .collect();
    let settings = crate::settings::Settings::load(&model_dir).unwrap();
    let meta = serde_json::json!({
        "model": {
            "dir": std::fs::canonicalize(&model_dir).unwrap(),
            "fingerprint": model_fingerprint(&model_dir).unwrap(),
        },
        "settings": build_settings(&settings),
    });
    {
        let model = crate::Model::load(&model_dir, &Default::default()).unwrap();
        let tokenizer = crate::Tokenizer::from_file(&model_dir.join("tokenizer.json")).unwrap();
        crate::catalog::build(
            &model,
            &tokenizer,
            &settings,
            &items,
            None,
            &index_file(&dir),
            &meta,
        )
        .unwrap();
    }
    dir
}

/// A job that cannot join yet (here the row bound: a wide beam) keeps its place and is
/// passed by a later job that can join while it is younger than `HEAD_PASS`; once it is
/// older, nothing passes it. (Before, nothing ever passed it: one wide request held every
/// request behind it until the batch had drained for it.)
#[test]
fn a_job_that_cannot_join_is_passed_only_while_it_is_young() {
    use super::{admit, BatcherConfig, Job, Queue, HEAD_PASS};
    use crate::search::Request;
    let engine = tiny_engine("pass");
    let metrics = std::sync::Arc::new(Metrics::default());
    let queue = Queue::new(8, metrics.clone());
    let config = BatcherConfig {
        max_batch: 4,
        max_rows: 32,
        batch_wait: Duration::ZERO,
        arena_entries: super::arena_entries(&engine, 4, 25).unwrap(),
        score_threads: 1,
    };
    let mut search = crate::beam::BeamSearch::new();
    let mut batch = engine.batch(&mut search, config.arena_entries).unwrap();
    let mut flying = Vec::new();
    let mut answers = Vec::new();
    // An age: how long before now a job was queued (`YOUNG`: a minute after now).
    const YOUNG: Option<Duration> = None;
    let mut job = |beam: usize, age: Option<Duration>| {
        let (reply, answer) = tokio::sync::oneshot::channel();
        answers.push(answer);
        let request = Request {
            beam,
            ..Request::new("oak desk")
        };
        Job {
            prepared: engine.prepare(request).unwrap(),
            reply,
            enqueued: match age {
                Some(age) => Instant::now() - age,
                None => Instant::now() + Duration::from_secs(60),
            },
            deadline: Instant::now() + Duration::from_secs(600),
        }
    };
    let mut run = |flying: &mut Vec<super::InFlight>| {
        admit(&mut queue.lock(), &mut batch, flying, &config, &metrics)
    };
    let beams = |flying: &Vec<super::InFlight>| flying.iter().map(|f| f.beam).collect::<Vec<_>>();
    // A beam of 10 runs; a beam of 25 would make 35 rows (over 32); a beam of 4 fits.
    queue.lock().jobs.push_back(job(10, Some(Duration::ZERO)));
    run(&mut flying);
    assert_eq!(beams(&flying), [10]);
    {
        // Queued a minute "from now": young however slow this test runs.
        let mut st = queue.lock();
        st.jobs.push_back(job(25, YOUNG));
        st.jobs.push_back(job(4, YOUNG));
    }
    run(&mut flying);
    assert_eq!(beams(&flying), [10, 4], "the young wide job is passed");
    {
        let st = queue.lock();
        assert_eq!(st.jobs.len(), 1);
        assert_eq!(
            st.jobs[0].prepared.request().beam,
            25,
            "and keeps its place"
        );
        assert!(st.head_blocked.is_some());
    }
    // The wide job, now older than HEAD_PASS: the small one behind it waits.
    {
        let mut st = queue.lock();
        st.jobs[0].enqueued = Instant::now() - HEAD_PASS;
        st.jobs.push_back(job(3, YOUNG));
    }
    run(&mut flying);
    assert_eq!(beams(&flying), [10, 4], "nothing passes an old job");
    let st = queue.lock();
    let waiting: Vec<usize> = st.jobs.iter().map(|j| j.prepared.request().beam).collect();
    assert_eq!(waiting, [25, 3]);
}

/// The same rule when what a job waits for is the arena's free entries (`Admission::Wait`), not
/// the row bound: a wide job the arena cannot hold until a request in flight finishes keeps its
/// place and is passed by a narrower job that fits while it is young, and by nothing once it
/// is older than `HEAD_PASS`.
#[test]
fn a_job_the_arena_cannot_hold_yet_is_passed_only_while_it_is_young() {
    use super::{admit, BatcherConfig, Job, Queue, HEAD_PASS};
    use crate::search::Request;
    let engine = tiny_engine("arena-pass");
    let prepare = |beam: usize| {
        engine
            .prepare(Request {
                beam,
                ..Request::new("oak desk")
            })
            .unwrap()
    };
    let entries = |beam: usize| engine.entries_for(&prepare(beam));
    let (e10, e4, e12) = (entries(10), entries(4), entries(12));
    // Room for a beam of 10 and one of 4; a beam of 12 fits the arena alone, not beside the 10.
    assert!(e12 > e4 && e12 <= e10 + e4, "entries {e10} {e4} {e12}");
    let metrics = std::sync::Arc::new(Metrics::default());
    let queue = Queue::new(8, metrics.clone());
    let config = BatcherConfig {
        max_batch: 4,
        max_rows: 0, // no row bound: only the arena holds jobs back
        batch_wait: Duration::ZERO,
        arena_entries: e10 + e4,
        score_threads: 1,
    };
    let mut search = crate::beam::BeamSearch::new();
    let mut batch = engine.batch(&mut search, config.arena_entries).unwrap();
    let mut flying = Vec::new();
    let mut answers = Vec::new();
    let mut job = |beam: usize, enqueued: Instant| {
        let (reply, answer) = tokio::sync::oneshot::channel();
        answers.push(answer);
        Job {
            prepared: prepare(beam),
            reply,
            enqueued,
            deadline: Instant::now() + Duration::from_secs(600),
        }
    };
    // Queued a minute "from now": young however slow this test runs.
    let young = Instant::now() + Duration::from_secs(60);
    let beams = |flying: &Vec<super::InFlight>| flying.iter().map(|f| f.beam).collect::<Vec<_>>();
    let run = |batch: &mut crate::search::Batch<'_>, flying: &mut Vec<super::InFlight>| {
        admit(&mut queue.lock(), batch, flying, &config, &metrics)
    };
    let waiting = || -> Vec<usize> {
        let st = queue.lock();
        st.jobs.iter().map(|j| j.prepared.request().beam).collect()
    };
    queue.lock().jobs.push_back(job(10, Instant::now()));
    run(&mut batch, &mut flying);
    assert_eq!(beams(&flying), [10]);
    queue.lock().jobs.extend([job(12, young), job(4, young)]);
    run(&mut batch, &mut flying);
    let passed = "the young job the arena cannot hold is passed";
    assert_eq!(beams(&flying), [10, 4], "{passed}");
    assert_eq!(waiting(), [12], "and keeps its place");
    assert!(queue.lock().head_blocked.is_some());
    // The beam of 4 leaves (its client gone): its entries are free again, so another beam of 4
    // fits beside the 10, and the beam of 12 still does not. Now older than HEAD_PASS, the wide
    // job is passed by nothing.
    let four = flying.pop().unwrap();
    assert!(batch.cancel(four.ticket));
    assert_eq!(batch.free_entries(), e4);
    {
        let mut st = queue.lock();
        st.jobs[0].enqueued = Instant::now() - HEAD_PASS;
        st.jobs.push_back(job(4, young));
    }
    run(&mut batch, &mut flying);
    assert_eq!(beams(&flying), [10], "nothing passes an old job");
    assert_eq!(waiting(), [12, 4]);
}

/// A batcher of two places and one scoring thread over `engine`, and its queue.
fn batcher_of(
    engine: &crate::search::Engine,
    metrics: &std::sync::Arc<Metrics>,
) -> (super::Queue, super::BatcherConfig) {
    let queue = super::Queue::new(8, metrics.clone());
    let config = super::BatcherConfig {
        max_batch: 2,
        max_rows: 0,
        batch_wait: Duration::ZERO,
        arena_entries: super::arena_entries(engine, 2, 10).unwrap(),
        score_threads: 1,
    };
    queue.set_max_batch(config.max_batch);
    (queue, config)
}

/// Queues `query` and returns where its answer will come.
fn push(
    engine: &crate::search::Engine,
    queue: &super::Queue,
    query: &str,
) -> tokio::sync::oneshot::Receiver<super::Reply> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = super::Job {
        prepared: engine.prepare(crate::search::Request::new(query)).unwrap(),
        reply,
        enqueued: Instant::now(),
        deadline: Instant::now() + Duration::from_secs(600),
    };
    queue.push(job).unwrap();
    answer
}

/// The answer, or `None` if its sender was dropped unanswered; panics after 60 s (no thread
/// left to answer it).
fn answer(mut rx: tokio::sync::oneshot::Receiver<super::Reply>) -> Option<super::Reply> {
    use tokio::sync::oneshot::error::TryRecvError;
    let t = Instant::now();
    loop {
        match rx.try_recv() {
            Ok(reply) => return Some(reply),
            Err(TryRecvError::Closed) => return None,
            Err(TryRecvError::Empty) => {
                assert!(t.elapsed() < Duration::from_secs(60), "no answer in 60 s");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Closes the queue however a test ends, so that the batcher stops and the scope's join
/// does not hang.
struct Close<'a>(&'a super::Queue);
impl Drop for Close<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A panic while scoring (a bug) answers that request `internal` and the scoring thread goes
/// on: with one scoring thread, a request after the one that panicked is still scored (on
/// that same thread) and answered the engine's own answer, and the batcher stops cleanly
/// once its queue closes.
#[test]
fn a_panic_while_scoring_fails_that_request_and_scoring_goes_on() {
    use super::{run, Failed};
    use crate::search::Request;
    use std::sync::{Arc, Mutex};

    let engine = tiny_engine("panic");
    let metrics = Arc::new(Metrics::default());
    let (queue, config) = batcher_of(&engine, &metrics);
    // Scores with the engine, then panics for the one query; every call's thread is kept.
    let threads = Mutex::new(Vec::new());
    let score = |done| {
        threads.lock().unwrap().push(std::thread::current().id());
        let response = engine.score(done);
        if response.query == "wool rug" {
            panic!("a scoring bug (this test's own panic)");
        }
        response
    };
    let alone = {
        let mut beams = crate::beam::BeamSearch::new();
        let p = engine.prepare(Request::new("oak desk")).unwrap();
        engine.search(&mut beams, vec![p]).unwrap().remove(0)
    };
    std::thread::scope(|s| {
        let batcher = s.spawn(|| run(&engine, &queue, config, &metrics, || {}, &score));
        let close = Close(&queue);
        // A scoring thread that died with the panic would drop the reply unanswered.
        match answer(push(&engine, &queue, "wool rug")) {
            Some(Err(Failed::Engine { kind, .. })) => assert_eq!(kind, "internal"),
            Some(Err(other)) => panic!("the panicking request got {other:?}"),
            Some(Ok(done)) => panic!("the panicking request got {:?}", done.response.query),
            None => panic!("the panicking request got no answer"),
        }
        // The next request is scored on the same (only) scoring thread, and answered.
        let done = answer(push(&engine, &queue, "oak desk"))
            .expect("a request after the panic is answered")
            .expect("and scored");
        assert_eq!(done.response.codes, alone.codes);
        assert_eq!(done.response.products, alone.products);
        drop(close);
        batcher
            .join()
            .expect("the batcher does not panic")
            .expect("and stops cleanly once its queue closes");
    });
    let threads = threads.into_inner().unwrap();
    assert_eq!(threads.len(), 2, "both requests reached scoring");
    assert_eq!(threads[0], threads[1], "one scoring thread scored both");
    // Only the answered request is timed.
    let text = metrics.render();
    assert!(
        text.contains("gram_stage_seconds_count{stage=\"scoring\"} 1\n"),
        "{text}"
    );
}

/// A failed decoder step answers the requests in it with the error, an `input` one as
/// `internal` (a step's failure is never the caller's: each request was checked when it was
/// prepared), and the batcher goes on; a numeric error, which some input might provoke,
/// never stops it however often it repeats. Device errors in `FAILED_STEPS_FATAL` steps in
/// a row (a lost GPU) stop the batcher with that error; one success in between starts the
/// count again.
#[test]
fn failed_steps_answer_their_requests_and_only_a_device_fault_stops_the_batcher() {
    use super::{run, Failed, FAILED_STEPS_FATAL};
    use crate::Error;
    use std::sync::Arc;

    let engine = tiny_engine("faults");
    let metrics = Arc::new(Metrics::default());
    let (queue, config) = batcher_of(&engine, &metrics);
    let score = |done| engine.score(done);
    let fault = |e: Error| queue.step_faults.lock().unwrap().push_back(e);
    let failed = |query: &str| match answer(push(&engine, &queue, query)) {
        Some(Err(Failed::Engine { kind, message })) => (kind, message),
        Some(Err(other)) => panic!("{query:?} got {other:?}"),
        Some(Ok(done)) => panic!("{query:?} was answered {:?}", done.response.codes),
        None => panic!("{query:?} got no answer"),
    };
    let answered = |query: &str| {
        let done = answer(push(&engine, &queue, query))
            .expect("answered")
            .expect("a search");
        assert!(!done.response.codes.is_empty(), "{query:?}");
    };
    std::thread::scope(|s| {
        let batcher = s.spawn(|| run(&engine, &queue, config, &metrics, || {}, &score));
        let close = Close(&queue);
        fault(Error::Input("a shape check".into()));
        assert_eq!(
            failed("oak desk"),
            ("internal", "invalid input: a shape check".into())
        );
        for _ in 0..2 * FAILED_STEPS_FATAL {
            fault(Error::Numeric("NaN logits".into()));
            assert_eq!(failed("oak desk").0, "numeric");
        }
        answered("oak desk");
        for _ in 1..FAILED_STEPS_FATAL {
            fault(Error::Device("lost".into()));
            assert_eq!(failed("wool rug").0, "device");
        }
        answered("wool rug");
        for _ in 1..FAILED_STEPS_FATAL {
            fault(Error::Device("lost".into()));
            assert_eq!(failed("wool rug").0, "device");
        }
        assert!(
            !batcher.is_finished(),
            "{} device faults in a row",
            FAILED_STEPS_FATAL - 1
        );
        fault(Error::Device("lost for good".into()));
        assert_eq!(failed("wool rug").0, "device");
        let t = Instant::now();
        while !batcher.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(60), "the batcher runs on");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stopped = batcher.join().expect("the batcher does not panic");
        match stopped {
            Err(Error::Device(m)) => assert_eq!(m, "lost for good"),
            other => panic!("the batcher ended with {other:?}"),
        }
        drop(close);
    });
}

/// Jobs queued with no batcher taking them are stalled once they have waited past the
/// limit, also while another thread holds the queue's lock (`stalled` reads the depth the
/// queue publishes, so a `/ready` probe never waits for the lock), and no longer once the
/// queue is empty.
#[test]
fn queued_jobs_that_no_batcher_takes_are_stalled() {
    use std::sync::Arc;

    let engine = tiny_engine("queued");
    let metrics = Arc::new(Metrics::default());
    let (queue, _) = batcher_of(&engine, &metrics);
    let limit = Duration::from_millis(50);
    assert_eq!(queue.stalled(limit), None, "an empty queue");
    let rx = push(&engine, &queue, "oak desk");
    std::thread::sleep(2 * limit);
    let (tx, probed) = std::sync::mpsc::channel();
    let since = std::thread::scope(|s| {
        let held = queue.lock();
        s.spawn(|| tx.send((queue.stalled(limit), queue.is_closed())).unwrap());
        let probe = probed.recv_timeout(Duration::from_secs(10));
        drop(held);
        probe.expect("`stalled` or `is_closed` waited for the queue's lock")
    });
    let (since, closed) = since;
    assert!(!closed);
    let since = since.expect("a job waits and nothing moves");
    assert!(since > limit, "{since:?}");
    super::fail_all(&queue);
    assert!(
        queue.is_closed(),
        "a failed batcher closes the queue (`/ready` reads it)"
    );
    assert!(
        answer(rx).expect("answered").is_err(),
        "failed, not searched"
    );
    assert_eq!(queue.stalled(limit), None, "nothing waits");
}

/// A decoder step that does not return, and scoring that does not return, show as stalled
/// (what `/ready` reports) once requests have waited longer than the limit with no progress,
/// and no longer once they are answered; an idle batcher never is, nor is one that has just
/// been handed work after a quiet spell longer than the limit.
#[test]
fn a_step_or_scoring_that_does_not_return_is_stalled() {
    use super::run;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let engine = tiny_engine("stalled");
    let metrics = Arc::new(Metrics::default());
    let (queue, config) = batcher_of(&engine, &metrics);
    // Scoring "wool rug" waits until the test lets it go.
    let hold = AtomicBool::new(true);
    let score = |done: crate::search::CodesDone| {
        let response = engine.score(done);
        while response.query == "wool rug" && hold.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        response
    };
    let limit = Duration::from_millis(150);
    // Waits (at most 30 s) until `queue.stalled(limit)` is `want`; false if it never was.
    let until = |want: bool| {
        let t = Instant::now();
        while queue.stalled(limit).is_some() != want {
            if t.elapsed() > Duration::from_secs(30) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    };
    std::thread::scope(|s| {
        let batcher = s.spawn(|| run(&engine, &queue, config, &metrics, || {}, &score));
        let close = Close(&queue);
        std::thread::sleep(2 * limit);
        assert_eq!(queue.stalled(limit), None, "an idle batcher");

        // A step that takes 3 s: stalled while it runs, its request not yet answered.
        queue
            .step_sleeps
            .lock()
            .unwrap()
            .push_back(Duration::from_secs(3));
        let mut rx = push(&engine, &queue, "oak desk");
        assert!(until(true), "a hung step is never stalled");
        let since = queue.stalled(limit).unwrap_or_default();
        assert!(since > limit, "{since:?}");
        assert!(rx.try_recv().is_err(), "answered while stalled");
        answer(rx).expect("answered").expect("a search");
        assert_eq!(queue.stalled(limit), None, "answered, nothing waits");

        // Scoring that hangs.
        let rx = push(&engine, &queue, "wool rug");
        assert!(until(true), "hung scoring is never stalled");
        hold.store(false, Ordering::SeqCst);
        answer(rx).expect("answered").expect("a search");
        assert_eq!(queue.stalled(limit), None, "scored, nothing waits");

        // A batch that keeps stepping is never stalled, though its work takes longer than
        // the limit: eight steps of 60 ms each (150 ms the limit).
        queue
            .step_sleeps
            .lock()
            .unwrap()
            .extend([Duration::from_millis(60); 8]);
        let t = Instant::now();
        // A request after another until the slow steps are spent (a request of this tiny
        // model takes a few steps).
        while !queue.step_sleeps.lock().unwrap().is_empty() {
            let mut rx = push(&engine, &queue, "oak desk");
            loop {
                assert_eq!(queue.stalled(limit), None, "stepping, at {:?}", t.elapsed());
                match rx.try_recv() {
                    Ok(answered) => {
                        answered.expect("a search");
                        break;
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("no answer: {e}"),
                }
            }
        }
        assert!(t.elapsed() > 3 * limit, "{:?}", t.elapsed());

        // A quiet spell longer than the limit, then work: not stalled at once.
        std::thread::sleep(2 * limit);
        let rx = push(&engine, &queue, "oak desk");
        assert_eq!(queue.stalled(limit), None, "work just arrived");
        answer(rx).expect("answered").expect("a search");
        drop(close);
        batcher
            .join()
            .expect("the batcher does not panic")
            .expect("and stops cleanly");
    });
}

/// The gathering window is for a job that comes to an idle batch: a job that came while the
/// batch's last step ran joins the next step at once, not after another window. (It waited a
/// whole window again, found in review: 30 s here, with a batch of 2 it never filled.)
#[test]
fn a_job_that_came_during_the_last_step_skips_the_window() {
    use super::run;
    use crate::search::Request;
    use std::sync::Arc;

    let engine = tiny_engine("window");
    let metrics = Arc::new(Metrics::default());
    let (queue, mut config) = batcher_of(&engine, &metrics);
    config.batch_wait = Duration::from_secs(30);
    let score = |done| engine.score(done);
    // The steps the first two take together: the last one sleeps, and the third job comes
    // during it.
    let steps = {
        let mut beams = crate::beam::BeamSearch::new();
        let both = ["oak desk", "wool rug"].map(|q| engine.prepare(Request::new(q)).unwrap());
        let done = engine.search(&mut beams, both.to_vec()).unwrap();
        done.iter().map(|r| r.steps).max().unwrap()
    };
    assert!(steps >= 2, "{steps}");
    {
        let mut sleeps = queue.step_sleeps.lock().unwrap();
        sleeps.extend(std::iter::repeat_n(Duration::ZERO, steps - 1));
        sleeps.push_back(Duration::from_millis(800));
    }
    std::thread::scope(|s| {
        let close = Close(&queue);
        // Two at once fill the batch of 2: their window ends when the second is queued.
        let first = [
            push(&engine, &queue, "oak desk"),
            push(&engine, &queue, "wool rug"),
        ];
        let batcher = s.spawn(|| run(&engine, &queue, config, &metrics, || {}, &score));
        std::thread::sleep(Duration::from_millis(400));
        let t = Instant::now();
        let third = push(&engine, &queue, "green sofa");
        for rx in first {
            answer(rx).expect("answered").expect("a search");
        }
        answer(third).expect("answered").expect("a search");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the third job waited a gathering window: {:?}",
            t.elapsed()
        );
        drop(close);
        batcher.join().expect("no panic").expect("stops cleanly");
    });
}

/// A blocked head whose client left takes its hold on the places with it: the next push, which
/// drops it from the queue, forgets it (it kept the wait bound's free places at 0, refusing
/// arrivals, until the batcher's next admission).
#[test]
fn a_blocked_head_that_left_holds_no_places() {
    use std::sync::Arc;
    let engine = tiny_engine("gone-head");
    let metrics = Arc::new(Metrics::default());
    let (queue, _) = batcher_of(&engine, &metrics);
    let gone = push(&engine, &queue, "oak desk");
    let blocked = queue.lock().jobs.front().unwrap().enqueued;
    queue.lock().head_blocked = Some(blocked);
    drop(gone);
    let _next = push(&engine, &queue, "wool rug");
    let st = queue.lock();
    assert_eq!(st.jobs.len(), 1, "the gone job is dropped");
    assert_eq!(st.head_blocked, None);
}

/// Jobs failed by `fail_all` (the batcher stopping) leave the queue with their wait recorded,
/// as every job that leaves it unserved (the queue histogram showed nothing of them).
#[test]
fn jobs_failed_when_the_batcher_stops_record_their_wait() {
    use std::sync::Arc;
    let engine = tiny_engine("fail-all");
    let metrics = Arc::new(Metrics::default());
    let (queue, _) = batcher_of(&engine, &metrics);
    let answers = [
        push(&engine, &queue, "oak desk"),
        push(&engine, &queue, "wool rug"),
    ];
    super::fail_all(&queue);
    for rx in answers {
        match answer(rx) {
            Some(Err(super::Failed::Engine { kind, .. })) => assert_eq!(kind, "internal"),
            other => panic!("{:?}", other.map(|r| r.is_ok())),
        }
    }
    let text = metrics.render();
    assert!(
        text.contains("gram_stage_seconds_count{stage=\"queue\"} 2\n"),
        "{text}"
    );
}
