//! The on-disk container of gram's index files: a versioned header naming typed sections, each
//! 64-byte aligned with its own checksum, the whole file memory-mapped and written atomically.
//! Layout (little endian; docs/FORMAT.md is the reference):
//!
//! ```text
//! 0    magic "GRAMIDX\0"   8 bytes
//! 8    version             u32 (FORMAT_VERSION)
//! 12   sections            u32 (n)
//! 16   table               n × { kind u32, reserved u32 (0), offset u64, len u64, checksum u64 }
//! ..   header checksum     u64 (XXH3-64 over bytes 0..16 + 32·n)
//! ..   section bytes, each starting at a multiple of 64
//! ```
//!
//! Opening checks the header (magic, version, its checksum), every section's bounds and
//! alignment, and that no two sections overlap — cheap, so opening a large index costs a map and
//! a few hundred bytes of reads. Section checksums cover the payload; [`Container::verify`]
//! checks them all (every engine open runs it, and `gram index inspect`). Readers validate a section's structure when
//! they open it, so corrupt payload can never make a read go out of bounds or panic; payload
//! bytes corrupted within a valid structure are caught by `verify` only.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"GRAMIDX\0";
/// Version of the container and of the section layouts it holds.
pub const FORMAT_VERSION: u32 = 2;
const ENTRY: usize = 32;
const ALIGN: usize = 64;
/// Most sections a container holds. The index uses eight kinds; the cap keeps the open's
/// pairwise repeat-and-overlap check (quadratic in the count) cheap on a hostile table, which a
/// file of a few MB could otherwise fill with tens of thousands of empty sections.
pub const MAX_SECTIONS: usize = 256;

/// XXH3-64 (seed 0) of `bytes`: the checksum of every section, header and shard, the key of a
/// shard's inputs and the model fingerprint. Every input bit reaches every output bit, so no
/// two flips cancel (FNV-1a over 64-bit words, used before, let a word's top bits reach only
/// the top bits of the sum: two flips of bit 63 cancelled, and edits in the top byte of words
/// collided one time in 256).
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// One section's place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub kind: u32,
    pub offset: usize,
    pub len: usize,
    pub checksum: u64,
}

/// A mapped container file.
pub struct Container {
    path: PathBuf,
    map: Arc<Mmap>,
    sections: Vec<Section>,
}

impl Container {
    /// Writes `sections` (`(kind, bytes)`, kinds distinct) to `path` atomically.
    pub fn write(path: &Path, sections: &[(u32, &[u8])]) -> Result<()> {
        let n = sections.len();
        if n > MAX_SECTIONS {
            return Err(Error::Input(format!(
                "{n} sections; a container holds at most {MAX_SECTIONS}"
            )));
        }
        let header = 16 + ENTRY * n + 8;
        let mut offset = header.next_multiple_of(ALIGN);
        let mut table = Vec::with_capacity(n);
        for (i, &(kind, bytes)) in sections.iter().enumerate() {
            if sections[..i].iter().any(|&(k, _)| k == kind) {
                return Err(Error::Input(format!("section kind {kind} given twice")));
            }
            table.push(Section {
                kind,
                offset,
                len: bytes.len(),
                checksum: checksum(bytes),
            });
            offset = (offset + bytes.len()).next_multiple_of(ALIGN);
        }
        // The header (magic, version, table, its checksum), then each section at its aligned
        // offset, streamed: the file is never assembled in memory (at paper scale the
        // sections are gigabytes, and a copy of them doubled the build's peak).
        let mut head = vec![0u8; header];
        head[..8].copy_from_slice(MAGIC);
        head[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        head[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        for (i, s) in table.iter().enumerate() {
            let e = &mut head[16 + ENTRY * i..16 + ENTRY * (i + 1)];
            e[0..4].copy_from_slice(&s.kind.to_le_bytes());
            e[8..16].copy_from_slice(&(s.offset as u64).to_le_bytes());
            e[16..24].copy_from_slice(&(s.len as u64).to_le_bytes());
            e[24..32].copy_from_slice(&s.checksum.to_le_bytes());
        }
        let sum = checksum(&head[..16 + ENTRY * n]);
        head[16 + ENTRY * n..header].copy_from_slice(&sum.to_le_bytes());
        write_atomic_with(path, |f| {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
            let zeros = [0u8; ALIGN];
            f.write_all(&head)?;
            let mut at = header;
            for (s, &(_, bytes)) in table.iter().zip(sections) {
                f.write_all(&zeros[..s.offset - at])?;
                f.write_all(bytes)?;
                at = s.offset + s.len;
            }
            f.write_all(&zeros[..offset - at])?;
            f.flush()
        })
    }

    /// Maps `path` and checks its header and section table.
    pub fn open(path: &Path) -> Result<Container> {
        let file = open_regular(path)?;
        // SAFETY: read-only map of a file that gram writes atomically (rename) and never
        // modifies in place. Another program that rewrites it in place (`cp` over it) makes
        // reads past its new end fault (SIGBUS): docs/FORMAT.md tells operators to rename.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let sections = Container::parse(&map).map_err(|msg| Error::Index {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(Container {
            path: path.to_path_buf(),
            map: Arc::new(map),
            sections,
        })
    }

