//! The lock a build holds on its work directory (the directory of its resumable shards), so
//! that two builds of one directory do not write each other's shards.

use std::path::Path;

use crate::error::{Error, Result};

/// The lock file of a build's work directory.
const WORK_LOCK: &str = ".lock";

/// The lock a build holds on its work directory: the open `.lock` file.
pub(super) struct WorkLock {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl WorkLock {
    /// Removes the lock file, then lets the lock go: a build waiting for the directory starts
    /// after this one's shards are gone.
    pub(super) fn release(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Makes the work directory and takes the exclusive lock of its `.lock` file (made if missing),
/// or says another build holds it. A file system without locks (some network and FUSE ones)
/// builds unguarded.
pub(super) fn lock_work_dir(work: &Path) -> Result<WorkLock> {
    use std::os::unix::fs::MetadataExt;
    let lock_path = &work.join(WORK_LOCK);
    let held = |file| {
        Ok(WorkLock {
            file,
            path: lock_path.clone(),
        })
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        // (Again on a retry: the build that finished may have removed the directory too.)
        crate::container::create_dir_durable(work)?;
        let lock = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path)
        {
            Ok(lock) => lock,
            // A build that finished removed the directory between its making and our open:
            // make it again (a bounded number of times: something else keeps removing it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 100 => continue,
            Err(e) => return Err(Error::io(lock_path, e)),
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Input(format!(
                    "{}: another build is using this work directory (its shards); wait for it, \
                     or give this one another --work-dir",
                    work.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e))
                if e.kind() == std::io::ErrorKind::Unsupported
                    || matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) =>
            {
                return held(lock)
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(lock_path, e)),
        }
        // A build that finished between our open and our lock removed the file we hold: a
        // lock on it guards nothing. Open the one now at the path (or a new one) again.
        let ours = lock.metadata().map_err(|e| Error::io(lock_path, e))?;
        match std::fs::metadata(lock_path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return held(lock),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(lock_path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build that finishes removes its lock file and then the emptied work directory; another
    /// build taking the lock meanwhile must make the directory again, not fail on the `.lock`
    /// it could not open (it did when the directory went between its making and the open).
    /// Two builds take the lock and finish over and over: each may find the other holding it
    /// (the one error a build may give), never anything else.
    #[test]
    fn a_work_directory_removed_under_the_lock_is_made_again() {
        let tmp = std::env::temp_dir().join(format!("gram-worklock-{}", std::process::id()));
        let work = tmp.join("work");
        let build = || {
            let mut other = Vec::new();
            for _ in 0..500 {
                match lock_work_dir(&work) {
                    Ok(lock) => {
                        lock.release();
                        let _ = std::fs::remove_dir(&work);
                    }
                    Err(e) if e.to_string().contains("another build is using") => {}
                    Err(e) => other.push(e.to_string()),
                }
            }
            other
        };
        let failures = std::thread::scope(|s| {
            let a = s.spawn(build);
            let mut f = build();
            f.extend(a.join().unwrap());
            f
        });
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            failures.is_empty(),
            "{} failures: {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );
    }
}
