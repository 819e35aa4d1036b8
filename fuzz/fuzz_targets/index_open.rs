//! Any bytes as an index file: `Index::open` refuses them with an error, or the index opens
//! and every record reads and ranks (`Index::scan`, `Index::rank_all`) — never a panic, never
//! an out-of-bounds read.
//! Run: `cargo +nightly fuzz run index_open` (seed it with a real index: see fuzz/README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The reader maps a file: give it one per input (tmpfs keeps this cheap).
    let path = std::env::temp_dir().join(format!("gram-fuzz-{}.gram", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(index) = gram::index::Index::open(&path) {
        let _ = index.container().verify();
        let _ = index.scan();
        let _ = index.rank_all();
    }
});