    fn parse(b: &[u8]) -> std::result::Result<Vec<Section>, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if b.len() < 16 || &b[..8] != MAGIC {
            return Err("not a gram index file (bad magic or too short)".into());
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "index format version {version}; this build reads version {FORMAT_VERSION} (rebuild the index)"
            ));
        }
        let n = u32_at(12) as usize;
        if n > MAX_SECTIONS {
            return Err(format!(
                "the section table counts {n} sections; a container holds at most {MAX_SECTIONS} (corrupt file)"
            ));
        }
        let header = n
            .checked_mul(ENTRY)
            .and_then(|t| t.checked_add(16 + 8))
            .filter(|&h| h <= b.len())
            .ok_or("truncated: the section table runs past the end of the file")?;
        if checksum(&b[..header - 8]) != u64_at(header - 8) {
            return Err("header checksum mismatch (corrupt file)".into());
        }
        let mut sections: Vec<Section> = Vec::with_capacity(n);
        for i in 0..n {
            let e = 16 + ENTRY * i;
            let (offset, len) = (u64_at(e + 8), u64_at(e + 16));
            let s = Section {
                kind: u32_at(e),
                offset: usize::try_from(offset).map_err(|_| "section offset too large")?,
                len: usize::try_from(len).map_err(|_| "section length too large")?,
                checksum: u64_at(e + 24),
            };
            let end = s.offset.checked_add(s.len).filter(|&end| end <= b.len());
            if end.is_none() {
                return Err(format!(
                    "truncated: section {} ends past the end of the file ({} bytes)",
                    s.kind,
                    b.len()
                ));
            }
            if s.offset < header || !s.offset.is_multiple_of(ALIGN) || u32_at(e + 4) != 0 {
                return Err(format!("section {} is misplaced", s.kind));
            }
            if sections.iter().any(|t| {
                t.kind == s.kind || (s.offset < t.offset + t.len && t.offset < s.offset + s.len)
            }) {
                return Err(format!("section {} repeats or overlaps another", s.kind));
            }
            sections.push(s);
        }
        Ok(sections)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The map the sections live in (a trie section is read in place through it).
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// The section of `kind`, if the file has one.
    pub fn section(&self, kind: u32) -> Option<(Section, &[u8])> {
        let s = *self.sections.iter().find(|s| s.kind == kind)?;
        Some((s, &self.map[s.offset..s.offset + s.len]))
    }

    /// The section of `kind`, or an error naming the file and the section.
    pub fn require(&self, kind: u32, name: &str) -> Result<&[u8]> {
        self.section(kind)
            .map(|(_, b)| b)
            .ok_or_else(|| Error::Index {
                path: self.path.clone(),
                msg: format!("the {name} section (kind {kind}) is missing"),
            })
    }

    /// Checks every section's checksum (reads the whole file).
    pub fn verify(&self) -> Result<()> {
        self.verify_named(&|kind| format!("section {kind}"))
    }

    /// [`Container::verify`], naming a damaged section as `name` says (the file format's own
    /// names for its kinds).
    pub fn verify_named(&self, name: &dyn Fn(u32) -> String) -> Result<()> {
        for s in &self.sections {
            if checksum(&self.map[s.offset..s.offset + s.len]) != s.checksum {
                return Err(Error::Index {
                    path: self.path.clone(),
                    msg: format!("{} checksum mismatch (corrupt file)", name(s.kind)),
                });
            }
        }
        Ok(())
    }
}

