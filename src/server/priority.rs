//! The server's own threads give way to the decoder's.
//!
//! The decoder's team (`backend::cpu::team`) splits each of a step's parallel regions over
//! every core and waits for all of them at its end, so a worker that loses its core in the
//! middle of a region holds up the others too. A thread the kernel wakes (an HTTP thread when
//! a request or a refusal comes in, a scoring thread when codes are done) takes a running
//! worker's core at once under the default policy. Under `SCHED_BATCH` it does not: it waits
//! for a core that is idle or given up (the team's workers yield theirs while they wait for a
//! region, every few microseconds) or for the scheduler's tick. Where a core is idle nothing
//! changes. Measured on a 2-vCPU VM, where the server shares both cores with its clients: under
//! twice the saturating rate the admitted requests' p99 was closer to the closed loop's, and at
//! one client nothing moved (docs/SERVER.md, "The server's threads under SCHED_BATCH").
//!
//! Elsewhere than Linux the threads keep their policy.

/// Puts the calling thread under `SCHED_BATCH` (Linux; elsewhere a no-op). A failure (a
/// kernel without the policy, a seccomp filter) leaves the thread as it was and is logged
/// once per thread at debug level: the server works the same, only without the priority.
pub fn give_way_to_decoder() {
    if let Err(e) = set_batch() {
        tracing::debug!(error = %e, "SCHED_BATCH not set; the thread keeps its policy");
    }
}

#[cfg(target_os = "linux")]
fn set_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` for the call's duration; pid 0 is the calling
    // thread (a Linux thread is a task of its own).
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_batch() -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The scheduling policy of thread `tid` of this process: field 41 of its `stat`, read as
    /// `tests/default_model.rs` reads it from a `gram serve` child.
    fn policy_of(tid: &str) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(41 - 3)?.parse().ok()
    }

    fn this_thread_policy() -> i32 {
        // SAFETY: no arguments but the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_thread_that_gives_way_runs_under_sched_batch_and_others_do_not() {
        let before = std::thread::spawn(this_thread_policy).join().unwrap();
        assert_eq!(before, libc::SCHED_OTHER);
        let (policy, tid) = std::thread::spawn(|| {
            give_way_to_decoder();
            // SAFETY: no arguments.
            let tid = unsafe { libc::gettid() };
            (this_thread_policy(), policy_of(&tid.to_string()))
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
        // Reading /proc as the server's test does agrees with the kernel's answer.
        assert_eq!(tid, Some(libc::SCHED_BATCH));
        // The caller's own thread is untouched.
        assert_eq!(this_thread_policy(), libc::SCHED_OTHER);
    }
}