/// `create_dir_all`, durably: each directory it makes is fsynced into its parent, so that a
/// file written atomically into it later survives a power loss with the directory itself.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    // `create_dir_all` says "exists" when another process made the directory and removed it
    // again between its attempt and its check: try again (a build finishing in the same work
    // directory does that).
    let mut tries = 0;
    while let Err(e) = std::fs::create_dir_all(dir) {
        tries += 1;
        if e.kind() != std::io::ErrorKind::AlreadyExists || tries >= 100 {
            return Err(Error::io(dir, e));
        }
    }
    for d in missing.iter().rev() {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(parent, e))?;
    }
    Ok(())
}

/// Opens the regular file at `path` for reading (to map it). Anything else is an error naming
/// it, checked before the open: a FIFO would block the open until a writer came, a directory
/// fails the map with "No such device".
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if let Some(kind) = not_a_file(&meta) {
        return Err(Error::Input(format!(
            "{}: {kind} (expected a file)",
            path.display()
        )));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// The bytes of an input the user names (a code list, a catalog, judgements, a query file):
/// a regular file or a pipe (`<(grep ... codes.txt)`, `/dev/stdin` piped), read whole. A
/// directory or a device is an error, not a read (`/dev/zero` as a catalog was read until
/// memory ran out; a terminal as one waited for typing). Errors keep their io kind.
pub fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error as IoError, ErrorKind};
    let meta = std::fs::metadata(path)?;
    let kind = meta.file_type();
    #[cfg(unix)]
    let pipe = std::os::unix::fs::FileTypeExt::is_fifo(&kind);
    #[cfg(not(unix))]
    let pipe = false;
    if !(kind.is_file() || pipe) {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            "a device or socket"
        };
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            format!("{what} (expected a file or a pipe)"),
        ));
    }
    std::fs::read(path)
}

/// The bytes of a regular file (through links, [`open_regular`]); anything else in its place
/// (a device, a FIFO, a directory) is an error rather than a read that may never end.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// What a path that is not a regular file is instead (through links), if it is not one.
fn not_a_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    if meta.is_file() {
        None
    } else if meta.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

/// Most bytes of a JSON file beside a model or an index (`config.json`,
/// `generation_config.json`, `gram.json`, a shard index); `tokenizer.json` may hold
/// [`TOKENIZER_CAP`].
pub const JSON_CAP: u64 = 16 << 20;
/// Most bytes of a `tokenizer.json` (the largest vocabularies' are tens of MB).
pub const TOKENIZER_CAP: u64 = 256 << 20;

/// The text of `path`: a regular file of at most `cap` bytes, UTF-8. A device, FIFO or
/// directory in its place, or a file past the cap, is an error (`/dev/zero` linked as a
/// `config.json` was read until memory ran out; a FIFO hung the load). Errors keep their io
/// kind (`NotFound` for a missing file), for callers to tell an optional file's absence.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::{Error as IoError, ErrorKind, Read};
    let meta = std::fs::metadata(path)?;
    if let Some(kind) = not_a_file(&meta) {
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            format!("{kind} (expected a file)"),
        ));
    }
    let too_big = |len: u64| {
        IoError::new(
            ErrorKind::InvalidData,
            format!("{len} bytes, more than the {cap} this file may hold"),
        )
    };
    if meta.len() > cap {
        return Err(too_big(meta.len()));
    }
    let mut text = String::new();
    File::open(path)?.take(cap + 1).read_to_string(&mut text)?;
    if text.len() as u64 > cap {
        return Err(too_big(text.len() as u64));
    }
    Ok(text)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one: a temp file
/// beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// As [`write_atomic`], the contents written by `fill` into the temp file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let (dir, stem) = temp_beside(path)?;
    let (mut f, tmp) = create_temp(&dir, &stem).map_err(|e| Error::io(path, e))?;
    let result = (|| {
        fill(&mut f)?;
        // The file it replaces keeps its mode (a `chmod 600` index stayed private only until
        // its next build), where the file system lets it (some FUSE, CIFS and vfat mounts
        // refuse a mode: the write goes on with the default one).
        if let Ok(old) = std::fs::metadata(path) {
            if old.is_file() {
                let _ = f.set_permissions(old.permissions());
            }
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Whether [`write_atomic`] could write `path` now: its temp file is created and removed.
/// For a command that writes a file at the end of a long run, to fail before it.
pub fn check_writable(path: &Path) -> Result<()> {
    let (dir, stem) = temp_beside(path)?;
    let (_, tmp) = create_temp(&dir, &stem).map_err(|e| Error::io(path, e))?;
    std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))
}

/// The most bytes of the target's name a temp name repeats: with the dot and the
/// `.tmp-PID-N` suffix it stays under the usual 255-byte limit of a name.
const TEMP_STEM_BYTES: usize = 200;

/// The part of `name` a temp file's name repeats: all of it, or its first
/// [`TEMP_STEM_BYTES`] bytes (at a character boundary) when it is longer.
fn temp_stem(name: &str) -> &str {
    let mut end = name.len().min(TEMP_STEM_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Temp files this process has named: the `N` of `.NAME.tmp-PID-N`.
static TEMP_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The directory of `path` and the stem of its temp files' names (`.STEM.tmp-PID-N`), after
/// the stale temps of earlier writes of that name are removed.
fn temp_beside(path: &Path) -> Result<(PathBuf, String)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{} is not a file path", path.display())))?
        .to_string_lossy();
    let stem = temp_stem(&name).to_string();
    remove_stale_temps(&dir, &stem);
    Ok((dir, stem))
}

/// `.STEM.tmp-PID-N` in `dir`, `N` this process's next number.
fn temp_name(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!(
        ".{stem}.tmp-{}-{}",
        std::process::id(),
        TEMP_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

/// How many names [`create_temp`] tries before it gives up.
const TEMP_TRIES: usize = 64;

/// Creates a temp file new, named `.STEM.tmp-PID-N` in `dir` with this process's next `N`,
/// and the next where a name is taken: never through a link planted at a name, never over
/// what another writer has there (one in another PID namespace on a shared volume can have
/// this process's number). Returns the file and its name.
fn create_temp(dir: &Path, stem: &str) -> std::io::Result<(File, PathBuf)> {
    let mut tries = 0;
    loop {
        let path = temp_name(dir, stem);
        tries += 1;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < TEMP_TRIES => {}
            other => return other.map(|f| (f, path)),
        }
    }
}

/// How long a temp file must have been left unwritten before a writer whose process is not
/// visible here counts as dead: a writer in another PID namespace (another container on a
/// shared volume, another host over NFS) is not in our `/proc`, but a live one keeps writing.
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the temp files that earlier writes of `name` into `dir` left when their process was
/// killed mid-write (`.NAME.tmp-PID-N`, as large as what they were writing): those whose process
/// is not in `/proc` and that nothing has written for [`STALE_TEMP`]. Where processes cannot be
/// looked up (no `/proc`) nothing is removed.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let pid = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        // The name first: a directory of many files (a build's shards, `/tmp`) is not
        // stat'ed entry by entry on every write.
        let Some(pid) = pid.filter(|&p| p != std::process::id()) else {
            continue;
        };
        if proc.join(pid.to_string()).exists() {
            continue;
        }
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if idle.is_some_and(|idle| idle >= STALE_TEMP) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp file left by a killed writer (its process gone, the file unwritten for an hour) is
    /// removed by the next write of the same file; one of a live process, one written recently
    /// (a writer this process cannot see may own it), or one of another file stays.
    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temp_files_of_dead_writers_are_removed() {
        let dir = tmp("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let dead = dir.join(format!(".index.gram.tmp-{}-0", u32::MAX - 7));
        let live = dir.join(format!(".index.gram.tmp-{}-99", std::process::id()));
        let other = dir.join(format!(".other.tmp-{}-0", u32::MAX - 7));
        let recent = dir.join(format!(".index.gram.tmp-{}-1", u32::MAX - 7));
        for f in [&dead, &live, &other, &recent] {
            std::fs::write(f, b"partial").unwrap();
        }
        let old = std::time::SystemTime::now() - STALE_TEMP - std::time::Duration::from_secs(60);
        for f in [&dead, &live, &other] {
            File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        write_atomic(&dir.join("index.gram"), b"done").unwrap();
        assert!(!dead.exists(), "the dead writer's temp file stays");
        assert!(live.exists() && other.exists() && recent.exists());
        assert_eq!(std::fs::read(dir.join("index.gram")).unwrap(), b"done");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("gram-container-{}-{name}", std::process::id()))
    }

    /// A name of 250 bytes (under the 255 limit, with multi-byte characters at the cut) is
    /// written; its temp name is shortened, and a check before a long run says the same.
    #[test]
    fn a_long_file_name_is_written() {
        let dir = tmp("long");
        std::fs::create_dir_all(&dir).unwrap();
        // One ASCII byte first: byte 200 falls inside an "é", so the cut must move back.
        let name = format!("a{}{}.jsonl", "é".repeat(100), "x".repeat(43));
        assert_eq!(name.len(), 250);
        assert!(!name.is_char_boundary(TEMP_STEM_BYTES));
        let path = dir.join(&name);
        check_writable(&path).unwrap();
        assert!(!path.exists(), "the check leaves nothing behind");
        write_atomic(&path, b"ok").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ok");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "a temp file stayed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file written over keeps its mode: a private index stays private through a rebuild
    /// (the temp file's default mode replaced it).
    #[cfg(unix)]
    #[test]
    fn a_rewrite_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp("mode");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.gram");
        write_atomic(&path, b"one").unwrap();
        for mode in [0o600, 0o640, 0o444] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            write_atomic(&path, b"two").unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"two");
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, mode, "{mode:o}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Makes a FIFO at `path`.
    #[cfg(target_os = "linux")]
    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that lives across the call.
        let made = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
    }

    /// A directory or a FIFO where a file is expected is an error naming it, at once (the
    /// FIFO's open would block until a writer came).
    #[cfg(target_os = "linux")]
    #[test]
    fn only_a_regular_file_is_opened() {
        let dir = tmp("notfile");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let e = Container::open(&dir.join("sub")).err().unwrap().to_string();
        assert!(e.contains("sub: a directory"), "{e}");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let e = Container::open(&fifo).err().unwrap().to_string();
        assert!(e.contains("fifo: not a regular file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A user's input (code list, catalog, judgements, queries) is read from a file or a pipe
    /// (a writer on the other end, as `<(...)` gives), never from a device or a directory;
    /// a shard of the work directory only from a regular file.
    #[cfg(target_os = "linux")]
    #[test]
    fn inputs_come_from_files_or_pipes_not_devices() {
        let dir = tmp("inputs");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("codes.txt");
        std::fs::write(&file, b"a\nb\n").unwrap();
        assert_eq!(read_input(&file).unwrap(), b"a\nb\n");
        assert_eq!(read_regular(&file).unwrap(), b"a\nb\n");
        for (path, says) in [
            (
                Path::new("/dev/zero"),
                "a device or socket (expected a file or a pipe)",
            ),
            (dir.as_path(), "a directory (expected a file or a pipe)"),
        ] {
            let e = read_input(path).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
            assert_eq!(e.to_string(), says);
        }
        assert_eq!(
            read_input(&dir.join("missing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        // Refused at once where only a file will do (no writer: a read would block).
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, b"piped\n").unwrap())
        };
        assert_eq!(read_input(&fifo).unwrap(), b"piped\n");
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A link planted at the temp file's name is not written through: the file it points
    /// to keeps its bytes.
    #[cfg(unix)]
    #[test]
    fn a_link_at_the_temp_name_is_not_followed() {
        let dir = tmp("planted");
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // The temp name this process uses next: the counter is shared by the tests of this
        // process, so plant links for the next few numbers (fewer than the names a write
        // tries, so that it gets past them).
        let base = TEMP_WRITES.load(std::sync::atomic::Ordering::Relaxed);
        for n in base..base + 16 {
            let link = dir.join(format!(".out.tmp-{}-{n}", std::process::id()));
            std::os::unix::fs::symlink(&victim, link).unwrap();
        }
        write_atomic(&dir.join("out"), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(dir.join("out")).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip_and_every_corruption_is_an_error() {
        let path = tmp("rt");
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b = b"codes".to_vec();
        Container::write(&path, &[(1, &a), (7, &b), (3, &[])]).unwrap();
        let c = Container::open(&path).unwrap();
        c.verify().unwrap();
        assert_eq!(c.section(1).unwrap().1, &a[..]);
        assert_eq!(c.section(7).unwrap().1, &b[..]);
        assert_eq!(c.section(3).unwrap().1, &[] as &[u8]);
        assert!(c.section(2).is_none());
        let e = c.require(2, "postings").err().unwrap().to_string();
        assert!(e.contains("postings section"), "{e}");
        assert!(c.sections().iter().all(|s| s.offset % ALIGN == 0));
        let good = std::fs::read(&path).unwrap();
        drop(c);

        // Every single-byte corruption fails at open (header) or at verify (payload), and
        // every truncation fails at open; none panics.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            std::fs::write(&path, &bad).unwrap();
            let caught = match Container::open(&path) {
                Err(_) => true,
                Ok(c) => c.verify().is_err(),
            };
            // Padding bytes between sections are covered by nothing and may change freely.
            let in_padding = c_padding(&good, i);
            assert!(caught || in_padding, "byte {i} flipped unnoticed");
        }
        for len in [0, 7, 15, 40, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            let e = Container::open(&path).err().map(|e| e.to_string());
            assert!(e.is_some(), "truncated to {len} opened");
        }
        let mut next = good.clone();
        next[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&path, &next).unwrap();
        let e = Container::open(&path).err().unwrap().to_string();
        assert!(
            e.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(Container::write(&path, &[(1, &a), (1, &b)]).is_err());
    }

    /// Pairs of changes in the top bits of two 8-byte words of a section: under FNV-1a over
    /// words (format version 1) two flips of the top bit always cancelled, and a pair of
    /// top-byte edits went unseen about once in 256. Every pair is caught now.
    #[test]
    fn paired_top_bit_changes_are_caught() {
        let path = tmp("pairs");
        let mut next = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let a: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        Container::write(&path, &[(1, &a)]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let at = Container::parse(&good).unwrap()[0].offset;
        for round in 0..3000 {
            let (i, j) = ((next() % 512) as usize, (next() % 512) as usize);
            if i == j {
                continue;
            }
            let mut bad = good.clone();
            // Half the rounds the top bit of each word, the others its top byte.
            let (x, y) = if round % 2 == 0 {
                (0x80, 0x80)
            } else {
                (1 + (next() % 255) as u8, 1 + (next() % 255) as u8)
            };
            bad[at + 8 * i + 7] ^= x;
            bad[at + 8 * j + 7] ^= y;
            std::fs::write(&path, &bad).unwrap();
            let c = Container::open(&path).unwrap();
            assert!(
                c.verify().is_err(),
                "round {round}: words {i} and {j} changed unnoticed"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// Section tables that a corrupt or hostile writer could make, each with its header
    /// checksum recomputed so that only the table checks stand: every one refused with the
    /// message that names the fault, none a panic or an overflow.
    #[test]
    fn hostile_section_tables_are_refused() {
        let path = tmp("hostile");
        let a = vec![5u8; 200];
        Container::write(&path, &[(1, &a), (2, b"xyz")]).unwrap();
        let good = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let header = 16 + ENTRY * 2 + 8;
        let second = Container::parse(&good).unwrap()[1];
        // (entry, field offset in it, value, message)
        let cases: [(usize, usize, u64, &str); 10] = [
            (0, 8, u64::MAX, "ends past the end"),
            (0, 16, u64::MAX, "ends past the end"),
            (1, 8, u64::MAX - 2, "ends past the end"),
            (0, 8, (good.len() + 64) as u64, "ends past the end"),
            (0, 8, 0, "misplaced"),
            (0, 8, header as u64 + 1, "misplaced"),
            (0, 4, 1, "misplaced"),
            (1, 0, 1, "repeats or overlaps"),
            (1, 8, (second.offset - 64) as u64, "repeats or overlaps"),
            (
                1,
                16,
                (good.len() - second.offset + 1) as u64,
                "ends past the end",
            ),
        ];
        for (entry, field, value, want) in cases {
            let mut bad = good.clone();
            let at = 16 + ENTRY * entry + field;
            if field == 0 || field == 4 {
                bad[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
            } else {
                bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            let sum = checksum(&bad[..header - 8]);
            bad[header - 8..header].copy_from_slice(&sum.to_le_bytes());
            match Container::parse(&bad) {
                Ok(t) => panic!("entry {entry} field {field} = {value}: parsed {t:?}"),
                Err(e) => assert!(e.contains(want), "entry {entry} field {field}: {e}"),
            }
        }
        // A count of sections whose table would run past the file.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&(MAX_SECTIONS as u32).to_le_bytes());
        let e = Container::parse(&bad).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        // Past the cap, refused before the table is read: here a whole, checksummed table of
        // tens of thousands of empty sections (one kind each, all at the same offset) that the
        // pairwise check would otherwise take seconds over.
        for count in [MAX_SECTIONS + 1, 40_000, u32::MAX as usize] {
            let mut bad = good[..16].to_vec();
            bad[12..16].copy_from_slice(&(count as u32).to_le_bytes());
            if count < 100_000 {
                let at = (16 + ENTRY * count + 8).next_multiple_of(ALIGN);
                for i in 0..count {
                    let mut e = [0u8; ENTRY];
                    e[..4].copy_from_slice(&(i as u32).to_le_bytes());
                    e[8..16].copy_from_slice(&(at as u64).to_le_bytes());
                    e[24..].copy_from_slice(&checksum(&[]).to_le_bytes());
                    bad.extend_from_slice(&e);
                }
                let sum = checksum(&bad);
                bad.extend_from_slice(&sum.to_le_bytes());
                bad.resize(at, 0);
            }
            let e = Container::parse(&bad).unwrap_err();
            assert!(e.contains("at most 256"), "{count} sections: {e}");
        }
        // And the writer refuses to make one.
        let many: Vec<(u32, &[u8])> = (0..=MAX_SECTIONS as u32).map(|k| (k, &b"x"[..])).collect();
        let e = Container::write(&path, &many).unwrap_err().to_string();
        assert!(e.contains("at most 256") && !path.exists(), "{e}");
    }

    /// Whether byte `i` of a container lies in no header and no section.
    fn c_padding(file: &[u8], i: usize) -> bool {
        let sections = Container::parse(file).unwrap();
        let n = sections.len();
        let header = 16 + ENTRY * n + 8;
        i >= header
            && !sections
                .iter()
                .any(|s| (s.offset..s.offset + s.len).contains(&i))
    }
}
